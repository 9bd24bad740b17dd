"""Tensor functions of matrix capsules with EM routing, named after the article's.

These are the functions of `capsule_em/m_capsules/core.py` in the TF1 code of
Jonathan Hui's article "Understanding Matrix capsules with EM Routing", ported
to TensorFlow 2 with the same element orders and arithmetic, but with a dynamic
batch size, any kernel size, no tiling of the weights over the batch and the
routing softmax kept at rank <= 3 (oneDNN, TensorFlow's default CPU build,
aborts on rank > 5). EM routing runs in fused kernels with an analytic
gradient: by default the native CPU ops of `capsem.native` (C++, compiled on
first use), otherwise blocked XLA kernels (see "Fused EM routing" below and
docs/performance.md).

Legend of the symbols used in the shape comments:

  N        batch size
  H, W     height and width of the input capsule grid
  OH, OW   height and width of the output capsule grid (VALID: (H - K) // s + 1)
  K        kernel size of a convolutional capsule layer; s its stride
  C        capsule types of a tensor fed to `kernel_tile`
  I        input capsules routed to one output position (K*K*C in a conv layer)
  O        output capsule types (classes in the class capsule layer)
  M        number of independent routing problems (N*OH*OW, or N)
  G        routing problems in one block of the fused routing kernels
  r, k, c  row / inner / column index of the 4x4 matrix product P @ W
  16       a 4x4 pose matrix flattened row-major: element 4*row + col
  ...      any number of leading axes

Reference: G. E. Hinton, S. Sabour, N. Frosst, "Matrix capsules with EM
routing", ICLR 2018.
"""

import contextlib
import threading

import numpy as np
import tensorflow as tf

try:  # private, but the only way to tell that a graph will be compiled by XLA
    from tensorflow.python.ops.control_flow_util import GraphOrParentsInXlaContext
except ImportError:  # pragma: no cover
    def GraphOrParentsInXlaContext(graph):  # noqa: N802
        return False

from capsem import native

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
    filter; here they are one gather of the K*K window positions of every
    output position, which copies the same values (exactly) without the
    multiply-adds, and whose gradient is one scatter-add (a sum over the
    windows that contain each input position).

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
    x = tf.reshape(x, tf.stack([dyn[0], dyn[1] * dyn[2], depth]))  # (N, H*W, D)
    out_h = (dyn[1] - kernel) // stride + 1
    out_w = (dyn[2] - kernel) // stride + 1
    rows = (tf.range(out_h)[:, None, None, None] * stride
            + tf.range(kernel)[None, None, :, None])  # (OH, 1, K, 1): s*oh + i
    cols = (tf.range(out_w)[None, :, None, None] * stride
            + tf.range(kernel)[None, None, None, :])  # (1, OW, 1, K): s*ow + j
    index = tf.reshape(rows * dyn[2] + cols, [-1])  # (OH*OW*K*K,) positions in H*W
    out = tf.gather(x, index, axis=1)  # (N, OH*OW*K*K, D)
    out = tf.reshape(out, tf.stack([dyn[0], out_h, out_w, kernel * kernel, -1]))
    # (N, OH, OW, K*K, D)
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


#: EM routing modes (`em_routing`'s `routing`, and the layers' and `capsules_net`'s):
#: the article's code (this module) or the paper's procedure, its sibling
#: `capsem.paper_routing.em_routing_paper`.
ROUTING_MODES = ("article", "paper")


