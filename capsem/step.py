"""The training step of the article's train.py, as one compiled TensorFlow function.

One step = forward pass, spread loss with the article's margin schedule, the
gradient through all EM iterations, per-variable gradient clipping (tf-slim's
`clip_gradient_norm`, i.e. `tf.clip_by_norm` on each gradient separately) and
an Adam update with TF1's epsilon 1e-8.

Because the spread loss is a sum over the batch and no layer mixes examples,
the batch can be processed in micro-batches whose gradients are summed: the
result is the same gradient (up to float rounding) with a fraction of the
memory. A step whose loss or gradients are not finite is not applied: the
weights and the optimizer state stay as they were, and the step is counted.

Compilation: by default the step is a tf.function whose EM routing runs in
the native CPU kernels of `capsem.native` (`routing_kernels="native"`, one
op per layer and its gradient op, compiled with the machine's C++ compiler
on first use), while TensorFlow runs the rest (convolutions, loss,
optimizer). `routing_kernels="xla"` routes in blocks of XLA-compiled kernels
instead (see `capsem.ops`; also the fallback where the native kernels cannot
be built). `jit_compile="whole"` compiles the whole step into one XLA
program (no native kernels: XLA cannot compile them), which was the slowest
and largest setting; `docs/performance.md` has the measurements.
"""

import keras
import tensorflow as tf

from capsem import losses, native, nets, ops, paper_routing
from capsem.errors import ConfigError

#: TF1 `tf.train.AdamOptimizer`'s default epsilon (Keras' default is 1e-7).
TF1_ADAM_EPSILON = 1e-8


#: Variables that weight decay leaves alone (a regular expression searched in
#: each variable's name): biases, the routing's beta_v / beta_a and batch
#: normalisation's scale, offset and statistics. The decayed ones are the
#: weights that multiply an input: convolution kernels, PrimaryCaps' 1x1
#: kernels and the capsule layers' transformation matrices.
NOT_DECAYED = ("bias", "beta", "gamma", "moving_")


def make_optimizer(learning_rate=1e-3, epsilon=TF1_ADAM_EPSILON, weight_decay=0.0):
    """The article's optimizer: Adam, lr 1e-3, beta1 0.9, beta2 0.999, epsilon 1e-8.

    Args:
      learning_rate: a float or a `keras.optimizers.schedules.LearningRateSchedule`.
      epsilon: Adam's epsilon.
      weight_decay: decoupled weight decay (AdamW; Loshchilov & Hutter, "Decoupled
        Weight Decay Regularization", ICLR 2019), Keras' `weight_decay`: each step
        multiplies the weights that `NOT_DECAYED` does not name by
        `1 - weight_decay * learning_rate`. 0 (the article, the paper, the
        default): no decay, and not even the multiplication by 1.

    Raises:
      ConfigError: `weight_decay` is negative or not finite.
    """
    if not 0 <= weight_decay < float("inf"):
        raise ConfigError(f"weight_decay must be a finite number >= 0 (0: none), got "
                          f"{weight_decay!r}")
    optimizer = keras.optimizers.Adam(learning_rate=learning_rate, beta_1=0.9, beta_2=0.999,
                                      epsilon=epsilon, weight_decay=weight_decay or None)
    if weight_decay:
        optimizer.exclude_from_weight_decay(var_names=list(NOT_DECAYED))
    return optimizer


