"""capsem layers and the full network against the article's TF1 outputs."""

import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from capsem import compat, layers, losses, nets
from conftest import (GOLDEN, ROUTING_PATHS, assert_close, assert_single, golden_weights,
                      routed)


def _assign(layer, d, keys):
    for var, key in zip(layer.article_variables().values(), keys):
        var.assign(d[key])


def test_conv_stem(golden):
    d = golden("conv_stem")
    from capsem.datasets import preprocess_image
    inputs = preprocess_image(d["images_uint8"])
    np.testing.assert_array_equal(inputs.numpy(), d["inputs"])
    conv = keras.layers.Conv2D(32, 5, strides=2, padding="same", activation="relu")
    conv.build((None, 28, 28, 1))
    conv.kernel.assign(d["weights"])
    conv.bias.assign(d["biases"])
    assert_single(conv(inputs), d["out"], "relu_conv1")


def test_primary_caps(golden):
    d = golden("primary_caps")
    layer = layers.PrimaryCaps(32, name="primary_caps")
    layer.build(d["inputs"].shape)
    names = golden_weights(d)
    for suffix, var in layer.article_variables().items():
        var.assign(names["primary_caps/" + suffix])
    poses, acts = layer(d["inputs"])
    assert_single(poses, d["out_poses"], "poses")
    assert_single(acts, d["out_activations"], "activations")


#: Every routing path (conftest.ROUTING_PATHS): TensorFlow ops, XLA kernels,
#: native kernels eagerly and in a tf.function (the default of TrainStep).
PATHS = pytest.mark.parametrize("path", ROUTING_PATHS)


@pytest.mark.parametrize("name", ["conv_caps1", "conv_caps2"])
@PATHS
def test_conv_caps(golden, name, path):
    d = golden(name)
    kh, kw, num_i, num_o = (int(v) for v in d["kernel_shape"])
    layer = layers.ConvCaps(num_o, kernel_size=kh, strides=int(d["stride"]),
                            iterations=int(d["iterations"]), name=name)
    inputs = [d["inputs_poses"], d["inputs_activations"]]
    layer.build([d["inputs_poses"].shape, d["inputs_activations"].shape])
    weights = golden_weights(d)
    for suffix, var in layer.article_variables().items():
        var.assign(weights[f"{name}/{suffix}"])
    out = routed(layer.call_with_details, path)([tf.constant(x) for x in inputs])
    assert_single(out["poses"], d["out_poses"], "poses")
    assert_single(out["activations"], d["out_activations"], "activations")
    # What the layer feeds to EM routing.
    acts_in = tf.reshape(ops_tile_acts(d, kh), d["em_i_activations"].shape)
    np.testing.assert_array_equal(acts_in.numpy(), d["em_i_activations"])
    assert_single(out["votes"][0, 0, 0], d["em_votes_b0_y0_x0"], "votes at (0, 0, 0)")
    plain = routed(layer, path)([tf.constant(x) for x in inputs])
    np.testing.assert_array_equal(plain[0].numpy(), out["poses"].numpy())


def ops_tile_acts(d, kernel):
    from capsem import ops
    return ops.kernel_tile(d["inputs_activations"], kernel, int(d["stride"]))


@PATHS
def test_class_capsules(golden, path):
    d = golden("class_capsules")
    layer = layers.ClassCaps(int(d["num_classes"]), iterations=int(d["iterations"]),
                             name="class_capsules")
    layer.build([d["inputs_poses"].shape, d["inputs_activations"].shape])
    weights = golden_weights(d)
    for suffix, var in layer.article_variables().items():
        var.assign(weights["class_capsules/" + suffix])
    out = routed(layer.call_with_details, path)(
        [tf.constant(d["inputs_poses"]), tf.constant(d["inputs_activations"])])
    assert_single(out["poses"], d["out_poses"], "poses")
    assert_single(out["activations"], d["out_activations"], "activations")
    n, s, _, i, k, _ = d["votes_with_coord"].shape
    assert_single(out["votes"], d["votes_with_coord"].reshape(n, s * s * i, k, 16), "votes")


@pytest.fixture(scope="module")
def article_net(golden):
    d = golden("capsules_net")
    a, b, c, dd = (int(v) for v in d["config_A_B_C_D"])
    model = nets.capsules_net(num_classes=int(d["num_classes"]), iterations=int(d["iterations"]),
                              A=a, B=b, C=c, D=dd)
    loaded = compat.load_article_weights(model, golden_weights(d))
    assert loaded == [str(n) for n in d["variable_names"]]  # the article's creation order
    return model


