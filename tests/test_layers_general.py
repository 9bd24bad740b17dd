"""capsem layers and network on shapes other than the golden files': shapes,
invariants, serialization, XLA, oneDNN, batch independence and input errors."""

import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

import numpy_reference as ref
from capsem import layers, nets, ops
from conftest import REPO, assert_close, routed


def _capsule_inputs(rng, n, h, w, caps):
    poses = rng.normal(size=(n, h, w, caps, 4, 4)).astype(np.float32)
    acts = (1 / (1 + np.exp(-rng.normal(size=(n, h, w, caps))))).astype(np.float32)
    return poses, acts


@pytest.mark.parametrize("kernel,stride,iterations", [(3, 1, 2), (3, 2, 4), (5, 2, 1), (2, 1, 3)])
def test_conv_caps_general_shapes_match_numpy_reference(kernel, stride, iterations):
    """8 -> 16 capsule types on a 9x9 grid against the float64 numpy reference.

    The votes are checked against the reference's own votes; the routing is
    checked on the port's float32 votes, so that the comparison measures the
    port and not the float32 rounding of the votes amplified by EM routing.
    """
    keras.utils.set_random_seed(kernel * 10 + stride)
    rng = np.random.RandomState(kernel * 10 + stride)
    poses, acts = _capsule_inputs(rng, 2, 9, 9, 8)
    layer = layers.ConvCaps(16, kernel_size=kernel, strides=stride, iterations=iterations)
    out = layer.call_with_details([poses, acts])
    oh = (9 - kernel) // stride + 1
    k2i = kernel * kernel * 8
    assert out["poses"].shape == (2, oh, oh, 16, 4, 4)
    assert out["activations"].shape == (2, oh, oh, 16)
    assert out["votes"].shape == (2, oh, oh, k2i, 16, 16)
    assert out["assignments"].shape == (2, oh, oh, k2i, 16)
    assert layer.w.shape == (1, k2i, 16, 4, 4)
    assert layer.beta_v.shape == (1, 1, 1, 16) and layer.beta_a.shape == (1, 1, 1, 16)
    w, beta_v, beta_a = layer.w.numpy(), layer.beta_v.numpy(), layer.beta_a.numpy()
    tiled = ref.kernel_tile(poses.astype(np.float64), kernel, stride).reshape(-1, k2i, 16)
    votes_ref = ref.mat_transform(tiled, w.astype(np.float64)).reshape(out["votes"].shape)
    assert_close(out["votes"], votes_ref, 1e-5, 1e-5, "votes")
    i_act = ref.kernel_tile(acts, kernel, stride).reshape(2, oh, oh, k2i)
    p_ref, a_ref = ref.em_routing(out["votes"].numpy().astype(np.float64), i_act,
                                  beta_v, beta_a, iterations)
    assert_close(out["poses"], p_ref.reshape(out["poses"].shape), 1e-4, what="poses")
    assert_close(out["activations"], a_ref, 1e-4, what="activations")
    a = out["activations"].numpy()
    assert np.all((a > 0) & (a < 1))
    np.testing.assert_allclose(out["assignments"].numpy().sum(-1), 1.0, atol=1e-5)
    assert layer.compute_output_shape([(None, 9, 9, 8, 4, 4), (None, 9, 9, 8)]) == (
        (None, oh, oh, 16, 4, 4), (None, oh, oh, 16))


@pytest.mark.parametrize("h,w,iterations", [(3, 3, 2), (3, 5, 4), (1, 1, 1)])
def test_class_caps_general_shapes_match_numpy_reference(h, w, iterations):
    """5 classes on square and non-square grids against the float64 numpy reference."""
    keras.utils.set_random_seed(h * 7 + w)
    rng = np.random.RandomState(h * 7 + w)
    poses, acts = _capsule_inputs(rng, 3, h, w, 8)
    layer = layers.ClassCaps(5, iterations=iterations)
    out = layer.call_with_details([poses, acts])
    assert out["poses"].shape == (3, 5, 4, 4)
    assert out["activations"].shape == (3, 5)
    assert out["votes"].shape == (3, h * w * 8, 5, 16)
    wt = layer.w.numpy().astype(np.float64)
    votes_ref = ref.mat_transform(poses.astype(np.float64).reshape(-1, 8, 16), wt)
    votes_ref = ref.coord_addition(votes_ref.reshape(3, h, w, 8, 5, 16), h, w)
    assert_close(out["votes"], votes_ref.reshape(3, h * w * 8, 5, 16), 1e-5, 1e-5, "votes")
    p_ref, a_ref = ref.em_routing(out["votes"].numpy().astype(np.float64),
                                  acts.reshape(3, h * w * 8), layer.beta_v.numpy(),
                                  layer.beta_a.numpy(), iterations)
    assert_close(out["poses"], p_ref.reshape(3, 5, 4, 4), 1e-4, what="poses")
    assert_close(out["activations"], a_ref, 1e-4, what="activations")
    np.testing.assert_allclose(out["assignments"].numpy().sum(-1), 1.0, atol=1e-5)


