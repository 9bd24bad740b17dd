"""Tensor functions of matrix capsules with EM routing, named after the article's.

These are the functions of `capsule_em/m_capsules/core.py` in the TF1 code of
Jonathan Hui's article "Understanding Matrix capsules with EM Routing", ported
to TensorFlow 2 with the same element orders and arithmetic, but with a dynamic
batch size, any kernel size, no tiling of the weights over the batch and the
routing softmax kept at rank 2 (oneDNN, TensorFlow's default CPU build, aborts
on rank > 5).

Legend of the symbols used in the shape comments:

  N        batch size
  H, W     height and width of the input capsule grid
  OH, OW   height and width of the output capsule grid (VALID: (H - K) // s + 1)
  K        kernel size of a convolutional capsule layer; s its stride
  C        capsule types of a tensor fed to `kernel_tile`
  I        input capsules routed to one output position (K*K*C in a conv layer)
  O        output capsule types (classes in the class capsule layer)
  M        number of independent routing problems (N*OH*OW, or N)
  16       a 4x4 pose matrix flattened row-major: element 4*row + col
  ...      any number of leading axes

Reference: G. E. Hinton, S. Sabour, N. Frosst, "Matrix capsules with EM
routing", ICLR 2018.
"""

import numpy as np
import tensorflow as tf

#: The article's epsilon, used in log(stdv + eps), log(a + eps) and the cost
#: normalisation.
EPSILON = 1e-9


def _static_shape(x):
    return tuple(x.shape.as_list()) if x.shape.rank is not None else None


def _check_rank(x, ranks, what):
    rank = x.shape.rank
    if rank is None or rank not in ranks:
        accepted = " or ".join(str(r) for r in ranks)
        raise ValueError(
            f"{what} must have rank {accepted}, got shape {_static_shape(x)}"
        )


def _check_pose(x, what):
    shape = _static_shape(x)
    if tuple(shape[-2:]) != (4, 4):
        raise ValueError(f"{what} must end in a 4x4 pose matrix, got shape {shape}")


def kernel_tile(x, kernel, stride):
    """Gathers the K x K input windows of a VALID convolution (article: `kernel_tile`).

    The article builds these windows with a depthwise convolution by a one-hot
    filter; here each of the K*K kernel offsets is one strided slice, which
    copies the same values (exactly) without the multiply-adds.

    Args:
      x: poses `(N, H, W, C, 4, 4)` or activations `(N, H, W, C)`.
      kernel: kernel size K (int >= 1).
      stride: stride s (int >= 1).

    Returns:
      `(N, OH, OW, K*K, C*16)` for poses (the 4x4 matrices flattened, capsule
      major) or `(N, OH, OW, K*K, C)` for activations, with
      `out[n, oh, ow, K*i + j, d] = x[n, s*oh + i, s*ow + j, d]`.
    """
    x = tf.convert_to_tensor(x)
    _check_rank(x, (4, 6), "kernel_tile input")
    kernel, stride = _check_kernel_stride(kernel, stride)
    shape = _static_shape(x)
    height, width = shape[1], shape[2]
    if x.shape.rank == 6:
        _check_pose(x, "kernel_tile input")
        depth = shape[3] * 16 if shape[3] is not None else -1
    else:
        depth = shape[3] if shape[3] is not None else -1
    _check_grid(height, width, kernel, "kernel_tile input", shape)
    dyn = tf.shape(x)
    x = tf.reshape(x, tf.stack([dyn[0], dyn[1], dyn[2], depth]))  # (N, H, W, D)
    out_h = (tf.shape(x)[1] - kernel) // stride + 1
    out_w = (tf.shape(x)[2] - kernel) // stride + 1
    windows = []
    for i in range(kernel):
        for j in range(kernel):
            windows.append(
                tf.strided_slice(
                    x,
                    [0, i, j, 0],
                    tf.stack([tf.shape(x)[0], i + (out_h - 1) * stride + 1,
                              j + (out_w - 1) * stride + 1, tf.shape(x)[3]]),
                    [1, stride, stride, 1],
                )
            )  # (N, OH, OW, D)
    out = tf.stack(windows, axis=3)  # (N, OH, OW, K*K, D)
    if height is not None and width is not None:
        out.set_shape([shape[0], (height - kernel) // stride + 1,
                       (width - kernel) // stride + 1, kernel * kernel,
                       None if depth == -1 else depth])
    return out


