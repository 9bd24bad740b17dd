"""Pictures of a trained network's capsules and routing, and TensorBoard image summaries.

`visualize(log_dir, out_dir)` (behind the repository's visualize.py) writes,
for each of a few test images with index `k` in the test set, the ten PNGs
of `PICTURES` (matplotlib, Agg canvas), named `image<k>_<picture>.png`
(`file_names`):

* `input`: the image, with the predicted class (and its activation) and
  the true class;
* `activations_primary_caps`, `activations_conv_caps1`,
  `activations_conv_caps2`: the activation map of every capsule type of the
  layer, one tile per type (type `t` at row `t // columns`, column
  `t % columns`), on a 0..1 scale;
* `activations_class_capsules`: a bar chart of the class activations;
* `routing_conv_caps1`, `routing_conv_caps2`: which parent capsule types
  each child capsule type supports in the last EM iteration
  (`routing_matrices`: the activation-weighted mean assignment, a child
  type x parent type matrix whose rows sum to 1);
* `routing_class_capsules`: the same matrix for the class layer, and two
  child type x position maps: the assignment of every ConvCaps2 capsule to
  the predicted class, and that assignment times the capsule's activation
  (the weight of its vote in the predicted class's M-step);
* `poses`: the 4x4 pose matrices of the class capsules, the predicted
  class framed;
* `pose_study`: the activation of the predicted class recomputed by the
  model's class layer when pose element `[r, c]` of every ConvCaps2 capsule
  (the class layer's input) is offset by `delta` (`pose_study`).

`write_image_summaries(model, images, labels)` writes raw-pixel versions of
some of these pictures as TensorBoard images, for the training loop.

All the numbers come from the model's own layers
(`capsem.layers.PrimaryCaps`, `ConvCaps.call_with_details`,
`ClassCaps.call_with_details`, and the class layer's `__call__` for the pose
study).
"""

import math
import os

import matplotlib
import numpy as np
import tensorflow as tf
from matplotlib.figure import Figure

from capsem import datasets, diagnostics, ops, outputs
from capsem.errors import ConfigError, DataError

#: The capsule layer whose capsules are the classes.
CLASS_LAYER = "class_capsules"

#: Capsule layers on a grid (their activations are pictured as maps).
GRID_LAYERS = ("primary_caps", "conv_caps1", "conv_caps2")

#: Capsule layers that route with EM, and the layer of their child capsules.
ROUTING_LAYERS = diagnostics.ROUTING_LAYERS
CHILD_LAYER = {"conv_caps1": "primary_caps", "conv_caps2": "conv_caps1",
               CLASS_LAYER: "conv_caps2"}

#: The pictures written for every image, in order: `image<k>_<picture>.png`.
PICTURES = (("input",)
            + tuple(f"activations_{name}" for name in GRID_LAYERS + (CLASS_LAYER,))
            + tuple(f"routing_{name}" for name in ROUTING_LAYERS)
            + ("poses", "pose_study"))

#: Defaults of the pose study: offsets `linspace(-POSE_OFFSET, POSE_OFFSET, POSE_STEPS)`.
POSE_OFFSET = 0.25
POSE_STEPS = 11

#: The TensorBoard tags of `write_image_summaries` (under `SUMMARY_PREFIX`).
SUMMARY_PREFIX = "pictures/"
SUMMARY_TAGS = tuple(SUMMARY_PREFIX + tag for tag in (
    ("input",) + tuple(f"activations/{name}" for name in GRID_LAYERS + (CLASS_LAYER,))
    + tuple(f"routing/{name}" for name in ROUTING_LAYERS) + ("class_poses",)))

_DPI = 100
_WRONG = "tab:red"
_RIGHT = "tab:green"


# ---------------------------------------------------------------------------
# Numbers
# ---------------------------------------------------------------------------


def file_names(indices):
    """The file names `visualize` writes for test images `indices`, in writing order.

    Args:
      indices: test-set indices of the images.

    Returns:
      a list of `image<k>_<picture>.png` for every `k` in `indices` and every
      picture of `PICTURES`.
    """
    return [f"image{int(k)}_{picture}.png" for k in indices for picture in PICTURES]


#: The capsule outputs of every layer (`capsem.diagnostics.capsule_outputs`).
capsule_outputs = diagnostics.capsule_outputs