def em_routing(votes, i_activations, beta_v, beta_a, iterations, stable=False,
               return_assignments=False, routing="article", **paper_options):
    """EM routing between capsule layers (article: `matrix_capsules_em_routing`).

    The article's arithmetic, schedule and epsilons, computed by fused
    routing kernels: the native ops of `capsem.native` by default, otherwise
    the XLA kernels of this module (see "Fused EM routing" below): `votes -
    mean` is squared once per iteration and shared by the variance (M-step)
    and the Gaussian log-likelihood (E-step), the weighted sums over the
    input capsules are batched matrix-vector products, the softmax over the
    output capsules works on rank-3 tensors (oneDNN aborts on rank > 5), and
    the gradient is computed analytically from the votes and a few
    per-iteration statistics instead of by differentiating every
    intermediate tensor. Results agree with the article's to float32
    rounding.

    * rr starts at 1/O for every input capsule;
    * iteration t uses the inverse temperature `inverse_temperatures(iterations)[t]`;
    * the last E-step is skipped; there is no stop_gradient (gradients flow
      through all iterations into votes, activations, beta_v and beta_a).

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
        M-step (a diagnostic output: no gradient flows back through it).
      routing: "article" (default): the article's routing above. "paper":
        the paper's procedure, `capsem.paper_routing.em_routing_paper`
        (its routing, inverse temperatures and guards; `stable` does not
        apply), with votes `(N, I, O, 16)` (one output position, as in the
        class capsules) or `(N, P, I, O, 16)` (P output positions).
      **paper_options: with `routing="paper"`, the keyword arguments of
        `em_routing_paper`: `final_lambda`, `child_map` (a conv layer's
        children shared out across positions), `variance_floor`,
        `assignment_gradient`, `inverse_temperature`, `cost`.

    Returns:
      `(poses (..., O, 16), activations (..., O))`, and rr `(..., I, O)` if
      `return_assignments`.

    Example:
    >>> v = tf.random.normal([2, 12, 3, 16])  # (N, I, O, 16)
    >>> a = tf.fill([2, 12], 0.5)
    >>> p, act = em_routing(v, a, tf.zeros(3), tf.zeros(3), 3)
    >>> p.shape, act.shape
    (TensorShape([2, 3, 16]), TensorShape([2, 3]))
    >>> p, act = em_routing(v, a, tf.zeros(3), tf.zeros(3), 1, routing="paper", cost="unnormalised")
    >>> act.shape
    TensorShape([2, 3])
    """
    if routing not in ROUTING_MODES:
        raise ValueError(f"em_routing routing must be one of {ROUTING_MODES}, got {routing!r}")
    if routing == "paper":
        return _em_routing_paper(votes, i_activations, beta_v, beta_a, iterations, stable,
                                 return_assignments, paper_options)
    if paper_options:
        raise TypeError(f"em_routing options {sorted(paper_options)} are the paper routing's: "
                        f"pass routing='paper' with them, or leave them out")
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
    static_lead = votes.shape[:-3]
    dyn = tf.shape(votes)
    v = tf.reshape(votes, tf.stack([-1, dyn[-3], num_o, 16]))  # (M, I, O, 16)
    a_in = tf.reshape(i_activations, tf.stack([-1, dyn[-3]]))  # (M, I)
    v.set_shape([static_lead.num_elements(), num_i, num_o, 16])
    a_in.set_shape([static_lead.num_elements(), num_i])
    poses, activations, rr = _route(_VOTES, (v,), a_in, beta_v, beta_a, iterations, stable,
                                    return_assignments)
    poses = tf.reshape(poses, tf.concat([lead_shape, [num_o, 16]], 0))  # (..., O, 16)
    activations = tf.reshape(activations, tf.concat([lead_shape, [num_o]], 0))  # (..., O)
    poses.set_shape(static_lead.concatenate([num_o, 16]))
    activations.set_shape(static_lead.concatenate([num_o]))
    if return_assignments:
        rr = tf.reshape(rr, tf.concat([lead_shape, dyn[-3:-1]], 0))  # (..., I, O)
        rr.set_shape(static_lead.concatenate([num_i, num_o]))
        return poses, activations, rr
    return poses, activations


def _em_routing_paper(votes, i_activations, beta_v, beta_a, iterations, stable,
                      return_assignments, paper_options):
    """`em_routing(..., routing="paper")`: `em_routing_paper` on rank-4 or rank-5 votes."""
    from capsem import paper_routing  # it imports this module

    if stable:
        raise ValueError("em_routing stable=True is the article routing's option; the paper "
                         "routing has its own variance floor (variance_floor=)")
    votes = tf.convert_to_tensor(votes)
    rank = votes.shape.rank
    if rank not in (4, 5):
        raise ValueError(f"em_routing with routing='paper' needs votes (N, I, O, 16) or "
                         f"(N, P, I, O, 16), got shape {_static_shape(votes)}")
    if rank == 4:
        votes = votes[:, None]  # (N, 1, I, O, 16)
        i_activations = tf.convert_to_tensor(i_activations, votes.dtype)[:, None]  # (N, 1, I)
    out = paper_routing.em_routing_paper(votes, i_activations, beta_v, beta_a, iterations,
                                         return_assignments=return_assignments,
                                         **paper_options)
    if rank == 4:  # (N, 1, O, 16), (N, 1, O) and rr (N, 1, I, O): the position dropped
        out = tuple(x[:, 0] for x in out)
    return out