def test_kernel_tile_general_matches_numpy():
    rng = np.random.RandomState(0)
    x = rng.normal(size=(2, 7, 10, 3, 4, 4)).astype(np.float32)
    for k, s in [(1, 1), (2, 3), (4, 2), (7, 1)]:
        np.testing.assert_array_equal(ops.kernel_tile(x, k, s).numpy(), ref.kernel_tile(x, k, s))
        np.testing.assert_array_equal(ops.kernel_tile(x[..., 0, 0], k, s).numpy(),
                                      ref.kernel_tile(x[..., 0, 0], k, s))


def test_em_routing_rank3_and_rank5_votes():
    rng = np.random.RandomState(1)
    votes = rng.normal(size=(2, 3, 4, 12, 6, 16)).astype(np.float32)
    acts = rng.uniform(0.05, 0.95, size=(2, 3, 4, 12)).astype(np.float32)
    beta_v, beta_a = rng.normal(size=(1, 6)), rng.normal(size=(1, 6))
    p_ref, a_ref = ref.em_routing(votes, acts, beta_v, beta_a, 3)
    p, a = ops.em_routing(votes, acts, beta_v, beta_a, 3)
    assert_close(p, p_ref, 1e-5, 1e-5, "rank-6 poses")
    p5, a5 = ops.em_routing(votes[0], acts[0], beta_v, beta_a, 3)
    assert_close(p5, p_ref[0], 1e-5, 1e-5, "rank-5 poses")
    p3, a3 = ops.em_routing(votes[0, 0, 0], acts[0, 0, 0], beta_v, beta_a, 3)
    assert p3.shape == (6, 16) and a3.shape == (6,)
    assert_close(a3, a_ref[0, 0, 0], 1e-5, 1e-5, "rank-3 activations")


def test_small_config_network_32x32():
    model = nets.capsules_net(num_classes=10, A=16, B=8, C=16, D=16, input_shape=(32, 32, 1))
    assert [tuple(t.shape) for t in model.outputs] == [(None, 10, 4, 4), (None, 10)]
    shapes = {n: [tuple(s.shape) for s in _as_list(model.get_layer(n).output)] for n in nets.LAYER_NAMES}
    assert shapes["relu_conv1"] == [(None, 16, 16, 16)]
    assert shapes["primary_caps"] == [(None, 16, 16, 8, 4, 4), (None, 16, 16, 8)]
    assert shapes["conv_caps1"] == [(None, 7, 7, 16, 4, 4), (None, 7, 7, 16)]
    assert shapes["conv_caps2"] == [(None, 5, 5, 16, 4, 4), (None, 5, 5, 16)]
    x = np.random.RandomState(2).uniform(-1, 1, size=(2, 32, 32, 1)).astype(np.float32)
    poses, acts = model(x)
    assert poses.shape == (2, 10, 4, 4) and acts.shape == (2, 10)
    assert np.all(np.isfinite(poses.numpy()))
    assert np.all((acts.numpy() > 0) & (acts.numpy() < 1))


def _as_list(x):
    return list(x) if isinstance(x, (list, tuple)) else [x]


def test_article_network_symbolic_shapes_and_parameter_count():
    model = nets.capsules_net()
    assert [tuple(t.shape) for t in model.outputs] == [(None, 10, 4, 4), (None, 10)]
    # 832 + 17952 + 2 * (288*32*16 + 64) + (32*10*16 + 20)
    assert model.count_params() == 832 + 17952 + 2 * (288 * 32 * 16 + 64) + 32 * 10 * 16 + 20
    assert {v.path for v in model.weights} >= {"conv_caps1/w", "class_capsules/beta_a"}


@pytest.fixture(scope="module")
def small_model():
    keras.utils.set_random_seed(7)
    return nets.capsules_net(num_classes=5, iterations=2, A=8, B=4, C=6, D=5,
                             input_shape=(28, 28, 1))