def _child_activations(model, name, outputs):
    """The activation of every child of routing layer `name`, in its assignments' order.

    Returns:
      `(N, M, I)`: M groups of the I child types (conv layers: the K*K
      positions of every output position's window; class layer: the H*W
      positions).
    """
    child = outputs[f"activations/{CHILD_LAYER[name]}"]  # (N, H, W, I)
    num_types = child.shape[-1]
    if name != CLASS_LAYER:
        layer = model.get_layer(name)
        child = ops.kernel_tile(child, layer.kernel_size, layer.strides)  # (N, OH, OW, K*K, I)
    return np.reshape(np.asarray(child), (child.shape[0], -1, num_types))  # (N, M, I)


def routing_matrices(model, outputs):
    """Which parent capsule types every child capsule type supports, per image.

    For routing layer `name`, child type `i` and parent type `o`:
    `R[i, o] = sum_m a[m, i] * r[m, i, o] / sum_m sum_o' a[m, i] * r[m, i, o']`,
    where `m` runs over the child's copies (every position of the child grid;
    in a convolutional layer every K x K window that holds it), `a` is the
    child's activation and `r` its assignment to the parent in the last EM
    iteration: the share of the child type's vote weight that goes to each
    parent type. Each row sums to 1 (0 where the child type's activations
    are all 0). With the article's routing `sum_o r = 1` for each copy; with
    the paper's, a child's assignments are normalised over all the windows
    that hold it, and `R` renormalises them per row.

    Args:
      model: the `capsules_net` model of `outputs`.
      outputs: `capsule_outputs(model, images)`.

    Returns:
      `{layer: (N, I, O) float32 array}` for the three routing layers.
    """
    result = {}
    for name in ROUTING_LAYERS:
        a = _child_activations(model, name, outputs)  # (N, M, I)
        rr = np.asarray(outputs[f"routing/{name}"])
        rr = rr.reshape(a.shape + rr.shape[-1:])  # (N, M, I, O)
        mass = np.einsum("nmi,nmio->nio", a, rr)  # (N, I, O)
        total = mass.sum(axis=-1, keepdims=True)  # (N, I, 1)
        result[name] = np.divide(mass, total, out=np.zeros_like(mass), where=total > 0)
    return result


def pose_offsets(offset=POSE_OFFSET, steps=POSE_STEPS):
    """The offsets of the pose study: `steps` values evenly spaced in `[-offset, offset]`."""
    if isinstance(offset, bool) or not isinstance(offset, (int, float)) \
            or not math.isfinite(offset) or offset <= 0:
        raise ConfigError(f"pose_offset must be a finite number > 0, got {offset!r}")
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 2:
        raise ConfigError(f"pose_steps must be an int >= 2, got {steps!r}")
    return np.linspace(-offset, offset, int(steps)).astype(np.float32)


def pose_study(model, outputs, classes, offsets):
    """Activation of a class when one pose element of all the class layer's inputs is offset.

    For every image n, pose element `h = 4*r + c` and offset `delta`: the
    activation of class `classes[n]` that the model's class layer (its own
    `__call__`: votes, coordinate addition and all its EM iterations)
    computes when `delta` is added to pose element `[r, c]` of every
    ConvCaps2 capsule of the image (all positions and types; activations
    unchanged). `delta = 0` gives the unperturbed activation.

    Why the inputs: the class capsule's own pose is an output that nothing
    is computed from (there is no decoder here to read it back), and
    shifting all the votes of a class by the same delta moves its pose by
    delta but leaves its activation as it is, since EM routing computes the
    activation from the spread of the votes around their mean. An offset of
    the inputs instead changes every vote by `delta` times a row of its
    transformation matrix, different for every input type and class, so the
    votes agree more or less and the routing runs again. Compare `delta`
    with the scale of the ConvCaps2 poses (`picture_data`'s `pose_rms`).

    Args:
      model: the `capsules_net` model of `outputs`.
      outputs: `capsule_outputs(model, images)`.
      classes: `(N,)` the class to follow in each image (e.g. the predicted one).
      offsets: `(S,)` the offsets `delta`.

    Returns:
      `(activations (N, 16, S), predictions (N, 16, S))`: the class's
      activation and the predicted class (argmax of the class activations)
      for each pose element and offset.
    """
    layer = model.get_layer(CLASS_LAYER)
    poses = np.asarray(outputs["poses/conv_caps2"])  # (N, H, W, D, 4, 4)
    acts = np.asarray(outputs["activations/conv_caps2"])  # (N, H, W, D)
    offsets = np.asarray(offsets, np.float32)
    steps = offsets.shape[0]
    # shift[h, s] is offsets[s] at pose element h: (16, S, 16) -> (16*S, 1, 1, 1, 4, 4)
    shift = np.eye(16, dtype=np.float32)[:, None, :] * offsets[None, :, None]
    shift = shift.reshape(16 * steps, 1, 1, 1, 4, 4)
    study = np.zeros((len(poses), 16, steps), np.float32)
    predicted = np.zeros((len(poses), 16, steps), np.int64)
    for n in range(len(poses)):
        batch_poses = poses[n][None] + shift  # (16*S, H, W, D, 4, 4)
        batch_acts = np.broadcast_to(acts[n][None],
                                     (16 * steps,) + acts.shape[1:])  # (16*S, H, W, D)
        _, class_acts = layer([tf.constant(batch_poses), tf.constant(batch_acts)])  # (16*S, E)
        class_acts = np.asarray(class_acts).reshape(16, steps, -1)  # (16, S, E)
        study[n] = class_acts[:, :, int(classes[n])]
        predicted[n] = class_acts.argmax(axis=-1)
    return study, predicted


