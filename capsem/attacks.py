"""White-box adversarial attacks on a trained network: FGSM and BIM (paper Sec. 6).

Hinton, Sabour & Frosst, "Matrix capsules with EM routing" (ICLR 2018), Sec. 6
and Fig. 3, compare the capsule network with the baseline CNN
(`capsem.baseline`) under two white-box attacks:

* FGSM (Goodfellow et al. 2014): "computes the gradient of the loss w.r.t.
  each pixel intensity and then changes the pixel intensity by a fixed
  amount epsilon in the direction that increases the loss". A targeted
  attack instead updates the input "to maximize the classification
  probability of a particular wrong class": it steps by epsilon against the
  gradient of the loss of the target class (`fgsm`).
* BIM, the Basic Iterative Method (Kurakin et al. 2016), "the aforementioned
  attack except it takes multiple smaller steps": `steps` steps of
  `step_size`, each followed by clipping to the epsilon ball around the
  clean image and to the valid input range (`bim`). The paper gives neither
  the number of steps nor the step size; the defaults here (10 steps of
  1.25 epsilon / steps) follow Kurakin et al. (2016), Sec. 2.1, whose steps
  add up to 1.25 epsilon.

The gradient flows through every EM iteration of the capsule network (its
routing is differentiable; `AttackModel` compiles the gradient with the same
native or XLA kernels as training, `capsem.step`).

The loss of the attacks: the CNN's training loss, the softmax cross-entropy
of its logits (`capsem.baseline.cross_entropy_loss`); for the capsule network
the spread loss at margin 1 (`capsule_attack_loss`). The paper does not say
which margin; at its training margins (0.2 to 0.9) the loss of a confidently
classified image is exactly 0 with a zero gradient, and FGSM would not move
it at all, which would mask the gradient rather than measure robustness. At
margin 1, the squared hinge loss of Sec. 4.1, every wrong class lies within
the margin because activations are in (0, 1), so the loss always has a
gradient.

What is measured (`attack_curve`), per epsilon:

* untargeted attacks: `accuracy`, the fraction of the attacked images still
  classified right (Fig. 3, left), and `success_rate`, the fraction of the
  images classified right before the attack that are classified wrong
  after it;
* targeted attacks (Fig. 3, right): `success_rate`, the fraction of
  (image, target) pairs classified as the target after the attack, over
  every wrong class of each image ("all", the paper's average over the
  possible targets) or over one wrong class drawn at random per image
  ("random": the same expected value at 1 / (classes - 1) of the cost);
  `accuracy`, the fraction of pairs still classified as the true class.

Units of epsilon: the attacks work on the network's input, the preprocessed
image; for MNIST and Fashion-MNIST `(x - 128) / 128` of the uint8 pixels, so
the valid input range is [-1, 127/128] (`PREPROCESSED_RANGE`) and one pixel
level is 1/128. The paper's epsilon is a change of its network's input too
(its smallNORB images are normalised to zero mean and unit variance per
image). `to_input_units` converts an epsilon given as a fraction of the
0-255 pixel range ("pixel" units, the scale of FGSM's usual MNIST
epsilons on [0, 1] images): input epsilon = pixel epsilon * 255 / 128.
"""

import csv
import glob
import math
import os
import time

import numpy as np
import tensorflow as tf

from capsem import baseline, datasets, losses, outputs, training, visualize
from capsem import step as step_lib
from capsem.errors import ConfigError

#: The valid range of a preprocessed MNIST / Fashion-MNIST image
#: (`capsem.datasets.preprocess_image`: uint8 0..255 -> -1 .. 127/128).
PREPROCESSED_RANGE = (-1.0, 127.0 / 128.0)

#: Valid input ranges per dataset; smallNORB images are standardised per image
#: (`capsem.datasets`) and have no fixed range (None: only the epsilon ball bounds them).
INPUT_RANGES = {"mnist": PREPROCESSED_RANGE, "fashion_mnist": PREPROCESSED_RANGE,
                "smallnorb": None}

#: 1.0 in "pixel" units (the whole 0-255 pixel range) is this much in input units.
PIXEL_UNIT = 255.0 / 128.0