def test_batch_sizes_give_the_same_per_example_results(small_model):
    x = np.random.RandomState(3).uniform(-1, 1, size=(24, 28, 28, 1)).astype(np.float32)
    p24, a24 = (t.numpy() for t in small_model(x))
    p3, a3 = (t.numpy() for t in small_model(x[5:8]))
    p1, a1 = (t.numpy() for t in small_model(x[11:12]))
    assert_close(p3, p24[5:8], 1e-5, what="batch 3 vs 24 poses")
    assert_close(a3, a24[5:8], 1e-5, what="batch 3 vs 24 activations")
    assert_close(p1, p24[11:12], 1e-5, what="batch 1 vs 24 poses")
    assert_close(a1, a24[11:12], 1e-5, what="batch 1 vs 24 activations")


def test_xla_jit_compile_matches_eager(small_model):
    x = np.random.RandomState(4).uniform(-1, 1, size=(3, 28, 28, 1)).astype(np.float32)
    eager = small_model(x)
    jitted = tf.function(lambda t: small_model(t), jit_compile=True)(tf.constant(x))
    assert_close(jitted[0], eager[0], 1e-5, what="poses")
    assert_close(jitted[1], eager[1], 1e-5, what="activations")


def test_save_and_load_keras_file_gives_identical_outputs(small_model, tmp_path):
    path = str(tmp_path / "m.keras")
    small_model.save(path)
    loaded = keras.models.load_model(path)
    x = np.random.RandomState(5).uniform(-1, 1, size=(2, 28, 28, 1)).astype(np.float32)
    for a, b in zip(small_model(x), loaded(x)):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    assert loaded.get_layer("conv_caps1").iterations == 2


@pytest.mark.parametrize("layer", [
    layers.PrimaryCaps(6, kernel_size=3, strides=2, padding="same", name="p"),
    layers.ConvCaps(7, kernel_size=5, strides=2, iterations=4, stable=True, name="c"),
    layers.ClassCaps(3, iterations=1, coord_addition=False, name="k"),
])
def test_get_config_round_trip(layer):
    config = layer.get_config()
    clone = layer.__class__.from_config(config)
    assert clone.get_config() == config
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(layer))
    assert type(restored) is type(layer) and restored.get_config() == config


def test_runs_with_onednn_enabled():
    """TensorFlow's default CPU build (oneDNN) aborts on the article's rank-6 softmax."""
    code = (
        "import numpy as np, tensorflow as tf\n"
        "from capsem import nets\n"
        "m = nets.capsules_net(A=8, B=4, C=4, D=4)\n"
        "p, a = m(np.zeros((2, 28, 28, 1), np.float32))\n"
        "g = tf.function(lambda x: m(x), jit_compile=True)(tf.zeros((1, 28, 28, 1)))\n"
        "print('ok', a.shape, g[1].shape)\n")
    env = dict(os.environ, TF_ENABLE_ONEDNN_OPTS="1", TF_CPP_MIN_LOG_LEVEL="2")
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "ok (2, 10) (1, 10)" in out.stdout


# --- bad input -------------------------------------------------------------


def _raises(match, fn, *args, **kwargs):
    with pytest.raises(ValueError, match=match):
        fn(*args, **kwargs)


def test_errors_wrong_rank_or_pose_shape():
    layer = layers.ConvCaps(4)
    _raises(r"poses must be \(N, H, W, caps, 4, 4\), got shape \(2, 9, 9, 8, 16\)",
            layer, [np.zeros((2, 9, 9, 8, 16), np.float32), np.zeros((2, 9, 9, 8), np.float32)])
    _raises(r"poses must be .* got shape \(2, 9, 9, 8, 3, 3\)", layers.ClassCaps(2),
            [np.zeros((2, 9, 9, 8, 3, 3), np.float32), np.zeros((2, 9, 9, 8), np.float32)])
    _raises(r"activations must be \(N, H, W, caps\)", layers.ConvCaps(4),
            [np.zeros((2, 9, 9, 8, 4, 4), np.float32), np.zeros((2, 9, 9, 7), np.float32)])
    _raises(r"expects a pair \[poses", layers.ConvCaps(4), np.zeros((2, 9, 9, 8, 4, 4), np.float32))
    _raises(r"PrimaryCaps .* expects feature maps \(N, H, W, channels\)", layers.PrimaryCaps(4),
            np.zeros((2, 9, 9), np.float32))
    _raises(r"kernel_tile input must have rank 4 or 6", ops.kernel_tile, np.zeros((2, 3, 3)), 3, 1)
    _raises(r"em_routing votes must be \(\.\.\., I, O, 16\)", ops.em_routing,
            np.zeros((2, 3, 4, 9), np.float32), np.zeros((2, 3)), np.zeros(4), np.zeros(4), 3)