def picture_data(model, images, labels=None, offsets=None, outputs=None):
    """Everything the pictures show, as numpy arrays.

    Args:
      model: a model from `capsem.nets.capsules_net`.
      images: preprocessed images `(N, H, W, C)`.
      labels: `(N,)` true classes, or None.
      offsets: the pose study's offsets `(S,)` (`pose_offsets`), or None
        for no pose study.
      outputs: `capsule_outputs(model, images)` if the caller has them
        (e.g. the trainer, for its histograms too); None: computed here.

    Returns:
      a dict with `images`, `labels` (or None), `predictions` `(N,)`,
      `class_activations` `(N, E)`, `class_poses` `(N, E, 4, 4)`,
      `activations/<layer>` `(N, H, W, T)` for the grid layers,
      `routing/<layer>` `(N, I, O)` (`routing_matrices`), `class_routing`
      and `class_support` `(N, D, H*W)` (the assignment of every ConvCaps2
      capsule to the predicted class, and that times its activation;
      position index `h*W + w`), `class_grid` `(H, W)` of ConvCaps2, and with
      `offsets` also `pose_offsets`, `pose_study`, `pose_study_predictions`
      (`pose_study`) and `pose_rms` `(N,)` (the root mean square of the
      ConvCaps2 pose elements, the scale of the offsets).
    """
    if outputs is None:
        outputs = capsule_outputs(model, images)
    class_acts = np.asarray(outputs[f"activations/{CLASS_LAYER}"])  # (N, E)
    predictions = class_acts.argmax(axis=-1)  # (N,)
    data = {"images": np.asarray(images), "labels": None if labels is None else np.asarray(labels),
            "predictions": predictions, "class_activations": class_acts,
            "class_poses": np.asarray(outputs[f"poses/{CLASS_LAYER}"])}
    for name in GRID_LAYERS:
        data[f"activations/{name}"] = np.asarray(outputs[f"activations/{name}"])
    for name, matrix in routing_matrices(model, outputs).items():
        data[f"routing/{name}"] = matrix
    a = _child_activations(model, CLASS_LAYER, outputs)  # (N, H*W, D)
    rr = np.asarray(outputs[f"routing/{CLASS_LAYER}"])  # (N, H*W*D, E)
    rr = rr.reshape(a.shape + rr.shape[-1:])  # (N, H*W, D, E)
    to_predicted = np.take_along_axis(rr, predictions[:, None, None, None], axis=-1)[..., 0]
    data["class_routing"] = to_predicted.transpose(0, 2, 1)  # (N, D, H*W)
    data["class_support"] = (to_predicted * a).transpose(0, 2, 1)  # (N, D, H*W)
    data["class_grid"] = tuple(outputs["activations/conv_caps2"].shape[1:3])
    if offsets is not None:
        data["pose_offsets"] = np.asarray(offsets, np.float32)
        data["pose_study"], data["pose_study_predictions"] = pose_study(
            model, outputs, predictions, offsets)
        conv_poses = np.asarray(outputs["poses/conv_caps2"])  # (N, H, W, D, 4, 4)
        data["pose_rms"] = np.sqrt(np.mean(np.square(conv_poses), axis=(1, 2, 3, 4, 5)))
    return data


def display_images(images, dataset=None):
    """Preprocessed images back to uint8 pixels `(N, H, W, C)`.

    MNIST and Fashion-MNIST invert `capsem.datasets.preprocess_image`
    (`x * 128 + 128`); other images (smallNORB is standardised per image)
    are stretched to 0..255 per image.
    """
    x = np.asarray(images, np.float32)
    if dataset in ("mnist", "fashion_mnist"):
        return np.clip(np.round(x * 128.0 + 128.0), 0, 255).astype(np.uint8)
    low = x.min(axis=(1, 2, 3), keepdims=True)
    high = x.max(axis=(1, 2, 3), keepdims=True)
    return np.round(255 * (x - low) / np.maximum(high - low, 1e-12)).astype(np.uint8)


