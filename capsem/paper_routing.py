"""EM routing as the paper describes it (`routing="paper"`), a sibling of the article's.

The article's code (`capsem.ops.em_routing`, the default `routing="article"`)
routes every output position as an independent problem and normalises the
activation cost over the output capsules. This module follows procedure 1 of
the paper and the implementation notes of Gritzman (2019), "Avoiding
Implementation Pitfalls of Matrix Capsules with EM Routing" (arXiv 1907.00652),
which names three pitfalls of the article-style code that are avoided here
(numbered as in Gritzman's abstract and Sec. 3):

1. *A parent with one child collapses* (pitfall 1): its variance goes
   to 0 and `log sigma` to minus infinity; a variance floor `VARIANCE_FLOOR`
   is added to every variance.
2. *The amount of data assigned to a parent is normalised* (pitfall 2):
   the cost uses `R_j * O / I` (I: children per parent, O: parent types), so
   its scale does not grow with the number of children of a layer
   (`cost="normalised"`; `cost="unnormalised"` is the paper's procedure 1 as
   written).
3. *Parents at different positions compete for a child* (pitfall 3; the
   paper's E-step normalises `R_ij` over all parents `j in Omega_{L+1}` that
   receive child i): in a convolutional capsule layer the E-step's softmax of
   a child runs over every (output position, output type) whose K x K window
   contains it, and the initial assignments (`cost="normalised"`) split each
   child evenly over those parents.

The M-step's cost is the paper's (Sec. 3): `cost_h = (beta_v + log sigma_h) *
R_j`, `a_j = logistic(lambda * (beta_a - sum_h cost_h))`, with `beta_v` and
`beta_a` learned per output capsule type and shared across positions (as
IBM's implementation of Gritzman 2019 does), and no normalisation of the cost
over the output capsules (which the article's code adds). The inverse
temperature follows the schedule of IBM's implementation, which it attributes
to the authors' answer on OpenReview:
`lambda_t = final_lambda * (1 - 0.95 ** (t + 1))`.

The last E-step is skipped (the paper's procedure ends with an M-step) and
gradients flow through every iteration.

Symbols (as in `capsem.ops`):

  N        batch size
  P        output positions (OH*OW in a conv layer, 1 in the class layer)
  I        children routed to one output position (K*K*C, or H*W*C)
  O        output capsule types
  S        child positions of the input grid (H*W) that a conv layer reads
  C        input capsule types
  16       a 4x4 pose matrix flattened row-major

`em_routing_paper` is the reference, plain TensorFlow ops (differentiated by
TensorFlow). The layers call `route` / `route_from_poses`, which run the
native C++ kernels of `capsem.native` (`capsem/native/em_routing_paper.cc`,
both costs and both inverse temperature schedules) or, where those are off,
one XLA-compiled function per layer inside a tf.function.
"""

import contextlib

import numpy as np
import tensorflow as tf

from capsem import native, ops

#: Added to every variance (Gritzman 2019, pitfall 1: a parent with one child, or
#: with votes that agree, must not reach log(0)).
VARIANCE_FLOOR = 1e-4

#: Guards the divisions by the data assigned to a parent, `R_j`, which is 0
#: where every child of a position has activation 0.
EPSILON = ops.EPSILON

#: The final inverse temperature of `inverse_temperatures_paper` by default.
FINAL_LAMBDA = 1.0


def inverse_temperatures_paper(iterations, final_lambda=FINAL_LAMBDA):
    """The inverse temperature schedule `final_lambda * (1 - 0.95 ** (t + 1))`.

    IBM's implementation (em_routing.py) uses it, citing the authors' answer
    on OpenReview, with final_lambda 0.01 on a cost whose data term is 100
    times the normalised one used here, i.e. 1.0 in this module's units.

    Args:
      iterations: EM iterations (int >= 1).
      final_lambda: the scale of the schedule (> 0).

    Returns:
      a list of `iterations` floats, increasing.
    """
    ops._check_iterations(iterations)
    if not final_lambda > 0:
        raise ValueError(f"final_lambda must be > 0, got {final_lambda!r}")
    return [float(final_lambda) * (1.0 - 0.95 ** (t + 1)) for t in range(iterations)]


