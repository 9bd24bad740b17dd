"""Intermediate tensors of the capsule layers, for TensorBoard histograms."""

import keras
import tensorflow as tf

#: Capsule layers of `capsem.nets.capsules_net` that route with EM.
ROUTING_LAYERS = ("conv_caps1", "conv_caps2", "class_capsules")


def _features(model, images):
    """The input of primary_caps: the layers between the model's input and it, in order."""
    x = images
    for layer in model.layers:
        if layer.name == "primary_caps":
            return x
        if not isinstance(layer, keras.layers.InputLayer):
            x = layer(x)  # relu_conv1 (and conv1_batch_norm, conv1_relu); inference mode
    raise ValueError(f"model {model.name!r} has no 'primary_caps' layer: not a "
                     f"capsem.nets.capsules_net model")


def capsule_outputs(model, images, votes=False):
    """Runs a `capsules_net` model layer by layer and keeps every capsule layer's outputs.

    Every layer before primary_caps runs as in the model (also conv1_batch_norm
    and conv1_relu of a `conv1_batch_norm=True` network), so the class poses
    and activations equal `model(images)` to float rounding.

    Args:
      model: a model from `capsem.nets.capsules_net`.
      images: a (small) batch of preprocessed images `(N, H, W, C)`.
      votes: also keep `votes/<layer>` of the routing layers.

    Returns:
      a dict of tensors: `poses/<layer>` and `activations/<layer>` for
      primary_caps, conv_caps1, conv_caps2 (`(N, H, W, T, 4, 4)`,
      `(N, H, W, T)`) and class_capsules (`(N, E, 4, 4)`, `(N, E)`), and
      `routing/<layer>` (the assignments of the last EM iteration) for the
      three routing layers: `(N, OH, OW, K*K*I, O)` for conv_caps1 and
      conv_caps2, `(N, H*W*I, E)` for class_capsules.
    """
    images = tf.convert_to_tensor(images, tf.float32)
    poses, activations = model.get_layer("primary_caps")(_features(model, images))
    out = {"poses/primary_caps": poses, "activations/primary_caps": activations}
    for name in ROUTING_LAYERS:
        result = model.get_layer(name).call_with_details([poses, activations])
        poses, activations = result["poses"], result["activations"]
        out.update({f"poses/{name}": poses, f"activations/{name}": activations,
                    f"routing/{name}": result["assignments"]})
        if votes:
            out[f"votes/{name}"] = result["votes"]
    return out


def capsule_details(model, images, outputs=None):
    """What TensorBoard's histograms show of a `capsules_net` model (`capsule_outputs`).

    Args:
      model: a model from `capsem.nets.capsules_net`.
      images: a (small) batch of preprocessed images.
      outputs: `capsule_outputs(model, images, votes=True)` if the caller has
        them; None: computed here.

    Returns:
      a dict `{name: tensor}` with `activations/<layer>` for primary_caps,
      conv_caps1, conv_caps2 and class_capsules, `votes/<layer>` and
      `routing/<layer>` (the assignments of the last EM iteration) for the
      three routing layers.
    """
    if outputs is None:
        outputs = capsule_outputs(model, images, votes=True)
    return {name: tensor for name, tensor in outputs.items() if not name.startswith("poses/")}


#: Tensors with more values are histogrammed on an evenly strided sample of
#: about this many (the votes of ConvCaps1 for 4 images are 21 M values, whose
#: histogram took 2-5 s).
MAX_HISTOGRAM_VALUES = 1 << 20


def histogram_sample(tensor, max_values=MAX_HISTOGRAM_VALUES):
    """The values of `tensor` flattened, every k-th of them if there are more than `max_values`."""
    flat = tf.reshape(tensor, [-1])
    size = flat.shape[0]
    if size is not None and size > max_values:
        flat = flat[::-(-size // max_values)]
    return flat


def write_histograms(details):
    """Writes every tensor of `capsule_details` as a histogram (inside a writer's default).

    Large tensors (the votes) are sampled with `histogram_sample`.
    """
    for name, tensor in details.items():
        tf.summary.histogram(name, histogram_sample(tensor))
