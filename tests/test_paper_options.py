"""The paper routing's options of the paper recipe: the inverse temperature ramp
(`lambda_schedule="ramp"`) and YuxianMeng's unnormalised M-step
(`routing_cost="unnormalised"`), against the float64 numpy reference, their
gradients against finite differences, and their wiring through layers, configs and
the training step."""

import numpy as np
import pytest
import tensorflow as tf

from capsem import layers, nets, paper_routing, step, training
from capsem.errors import ConfigError
from conftest import assert_close
import numpy_reference as ref


def _inputs(rng, n, h, w, c):
    poses = rng.normal(size=(n, h, w, c, 4, 4)).astype(np.float32)
    acts = rng.uniform(0.05, 1.0, size=(n, h, w, c)).astype(np.float32)
    return poses, acts


def _set_weights(layer, rng):
    values = [(0.5 * rng.normal(size=layer.w.shape)).astype(np.float32),
              rng.normal(size=layer.beta_v.shape).astype(np.float32),
              rng.normal(size=layer.beta_a.shape).astype(np.float32)]
    for var, value in zip((layer.w, layer.beta_v, layer.beta_a), values):
        var.assign(value)
    return values


@pytest.mark.parametrize("h,w,c,o,k,s,iterations,cost,lam", [
    (7, 7, 3, 5, 3, 2, 1, "unnormalised", 0.3),   # the recipe: one M-step
    (7, 5, 2, 3, 3, 2, 3, "unnormalised", 0.05),  # stride 2, H != W, two E-steps
    (5, 6, 3, 4, 2, 1, 4, "unnormalised", 1.0),   # even kernel, 4 iterations
    (6, 6, 2, 3, 3, 1, 2, "normalised", 0.2),     # the ramp with the normalised M-step
])
def test_conv_caps_options_match_reference(h, w, c, o, k, s, iterations, cost, lam):
    rng = np.random.default_rng(h * 100 + w * 10 + iterations)
    poses, acts = _inputs(rng, 2, h, w, c)
    layer = layers.ConvCaps(o, kernel_size=k, strides=s, iterations=iterations,
                            routing="paper", variance_floor=1e-2, inverse_temperature=0.7,
                            routing_cost=cost)
    layer.build([poses.shape, acts.shape])
    wt, bv, ba = _set_weights(layer, rng)
    layer.inverse_temperature.assign(lam)  # as the training step does
    ref_p, ref_a = ref.conv_caps_paper(poses, acts, wt, bv, ba, k, s, iterations, 1.0,
                                       inverse_temperature=lam, cost=cost, floor=1e-2)
    for what, run in (("eager", layer), ("tf.function", tf.function(layer))):
        out_p, out_a = run([poses, acts])
        assert_close(out_a, ref_a, max_rel=2e-5, what=f"activations ({what})")
        assert_close(out_p, ref_p, max_rel=2e-5, what=f"poses ({what})")
    # Not the numbers of the other M-step or of the iterations' schedule.
    other = "normalised" if cost == "unnormalised" else "unnormalised"
    _, other_a = ref.conv_caps_paper(poses, acts, wt, bv, ba, k, s, iterations, 1.0,
                                     inverse_temperature=lam, cost=other, floor=1e-2)
    _, sched_a = ref.conv_caps_paper(poses, acts, wt, bv, ba, k, s, iterations, 1.0,
                                     cost=cost, floor=1e-2)
    assert np.max(np.abs(other_a - ref_a)) > 1e-3
    assert np.max(np.abs(sched_a - ref_a)) > 1e-3


@pytest.mark.parametrize("iterations", [1, 2])
def test_class_caps_unnormalised_matches_reference(iterations):
    rng = np.random.default_rng(11 + iterations)
    poses, acts = _inputs(rng, 3, 3, 2, 4)
    layer = layers.ClassCaps(5, iterations=iterations, routing="paper", variance_floor=1e-2,
                             inverse_temperature=0.02, routing_cost="unnormalised")
    layer.build([poses.shape, acts.shape])
    wt, bv, ba = _set_weights(layer, rng)
    ref_p, ref_a = ref.class_caps_paper(poses, acts, wt, bv, ba, iterations, 1.0,
                                        inverse_temperature=0.02, cost="unnormalised",
                                        floor=1e-2)
    out_p, out_a = layer([poses, acts])
    assert_close(out_a, ref_a, max_rel=2e-5, what="activations")
    assert_close(out_p, ref_p, max_rel=2e-5, what="poses")


def test_inverse_temperature_ramp():
    ramp = paper_routing.inverse_temperature_ramp
    assert ramp(0.0, 1e-3, 0.1, 1.0) == 1e-3
    assert ramp(2.5, 1e-3, 0.1, 1.0) == pytest.approx(0.251)
    assert ramp(30.0, 1e-3, 0.1, 1.0) == 1.0
    assert float(ramp(tf.constant(2.5), 1e-3, 0.1, 1.0)) == pytest.approx(0.251)
    with pytest.raises(ValueError, match="final >= start"):
        ramp(1.0, 2.0, 0.1, 1.0)
    with pytest.raises(ValueError, match="inverse_temperature must be"):
        paper_routing.em_routing_paper(tf.zeros([1, 1, 3, 2, 16]), tf.ones([1, 1, 3]),
                                       tf.zeros(2), tf.zeros(2), 1, inverse_temperature=0.0)
    with pytest.raises(ValueError, match="cost must be one of normalised, unnormalised"):
        paper_routing.em_routing_paper(tf.zeros([1, 1, 3, 2, 16]), tf.ones([1, 1, 3]),
                                       tf.zeros(2), tf.zeros(2), 1, cost="meng")


