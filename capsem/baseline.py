"""The paper's baseline CNN (`train.py --model=cnn`) and its loss.

Hinton, Sabour & Frosst, "Matrix capsules with EM routing" (ICLR 2018),
Sec. 5, describe the convolutional baseline they compare the capsules with
(on smallNORB, and in Sec. 6 under adversarial attack):

    "two convolutional layers with 32 and 64 channels respectively. Both
    layers have a kernel size of 5 and a stride of 1 with a 2x2 max pooling.
    The third layer is a 1024 unit fully connected layer with dropout and
    connects to the 5-way softmax output layer. All hidden units use the ReLU
    non-linearity. [...] The CNN baseline achieves 5.2% test error rate on
    smallNORB and has 4.2M parameters."

`cnn_net` builds it for any input shape and number of classes. Two details
the paper leaves open are decided here:

* padding: SAME. With SAME padding the smallNORB network (32x32x1 inputs,
  5 classes) has 4,252,549 parameters, the paper's "4.2M"; with VALID
  padding it would have 1,696,645 (1.7M). `parameter_count` gives the
  formula.
* the dropout rate: 0.5 (not given in the paper; the usual rate for fully
  connected hidden units, Srivastava et al. 2014).

The paper's "softmax output layer" means the network is trained with the
softmax cross-entropy loss (`cross_entropy_loss`), not the capsules' spread
loss; `capsem.training` picks the loss of `TrainConfig.model`.

How the CNN fits the training loop: `capsem.step.TrainStep`,
`capsem.training.run_evaluation` and the attacks of `capsem.attacks` call
`model(images, training=...)` and read `(poses, activations)`, the
predictions being the argmax of the second output. The CNN returns
`(features, logits)`: `features` (N, 1024) are the fully connected layer's
ReLU outputs (before dropout), in the place of the capsule network's class
poses; `logits` (N, classes) are the class scores before the softmax, in the
place of the class capsules' activations. Its loss takes the logits
(`cross_entropy_loss`, numerically stable), and the argmax of the logits is
the argmax of the softmax probabilities.
"""

import keras
import tensorflow as tf

#: Channels of the two convolutional layers (paper Sec. 5: "32 and 64 channels").
CONV_CHANNELS = (32, 64)
#: Their kernel size (paper Sec. 5: "a kernel size of 5 and a stride of 1").
KERNEL_SIZE = 5
#: Units of the fully connected hidden layer (paper Sec. 5: "a 1024 unit fully connected layer").
HIDDEN_UNITS = 1024
#: Dropout rate of the fully connected layer (paper Sec. 5: "with dropout"; the rate is
#: not given: 0.5, the usual rate for fully connected hidden units).
DROPOUT = 0.5

#: Layer names, in order.
LAYER_NAMES = ("conv1", "pool1", "conv2", "pool2", "flatten", "fc1", "dropout", "logits")


def _check_input_shape(input_shape):
    input_shape = tuple(input_shape)
    if len(input_shape) != 3 or not all(
            isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in input_shape):
        raise ValueError(
            f"input_shape must be (height, width, channels) of positive ints, got {input_shape}")
    if min(input_shape[:2]) < 4:
        raise ValueError(f"input_shape {input_shape} is too small for two 2x2 max poolings: "
                         f"the input needs at least 4 rows and columns")
    return input_shape