class WeightAverage:
    """An exponential moving average of a model's weights (Polyak averaging).

    `averaged` is a second instance of the network (built with the same
    settings); after each applied step, `update` sets its trainable weights to
    `momentum * average + (1 - momentum) * weight` and copies the others (the
    inverse temperatures of `--lambda_schedule=ramp`, batch normalisation's
    statistics) as they are. Skipped steps leave it alone. Polyak & Juditsky
    (1992); Keras' `use_ema` does the same inside the optimizer, where it cannot
    be checkpointed apart from the optimizer's other variables.

    With `updates` (a counter of the applied steps, e.g. the optimizer's
    `iterations`, already counting the step being averaged) the n-th update
    uses the momentum `min(momentum, (1 + n) / (10 + n))`, the warm-up of
    `tf.compat.v1.train.ExponentialMovingAverage(num_updates=...)`. Early in a
    run the average then weighs the n steps taken so far about as `s^8` (the
    last tenth of them 61%, the last 30% 96%), where a fixed momentum of 0.999
    still holds the random initial weights at 15% after 1,875 steps
    (docs/results.md 3.16-3.17). The fixed momentum takes over after
    `(10 m - 1) / (1 - m)` steps (8,991 for 0.999).

    Args:
      model: the trained network.
      averaged: a network built as `model` (same variables, in the same order).
      momentum: in [0, 1); the horizon is about `1 / (1 - momentum)` steps.
      updates: None (a fixed momentum), or an integer variable counting the
        applied steps, read at each update (the warm-up above).

    Raises:
      ValueError: a momentum outside [0, 1), or networks whose variables differ.
    """

    def __init__(self, model, averaged, momentum, updates=None):
        if not 0 <= momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {momentum!r}")
        pairs = list(zip(model.weights, averaged.weights))
        if len(model.weights) != len(averaged.weights) or any(
                a.shape != b.shape or a.trainable != b.trainable for a, b in pairs):
            raise ValueError("the averaged network must be built as the trained one (the same "
                             "variables in the same order)")
        self.model = model
        self.averaged = averaged
        self.momentum = float(momentum)
        self.updates = updates
        self._pairs = pairs

    def copy_from_model(self):
        """Starts the average at the model's current weights (a new run)."""
        for weight, average in self._pairs:
            average.assign(weight.value)

    def update(self):
        """One step of the average (tensor ops: runs inside the compiled step)."""
        m = self.momentum
        if self.updates is not None:
            n = tf.cast(tf.convert_to_tensor(self.updates), tf.float32)
            m = tf.minimum(m, (1.0 + n) / (10.0 + n))
        for weight, average in self._pairs:
            if weight.trainable:
                average.assign(m * average.value + (1.0 - m) * weight.value)
            else:
                average.assign(weight.value)


#: The gradient micro-batch size used with the paper's routing by default where
#: it runs in the XLA kernels: there its votes are materialised
#: (capsem.paper_routing.route), and one example at a time they stay in the CPU
#: caches (2.1x faster than batch 24 on 2 cores, docs/results.md). The native
#: kernels form the votes per routing problem and take the whole batch.
PAPER_MICRO_BATCH_SIZE = 1


def default_micro_batch_size(routing, jit_compile=True, routing_kernels="auto", strategy=None):
    """The default gradient micro-batch size for a routing mode (None: the whole batch).

    `PAPER_MICRO_BATCH_SIZE` for the paper's routing unless it runs in the
    native kernels (`jit_compile`, `routing_kernels` and `strategy` as in
    `TrainStep`).
    """
    if routing != "paper":
        return None
    kernels = resolve_routing_kernels(routing_kernels, compute_devices(strategy))
    if requests_native_kernels(jit_compile, kernels) and native.available():
        return None
    return PAPER_MICRO_BATCH_SIZE


def clip_per_variable(grads, clip_norm):
    """Clips each gradient to L2 norm `clip_norm` separately (tf-slim `clip_gradient_norms`)."""
    if clip_norm is None or clip_norm <= 0:
        return list(grads)
    return [tf.clip_by_norm(g, clip_norm) for g in grads]