EPSILON_UNITS = ("input", "pixel")
ATTACKS = ("fgsm", "bim")
TARGET_CLASSES = ("random", "all")

#: The spread-loss margin of the capsule network's attack loss (`capsule_attack_loss`).
CAPSULE_ATTACK_MARGIN = 1.0

#: The BIM step size when none is given: `BIM_STEP_FACTOR * epsilon / steps` (Kurakin et
#: al. 2016, Sec. 2.1: steps of one pixel level, min(eps + 4, 1.25 eps) of them).
BIM_STEP_FACTOR = 1.25

#: Columns of attacks.csv, in order.
CSV_COLUMNS = ("model", "log_dir", "checkpoint", "step", "attack", "targeted", "target_classes",
               "epsilon", "epsilon_units", "epsilon_input", "bim_steps", "bim_step_size_input",
               "images", "attacks", "clean_accuracy", "accuracy", "success_rate",
               "zero_gradient_fraction", "seconds")

#: The files `run` writes in its output directory (and refuses to replace without `overwrite`).
CSV_FILE = "attacks.csv"
PNG_FILE = "attacks.png"
TENSORBOARD_DIR = "tensorboard"
OUTPUTS = (CSV_FILE, PNG_FILE, TENSORBOARD_DIR)


# ---------------------------------------------------------------------------
# Losses and the compiled gradient
# ---------------------------------------------------------------------------


def capsule_attack_loss(labels, activations):
    """The capsule network's attack loss: the spread loss at margin 1, summed over the batch.

    `sum_n sum_{i != t_n} (1 - (a_t - a_i))^2`, the squared hinge loss (paper
    Sec. 4.1: "Spread loss is equivalent to squared Hinge loss with m = 1"):
    its gradient is not 0 while activations are in (0, 1) (see the module
    docstring).
    """
    return losses.spread_loss_from_labels(labels, activations, CAPSULE_ATTACK_MARGIN)


def attack_loss(model):
    """The attack loss `(labels, scores) -> summed scalar` of a `TrainConfig.model`.

    "capsules": `capsule_attack_loss`; "cnn": the softmax cross-entropy of
    the logits (`capsem.baseline.cross_entropy_loss`, its training loss).
    """
    if model == "capsules":
        return capsule_attack_loss
    if model == "cnn":
        return lambda labels, logits: baseline.cross_entropy_loss(labels, logits)
    raise ConfigError(f"model must be one of capsules, cnn, got {model!r}")


class AttackModel:
    """A network under attack: the gradient of its attack loss w.r.t. its input, compiled.

    Calling it with `(images (N, H, W, C), labels (N,))` returns
    `(gradient (N, H, W, C), scores (N, E))` as numpy arrays: the gradient of
    the loss (summed over the batch: no layer mixes examples, so row n is the
    gradient of example n's loss) and the class scores of `images` (the
    activations of the class capsules, or the CNN's logits). `scores(images)`
    returns the class scores alone. Both run in inference mode
    (`training=False`: no dropout) as compiled TensorFlow functions
    (`capsem.step.make_eval_step`'s compilation: the capsule routing in the
    native or XLA kernels, differentiated through all EM iterations). Inputs
    are processed in batches of exactly `batch_size` (the last one padded)
    so that each function is traced once.

    Args:
      model: a network whose `model(images, training=False)` is
        `(poses or features, scores)` (`capsem.nets.capsules_net`,
        `capsem.baseline.cnn_net`).
      loss_fn: `(labels, scores) -> scalar` (`attack_loss`).
      batch_size: examples per compiled call.
      jit_compile, routing_kernels: as in `capsem.step.TrainStep`.
    """

    def __init__(self, model, loss_fn, batch_size=100, jit_compile=True,
                 routing_kernels="auto"):
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigError(f"batch_size must be a positive int, got {batch_size!r}")
        self.model = model
        self.loss_fn = loss_fn
        self.batch_size = batch_size
        kernels = step_lib.resolve_routing_kernels(routing_kernels, step_lib.compute_devices())
        self._gradient = step_lib._compile(self._loss_gradient, jit_compile, kernels)
        self._scores = step_lib._compile(lambda images: self.model(images, training=False)[1],
                                         jit_compile, kernels)

    @classmethod
    def from_trained(cls, model, config, batch_size=100):
        """The `AttackModel` of a trained network and its `TrainConfig` (`load_trained`)."""
        return cls(model, attack_loss(config.model), batch_size=batch_size,
                   jit_compile=config.jit_compile, routing_kernels=config.routing_kernels)

    def _loss_gradient(self, images, labels):
        with tf.GradientTape() as tape:
            tape.watch(images)
            _, scores = self.model(images, training=False)
            loss = self.loss_fn(labels, scores)
        return tape.gradient(loss, images), scores

    def _batches(self, arrays):
        """Yields (number of real rows, arrays padded to batch_size) per batch."""
        size = len(arrays[0])
        for start in range(0, size, self.batch_size):
            chunk = [a[start:start + self.batch_size] for a in arrays]
            count = len(chunk[0])
            if count < self.batch_size:
                chunk = [np.concatenate([c, np.zeros((self.batch_size - count,) + c.shape[1:],
                                                     c.dtype)]) for c in chunk]
            yield count, chunk

    def __call__(self, images, labels):
        images = np.asarray(images, np.float32)
        labels = np.asarray(labels, np.int32)
        grads, scores = [], []
        for count, (x, y) in self._batches([images, labels]):
            g, s = self._gradient(tf.constant(x), tf.constant(y))
            grads.append(g.numpy()[:count])
            scores.append(s.numpy()[:count])
        return np.concatenate(grads), np.concatenate(scores)

    def scores(self, images):
        """The class scores `(N, E)` of `images` (inference mode)."""
        images = np.asarray(images, np.float32)
        return np.concatenate([self._scores(tf.constant(x)).numpy()[:count]
                               for count, (x,) in self._batches([images])])