def parameter_count(num_classes=10, input_shape=(28, 28, 1), channels=CONV_CHANNELS,
                    kernel_size=KERNEL_SIZE, hidden_units=HIDDEN_UNITS):
    """The number of parameters of `cnn_net`, from its layer sizes.

    `k*k*c*32 + 32` (conv1) `+ k*k*32*64 + 64` (conv2) `+ (H//4)*(W//4)*64*1024
    + 1024` (fc1: SAME convolutions keep the size, each 2x2 pooling halves it,
    rounding down) `+ 1024*E + E` (logits).

    Examples (paper Sec. 5: "4.2M parameters" on smallNORB):
    >>> parameter_count(num_classes=5, input_shape=(32, 32, 1))
    4252549
    >>> parameter_count(num_classes=10, input_shape=(28, 28, 1))
    3274634
    """
    height, width, depth = _check_input_shape(input_shape)
    c1, c2 = channels
    k2 = kernel_size * kernel_size
    flat = (height // 2 // 2) * (width // 2 // 2) * c2
    return ((k2 * depth * c1 + c1) + (k2 * c1 * c2 + c2) + (flat * hidden_units + hidden_units)
            + (hidden_units * num_classes + num_classes))


def cnn_net(num_classes=10, input_shape=(28, 28, 1), dropout=DROPOUT, name="baseline_cnn"):
    """Builds the paper's baseline CNN (Sec. 5).

    conv1: 5x5, 32 channels, stride 1, SAME, ReLU -> 2x2 max pooling ->
    conv2: 5x5, 64 channels, stride 1, SAME, ReLU -> 2x2 max pooling ->
    fc1: 1024 units, ReLU -> dropout -> logits: `num_classes` units (the
    softmax is in the loss, `cross_entropy_loss`).

    The input is the preprocessed image, as for `capsem.nets.capsules_net`
    (`capsem.datasets.preprocess_image` for MNIST). Under a Keras
    mixed-precision policy the logits are computed in float32.

    Args:
      num_classes: number of classes (the paper: 5, smallNORB).
      input_shape: `(H, W, channels)` of the input images (smallNORB in the
        paper: 32x32 crops; MNIST: 28x28x1).
      dropout: dropout rate of the fully connected layer (active with
        `training=True` only).
      name: model name.

    Returns:
      a `keras.Model` mapping images `(N, H, W, channels)` to
      `(features (N, 1024), logits (N, num_classes))`.

    Example:
    >>> model = cnn_net()
    >>> [tuple(t.shape) for t in model.outputs], model.count_params()
    ([(None, 1024), (None, 10)], 3274634)
    """
    input_shape = _check_input_shape(input_shape)
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"num_classes must be an int >= 2, got {num_classes!r}")
    if not (isinstance(dropout, (int, float)) and 0 <= dropout < 1):
        raise ValueError(f"dropout must be a rate in [0, 1), got {dropout!r}")
    c1, c2 = CONV_CHANNELS
    inputs = keras.Input(shape=input_shape, name="images")
    x = keras.layers.Conv2D(c1, KERNEL_SIZE, strides=1, padding="same", activation="relu",
                            name="conv1")(inputs)  # (N, H, W, 32)
    x = keras.layers.MaxPooling2D(2, name="pool1")(x)  # (N, H/2, W/2, 32)
    x = keras.layers.Conv2D(c2, KERNEL_SIZE, strides=1, padding="same", activation="relu",
                            name="conv2")(x)  # (N, H/2, W/2, 64)
    x = keras.layers.MaxPooling2D(2, name="pool2")(x)  # (N, H/4, W/4, 64)
    x = keras.layers.Flatten(name="flatten")(x)  # (N, H/4 * W/4 * 64)
    features = keras.layers.Dense(HIDDEN_UNITS, activation="relu", name="fc1")(x)  # (N, 1024)
    x = keras.layers.Dropout(dropout, name="dropout")(features)
    logits = keras.layers.Dense(num_classes, dtype="float32", name="logits")(x)  # (N, E)
    return keras.Model(inputs, [features, logits], name=name)


def cross_entropy_loss(labels, logits, margin=None):
    """The softmax cross-entropy of integer labels, summed over the batch.

    The baseline's loss (paper Sec. 5: a softmax output layer). Summed, not
    averaged, like `capsem.losses.spread_loss`, so that `capsem.step.TrainStep`
    can sum micro-batches and `capsem.training.run_evaluation` sums batches
    the same way for both networks.

    Args:
      labels: `(N,)` integer class labels.
      logits: `(N, E)` class scores before the softmax (the second output of
        `cnn_net`).
      margin: ignored (the spread loss's margin; present so that both losses
        are called alike, `loss(labels, scores, margin)`).

    Returns:
      the loss, a float32 scalar tensor.
    """
    del margin  # the spread loss's; the cross-entropy has none
    logits = tf.cast(tf.convert_to_tensor(logits), tf.float32)
    if logits.shape.rank != 2:
        raise ValueError(f"cross_entropy_loss expects logits of shape (N, classes), "
                         f"got {logits.shape}")
    labels = tf.cast(labels, tf.int32)
    return tf.reduce_sum(tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels,
                                                                        logits=logits))


def write_histograms(model, images):
    """TensorBoard histograms of the CNN (inside a writer's default): what train.py writes
    for the capsule network's routing, for the baseline.

    `cnn/features` and `cnn/logits` of `images` (inference mode), and every
    weight of the network (`cnn/weights/<layer>/<variable>`).
    """
    features, logits = model(images, training=False)
    tf.summary.histogram("cnn/features", features)
    tf.summary.histogram("cnn/logits", logits)
    for layer in model.layers:
        for weight in layer.weights:
            tf.summary.histogram(f"cnn/weights/{layer.name}/{weight.name.split('/')[-1]}",
                                 weight)
