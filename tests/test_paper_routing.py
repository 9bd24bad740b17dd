"""The paper's EM routing (capsem.paper_routing, routing="paper") against a float64
per-child numpy reference, its gradients against finite differences, and its
guarantees (normalisation across positions, finite with one child or no data)."""

import numpy as np
import pytest
import tensorflow as tf

from capsem import layers, ops, paper_routing
from conftest import assert_close
import numpy_reference as ref


def _inputs(rng, n, h, w, c):
    poses = rng.normal(size=(n, h, w, c, 4, 4)).astype(np.float32)
    acts = rng.uniform(0.05, 1.0, size=(n, h, w, c)).astype(np.float32)
    return poses, acts


def _set_weights(layer, rng):
    w = (0.5 * rng.normal(size=layer.w.shape)).astype(np.float32)
    bv = rng.normal(size=layer.beta_v.shape).astype(np.float32)
    ba = rng.normal(size=layer.beta_a.shape).astype(np.float32)
    layer.w.assign(w)
    layer.beta_v.assign(bv)
    layer.beta_a.assign(ba)
    return w, bv, ba


@pytest.mark.parametrize("h,w,c,o,k,s,iterations,final_lambda", [
    (7, 7, 3, 5, 3, 2, 3, 1.0),   # stride 2: children with 1, 2 and 4 parent positions
    (6, 5, 2, 3, 3, 1, 2, 2.0),   # stride 1, H != W
    (5, 6, 3, 4, 2, 1, 4, 0.5),   # even kernel, 4 iterations
    (5, 5, 2, 3, 3, 2, 1, 1.0),   # one iteration: no E-step
    (8, 7, 1, 2, 3, 3, 3, 1.0),   # stride = kernel: every child has one parent position
])
def test_conv_caps_paper_matches_reference(h, w, c, o, k, s, iterations, final_lambda):
    rng = np.random.default_rng(h * 100 + w * 10 + k)
    poses, acts = _inputs(rng, 2, h, w, c)
    layer = layers.ConvCaps(o, kernel_size=k, strides=s, iterations=iterations,
                            routing="paper", final_lambda=final_lambda)
    layer.build([poses.shape, acts.shape])
    wt, bv, ba = _set_weights(layer, rng)
    ref_p, ref_a = ref.conv_caps_paper(poses, acts, wt, bv, ba, k, s, iterations, final_lambda)
    out_p, out_a = layer([poses, acts])
    assert_close(out_a, ref_a, max_rel=2e-5, what="activations")
    assert_close(out_p, ref_p, max_rel=2e-5, what="poses")
    # The compiled path (one XLA function per layer) gives the same numbers.
    fn_p, fn_a = tf.function(lambda p, a: layer([p, a]))(poses, acts)
    assert_close(fn_a, ref_a, max_rel=2e-5, what="activations (tf.function)")
    assert_close(fn_p, ref_p, max_rel=2e-5, what="poses (tf.function)")


@pytest.mark.parametrize("h,w,c,o,iterations", [(3, 3, 4, 5, 3), (2, 4, 3, 3, 2)])
def test_class_caps_paper_matches_reference(h, w, c, o, iterations):
    rng = np.random.default_rng(7 + h + w)
    poses, acts = _inputs(rng, 3, h, w, c)
    layer = layers.ClassCaps(o, iterations=iterations, routing="paper")
    layer.build([poses.shape, acts.shape])
    wt, bv, ba = _set_weights(layer, rng)
    ref_p, ref_a = ref.class_caps_paper(poses, acts, wt, bv, ba, iterations, 1.0)
    out_p, out_a = layer([poses, acts])
    assert_close(out_a, ref_a, max_rel=2e-5, what="activations")
    assert_close(out_p, ref_p, max_rel=2e-5, what="poses")


def test_each_child_is_shared_out_over_all_its_parents():
    """The assignments of a child sum to 1 over every (position, type) that receives it."""
    rng = np.random.default_rng(3)
    h, w, c, o, k, s = 7, 7, 2, 3, 3, 2
    poses, acts = _inputs(rng, 2, h, w, c)
    layer = layers.ConvCaps(o, kernel_size=k, strides=s, iterations=3, routing="paper")
    layer.build([poses.shape, acts.shape])
    _set_weights(layer, rng)
    rr = layer.call_with_details([poses, acts])["assignments"].numpy()  # (N, OH, OW, K*K*C, O)
    totals = np.zeros((2, h, w, c))
    oh, ow = rr.shape[1:3]
    for y in range(oh):
        for x in range(ow):
            for i in range(k):
                for j in range(k):
                    totals[:, s * y + i, s * x + j] += rr[:, y, x, (k * i + j) * c:
                                                         (k * i + j + 1) * c].sum(-1)
    read = np.zeros((h, w), bool)
    read[:s * (oh - 1) + k, :s * (ow - 1) + k] = True
    np.testing.assert_allclose(totals[:, read], 1.0, rtol=1e-5)
    # Not a per-position softmax: a child read by two windows has less than 1 in each.
    assert rr[:, 0, 0, (k * 0 + 2) * c].sum(-1).max() < 0.999