# ---------------------------------------------------------------------------
# The attacks
# ---------------------------------------------------------------------------


def to_input_units(epsilon, units, dataset="mnist"):
    """An epsilon in input units (the preprocessed image's scale, see the module docstring).

    Args:
      epsilon: the value, >= 0.
      units: "input" (returned as it is) or "pixel" (a fraction of the 0-255
        pixel range, MNIST-like datasets only: times `PIXEL_UNIT`).
      dataset: the network's dataset.

    Raises:
      ConfigError: unknown units, or "pixel" for a dataset without a pixel scale.
    """
    if units not in EPSILON_UNITS:
        raise ConfigError(f"epsilon units must be one of {', '.join(EPSILON_UNITS)}, "
                          f"got {units!r}")
    if units == "input":
        return float(epsilon)
    if INPUT_RANGES.get(dataset) is None:
        raise ConfigError(f"epsilon units 'pixel' need images preprocessed as (x - 128) / 128 "
                          f"(mnist, fashion_mnist); {dataset} images are standardised per "
                          f"image: use units 'input'")
    return float(epsilon) * PIXEL_UNIT


def _check_epsilon(name, value):
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating)) or not (
            math.isfinite(value) and value >= 0):
        raise ConfigError(f"{name} must be a finite number >= 0, got {value!r}")
    return float(value)


def _prepare(images, bounds):
    images = np.asarray(images, np.float32)
    if bounds is not None:
        low, high = bounds
        if images.size and (images.min() < low or images.max() > high):
            raise ConfigError(f"images must lie in the valid input range [{low:g}, {high:g}], "
                              f"got values in [{images.min():g}, {images.max():g}]")
    return images


def _clip(images, low, high):
    return np.clip(images, low, high).astype(np.float32)


def _direction(labels, targets):
    """The labels whose loss the attack follows and the sign of its steps."""
    if targets is None:
        return np.asarray(labels), 1.0  # up the loss of the true class
    targets = np.asarray(targets)
    if targets.shape != np.shape(labels):
        raise ConfigError(f"targets must have the shape of labels {np.shape(labels)}, got "
                          f"{targets.shape}")
    return targets, -1.0  # down the loss of the target class