def inverse_temperature_ramp(epoch, start, growth, final):
    """The inverse temperature of training epoch `epoch` (a float: steps x batch / examples).

    `min(final, start + growth * epoch)`, used at every routing iteration in
    place of `inverse_temperatures_paper` (`--lambda_schedule=ramp`). It is
    the schedule of YuxianMeng's PyTorch implementation (train.py: lambda
    starts at 1e-3 and grows by 0.1 per epoch, up to 1), whose small network
    reports 97.6% after one MNIST epoch: the class activations start near 0.5,
    unsaturated, and sharpen as training goes on (docs/results.md 3.9; the
    paper recipe grows by 0.3 per epoch, 3.10).

    Args:
      epoch: training epochs done (float >= 0), a Python number or a tensor.
      start, growth, final: the schedule (start > 0, growth >= 0, final >= start).

    Returns:
      the inverse temperature (the type of `epoch`).
    """
    if not (start > 0 and growth >= 0 and final >= start):
        raise ValueError(f"inverse_temperature_ramp needs start > 0, growth >= 0 and "
                         f"final >= start, got start={start!r}, growth={growth!r}, "
                         f"final={final!r}")
    if isinstance(epoch, (int, float)):
        return min(float(final), float(start) + float(growth) * float(epoch))
    return tf.minimum(tf.cast(final, epoch.dtype), start + growth * epoch)


class ChildMap:
    """Which child of the input grid each vote of a convolutional layer comes from.

    A conv capsule layer with kernel K and stride s on an H x W grid has
    P = OH*OW output positions, each reading the K*K positions of its window
    (`capsem.ops.kernel_tile`). `index[p*K*K + k]` is the grid position
    (row-major, in [0, H*W)) of window slot k of output position p, and
    `counts[h*W + w]` the number of windows that contain grid position
    (h, w) (0 for positions no window reads).

    Args:
      height, width: H, W of the input grid.
      kernel, stride: K, s.
    """

    def __init__(self, height, width, kernel, stride):
        self.height, self.width = int(height), int(width)
        self.kernel, self.stride = int(kernel), int(stride)
        out_h = (self.height - self.kernel) // self.stride + 1
        out_w = (self.width - self.kernel) // self.stride + 1
        rows = (np.arange(out_h)[:, None, None, None] * self.stride
                + np.arange(self.kernel)[None, None, :, None])  # (OH, 1, K, 1)
        cols = (np.arange(out_w)[None, :, None, None] * self.stride
                + np.arange(self.kernel)[None, None, None, :])  # (1, OW, 1, K)
        index = (rows * self.width + cols).reshape(-1)  # (OH*OW*K*K,)
        self.positions = out_h * out_w
        self.num_sources = self.height * self.width
        self.index = index.astype(np.int32)
        self.counts = np.bincount(index, minlength=self.num_sources).astype(np.int64)


def _to_children(slots, child_map, reduce):
    """Reduces `(N, P*K*K, C)` over the window slots that read the same grid position.

    Returns `(N, H, W, C)`: the sum (`reduce="sum"`, the transpose of
    `capsem.ops.kernel_tile`'s gather) or the max (`reduce="max"`; -inf at
    positions no window reads). Built from dense ops (one strided placement of
    each of the K*K slots on the grid), which XLA compiles to plain loops,
    unlike a scatter.
    """
    k, s = child_map.kernel, child_map.stride
    out_h = (child_map.height - k) // s + 1
    out_w = (child_map.width - k) // s + 1
    num_c = slots.shape[-1]
    fill = 0.0 if reduce == "sum" else -np.inf
    x = tf.reshape(slots, [-1, out_h, out_w, k, k, num_c])  # (N, OH, OW, K, K, C)
    grid_h, grid_w = s * out_h + k, s * out_w + k  # >= H, W: room for every shift
    placed = []
    for i in range(k):
        for j in range(k):
            v = x[:, :, :, i, j, :]  # (N, OH, OW, C)
            if s > 1:  # one value every s rows and columns
                v = tf.pad(v[:, :, None, :, None, :],
                           [[0, 0], [0, 0], [0, s - 1], [0, 0], [0, s - 1], [0, 0]],
                           constant_values=fill)  # (N, OH, s, OW, s, C)
                v = tf.reshape(v, [-1, out_h * s, out_w * s, num_c])  # (N, s*OH, s*OW, C)
            v = tf.pad(v, [[0, 0], [i, grid_h - i - v.shape[1]], [j, grid_w - j - v.shape[2]],
                           [0, 0]], constant_values=fill)  # (N, grid_h, grid_w, C)
            placed.append(v)
    stacked = tf.stack(placed, 0)  # (K*K, N, grid_h, grid_w, C)
    out = tf.reduce_sum(stacked, 0) if reduce == "sum" else tf.reduce_max(stacked, 0)
    return out[:, :child_map.height, :child_map.width]  # (N, H, W, C)


