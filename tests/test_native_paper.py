"""The native kernels of the paper's routing (capsem/native/em_routing_paper.cc)
against the TensorFlow ops of `capsem.paper_routing.em_routing_paper`."""

import numpy as np
import pytest
import tensorflow as tf

from capsem import layers, native, ops, paper_routing, step
from conftest import assert_close, native_or_skip


def _layer(kind, **kwargs):
    if kind == "class":
        return layers.ClassCaps(5, routing="paper", **kwargs)
    return layers.ConvCaps(4, kernel_size=3, strides=kind, routing="paper", **kwargs)


def _outputs_and_grads(layer, poses, acts):
    """The layer's outputs and the gradients of a loss mixing both w.r.t. inputs and weights."""
    with tf.GradientTape() as tape:
        tape.watch([poses, acts])
        out_p, out_a = layer([poses, acts])
        loss = tf.reduce_sum(tf.sin(2.0 * out_p)) + tf.reduce_sum(
            out_a * tf.range(1.0, 1.0 + out_a.shape[-1]))
    grads = tape.gradient(loss, [poses, acts, layer.w, layer.beta_v, layer.beta_a])
    return [out_p, out_a] + grads


NAMES = ["poses", "activations", "d poses", "d activations", "d w", "d beta_v", "d beta_a"]


@pytest.mark.parametrize("kind,shape,iterations,options", [
    (2, (2, 7, 7, 3), 3, {}),                                # stride 2: 1, 2 or 4 parents
    (1, (2, 6, 5, 2), 2, {"final_lambda": 2.0}),             # stride 1, H != W
    (1, (1, 5, 5, 2), 3, {"assignment_gradient": False}),    # no gradient through rr
    (2, (2, 5, 5, 2), 1, {"variance_floor": 1e-2}),          # one iteration: no E-step
    ("class", (3, 3, 3, 4), 3, {}),                          # coordinate addition
    ("class", (2, 2, 4, 3), 4, {"assignment_gradient": False}),
    # N >= 2 x threads (2 here, 16 at most on CI-like machines): one task per example,
    # votes formed once per example (em_routing_paper.cc); smaller N: phase by phase.
    (2, (33, 5, 5, 2), 2, {}),
    ("class", (33, 2, 2, 3), 3, {}),
    # cost="unnormalised" (UnnormalisedCost) and the inverse temperature as an input (ramp)
    (2, (2, 7, 7, 3), 3, {"routing_cost": "unnormalised"}),
    (1, (2, 6, 5, 2), 2, {"routing_cost": "unnormalised", "variance_floor": 1.0}),  # clamped
    (1, (1, 5, 5, 2), 3, {"routing_cost": "unnormalised", "assignment_gradient": False,
                          "inverse_temperature": 0.4}),
    (2, (2, 5, 5, 2), 1, {"routing_cost": "unnormalised", "inverse_temperature": 0.05,
                          "variance_floor": 1e-2}),              # the paper recipe's routing
    (1, (2, 6, 5, 2), 3, {"inverse_temperature": 0.8}),         # the ramp, normalised cost
    ("class", (3, 3, 3, 4), 3, {"routing_cost": "unnormalised", "inverse_temperature": 1.5}),
    ("class", (3, 2, 2, 3), 2, {"routing_cost": "unnormalised", "variance_floor": 1.0}),
    (2, (33, 5, 5, 2), 2, {"routing_cost": "unnormalised", "inverse_temperature": 0.3}),
    ("class", (33, 2, 2, 3), 1, {"routing_cost": "unnormalised", "inverse_temperature": 0.2,
                                 "variance_floor": 1e-2}),
])
def test_native_paper_matches_tensorflow_ops(kind, shape, iterations, options):
    """Outputs and every gradient of the native ops, eagerly and in a tf.function, against
    em_routing_paper's TensorFlow ops (float32 rounding apart)."""
    native_or_skip()
    rng = np.random.default_rng(sum(shape) + iterations)
    poses = tf.constant(rng.normal(size=shape + (4, 4)).astype(np.float32))
    acts = tf.constant(rng.uniform(0.05, 1.0, size=shape).astype(np.float32))
    layer = _layer(kind, iterations=iterations, **options)
    layer.build([poses.shape, acts.shape])
    layer.w.assign((0.5 * rng.normal(size=layer.w.shape)).astype(np.float32))
    layer.beta_v.assign(rng.normal(size=layer.beta_v.shape).astype(np.float32))
    layer.beta_a.assign(rng.normal(size=layer.beta_a.shape).astype(np.float32))
    with ops.native_routing_kernels(False), paper_routing.compiled(False):
        ref = _outputs_and_grads(layer, poses, acts)
    with ops.native_routing_kernels(True):
        eager = _outputs_and_grads(layer, poses, acts)
        fn = tf.function(_outputs_and_grads)
        in_fn = fn(layer, poses, acts)
        types = {op.type for op in fn.get_concrete_function(layer, poses, acts).graph
                 .get_operations()}
    assert {"CapsemEmRoutingPaper", "CapsemEmRoutingPaperGrad"} <= types
    for path, out in (("eager", eager), ("tf.function", in_fn)):
        for got, want, name in zip(out, ref, NAMES):
            assert_close(got, want, 2e-5 if name[0] != "d" else 1e-4, what=f"{path} {name}")