def tile_maps(maps, columns=None, fill=np.nan, border=1):
    """Tiles the T maps of every image in a grid, separated by `border` pixels of `fill`.

    Args:
      maps: `(N, H, W, T)`.
      columns: tiles per row (default `ceil(sqrt(T))`).
      fill: the value between the tiles.
      border: pixels between two tiles.

    Returns:
      `(N, rows*(H+border) - border, columns*(W+border) - border)` with map `t`
      at row `t // columns`, column `t % columns`; unused tiles are `fill`.
    """
    maps = np.asarray(maps, np.float32)
    n, h, w, t = maps.shape
    columns = columns or math.ceil(math.sqrt(t))
    rows = math.ceil(t / columns)
    out = np.full((n, rows * (h + border) - border, columns * (w + border) - border), fill,
                  np.float32)
    for k in range(t):
        r, c = divmod(k, columns)
        out[:, r * (h + border):r * (h + border) + h, c * (w + border):c * (w + border) + w] = \
            maps[..., k]
    return out


# ---------------------------------------------------------------------------
# PNG figures
# ---------------------------------------------------------------------------


def _colormap(name):
    return matplotlib.colormaps[name].with_extremes(bad="white")


def _title(data, n, index):
    """`test image k: predicted p (a), true t` and whether the prediction is right."""
    pred = int(data["predictions"][n])
    text = f"test image {index}: predicted {pred} ({data['class_activations'][n, pred]:.2f})"
    if data["labels"] is None:
        return text, None
    true = int(data["labels"][n])
    return f"{text}, true {true}", pred == true


def _input_figure(data, n, index, dataset):
    image = display_images(data["images"][n:n + 1], dataset)[0]  # (H, W, C)
    fig = Figure(figsize=(3.6, 3.9), dpi=_DPI)
    ax = fig.add_subplot()
    if image.shape[-1] == 1:
        ax.imshow(image[..., 0], cmap="gray", vmin=0, vmax=255)
    else:
        ax.imshow(image)
    ax.set_axis_off()
    text, right = _title(data, n, index)
    ax.set_title(text.replace(": ", ":\n", 1), fontsize=10,
                 color="black" if right is None else (_RIGHT if right else _WRONG))
    return fig


def _activation_grid_figure(data, n, index, name):
    maps = data[f"activations/{name}"][n:n + 1]  # (1, H, W, T)
    _, h, w, t = maps.shape
    columns = math.ceil(math.sqrt(t))
    rows = math.ceil(t / columns)
    mosaic = tile_maps(maps, columns)[0]
    fig = Figure(figsize=(max(5.0, 1.6 + 1.0 * columns), max(3.6, 1.0 + 1.0 * rows)), dpi=_DPI)
    ax = fig.add_subplot()
    im = ax.imshow(mosaic, cmap=_colormap("viridis"), vmin=0.0, vmax=1.0,
                   interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    if t <= 64:
        for k in range(t):
            r, c = divmod(k, columns)
            ax.text(c * (w + 1) - 0.4, r * (h + 1) - 0.4, str(k), fontsize=6, color="white",
                    va="top", ha="left", bbox=dict(facecolor="black", pad=0.5, lw=0))
    ax.set_title(f"{name}: activation of each of its {t} capsule types\n"
                 f"({h}x{w} positions), test image {index}", fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.03, label="activation")
    fig.tight_layout()
    return fig


def _class_activation_figure(data, n, index):
    acts = data["class_activations"][n]
    pred = int(data["predictions"][n])
    colors = ["tab:gray"] * len(acts)
    true = None if data["labels"] is None else int(data["labels"][n])
    if true is not None:
        colors[true] = _RIGHT
    if true != pred:
        colors[pred] = _WRONG if true is not None else "tab:blue"
    fig = Figure(figsize=(1.5 + 0.4 * len(acts), 3.2), dpi=_DPI)
    ax = fig.add_subplot()
    ax.bar(np.arange(len(acts)), acts, color=colors)
    ax.set_ylim(0, 1)
    ax.set_xticks(np.arange(len(acts)))
    ax.set_xlabel("class")
    ax.set_ylabel("activation")
    text, _ = _title(data, n, index)
    legend = "" if true is None else "\n(green: true class" + (
        ")" if true == pred else ", red: predicted)")
    ax.set_title(f"{CLASS_LAYER}: activations\n{text}{legend}", fontsize=8)
    fig.tight_layout()
    return fig


def _matrix_axes(fig, ax, matrix, child, parent, highlight=None):
    """A child type x parent type matrix of shares on 0 .. its maximum (small ones annotated)."""
    rows, cols = matrix.shape
    top = max(float(matrix.max()), 1.0 / cols)
    im = ax.imshow(matrix, cmap="viridis", vmin=0.0, vmax=top, aspect="auto",
                   interpolation="nearest")
    ax.set_xlabel(f"parent capsule type ({parent})")
    ax.set_ylabel(f"child capsule type ({child})")
    ax.set_xticks(np.arange(cols) if cols <= 16 else np.arange(0, cols, 4))
    ax.set_yticks(np.arange(rows) if rows <= 16 else np.arange(0, rows, 4))
    if rows * cols <= 100:
        for i in range(rows):
            for o in range(cols):
                ax.text(o, i, f"{matrix[i, o]:.2f}", ha="center", va="center", fontsize=7,
                        color="white" if matrix[i, o] < 0.6 * top else "black")
    if highlight is not None:
        ax.add_patch(matplotlib.patches.Rectangle((highlight - 0.5, -0.5), 1, rows, fill=False,
                                                  edgecolor=_WRONG, lw=2))
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.03,
                 label=f"share of the child type's vote weight (uniform: 1/{cols})")


