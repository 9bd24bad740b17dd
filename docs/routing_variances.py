"""Per routing layer: the M-step variances of the final iteration vs the variance floor,
the mean output activations, and the learned betas and transformation-matrix scales. Usage: python docs/routing_variances.py LOG_DIR [N_TEST_IMAGES] [TEST_TFRECORD]"""
import sys, numpy as np, tensorflow as tf
sys.path.insert(0, __import__("os").path.dirname(__import__("os").path.dirname(__import__("os").path.abspath(__file__))))
from capsem import training, datasets, diagnostics, ops
log_dir = sys.argv[1]; n = int(sys.argv[2]) if len(sys.argv) > 2 else 64
model, config, path, step = training.load_trained(log_dir)
print(path, "step", step, "floor", config.variance_floor, "lambda", config.final_lambda)
info = datasets.get_info("mnist")
x, y = datasets.read_image_tfrecord(sys.argv[3] if len(sys.argv) > 3 else "dataset/mnist/mnist_test.tfrecord", info.input_shape, 10)
x = datasets.preprocess_image(tf.constant(np.asarray(x[:n])))
out = diagnostics.capsule_outputs(model, x, votes=True)
prev = "primary_caps"
for name in ("conv_caps1", "conv_caps2", "class_capsules"):
    v = np.asarray(out[f"votes/{name}"], np.float64); rr = np.asarray(out[f"routing/{name}"], np.float64)
    a = np.asarray(out[f"activations/{prev}"], np.float64)
    layer = model.get_layer(name)
    if name != "class_capsules":
        k, s = layer.kernel_size, layer.strides
        ta = np.asarray(ops.kernel_tile(tf.constant(a, tf.float32), k, s), np.float64)  # N,OH,OW,KK,I
        ta = ta.reshape(ta.shape[:3] + (-1,))
    else:
        ta = a.reshape(a.shape[0], -1)
        v = v.reshape((v.shape[0],) + v.shape[-3:]); rr = rr.reshape((rr.shape[0],) + rr.shape[-2:])
    rp = rr * ta[..., None]  # (..., I, O)
    den = rp.sum(-2) + 1e-12  # (..., O)
    mu = np.einsum("...io,...ioh->...oh", rp, v) / den[..., None]
    var = np.einsum("...io,...ioh->...oh", rp, (v - mu[..., None, :, :]) ** 2) / den[..., None]
    vote_std = v.std()
    print(f"{name}: votes std {vote_std:.3f}; var (before floor) pct10/50/90",
          np.percentile(var, [10, 50, 90]).round(5), "frac < floor", (var < config.variance_floor).mean().round(3),
          "out act mean", np.asarray(out[f'activations/{name}']).mean().round(3))
    prev = name
beta_a = model.get_layer("class_capsules").beta_a.numpy().ravel(); beta_v = model.get_layer("class_capsules").beta_v.numpy().ravel()
print("class beta_a", beta_a.round(2), "beta_v", beta_v.round(2))
for name in ("conv_caps1", "conv_caps2"):
    l = model.get_layer(name); print(name, "beta_a", np.round(l.beta_a.numpy().ravel()[:6], 2), "w std", l.w.numpy().std().round(3))
print("class w std", model.get_layer("class_capsules").w.numpy().std().round(3))
