"""The capsule layers under a Keras mixed-precision policy: EM routing stays in float32."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from capsem import layers, nets
from conftest import assert_close

_NET = dict(A=4, B=4, C=4, D=4, iterations=2, input_shape=(14, 14, 1))
_CAPSULE_LAYERS = ("primary_caps", "conv_caps1", "conv_caps2", "class_capsules")


def _forward_and_gradients(model, x):
    with tf.GradientTape() as tape:
        poses, activations = model(x)
        loss = tf.reduce_sum(activations * tf.range(1.0, 11.0)) + tf.reduce_sum(tf.sin(poses))
    return poses, activations, tape.gradient(loss, model.trainable_variables)


# Measured largest relative differences to float32 (outputs, gradients):
# mixed_float16 2e-3, 1e-2; mixed_bfloat16 1e-2, 0.2 (bfloat16 keeps 8 bits).
@pytest.mark.parametrize("policy,half,out_tol,grad_tol", [
    ("mixed_float16", "float16", 1e-2, 5e-2),
    ("mixed_bfloat16", "bfloat16", 5e-2, None),
])
def test_capsules_net_routes_in_float32_under_mixed_precision(policy, half, out_tol, grad_tol):
    """Only relu_conv1 runs in half precision; the outputs are float32 and match a float32 net."""
    keras.utils.set_random_seed(0)
    reference = nets.capsules_net(**_NET)
    x = tf.constant(np.random.RandomState(0).uniform(-1, 1, (3, 14, 14, 1)).astype(np.float32))
    saved = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_dtype_policy(policy)
    try:
        model = nets.capsules_net(**_NET)
        model.set_weights(reference.get_weights())
        poses, activations, grads = _forward_and_gradients(model, x)
    finally:
        keras.mixed_precision.set_dtype_policy(saved)
    assert model.get_layer("relu_conv1").compute_dtype == half
    for name in _CAPSULE_LAYERS:
        assert model.get_layer(name).compute_dtype == "float32", name
    assert poses.dtype == tf.float32 and activations.dtype == tf.float32
    ref_poses, ref_activations, ref_grads = _forward_and_gradients(reference, x)
    assert_close(poses, ref_poses, out_tol, what="poses")
    assert_close(activations, ref_activations, out_tol, what="activations")
    for var, grad, ref_grad in zip(model.trainable_variables, grads, ref_grads):
        assert grad.dtype == tf.float32, var.path
        assert np.all(np.isfinite(grad.numpy())), var.path
        if grad_tol is not None:
            assert_close(grad, ref_grad, grad_tol, what=f"gradient of {var.path}")


@pytest.mark.parametrize("layer_cls", [layers.ConvCaps, layers.ClassCaps])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "mixed_float16", "mixed_bfloat16"])
def test_routing_layers_reject_a_half_precision_dtype(layer_cls, dtype):
    with pytest.raises(ValueError, match=rf"EM routing needs a compute dtype in \('float32', "
                                         rf"'float64'\), got dtype '{dtype}'"):
        layer_cls(4, dtype=dtype)


def test_capsule_layers_default_to_float32_under_a_mixed_policy():
    """Without a dtype the capsule layers ignore the global policy; a given one is kept."""
    saved = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_dtype_policy("mixed_float16")
    try:
        made = [layers.PrimaryCaps(4), layers.ConvCaps(4), layers.ClassCaps(4)]
        explicit = [layers.PrimaryCaps(4, dtype="float16"), layers.ConvCaps(4, dtype="float64")]
    finally:
        keras.mixed_precision.set_dtype_policy(saved)
    assert [layer.compute_dtype for layer in made] == ["float32"] * 3
    assert [layer.variable_dtype for layer in made] == ["float32"] * 3
    assert [layer.compute_dtype for layer in explicit] == ["float16", "float64"]
    # Half-precision inputs are cast, also by call_with_details (no Keras __call__).
    rng = np.random.RandomState(0)
    poses = tf.constant(rng.normal(size=(2, 5, 5, 3, 4, 4)), tf.float16)
    activations = tf.constant(rng.uniform(size=(2, 5, 5, 3)), tf.float16)
    out = made[1].call_with_details([poses, activations])
    assert out["poses"].dtype == tf.float32 and out["votes"].dtype == tf.float32
    config = made[1].get_config()
    assert layers.ConvCaps.from_config(config).compute_dtype == "float32"