def _routing_figure(data, n, index, name):
    matrix = data[f"routing/{name}"][n]  # (I, O)
    fig = Figure(figsize=(max(6.0, 2.6 + 0.28 * matrix.shape[1]),
                          max(4.2, 2.2 + 0.2 * matrix.shape[0])), dpi=_DPI)
    ax = fig.add_subplot()
    _matrix_axes(fig, ax, matrix, CHILD_LAYER[name], name)
    ax.set_title(f"{name}: share of each child type's vote weight (activation x\n"
                 f"assignment of the last EM iteration) per parent type, test image {index}",
                 fontsize=8)
    fig.tight_layout()
    return fig


def _class_routing_figure(data, n, index):
    matrix = data[f"routing/{CLASS_LAYER}"][n]  # (D, E)
    pred = int(data["predictions"][n])
    height, width = data["class_grid"]
    fig = Figure(figsize=(13, max(4.2, 2.6 + 0.2 * matrix.shape[0])), dpi=_DPI)
    axes = fig.subplots(1, 3, gridspec_kw={"width_ratios": [1.2, 1, 1]})
    _matrix_axes(fig, axes[0], matrix, "conv_caps2", "class", highlight=pred)
    axes[0].set_title("share of each child type's vote weight\n(activation x assignment) "
                      "per class", fontsize=8)
    for ax, key, what in ((axes[1], "class_routing", "assignment r"),
                          (axes[2], "class_support", "activation x assignment a*r")):
        values = data[key][n]  # (D, H*W)
        im = ax.imshow(values, cmap="viridis", vmin=0.0, vmax=1.0, aspect="auto",
                       interpolation="nearest")
        ax.set_xlabel(f"position h*{width}+w of the {height}x{width} grid")
        ax.set_ylabel("capsule type (conv_caps2)")
        ax.set_yticks(np.arange(0, len(values), 1 if len(values) <= 16 else 4))
        ax.set_title(f"{what} of each ConvCaps2 capsule\nto the predicted class {pred}",
                     fontsize=8)
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.03)
    text, _ = _title(data, n, index)
    fig.suptitle(f"{CLASS_LAYER}: routing of the last EM iteration; {text}", fontsize=9)
    fig.tight_layout()
    return fig