def _from_children(grid, child_map):
    """Gathers `(N, H, W, C)` back to the window slots: `(N, P*K*K, C)`."""
    tiled = ops.kernel_tile(grid, child_map.kernel, child_map.stride)  # (N, OH, OW, K*K, C)
    return tf.reshape(tiled, [-1, child_map.positions * child_map.kernel ** 2, grid.shape[-1]])


def initial_assignments(num_o, num_i, child_map=None, dtype=tf.float32, cost="normalised"):
    """The first M-step's assignments.

    Returns `(P or 1, 1, I or 1)`, broadcast over N and O. With
    `cost="normalised"` each child is split evenly over all its parents:
    `1 / (O * n)` with n the number of output positions that receive the
    child (1 without a child map). With `cost="unnormalised"` every
    assignment is `1 / (O * P)`, procedure 1 of the paper taken literally
    (`R_ij = 1 / |Omega_{L+1}|`, all parent capsules of the layer), as
    YuxianMeng's implementation does.
    """
    if child_map is None:
        return tf.constant(1.0 / num_o, dtype, shape=[1, 1, 1])
    if cost == "unnormalised":
        return tf.constant(1.0 / (num_o * child_map.positions), dtype, shape=[1, 1, 1])
    area = child_map.kernel ** 2
    counts = child_map.counts[child_map.index].astype(np.float64)  # (P*K*K,)
    rr0 = np.repeat((1.0 / (num_o * counts)).reshape(child_map.positions, 1, area, 1),
                    num_i // area, axis=3)  # (P, 1, K*K, C)
    return tf.constant(rr0.reshape(child_map.positions, 1, num_i), dtype)  # (P, 1, I)


def _weighted_moments(rr, votes, i_activations):
    """The data, mean and variance of each parent: the part both M-steps share.

    Returns `(rr_sum (N, P, O), mean (N, P, O, 16), var (N, P, O, 16), dev2)`:
    `rr_sum = sum_i R_ij a_i`, the weighted mean and variance of the votes
    (no floor), and `dev2 = (votes - mean)^2` `(N, P, O, 16, I)`.
    """
    rr_prime = rr * i_activations[:, :, None, :]  # (N, P, O, I)
    rr_sum = tf.reduce_sum(rr_prime, -1)  # (N, P, O)
    denom = (rr_sum + EPSILON)[..., None]  # (N, P, O, 1)
    mean = tf.einsum("npoi,npohi->npoh", rr_prime, votes) / denom  # (N, P, O, 16)
    dev2 = tf.square(votes - mean[..., None])  # (N, P, O, 16, I)
    var = tf.einsum("npoi,npohi->npoh", rr_prime, dev2) / denom  # (N, P, O, 16)
    return rr_sum, mean, var, dev2


def m_step_paper(rr, votes, i_activations, beta_v, beta_a, inverse_temperature, data_scale,
                 variance_floor=VARIANCE_FLOOR):
    """The paper's M-step, in the routing layout (input capsules last).

    Args:
      rr: assignments `(N, P, O, I)` (or broadcastable to it).
      votes: `(N, P, O, 16, I)`.
      i_activations: `(N, P, I)`.
      beta_v, beta_a: `(O,)`.
      inverse_temperature: lambda (float).
      data_scale: O / I, the normalisation of the data assigned to a parent
        (Gritzman 2019, pitfall 2).
      variance_floor: added to every variance (Gritzman 2019, pitfall 1).

    Returns:
      `(mean (N, P, O, 16), var (N, P, O, 16), activations (N, P, O), dev2)`
      with `dev2 = (votes - mean)^2` `(N, P, O, 16, I)`, which the E-step reuses.
    """
    rr_sum, mean, var, dev2 = _weighted_moments(rr, votes, i_activations)
    var = var + variance_floor  # (N, P, O, 16); Gritzman 2019, pitfall 1
    log_stdv = 0.5 * tf.math.log(var)  # (N, P, O, 16)
    # Paper Sec. 3: cost_h = (beta_v + log sigma_h) sum_i R_ij; the data term
    # normalised by O / I (Gritzman 2019, pitfall 2).
    cost = tf.reduce_sum(beta_v[:, None] + log_stdv, -1) * (rr_sum * data_scale)  # (N, P, O)
    activations = tf.sigmoid(inverse_temperature * (beta_a - cost))  # (N, P, O)
    return mean, var, activations, dev2


def m_step_unnormalised(rr, votes, i_activations, beta_v, beta_a, inverse_temperature,
                        variance_floor=VARIANCE_FLOOR):
    """The M-step of `cost="unnormalised"`, a sibling of `m_step_paper`.

    YuxianMeng's PyTorch implementation (Capsules.py), whose small network
    reports 97.6% after one MNIST epoch: `cost_h = (beta_v + log sigma_h^2)
    sum_i R_ij a_i`, the data term not normalised (Gritzman's pitfall 2 left
    as the paper writes it) and the log of the variance (not of the standard
    deviation); the variance clamped at the floor (`max(sigma^2, floor)`,
    not `sigma^2 + floor`).

    Args and returns: as `m_step_paper`, without `data_scale`.
    """
    rr_sum, mean, var, dev2 = _weighted_moments(rr, votes, i_activations)
    var = tf.maximum(var, variance_floor)  # (N, P, O, 16)
    cost = tf.reduce_sum(beta_v[:, None] + tf.math.log(var), -1) * rr_sum  # (N, P, O)
    activations = tf.sigmoid(inverse_temperature * (beta_a - cost))  # (N, P, O)
    return mean, var, activations, dev2


#: The M-steps of `em_routing_paper`'s `cost` argument.
M_STEPS = {
    "normalised": lambda rr, v, a, bv, ba, lam, scale, floor: m_step_paper(
        rr, v, a, bv, ba, lam, scale, floor),
    "unnormalised": lambda rr, v, a, bv, ba, lam, scale, floor: m_step_unnormalised(
        rr, v, a, bv, ba, lam, floor),
}
COSTS = tuple(M_STEPS)


def e_step_paper(var, activations, dev2, child_map=None):
    """The paper's E-step: `R_ij = a_j p_j(V_ij) / sum_k a_k p_k(V_ik)` over all parents of i.

    The constant `-8 log(2 pi)` of the 16-dimensional Gaussian cancels in the
    normalisation and is left out.

    Args:
      var: `(N, P, O, 16)`; activations: `(N, P, O)`.
      dev2: `(votes - mean)^2`, `(N, P, O, 16, I)`.
      child_map: None (each child has parents at one position: a softmax over
        O), or the `ChildMap` of a conv layer, whose children are normalised
        over every position that receives them (Gritzman 2019, pitfall 3;
        I = K*K*C,
        window slot major).

    Returns:
      assignments `(N, P, O, I)`.
    """
    log_p = (-tf.einsum("npohi,npoh->npoi", dev2, 0.5 / var)
             - 0.5 * tf.reduce_sum(tf.math.log(var), -1)[..., None])  # (N, P, O, I)
    zz = tf.math.log(activations + EPSILON)[..., None] + log_p  # (N, P, O, I)
    return normalise_over_parents(zz, child_map)


def normalise_over_parents(zz, child_map=None):
    """`exp(zz)` normalised over every parent of each child: the E-step's softmax.

    Args:
      zz: `(N, P, O, I)` log numerators `log a_j + log p_j(V_ij)`.
      child_map: None (a softmax over O) or the `ChildMap` of a conv layer
        (over O and every position that receives the child).

    Returns:
      `(N, P, O, I)`, summing to 1 over the parents of every child.
    """
    if child_map is None:
        e = tf.exp(zz - tf.stop_gradient(tf.reduce_max(zz, 2, keepdims=True)))  # (N, P, O, I)
        return e / tf.reduce_sum(e, 2, keepdims=True)
    num_p, num_o, num_i = zz.shape[1], zz.shape[2], zz.shape[3]
    area = child_map.kernel ** 2
    slot_max = tf.reshape(tf.reduce_max(zz, 2), [-1, num_p * area, num_i // area])
    # (N, P*K*K, C)
    top = _from_children(_to_children(slot_max, child_map, "max"), child_map)
    # (N, P*K*K, C): the largest zz of each child over all its parents
    top = tf.reshape(top, [-1, num_p, 1, num_i])  # (N, P, 1, I)
    e = tf.exp(zz - tf.stop_gradient(top))  # (N, P, O, I)
    slot_sum = tf.reshape(tf.reduce_sum(e, 2), [-1, num_p * area, num_i // area])
    # (N, P*K*K, C)
    total = _to_children(slot_sum, child_map, "sum")  # (N, H, W, C)
    denom = tf.reshape(_from_children(total, child_map), [-1, num_p, 1, num_i])  # (N, P, 1, I)
    return e / denom  # (N, P, O, I)


def _check_inverse_temperature(value, dtype):
    """`value` as a scalar tensor of `dtype`; a Python number must be > 0."""
    if isinstance(value, bool) or (isinstance(value, (int, float)) and not value > 0):
        raise ValueError(f"inverse_temperature must be a number > 0 or a scalar tensor, "
                         f"got {value!r}")
    value = tf.convert_to_tensor(value)
    if value.shape.rank != 0:
        raise ValueError(f"inverse_temperature must be a scalar, got shape "
                         f"{ops._static_shape(value)}")
    return tf.cast(value, dtype)


def _check_cost(cost):
    if cost not in M_STEPS:
        raise ValueError(f"cost must be one of {', '.join(COSTS)}, got {cost!r}")


def _check_inputs(votes, i_activations, beta_v, beta_a, iterations, child_map, variance_floor):
    """The checks of `em_routing_paper`'s arguments; returns votes, i_activations, beta_v, beta_a.

    votes `(N, P, I, O, 16)`, i_activations `(N, P, I)`, beta_v and beta_a
    `(O,)`, as tensors.
    """
    votes = tf.convert_to_tensor(votes)
    i_activations = tf.convert_to_tensor(i_activations, votes.dtype)
    ops._check_iterations(iterations)
    if votes.shape.rank != 5 or votes.shape[-1] != 16 or None in votes.shape[1:]:
        raise ValueError(f"em_routing_paper votes must be (N, P, I, O, 16) with known P, I "
                         f"and O, got shape {ops._static_shape(votes)}")
    _, num_p, num_i, num_o, _ = votes.shape.as_list()
    if i_activations.shape.rank != 3 or not i_activations.shape[1:].is_compatible_with(
            [num_p, num_i]):
        raise ValueError(f"em_routing_paper i_activations must be (N, P, I) = "
                         f"{ops._static_shape(votes)[:3]}, got "
                         f"{ops._static_shape(i_activations)}")
    if child_map is not None and (num_p != child_map.positions
                                  or num_i % (child_map.kernel ** 2)):
        raise ValueError(f"em_routing_paper: votes {ops._static_shape(votes)} do not match "
                         f"the child map ({child_map.positions} positions, kernel "
                         f"{child_map.kernel})")
    beta_v = ops._check_beta(beta_v, num_o, "beta_v", votes.dtype)  # (O,)
    beta_a = ops._check_beta(beta_a, num_o, "beta_a", votes.dtype)  # (O,)
    if isinstance(variance_floor, bool) or not variance_floor > 0:
        raise ValueError(f"variance_floor must be > 0, got {variance_floor!r}")
    return votes, i_activations, beta_v, beta_a


def em_routing_paper(votes, i_activations, beta_v, beta_a, iterations,
                     final_lambda=FINAL_LAMBDA, child_map=None, return_assignments=False,
                     variance_floor=VARIANCE_FLOOR, assignment_gradient=True,
                     inverse_temperature=None, cost="normalised"):
    """EM routing of the paper (procedure 1), with Gritzman's three pitfalls avoided.

    Args:
      votes: `(N, P, I, O, 16)`; with a `child_map` I = K*K*C, window slot
        major (the layout of `ConvCaps`).
      i_activations: `(N, P, I)`.
      beta_v, beta_a: O values each.
      iterations: EM iterations (>= 1); the last E-step is skipped.
      final_lambda: scale of the inverse temperature schedule
        (`inverse_temperatures_paper`).
      child_map: None (class capsules: each child has one parent position) or
        the `ChildMap` of a convolutional layer.
      return_assignments: also return the rr of the last M-step.
      variance_floor: added to every variance (Gritzman 2019, pitfall 1), > 0.
      assignment_gradient: True (the paper, and the article's code): the
        gradient flows through the E-steps' assignments too; False: the
        assignments are treated as constants in the gradient (it flows
        through the M-steps' means, variances and costs only). Through the
        E-step the gradient is scaled by 1 / variance, which is up to
        1 / variance_floor: at initialisation it is 100 times the M-step's
        in ReLU Conv1 (docs/results.md).
      inverse_temperature: None (the schedule `inverse_temperatures_paper`
        of `final_lambda` over the iterations), or a scalar > 0 (a number or
        a float tensor, e.g. a layer's weight that training sets by
        `inverse_temperature_ramp`) used at every iteration instead.
      cost: "normalised" (`m_step_paper`: the data per parent normalised,
        Gritzman's pitfall 2) or "unnormalised" (`m_step_unnormalised` and
        the literal initial assignments of `initial_assignments`,
        YuxianMeng's implementation).

    Returns:
      `(poses (N, P, O, 16), activations (N, P, O))` and rr `(N, P, I, O)`
      with `return_assignments`.

    Example:
    >>> v = tf.random.normal([2, 1, 12, 3, 16])
    >>> a = tf.fill([2, 1, 12], 0.5)
    >>> p, act = em_routing_paper(v, a, tf.zeros(3), tf.zeros(3), 3)
    >>> p.shape, act.shape
    (TensorShape([2, 1, 3, 16]), TensorShape([2, 1, 3]))
    """
    votes, i_activations, beta_v, beta_a = _check_inputs(
        votes, i_activations, beta_v, beta_a, iterations, child_map, variance_floor)
    _check_cost(cost)
    _, num_p, num_i, num_o, _ = votes.shape.as_list()
    lambdas = inverse_temperatures_paper(iterations, final_lambda)
    if inverse_temperature is not None:
        lambdas = [_check_inverse_temperature(inverse_temperature, votes.dtype)] * iterations
    data_scale = float(num_o) / float(num_i)
    v = tf.transpose(votes, [0, 1, 3, 4, 2])  # (N, P, O, 16, I)
    m_step = M_STEPS[cost]
    rr = initial_assignments(num_o, num_i, child_map, votes.dtype, cost)  # (P or 1, 1, I or 1)
    rr = rr * tf.ones([num_o, 1], votes.dtype)  # (P or 1, O, I or 1)
    for t, lam in enumerate(lambdas):
        mean, var, act, dev2 = m_step(rr, v, i_activations, beta_v, beta_a, lam,
                                      data_scale, variance_floor)
        if t == iterations - 1:
            break
        rr = e_step_paper(var, act, dev2, child_map)  # (N, P, O, I)
        if not assignment_gradient:
            rr = tf.stop_gradient(rr)
    if return_assignments:
        full = rr * tf.ones_like(v[:, :, :, 0])  # (N, P, O, I)
        return mean, act, tf.stop_gradient(tf.transpose(full, [0, 1, 3, 2]))  # rr (N, P, I, O)
    return mean, act


@contextlib.contextmanager
def compiled(enabled):
    """Whether paper routing traced within the block is one XLA-compiled function per layer."""
    with ops._setting("paper_jit", bool(enabled)):
        yield


_FUNCTIONS = {}


def route(votes, i_activations, beta_v, beta_a, iterations, final_lambda=FINAL_LAMBDA,
          child_map=None, variance_floor=VARIANCE_FLOOR, assignment_gradient=True,
          inverse_temperature=None, cost="normalised"):
    """`em_routing_paper` as the layers call it: the paper mode's kernel entry.

    The sibling of `capsem.ops._route` for the article mode. By default the
    routing runs in the native C++ ops of `capsem.native`
    (`CapsemEmRoutingPaper` and its gradient op, compiled on first use), eagerly and in
    tf.functions, when they build and the tensors are float32. Otherwise
    (`capsem.ops.native_routing_kernels(False)`, `CAPSEM_NATIVE=0`, no
    compiler, float64, or inside a function compiled as a whole by XLA),
    inside a tf.function each layer's routing is one XLA-compiled function,
    and eagerly or where XLA is off (`compiled(False)`, or inside a function
    compiled as a whole) it runs as plain TensorFlow ops. All give the numbers
    of `em_routing_paper` to float32 rounding, and its gradient. The native
    ops cover `cost="unnormalised"` and an `inverse_temperature`
    (`--lambda_schedule=ramp`) too: they take the latter as an input, read at
    every call.

    Args and returns: as `em_routing_paper` (without `return_assignments`).
    """
    votes, i_activations, beta_v, beta_a = _check_inputs(
        votes, i_activations, beta_v, beta_a, iterations, child_map, variance_floor)
    _check_cost(cost)
    if inverse_temperature is not None:
        inverse_temperature = _check_inverse_temperature(inverse_temperature, votes.dtype)
    if ops._use_native(votes.dtype):
        _, num_p, num_i, num_o, _ = votes.shape.as_list()
        flat_v = tf.reshape(votes, [-1, num_i, num_o, 16])  # (N*P, I, O, 16)
        flat_a = tf.reshape(i_activations, [-1, num_i])  # (N*P, I)
        return _route_native(flat_v, None, None, flat_a, beta_v, beta_a, iterations,
                             final_lambda, child_map, num_p, variance_floor,
                             assignment_gradient, inverse_temperature, cost)
    jit = (not tf.executing_eagerly() and getattr(ops._SETTINGS, "paper_jit", True)
           and not ops.GraphOrParentsInXlaContext(tf.compat.v1.get_default_graph()))
    if not jit:
        return em_routing_paper(votes, i_activations, beta_v, beta_a, iterations,
                                final_lambda, child_map, variance_floor=variance_floor,
                                assignment_gradient=assignment_gradient,
                                inverse_temperature=inverse_temperature, cost=cost)
    ramp = inverse_temperature is not None
    key = (iterations, float(final_lambda), float(variance_floor), bool(assignment_gradient),
           ramp, cost, None if child_map is None else (
        child_map.height, child_map.width, child_map.kernel, child_map.stride))
    if key not in _FUNCTIONS:
        def fn(v, a, bv, ba, lam=None):
            return em_routing_paper(v, a, bv, ba, iterations, final_lambda, child_map,
                                    variance_floor=variance_floor,
                                    assignment_gradient=assignment_gradient,
                                    inverse_temperature=lam, cost=cost)
        _FUNCTIONS[key] = tf.function(fn, jit_compile=True, autograph=False)
    args = (votes, i_activations, beta_v, beta_a) + ((inverse_temperature,) if ramp else ())
    return _FUNCTIONS[key](*args)


def route_from_poses(poses, w, i_activations, beta_v, beta_a, iterations,
                     final_lambda=FINAL_LAMBDA, child_map=None, variance_floor=VARIANCE_FLOOR,
                     assignment_gradient=True, offsets=None, inverse_temperature=None,
                     cost="normalised"):
    """`route` of the votes `poses @ w (+ offsets)`, which the native ops never materialise.

    The layers' entry: with the native kernels (see `route`) the votes are
    formed per routing problem inside `CapsemEmRoutingPaper` (and their
    gradient inside its gradient op), as the article mode's
    `capsem.ops._em_routing_from_poses` does; otherwise the votes are formed
    with `capsem.ops.mat_transform` and routed by `route`.

    Args:
      poses: `(N, P, I, 16)`, the 4x4 poses of the children of each output
        position, flattened row-major.
      w: transformation matrices `(1, I, O, 4, 4)`, shared by all N*P.
      i_activations: `(N, P, I)`.
      offsets: None or `(I, 16)`, added to every vote of child i (coordinate
        addition).
      Others: as `route`.

    Returns:
      `(poses (N, P, O, 16), activations (N, P, O))`.
    """
    poses = tf.convert_to_tensor(poses)
    if poses.shape.rank != 4 or poses.shape[-1] != 16 or None in poses.shape[1:]:
        raise ValueError(f"route_from_poses poses must be (N, P, I, 16) with known P and I, "
                         f"got shape {ops._static_shape(poses)}")
    _, num_p, num_i, _ = poses.shape.as_list()
    if w.shape.rank != 5 or tuple(w.shape[:2]) != (1, num_i) or tuple(w.shape[3:]) != (4, 4):
        raise ValueError(f"route_from_poses w must be (1, I, O, 4, 4) with I = {num_i}, got "
                         f"shape {tuple(w.shape)}")
    num_o = w.shape[2]
    flat_p = tf.reshape(poses, [-1, num_i, 16])  # (N*P, I, 16)
    _check_cost(cost)
    if inverse_temperature is not None:
        inverse_temperature = _check_inverse_temperature(inverse_temperature, poses.dtype)
    if ops._use_native(poses.dtype):
        # The checks of `route`, on a votes-shaped placeholder of zero examples.
        _, i_activations, beta_v, beta_a = _check_inputs(
            tf.zeros([0, num_p, num_i, num_o, 16], poses.dtype), i_activations, beta_v,
            beta_a, iterations, child_map, variance_floor)
        flat_a = tf.reshape(i_activations, [-1, num_i])  # (N*P, I)
        return _route_native(flat_p, w[0], offsets, flat_a, beta_v, beta_a, iterations,
                             final_lambda, child_map, num_p, variance_floor,
                             assignment_gradient, inverse_temperature, cost)
    votes = ops.mat_transform(flat_p, w)  # (N*P, I, O, 16)
    if offsets is not None:
        votes = votes + offsets[:, None, :]  # (N*P, I, O, 16)
    votes = tf.reshape(votes, tf.stack([-1, num_p, num_i, num_o, 16]))  # (N, P, I, O, 16)
    votes.set_shape([poses.shape[0], num_p, num_i, num_o, 16])
    return route(votes, i_activations, beta_v, beta_a, iterations, final_lambda, child_map,
                 variance_floor, assignment_gradient, inverse_temperature, cost)


def _route_native(src, w, offsets, a, beta_v, beta_a, iterations, final_lambda, child_map,
                  positions, variance_floor, assignment_gradient, inverse_temperature, cost):
    """The paper's routing of M = N*P problems in the native ops (capsem/native/em_routing_paper.cc).

    Args:
      src: votes `(M, I, O, 16)` (w and offsets None), or poses `(M, I, 16)`
        with w `(I, O, 4, 4)` and offsets None or `(I, 16)` (the votes
        `P @ W + offsets`, formed inside the ops and never materialised).
      a: `(M, I)`; beta_v, beta_a: `(O,)`.
      positions: P, the output positions of one example (`child_map.positions`,
        or 1 for class capsules).
      inverse_temperature: None (the ops' attribute holds the schedule of
        `final_lambda`) or a checked scalar tensor, passed as the ops' input
        (read at every call: the ramp's value changes between steps).
      Others: as `em_routing_paper`.

    Returns:
      `(poses (N, P, O, 16), activations (N, P, O))`.
    """
    lib = native.load()
    empty = tf.zeros([0], src.dtype)
    num_o = beta_v.shape[0]
    if w is not None:
        w = tf.reshape(w, [w.shape[0], num_o, 16])  # (I, O, 16)
    lam = empty if inverse_temperature is None else tf.reshape(inverse_temperature, [1])  # (1,)
    mean, act, _, _ = lib.capsem_em_routing_paper(
        src, empty if w is None else w, empty if offsets is None else offsets, a,
        beta_v, beta_a, lam,
        inverse_temperatures=inverse_temperatures_paper(iterations, final_lambda),
        variance_floor=float(variance_floor), positions=int(positions),
        child_index=[] if child_map is None else [int(g) for g in child_map.index],
        num_sources=0 if child_map is None else int(child_map.num_sources),
        assignment_gradient=bool(assignment_gradient), cost=cost)
    # mean (M, O, 16), act (M, O)
    mean = tf.reshape(mean, [-1, positions, num_o, 16])  # (N, P, O, 16)
    act = tf.reshape(act, [-1, positions, num_o])  # (N, P, O)
    return mean, act