@PATHS
def test_full_network_per_layer_outputs(golden, article_net, path):
    d = golden("capsules_net")
    probe = keras.Model(article_net.input,
                        [article_net.get_layer(n).output for n in nets.LAYER_NAMES])
    conv1, primary, caps1, caps2, cls = routed(probe, path)(tf.constant(d["inputs"]))
    assert_close(conv1, d["relu_conv1_out"], 1e-4, what="relu_conv1")
    for name, (poses, acts) in (("primary_caps", primary), ("conv_caps1", caps1),
                                ("conv_caps2", caps2)):
        assert_close(poses, d[f"{name}_out_poses"], 1e-4, what=f"{name} poses")
        assert_close(acts, d[f"{name}_out_activations"], 1e-4, what=f"{name} activations")
    assert_close(cls[0], d["out_poses"], 1e-4, what="class poses")
    assert_close(cls[1], d["out_activations"], 1e-4, what="class activations")


@PATHS
def test_full_network_loss_and_gradients(golden, article_net, path):
    d = golden("capsules_net")
    ipe = int(d["iterations_per_epoch"])
    x = tf.constant(d["inputs"])
    variables = nets.article_variables(article_net)

    def loss_and_grads(x, margin):
        with tf.GradientTape() as tape:
            tape.watch(x)
            _, acts = article_net(x)
            loss = losses.spread_loss(d["labels_onehot"], acts, margin)
        return loss, tape.gradient(loss, list(variables.values()) + [x])

    loss_and_grads = routed(loss_and_grads, path)
    for step in d["global_steps"]:
        margin = losses.margin_schedule(int(step), ipe)
        assert margin.numpy() == d[f"step{step}_margin"]
        loss, grads = loss_and_grads(x, margin)
        assert_close(loss, d[f"step{step}_loss"], 1e-4, what=f"loss at step {step}")
        if step not in d["grad_global_steps"]:
            continue
        for (name, _), grad in zip(variables.items(), grads):
            key = f"step{step}_grad__" + name.replace("/", "__")
            assert_close(grad, d[key], 5e-4, what=f"gradient of {name}")
        assert_close(grads[-1], d[f"step{step}_grad__inputs"], 5e-4, what="gradient of the input")


def test_full_network_stable_routing_matches_on_ordinary_inputs(golden):
    """The guarded routing (stable=True) gives the article's numbers on the golden inputs."""
    d = golden("capsules_net")
    model = nets.capsules_net(stable=True)
    compat.load_article_weights(model, golden_weights(d))
    poses, acts = model(d["inputs"])
    assert_close(poses, d["out_poses"], 1e-4, what="class poses")
    assert_close(acts, d["out_activations"], 1e-4, what="class activations")


def test_load_article_checkpoint_reproduces_trained_outputs(golden):
    e = golden("article_ckpt/expected")
    from capsem.datasets import preprocess_image
    model = nets.capsules_net()
    ckpt_dir = os.path.join(GOLDEN, "article_ckpt")
    loaded = compat.load_article_weights(model, ckpt_dir)
    assert loaded == [str(n) for n in e["model_variable_names"]]
    for name, key in zip(e["model_variable_names"], e["model_variable_keys"]):
        np.testing.assert_array_equal(nets.article_variables(model)[str(name)].numpy(), e[str(key)])
    for prefix in ("train", "eval"):
        poses, acts = model(preprocess_image(e[f"{prefix}_images_uint8"]))
        assert_close(poses, e[f"{prefix}_out_poses"], 5e-5, what=f"{prefix} poses")
        assert_close(acts, e[f"{prefix}_out_activations"], 5e-5, what=f"{prefix} activations")
    margin = losses.margin_schedule(int(e["final_global_step"]), int(e["iterations_per_epoch"]))
    assert margin.numpy() == e["eval_margin"]
    loss = losses.spread_loss_from_labels(e["eval_labels"], acts, margin)
    assert_close(loss, e["eval_loss"], 5e-5, what="eval loss")
    # The checkpoint prefix works as well as the directory.
    model2 = nets.capsules_net()
    compat.load_article_weights(model2, os.path.join(ckpt_dir, "model.ckpt-3"))
    np.testing.assert_array_equal(model2(preprocess_image(e["eval_images_uint8"]))[1].numpy(),
                                  acts.numpy())
