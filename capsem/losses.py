"""The spread loss and the article's margin schedule (article: `nets.spread_loss`)."""

import tensorflow as tf

#: Margins of the article's schedule: 0.2, 0.3, ..., 0.9 (as float32, like TF1's constants).
MARGINS = tuple(x / 10.0 for x in range(2, 10))


def margin_schedule(step, iterations_per_epoch):
    """The article's spread-loss margin at a global step.

    `tf.train.piecewise_constant(step, boundaries=[ipe*1, ..., ipe*7],
    values=[0.2, ..., 0.9])`: a step equal to a boundary still takes the
    value on the left, so with ipe = 10 steps 0-10 use 0.2, 11-20 use 0.3,
    ..., 61-70 use 0.8 and steps from 71 on use 0.9.

    Args:
      step: global step (int or integer tensor; the article casts it to int32).
      iterations_per_epoch: steps per epoch (the article: num_samples // batch_size).

    Returns:
      the margin, a float32 scalar tensor.
    """
    if isinstance(iterations_per_epoch, bool) or not isinstance(iterations_per_epoch, int) \
            or iterations_per_epoch < 1:
        raise ValueError(
            f"iterations_per_epoch must be a positive int, got {iterations_per_epoch!r}")
    step = tf.cast(step, tf.int64)
    boundaries = tf.constant([iterations_per_epoch * x for x in range(1, 8)], tf.int64)
    index = tf.reduce_sum(tf.cast(step > boundaries, tf.int32))  # boundaries passed
    return tf.gather(tf.constant(MARGINS, tf.float32), index)


#: Margin schedules: the article's steps, or the paper's linear ramp.
MARGIN_SCHEDULES = ("article", "linear")


def linear_margin_schedule(step, ramp_steps):
    """The paper's margin: from 0.2 at step 0 linearly to 0.9 at `ramp_steps`, then 0.9.

    The paper, on the spread loss: "starting from a small margin of 0.2 and linearly
    increasing it during training to 0.9" (the length of the ramp is not
    given: a setting, `margin_ramp_epochs` in `capsem.recipes`).

    Args:
      step: global step (int or integer tensor).
      ramp_steps: steps of the ramp (int >= 1).

    Returns:
      the margin, a float32 scalar tensor.
    """
    if isinstance(ramp_steps, bool) or not isinstance(ramp_steps, int) or ramp_steps < 1:
        raise ValueError(f"ramp_steps must be a positive int, got {ramp_steps!r}")
    frac = tf.minimum(tf.cast(step, tf.float32) / float(ramp_steps), 1.0)
    return tf.constant(MARGINS[0], tf.float32) + frac * (MARGINS[-1] - MARGINS[0])


def make_margin_schedule(kind, iterations_per_epoch, ramp_steps=None):
    """The margin schedule `step -> margin` of a kind of `MARGIN_SCHEDULES`.

    "article": `margin_schedule(step, iterations_per_epoch)`; "linear":
    `linear_margin_schedule(step, ramp_steps)`.
    """
    if kind == "article":
        if isinstance(iterations_per_epoch, bool) or not isinstance(iterations_per_epoch, int) \
                or iterations_per_epoch < 1:
            raise ValueError(f"iterations_per_epoch must be a positive int, "
                             f"got {iterations_per_epoch!r}")
        return lambda step: margin_schedule(step, iterations_per_epoch)
    if kind == "linear":
        if isinstance(ramp_steps, bool) or not isinstance(ramp_steps, int) or ramp_steps < 1:
            raise ValueError(f"ramp_steps must be a positive int, got {ramp_steps!r}")
        return lambda step: linear_margin_schedule(step, ramp_steps)
    raise ValueError(f"margin schedule must be one of {MARGIN_SCHEDULES}, got {kind!r}")


def spread_loss(labels_onehot, activations, margin):
    """The spread loss, summed over the batch as in the article.

    `loss = sum_n sum_{i != t_n} max(0, m - (a_{n,t} - a_{n,i}))^2`.

    Args:
      labels_onehot: `(N, E)` one-hot labels (exactly one 1 per row).
      activations: `(N, E)` class capsule activations.
      margin: the margin m (scalar), e.g. from `margin_schedule`.

    Returns:
      the loss, a float32 scalar tensor.
    """
    activations = tf.convert_to_tensor(activations)
    labels_onehot = tf.cast(labels_onehot, activations.dtype)
    if activations.shape.rank != 2 or labels_onehot.shape.rank != 2:
        raise ValueError(
            f"spread_loss expects labels_onehot and activations of shape (N, classes), "
            f"got {labels_onehot.shape} and {activations.shape}")
    if not labels_onehot.shape.is_compatible_with(activations.shape):
        raise ValueError(
            f"spread_loss: labels_onehot {labels_onehot.shape} and activations "
            f"{activations.shape} must have the same shape")
    margin = tf.cast(margin, activations.dtype)
    a_t = tf.reduce_sum(labels_onehot * activations, axis=-1, keepdims=True)  # (N, 1)
    gap = tf.nn.relu(margin - (a_t - activations)) * (1.0 - labels_onehot)  # (N, E)
    return tf.reduce_sum(tf.square(gap))


def spread_loss_from_labels(labels, activations, margin):
    """`spread_loss` with integer labels `(N,)` instead of one-hot ones."""
    activations = tf.convert_to_tensor(activations)
    onehot = tf.one_hot(tf.cast(labels, tf.int32), tf.shape(activations)[-1],
                        dtype=activations.dtype)
    return spread_loss(onehot, activations, margin)