def _em_routing_from_poses(poses, w, i_activations, beta_v, beta_a, iterations, stable=False,
                          offsets=None, return_assignments=False):
    """`em_routing(mat_transform(poses, w) + offsets, ...)` without materialising the votes.

    The votes `P[m, i] @ W[i, o] (+ offsets[i])` are recomputed inside the
    fused routing kernel wherever they are needed, a block of routing
    problems at a time, so that no tensor of the full vote size
    `(M, I, O, 16)` is ever stored, in the forward pass or in the gradient.
    The numbers are those of `em_routing` on the materialised votes.

    Args:
      poses: `(M, I, 16)` input poses, 4x4 flattened row-major.
      w: `(1, I, O, 4, 4)` or `(I, O, 4, 4)` transformation matrices.
      i_activations: `(M, I)`.
      beta_v, beta_a, iterations, stable, return_assignments: as `em_routing`.
      offsets: None, or `(I, 16)` constants added to the votes of input capsule
        i for every output capsule (the coordinate addition of class capsules).

    Returns:
      `(poses (M, O, 16), activations (M, O))`, and rr `(M, I, O)` if
      `return_assignments`.
    """
    poses = tf.convert_to_tensor(poses)
    w = tf.convert_to_tensor(w, dtype=poses.dtype)
    i_activations = tf.convert_to_tensor(i_activations, dtype=poses.dtype)
    _check_iterations(iterations)
    if w.shape.rank == 5:
        w = w[0]  # (I, O, 4, 4)
    num_i, num_o = w.shape[0], w.shape[1]
    if poses.shape.rank != 3 or poses.shape[-1] != 16 or poses.shape[1] != num_i:
        raise ValueError(f"_em_routing_from_poses: poses must be (M, I={num_i}, 16), "
                         f"got {_static_shape(poses)}")
    beta_v = _check_beta(beta_v, num_o, "beta_v", poses.dtype)  # (O,)
    beta_a = _check_beta(beta_a, num_o, "beta_a", poses.dtype)  # (O,)
    if offsets is None:
        source, inputs = _POSES, (poses, w)
    else:
        offsets = tf.convert_to_tensor(offsets, dtype=poses.dtype)  # (I, 16)
        source, inputs = _POSES_OFFSETS, (poses, w, offsets)
    out_p, out_a, rr = _route(source, inputs, i_activations, beta_v, beta_a, iterations, stable,
                              return_assignments)
    if return_assignments:
        return out_p, out_a, rr  # rr (M, I, O)
    return out_p, out_a


def _check_beta(beta, num_o, name, dtype):
    beta = tf.convert_to_tensor(beta, dtype=dtype)
    if beta.shape.num_elements() != num_o:
        raise ValueError(
            f"em_routing {name} must hold O = {num_o} values (e.g. shape (1, {num_o})), "
            f"got shape {_static_shape(beta)}")
    return tf.reshape(beta, [num_o])


# ---------------------------------------------------------------------------
# Fused EM routing
# ---------------------------------------------------------------------------
#
# By default routing runs in the native ops of capsem/native/em_routing.cc
# (`_route_native`; `native_routing_kernels`), which follow the same
# formulas, one problem at a time. Otherwise (no C++ compiler, CAPSEM_NATIVE=0,
# routing_kernels="xla") the kernels below are used:
#
# The M routing problems (output positions) are independent, so they are
# routed in blocks of G problems. Each block is one call of an XLA-compiled
# forward kernel and, for the gradient, two backward kernels (inside a
# tf.function; eagerly the same code runs op by op). Blocks keep every
# vote-sized temporary to a few MB, which stays in the CPU caches, and
# independent blocks run concurrently on TensorFlow's inter-op threads.
#
# Inside the routing kernels the votes are laid out (G, O, 16, I), input
# capsules last: the weighted sums over I are batched matrix-vector products
# and the sums over the 16 pose elements are reductions over a middle axis,
# both of which XLA compiles to vectorised loops. The gradient is analytic
# (`_em_backward`): with per-iteration statistics of size (G, O, 16) and the
# assignments (G, O, I) saved by the forward pass, it recomputes the votes
# and needs about as many passes over them as the forward pass. The gradient
# of the votes is assembled in a second kernel, in the layout of the vote
# source, from factors the first one returns.
#
# All inputs of a kernel arrive in the layout its loops read contiguously
# (the transposes are done outside, by TensorFlow): XLA would otherwise fuse
# the transposes into every loop over the votes, which then read with
# strides and run several times slower.

#: Target number of vote elements (G * I * O * 16) per routing block.
_BLOCK_VOTES = 1 << 19

# Vote sources: explicit votes (M, I, O, 16), or poses (M, I, 16) and
# w (I, O, 4, 4), optionally with offsets (I, 16) added to the votes.
_VOTES, _POSES, _POSES_OFFSETS = "votes", "poses", "poses+offsets"
#: How many tensors each vote source has.
_NUM_SOURCES = {_VOTES: 1, _POSES: 2, _POSES_OFFSETS: 3}