def test_layer_options_checks_and_config():
    with pytest.raises(ValueError, match="inverse_temperature needs routing='paper'"):
        layers.ConvCaps(4, inverse_temperature=0.1)
    with pytest.raises(ValueError, match="routing_cost='unnormalised' needs routing='paper'"):
        layers.ClassCaps(4, routing_cost="unnormalised")
    with pytest.raises(ValueError, match="routing_cost must be one of"):
        layers.ClassCaps(4, routing="paper", routing_cost="none")
    with pytest.raises(ValueError, match="inverse_temperature must be None or a number > 0"):
        layers.ClassCaps(4, routing="paper", inverse_temperature=-1.0)
    layer = layers.ConvCaps(4, routing="paper", inverse_temperature=0.25,
                            routing_cost="unnormalised")
    config = layer.get_config()
    assert config["inverse_temperature"] == 0.25 and config["routing_cost"] == "unnormalised"
    clone = layers.ConvCaps.from_config(config)
    clone.build([(None, 5, 5, 2, 4, 4), (None, 5, 5, 2)])
    assert not clone.inverse_temperature.trainable
    assert float(clone.inverse_temperature.numpy()) == 0.25
    # Without the option the layers have no such weight (the article's variables).
    plain = layers.ConvCaps(4, routing="paper")
    plain.build([(None, 5, 5, 2, 4, 4), (None, 5, 5, 2)])
    assert plain.inverse_temperature is None and len(plain.weights) == 3


def test_training_step_follows_the_ramp():
    """The weights hold the ramp's value of the step about to run, and are checkpointed."""
    config = training.TrainConfig.from_recipe("paper", A=4, B=2, C=2, D=2, batch_size=2)
    model = training.build_model(config, training.datasets.get_info("mnist"))
    weights = nets.inverse_temperature_weights(model)
    assert len(weights) == 3 and all(not w.trainable for w in weights)
    fn = training.inverse_temperature_function(config, num_train=20)  # 10 steps per epoch
    assert fn(0) == pytest.approx(1e-3) and fn(15) == pytest.approx(0.451)
    assert fn(25) == fn(10 ** 6) == 0.5  # the recipe's cap (capsem.recipes.PAPER)
    train_step = step.TrainStep(model, step.make_optimizer(1e-3), 10, jit_compile=False,
                                inverse_temperature_fn=fn)
    rng = np.random.default_rng(0)
    images = rng.uniform(-1, 1, size=(2, 28, 28, 1)).astype(np.float32)
    labels = np.array([1, 3])
    train_step.global_step.assign(15)
    out = train_step(images, labels)
    assert bool(out["finite"])
    for w in weights:
        assert float(w.numpy()) == pytest.approx(0.451)
    with pytest.raises(ValueError, match="needs a model with inverse_temperature weights"):
        step.TrainStep(nets.capsules_net(A=4, B=2, C=2, D=2), step.make_optimizer(1e-3), 10,
                       inverse_temperature_fn=fn)


def test_config_checks_of_the_options():
    paper = training.TrainConfig.from_recipe("paper")
    assert (paper.lambda_schedule, paper.routing_cost, paper.iterations,
            paper.batch_size) == ("ramp", "unnormalised", 1, 32)
    cases = [
        (dict(lambda_schedule="ramp"), "needs routing='paper'"),
        (dict(routing_cost="unnormalised"), "needs routing='paper'"),
        (dict(routing="paper", lambda_schedule="exp"), "lambda_schedule must be one of"),
        (dict(routing="paper", routing_cost="x"), "routing_cost must be one of"),
        (dict(routing="paper", lambda_schedule="ramp", lambda_start=2.0),
         "lambda_start .* must be <= final_lambda"),
        (dict(routing="paper", lambda_growth=-0.1), "lambda_growth must be >= 0"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ConfigError, match=message):
            training.TrainConfig(**kwargs).validate()


def test_saved_model_keeps_its_inverse_temperature(tmp_path):
    import keras

    model = nets.capsules_net(A=4, B=2, C=2, D=2, iterations=1, routing="paper",
                              inverse_temperature=1e-3, routing_cost="unnormalised")
    for w in nets.inverse_temperature_weights(model):
        w.assign(0.37)  # where training left it
    images = np.random.default_rng(1).uniform(-1, 1, size=(2, 28, 28, 1)).astype(np.float32)
    _, expected = model(images)
    path = str(tmp_path / "model.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    assert [float(w.numpy()) for w in nets.inverse_temperature_weights(loaded)] == \
        pytest.approx([0.37] * 3)
    _, acts = loaded(images)
    np.testing.assert_allclose(acts.numpy(), expected.numpy(), rtol=1e-6)


def test_conv1_padding_valid_gives_the_pytorch_grids():
    model = nets.capsules_net(A=4, B=2, C=2, D=2, conv1_padding="valid")
    assert model.get_layer("primary_caps").output[1].shape[1:3] == (12, 12)
    assert model.get_layer("conv_caps1").output[1].shape[1:3] == (5, 5)
    assert model.get_layer("conv_caps2").output[1].shape[1:3] == (3, 3)
    same = nets.capsules_net(A=4, B=2, C=2, D=2)
    assert same.get_layer("conv_caps2").output[1].shape[1:3] == (4, 4)
    with pytest.raises(ValueError, match="conv1_padding must be one of same, valid"):
        nets.capsules_net(conv1_padding="full")
    with pytest.raises(ValueError, match="at least 15 rows"):
        nets.capsules_net(input_shape=(14, 14, 1), conv1_padding="valid")
    with pytest.raises(ConfigError, match="conv1_padding must be one of"):
        training.TrainConfig(conv1_padding="full").validate()
    assert training.TrainConfig.from_recipe("paper").conv1_padding == "valid"
    assert training.TrainConfig().conv1_padding == "same"
