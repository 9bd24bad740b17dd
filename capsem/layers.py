"""Keras 3 layers of matrix capsules with EM routing.

`PrimaryCaps`, `ConvCaps` and `ClassCaps` are the article's `primary_caps`,
`conv_capsule` and `class_capsules`, with the same weight layouts (so that
`capsem.compat.load_article_weights` can put TF1 weights into them) and the
same numbers, but with no batch size, kernel size or grid shape hard-coded.

Capsule tensors are passed between layers as a pair `[poses, activations]`:
poses `(N, H, W, caps, 4, 4)` and activations `(N, H, W, caps)`.

Precision: the layers compute in float32 unless given a `dtype`, also under a
Keras mixed-precision policy ("mixed_float16", "mixed_bfloat16"), which then
applies to a model's other layers only; Keras casts the capsule layers'
inputs to float32. Half precision is too coarse for EM routing: in float16
its epsilon 1e-9 is 0 (so `stable=True` guards nothing), and float16 and
bfloat16 keep 3 or 2 significant digits of its sums over hundreds of votes.
`ConvCaps` and `ClassCaps` therefore reject a float16 or bfloat16 `dtype`.

Reference: G. E. Hinton, S. Sabour, N. Frosst, "Matrix capsules with EM
routing", ICLR 2018.
"""

import keras
import tensorflow as tf

from capsem import ops, paper_routing

_PACKAGE = "capsem"

#: EM routing modes: the article's code (`capsem.ops.em_routing`) or the
#: paper's procedure (`capsem.paper_routing.em_routing_paper`).
ROUTING_MODES = ops.ROUTING_MODES

#: Compute dtypes the routing layers accept (see the module docstring).
ROUTING_DTYPES = ("float32", "float64")


def _float32_by_default(kwargs):
    """Layer `kwargs` with `dtype="float32"` unless the caller gave a dtype.

    Without a dtype a Keras layer takes the global dtype policy, so under a
    mixed-precision policy it would compute in float16 or bfloat16. With a
    float32 policy Keras casts the layer's floating-point inputs to float32.
    """
    if kwargs.get("dtype") is None:
        kwargs = dict(kwargs, dtype="float32")
    return kwargs


def _check_routing_dtype(layer):
    compute_dtype = layer.dtype_policy.compute_dtype
    if compute_dtype not in ROUTING_DTYPES:
        raise ValueError(
            f"{layer.__class__.__name__} '{layer.name}': EM routing needs a compute dtype in "
            f"{ROUTING_DTYPES}, got dtype {layer.dtype_policy.name!r} (compute dtype "
            f"{compute_dtype}, too coarse for its epsilon and sums); leave dtype unset to "
            f"route in float32 under a mixed-precision policy")


def _transform_initializer():
    # The article: tf.truncated_normal_initializer(stddev=1.0).
    return keras.initializers.TruncatedNormal(mean=0.0, stddev=1.0)


def _check_positive_int(value, name):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def _check_capsule_input(layer, input_shape):
    """Validates `[poses_shape, activations_shape]` and returns (H, W, I)."""
    try:
        pose_shape, act_shape = input_shape
        pose_shape, act_shape = tuple(pose_shape), tuple(act_shape)
    except (TypeError, ValueError):
        raise ValueError(
            f"{layer.__class__.__name__} '{layer.name}' expects a pair [poses "
            f"(N, H, W, caps, 4, 4), activations (N, H, W, caps)], got input "
            f"shape {input_shape}") from None
    if len(pose_shape) != 6 or pose_shape[-2:] != (4, 4):
        raise ValueError(
            f"{layer.__class__.__name__} '{layer.name}': poses must be "
            f"(N, H, W, caps, 4, 4), got shape {pose_shape}")
    if len(act_shape) != 4 or act_shape[1:] != pose_shape[1:4]:
        raise ValueError(
            f"{layer.__class__.__name__} '{layer.name}': activations must be "
            f"(N, H, W, caps) = (N, {pose_shape[1]}, {pose_shape[2]}, "
            f"{pose_shape[3]}) to match the poses {pose_shape}, got shape {act_shape}")
    if pose_shape[3] is None:
        raise ValueError(
            f"{layer.__class__.__name__} '{layer.name}': the number of input "
            f"capsule types must be known, got poses shape {pose_shape}")
    return pose_shape[1], pose_shape[2], pose_shape[3]