def _poses_figure(data, n, index):
    poses = data["class_poses"][n]  # (E, 4, 4)
    pred = int(data["predictions"][n])
    acts = data["class_activations"][n]
    limit = float(np.abs(poses).max()) or 1.0
    num = len(poses)
    fig = Figure(figsize=(1.1 * num + 1.0, 2.3), dpi=_DPI)
    fig.subplots_adjust(left=0.02, right=0.9, bottom=0.05, top=0.68, wspace=0.15)
    axes = fig.subplots(1, num, squeeze=False)[0]
    for j, ax in enumerate(axes):
        im = ax.imshow(poses[j], cmap="RdBu_r", vmin=-limit, vmax=limit,
                       interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        mine = j == pred
        ax.set_title(f"class {j}\na={acts[j]:.2f}", fontsize=8,
                     fontweight="bold" if mine else "normal", color=_WRONG if mine else "black")
        for spine in ax.spines.values():
            spine.set_edgecolor(_WRONG if mine else "black")
            spine.set_linewidth(3 if mine else 0.5)
    fig.colorbar(im, cax=fig.add_axes([0.92, 0.08, 0.012, 0.58]), label="pose element")
    text, _ = _title(data, n, index)
    fig.suptitle(f"{CLASS_LAYER}: 4x4 pose matrices (predicted class framed); {text}",
                 fontsize=9)
    return fig


def _pose_study_figure(data, n, index):
    study = data["pose_study"][n]  # (16, S)
    changed = data["pose_study_predictions"][n] != data["predictions"][n]  # (16, S)
    offsets = data["pose_offsets"]
    pred = int(data["predictions"][n])
    fig = Figure(figsize=(7.5, 6.4), dpi=_DPI)
    ax = fig.add_subplot()
    im = ax.imshow(study, cmap="viridis", aspect="auto", interpolation="nearest")
    ax.set_xticks(np.arange(len(offsets)))
    ax.set_xticklabels([f"{d:+.3g}" for d in offsets], rotation=90, fontsize=7)
    ax.set_yticks(np.arange(16))
    ax.set_yticklabels([f"[{h // 4},{h % 4}]" for h in range(16)], fontsize=7)
    ax.set_xlabel("offset delta added to the pose element")
    ax.set_ylabel("pose element [row, column]")
    rows, cols = np.nonzero(changed)
    if len(rows):
        ax.plot(cols, rows, "x", color=_WRONG, markersize=6, label="prediction changes")
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), fontsize=7, frameon=False)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.03, label=f"activation of class {pred}")
    text, _ = _title(data, n, index)
    ax.set_title(f"{text}\nactivation of class {pred} recomputed by {CLASS_LAYER} when "
                 f"delta is added to one pose\nelement of every ConvCaps2 capsule "
                 f"(all positions and types; their pose elements' RMS: "
                 f"{data['pose_rms'][n]:.3g})", fontsize=8)
    fig.tight_layout()
    return fig


def figures(data, n, index, dataset=None):
    """The matplotlib figures of image `n` of `picture_data`'s `data`.

    Args:
      data: `picture_data(...)` (with the pose study, to get `pose_study`).
      n: the image's index in the batch.
      index: its index in the test set (for the titles).
      dataset: the dataset's name (how to show the image: `display_images`).

    Returns:
      `{picture: matplotlib.figure.Figure}` for the `PICTURES` (without
      `pose_study` if `data` has none).
    """
    out = {"input": _input_figure(data, n, index, dataset)}
    for name in GRID_LAYERS:
        out[f"activations_{name}"] = _activation_grid_figure(data, n, index, name)
    out[f"activations_{CLASS_LAYER}"] = _class_activation_figure(data, n, index)
    for name in ROUTING_LAYERS[:-1]:
        out[f"routing_{name}"] = _routing_figure(data, n, index, name)
    out[f"routing_{CLASS_LAYER}"] = _class_routing_figure(data, n, index)
    out["poses"] = _poses_figure(data, n, index)
    if "pose_study" in data:
        out["pose_study"] = _pose_study_figure(data, n, index)
    return out


# ---------------------------------------------------------------------------
# visualize.py
# ---------------------------------------------------------------------------


def _check_int(name, value, minimum):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ConfigError(f"{name} must be an int >= {minimum}, got {value!r}")
    return int(value)


def check_out_dir(out_dir, names, overwrite=False):
    """Refuses an `out_dir` that holds any of `names` (unless `overwrite`) or is not a directory.

    Raises:
      ConfigError: naming the first file that exists (or `out_dir`).
    """
    outputs.check_out_dir(out_dir, names, "visualize.py", overwrite)


def load_test_images(config, first_image, num_images, dataset_dir=None):
    """Test images `first_image ..` of a run's dataset, preprocessed as the network sees them.

    Args:
      config: the run's `TrainConfig` (dataset, data_source, dataset_dir).
      first_image: index of the first image in the test set.
      num_images: how many images.
      dataset_dir: the data's directory (default: `config.dataset_dir`).

    Returns:
      `(images (num_images, H, W, C) float32, labels (num_images,) int)` arrays.

    Raises:
      DataError: the data cannot be read, or the test set is too small.
    """
    ds = datasets.make_dataset(config.dataset, "test",
                               dataset_dir=dataset_dir or config.dataset_dir,
                               data_source=config.data_source, batch_size=256)
    ds = ds.unbatch().skip(first_image).take(num_images).batch(num_images)
    images, labels = None, None
    for images, labels in ds:  # one batch, or none
        pass
    count = 0 if images is None else int(images.shape[0])
    if count < num_images:
        size = f"{first_image + count}" if count else f"at most {first_image}"
        raise DataError(f"--first_image={first_image} --num_images={num_images} needs "
                        f"{first_image + num_images} test images, the {config.dataset} test set "
                        f"has {size}")
    return images.numpy(), labels.numpy()