def fgsm(model_fn, images, labels, epsilon, targets=None, bounds=PREPROCESSED_RANGE,
         stats=None):
    """The Fast Gradient Sign Method (paper Sec. 6; Goodfellow et al. 2014).

    Untargeted: `x + epsilon * sign(grad_x L(x, label))`; targeted:
    `x - epsilon * sign(grad_x L(x, target))` (the target's loss goes down,
    its classification probability up); then clipped to `bounds`. Every
    pixel moves by exactly epsilon except where the clipping stops it and
    where the gradient is exactly 0 (sign 0: the pixel stays).

    Args:
      model_fn: an `AttackModel`, or any callable `(images, labels) ->
        (gradient of the summed loss w.r.t. images, class scores)`.
      images: `(N, H, W, C)` clean images in input units, inside `bounds`.
      labels: `(N,)` true labels.
      epsilon: the size of the step, in input units (`to_input_units`).
      targets: None (untargeted) or `(N,)` target classes.
      bounds: `(low, high)` valid input range (`PREPROCESSED_RANGE`), or None.
      stats: None, or a dict that receives `zero_gradients`, the number of
        gradient elements that are exactly 0.

    Returns:
      the adversarial images, float32 `(N, H, W, C)`.
    """
    epsilon = _check_epsilon("epsilon", epsilon)
    images = _prepare(images, bounds)
    attack_labels, sign = _direction(labels, targets)
    grad, _ = model_fn(images, attack_labels)
    if stats is not None:
        stats["zero_gradients"] = int(np.sum(grad == 0))
    adversarial = images + np.float32(sign * epsilon) * np.sign(grad).astype(np.float32)
    low, high = bounds if bounds is not None else (-np.inf, np.inf)
    return _clip(adversarial, low, high)


def bim(model_fn, images, labels, epsilon, steps, step_size, targets=None,
        bounds=PREPROCESSED_RANGE, stats=None):
    """The Basic Iterative Method (paper Sec. 6; Kurakin et al. 2016).

    `steps` FGSM steps of `step_size` (`fgsm`'s direction, untargeted or
    targeted), each followed by clipping to the epsilon ball around the clean
    images, `[x - epsilon, x + epsilon]`, and to `bounds`: the result stays
    inside both.

    Args:
      model_fn, images, labels, targets, bounds: as in `fgsm`.
      epsilon: the radius of the ball (L-infinity), in input units.
      steps: the number of steps (>= 1).
      step_size: the size of each step, in input units (Kurakin et al. 2016:
        one pixel level; `attack_curve`'s default: 1.25 epsilon / steps).
      stats: None, or a dict that receives `zero_gradients` of the first step.

    Returns:
      the adversarial images, float32 `(N, H, W, C)`.
    """
    epsilon = _check_epsilon("epsilon", epsilon)
    step_size = _check_epsilon("step_size", step_size)
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
        raise ConfigError(f"steps must be a positive int, got {steps!r}")
    images = _prepare(images, bounds)
    attack_labels, sign = _direction(labels, targets)
    low, high = images - np.float32(epsilon), images + np.float32(epsilon)
    if bounds is not None:
        low, high = np.maximum(low, np.float32(bounds[0])), np.minimum(high, np.float32(bounds[1]))
    adversarial = images
    for step in range(steps):
        grad, _ = model_fn(adversarial, attack_labels)
        if step == 0 and stats is not None:
            stats["zero_gradients"] = int(np.sum(grad == 0))
        adversarial = _clip(adversarial + np.float32(sign * step_size)
                            * np.sign(grad).astype(np.float32), low, high)
    return adversarial


def target_pairs(labels, num_classes, target_classes="random", seed=0):
    """The (image index, target class) pairs of a targeted attack.

    Args:
      labels: `(N,)` true labels.
      num_classes: the number of classes E.
      target_classes: "all": every wrong class of every image (N (E - 1)
        pairs, the paper's average over the possible targets, Fig. 3);
        "random": one wrong class per image, uniformly drawn with `seed`.
      seed: the seed of "random".

    Returns:
      `(indices (P,), targets (P,))` int arrays.
    """
    labels = np.asarray(labels, np.int64)
    if target_classes == "all":
        indices = np.repeat(np.arange(len(labels)), num_classes - 1)
        offsets = np.tile(np.arange(1, num_classes), len(labels))
    elif target_classes == "random":
        indices = np.arange(len(labels))
        offsets = np.random.default_rng(seed).integers(1, num_classes, len(labels))
    else:
        raise ConfigError(f"target_classes must be one of {', '.join(TARGET_CLASSES)}, "
                          f"got {target_classes!r}")
    return indices, (labels[indices] + offsets) % num_classes