def test_errors_grid_smaller_than_kernel():
    _raises(r"grid 2x2 is smaller than the kernel 3x3", layers.ConvCaps(4),
            [np.zeros((1, 2, 2, 8, 4, 4), np.float32), np.zeros((1, 2, 2, 8), np.float32)])
    _raises(r"grid 4x4 is smaller than the kernel 5x5", ops.kernel_tile,
            np.zeros((1, 4, 4, 2), np.float32), 5, 1)
    _raises(r"too small for the network", nets.capsules_net, input_shape=(12, 12, 1))


def test_errors_iterations_and_arguments():
    _raises(r"iterations must be a positive int, got 0", layers.ConvCaps, 4, iterations=0)
    _raises(r"iterations must be a positive int, got 0", layers.ClassCaps, 4, iterations=0)
    _raises(r"iterations must be an int >= 1, got 0", ops.em_routing,
            np.zeros((2, 3, 4, 16), np.float32), np.zeros((2, 3)), np.zeros(4), np.zeros(4), 0)
    _raises(r"capsules must be a positive int", layers.ConvCaps, 0)
    _raises(r"kernel_size must be a positive int", layers.ConvCaps, 4, kernel_size=0)
    _raises(r"padding must be 'valid' or 'same'", layers.PrimaryCaps, 4, padding="full")
    _raises(r"A must be a positive int", nets.capsules_net, A=0)


def test_errors_mismatched_capsule_counts():
    rng = np.random.RandomState(0)
    _raises(r"poses have 7 input capsules .* but w has 8", ops.mat_transform,
            rng.normal(size=(3, 7, 16)).astype(np.float32),
            rng.normal(size=(1, 8, 2, 4, 4)).astype(np.float32))
    _raises(r"beta_v must hold O = 4 values", ops.em_routing,
            np.zeros((2, 3, 4, 16), np.float32), np.ones((2, 3)), np.zeros(5), np.zeros(4), 3)
    _raises(r"i_activations must be votes.shape\[:-2\]", ops.em_routing,
            np.zeros((2, 3, 4, 16), np.float32), np.ones((2, 5)), np.zeros(4), np.zeros(4), 3)
    layer = layers.ConvCaps(4)
    layer([np.zeros((1, 5, 5, 8, 4, 4), np.float32), np.ones((1, 5, 5, 8), np.float32)])
    with pytest.raises(ValueError, match=r"built for 8 input capsule types .* got 6"):
        layer([np.zeros((1, 5, 5, 6, 4, 4), np.float32), np.ones((1, 5, 5, 6), np.float32)])


def _article_layer(layer, inputs):
    """The layer's outputs from the article's own functions, differentiated by autodiff.

    Votes from `kernel_tile` / `mat_transform` / `coord_addition`, then the article's
    `m_step` / `e_step` chained as in its `matrix_capsules_em_routing` (faithful routing):
    no fused kernel and no hand-derived gradient.
    """
    poses, acts = inputs
    o = layer.capsules
    if isinstance(layer, layers.ConvCaps):
        k, s = layer.kernel_size, layer.strides
        tiled_p = ops.kernel_tile(poses, k, s)  # (N, OH, OW, K*K, I*16)
        n, oh, ow = tiled_p.shape[:3]
        votes = ops.mat_transform(tf.reshape(tiled_p, [-1, k * k * poses.shape[3], 16]),
                                  layer.w)  # (N*OH*OW, K*K*I, O, 16)
        votes = tf.reshape(votes, [n, oh, ow, -1, o, 16])  # (N, OH, OW, K*K*I, O, 16)
        i_act = tf.reshape(ops.kernel_tile(acts, k, s), [n, oh, ow, -1])  # (N, OH, OW, K*K*I)
    else:
        n, h, w, i = acts.shape
        votes = ops.mat_transform(tf.reshape(poses, [-1, i, 16]), layer.w)  # (N*H*W, I, O, 16)
        votes = ops.coord_addition(tf.reshape(votes, [n, h, w, i, o, 16]), h, w)
        votes = tf.reshape(votes, [n, h * w * i, o, 16])  # (N, H*W*I, O, 16)
        i_act = tf.reshape(acts, [n, h * w * i])  # (N, H*W*I)
    beta_v = tf.reshape(layer.beta_v, [1, o, 1])
    beta_a = tf.reshape(layer.beta_a, [1, o, 1])
    rr = tf.fill([votes.shape[-3], o, 1], 1.0 / o)  # (I, O, 1)
    lams = ops.inverse_temperatures(layer.iterations)
    for t, lam in enumerate(lams):
        mean, stdv, act = ops.m_step(rr, votes, i_act[..., None, None], beta_v, beta_a, lam)
        if t < len(lams) - 1:
            rr = ops.e_step(mean, stdv, act, votes)
    out_shape = votes.shape[:-3]
    return (tf.reshape(mean, out_shape + (o, 4, 4)), tf.reshape(act, out_shape + (o,)))