def visualize(log_dir, out_dir, checkpoint=None, num_images=4, first_image=0, dataset_dir=None,
              overwrite=False, pose_offset=POSE_OFFSET, pose_steps=POSE_STEPS, log=print):
    """Writes the PNGs of `PICTURES` for test images of a training run's network.

    The network is `capsem.training.load_trained(log_dir, checkpoint)`; the
    images are test images `first_image .. first_image + num_images - 1` of
    the run's dataset. Image `k` gets the files `image<k>_<picture>.png`
    (`file_names`), one per picture of `PICTURES`; nothing is written if
    `out_dir` holds any of them, unless `overwrite`.

    Args:
      log_dir: the log_dir of a train.py run (with config.json and checkpoints).
      out_dir: directory of the PNGs (created if needed).
      checkpoint: a checkpoint prefix (default: the latest in log_dir).
      num_images: how many test images.
      first_image: the test-set index of the first image.
      dataset_dir: the data's directory (default: the run's).
      overwrite: replace files of the same names in `out_dir`.
      pose_offset: the pose study's offsets span `[-pose_offset, pose_offset]`.
      pose_steps: number of offsets of the pose study.
      log: called with a line of text per written file and a summary line.

    Returns:
      the paths of the written files, in `file_names` order.

    Raises:
      CapsemError: a bad argument, an `out_dir` file that exists, or a
        log_dir, checkpoint or dataset that cannot be read (one-line message).
    """
    # Imported here: capsem.training imports this module (write_image_summaries).
    from capsem import training

    num_images = _check_int("num_images", num_images, 1)
    first_image = _check_int("first_image", first_image, 0)
    offsets = pose_offsets(pose_offset, pose_steps)
    indices = list(range(first_image, first_image + num_images))
    names = file_names(indices)
    check_out_dir(out_dir, names, overwrite)
    model, config, path, step = training.load_trained(log_dir, checkpoint, ("capsules",),
                                                      "visualize.py")
    images, labels = load_test_images(config, first_image, num_images, dataset_dir)
    data = picture_data(model, images, labels, offsets)
    os.makedirs(out_dir, exist_ok=True)
    written = []
    for n, index in enumerate(indices):
        for picture, fig in figures(data, n, index, config.dataset).items():
            out = os.path.join(out_dir, f"image{index}_{picture}.png")
            fig.savefig(out, dpi=_DPI)
            written.append(out)
            log(f"wrote {out}")
    right = int(np.sum(data["predictions"] == labels))
    log(f"{len(written)} files for {num_images} test image(s) of {config.dataset} in {out_dir} "
        f"(checkpoint {path}, step {step}, {right} of {num_images} predicted right)")
    return written


# ---------------------------------------------------------------------------
# TensorBoard
# ---------------------------------------------------------------------------


def _rgb(values, cmap):
    """Values in [0, 1] (NaN: the border) to uint8 RGB with a matplotlib colormap."""
    colors = matplotlib.colormaps[cmap](np.nan_to_num(np.clip(values, 0, 1)))[..., :3]
    colors[np.isnan(values)] = (1.0, 1.0, 1.0)
    return np.round(255 * colors).astype(np.uint8)


def _upscale(x, factor, axes=(1, 2)):
    for axis in axes:
        x = np.repeat(x, factor, axis=axis)
    return x


def _factor(size, target):
    """The integer scale that makes `size` pixels at least `target` (nearest-neighbour)."""
    return max(1, math.ceil(target / max(1, size)))