def test_native_paper_with_an_unknown_batch_size():
    """The ops' shape functions take an unknown batch (a tf.function traced for any N)."""
    native_or_skip()
    rng = np.random.default_rng(3)
    layer = _layer(2, iterations=2)
    spec = [tf.TensorSpec([None, 5, 5, 2, 4, 4]), tf.TensorSpec([None, 5, 5, 2])]
    fn = tf.function(lambda p, a: _outputs_and_grads(layer, p, a), input_signature=spec)
    for n in (1, 3):
        poses = tf.constant(rng.normal(size=(n, 5, 5, 2, 4, 4)).astype(np.float32))
        acts = tf.constant(rng.uniform(0.05, 1.0, size=(n, 5, 5, 2)).astype(np.float32))
        out = fn(poses, acts)
        with ops.native_routing_kernels(False), paper_routing.compiled(False):
            ref = _outputs_and_grads(layer, poses, acts)
        for got, want, name in zip(out, ref, NAMES):
            assert_close(got, want, 2e-5 if name[0] != "d" else 1e-4, what=f"N={n} {name}")


def test_native_paper_reads_the_ramps_inverse_temperature_at_every_call():
    """The ramp's weight is an input of the ops, not an attribute fixed when a step is
    traced: a tf.function traced once follows its new values."""
    native_or_skip()
    rng = np.random.default_rng(11)
    poses = tf.constant(rng.normal(size=(2, 5, 5, 2, 4, 4)).astype(np.float32))
    acts = tf.constant(rng.uniform(0.05, 1.0, size=(2, 5, 5, 2)).astype(np.float32))
    layer = _layer(2, iterations=1, inverse_temperature=0.05, routing_cost="unnormalised",
                   variance_floor=1e-2)
    layer.build([poses.shape, acts.shape])
    fn = tf.function(_outputs_and_grads)
    with ops.native_routing_kernels(True):
        first = fn(layer, poses, acts)
        layer.inverse_temperature.assign(0.9)
        second = fn(layer, poses, acts)
    assert fn.experimental_get_tracing_count() == 1
    with ops.native_routing_kernels(False), paper_routing.compiled(False):
        ref = _outputs_and_grads(layer, poses, acts)
    assert float(tf.reduce_max(tf.abs(first[1] - second[1]))) > 1e-3
    for got, want, name in zip(second, ref, NAMES):
        assert_close(got, want, 2e-5 if name[0] != "d" else 1e-4, what=name)


@pytest.mark.parametrize("lam,message", [
    ([0.5, 0.5], "inverse_temperature must hold 0 values .* or 1"),
    ([0.0], "inverse_temperature must be > 0, got 0"),
])
def test_native_paper_op_rejects_a_bad_inverse_temperature(lam, message):
    native_or_skip()
    empty = tf.zeros([0])
    with pytest.raises(tf.errors.InvalidArgumentError, match=message):
        native.load().capsem_em_routing_paper(
            tf.zeros([1, 4, 2, 16]), empty, empty, tf.ones([1, 4]), tf.zeros([2]),
            tf.zeros([2]), tf.constant(lam), inverse_temperatures=[1.0], variance_floor=1e-4)


def test_native_paper_op_rejects_a_bad_child_map():
    native_or_skip()
    empty = tf.zeros([0])
    with pytest.raises(tf.errors.InvalidArgumentError, match="child_index entry 9 outside"):
        native.load().capsem_em_routing_paper(
            tf.zeros([1, 9, 2, 16]), empty, empty, tf.ones([1, 9]), tf.zeros([2]),
            tf.zeros([2]), empty, inverse_temperatures=[1.0], variance_floor=1e-4, positions=1,
            child_index=list(range(8)) + [9], num_sources=9)


def test_default_micro_batch_size():
    """The paper routing takes the whole batch in the native kernels, one example in XLA's."""
    native_or_skip()
    assert step.default_micro_batch_size("article") is None
    assert step.default_micro_batch_size("paper") is None
    assert step.default_micro_batch_size("paper", routing_kernels="xla") == 1
    assert step.default_micro_batch_size("paper", jit_compile="whole") == 1


def test_native_paper_op_shapes_with_unknown_ranks():
    """Shape inference reads O from beta_v: a source of unknown rank (votes or poses) gives
    outputs of known O, and no dimension is read from the empty w of the votes form."""
    native_or_skip()
    lib = native.load()

    def trace(src, w):
        return lib.capsem_em_routing_paper(
            src, w, tf.zeros([0]), tf.ones([2, 3]), tf.zeros([4]), tf.zeros([4]), tf.zeros([0]),
            inverse_temperatures=[1.0, 2.0], variance_floor=1e-4)

    fn = tf.function(trace, input_signature=[tf.TensorSpec(None), tf.TensorSpec([None])])
    mean, act, saved_rr, stats = fn.get_concrete_function().structured_outputs
    assert mean.shape.as_list() == [None, 4, 16] and act.shape.as_list() == [None, 4]
    assert saved_rr.shape.as_list() == [1, None, 4, None]
    assert stats.shape.as_list()[:3] == [2, None, 4]
    votes = np.random.default_rng(0).normal(size=(2, 3, 4, 16)).astype(np.float32)
    out = fn(tf.constant(votes), tf.zeros([0]))
    assert out[0].shape == (2, 4, 16) and np.all(np.isfinite(out[1].numpy()))