class TrainStep:
    """A compiled training step of the article's network.

    Args:
      model: the network (`capsem.nets.capsules_net`), outputs `(poses, activations)`.
      optimizer: a Keras optimizer (see `make_optimizer`); it is built here.
      iterations_per_epoch: steps per epoch of the margin schedule (the
        article: `num_samples // batch_size`).
      clip_norm: per-variable gradient clipping norm (the article: 4.0); 0 or
        None disables clipping.
      micro_batch_size: split each batch into chunks of at most this many
        examples and sum their gradients (same result, less memory); None
        processes the whole batch at once.
      jit_compile: True (default): a TensorFlow graph whose EM routing runs
        in the kernels `routing_kernels` names; "whole": compile the whole
        step into one XLA program (plain TensorFlow ops for the routing);
        False: no XLA (the native kernels, else plain TensorFlow ops).
      routing_kernels: "auto" (default): "native" where every device of the
        step is a CPU, else "xla" (`resolve_routing_kernels`); "native": EM
        routing in the native CPU ops of `capsem.native`, falling back to the
        XLA kernels (with a warning) where they cannot be built; "xla": the
        blocked XLA kernels of `capsem.ops`, which run on any device. The
        numbers agree to float32 rounding.
      global_step: an int64 `tf.Variable` counting attempted steps (the
        article's `global_step`, which drives the margin); created if None.
      margin_fn: the margin schedule, `step -> margin` (see
        `capsem.losses.make_margin_schedule`); None: the article's schedule
        with `iterations_per_epoch`.
      strategy: None (one device, the default), or a `tf.distribute.Strategy`
        (`MirroredStrategy`, `MultiWorkerMirroredStrategy`) whose scope
        created the model's variables, the optimizer and `global_step`; the
        step is then built in that scope (the optimizer's variables). Each call
        takes the GLOBAL batch: replica r of R gets examples
        `[r * N // R, (r + 1) * N // R)` of it (every process of a
        multi-worker run passes the same global batch), the summed losses and
        gradients are all-reduced over the replicas, then clipped and applied
        once, and `global_step` counts global steps. Call the step outside
        the strategy's scope.
      loss_fn: the loss `(labels (N,), activations (N, E), margin) -> scalar`,
        summed over the examples (micro-batches are summed); None (default):
        the article's spread loss, `capsem.losses.spread_loss_from_labels`.
        The baseline CNN (`capsem.baseline`) trains with
        `capsem.baseline.cross_entropy_loss` on its logits.
      inverse_temperature_fn: None, or `global step (int) -> float`: before
        each call runs, the model's `inverse_temperature` weights
        (`capsem.nets.inverse_temperature_weights`) are assigned its value at
        the step about to run (`--lambda_schedule=ramp`), so the value follows
        `global_step` through resumes.
      weight_average: None, or a `WeightAverage` of `model`, updated after
        each applied step (not with a strategy).

    Calling the step with `(images (N, H, W, C) float32, labels (N,) int)`
    returns a dict of scalar tensors: `loss` (summed over the batch, the
    article's loss), `margin`, `correct` (number of correct predictions),
    `grad_norm` (global norm before clipping) and `finite` (False if the step
    was skipped because the loss or a gradient was NaN or infinite). With a
    strategy, the call also takes `signals`, a float vector that is summed over
    all replicas with the step's sums and returned as `signals` (the trainer's
    stop and save requests, so that every worker acts on them at the same
    step).
    """

    def __init__(self, model, optimizer, iterations_per_epoch, clip_norm=4.0,
                 micro_batch_size=None, jit_compile=True, global_step=None,
                 routing_kernels="auto", margin_fn=None, strategy=None, loss_fn=None,
                 inverse_temperature_fn=None, weight_average=None):
        if micro_batch_size is not None and (not isinstance(micro_batch_size, int)
                                             or micro_batch_size < 1):
            raise ValueError(f"micro_batch_size must be a positive int or None, "
                             f"got {micro_batch_size!r}")
        self.model = model
        self.optimizer = optimizer
        self.iterations_per_epoch = int(iterations_per_epoch)
        self.margin_fn = margin_fn or losses.make_margin_schedule(
            "article", self.iterations_per_epoch)
        self.loss_fn = loss_fn or losses.spread_loss_from_labels
        self.inverse_temperature_fn = inverse_temperature_fn
        if weight_average is not None and (strategy is not None
                                           or weight_average.model is not model):
            raise ValueError("weight_average must average this step's model, without a "
                             "strategy")
        self.weight_average = weight_average
        self.inverse_temperatures = nets.inverse_temperature_weights(model)
        if inverse_temperature_fn is not None and not self.inverse_temperatures:
            raise ValueError("inverse_temperature_fn needs a model with inverse_temperature "
                             "weights (capsules_net(..., inverse_temperature=...))")
        self.clip_norm = clip_norm
        self.micro_batch_size = micro_batch_size
        self.jit_compile = jit_compile
        self.routing_kernels = resolve_routing_kernels(routing_kernels, compute_devices(strategy))
        routing_kernels = self.routing_kernels
        self.global_step = global_step if global_step is not None else tf.Variable(
            0, dtype=tf.int64, trainable=False, name="global_step")
        self.variables = list(model.trainable_variables)
        self.strategy = strategy
        if strategy is None:
            optimizer.build(self.variables)
            self._step = _compile(self._train_step, jit_compile, routing_kernels)
        else:
            with strategy.scope():
                optimizer.build(self.variables)
            self._step = _compile(self._distributed_train_step, jit_compile, routing_kernels)
        self._grads = _compile(self._loss_and_grads, jit_compile, routing_kernels)

    def _chunks(self, images, labels):
        size = images.shape[0]
        if size is None or self.micro_batch_size is None or size <= self.micro_batch_size:
            return [(images, labels)]
        return [(images[s:s + self.micro_batch_size], labels[s:s + self.micro_batch_size])
                for s in range(0, size, self.micro_batch_size)]

    def _loss_and_grads(self, images, labels, margin):
        """Loss, correct count and gradients of the summed loss over micro-batches."""
        total_loss = tf.constant(0.0)
        correct = tf.constant(0, tf.int32)
        grads = None
        for x, y in self._chunks(images, labels):
            with tf.GradientTape() as tape:
                _, activations = self.model(x, training=True)
                loss = self.loss_fn(y, activations, margin)
                loss = _nan_unless_finite(loss, [x, activations])
            chunk_grads = tape.gradient(loss, self.variables)
            grads = chunk_grads if grads is None else [a + b for a, b in zip(grads, chunk_grads)]
            total_loss += loss
            pred = tf.argmax(activations, axis=-1, output_type=tf.int32)
            correct += tf.reduce_sum(tf.cast(tf.equal(pred, tf.cast(y, tf.int32)), tf.int32))
        return total_loss, correct, grads

    def _apply(self, loss, correct, grads, margin):
        """The update of one step from its summed loss and gradients: skipped (the
        variables untouched) unless all are finite, else each gradient clipped
        separately, then Adam; the global step counts either way."""
        finite = tf.math.is_finite(loss)
        for g in grads:
            finite = tf.logical_and(finite, tf.reduce_all(tf.math.is_finite(g)))
        grad_norm = tf.linalg.global_norm(grads)

        def apply():
            self.optimizer.apply(clip_per_variable(grads, self.clip_norm), self.variables)
            if self.weight_average is not None:
                self.weight_average.update()
            return tf.constant(True)

        tf.cond(finite, apply, lambda: tf.constant(False))
        self.global_step.assign_add(1)
        return {"loss": loss, "margin": margin, "correct": correct,
                "grad_norm": grad_norm, "finite": finite}

    def _train_step(self, images, labels):
        margin = self.margin_fn(self.global_step)
        loss, correct, grads = self._loss_and_grads(images, labels, margin)
        return self._apply(loss, correct, grads, margin)

    def _distributed_train_step(self, images, labels, signals):
        """`_train_step` over the replicas of `self.strategy` (images, labels: PerReplica).

        Runs outside the strategy's scope: the reduction, the clipping and the
        update run in the default context on the summed gradients (Keras'
        optimizer then updates every copy of the mirrored variables, and its own
        all-reduce is a no-op there); the replica function does the sums.
        """
        strategy = self.strategy
        margin = self.margin_fn(self.global_step)

        def replica_step(x, y, margin, signals):
            loss, correct, grads = self._loss_and_grads(x, y, margin)
            # (tf.identity places the replica's copy of `signals` on its device.)
            sums = [loss, tf.cast(correct, tf.float32), tf.identity(signals)] + list(grads)
            return tf.distribute.get_replica_context().all_reduce(
                tf.distribute.ReduceOp.SUM, sums)

        sums = strategy.run(replica_step, args=(images, labels, margin, signals))
        # Every replica holds the same sums after the all-reduce: take this process's first.
        loss, correct, signals, *grads = [strategy.experimental_local_results(v)[0]
                                          for v in sums]
        correct = tf.cast(tf.round(correct), tf.int32)
        return {**self._apply(loss, correct, grads, margin), "signals": signals}

    def distribute_batch(self, images, labels):
        """The global batch `(images, labels)` as PerReplica values: replica r's slice.

        Replica r of R (its id in the sync group, over all workers) gets
        examples `[r * N // R, (r + 1) * N // R)` of the N in the batch, so the
        replicas together see the global batch once, in its order.
        """
        images = tf.convert_to_tensor(images, tf.float32)
        labels = tf.convert_to_tensor(labels)
        size = int(images.shape[0])
        replicas = self.strategy.num_replicas_in_sync
        bounds = [r * size // replicas for r in range(replicas + 1)]

        def replica_slice(context):
            r = context.replica_id_in_sync_group
            return images[bounds[r]:bounds[r + 1]], labels[bounds[r]:bounds[r + 1]]

        return self.strategy.experimental_distribute_values_from_function(replica_slice)

    def __call__(self, images, labels, signals=None):
        if self.inverse_temperature_fn is not None:
            value = float(self.inverse_temperature_fn(int(self.global_step.numpy())))
            for weight in self.inverse_temperatures:
                weight.assign(value)
        if self.strategy is None:
            return self._step(tf.convert_to_tensor(images, tf.float32),
                              tf.convert_to_tensor(labels))
        per_replica_images, per_replica_labels = self.distribute_batch(images, labels)
        signals = tf.zeros([1], tf.float32) if signals is None else tf.convert_to_tensor(
            signals, tf.float32)
        return self._step(per_replica_images, per_replica_labels, signals)

    def loss_and_grads(self, images, labels, margin):
        """The loss and raw (unclipped) gradients, without updating anything."""
        return self._grads(tf.convert_to_tensor(images, tf.float32),
                           tf.convert_to_tensor(labels), tf.constant(margin, tf.float32))


def _nan_unless_finite(loss, tensors):
    """The loss, or NaN if any of `tensors` holds a NaN or an infinity.

    In the article's graph a NaN in the images or the activations makes the
    loss NaN. In a TensorFlow graph on CPU, oneDNN's (fused) ReLU maps NaN to
    0, in relu_conv1 and in the spread loss, so a bad input could otherwise
    give a finite loss; the step is then skipped as the article's would fail.
    """
    finite = tf.reduce_all([tf.reduce_all(tf.math.is_finite(t)) for t in tensors])
    return tf.where(finite, loss, tf.constant(float("nan"), loss.dtype))


def make_eval_step(model, jit_compile=True, routing_kernels="auto", strategy=None):
    """A compiled inference function: images -> (poses, activations).

    `jit_compile` and `routing_kernels` as in `TrainStep`; `strategy` only
    decides the devices that "auto" looks at (the function itself runs
    where it is called).
    """
    kernels = resolve_routing_kernels(routing_kernels, compute_devices(strategy))
    return _compile(lambda images: model(images, training=False), jit_compile, kernels)


ROUTING_KERNELS = ("auto", "native", "xla")


def compute_devices(strategy=None):
    """The names of the devices that run a step's computation.

    With a `tf.distribute.Strategy`, its replicas' devices
    (`strategy.extended.worker_devices`); without one, the device where
    TensorFlow places operations by default: the first GPU if there is one,
    else the CPU.
    """
    if strategy is not None:
        return list(strategy.extended.worker_devices)
    gpus = tf.config.list_logical_devices("GPU")
    return [gpus[0].name] if gpus else [tf.config.list_logical_devices("CPU")[0].name]


def resolve_routing_kernels(routing_kernels, devices):
    """The routing kernels ("native" or "xla") that a step on `devices` compiles.

    The native kernels of `capsem.native` are CPU ops only: on a GPU (or any
    other accelerator) TensorFlow would either fail to place them or, with
    soft placement, run them on the host and copy every layer's poses and
    gradients across. "auto" therefore picks the native kernels where every
    device is a CPU and the XLA kernels (compiled for the device) otherwise.

    Args:
      routing_kernels: "auto", "native" or "xla".
      devices: device names (`"/job:worker/replica:0/task:1/device:GPU:0"`,
        `"/device:CPU:0"`, ...), e.g. `compute_devices(strategy)`.

    Returns:
      "native" or "xla".

    Raises:
      ConfigError: an unknown value, or "native" asked for non-CPU devices.
    """
    if routing_kernels not in ROUTING_KERNELS:
        raise ConfigError(f"routing_kernels must be one of {', '.join(ROUTING_KERNELS)}, "
                          f"got {routing_kernels!r}")
    others = sorted(d for d in devices if tf.DeviceSpec.from_string(d).device_type != "CPU")
    if routing_kernels == "auto":
        return "xla" if others else "native"
    if routing_kernels == "native" and others:
        raise ConfigError(f"routing_kernels=native: the native routing kernels run on CPUs only, "
                          f"and this step runs on {', '.join(others)}; use routing_kernels=auto "
                          f"or xla (the XLA kernels run on any device)")
    return routing_kernels


def requests_native_kernels(jit_compile, routing_kernels):
    """Whether a step compiled with these settings routes in the native kernels.

    They run where they also build (`capsem.native.available()`); a function
    compiled as a whole by XLA cannot contain them.
    """
    return routing_kernels == "native" and jit_compile != "whole"


def _compile(fn, jit_compile, routing_kernels):
    """`fn` as a tf.function compiled as `jit_compile` and `routing_kernels` say."""
    if jit_compile not in (True, False, "whole"):
        raise ValueError(f'jit_compile must be True, False or "whole", got {jit_compile!r}')
    if routing_kernels not in ("native", "xla"):  # resolved by resolve_routing_kernels
        raise ValueError(f'routing_kernels must be "native" or "xla", got {routing_kernels!r}')
    native = requests_native_kernels(jit_compile, routing_kernels)

    def traced(*args):
        with ops.xla_routing_kernels(jit_compile is True), ops.native_routing_kernels(native), \
                paper_routing.compiled(jit_compile is True):
            return fn(*args)

    return tf.function(traced, jit_compile=jit_compile == "whole")


def configure_threads(intra_op_threads=0, inter_op_threads=0):
    """Sets the sizes of TensorFlow's CPU thread pools; call it first.

    The native routing kernels split the routing problems of a layer over
    the intra-op pool, so it should have one thread per core (TensorFlow's
    default, 0). With the XLA routing kernels (`routing_kernels="xla"`),
    whose blocks run concurrently on the inter-op threads, one intra-op
    thread made inference 1.1x to 1.3x faster on 2 cores (docs/performance.md).
    `train.py` and `bench.py` take the sizes as flags (`--intra_op_threads`,
    `--inter_op_threads`).

    TensorFlow fixes its thread pools when it runs its first operation, so
    call this before building a model or creating a tensor.

    Args:
      intra_op_threads: threads of one operation; 0 leaves TensorFlow's
        default (the number of cores).
      inter_op_threads: operations run concurrently; 0 leaves TensorFlow's
        default (the number of cores).

    Raises:
      ValueError: a negative or non-integer count.
      RuntimeError: TensorFlow's thread pools were already created with
        other sizes.
    """
    for name, value in (("intra_op_threads", intra_op_threads),
                        ("inter_op_threads", inter_op_threads)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError(f"{name} must be an integer >= 0 (0: TensorFlow's default), "
                             f"got {value!r}")
    threading = tf.config.threading
    try:
        if intra_op_threads:
            threading.set_intra_op_parallelism_threads(intra_op_threads)
        if inter_op_threads:
            threading.set_inter_op_parallelism_threads(inter_op_threads)
    except RuntimeError as e:
        raise RuntimeError(
            f"configure_threads(intra_op_threads={intra_op_threads}, inter_op_threads="
            f"{inter_op_threads}) must be called before TensorFlow runs its first operation "
            f"(it is fixed at intra-op {threading.get_intra_op_parallelism_threads()}, "
            f"inter-op {threading.get_inter_op_parallelism_threads()} now)") from e


def onednn_enabled():
    """Whether TensorFlow runs its oneDNN CPU kernels (None if it cannot tell).

    TensorFlow decides when it is imported, from `TF_ENABLE_ONEDNN_OPTS`
    (on by default on x86). oneDNN's kernels (the convolutions here) are not
    guaranteed to be run-to-run deterministic: their order of summation
    depends on the number of threads a call gets, which can change from run
    to run (the intra-op pool's size, but one thread when called from a
    thread of that pool), and some of their implementations use atomics
    unless oneDNN's "deterministic" primitive attribute is set, which
    TensorFlow does not do. `tf.config.experimental.enable_op_determinism()`
    does not cover them. TensorFlow's own (Eigen) kernels, used when oneDNN
    is off, are deterministic for given thread-pool sizes; their results
    still depend on those sizes (Eigen's matrix products split long sums over
    the threads), so bit-identical runs need the same thread settings.
    """
    try:
        from tensorflow.python.util import _pywrap_util_port  # pylint: disable=g-direct-tensorflow-import
    except ImportError:
        return None
    try:
        return bool(_pywrap_util_port.IsMklEnabled())
    except Exception:  # pylint: disable=broad-except
        return None