def _route(source, inputs, a, beta_v, beta_a, iterations, stable, need_rr=True):
    """Routes M problems; returns mean (M, O, 16), act (M, O), rr (M, I, O).

    rr is None unless `need_rr` (it is a large tensor, and eagerly it would be
    computed even when unused).

    With the native kernels (the default, see `capsem.native`) in one op;
    otherwise in blocks of XLA kernels (inside a tf.function) or as one
    block of TensorFlow ops.

    Args:
      source: `_VOTES` with inputs `(votes (M, I, O, 16),)`, or `_POSES` /
        `_POSES_OFFSETS` with inputs `(poses (M, I, 16), w (I, O, 4, 4)[,
        offsets (I, 16)])`.
      a: `(M, I)`; beta_v, beta_a: `(O,)`.
    """
    if _use_native(inputs[0].dtype):
        return _route_native(source, inputs, a, beta_v, beta_a, iterations, stable, need_rr)
    kernel_inputs = _kernel_inputs(source, inputs)
    m = inputs[0].shape[0]
    per_problem = a.shape[1] * beta_v.shape[0] * 16 if a.shape[1] is not None else None
    if not _use_kernels() or m is None or per_problem is None:
        sizes = [m]  # one block
    else:
        blocks = max(1, min(m, -(-m * per_problem // _BLOCK_VOTES)))
        sizes = [m // blocks + (1 if b < m % blocks else 0) for b in range(blocks)]
    block_fn = _block_function(source, iterations, stable)
    if len(sizes) == 1:
        mean, act, rr = block_fn(*(x for x, _ in kernel_inputs), a, beta_v, beta_a)
    else:
        # One list per block: the kernel inputs split along their block axes, and a.
        splits = [tf.split(x, sizes, axis=axis) if axis is not None else [x] * len(sizes)
                  for x, axis in kernel_inputs] + [tf.split(a, sizes)]
        outs = [block_fn(*args, beta_v, beta_a) for args in zip(*splits)]
        mean, act, rr = (tf.concat([o[k] for o in outs], 0) for k in range(3))
    return mean, act, tf.transpose(rr, [0, 2, 1]) if need_rr else None  # rr (M, I, O)


def _route_native(source, inputs, a, beta_v, beta_a, iterations, stable, need_rr=True):
    """`_route` by the native ops (capsem/native/em_routing.cc), one op for all M problems."""
    lib = native.load()
    empty = tf.zeros([0], inputs[0].dtype)
    if source == _VOTES:
        src, w, offsets = inputs[0], empty, empty  # votes (M, I, O, 16)
    else:
        src = inputs[0]  # poses (M, I, 16)
        w = tf.reshape(inputs[1], [inputs[1].shape[0], inputs[1].shape[1], 16])  # (I, O, 16)
        offsets = inputs[2] if source == _POSES_OFFSETS else empty  # (I, 16)
    mean, act, saved_rr, _ = lib.capsem_em_routing(
        src, w, offsets, a, beta_v, beta_a,
        inverse_temperatures=inverse_temperatures(iterations), stable=bool(stable))
    # mean (M, O, 16), act (M, O), saved_rr (T-1, M, O, I): the E-steps' assignments.
    if not need_rr:
        return mean, act, None
    if iterations > 1:
        rr = tf.transpose(saved_rr[-1], [0, 2, 1])  # (M, I, O), used by the last M-step
    else:
        num_o = beta_v.shape[0]
        rr = tf.fill(tf.stack([tf.shape(a)[0], tf.shape(a)[1], num_o]),
                     tf.constant(1.0 / num_o, a.dtype))  # (M, I, O)
    return mean, act, tf.stop_gradient(rr)


def _kernel_inputs(source, inputs):
    """The vote sources in the layouts of the kernels, each with its block axis.

    Returns a list of `(tensor, axis)`, axis None for tensors shared by all
    blocks: first the sources of the routing kernels, whose loops run over I
    (votes (M, O, 16, I); or poses (M, 4r, 4k, I), w (O, 4k, 4c, I) and
    offsets (16, I)), then the same sources for the vote-gradient kernel, input
    capsule major (votes (M, I, O, 16); or poses (I, M, 4r, 4k), w
    (I, 4k, O, 4c) and offsets (I, 1, 4r, 1, 4c)).
    """
    if source == _VOTES:
        votes = inputs[0]
        return [(tf.transpose(votes, [0, 2, 3, 1]), 0), (votes, 0)]
    p, w = inputs[0], inputs[1]
    p4 = tf.reshape(p, [-1, w.shape[0], 4, 4])  # (M, I, 4r, 4k)
    routing = [(tf.transpose(p4, [0, 2, 3, 1]), 0), (tf.transpose(w, [1, 2, 3, 0]), None)]
    grads = [(tf.transpose(p4, [1, 0, 2, 3]), 1), (tf.transpose(w, [0, 2, 1, 3]), None)]
    if source == _POSES_OFFSETS:
        offsets = inputs[2]
        routing.append((tf.transpose(offsets), None))
        grads.append((tf.reshape(offsets, [-1, 1, 4, 1, 4]), None))
    return routing + grads


_BLOCK_FUNCTIONS = {}
_SETTINGS = threading.local()


@contextlib.contextmanager
def native_routing_kernels(enabled):
    """Chooses whether EM routing traced or run from now on uses the native kernels.

    By default (`enabled=True`) EM routing runs in the native CPU ops of
    `capsem.native` (compiled on first use), eagerly and in tf.functions,
    when they build and the tensors are float32; within `with
    native_routing_kernels(False):` it uses the XLA kernels or plain
    TensorFlow ops as `xla_routing_kernels` says. A function compiled as a
    whole with XLA must not use them (XLA cannot compile custom ops).
    """
    with _setting("native", bool(enabled)):
        yield


def _use_native(dtype):
    """Whether routing built now runs in the native ops.

    Not inside a function compiled with XLA (`tf.function(jit_compile=True)`,
    `model.compile(jit_compile=True)`), which cannot contain custom ops.
    """
    if not getattr(_SETTINGS, "native", True) or dtype != tf.float32:
        return False
    if not tf.executing_eagerly() and GraphOrParentsInXlaContext(
            tf.compat.v1.get_default_graph()):
        return False
    return native.available()


@contextlib.contextmanager
def xla_routing_kernels(enabled):
    """Chooses how EM routing traced inside a tf.function runs without native kernels.

    Applies where the native kernels are off or cannot be built (see
    `native_routing_kernels`). By default (`enabled=True`) the routing
    problems are split into blocks and each block runs in XLA-compiled
    kernels, also when the surrounding tf.function is not compiled with
    XLA. Within `with xla_routing_kernels(False):`, functions traced from
    then on route all problems as one block with plain TensorFlow ops, which is what a
    tf.function compiled as a whole with XLA should use (it would otherwise
    inline every block's kernels into one large program). Eager execution
    never uses the kernels. The numbers agree to float32 rounding.
    """
    with _setting("xla", bool(enabled)):
        yield


@contextlib.contextmanager
def _setting(name, value):
    """Sets the thread-local routing setting `name` (default True) within the block."""
    previous = getattr(_SETTINGS, name, True)
    setattr(_SETTINGS, name, value)
    try:
        yield
    finally:
        setattr(_SETTINGS, name, previous)


def _use_kernels():
    """Whether routing traced now uses the XLA kernels (and blocks)."""
    return not tf.executing_eagerly() and getattr(_SETTINGS, "xla", True)


def _block_function(source, iterations, stable):
    """The custom-gradient routing function of one block (cached per settings).

    Its arguments are the kernel inputs of `_kernel_inputs` (sliced to the
    block), a (G, I), beta_v and beta_a; it returns (mean (G, O, 16),
    act (G, O), rr (G, O, I)). Gradients flow to the vote-gradient kernel's
    copies of the vote sources, not to the routing kernels' ones.
    """
    jit = _use_kernels()
    key = (source, iterations, stable, jit)
    if key in _BLOCK_FUNCTIONS:
        return _BLOCK_FUNCTIONS[key]
    num_saved = _num_saved(iterations)
    num_src = _NUM_SOURCES[source]

    def forward(*args):
        src, (a, beta_v, beta_a) = args[:num_src], args[-3:]
        v = _kernel_votes(source, src)  # (G, O, 16, I)
        return _em_forward(v, a, beta_v, beta_a, iterations, stable)

    def backward_routing(*args):
        src, (a, beta_v, beta_a, g_mean, g_act) = args[:num_src], args[num_src:num_src + 5]
        v = _kernel_votes(source, src)  # (G, O, 16, I)
        terms, g_a, g_beta_v, g_beta_a = _em_backward(
            v, a, beta_v, beta_a, args[-num_saved:], g_mean, g_act, iterations, stable)
        return (g_a, g_beta_v, g_beta_a, *_vote_gradient_factors(source, terms))

    def backward_votes(*args):
        return _vote_gradients(source, args, iterations)

    if jit:
        forward = tf.function(forward, jit_compile=True, autograph=False)
        backward_routing = tf.function(backward_routing, jit_compile=True, autograph=False)
        backward_votes = tf.function(backward_votes, jit_compile=True, autograph=False)

    @tf.custom_gradient
    def block(*args):
        routing_src, grad_src = args[:num_src], args[num_src:2 * num_src]
        a, beta_v, beta_a = args[-3:]
        mean, act, rr, *saved = forward(*routing_src, a, beta_v, beta_a)

        def grad(g_mean, g_act, g_rr):
            # rr is a diagnostic output: its gradient g_rr is not propagated.
            del g_rr
            if g_mean is None:
                g_mean = tf.zeros_like(mean)
            if g_act is None:
                g_act = tf.zeros_like(act)
            g_a, g_beta_v, g_beta_a, *factors = backward_routing(
                *routing_src, a, beta_v, beta_a, g_mean, g_act, *saved)
            g_src = backward_votes(*grad_src, *factors)
            return ((None,) * num_src + tuple(g_src) + (None,) * (num_src - len(g_src))
                    + (g_a, g_beta_v, g_beta_a))

        return (mean, act, rr), grad

    _BLOCK_FUNCTIONS[key] = block
    return block


def _num_saved(iterations):
    # rr of iterations 1..T-1, and 7 statistics per iteration.
    return (iterations - 1) + 7 * iterations


def _kernel_votes(source, src):
    """The votes of a block in the routing layout (G, O, 16, I)."""
    if source == _VOTES:
        return src[0]
    p_t, w_t = src[0], src[1]  # (G, 4r, 4k, I), (O, 4k, 4c, I)
    num_o, num_i = w_t.shape[0], w_t.shape[3]
    v = tf.add_n([p_t[:, None, :, k, None, :] * w_t[None, :, k, None, :, :]
                  for k in range(4)])  # (G, O, 4r, 4c, I)
    v = tf.reshape(v, [-1, num_o, 16, num_i])  # (G, O, 16, I)
    if source == _POSES_OFFSETS:
        v = v + src[2]  # offsets (16, I)
    return v


def _em_forward(v, a, beta_v, beta_a, iterations, stable):
    """EM routing of a block, the article's arithmetic in the kernel layout.

    The sums over I are matrix-vector products; the E-step's sum over the 16
    pose elements of `(V - mean)^2 / (2 stdv^2)` is one as well, with the
    reciprocal `1 / (2 stdv^2)` (a multiplication instead of the article's
    division: a float32 rounding difference).

    Args:
      v: votes `(G, O, 16, I)`.
      a: input activations `(G, I)`.
      beta_v, beta_a: `(O,)`.

    Returns:
      `(mean (G, O, 16), act (G, O), rr (G, O, I), *saved)`: the outputs, the
      assignments of the last M-step and the statistics `_em_backward` needs.
    """
    num_o, num_i = v.shape[1], v.shape[3]
    a = a[:, None, :]  # (G, 1, I)
    rr = tf.fill(tf.stack([tf.shape(v)[0], num_o, num_i]),
                 tf.constant(1.0 / num_o, v.dtype))  # (G, O, I)
    rrs, stats = [], []
    for it, lam in enumerate(inverse_temperatures(iterations)):
        # M-step
        rr_prime = rr * a  # (G, O, I)
        rr_sum = tf.reduce_sum(rr_prime, -1)  # (G, O)
        if stable:
            rr_sum = rr_sum + EPSILON
        mean = tf.einsum("goi,gohi->goh", rr_prime, v) / rr_sum[..., None]  # (G, O, 16)
        dev2 = tf.square(v - mean[..., None])  # (G, O, 16, I), shared with the E-step
        var = tf.einsum("goi,gohi->goh", rr_prime, dev2) / rr_sum[..., None]  # (G, O, 16)
        if stable:
            var = var + EPSILON
        stdv, log_stdv = _stdv(var)  # (G, O, 16)
        cost = tf.reduce_sum(beta_v[:, None] + log_stdv, -1) * rr_sum  # (G, O)
        cost_mean = tf.reduce_mean(cost, -1, keepdims=True)  # (G, 1)
        cost_var = tf.reduce_mean(tf.square(cost - cost_mean), -1, keepdims=True)
        if stable:
            cost_var = cost_var + EPSILON
        cost_stdv = tf.sqrt(cost_var)  # (G, 1)
        act = tf.sigmoid(lam * (beta_a + (cost_mean - cost) / (cost_stdv + EPSILON)))  # (G, O)
        stats += [rr_sum, mean, var, act, cost, cost_mean, cost_stdv]
        if it == iterations - 1:
            break
        # E-step
        two_var = _two_var(var, stdv, stable)  # (G, O, 16)
        log_p = (-tf.einsum("gohi,goh->goi", dev2, 1.0 / two_var)
                 - tf.reduce_sum(log_stdv, -1)[..., None])  # (G, O, I)
        zz = tf.math.log(act + EPSILON)[..., None] + log_p  # (G, O, I)
        rr = _softmax_o(zz)  # (G, O, I)
        rrs.append(rr)
    return (mean, act, rr, *rrs, *stats)


def _softmax_o(zz):
    """Softmax over the output capsules, axis 1 of (G, O, I), as tf.nn.softmax computes it.

    Written out because tf.nn.softmax on a non-last axis transposes its input
    to make that axis last, and back, which costs two passes here.
    """
    e = tf.exp(zz - tf.reduce_max(zz, 1, keepdims=True))  # (G, O, I)
    return e / tf.reduce_sum(e, 1, keepdims=True)


def _stdv(var):
    stdv = tf.sqrt(var)
    return stdv, tf.math.log(stdv + EPSILON)


def _two_var(var, stdv, stable):
    # The article divides by 2 * stdv**2; the guarded routing by 2 * var.
    return 2.0 * var if stable else 2.0 * tf.square(stdv)


def _em_backward(v, a, beta_v, beta_a, saved, g_mean_out, g_act_out, iterations, stable):
    """The gradient of `_em_forward`'s (mean, act) by reverse-mode differentiation by hand.

    Every intermediate of the forward pass is a function of the votes and of
    the saved statistics, so only these are kept; per iteration the backward
    pass needs two batched matrix-vector products over I and one reduction
    over the 16 pose elements. The gradient with respect to the votes is
    returned in factored form (see `_vote_gradients`). One term is dropped:
    the gradient of the variance through the mean, `-2 sum_i rr' (V - mean)`,
    which is 0 by the definition of the mean (autodiff computes it as
    rounding noise).

    Returns:
      `(terms, g_a (G, I), g_beta_v (O,), g_beta_a (O,))` where `terms` is a
      list of `(rr_prime, m, q, s, u, mean)` per iteration with
      `d loss / d V = sum_t rr_prime * m + (V - mean) * (q * s + rr_prime * u)`
      (`rr_prime`, `q` of shape (G, O, I), the others (G, O, 16); q and s are
      None for the last iteration).
    """
    num_o = v.shape[1]
    rrs = saved[:iterations - 1]
    stats = [saved[iterations - 1 + 7 * t: iterations - 1 + 7 * (t + 1)]
             for t in range(iterations)]
    lams = inverse_temperatures(iterations)
    a3 = a[:, None, :]  # (G, 1, I)
    g_a = tf.zeros_like(a)
    g_beta_v = tf.zeros_like(beta_v)
    g_beta_a = tf.zeros_like(beta_a)
    terms = []
    g_rr_next = None
    for t in reversed(range(iterations)):
        rr_sum, mean, var, act, cost, cost_mean, cost_stdv = stats[t]
        stdv, log_stdv = _stdv(var)
        rr = rrs[t - 1] if t > 0 else tf.constant(1.0 / num_o, v.dtype)  # (G, O, I) or ()
        rr_prime = rr * a3  # (G, O, I)
        last = t == iterations - 1
        g_mean = g_mean_out if last else tf.zeros_like(mean)  # (G, O, 16)
        g_act = g_act_out if last else tf.zeros_like(act)  # (G, O)
        g_log_stdv = tf.zeros_like(mean)
        g_stdv = tf.zeros_like(mean)
        g_var = tf.zeros_like(mean)
        dev = v - mean[..., None]  # (G, O, 16, I)
        q = s = None
        if not last:
            # E-step: rr_next = softmax(log(act + eps) - sum_h dev^2 / two_var - sum_h log_stdv)
            rr_next = rrs[t]
            g_zz = rr_next * (g_rr_next - tf.reduce_sum(rr_next * g_rr_next, 1,
                                                        keepdims=True))  # (G, O, I)
            g_zz_sum = tf.reduce_sum(g_zz, -1)  # (G, O)
            g_act += g_zz_sum / (act + EPSILON)
            g_log_stdv -= g_zz_sum[..., None]
            q = -g_zz  # d loss / d (sum_h dev^2 / two_var), (G, O, I)
            two_var = _two_var(var, stdv, stable)  # (G, O, 16)
            dev2 = tf.square(dev)  # (G, O, 16, I)
            q_dev = tf.einsum("goi,gohi->goh", q, dev)  # sum_i q dev, (G, O, 16)
            q_dev2 = tf.einsum("goi,gohi->goh", q, dev2)  # sum_i q dev^2, (G, O, 16)
            g_two_var = -q_dev2 / tf.square(two_var)
            if stable:
                g_var += 2.0 * g_two_var
            else:
                g_stdv += 4.0 * stdv * g_two_var
            s = 2.0 / two_var
            g_mean -= s * q_dev
        # act = sigmoid(lam * (beta_a + (cost_mean - cost) / (cost_stdv + eps)))
        g_x = g_act * act * (1.0 - act)  # (G, O)
        g_beta_a += lams[t] * tf.reduce_sum(g_x, 0)
        inv = 1.0 / (cost_stdv + EPSILON)  # (G, 1)
        dcost = cost - cost_mean  # (G, O)
        g_cost = -lams[t] * g_x * inv
        g_cost_mean = lams[t] * tf.reduce_sum(g_x, -1, keepdims=True) * inv
        g_cost_var = (lams[t] * tf.reduce_sum(g_x * dcost, -1, keepdims=True)
                      * tf.square(inv) / (2.0 * cost_stdv))  # (G, 1)
        g_cost += g_cost_var * 2.0 * dcost / num_o
        g_cost_mean -= tf.reduce_sum(g_cost_var * 2.0 * dcost, -1, keepdims=True) / num_o
        g_cost += g_cost_mean / num_o
        # cost = sum_h (beta_v + log_stdv) * rr_sum
        g_rr_sum = g_cost * tf.reduce_sum(beta_v[:, None] + log_stdv, -1)  # (G, O)
        g_log_stdv += (g_cost * rr_sum)[..., None]
        g_beta_v += 16.0 * tf.reduce_sum(g_cost * rr_sum, 0)
        g_stdv += g_log_stdv / (stdv + EPSILON)
        g_var += g_stdv / (2.0 * stdv)
        # var = sum_i rr' dev^2 / rr_sum (+ eps); mean = sum_i rr' V / rr_sum
        var_raw = var - EPSILON if stable else var
        g_rr_sum -= tf.reduce_sum(var_raw * g_var + mean * g_mean, -1) / rr_sum
        dev2 = tf.square(dev) if last else dev2
        g_rr_prime = ((tf.einsum("gohi,goh->goi", dev2, g_var)
                       + tf.einsum("gohi,goh->goi", v, g_mean))
                      / rr_sum[..., None] + g_rr_sum[..., None])  # (G, O, I)
        terms.append((rr_prime, g_mean / rr_sum[..., None], q, s,
                      2.0 * g_var / rr_sum[..., None], mean))
        # rr' = rr * a
        g_a += tf.reduce_sum(g_rr_prime * rr, 1)
        g_rr_next = g_rr_prime * a3  # (G, O, I)
    return terms, g_a, g_beta_v, g_beta_a


def _vote_gradient_factors(source, terms):
    """The factors of `_em_backward`'s vote gradient in the layout of the vote source.

    Explicit votes (G, I, O, 16): (G, O, I) factors become (G, I, O, 1) and
    (G, O, 16) ones (G, 1, O, 16). Poses and w, whose vote gradient is formed
    as (I, G, 4r, O, 4c): (G, O, I) -> (I, G, 1, O, 1) and
    (G, O, 16) -> (1, G, 4r, O, 4c).
    """
    if source == _VOTES:
        goi = lambda x: tf.transpose(x, [0, 2, 1])[..., None]
        goh = lambda x: x[:, None]
    else:
        goi = lambda x: tf.transpose(x, [2, 0, 1])[:, :, None, :, None]
        goh = lambda x: tf.transpose(tf.reshape(x, [-1, x.shape[1], 4, 4]), [0, 2, 1, 3])[None]
    factors = []
    for rr_prime, m, q, s, u, mean in terms:
        factors += [goi(rr_prime), goh(m), goh(u), goh(mean)]
        if q is not None:
            factors += [goi(q), goh(s)]
    return factors


def _vote_gradients(source, args, iterations):
    """Gradients of the vote sources from the factors of `_vote_gradient_factors`.

    The vote gradient is `sum_t rr' * m + (V - mean) * (rr' * u + q * s)`
    (see `_em_backward`). For explicit votes this is the result, `(G, I, O,
    16)`. For poses and w it is formed in the layout `(I, G*4r, O*4c)`, input
    capsule major, where the gradients of `poses @ w` are two batched matrix
    products: d poses = d votes @ w^T, `(I, G, 4r, 4k)`, and d w = poses^T @
    d votes, `(I, 4k, O, 4c)`.
    """
    num_src = _NUM_SOURCES[source]
    src, factors = args[:num_src], list(args[num_src:])
    if source == _VOTES:
        v = src[0]  # (G, I, O, 16)
    else:
        p_i, w_i = src[0], src[1]  # (I, G, 4r, 4k), (I, 4k, O, 4c)
        v = tf.add_n([p_i[:, :, :, k, None, None] * w_i[:, None, None, k, :, :]
                      for k in range(4)])  # (I, G, 4r, O, 4c)
        if source == _POSES_OFFSETS:
            v = v + src[2]  # (I, 1, 4r, 1, 4c)
    g_v = 0.0
    for t in reversed(range(iterations)):  # the order of _em_backward's terms
        rr_prime, m, u, mean = factors[:4]
        scale = rr_prime * u
        if t < iterations - 1:
            q, s = factors[4:6]
            scale += q * s
        factors = factors[4 + 2 * (t < iterations - 1):]
        g_v += rr_prime * m + (v - mean) * scale
    if source == _VOTES:
        return (g_v,)
    num_i, num_o = w_i.shape[0], w_i.shape[2]
    g_v = tf.reshape(g_v, [num_i, -1, 4 * num_o])  # (I, G*4r, O*4c)
    g_p = tf.matmul(g_v, tf.reshape(w_i, [num_i, 4, 4 * num_o]),
                    transpose_b=True)  # (I, G*4r, 4k)
    g_w = tf.matmul(tf.reshape(p_i, [num_i, -1, 4]), g_v, transpose_a=True)  # (I, 4k, O*4c)
    return (tf.reshape(g_p, [num_i, -1, 4, 4]),  # (I, G, 4r, 4k)
            tf.reshape(g_w, [num_i, 4, num_o, 4]))  # (I, 4k, O, 4c)