def summary_images(data, dataset=None):
    """The TensorBoard pictures of `picture_data`'s `data`, as uint8 images.

    Tags (`SUMMARY_TAGS`, under `SUMMARY_PREFIX`):

    * `input`: the images (`display_images`);
    * `activations/<layer>` for primary_caps, conv_caps1, conv_caps2: the
      activation maps tiled as in the PNGs (nearest-neighbour upscaled to at
      least 32 pixels), viridis on 0..1, white borders;
    * `activations/class_capsules`: bars of the class activations (height
      48 pixels = 1): the true class green, a wrong prediction red, the
      others grey;
    * `routing/<layer>`: `routing_matrices`, child types down, parent types
      across, viridis from 0 to the image's largest share;
    * `class_poses`: the class capsules' 4x4 poses side by side, divided by
      the image's largest magnitude, RdBu (0 white, positive red); the
      predicted class framed in black.

    Args:
      data: `picture_data(...)` (the pose study is not used).
      dataset: the dataset's name, for `display_images`.

    Returns:
      `{tag: uint8 array (N, height, width, channels)}`.
    """
    n = len(data["predictions"])
    out = {"input": display_images(data["images"], dataset)}
    for name in GRID_LAYERS:
        maps = data[f"activations/{name}"]  # (N, H, W, T)
        maps = _upscale(maps, _factor(min(maps.shape[1:3]), 32))
        out[f"activations/{name}"] = _rgb(tile_maps(maps, border=2), "viridis")
    acts = data["class_activations"]  # (N, E)
    height, bar, gap = 48, 6, 2
    bars = np.zeros((n, height, acts.shape[1] * (bar + gap) + gap, 3), np.uint8)
    rows = np.arange(height)[::-1]  # pixel row -> height above the bottom
    for i in range(n):
        for j, a in enumerate(acts[i]):
            color = (160, 160, 160)
            if data["labels"] is not None and j == int(data["labels"][i]):
                color = (40, 180, 60)
            elif j == int(data["predictions"][i]) and data["labels"] is not None:
                color = (220, 40, 40)
            filled = rows < round(float(a) * height)  # (height,)
            bars[i, filled, gap + j * (bar + gap):gap + j * (bar + gap) + bar] = color
    out[f"activations/{CLASS_LAYER}"] = bars
    for name in ROUTING_LAYERS:
        matrix = data[f"routing/{name}"]  # (N, I, O)
        top = np.maximum(matrix.max(axis=(1, 2), keepdims=True), 1.0 / matrix.shape[2])
        out[f"routing/{name}"] = _rgb(
            _upscale(matrix / top, _factor(min(matrix.shape[1:]), 32)), "viridis")
    poses = data["class_poses"]  # (N, E, 4, 4)
    limit = np.maximum(np.abs(poses).max(axis=(1, 2, 3), keepdims=True), 1e-12)
    scaled = 0.5 + 0.5 * poses / limit  # (N, E, 4, 4) in [0, 1]
    scale, frame = 8, 2
    size = 4 * scale + 2 * frame
    strip = np.full((n, size, poses.shape[1] * size, 3), 255, np.uint8)
    tiles = _rgb(_upscale(scaled, scale, axes=(2, 3)), "RdBu_r")  # (N, E, 32, 32, 3)
    for i in range(n):
        for j in range(poses.shape[1]):
            x0 = j * size
            if j == int(data["predictions"][i]):
                strip[i, :, x0:x0 + size] = 0
            strip[i, frame:size - frame, x0 + frame:x0 + size - frame] = tiles[i, j]
    out["class_poses"] = strip
    return {SUMMARY_PREFIX + tag: images for tag, images in out.items()}


def write_image_summaries(model, images, labels=None, step=None, max_outputs=4, dataset=None,
                          outputs=None):
    """Writes TensorBoard images of a batch's capsules and routing.

    Call inside `with writer.as_default(step=step):` (or pass `step`). Writes
    the `SUMMARY_TAGS` (`summary_images`: the input, the activation maps of
    primary_caps, conv_caps1 and conv_caps2, the class activations, the
    routing matrices of the three routing layers and the class poses) for
    the first `max_outputs` images; no pose study (it runs the class layer
    16 * POSE_STEPS times per image). One pass of the network layer by
    layer (`capsule_outputs`) plus numpy: no matplotlib.

    Args:
      model: a model from `capsem.nets.capsules_net`.
      images: preprocessed images `(N, H, W, C)`.
      labels: `(N,)` true classes, or None.
      step: the summary step (default: the writer's default step).
      max_outputs: at most this many images are pictured.
      dataset: the dataset's name, for `display_images` (None: stretch each
        image to 0..255).
      outputs: `capsule_outputs(model, images[:max_outputs])` if the caller
        has them; None: computed here.

    Returns:
      the tags written.
    """
    images = images[:max_outputs]
    if labels is not None:
        labels = np.asarray(labels)[:max_outputs]
    data = picture_data(model, images, labels, outputs=outputs)
    pictures = summary_images(data, dataset)
    for tag, values in pictures.items():
        tf.summary.image(tag, values, step=step, max_outputs=max_outputs)
    return list(pictures)
