"""The article's matrix-capsule network as a Keras model (article: `nets.capsules_net`)."""

import keras

from capsem import layers as caps_layers
from capsem import paper_routing

#: EM routing modes of `capsules_net` (see `capsem.layers.ROUTING_MODES`).
ROUTING_MODES = caps_layers.ROUTING_MODES

#: Paddings of relu_conv1 (`capsules_net`'s `conv1_padding`).
CONV1_PADDINGS = ("same", "valid")

#: Layer names, equal to the article's TF1 variable scopes inside `capsules_em`.
LAYER_NAMES = ("relu_conv1", "primary_caps", "conv_caps1", "conv_caps2", "class_capsules")


def capsules_net(num_classes=10, iterations=3, A=32, B=32, C=32, D=32,
                 input_shape=(28, 28, 1), stable=False, name="capsules_em",
                 routing="article", final_lambda=paper_routing.FINAL_LAMBDA,
                 transform_stddev=1.0, variance_floor=paper_routing.VARIANCE_FLOOR,
                 assignment_gradient=True, conv1_batch_norm=False, inverse_temperature=None,
                 routing_cost="normalised", conv1_padding="same"):
    """Builds the article's network: ReLU Conv1 -> PrimaryCaps -> ConvCaps1 -> ConvCaps2 -> Class capsules.

    * relu_conv1: 5x5 convolution, stride 2, SAME padding (the article; or
      `conv1_padding="valid"`), A channels, ReLU;
    * primary_caps: 1x1, B capsule types (4x4 pose + sigmoid activation);
    * conv_caps1: 3x3, stride 2, C types; conv_caps2: 3x3, stride 1, D types;
    * class_capsules: one capsule per class, with coordinate addition.

    With the defaults this is the article's (and the paper's small-NORB
    sized) network for 28x28x1 MNIST. The input is the preprocessed image,
    `(x - 128) / 128` for uint8 pixels (`capsem.datasets.preprocess_image`).

    Under a Keras mixed-precision policy (e.g. "mixed_float16") only
    relu_conv1 computes in half precision: the capsule layers compute in
    float32 (see `capsem.layers`), and the outputs are float32.

    Args:
      num_classes: number of class capsules E.
      iterations: EM routing iterations of every capsule layer.
      A: channels of relu_conv1.
      B: capsule types of primary_caps.
      C: capsule types of conv_caps1.
      D: capsule types of conv_caps2.
      input_shape: `(H, W, channels)` of the input images.
      stable: guard the unguarded divisions of the article's EM routing
        (see `capsem.ops.em_routing`); False reproduces the article.
      name: model name (the article's scope, `capsules_em`).
      routing: EM routing of the three capsule layers: "article" (default, the
        article's code) or "paper" (`capsem.paper_routing`).
      final_lambda: scale of the paper routing's inverse temperature schedule.
      transform_stddev: stddev of the truncated normal initializer of the
        transformation matrices (the article: 1.0).
      variance_floor: the paper routing's variance floor.
      assignment_gradient: whether the paper routing's gradient flows through
        its assignments (`capsem.paper_routing.em_routing_paper`).
      conv1_batch_norm: batch normalisation between relu_conv1's convolution
        and its ReLU (the convolution then has no bias): yl-1993's PyTorch
        implementation of the small network (README: 99.1% with it, 98.9%
        without, after 30 epochs); False (default) is the article's network.
      inverse_temperature: None, or the initial value of the capsule layers'
        non-trainable `inverse_temperature` weights (see `capsem.layers.ConvCaps`;
        `inverse_temperature_weights` lists them), routing="paper" only.
      routing_cost: the paper routing's M-step, "normalised" or "unnormalised"
        (`capsem.paper_routing.em_routing_paper`'s `cost`).
      conv1_padding: "same" (the article: a 14x14 grid for MNIST) or "valid"
        (12x12, then 5x5 and 3x3 capsule grids, as YuxianMeng's and yl-1993's
        PyTorch implementations of the small network).

    Returns:
      a `keras.Model` mapping images `(N, H, W, channels)` to
      `(poses (N, E, 4, 4), activations (N, E))`.

    Example:
    >>> model = capsules_net()
    >>> [tuple(t.shape) for t in model.outputs]
    [(None, 10, 4, 4), (None, 10)]
    """
    input_shape = tuple(input_shape)
    if len(input_shape) != 3 or not all(isinstance(d, int) and d > 0 for d in input_shape):
        raise ValueError(
            f"input_shape must be (height, width, channels) of positive ints, got {input_shape}")
    for arg, value in (("num_classes", num_classes), ("A", A), ("B", B), ("C", C), ("D", D)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{arg} must be a positive int, got {value!r}")
    height, width = input_shape[:2]
    if conv1_padding not in CONV1_PADDINGS:
        raise ValueError(f"conv1_padding must be one of {', '.join(CONV1_PADDINGS)}, "
                         f"got {conv1_padding!r}")
    # Grid sizes through the network: SAME (or VALID) 5/2, 1x1, VALID 3/2, VALID 3/1.
    if conv1_padding == "same":
        g1 = (-(-height // 2), -(-width // 2))
    else:
        g1 = ((height - 5) // 2 + 1, (width - 5) // 2 + 1)
    g2 = tuple((g - 3) // 2 + 1 for g in g1)
    g3 = tuple(g - 2 for g in g2)
    if min(g3) < 1:
        raise ValueError(
            f"input_shape {input_shape} is too small for the network: the grids would be "
            f"{g1[0]}x{g1[1]} -> {g2[0]}x{g2[1]} -> {g3[0]}x{g3[1]}; the input needs at "
            f"least {13 if conv1_padding == 'same' else 15} rows and columns")

    if not (isinstance(transform_stddev, (int, float)) and transform_stddev > 0):
        raise ValueError(f"transform_stddev must be a number > 0, got {transform_stddev!r}")
    routing_args = dict(iterations=iterations, stable=stable, routing=routing,
                        final_lambda=final_lambda, variance_floor=variance_floor,
                        assignment_gradient=assignment_gradient,
                        inverse_temperature=inverse_temperature, routing_cost=routing_cost,
                        transform_initializer=keras.initializers.TruncatedNormal(
                            mean=0.0, stddev=float(transform_stddev)))
    inputs = keras.Input(shape=input_shape, name="images")
    if not isinstance(conv1_batch_norm, bool):
        raise ValueError(f"conv1_batch_norm must be True or False, got {conv1_batch_norm!r}")
    if conv1_batch_norm:
        x = keras.layers.Conv2D(A, 5, strides=2, padding=conv1_padding, use_bias=False,
                                name="relu_conv1")(inputs)  # (N, H/2, W/2, A)
        x = keras.layers.BatchNormalization(name="conv1_batch_norm")(x)  # (N, H/2, W/2, A)
        x = keras.layers.ReLU(name="conv1_relu")(x)  # (N, H/2, W/2, A)
    else:
        x = keras.layers.Conv2D(A, 5, strides=2, padding=conv1_padding, activation="relu",
                                name="relu_conv1")(inputs)  # (N, H/2, W/2, A)
    caps = caps_layers.PrimaryCaps(B, name="primary_caps")(x)  # (N, 14, 14, B, 4, 4)
    caps = caps_layers.ConvCaps(C, kernel_size=3, strides=2, name="conv_caps1",
                                **routing_args)(list(caps))  # (N, 6, 6, C, 4, 4)
    caps = caps_layers.ConvCaps(D, kernel_size=3, strides=1, name="conv_caps2",
                                **routing_args)(list(caps))  # (N, 4, 4, D, 4, 4)
    poses, activations = caps_layers.ClassCaps(
        num_classes, name="class_capsules", **routing_args)(list(caps))  # (N, E, 4, 4), (N, E)
    return keras.Model(inputs, [poses, activations], name=name)


def conv_article_variables(layer):
    """TF1 names of a `keras.layers.Conv2D` built like slim.conv2d."""
    return {"weights": layer.kernel, "biases": layer.bias}


def article_variables(model, scope="capsules_em"):
    """Maps the article's TF1 variable names to the model's variables.

    Args:
      model: a model from `capsules_net`.
      scope: the TF1 scope of the network (`capsules_em` in the article's train.py).

    Returns:
      a dict `{"capsules_em/conv_caps1/votes/w": variable, ...}` in the
      article's creation order.
    """
    prefix = f"{scope}/" if scope else ""
    names = {}
    for layer_name in LAYER_NAMES:
        layer = model.get_layer(layer_name)
        if isinstance(layer, keras.layers.Conv2D):
            local = conv_article_variables(layer)
        else:
            local = layer.article_variables()
        for suffix, var in local.items():
            names[f"{prefix}{layer_name}/{suffix}"] = var
    return names


def inverse_temperature_weights(model):
    """The `inverse_temperature` weights of a model's capsule layers (empty without).

    Training assigns them the value of the inverse temperature ramp before
    every step (`capsem.step.TrainStep`, `--lambda_schedule=ramp`).
    """
    return [layer.inverse_temperature for layer in model.layers
            if getattr(layer, "inverse_temperature", None) is not None]