def _loss_and_grads(layer, poses, acts, call=None):
    """A loss mixing all outputs, and its gradients w.r.t. the weights and both inputs."""
    call = call or layer
    with tf.GradientTape() as tape:
        tape.watch([poses, acts])
        out_p, out_a = call([poses, acts])
        loss = (tf.reduce_sum(tf.sin(3.0 * out_p)) + tf.reduce_sum(out_a * tf.range(
            1.0, 1.0 + out_a.shape[-1])))
    return loss, tape.gradient(loss, layer.trainable_variables + [poses, acts])


@pytest.mark.parametrize("path", ["xla_kernels", "native_fn"])
@pytest.mark.parametrize("kind,kernel,stride,iterations,stable", [
    ("conv", 3, 1, 2, False), ("conv", 5, 2, 4, True), ("conv", 2, 1, 1, False),
    ("class", None, None, 3, False), ("class", None, None, 2, True)])
def test_fast_path_matches_eager_outputs_and_gradients(kind, kernel, stride, iterations, stable,
                                                       path):
    """The fast paths: blocked XLA kernels or native kernels, each with a hand-derived gradient.

    Other shapes than the golden files (several uneven blocks, kernels 2 and 5, 1-4
    iterations, input capsule counts that are not multiples of 16, a 3x5 class grid with
    coordinate addition, the stable mode): outputs and gradients must equal those of the
    layer run eagerly with TensorFlow ops (one block, no XLA, no native kernels, the same
    hand-derived gradient as the XLA kernels) and those of the article's own functions
    differentiated by autodiff (`_article_layer`; faithful routing, which the stable mode
    matches on such ordinary inputs).
    """
    keras.utils.set_random_seed(7)
    rng = np.random.RandomState(7)
    if kind == "conv":
        poses, acts = _capsule_inputs(rng, 3, 9, 9, 8)  # M = 3*OH*OW problems, several blocks
        layer = layers.ConvCaps(16, kernel_size=kernel, strides=stride, iterations=iterations,
                                stable=stable)
    else:
        poses, acts = _capsule_inputs(rng, 4, 3, 5, 16)
        layer = layers.ClassCaps(7, iterations=iterations, stable=stable)
    poses, acts = tf.constant(poses), tf.constant(acts)
    layer([poses, acts])  # builds
    per_problem = layer.w.shape[1] * layer.w.shape[2] * 16
    if kind == "conv":
        assert poses.shape[0] * ((9 - kernel) // stride + 1) ** 2 * per_problem > 2 * (1 << 19)
    eager_loss, eager_grads = routed(lambda p, a: _loss_and_grads(layer, p, a), "eager")(
        poses, acts)
    fast_out = routed(lambda p, a: layer([p, a]), path)(poses, acts)
    eager_out = routed(lambda p, a: layer([p, a]), "eager")(poses, acts)
    for fast, eager, what in zip(fast_out, eager_out, ("poses", "activations")):
        assert_close(fast, eager, 1e-4, what=what)
    fast_loss, fast_grads = routed(lambda p, a: _loss_and_grads(layer, p, a), path)(poses, acts)
    assert_close(fast_loss, eager_loss, 1e-5, what="loss")
    names = [v.name for v in layer.trainable_variables] + ["poses", "activations"]
    for fast, eager, name in zip(fast_grads, eager_grads, names):
        assert np.max(np.abs(eager.numpy())) > 0, name
        assert_close(fast, eager, 5e-4, what=f"gradient of {name}")
    article_out = _article_layer(layer, [poses, acts])
    for fast, ref, what in zip(fast_out, article_out, ("poses", "activations")):
        assert_close(fast, ref, 1e-4, what=f"{what} against the article's functions")
    ref_loss, ref_grads = _loss_and_grads(layer, poses, acts,
                                          call=lambda x: _article_layer(layer, x))
    assert_close(fast_loss, ref_loss, 1e-4, what="loss against the article's functions")
    for fast, ref, name in zip(fast_grads, ref_grads, names):
        assert_close(fast, ref, 5e-4, what=f"gradient of {name} against autodiff")