@keras.saving.register_keras_serializable(package=_PACKAGE)
class PrimaryCaps(keras.layers.Layer):
    """Primary capsules: a convolution to 4x4 poses and a sigmoid activation per capsule.

    Article: `primary_caps`. Two convolutions of the input feature map: one
    with `16 * capsules` channels for the poses (channel `16*cap + 4*row +
    col`) and one with `capsules` channels followed by a sigmoid for the
    activations. Both have biases.

    Args:
      capsules: number of capsule types B.
      kernel_size: convolution kernel size (the article uses 1).
      strides: convolution stride (the article uses 1).
      padding: "valid" (the article) or "same".
      kernel_initializer: initializer of both convolution kernels
        (slim.conv2d's default, Glorot uniform).
      bias_initializer: initializer of both biases (zeros).
      **kwargs: base `keras.layers.Layer` arguments (e.g. `name`). Without a
        `dtype` the layer computes in float32 whatever the global dtype
        policy: its activations feed EM routing's divisions, and in float16
        a sigmoid below 6e-8 is 0.

    Input shape:
      `(N, H, W, A)` feature maps.

    Output shape:
      `[(N, OH, OW, capsules, 4, 4), (N, OH, OW, capsules)]`.

    Example:
    >>> layer = PrimaryCaps(capsules=8)
    >>> poses, activations = layer(tf.zeros((2, 14, 14, 32)))
    >>> poses.shape, activations.shape
    (TensorShape([2, 14, 14, 8, 4, 4]), TensorShape([2, 14, 14, 8]))
    """

    def __init__(self, capsules, kernel_size=1, strides=1, padding="valid",
                 kernel_initializer="glorot_uniform", bias_initializer="zeros",
                 **kwargs):
        super().__init__(**_float32_by_default(kwargs))
        self.capsules = _check_positive_int(capsules, "capsules")
        self.kernel_size = _check_positive_int(kernel_size, "kernel_size")
        self.strides = _check_positive_int(strides, "strides")
        if not isinstance(padding, str) or padding.lower() not in ("valid", "same"):
            raise ValueError(f"padding must be 'valid' or 'same', got {padding!r}")
        self.padding = padding.lower()
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.bias_initializer = keras.initializers.get(bias_initializer)

    def build(self, input_shape):
        input_shape = tuple(input_shape)
        if len(input_shape) != 4 or input_shape[-1] is None:
            raise ValueError(
                f"PrimaryCaps '{self.name}' expects feature maps (N, H, W, channels) "
                f"with known channels, got shape {input_shape}")
        if self.padding == "valid":
            ops._check_grid(input_shape[1], input_shape[2], self.kernel_size,
                            f"PrimaryCaps '{self.name}'", input_shape)
        channels = input_shape[-1]
        k = self.kernel_size
        self.pose_weights = self.add_weight(
            name="pose_weights", shape=(k, k, channels, 16 * self.capsules),
            initializer=self.kernel_initializer)
        self.pose_biases = self.add_weight(
            name="pose_biases", shape=(16 * self.capsules,),
            initializer=self.bias_initializer)
        self.activation_weights = self.add_weight(
            name="activation_weights", shape=(k, k, channels, self.capsules),
            initializer=self.kernel_initializer)
        self.activation_biases = self.add_weight(
            name="activation_biases", shape=(self.capsules,),
            initializer=self.bias_initializer)

    def call(self, inputs):
        padding = self.padding.upper()
        strides = [1, self.strides, self.strides, 1]
        pose = tf.nn.conv2d(inputs, self.pose_weights, strides, padding)
        pose = tf.nn.bias_add(pose, self.pose_biases)  # (N, OH, OW, 16*B)
        act = tf.nn.conv2d(inputs, self.activation_weights, strides, padding)
        act = tf.sigmoid(tf.nn.bias_add(act, self.activation_biases))  # (N, OH, OW, B)
        shape = tf.shape(pose)
        poses = tf.reshape(
            pose, tf.stack([shape[0], shape[1], shape[2], self.capsules, 4, 4]))  # (N, OH, OW, B, 4, 4)
        poses.set_shape(act.shape.concatenate([4, 4]))
        return poses, act

    def compute_output_shape(self, input_shape):
        n, h, w, _ = tuple(input_shape)
        oh, ow = (_conv_out(h, self.kernel_size, self.strides, self.padding),
                  _conv_out(w, self.kernel_size, self.strides, self.padding))
        return (n, oh, ow, self.capsules, 4, 4), (n, oh, ow, self.capsules)

    def article_variables(self):
        """The layer's weights under their TF1 names relative to the layer scope."""
        return {
            "pose_stacked/weights": self.pose_weights,
            "pose_stacked/biases": self.pose_biases,
            "activation/weights": self.activation_weights,
            "activation/biases": self.activation_biases,
        }

    def get_config(self):
        config = super().get_config()
        config.update({
            "capsules": self.capsules,
            "kernel_size": self.kernel_size,
            "strides": self.strides,
            "padding": self.padding,
            "kernel_initializer": keras.initializers.serialize(self.kernel_initializer),
            "bias_initializer": keras.initializers.serialize(self.bias_initializer),
        })
        return config