def test_the_reference_fails_without_normalisation_across_positions():
    """The reference tells the paper's E-step from a per-position softmax (the test can fail)."""
    rng = np.random.default_rng(4)
    votes = rng.normal(size=(2, 3, 2, 16))
    a = rng.uniform(0.2, 1.0, size=(2, 3))
    shared = np.array([[0, 1, 2], [2, 3, 4]])  # child 2 goes to both positions
    alone = np.array([[0, 1, 2], [5, 3, 4]])
    _, act_shared, _ = ref.em_routing_paper_edges(votes, a, shared, 6, [0.1, 0.2], [0.3, 0.1],
                                                  3, 1.0)
    _, act_alone, _ = ref.em_routing_paper_edges(votes, a, alone, 6, [0.1, 0.2], [0.3, 0.1],
                                                 3, 1.0)
    assert np.max(np.abs(act_shared - act_alone)) > 1e-4


@pytest.mark.parametrize("options", [
    {},
    # The paper recipe's M-step: the variance clamped at the floor, not raised by it.
    {"routing_cost": "unnormalised", "variance_floor": 1e-2, "inverse_temperature": 0.5},
])
def test_parent_with_one_child_and_zero_activations_stay_finite(options):
    """Gritzman's collapse: one child per parent (1x1 kernel, one type), and all-zero inputs."""
    rng = np.random.default_rng(5)
    poses, acts = _inputs(rng, 2, 3, 3, 1)
    layer = layers.ConvCaps(2, kernel_size=1, strides=1, iterations=3, routing="paper",
                            **options)
    layer.build([poses.shape, acts.shape])
    _set_weights(layer, rng)
    for a in (acts, np.zeros_like(acts)):
        p_t, a_t = tf.constant(poses), tf.constant(a)
        with tf.GradientTape() as tape:
            tape.watch([p_t, a_t])
            out_p, out_a = layer([p_t, a_t])
            loss = tf.reduce_sum(out_a) + tf.reduce_sum(out_p)
        grads = tape.gradient(loss, [p_t, a_t] + layer.trainable_variables)
        assert np.all(np.isfinite(out_p.numpy())) and np.all(np.isfinite(out_a.numpy()))
        for g in grads:
            assert np.all(np.isfinite(g.numpy()))
    # With one child the variance is the floor, and the output pose is the vote.
    out = layer.call_with_details([poses, acts])
    np.testing.assert_allclose(out["poses"].numpy().reshape(2, 3, 3, 2, 16),
                               out["votes"].numpy()[:, :, :, 0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("child_map", [None, paper_routing.ChildMap(5, 5, 3, 2)])
@pytest.mark.parametrize("iterations,options", [
    (3, {"final_lambda": 3.0}),
    # The paper recipe's M-step with the ramp's inverse temperature (one value).
    (2, {"cost": "unnormalised", "inverse_temperature": 0.3, "variance_floor": 1e-3}),
])
def test_gradients_match_finite_differences(child_map, iterations, options):
    """Directional derivatives of a loss (float64, central differences) equal <grad, d>."""
    rng = np.random.default_rng(6)
    if child_map is None:
        votes = rng.normal(size=(2, 1, 7, 3, 16))
        acts = rng.uniform(0.2, 1.0, size=(2, 1, 7))
    else:
        votes = rng.normal(size=(1, 4, 9 * 2, 3, 16))
        acts = rng.uniform(0.2, 1.0, size=(1, 4, 18))
    bv = rng.normal(size=3)
    ba = rng.normal(size=3)
    weights = rng.normal(size=(votes.shape[1], 3))

    def loss_of(v, a, beta_v, beta_a):
        p, act = paper_routing.em_routing_paper(v, a, beta_v, beta_a, iterations,
                                                child_map=child_map, **options)
        return tf.reduce_sum(act * weights) + 0.1 * tf.reduce_sum(tf.sin(p))

    def f(*args):
        return float(loss_of(*args))

    args = [tf.constant(x, tf.float64) for x in (votes, acts, bv, ba)]
    with tf.GradientTape() as tape:
        tape.watch(args)
        loss = loss_of(*args)
    grads = tape.gradient(loss, args)
    delta = 1e-5
    for k, name in enumerate(("votes", "activations", "beta_v", "beta_a")):
        for _ in range(3):
            d = rng.normal(size=args[k].shape)
            plus = [x + (delta * d if j == k else 0.0) for j, x in enumerate(args)]
            minus = [x - (delta * d if j == k else 0.0) for j, x in enumerate(args)]
            numerical = (f(*plus) - f(*minus)) / (2 * delta)
            analytic = float(np.sum(grads[k].numpy() * d))
            assert abs(analytic - numerical) <= 1e-6 * max(1.0, abs(numerical)), (
                f"d/d {name}: autodiff {analytic!r}, finite differences {numerical!r}")
            assert abs(numerical) > 1e-6, name  # the check is not vacuous


@pytest.mark.parametrize("conv,iterations,options", [
    (False, 3, {"final_lambda": 2.0}),
    (True, 3, {}),
    (True, 1, {"cost": "unnormalised", "inverse_temperature": 0.4, "variance_floor": 1e-2}),
])
def test_em_routing_routing_paper_matches_reference(conv, iterations, options):
    """`ops.em_routing(..., routing="paper")`: the paper routing on the article's entry point."""
    rng = np.random.default_rng(8 + iterations)
    o, c = 3, 2
    if conv:  # a 5x5 grid, kernel 3, stride 2: 4 positions, children shared between them
        child_map = paper_routing.ChildMap(5, 5, 3, 2)
        votes = rng.normal(size=(2, 4, 9 * c, o, 16)).astype(np.float32)  # (N, P, I, O, 16)
        acts = rng.uniform(0.1, 1.0, size=(2, 4, 9 * c)).astype(np.float32)
        slots = child_map.index.reshape(4, 9)  # (P, K*K): grid position of each window slot
        children = (slots[:, :, None] * c + np.arange(c)).reshape(4, 9 * c)  # (P, I)
        num_children, extra = 25 * c, {"child_map": child_map}
    else:  # class capsules: one position, rank-4 votes (N, I, O, 16)
        votes = rng.normal(size=(2, 7, o, 16)).astype(np.float32)
        acts = rng.uniform(0.1, 1.0, size=(2, 7)).astype(np.float32)
        children, num_children, extra = np.arange(7)[None], 7, {}
    bv, ba = rng.normal(size=o), rng.normal(size=o)
    p, act, rr = ops.em_routing(votes, acts, bv.astype(np.float32), ba.astype(np.float32),
                                iterations, return_assignments=True, routing="paper",
                                **extra, **options)
    ref_options = {"inverse_temperature": options.get("inverse_temperature"),
                   "cost": options.get("cost", "normalised"),
                   "floor": options.get("variance_floor")}
    for n in range(2):
        v_n = votes[n] if conv else votes[n][None]  # (P, I, O, 16)
        a_n = acts[n] if conv else acts[n][None]  # (P, I)
        ref_p, ref_a, ref_rr = ref.em_routing_paper_edges(
            v_n, a_n, children, num_children, bv, ba, iterations,
            options.get("final_lambda", 1.0), **ref_options)
        if not conv:  # the position dropped, as the article's layout has none
            ref_p, ref_a, ref_rr = ref_p[0], ref_a[0], ref_rr[0]
        assert_close(act[n], ref_a, max_rel=2e-5, what="activations")
        assert_close(p[n], ref_p, max_rel=2e-5, what="poses")
        assert_close(rr[n], ref_rr, max_rel=2e-5, what="assignments")


def test_em_routing_argument_checks():
    v, a, b = tf.zeros([2, 5, 3, 16]), tf.fill([2, 5], 0.5), tf.zeros(3)
    with pytest.raises(ValueError, match=r"routing must be one of \('article', 'paper'\)"):
        ops.em_routing(v, a, b, b, 3, routing="fast")
    with pytest.raises(TypeError, match=r"\['cost'\] are the paper routing's"):
        ops.em_routing(v, a, b, b, 3, cost="unnormalised")
    with pytest.raises(ValueError, match="stable=True is the article routing's"):
        ops.em_routing(v, a, b, b, 3, stable=True, routing="paper")
    with pytest.raises(ValueError, match=r"\(N, I, O, 16\) or \(N, P, I, O, 16\)"):
        ops.em_routing(tf.zeros([5, 3, 16]), tf.zeros([5]), b, b, 3, routing="paper")
    # The layers' modes are this one tuple.
    assert layers.ROUTING_MODES is ops.ROUTING_MODES


def test_schedule_and_argument_checks():
    np.testing.assert_allclose(paper_routing.inverse_temperatures_paper(3, 1.0),
                               [0.05, 0.0975, 0.142625])
    with pytest.raises(ValueError, match="final_lambda"):
        paper_routing.inverse_temperatures_paper(3, 0.0)
    with pytest.raises(ValueError, match="routing must be one of"):
        layers.ConvCaps(4, routing="fast")
    with pytest.raises(ValueError, match="final_lambda"):
        layers.ClassCaps(4, routing="paper", final_lambda=-1.0)
    with pytest.raises(ValueError, match=r"\(N, P, I, O, 16\)"):
        paper_routing.em_routing_paper(tf.zeros([2, 3, 3, 16]), tf.zeros([2, 3]),
                                       tf.zeros(3), tf.zeros(3), 3)
    layer = layers.ConvCaps(4, routing="paper", final_lambda=0.5)
    config = layer.get_config()
    assert config["routing"] == "paper" and config["final_lambda"] == 0.5
    assert layers.ConvCaps.from_config(config).routing == "paper"
