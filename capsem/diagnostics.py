"""Intermediate tensors of the capsule layers, for TensorBoard histograms."""

import tensorflow as tf

from capsem import nets

#: Capsule layers of `capsem.nets.capsules_net` that route with EM.
ROUTING_LAYERS = ("conv_caps1", "conv_caps2", "class_capsules")


def capsule_details(model, images):
    """Runs a `capsules_net` model layer by layer and keeps what TensorBoard shows.

    Args:
      model: a model from `capsem.nets.capsules_net`.
      images: a (small) batch of preprocessed images.

    Returns:
      a dict `{name: tensor}` with `activations/<layer>` for primary_caps,
      conv_caps1, conv_caps2 and class_capsules, `votes/<layer>` and
      `routing/<layer>` (the assignments of the last EM iteration) for the
      three routing layers.
    """
    x = model.get_layer(nets.LAYER_NAMES[0])(images)
    poses, activations = model.get_layer("primary_caps")(x)
    details = {"activations/primary_caps": activations}
    caps = [poses, activations]
    for name in ROUTING_LAYERS:
        out = model.get_layer(name).call_with_details(caps)
        details[f"activations/{name}"] = out["activations"]
        details[f"votes/{name}"] = out["votes"]
        details[f"routing/{name}"] = out["assignments"]
        caps = [out["poses"], out["activations"]]
    return details


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
