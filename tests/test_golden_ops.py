"""capsem.ops against the article's TF1 outputs (tests/data/golden)."""

import numpy as np
import pytest
import tensorflow as tf

from capsem import ops
from conftest import ROUTING_PATHS, assert_single, routed


@pytest.mark.parametrize("prefix", ["stride2", "stride1"])
def test_kernel_tile_is_exact(golden, prefix):
    d = golden("kernel_tile")
    kernel, stride = int(d["kernel"]), int(d[prefix + "_stride"])
    for kind in ("poses", "activations"):
        out = ops.kernel_tile(d[f"{prefix}_inputs_{kind}"], kernel, stride)
        ref = d[f"{prefix}_out_{kind}"]
        assert out.shape == ref.shape
        np.testing.assert_array_equal(out.numpy(), ref)


@pytest.mark.parametrize("prefix", ["conv", "cls"])
def test_mat_transform(golden, prefix):
    d = golden("mat_transform")
    votes = ops.mat_transform(d[prefix + "_inputs"], d[prefix + "_w"])
    assert_single(votes, d[prefix + "_votes"], prefix)


@pytest.mark.parametrize("prefix", ["square", "nonsquare"])
def test_coord_addition(golden, prefix):
    d = golden("coord_addition")
    out = ops.coord_addition(d[prefix + "_votes"], int(d[prefix + "_H"]), int(d[prefix + "_W"]))
    assert_single(out, d[prefix + "_out_votes"], prefix)
    # Only pose elements 0 and 1 change.
    np.testing.assert_array_equal(out.numpy()[..., 2:], d[prefix + "_votes"][..., 2:])


def test_inverse_temperatures_schedule():
    assert ops.inverse_temperatures(1) == [1.0]
    assert ops.inverse_temperatures(2) == [1.0, 2.0]
    assert ops.inverse_temperatures(3) == [1.0, 2.0, 3.0]
    np.testing.assert_allclose(ops.inverse_temperatures(4), [1, 5 / 3, 7 / 3, 3])


@pytest.mark.parametrize("name", ["em_routing_conv", "em_routing_class"])
@pytest.mark.parametrize("stable", [False, True])
@pytest.mark.parametrize("path", ROUTING_PATHS)
def test_em_routing_outputs(golden, name, stable, path):
    """On every routing path: TensorFlow ops, XLA kernels, native kernels (eager and traced)."""
    d = golden(name)
    for iterations in d["iterations_list"]:
        def route(votes, i_act, beta_v, beta_a, iterations=int(iterations)):
            return ops.em_routing(votes, i_act, beta_v, beta_a, iterations, stable=stable)
        route = routed(route, path)
        poses, acts = route(*(tf.constant(d[k]) for k in
                              ("votes", "i_activations", "beta_v", "beta_a")))
        assert_single(poses, d[f"iters{iterations}_out_poses"], f"poses, {iterations} iterations")
        assert_single(acts, d[f"iters{iterations}_out_activations"], f"acts, {iterations} iterations")


def _article_shapes(d):
    return (d["i_activations"][..., None, None], d["beta_v"][..., None, :, None],
            d["beta_a"][..., None, :, None])


@pytest.mark.parametrize("name", ["em_routing_conv", "em_routing_class"])
def test_em_trace_each_step_from_reference_inputs(golden, name):
    """Every m_step / e_step of the trace, fed with the reference inputs of that step."""
    d = golden(name)
    i_act, beta_v, beta_a = _article_shapes(d)
    iterations = int(d["trace_iterations"])
    assert iterations == 3
    np.testing.assert_allclose(ops.inverse_temperatures(iterations),
                               [d[f"trace_m{t}_inverse_temperature"] for t in range(iterations)])
    rr = d["trace_rr_init"]
    np.testing.assert_array_equal(rr, np.full(rr.shape, 1.0 / d["votes"].shape[-2], np.float32))
    for t in range(iterations):
        lam = float(d[f"trace_m{t}_inverse_temperature"])
        mean, stdv, act = ops.m_step(rr, d["votes"], i_act, beta_v, beta_a, lam)
        assert_single(mean, d[f"trace_m{t}_o_mean"], f"m{t} mean")
        assert_single(stdv, d[f"trace_m{t}_o_stdv"], f"m{t} stdv")
        assert_single(act, d[f"trace_m{t}_o_activations"], f"m{t} activations")
        if t < iterations - 1:
            rr_new = ops.e_step(d[f"trace_m{t}_o_mean"], d[f"trace_m{t}_o_stdv"],
                                d[f"trace_m{t}_o_activations"], d["votes"])
            assert_single(rr_new, d[f"trace_e{t}_rr"], f"e{t} rr")
            rr = d[f"trace_e{t}_rr"]
    assert f"trace_e{iterations - 1}_rr" not in d  # the last E-step is skipped


@pytest.mark.parametrize("name", ["em_routing_conv", "em_routing_class"])
def test_em_trace_chained(golden, name):
    """The port's own m_step/e_step chained through all iterations stays on the trace."""
    d = golden(name)
    i_act, beta_v, beta_a = _article_shapes(d)
    rr = tf.constant(d["trace_rr_init"])
    lams = ops.inverse_temperatures(3)
    for t in range(3):
        mean, stdv, act = ops.m_step(rr, d["votes"], i_act, beta_v, beta_a, lams[t])
        assert_single(mean, d[f"trace_m{t}_o_mean"], f"m{t} mean")
        assert_single(act, d[f"trace_m{t}_o_activations"], f"m{t} activations")
        if t < 2:
            rr = ops.e_step(mean, stdv, act, d["votes"])
            assert_single(rr, d[f"trace_e{t}_rr"], f"e{t} rr")
            # rr is a distribution over the output capsules.
            np.testing.assert_allclose(np.sum(rr.numpy(), axis=-2), 1.0, rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", ["em_routing_conv", "em_routing_class"])
@pytest.mark.parametrize("path", ROUTING_PATHS)
def test_em_routing_assignments_match_trace(golden, name, path):
    d = golden(name)
    route = routed(lambda *args, iterations: ops.em_routing(
        *args, iterations, return_assignments=True), path)
    args = (d["votes"], d["i_activations"], d["beta_v"], d["beta_a"])
    _, _, rr = route(*args, iterations=3)
    assert_single(rr, d["trace_e1_rr"][..., 0], "assignments of the last M-step")
    _, _, rr1 = route(*args, iterations=1)
    np.testing.assert_array_equal(rr1.numpy(), np.full(rr1.shape, 1.0 / d["votes"].shape[-2],
                                                       np.float32))


def test_spread_loss_and_margins(golden):
    from capsem import losses
    d = golden("spread_loss")
    ipe = int(d["iterations_per_epoch"])
    for step, loss_ref, margin_ref in zip(d["global_steps"], d["losses"], d["margins"]):
        margin = losses.margin_schedule(int(step), ipe)
        assert margin.numpy() == margin_ref, f"step {step}: margin {margin.numpy()} != {margin_ref}"
        loss = losses.spread_loss(d["labels_onehot"], d["activations"], margin)
        assert_single(loss, loss_ref, f"loss at step {step}")
        loss2 = losses.spread_loss_from_labels(d["labels"], d["activations"], margin)
        assert_single(loss2, loss_ref, f"loss from integer labels at step {step}")