def _conv_out(size, kernel, stride, padding="valid"):
    if size is None:
        return None
    if padding == "same":
        return -(-size // stride)
    return (size - kernel) // stride + 1


class _RoutingLayer(keras.layers.Layer):
    """Shared parts of the capsule layers that route with EM."""

    def __init__(self, capsules, iterations, stable, transform_initializer,
                 beta_initializer, routing="article", final_lambda=paper_routing.FINAL_LAMBDA,
                 variance_floor=paper_routing.VARIANCE_FLOOR, assignment_gradient=True,
                 inverse_temperature=None, routing_cost="normalised", **kwargs):
        super().__init__(**_float32_by_default(kwargs))
        _check_routing_dtype(self)
        self.capsules = _check_positive_int(capsules, "capsules")
        self.iterations = _check_positive_int(iterations, "iterations")
        if not isinstance(stable, bool):
            raise ValueError(f"stable must be True or False, got {stable!r}")
        self.stable = stable
        if routing not in ROUTING_MODES:
            raise ValueError(f"routing must be one of {ROUTING_MODES}, got {routing!r}")
        self.routing = routing
        if isinstance(final_lambda, bool) or not isinstance(final_lambda, (int, float)) \
                or not final_lambda > 0:
            raise ValueError(f"final_lambda must be a number > 0, got {final_lambda!r}")
        self.final_lambda = float(final_lambda)
        if isinstance(variance_floor, bool) or not isinstance(variance_floor, (int, float)) \
                or not variance_floor > 0:
            raise ValueError(f"variance_floor must be a number > 0, got {variance_floor!r}")
        self.variance_floor = float(variance_floor)
        if not isinstance(assignment_gradient, bool):
            raise ValueError(f"assignment_gradient must be True or False, "
                             f"got {assignment_gradient!r}")
        self.assignment_gradient = assignment_gradient
        if inverse_temperature is not None:
            if isinstance(inverse_temperature, bool) or not isinstance(
                    inverse_temperature, (int, float)) or not inverse_temperature > 0:
                raise ValueError(f"inverse_temperature must be None or a number > 0, "
                                 f"got {inverse_temperature!r}")
            if routing != "paper":
                raise ValueError(f"inverse_temperature needs routing='paper' (the article's "
                                 f"routing has its own schedule), got routing={routing!r}")
            inverse_temperature = float(inverse_temperature)
        self.initial_inverse_temperature = inverse_temperature
        if routing_cost not in paper_routing.COSTS:
            raise ValueError(f"routing_cost must be one of {', '.join(paper_routing.COSTS)}, "
                             f"got {routing_cost!r}")
        if routing_cost != "normalised" and routing != "paper":
            raise ValueError(f"routing_cost={routing_cost!r} needs routing='paper', got "
                             f"routing={routing!r}")
        self.routing_cost = routing_cost
        self.transform_initializer = keras.initializers.get(
            transform_initializer if transform_initializer is not None
            else _transform_initializer())
        self.beta_initializer = keras.initializers.get(beta_initializer)

    def _build_inverse_temperature(self):
        """With an `inverse_temperature`, its non-trainable weight (`--lambda_schedule=ramp`).

        Training assigns it before every step (`capsem.step.TrainStep`), and
        checkpoints, exports and evaluations carry its last value.
        """
        self.inverse_temperature = None
        if self.initial_inverse_temperature is not None:
            self.inverse_temperature = self.add_weight(
                name="inverse_temperature", shape=(), trainable=False,
                initializer=keras.initializers.Constant(self.initial_inverse_temperature))

    def _route(self, poses, w, i_activations, offsets, return_details):
        """EM routing of the votes `poses @ w (+ offsets)`, which are never materialised.

        Args:
          poses: `(M, I, 16)`; w: `(1, I, O, 4, 4)`; i_activations: `(M, I)`;
          offsets: None or `(I, 16)`.

        Returns:
          `(poses (M, O, 16), activations (M, O))` and, with `return_details`,
          the assignments `(M, I, O)`.
        """
        return ops._em_routing_from_poses(
            poses, w, i_activations, self.beta_v, self.beta_a, self.iterations,
            stable=self.stable, offsets=offsets, return_assignments=return_details)

    def _route_paper(self, poses, w, i_activations, offsets, child_map, return_details):
        """The paper's EM routing of the votes `poses @ w (+ offsets)`.

        Args:
          poses: `(N, P, I, 16)`; w: `(1, I, O, 4, 4)`; i_activations:
            `(N, P, I)`; offsets: None or `(I, 16)`.

        Returns:
          `(poses (N, P, O, 16), activations (N, P, O))` and, with
          `return_details`, the votes `(N, P, I, O, 16)` and the assignments
          `(N, P, I, O)`.
        """
        options = dict(variance_floor=self.variance_floor,
                       assignment_gradient=self.assignment_gradient,
                       inverse_temperature=self.inverse_temperature, cost=self.routing_cost)
        if not return_details:  # the kernel entry: votes never materialised in native ops
            return paper_routing.route_from_poses(
                poses, w, i_activations, self.beta_v, self.beta_a, self.iterations,
                self.final_lambda, child_map, offsets=offsets, **options)
        num_p, num_i, num_o = poses.shape[1], poses.shape[2], w.shape[2]
        votes = ops.mat_transform(tf.reshape(poses, [-1, num_i, 16]), w)  # (N*P, I, O, 16)
        if offsets is not None:
            votes = votes + offsets[:, None, :]  # (N*P, I, O, 16)
        votes = tf.reshape(votes, tf.stack([-1, num_p, num_i, num_o, 16]))  # (N, P, I, O, 16)
        votes.set_shape([poses.shape[0], num_p, num_i, num_o, 16])
        result = paper_routing.em_routing_paper(
            votes, i_activations, self.beta_v, self.beta_a, self.iterations,
            self.final_lambda, child_map, return_assignments=True, **options)
        return (*result, votes)

    def _prepare(self, inputs):
        """Converts `[poses, activations]` to tensors and builds the layer if needed."""
        try:
            poses, activations = inputs
        except (TypeError, ValueError):
            raise ValueError(
                f"{self.__class__.__name__} '{self.name}' expects a pair [poses "
                f"(N, H, W, caps, 4, 4), activations (N, H, W, caps)], got "
                f"{type(inputs).__name__}") from None
        poses, activations = self._to_compute_dtype(poses), self._to_compute_dtype(activations)
        if not self.built:
            self.build([tuple(poses.shape), tuple(activations.shape)])
        else:
            _check_capsule_input(self, [tuple(poses.shape), tuple(activations.shape)])
            if poses.shape[3] != self.in_capsules:
                raise ValueError(
                    f"{self.__class__.__name__} '{self.name}' was built for "
                    f"{self.in_capsules} input capsule types (w has shape "
                    f"{tuple(self.w.shape)}), got {poses.shape[3]} (poses shape "
                    f"{tuple(poses.shape)})")
        return poses, activations

    def _to_compute_dtype(self, x):
        """`x` as a tensor of the compute dtype; other floats are cast, as `__call__` does."""
        x = tf.convert_to_tensor(x)
        if x.dtype.is_floating and x.dtype != self.compute_dtype:
            return tf.cast(x, self.compute_dtype)
        return tf.convert_to_tensor(x, dtype=self.compute_dtype)

    def article_variables(self):
        """The layer's weights under their TF1 names relative to the layer scope."""
        return {"votes/w": self.w, "routing/beta_v": self.beta_v,
                "routing/beta_a": self.beta_a}

    def call(self, inputs):
        out = self.call_with_details(inputs, return_details=False)
        return out["poses"], out["activations"]

    def get_config(self):
        config = super().get_config()
        config.update({
            "capsules": self.capsules,
            "iterations": self.iterations,
            "stable": self.stable,
            "routing": self.routing,
            "final_lambda": self.final_lambda,
            "variance_floor": self.variance_floor,
            "assignment_gradient": self.assignment_gradient,
            "inverse_temperature": self.initial_inverse_temperature,
            "routing_cost": self.routing_cost,
            "transform_initializer": keras.initializers.serialize(self.transform_initializer),
            "beta_initializer": keras.initializers.serialize(self.beta_initializer),
        })
        return config


@keras.saving.register_keras_serializable(package=_PACKAGE)
class ConvCaps(_RoutingLayer):
    """Convolutional capsules with EM routing (article: `conv_capsule`).

    Each output position routes, independently, the K*K*I capsules of its
    K x K input window (VALID padding) to `capsules` output capsule types.
    Input capsule `(K*i + j)*I + cap` (kernel position major, capsule type
    minor) votes `pose @ w[0, (K*i + j)*I + cap, o]` for output type o; the
    transformation matrices are shared by all positions.

    Args:
      capsules: number of output capsule types O.
      kernel_size: K (the article uses 3).
      strides: stride s (the article uses 2 and 1).
      iterations: EM routing iterations (the article uses 3).
      stable: guard the article's unguarded divisions in EM routing (see
        `capsem.ops.em_routing`); False reproduces the article exactly.
        The paper's routing is always guarded and ignores it.
      transform_initializer: initializer of `w` (default truncated normal,
        stddev 1, as the article).
      beta_initializer: initializer of `beta_v` and `beta_a` (Glorot uniform).
      routing: "article" (default, the article's code) or "paper" (the
        paper's procedure: a child's assignments normalised over the parents
        at every position that receives it, see `capsem.paper_routing`; needs
        a known grid size).
      final_lambda: scale of the paper routing's inverse temperature schedule.
      inverse_temperature: None (the schedule of `final_lambda` over the
        iterations), or the initial value of a non-trainable weight
        `inverse_temperature` used at every iteration instead, which training
        moves along `capsem.paper_routing.inverse_temperature_ramp`
        (`--lambda_schedule=ramp`); routing="paper" only.
      routing_cost: the paper routing's M-step, "normalised" (default) or
        "unnormalised" (see `capsem.paper_routing.em_routing_paper`'s `cost`).
      variance_floor: the paper routing's variance floor.
      assignment_gradient: whether the paper routing's gradient flows through
        its assignments (see `capsem.paper_routing.em_routing_paper`).
      **kwargs: base `keras.layers.Layer` arguments (e.g. `name`). `dtype`
        defaults to float32 whatever the global dtype policy; a float16 or
        bfloat16 one raises ValueError.

    Input shape:
      `[poses (N, H, W, I, 4, 4), activations (N, H, W, I)]`.

    Output shape:
      `[poses (N, OH, OW, O, 4, 4), activations (N, OH, OW, O)]` with
      `OH = (H - K) // s + 1`, `OW = (W - K) // s + 1`.

    Weights:
      `w (1, K*K*I, O, 4, 4)`, `beta_v (1, 1, 1, O)`, `beta_a (1, 1, 1, O)`.

    Example:
    >>> layer = ConvCaps(capsules=16, kernel_size=3, strides=2)
    >>> poses, acts = layer([tf.zeros((2, 9, 9, 8, 4, 4)), tf.fill((2, 9, 9, 8), 0.5)])
    >>> poses.shape, acts.shape
    (TensorShape([2, 4, 4, 16, 4, 4]), TensorShape([2, 4, 4, 16]))
    """

    def __init__(self, capsules, kernel_size=3, strides=1, iterations=3,
                 stable=False, transform_initializer=None,
                 beta_initializer="glorot_uniform", routing="article",
                 final_lambda=paper_routing.FINAL_LAMBDA,
                 variance_floor=paper_routing.VARIANCE_FLOOR, assignment_gradient=True,
                 inverse_temperature=None, routing_cost="normalised", **kwargs):
        super().__init__(capsules, iterations, stable, transform_initializer,
                         beta_initializer, routing, final_lambda, variance_floor,
                         assignment_gradient, inverse_temperature, routing_cost, **kwargs)
        self.kernel_size = _check_positive_int(kernel_size, "kernel_size")
        self.strides = _check_positive_int(strides, "strides")

    def build(self, input_shape):
        height, width, in_caps = _check_capsule_input(self, input_shape)
        ops._check_grid(height, width, self.kernel_size,
                        f"ConvCaps '{self.name}'", tuple(input_shape[0]))
        self.in_capsules = in_caps
        self.child_map = None
        if self.routing == "paper":
            if height is None or width is None:
                raise ValueError(
                    f"ConvCaps '{self.name}': routing='paper' needs a known grid size, "
                    f"got poses shape {tuple(input_shape[0])}")
            self.child_map = paper_routing.ChildMap(height, width, self.kernel_size,
                                                    self.strides)
        k2i = self.kernel_size * self.kernel_size * in_caps
        self.w = self.add_weight(
            name="w", shape=(1, k2i, self.capsules, 4, 4),
            initializer=self.transform_initializer)
        self.beta_v = self.add_weight(
            name="beta_v", shape=(1, 1, 1, self.capsules),
            initializer=self.beta_initializer)
        self.beta_a = self.add_weight(
            name="beta_a", shape=(1, 1, 1, self.capsules),
            initializer=self.beta_initializer)
        self._build_inverse_temperature()

    def call_with_details(self, inputs, return_details=True):
        """Runs the layer; with `return_details` also returns votes and assignments.

        Returns:
          a dict with `poses`, `activations` and, if `return_details`, `votes`
          `(N, OH, OW, K*K*I, O, 16)` and `assignments` `(N, OH, OW, K*K*I, O)`
          (the rr of the last M-step).
        """
        poses, activations = self._prepare(inputs)
        k, s, o = self.kernel_size, self.strides, self.capsules
        k2i = k * k * self.in_capsules
        tiled_p = ops.kernel_tile(poses, k, s)  # (N, OH, OW, K*K, I*16)
        tiled_a = ops.kernel_tile(activations, k, s)  # (N, OH, OW, K*K, I)
        shape = tf.shape(tiled_a)
        n, oh, ow = shape[0], shape[1], shape[2]
        static = tiled_a.shape[:3]
        m = static.num_elements()
        flat_p = tf.reshape(tiled_p, [-1, k2i, 16])  # (N*OH*OW, K*K*I, 16)
        flat_a = tf.reshape(tiled_a, [-1, k2i])  # (N*OH*OW, K*K*I)
        flat_p.set_shape([m, k2i, 16])
        flat_a.set_shape([m, k2i])
        if self.routing == "paper":
            return self._call_paper(flat_p, tiled_a, return_details)
        result = self._route(flat_p, self.w, flat_a, None, return_details)
        out = self._grid_outputs(result, n, oh, ow, static)
        if return_details:
            votes = ops.mat_transform(flat_p, self.w)  # (N*OH*OW, K*K*I, O, 16)
            votes = tf.reshape(votes, tf.stack([n, oh, ow, k2i, o, 16]))  # (N, OH, OW, K*K*I, O, 16)
            votes.set_shape(static.concatenate([k2i, o, 16]))
            rr = tf.reshape(result[2], tf.stack([n, oh, ow, k2i, o]))  # (N, OH, OW, K*K*I, O)
            rr.set_shape(static.concatenate([k2i, o]))
            out.update(votes=votes, assignments=rr)
        return out

    def _grid_outputs(self, result, n, oh, ow, static):
        """`{"poses", "activations"}` on the output grid from routing's (M, O, 16), (M, O)."""
        o = self.capsules
        out_p = tf.reshape(result[0], tf.stack([n, oh, ow, o, 4, 4]))  # (N, OH, OW, O, 4, 4)
        out_a = tf.reshape(result[1], tf.stack([n, oh, ow, o]))  # (N, OH, OW, O)
        out_p.set_shape(static.concatenate([o, 4, 4]))
        out_a.set_shape(static.concatenate([o]))
        return {"poses": out_p, "activations": out_a}

    def _call_paper(self, flat_p, tiled_a, return_details):
        """`call_with_details` with the paper's routing."""
        o, k2i = self.capsules, self.kernel_size * self.kernel_size * self.in_capsules
        shape = tf.shape(tiled_a)
        n, oh, ow = shape[0], shape[1], shape[2]
        p = oh * ow
        static = tiled_a.shape[:3]
        poses = tf.reshape(flat_p, tf.stack([n, p, k2i, 16]))  # (N, P, K*K*I, 16)
        poses.set_shape([static[0], self.child_map.positions, k2i, 16])
        acts = tf.reshape(tiled_a, tf.stack([n, p, k2i]))  # (N, P, K*K*I)
        acts.set_shape([static[0], self.child_map.positions, k2i])
        result = self._route_paper(poses, self.w, acts, None, self.child_map, return_details)
        out = self._grid_outputs(result, n, oh, ow, static)
        if return_details:
            votes = result[3]  # (N, P, K*K*I, O, 16)
            out["votes"] = tf.reshape(votes, tf.stack([n, oh, ow, k2i, o, 16]))
            out["votes"].set_shape(static.concatenate([k2i, o, 16]))
            out["assignments"] = tf.reshape(result[2], tf.stack([n, oh, ow, k2i, o]))
            out["assignments"].set_shape(static.concatenate([k2i, o]))
        return out

    def compute_output_shape(self, input_shape):
        pose_shape = tuple(input_shape[0])
        n, h, w = pose_shape[:3]
        oh = _conv_out(h, self.kernel_size, self.strides)
        ow = _conv_out(w, self.kernel_size, self.strides)
        return (n, oh, ow, self.capsules, 4, 4), (n, oh, ow, self.capsules)

    def get_config(self):
        config = super().get_config()
        config.update({"kernel_size": self.kernel_size, "strides": self.strides})
        return config


@keras.saving.register_keras_serializable(package=_PACKAGE)
class ClassCaps(_RoutingLayer):
    """Class capsules with coordinate addition and EM routing (article: `class_capsules`).

    Every input capsule at every grid position votes for each class with a
    transformation matrix shared across positions; with coordinate addition
    the scaled position `((h + 0.5) / H, (w + 0.5) / W)` is added to pose
    elements [0, 0] and [0, 1] of the votes. All H*W*I votes are routed to
    the `capsules` class capsules; the input index is `(h*W + w)*I + i`.

    Args:
      capsules: number of classes.
      iterations: EM routing iterations (the article uses 3).
      coord_addition: add the scaled coordinates to the votes (the article
        and the paper do).
      stable: guard the article's unguarded divisions in EM routing (see
        `capsem.ops.em_routing`); False reproduces the article exactly.
        The paper's routing is always guarded and ignores it.
      transform_initializer: initializer of `w` (default truncated normal,
        stddev 1, as the article).
      beta_initializer: initializer of `beta_v` and `beta_a` (Glorot uniform).
      routing: "article" (default) or "paper" (`capsem.paper_routing`).
      final_lambda: scale of the paper routing's inverse temperature schedule.
      inverse_temperature: None (the schedule of `final_lambda` over the
        iterations), or the initial value of a non-trainable weight
        `inverse_temperature` used at every iteration instead, which training
        moves along `capsem.paper_routing.inverse_temperature_ramp`
        (`--lambda_schedule=ramp`); routing="paper" only.
      routing_cost: the paper routing's M-step, "normalised" (default) or
        "unnormalised" (see `capsem.paper_routing.em_routing_paper`'s `cost`).
      variance_floor: the paper routing's variance floor.
      assignment_gradient: whether the paper routing's gradient flows through
        its assignments (see `capsem.paper_routing.em_routing_paper`).
      **kwargs: base `keras.layers.Layer` arguments (e.g. `name`). `dtype`
        defaults to float32 whatever the global dtype policy; a float16 or
        bfloat16 one raises ValueError.

    Input shape:
      `[poses (N, H, W, I, 4, 4), activations (N, H, W, I)]`; H and W may differ.

    Output shape:
      `[poses (N, capsules, 4, 4), activations (N, capsules)]`.

    Weights:
      `w (1, I, capsules, 4, 4)`, `beta_v (1, capsules)`, `beta_a (1, capsules)`.

    Example:
    >>> layer = ClassCaps(capsules=5)
    >>> poses, acts = layer([tf.zeros((2, 3, 3, 8, 4, 4)), tf.fill((2, 3, 3, 8), 0.5)])
    >>> poses.shape, acts.shape
    (TensorShape([2, 5, 4, 4]), TensorShape([2, 5]))
    """

    def __init__(self, capsules, iterations=3, coord_addition=True, stable=False,
                 transform_initializer=None, beta_initializer="glorot_uniform",
                 routing="article", final_lambda=paper_routing.FINAL_LAMBDA,
                 variance_floor=paper_routing.VARIANCE_FLOOR, assignment_gradient=True,
                 inverse_temperature=None, routing_cost="normalised", **kwargs):
        super().__init__(capsules, iterations, stable, transform_initializer,
                         beta_initializer, routing, final_lambda, variance_floor,
                         assignment_gradient, inverse_temperature, routing_cost, **kwargs)
        if not isinstance(coord_addition, bool):
            raise ValueError(f"coord_addition must be True or False, got {coord_addition!r}")
        self.coord_addition = coord_addition

    def build(self, input_shape):
        height, width, in_caps = _check_capsule_input(self, input_shape)
        if self.coord_addition and (height is None or width is None):
            raise ValueError(
                f"ClassCaps '{self.name}': coordinate addition needs a known grid "
                f"size, got poses shape {tuple(input_shape[0])}")
        self.in_capsules = in_caps
        self.w = self.add_weight(
            name="w", shape=(1, in_caps, self.capsules, 4, 4),
            initializer=self.transform_initializer)
        self.beta_v = self.add_weight(
            name="beta_v", shape=(1, self.capsules), initializer=self.beta_initializer)
        self.beta_a = self.add_weight(
            name="beta_a", shape=(1, self.capsules), initializer=self.beta_initializer)
        self._build_inverse_temperature()

    def call_with_details(self, inputs, return_details=True):
        """Runs the layer; with `return_details` also returns votes and assignments.

        Returns:
          a dict with `poses`, `activations` and, if `return_details`, `votes`
          `(N, H*W*I, O, 16)` (after coordinate addition) and `assignments`
          `(N, H*W*I, O)` (the rr of the last M-step).
        """
        poses, activations = self._prepare(inputs)
        i, o = self.in_capsules, self.capsules
        shape = tf.shape(activations)
        n, h, w = shape[0], shape[1], shape[2]
        hwi = None
        if activations.shape[1] is not None and activations.shape[2] is not None:
            hwi = activations.shape[1] * activations.shape[2] * i
        flat_p = tf.reshape(poses, tf.stack([n, h * w * i, 16]))  # (N, H*W*I, 16)
        i_act = tf.reshape(activations, tf.stack([n, h * w * i]))  # (N, H*W*I)
        flat_p.set_shape([activations.shape[0], hwi, 16])
        i_act.set_shape([activations.shape[0], hwi])
        # The transformation matrices are shared by all H*W positions.
        w_all = tf.tile(self.w, tf.stack([1, h * w, 1, 1, 1]))  # (1, H*W*I, O, 4, 4)
        w_all.set_shape([1, hwi, o, 4, 4])
        offsets = None
        if self.coord_addition:
            offsets = self._coordinate_offsets(activations.shape[1], activations.shape[2])
        if self.routing == "paper":
            result = self._route_paper(flat_p[:, None], w_all, i_act[:, None], offsets, None,
                                       return_details)
            # poses (N, 1, O, 16), activations (N, 1, O)[, assignments (N, 1, H*W*I, O)]
            result = (result[0][:, 0], result[1][:, 0]) + tuple(r[:, 0] for r in result[2:3])
        else:
            result = self._route(flat_p, w_all, i_act, offsets, return_details)
        out_p = tf.reshape(result[0], tf.stack([n, o, 4, 4]))  # (N, O, 4, 4)
        out_p.set_shape([activations.shape[0], o, 4, 4])
        out = {"poses": out_p, "activations": result[1]}
        if return_details:
            votes = ops.mat_transform(tf.reshape(poses, [-1, i, 16]), self.w)  # (N*H*W, I, O, 16)
            votes = tf.reshape(votes, tf.stack([n, h, w, i, o, 16]))  # (N, H, W, I, O, 16)
            if self.coord_addition:
                votes = ops.coord_addition(votes, activations.shape[1], activations.shape[2])
            votes = tf.reshape(votes, tf.stack([n, h * w * i, o, 16]))  # (N, H*W*I, O, 16)
            votes.set_shape([activations.shape[0], hwi, o, 16])
            out.update(votes=votes, assignments=result[2])
        return out

    def _coordinate_offsets(self, height, width):
        """`coord_addition`'s offsets per input capsule `(h*W + w)*I + i`: `(H*W*I, 16)`."""
        zeros = tf.zeros([1, height, width, self.in_capsules, 1, 16], self.compute_dtype)
        offsets = ops.coord_addition(zeros, height, width)  # (1, H, W, I, 1, 16)
        return tf.reshape(offsets, [height * width * self.in_capsules, 16])  # (H*W*I, 16)

    def compute_output_shape(self, input_shape):
        n = tuple(input_shape[0])[0]
        return (n, self.capsules, 4, 4), (n, self.capsules)

    def get_config(self):
        config = super().get_config()
        config.update({"coord_addition": self.coord_addition})
        return config