def _check_kernel_stride(kernel, stride):
    for name, value in (("kernel", kernel), ("stride", stride)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(kernel), int(stride)


def _check_grid(height, width, kernel, what, shape):
    for size in (height, width):
        if size is not None and size < kernel:
            raise ValueError(
                f"{what}: the capsule grid {height}x{width} is smaller than the "
                f"kernel {kernel}x{kernel} (shape {shape}); the grid must be at "
                f"least {kernel}x{kernel}"
            )


def mat_transform(poses, w):
    """Computes the votes `pose @ W` of every input capsule for every output capsule.

    Article: `mat_transform`, which tiles both `w` and the poses to
    `(M, I, O, 4, 4)` before a matmul; one einsum gives the same products
    without the copies.

    Args:
      poses: `(M, I, 16)`, 4x4 pose matrices flattened row-major.
      w: transformation matrices `(1, I, O, 4, 4)`, shared by all M.

    Returns:
      votes `(M, I, O, 16)`: `votes[m, i, o] = P[m, i] @ W[0, i, o]` with the
      pose on the left, flattened row-major.
    """
    poses = tf.convert_to_tensor(poses)
    w = tf.convert_to_tensor(w)
    _check_rank(poses, (3,), "mat_transform poses")
    _check_rank(w, (5,), "mat_transform w")
    p_shape, w_shape = _static_shape(poses), _static_shape(w)
    if p_shape[-1] != 16:
        raise ValueError(
            f"mat_transform poses must be (M, I, 16) (4x4 poses flattened), got {p_shape}"
        )
    if w_shape[0] != 1 or tuple(w_shape[-2:]) != (4, 4):
        raise ValueError(f"mat_transform w must be (1, I, O, 4, 4), got {w_shape}")
    if p_shape[1] is not None and w_shape[1] is not None and p_shape[1] != w_shape[1]:
        raise ValueError(
            f"mat_transform: poses have {p_shape[1]} input capsules (shape {p_shape}) "
            f"but w has {w_shape[1]} (shape {w_shape}); they must match"
        )
    dyn = tf.shape(poses)
    p = tf.reshape(poses, tf.stack([dyn[0], dyn[1], 4, 4]))  # (M, I, 4, 4)
    votes = tf.einsum("mirk,iokc->miorc", p, w[0])  # (M, I, O, 4, 4)
    return tf.reshape(votes, tf.stack([dyn[0], dyn[1], tf.shape(w)[2], 16]))  # (M, I, O, 16)


def coord_addition(votes, height, width):
    """Adds the scaled coordinates of each position to the votes (article: `coord_addition`).

    Args:
      votes: `(N, H, W, I, O, 16)`.
      height: H, the grid height used for scaling.
      width: W, the grid width used for scaling.

    Returns:
      votes of the same shape with `(h + 0.5) / H` added to pose element 0
      (row 0, column 0) and `(w + 0.5) / W` added to element 1 (row 0,
      column 1) at position (h, w); the other 14 elements unchanged.
    """
    votes = tf.convert_to_tensor(votes)
    _check_rank(votes, (6,), "coord_addition votes")
    shape = _static_shape(votes)
    if shape[-1] != 16:
        raise ValueError(f"coord_addition votes must end in 16 pose elements, got {shape}")
    rows = (tf.range(height, dtype=tf.float32) + 0.5) / float(height)  # (H,)
    cols = (tf.range(width, dtype=tf.float32) + 0.5) / float(width)  # (W,)
    zeros_h, zeros_w = tf.zeros_like(rows), tf.zeros_like(cols)
    row_part = tf.stack([rows, zeros_h] + [zeros_h] * 14, axis=-1)  # (H, 16)
    col_part = tf.stack([zeros_w, cols] + [zeros_w] * 14, axis=-1)  # (W, 16)
    offset = row_part[:, None, :] + col_part[None, :, :]  # (H, W, 16)
    return votes + tf.cast(offset[None, :, :, None, None, :], votes.dtype)  # (N, H, W, I, O, 16)


# ---------------------------------------------------------------------------
# EM routing
# ---------------------------------------------------------------------------


def inverse_temperatures(iterations):
    """The article's inverse temperature schedule, one value per EM iteration.

    `lambda_t = 1 + (min(iterations, 3) - 1) * t / max(1, iterations - 1)`, so
    3 iterations give 1, 2, 3 and 4 give 1, 5/3, 7/3, 3.
    """
    _check_iterations(iterations)
    it_min, it_max = 1.0, min(iterations, 3.0)
    return [it_min + (it_max - it_min) * it / max(1.0, iterations - 1.0)
            for it in range(iterations)]


def _check_iterations(iterations):
    if isinstance(iterations, bool) or not isinstance(iterations, (int, np.integer)) or iterations < 1:
        raise ValueError(f"iterations must be an int >= 1, got {iterations!r}")


def m_step(rr, votes, i_activations, beta_v, beta_a, inverse_temperature):
    """The article's M-step, with its broadcast shapes (for tracing and comparison).

    Args:
      rr: assignments `(I, O, 1)` or `(..., I, O, 1)`.
      votes: `(..., I, O, 16)`.
      i_activations: input activations `(..., I, 1, 1)`.
      beta_v: `(..., 1, O, 1)`.
      beta_a: `(..., 1, O, 1)`.
      inverse_temperature: the scalar lambda.

    Returns:
      `(mean (..., 1, O, 16), stdv (..., 1, O, 16), activations (..., 1, O, 1))`.
    """
    rr_prime = rr * i_activations  # (..., I, O, 1)
    rr_prime_sum = tf.reduce_sum(rr_prime, axis=-3, keepdims=True)  # (..., 1, O, 1)
    o_mean = tf.reduce_sum(rr_prime * votes, axis=-3, keepdims=True) / rr_prime_sum  # (..., 1, O, 16)
    o_stdv = tf.sqrt(
        tf.reduce_sum(rr_prime * tf.square(votes - o_mean), axis=-3, keepdims=True)
        / rr_prime_sum)  # (..., 1, O, 16)
    o_cost_h = (beta_v + tf.math.log(o_stdv + EPSILON)) * rr_prime_sum  # (..., 1, O, 16)
    o_cost = tf.reduce_sum(o_cost_h, axis=-1, keepdims=True)  # (..., 1, O, 1)
    o_cost_mean = tf.reduce_mean(o_cost, axis=-2, keepdims=True)  # (..., 1, 1, 1)
    num_o = float(votes.shape[-2])
    o_cost_stdv = tf.sqrt(
        tf.reduce_sum(tf.square(o_cost - o_cost_mean), axis=-2, keepdims=True) / num_o)
    o_activations_cost = beta_a + (o_cost_mean - o_cost) / (o_cost_stdv + EPSILON)
    o_activations = tf.sigmoid(inverse_temperature * o_activations_cost)  # (..., 1, O, 1)
    return o_mean, o_stdv, o_activations


def e_step(o_mean, o_stdv, o_activations, votes):
    """The article's E-step, with its broadcast shapes (for tracing and comparison).

    Args:
      o_mean: `(..., 1, O, 16)`.
      o_stdv: `(..., 1, O, 16)`.
      o_activations: `(..., 1, O, 1)`.
      votes: `(..., I, O, 16)`.

    Returns:
      assignments rr `(..., I, O, 1)`, a softmax over the O axis. The softmax
      runs on a rank-2 view, which gives the same numbers as the article's
      rank-6 softmax and works with oneDNN.
    """
    o_p_unit0 = -tf.reduce_sum(
        tf.square(votes - o_mean) / (2 * tf.square(o_stdv)), axis=-1, keepdims=True)
    o_p_unit2 = -tf.reduce_sum(tf.math.log(o_stdv + EPSILON), axis=-1, keepdims=True)
    o_p = o_p_unit0 + o_p_unit2  # (..., I, O, 1)
    zz = tf.math.log(o_activations + EPSILON) + o_p  # (..., I, O, 1)
    zz_shape = tf.shape(zz)
    rr = tf.nn.softmax(tf.reshape(zz, [-1, zz_shape[-2]]), axis=-1)  # (M*I, O)
    return tf.reshape(rr, zz_shape)  # (..., I, O, 1)


def em_routing(votes, i_activations, beta_v, beta_a, iterations, stable=False,
               return_assignments=False):
    """EM routing between capsule layers (article: `matrix_capsules_em_routing`).

    The article's arithmetic, schedule and epsilons, fused into a form that
    never broadcasts `rr` to the vote shape more than needed:
    `votes - mean` is computed once per iteration and shared by the variance
    (M-step) and the Gaussian log-likelihood (E-step), the leading axes are
    merged into one (rank 4), and the softmax is taken over a rank-2 view.

    * rr starts at 1/O for every input capsule;
    * iteration t uses the inverse temperature `inverse_temperatures(iterations)[t]`;
    * the last E-step is skipped; there is no stop_gradient.

    Args:
      votes: `(..., I, O, 16)` (rank >= 3; rank 4 in class capsules and rank 6
        in conv capsules).
      i_activations: `(..., I)`, the activations of the input capsules.
      beta_v: O values (any shape of O elements, e.g. `(1, 1, 1, O)` or `(1, O)`).
      beta_a: O values, as `beta_v`.
      iterations: number of EM iterations (>= 1).
      stable: False (default) reproduces the article exactly, including its
        divisions with no epsilon, which give NaN when the input activations of
        a position are all 0 or the votes of an output capsule agree exactly in
        one component. True adds `EPSILON` to the summed assignments and to
        the variances (inside the square roots), which keeps outputs and
        gradients finite and changes ordinary outputs by less than float32
        rounding.
      return_assignments: also return the assignments rr used by the last
        M-step.

    Returns:
      `(poses (..., O, 16), activations (..., O))`, and rr `(..., I, O)` if
      `return_assignments`.
    """
    votes = tf.convert_to_tensor(votes)
    i_activations = tf.convert_to_tensor(i_activations, dtype=votes.dtype)
    _check_iterations(iterations)
    if votes.shape.rank is None or votes.shape.rank < 3 or votes.shape[-1] != 16:
        raise ValueError(
            f"em_routing votes must be (..., I, O, 16), got shape {_static_shape(votes)}")
    num_i, num_o = votes.shape[-3], votes.shape[-2]
    if num_o is None:
        raise ValueError("em_routing needs a static number of output capsules O")
    if i_activations.shape.rank != votes.shape.rank - 2 or (
            i_activations.shape[-1] is not None and num_i is not None
            and i_activations.shape[-1] != num_i):
        raise ValueError(
            f"em_routing i_activations must be votes.shape[:-2] = (..., I) = "
            f"{_static_shape(votes)[:-2]}, got {_static_shape(i_activations)}")
    beta_v = _check_beta(beta_v, num_o, "beta_v", votes.dtype)  # (O,)
    beta_a = _check_beta(beta_a, num_o, "beta_a", votes.dtype)  # (O,)

    lead_shape = tf.shape(votes)[:-3]
    v = tf.reshape(votes, tf.concat([[-1], tf.shape(votes)[-3:]], 0))  # (M, I, O, 16)
    a_in = tf.reshape(i_activations, [-1, tf.shape(votes)[-3], 1])  # (M, I, 1)
    rr = tf.fill(tf.shape(v)[1:3], tf.constant(1.0 / num_o, votes.dtype))  # (I, O)
    eps_s = EPSILON if stable else 0.0

    for it, lam in enumerate(inverse_temperatures(iterations)):
        # M-step
        rr_prime = rr * a_in  # (M, I, O)
        rr_sum = tf.reduce_sum(rr_prime, axis=1, keepdims=True)  # (M, 1, O)
        if stable:
            rr_sum = rr_sum + eps_s
        rr_prime = rr_prime[..., None]  # (M, I, O, 1)
        mean = tf.reduce_sum(rr_prime * v, axis=1, keepdims=True) / rr_sum[..., None]  # (M, 1, O, 16)
        dev2 = tf.square(v - mean)  # (M, I, O, 16), shared with the E-step
        var = tf.reduce_sum(rr_prime * dev2, axis=1, keepdims=True) / rr_sum[..., None]  # (M, 1, O, 16)
        if stable:
            var = var + EPSILON
        stdv = tf.sqrt(var)  # (M, 1, O, 16)
        log_stdv = tf.math.log(stdv + EPSILON)  # (M, 1, O, 16)
        cost = tf.reduce_sum(beta_v[:, None] + log_stdv, axis=-1) * rr_sum  # (M, 1, O)
        cost_mean = tf.reduce_mean(cost, axis=-1, keepdims=True)  # (M, 1, 1)
        cost_var = tf.reduce_mean(tf.square(cost - cost_mean), axis=-1, keepdims=True)
        if stable:
            cost_var = cost_var + EPSILON
        cost_stdv = tf.sqrt(cost_var)  # (M, 1, 1)
        a_out = tf.sigmoid(lam * (beta_a + (cost_mean - cost) / (cost_stdv + EPSILON)))  # (M, 1, O)
        if it == iterations - 1:
            break
        # E-step
        if stable:
            two_var = 2.0 * var
        else:
            two_var = 2.0 * tf.square(stdv)  # the article's 2 * stdv**2
        log_p = (-tf.reduce_sum(dev2 / two_var, axis=-1)
                 - tf.reduce_sum(log_stdv, axis=-1))  # (M, I, O)
        zz = tf.math.log(a_out + EPSILON) + log_p  # (M, I, O)
        rr = tf.nn.softmax(zz, axis=-1)  # (M, I, O)

    out_shape_p = tf.concat([lead_shape, [num_o, 16]], 0)
    out_shape_a = tf.concat([lead_shape, [num_o]], 0)
    poses = tf.reshape(mean, out_shape_p)  # (..., O, 16)
    activations = tf.reshape(a_out, out_shape_a)  # (..., O)
    static_lead = votes.shape[:-3]
    poses.set_shape(static_lead.concatenate([num_o, 16]))
    activations.set_shape(static_lead.concatenate([num_o]))
    if return_assignments:
        rr_full = tf.broadcast_to(rr, tf.shape(v)[:3])  # (M, I, O)
        rr_full = tf.reshape(rr_full, tf.concat([lead_shape, tf.shape(v)[1:3]], 0))  # (..., I, O)
        rr_full.set_shape(static_lead.concatenate([num_i, num_o]))
        return poses, activations, rr_full
    return poses, activations


def _check_beta(beta, num_o, name, dtype):
    beta = tf.convert_to_tensor(beta, dtype=dtype)
    if beta.shape.num_elements() != num_o:
        raise ValueError(
            f"em_routing {name} must hold O = {num_o} values (e.g. shape (1, {num_o})), "
            f"got shape {_static_shape(beta)}")
    return tf.reshape(beta, [num_o])