def _format_seconds(seconds):
    seconds = int(max(0, seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def attack_curve(model_fn, images, labels, epsilons, attack="fgsm", targeted=False, *,
                 num_classes=None, bim_steps=10, bim_step_size=None,
                 bounds=PREPROCESSED_RANGE, target_classes="random", seed=0, log=None,
                 name="", log_every_secs=10.0):
    """Success rate and accuracy of an attack at each epsilon (paper Sec. 6, Fig. 3).

    Args:
      model_fn: an `AttackModel` (or a callable as in `fgsm`; then the
        predictions come from its second output).
      images: `(N, H, W, C)` clean images (input units, inside `bounds`).
      labels: `(N,)` true labels.
      epsilons: the epsilons, in input units.
      attack: "fgsm" or "bim".
      targeted: attack towards wrong classes (`target_pairs`) instead of away
        from the true one.
      num_classes: number of classes (default: the width of the scores).
      bim_steps: BIM's number of steps.
      bim_step_size: BIM's step in input units; None: `BIM_STEP_FACTOR *
        epsilon / bim_steps` at each epsilon.
      bounds: the valid input range (None: none).
      target_classes, seed: see `target_pairs`.
      log: None, or called with progress lines (at most every
        `log_every_secs`, and at the end of every epsilon).
      name: a prefix of the progress lines (e.g. the model).

    Returns:
      a list of dicts, one per epsilon: `epsilon` (input units),
      `bim_step_size` (None for FGSM), `images`, `attacks` (the number of
      attacked (image, target) pairs), `clean_accuracy`, `accuracy`,
      `success_rate` (definitions in the module docstring; NaN for an
      untargeted attack when no image was classified right),
      `zero_gradient_fraction` (of the gradient at the clean images, the
      paper's check for masked gradients, Sec. 6) and `seconds`.
    """
    if attack not in ATTACKS:
        raise ConfigError(f"attack must be one of {', '.join(ATTACKS)}, got {attack!r}")
    epsilons = [_check_epsilon("epsilon", e) for e in epsilons]
    images = _prepare(images, bounds)
    labels = np.asarray(labels, np.int64)
    scores_fn = getattr(model_fn, "scores", None) or (lambda x: model_fn(x, np.zeros(
        len(x), np.int32))[1])
    clean_scores = scores_fn(images)
    clean_pred = np.argmax(clean_scores, axis=-1)
    if targeted:
        indices, targets = target_pairs(labels, num_classes or int(clean_scores.shape[-1]),
                                        target_classes, seed)
    else:
        indices, targets = np.arange(len(labels)), None
    chunk = getattr(model_fn, "batch_size", None) or len(indices) or 1
    passes = 1 + (bim_steps if attack == "bim" else 1)  # model evaluations per attack
    rows = []
    for epsilon in epsilons:
        step_size = None
        if attack == "bim":
            step_size = (bim_step_size if bim_step_size is not None
                         else BIM_STEP_FACTOR * epsilon / bim_steps)
        start = last_log = time.time()
        predictions, zeros = [], 0
        for first in range(0, len(indices), chunk):
            idx = indices[first:first + chunk]
            tgt = None if targets is None else targets[first:first + chunk]
            stats = {}
            if attack == "fgsm":
                adversarial = fgsm(model_fn, images[idx], labels[idx], epsilon, tgt, bounds,
                                   stats)
            else:
                adversarial = bim(model_fn, images[idx], labels[idx], epsilon, bim_steps,
                                  step_size, tgt, bounds, stats)
            zeros += stats["zero_gradients"]
            predictions.append(np.argmax(scores_fn(adversarial), axis=-1))
            done = first + len(idx)
            now = time.time()
            if log is not None and (now - last_log >= log_every_secs or done == len(indices)):
                rate = done / max(now - start, 1e-9)
                log(f"{name}{attack} {'targeted' if targeted else 'untargeted'} epsilon "
                    f"{epsilon:g}: {done}/{len(indices)} attacks, {rate:.1f} attacks/s "
                    f"({rate * passes:.1f} images/s through the network), ETA "
                    f"{_format_seconds((len(indices) - done) / rate)}")
                last_log = now
        pred = np.concatenate(predictions) if predictions else np.zeros(0, np.int64)
        true = labels[indices]
        if targeted:
            success = float(np.mean(pred == targets)) if len(pred) else float("nan")
        else:
            correct = clean_pred[indices] == true
            success = (float(np.mean(pred[correct] != true[correct])) if np.any(correct)
                       else float("nan"))
        rows.append({
            "epsilon": epsilon, "bim_step_size": step_size, "images": int(len(images)),
            "attacks": int(len(indices)),
            "clean_accuracy": float(np.mean(clean_pred == labels)) if len(labels) else float(
                "nan"),
            "accuracy": float(np.mean(pred == true)) if len(pred) else float("nan"),
            "success_rate": success,
            "zero_gradient_fraction": zeros / max(len(indices) * images[0].size, 1),
            "seconds": time.time() - start})
    return rows


# ---------------------------------------------------------------------------
# attack.py: the experiment, its CSV, TensorBoard scalars and figure
# ---------------------------------------------------------------------------


def check_out_dir(out_dir, overwrite=False):
    """Refuses an `out_dir` that holds one of `OUTPUTS` (unless `overwrite`) or is a file.

    Raises:
      ConfigError: naming the first output that exists (or `out_dir`).
    """
    outputs.check_out_dir(out_dir, OUTPUTS, "attack.py", overwrite)


def _write_atomically(path, write):
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_csv(rows, path):
    """Writes the rows of `run` (dicts with `CSV_COLUMNS`) as a CSV file, atomically."""
    def write(tmp):
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, CSV_COLUMNS)
            writer.writeheader()
            for row in rows:
                writer.writerow({k: ("" if row.get(k) is None else row[k]) for k in CSV_COLUMNS})
    _write_atomically(path, write)


#: Colours per model and line styles per attack of `plot_curves`.
_COLOURS = ("tab:blue", "tab:orange", "tab:green", "tab:red")
_STYLES = {"fgsm": "-", "bim": "--"}


def plot_curves(rows, path, epsilon_units="input", num_classes=None):
    """The paper's Fig. 3 from the rows of `run`, as a PNG (matplotlib, Agg).

    Left: accuracy after the untargeted attacks against epsilon; right: the
    success rate of the targeted attacks (of the untargeted ones when no
    targeted attack ran) against epsilon. One colour per model (capsules
    and CNN on the same axes), solid lines for FGSM, dashed for BIM.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    models = list(dict.fromkeys(r["model"] for r in rows))
    colours = {m: _COLOURS[i % len(_COLOURS)] for i, m in enumerate(models)}
    any_targeted = any(r["targeted"] for r in rows)
    fig = Figure(figsize=(11, 4.2))
    FigureCanvasAgg(fig)
    left, right = fig.subplots(1, 2)
    panels = ((left, False, "accuracy", "Accuracy after the untargeted attack"),
              (right, any_targeted, "success_rate",
               "Success rate of the targeted attack" if any_targeted
               else "Success rate of the untargeted attack"))
    for ax, targeted, key, title in panels:
        for model in models:
            for attack in ATTACKS:
                curve = sorted((r["epsilon"], r[key]) for r in rows if r["model"] == model
                               and r["attack"] == attack and r["targeted"] == targeted)
                if curve:
                    xs, ys = zip(*curve)
                    ax.plot(xs, ys, _STYLES[attack], marker="o", markersize=3,
                            color=colours[model], label=f"{model} {attack.upper()}")
        if key == "accuracy" and num_classes:
            ax.axhline(1.0 / num_classes, color="grey", linestyle=":", linewidth=1,
                       label="chance")
        ax.set_title(title)
        ax.set_xlabel(f"epsilon ({epsilon_units} units)")
        ax.set_ylabel("accuracy" if key == "accuracy" else "success rate")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
    fig.tight_layout()
    _write_atomically(path, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))


def _model_names(configs, log_dirs):
    """A name per model: its kind, with the log_dir's name where two have the same kind."""
    kinds = [c.model for c in configs]
    return [kind if kinds.count(kind) == 1 else
            f"{kind}_{os.path.basename(os.path.normpath(d))}_{i + 1}"
            for i, (kind, d) in enumerate(zip(kinds, log_dirs))]


def run(log_dirs, out_dir, *, checkpoints=None, epsilons=(0.0, 0.05, 0.1, 0.2, 0.3),
        epsilon_units="input", attacks=ATTACKS, untargeted=True, targeted=False,
        target_classes="random", bim_steps=10, bim_step_size=None, num_images=1000,
        first_image=0, dataset_dir=None, batch_size=100, seed=0, overwrite=False, log=print):
    """Attacks the networks of training runs and writes attacks.csv, TensorBoard and attacks.png.

    For every log_dir (a capsule network and the CNN, say), every attack of
    `attacks` and every mode (untargeted, targeted), `attack_curve` on the
    same test images. After each curve, `out_dir/attacks.csv` (one row per
    model, attack, mode and epsilon; `CSV_COLUMNS`) and `out_dir/attacks.png`
    (`plot_curves`) are rewritten with the rows so far, and the scalars
    `attack/<model>/<attack>_<mode>/{success_rate,accuracy}` are written to
    `out_dir/tensorboard` with step `round(1000 * epsilon)` (epsilon in
    `epsilon_units`).

    Args:
      log_dirs: log_dirs of train.py runs (`capsem.training.load_trained`).
      out_dir: the output directory (created); must not hold `OUTPUTS` unless
        `overwrite` (which replaces them, and removes the event files of
        `out_dir/tensorboard`).
      checkpoints: a checkpoint prefix per log_dir (None: the latest).
      epsilons: the epsilons, in `epsilon_units` (`to_input_units`).
      epsilon_units: "input" or "pixel".
      attacks: a subset of `ATTACKS`.
      untargeted, targeted: the modes to run.
      target_classes, seed: see `target_pairs`.
      bim_steps: BIM's steps.
      bim_step_size: BIM's step in `epsilon_units`; None: 1.25 epsilon / steps.
      num_images, first_image: the test images `first_image ..`.
      dataset_dir: the test data's directory (default: the first run's).
      batch_size: images per compiled call.
      log: called with progress lines.

    Returns:
      the rows written to the CSV (dicts).

    Raises:
      CapsemError: bad arguments, an existing output, a log_dir, checkpoint
        or dataset that cannot be read (one-line messages).
    """
    log_dirs = list(log_dirs)
    checkpoints = list(checkpoints or [None] * len(log_dirs))
    if not log_dirs or len(checkpoints) != len(log_dirs):
        raise ConfigError(f"give one or more log_dirs and as many checkpoints (or none), got "
                          f"{len(log_dirs)} log_dirs and {len(checkpoints)} checkpoints")
    epsilons = [_check_epsilon("epsilon", e) for e in epsilons]
    if not epsilons:
        raise ConfigError("epsilons must hold at least one value")
    attacks = list(attacks)
    if not attacks or any(a not in ATTACKS for a in attacks):
        raise ConfigError(f"attacks must be one or more of {', '.join(ATTACKS)}, got "
                          f"{','.join(attacks) or 'none'}")
    modes = [m for m, on in ((False, untargeted), (True, targeted)) if on]
    if not modes:
        raise ConfigError("nothing to run: ask for untargeted or targeted attacks (or both)")
    if target_classes not in TARGET_CLASSES:
        raise ConfigError(f"target_classes must be one of {', '.join(TARGET_CLASSES)}, got "
                          f"{target_classes!r}")
    if isinstance(bim_steps, bool) or not isinstance(bim_steps, int) or bim_steps < 1:
        raise ConfigError(f"bim_steps must be a positive int, got {bim_steps!r}")
    if bim_step_size is not None:
        _check_epsilon("bim_step_size", bim_step_size)
    if epsilon_units not in EPSILON_UNITS:
        raise ConfigError(f"epsilon units must be one of {', '.join(EPSILON_UNITS)}, got "
                          f"{epsilon_units!r}")
    check_out_dir(out_dir, overwrite)

    loaded = []
    for log_dir, checkpoint in zip(log_dirs, checkpoints):
        model, config, path, step = training.load_trained(log_dir, checkpoint)
        log(f"loaded {config.model} network of {log_dir} (checkpoint {path}, step {step}): "
            f"{model.count_params():,} parameters")
        loaded.append((model, config, path, step))
    configs = [c for _, c, _, _ in loaded]
    first = configs[0]
    for log_dir, config in zip(log_dirs[1:], configs[1:]):
        if config.dataset != first.dataset:
            raise ConfigError(f"{log_dir} was trained on {config.dataset}, {log_dirs[0]} on "
                              f"{first.dataset}: the networks must be attacked on the same data")
    input_epsilons = [to_input_units(e, epsilon_units, first.dataset) for e in epsilons]
    step_size = (None if bim_step_size is None
                 else to_input_units(bim_step_size, epsilon_units, first.dataset))
    bounds = INPUT_RANGES.get(first.dataset)
    images, labels = visualize.load_test_images(first, first_image, num_images, dataset_dir)
    log(f"{len(images)} test images of {first.dataset} (from index {first_image}); epsilons "
        f"{', '.join(f'{e:g}' for e in epsilons)} ({epsilon_units} units"
        + ("" if epsilon_units == "input" else
           f": {', '.join(f'{e:.4g}' for e in input_epsilons)} in input units") + ")")

    os.makedirs(out_dir, exist_ok=True)
    tb_dir = os.path.join(out_dir, TENSORBOARD_DIR)
    if overwrite:
        for path in (glob.glob(os.path.join(tb_dir, "events.out.tfevents.*"))
                     + [os.path.join(out_dir, CSV_FILE), os.path.join(out_dir, PNG_FILE)]):
            if os.path.isfile(path):
                os.remove(path)
    writer = tf.summary.create_file_writer(tb_dir)
    names = _model_names(configs, log_dirs)
    num_classes = datasets.get_info(first.dataset).num_classes
    rows = []
    try:
        for name, log_dir, (model, config, path, step) in zip(names, log_dirs, loaded):
            attack_model = AttackModel.from_trained(model, config, batch_size)
            for attack in attacks:
                for mode in modes:
                    curve = attack_curve(
                        attack_model, images, labels, input_epsilons, attack, mode,
                        num_classes=num_classes, bim_steps=bim_steps, bim_step_size=step_size,
                        bounds=bounds, target_classes=target_classes, seed=seed, log=log,
                        name=f"{name} ")
                    tag = f"attack/{name}/{attack}_{'targeted' if mode else 'untargeted'}"
                    with writer.as_default():
                        for epsilon, row in zip(epsilons, curve):
                            tb_step = int(round(1000 * epsilon))
                            tf.summary.scalar(f"{tag}/success_rate", row["success_rate"],
                                              step=tb_step)
                            tf.summary.scalar(f"{tag}/accuracy", row["accuracy"], step=tb_step)
                    writer.flush()
                    for epsilon, row in zip(epsilons, curve):
                        rows.append({
                            "model": name, "log_dir": log_dir, "checkpoint": path,
                            "step": step, "attack": attack, "targeted": mode,
                            "target_classes": target_classes if mode else None,
                            "epsilon": epsilon, "epsilon_units": epsilon_units,
                            "epsilon_input": row["epsilon"],
                            "bim_steps": bim_steps if attack == "bim" else None,
                            "bim_step_size_input": row["bim_step_size"],
                            **{k: row[k] for k in ("images", "attacks", "clean_accuracy",
                                                   "accuracy", "success_rate",
                                                   "zero_gradient_fraction", "seconds")}})
                    write_csv(rows, os.path.join(out_dir, CSV_FILE))
                    plot_curves(rows, os.path.join(out_dir, PNG_FILE), epsilon_units,
                                num_classes)
                    log(f"{name} {attack} {'targeted' if mode else 'untargeted'}: "
                        + ", ".join(f"eps {e:g}: success {r['success_rate']:.3f}, accuracy "
                                    f"{r['accuracy']:.3f}" for e, r in zip(epsilons, curve)))
    finally:
        writer.close()
    log(f"wrote {os.path.join(out_dir, CSV_FILE)} ({len(rows)} rows), "
        f"{os.path.join(out_dir, PNG_FILE)} and TensorBoard scalars in {tb_dir}")
    return rows
