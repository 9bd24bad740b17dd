"""Training and evaluation loops behind train.py.

`train(config)` trains the article's network the way the article's train.py
does (spread loss with the piecewise margin, Adam 1e-3 with TF1's epsilon,
per-variable gradient clipping at 4.0, batch 24), and adds what the article
lacks: evaluation on the test set after every epoch, resumable checkpoints
(weights, optimizer state, global step and therefore margin and data
position), TensorBoard summaries, a progress line, a guard against
non-finite steps and a clean stop on SIGINT / SIGTERM.

`evaluate(config)` evaluates a checkpoint on the test set (accuracy, loss,
confusion matrix).

`TrainConfig.distribute` trains on several devices (`tf.distribute.MirroredStrategy`)
or processes (`tf.distribute.MultiWorkerMirroredStrategy`, configured by
`TF_CONFIG`) with the same arithmetic on the global batch (see
`capsem.step.TrainStep`); "none", the default, is the one-device loop.
"""

import contextlib
import dataclasses
import errno
import glob
import hashlib
import json
import math
import os
import shutil
import signal
import tempfile
import time

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from capsem import baseline, datasets, diagnostics, losses, nets, paper_routing, recipes, visualize
from capsem import step as step_lib
from capsem.errors import CheckpointError, ConfigError, DataError, TrainingError

#: Config fields that define the model's variables: a log_dir holding a
#: checkpoint made with other values cannot be resumed, not even with
#: `allow_config_change`.
ARCHITECTURE_KEYS = ("dataset", "model", "A", "B", "C", "D", "conv1_batch_norm",
                     "lambda_schedule", "conv1_padding")

#: Config fields that change what a resumed run computes: a difference from the
#: log_dir's config.json stops the run unless `allow_config_change` is set
#: (then each change is logged and recorded in config.json).
COMPUTATION_KEYS = ("routing", "recipe", "iterations", "stable_routing", "final_lambda",
                    "variance_floor", "assignment_gradient", "transform_stddev", "batch_size",
                    "seed", "clip_norm", "margin_schedule", "margin_ramp_epochs",
                    "random_shift", "random_shift_after_epochs", "random_rotation",
                    "random_scale", "random_elastic", "elastic_sigma", "data_source",
                    "smallnorb_split", "lambda_start", "lambda_growth", "routing_cost")

#: Optimizer hyper-parameters: a new value takes effect when a run resumes
#: (assigned after the restore, logged and recorded in config.json).
OPTIMIZER_KEYS = ("learning_rate", "adam_epsilon", "lr_decay_rate", "lr_decay_steps",
                  "lr_decay_max_epochs", "lr_decay_min_epochs", "weight_decay", "ema_momentum",
                  "ema_warmup")

#: The fields `evaluate` takes from the log_dir's config.json unless they are
#: given explicitly: what builds the network and its evaluation margin.
MODEL_KEYS = ARCHITECTURE_KEYS + (
    "recipe", "routing", "iterations", "stable_routing", "final_lambda", "variance_floor",
    "assignment_gradient", "transform_stddev", "batch_size", "margin_schedule",
    "margin_ramp_epochs", "smallnorb_split", "lambda_start", "lambda_growth", "routing_cost",
    "ema_momentum")

#: The fields of `MODEL_KEYS` that change what the routing of a trained network
#: computes: `evaluate` warns when one is given with another value than the run's.
ROUTING_KEYS = ("routing", "iterations", "stable_routing", "final_lambda", "variance_floor",
                "routing_cost")

CONFIG_FILE = "config.json"

#: The value that a run whose config.json lacks a key was trained with: the key
#: is newer than the code that wrote the file. Every setting that capsem added
#: after its first config.json (2026-11-26) came with the article's value as the
#: only behaviour until then: the routing and schedule settings of the recipes
#: (9d29611 and later: e.g. the rotations of 1278b56, the average of the weights
#: of 0ce1b5c, ReLU Conv1's padding of cdef525), the capsule network (`model`,
#: 26b776b) and smallNORB's standard split (`smallnorb_split`, fb9e461).
#: `read_saved_config` fills them in, so that resuming, evaluating or loading an
#: older run compares and builds what it computed, not this code's defaults.
LEGACY_VALUES = dict(recipes.ARTICLE, recipe="article", model="capsules",
                     smallnorb_split="standard")

#: The paper routing's inverse temperature schedules (`TrainConfig.lambda_schedule`).
LAMBDA_SCHEDULES = ("iterations", "ramp")

#: The networks of `TrainConfig.model`: the capsule network (`capsem.nets.capsules_net`)
#: or the paper's baseline CNN (`capsem.baseline.cnn_net`).
MODELS = ("capsules", "cnn")

#: The values of `TrainConfig.distribute`.
DISTRIBUTE_MODES = ("none", "mirrored", "multi_worker")

#: The key of config.json that lists the settings changed on resume
#: (`allow_config_change`, optimizer hyper-parameters), with the step where
#: each change began.
CHANGES_KEY = "changes"

#: The lock file that makes one run the only writer of a log_dir (`LogDirLock`).
LOCK_FILE = ".capsem.lock"


@dataclasses.dataclass
class TrainConfig:
    """Everything a training or evaluation run needs (the flags of train.py).

    Attributes:
      dataset: 'mnist', 'fashion_mnist' or 'smallnorb'.
      data_source: 'tfrecord' (the article's MNIST TFRecords) or 'tfds'.
      dataset_dir: directory of the TFRecords (or tfds' data_dir).
      smallnorb_split: smallNORB's "standard" train/test split, or one of the
        paper's novel-viewpoint experiments (Sec. 5.1, `capsem.datasets.
        smallnorb_viewpoint_filter`): "azimuth" or "elevation", which train on
        the familiar viewpoints of the training split and evaluate on the test
        split's `eval_viewpoints`.
      eval_viewpoints: with a novel-viewpoint smallnorb_split, the test
        examples evaluated: "novel" (default, what the paper reports),
        "familiar" (to match models on familiar viewpoints, as the paper's
        Tab. 2 does) or "all"; ignored with "standard".
      test_crops: evaluation averages the class activations over this many
        crops of each test image (the paper's multi-crop test, Sec. 5;
        `capsem.datasets.test_crop_offsets`): 32 x 32 crops of the 48 x 48
        resized smallNORB image, copies of an MNIST-like image shifted by up
        to one pixel; 1: the centre crop (smallNORB), the image (MNIST).
      download: let tensorflow-datasets download and prepare missing data
        (data_source "tfds" only).
      source_dir: directory of the MNIST IDX .gz files the TFRecords are made
        from on first use (None: do not convert).
      model: "capsules" (default: the capsule network, trained with the
        spread loss) or "cnn" (the paper's baseline CNN, `capsem.baseline`,
        trained with the softmax cross-entropy; the capsule settings A-D,
        routing, iterations and margin do not apply to it).
      log_dir: checkpoints, summaries and the saved config go here.
      batch_size: training batch size (the article: 24); with `distribute`, the
        GLOBAL batch, split over all replicas (of all workers).
      eval_batch_size: batch size of evaluation.
      iterations: EM routing iterations.
      A, B, C, D: channels of relu_conv1 and capsule types of primary_caps,
        conv_caps1 and conv_caps2.
      learning_rate: Adam learning rate.
      adam_epsilon: Adam epsilon (TF1's AdamOptimizer: 1e-8).
      weight_decay: decoupled weight decay of the kernels and transformation
        matrices (`capsem.step.make_optimizer`); 0: none (the article).
      ema_momentum: 0 (default): none; in (0, 1): the run also keeps an
        exponential moving average of the weights (`capsem.step.WeightAverage`,
        saved in the checkpoints as `averaged_model`), which the evaluations,
        `--mode=eval` and the tools that load a trained network use (the
        trained weights are still evaluated and logged beside it).
      ema_warmup: with `ema_momentum` > 0, the n-th update of the average uses
        the momentum `min(ema_momentum, (1 + n) / (10 + n))` (the warm-up of
        TF1's `ExponentialMovingAverage(num_updates=...)`), so that the average
        of a short run does not hold the initial weights; False (default): the
        fixed momentum from the first step. No effect without an average.
      clip_norm: per-variable gradient clipping norm (0 disables).
      epochs: stop after this many epochs (0: no limit).
      max_steps: stop at this global step (0: no limit).
      seed: seed of the weights and of the data order.
      deterministic: make TensorFlow ops deterministic (bit-identical reruns and
        resumes); needs TensorFlow's oneDNN kernels off (`TF_ENABLE_ONEDNN_OPTS=0`
        before TensorFlow is imported, as `train.py --deterministic` does), else
        a warning says why reruns may differ in the last bits.
      stable_routing: guard EM routing's divisions (see capsem.ops.em_routing).
      recipe: the name of the recipe the settings below came from
        ("article" or "paper", see `capsem.recipes`; `from_recipe` fills
        them in); recorded in config.json.
      routing: EM routing, "article" (`capsem.ops.em_routing`) or "paper"
        (`capsem.paper_routing`).
      final_lambda: scale of the paper routing's inverse temperature schedule
        (with lambda_schedule "ramp": the largest inverse temperature).
      lambda_schedule: the paper routing's inverse temperature: "iterations"
        (`final_lambda * (1 - 0.95^(t+1))` at iteration t, the same all
        through training) or "ramp" (`min(final_lambda, lambda_start +
        lambda_growth * epoch)` at every iteration, growing with the epochs
        trained: `capsem.paper_routing.inverse_temperature_ramp`; the capsule
        layers then hold it in a non-trainable weight).
      lambda_start, lambda_growth: the ramp's value at step 0 and its growth
        per epoch.
      routing_cost: the paper routing's M-step: "normalised" (the data per
        parent normalised, Gritzman's pitfall 2) or "unnormalised"
        (YuxianMeng's; `capsem.paper_routing.m_step_unnormalised`).
      variance_floor: the paper routing's variance floor (> 0).
      assignment_gradient: whether the paper routing's gradient flows through
        its assignments (`capsem.paper_routing.em_routing_paper`).
      transform_stddev: stddev of the transformation matrices' initializer.
      conv1_batch_norm: batch normalisation in ReLU Conv1 (`capsem.nets.capsules_net`).
      conv1_padding: ReLU Conv1's padding, "same" (the article) or "valid"
        (`capsem.nets.capsules_net`).
      margin_schedule: "article" (0.2 -> 0.9 by 0.1 per epoch) or "linear"
        (0.2 -> 0.9 linearly over `margin_ramp_epochs`).
      margin_ramp_epochs: epochs of the linear margin ramp (> 0).
      lr_decay_rate: the learning rate is multiplied by this every
        `lr_decay_steps` optimizer steps, smoothly (1.0: constant).
      lr_decay_steps: see `lr_decay_rate`; 0: the whole run, i.e. the rate
        reaches `learning_rate * lr_decay_rate` at the run's last step
        (`epochs` x steps per epoch, or `max_steps` if sooner), or after
        `lr_decay_max_epochs` epochs if that is sooner.
      lr_decay_max_epochs: with `lr_decay_steps` 0, the longest decay span in
        epochs (the rate goes on decaying at the same pace after it); 0: none.
      lr_decay_min_epochs: with `lr_decay_steps` 0, the shortest decay span in
        epochs: a shorter run decays at the pace of a run this long (its rate
        ends above `learning_rate * lr_decay_rate`); 0: none.
      random_shift: training images are shifted by up to this many pixels in
        each direction (zero padding, MNIST-like datasets; 0: none).
      random_rotation: training images are rotated by up to this many degrees
        about their centre (MNIST-like datasets; 0: none).
      random_scale: training images are scaled by a factor in
        [1 - random_scale, 1 + random_scale] (MNIST-like datasets; 0: none).
      random_elastic: training images are distorted by a random displacement
        field of this scale in pixels (Simard et al. 2003's alpha, smoothed
        by a Gaussian of `elastic_sigma` pixels; MNIST-like datasets; 0: none).
      elastic_sigma: the standard deviation in pixels of that Gaussian.
      random_shift_after_epochs: the first this many epochs train on the
        images as they are, the shifts, rotations, scalings and elastic
        distortions start after them (0: from the start).
      micro_batch_size: gradient micro-batch size (None: TrainStep's default, or
        `capsem.step.default_micro_batch_size` of the routing).
      jit_compile: compile the training and evaluation steps (see
        `capsem.step.TrainStep`).
      routing_kernels: "auto", "native" or "xla", the EM routing kernels (see
        `capsem.step.TrainStep`; "auto": native on CPUs, xla on GPUs).
      log_every_steps: a progress line at most every this many steps (at steps
        that are multiples of it).
      log_every_secs: and at least this many seconds after the previous one
        (0: no time floor); the first and the last step always get one.
      summary_secs: write TensorBoard scalars at most this often (0: every step).
      histogram_secs: write histograms and pictures at most this often (0: every
        summary).
      checkpoint_secs: save a checkpoint at most this often (0: every step).
      keep_checkpoints: how many checkpoints to keep.
      eval_every_epoch: evaluate on the test set after every epoch.
      max_bad_steps: stop after this many consecutive non-finite steps.
      allow_config_change: resume a log_dir whose config.json has other values
        of `COMPUTATION_KEYS` (each change is logged and recorded); without it
        such a resume stops with an error listing the differences.
      distribute: "none" (one device, the default), "mirrored"
        (`tf.distribute.MirroredStrategy` over this machine's GPUs, else its
        logical CPU devices) or "multi_worker"
        (`tf.distribute.MultiWorkerMirroredStrategy` over the processes that
        `TF_CONFIG` lists; the chief writes the log_dir, which the other
        workers read to resume). See `make_strategy`.
    """

    dataset: str = "mnist"
    data_source: str = "tfrecord"
    dataset_dir: str = datasets.DEFAULT_MNIST_DIR
    smallnorb_split: str = "standard"
    eval_viewpoints: str = "novel"
    test_crops: int = 1
    download: bool = False
    source_dir: str = None
    model: str = "capsules"
    log_dir: str = os.path.join("logs", "mnist")
    batch_size: int = 24
    eval_batch_size: int = 100
    iterations: int = 3
    A: int = 32
    B: int = 32
    C: int = 32
    D: int = 32
    learning_rate: float = 1e-3
    adam_epsilon: float = step_lib.TF1_ADAM_EPSILON
    weight_decay: float = 0.0
    ema_momentum: float = 0.0
    ema_warmup: bool = False
    clip_norm: float = 4.0
    epochs: int = 10
    max_steps: int = 0
    seed: int = 12345
    deterministic: bool = False
    stable_routing: bool = False
    recipe: str = "article"
    routing: str = "article"
    final_lambda: float = 1.0
    lambda_schedule: str = "iterations"
    lambda_start: float = 1e-3
    lambda_growth: float = 0.1
    routing_cost: str = "normalised"
    variance_floor: float = 1e-4
    assignment_gradient: bool = True
    transform_stddev: float = 1.0
    conv1_batch_norm: bool = False
    conv1_padding: str = "same"
    margin_schedule: str = "article"
    margin_ramp_epochs: float = 7.0
    lr_decay_rate: float = 1.0
    lr_decay_steps: int = 20000
    lr_decay_max_epochs: float = 0.0
    lr_decay_min_epochs: float = 0.0
    random_shift: int = 0
    random_shift_after_epochs: int = 0
    random_rotation: float = 0.0
    random_scale: float = 0.0
    random_elastic: float = 0.0
    elastic_sigma: float = 4.0
    micro_batch_size: int = None
    jit_compile: bool = True
    routing_kernels: str = "auto"
    log_every_steps: int = 10
    log_every_secs: float = 10.0
    summary_secs: float = 60.0
    histogram_secs: float = 600.0
    checkpoint_secs: float = 600.0
    keep_checkpoints: int = 2
    eval_every_epoch: bool = True
    max_bad_steps: int = 10
    allow_config_change: bool = False
    distribute: str = "none"

    def validate(self):
        """Raises ConfigError with a one-line message for an invalid value."""
        try:
            datasets.get_info(self.dataset)
        except DataError as e:
            raise ConfigError(str(e)) from None
        if self.data_source not in datasets.DATA_SOURCES:
            raise ConfigError(f"data_source must be one of {', '.join(datasets.DATA_SOURCES)}, "
                              f"got {self.data_source!r}")
        if self.smallnorb_split not in datasets.SMALLNORB_SPLITS:
            raise ConfigError(f"smallnorb_split must be one of "
                              f"{', '.join(datasets.SMALLNORB_SPLITS)}, got "
                              f"{self.smallnorb_split!r}")
        if self.smallnorb_split != "standard" and self.dataset != "smallnorb":
            raise ConfigError(f"smallnorb_split={self.smallnorb_split!r} needs "
                              f"dataset='smallnorb', got {self.dataset!r}")
        if self.eval_viewpoints not in datasets.VIEWPOINTS:
            raise ConfigError(f"eval_viewpoints must be one of {', '.join(datasets.VIEWPOINTS)}"
                              f", got {self.eval_viewpoints!r}")
        if isinstance(self.test_crops, bool) or not isinstance(self.test_crops, int) or \
                not 1 <= self.test_crops <= datasets.MAX_TEST_CROPS:
            raise ConfigError(f"test_crops must be an integer in [1, {datasets.MAX_TEST_CROPS}]"
                              f", got {self.test_crops!r}")
        if not isinstance(self.download, bool):
            raise ConfigError(f"download must be True or False, got {self.download!r}")
        if self.download and self.data_source != "tfds":
            raise ConfigError(f"download=True needs data_source='tfds', got "
                              f"{self.data_source!r} (MNIST TFRecords: "
                              f"download_and_convert_mnist.py)")
        for name in ("batch_size", "eval_batch_size", "iterations", "A", "B", "C", "D",
                     "log_every_steps", "keep_checkpoints", "max_bad_steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        for name in ("epochs", "max_steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError(f"{name} must be an integer >= 0 (0: no limit), got {value!r}")
        if self.distribute not in DISTRIBUTE_MODES:
            raise ConfigError(f"distribute must be one of {', '.join(DISTRIBUTE_MODES)}, "
                              f"got {self.distribute!r}")
        if self.routing_kernels not in step_lib.ROUTING_KERNELS:
            raise ConfigError(f"routing_kernels must be one of "
                              f"{', '.join(step_lib.ROUTING_KERNELS)}, got {self.routing_kernels!r}")
        if self.micro_batch_size is not None and (
                not isinstance(self.micro_batch_size, int) or self.micro_batch_size < 1):
            raise ConfigError(f"micro_batch_size must be a positive integer, got "
                              f"{self.micro_batch_size!r}")
        for name in ("learning_rate", "adam_epsilon"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name} must be > 0, got {getattr(self, name)!r}")
        for name in ("clip_norm", "summary_secs", "histogram_secs", "checkpoint_secs",
                     "log_every_secs", "weight_decay", "lr_decay_max_epochs",
                     "lr_decay_min_epochs"):
            if not getattr(self, name) >= 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)!r}")
        if self.lr_decay_max_epochs and self.lr_decay_min_epochs > self.lr_decay_max_epochs:
            raise ConfigError(f"lr_decay_min_epochs ({self.lr_decay_min_epochs!r}) must not "
                              f"exceed lr_decay_max_epochs ({self.lr_decay_max_epochs!r}; "
                              f"0: no limit)")
        if not 0 <= self.ema_momentum < 1:
            raise ConfigError(f"ema_momentum must be in [0, 1) (0: no average), got "
                              f"{self.ema_momentum!r}")
        if not isinstance(self.ema_warmup, bool):
            raise ConfigError(f"ema_warmup must be True or False, got {self.ema_warmup!r}")
        if self.ema_momentum and self.distribute != "none":
            raise ConfigError(f"ema_momentum={self.ema_momentum!r} needs distribute='none' "
                              f"(the average is not kept over replicas), got "
                              f"{self.distribute!r}")
        if not self.log_dir:
            raise ConfigError("log_dir must be a directory path, got an empty string")
        choices = (("model", MODELS), ("recipe", recipes.RECIPE_NAMES),
                   ("conv1_padding", nets.CONV1_PADDINGS),
                   ("routing", nets.ROUTING_MODES), ("margin_schedule", losses.MARGIN_SCHEDULES))
        for name, accepted in choices:
            if getattr(self, name) not in accepted:
                raise ConfigError(f"{name} must be one of {', '.join(accepted)}, "
                                  f"got {getattr(self, name)!r}")
        for name in ("final_lambda", "transform_stddev", "margin_ramp_epochs", "variance_floor",
                     "lambda_start"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name} must be > 0, got {getattr(self, name)!r}")
        if self.routing_cost not in paper_routing.COSTS:
            raise ConfigError(f"routing_cost must be one of {', '.join(paper_routing.COSTS)}, "
                              f"got {self.routing_cost!r}")
        if self.routing_cost != "normalised" and (self.routing != "paper"
                                                   or self.model != "capsules"):
            raise ConfigError(f"routing_cost={self.routing_cost!r} needs routing='paper' and "
                              f"model='capsules', got routing={self.routing!r}, "
                              f"model={self.model!r}")
        if self.lambda_schedule not in LAMBDA_SCHEDULES:
            raise ConfigError(f"lambda_schedule must be one of {', '.join(LAMBDA_SCHEDULES)}, "
                              f"got {self.lambda_schedule!r}")
        if not self.lambda_growth >= 0:
            raise ConfigError(f"lambda_growth must be >= 0, got {self.lambda_growth!r}")
        if self.lambda_schedule == "ramp":
            if self.routing != "paper" or self.model != "capsules":
                raise ConfigError(f"lambda_schedule='ramp' needs routing='paper' and "
                                  f"model='capsules', got routing={self.routing!r}, "
                                  f"model={self.model!r}")
            if self.lambda_start > self.final_lambda:
                raise ConfigError(f"lambda_schedule='ramp' grows from lambda_start up to "
                                  f"final_lambda: lambda_start ({self.lambda_start!r}) must "
                                  f"be <= final_lambda ({self.final_lambda!r})")
        if not 0 < self.lr_decay_rate <= 1:
            raise ConfigError(f"lr_decay_rate must be in (0, 1] (1: no decay), "
                              f"got {self.lr_decay_rate!r}")
        if not isinstance(self.conv1_batch_norm, bool):
            raise ConfigError(f"conv1_batch_norm must be True or False, "
                              f"got {self.conv1_batch_norm!r}")
        for name, low in (("lr_decay_steps", 0), ("random_shift", 0),
                          ("random_shift_after_epochs", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ConfigError(f"{name} must be an integer >= {low}, got {value!r}")
        problem = datasets.augmentation_problem(
            random_rotation=self.random_rotation, random_scale=self.random_scale,
            random_elastic=self.random_elastic, elastic_sigma=self.elastic_sigma)
        if problem:
            raise ConfigError(problem)
        if self.lr_decay_steps == 0 and self.lr_decay_rate != 1.0 \
                and not (self.epochs or self.max_steps or self.lr_decay_max_epochs
                         or self.lr_decay_min_epochs):
            raise ConfigError("lr_decay_steps=0 decays the learning rate over the whole run, "
                              "which needs a length: give epochs or max_steps (> 0), "
                              "lr_decay_max_epochs > 0, or lr_decay_steps >= 1")

    @classmethod
    def from_recipe(cls, recipe="article", **kwargs):
        """A config with the settings of `recipe` (`capsem.recipes`) where kwargs give none.

        Keyword arguments that a recipe decides may be None (meaning: the
        recipe's value); the others are passed on as they are.
        """
        decided = {k: kwargs.pop(k) for k in list(kwargs) if k in recipes.ARTICLE}
        capsules = kwargs.get("model", cls.model) == "capsules"
        return cls(recipe=recipe, **kwargs,
                   **recipes.resolve(recipe, decided, kwargs.get("dataset"),
                                     kwargs.get("distribute", "none"),
                                     D=kwargs.get("D", cls.D) if capsules else None))

    def to_dict(self):
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------
# Set-up helpers
# ---------------------------------------------------------------------------


def _ensure_writable_dir(path):
    try:
        os.makedirs(path, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write_test_", dir=path)
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        raise ConfigError(f"log_dir {path} is not writable ({e.strerror or e})") from None


def read_saved_config(log_dir):
    """The dict of log_dir/config.json, or None when there is none.

    Keys that the file lacks (written before they existed) get their
    `LEGACY_VALUES`; each one is logged once.

    Raises:
      ConfigError: the file exists but is not a readable capsem config.
    """
    path = os.path.join(log_dir, CONFIG_FILE)
    if not os.path.exists(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            saved = json.load(f)
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path} is not a readable capsem config ({e})") from None
    if not isinstance(saved, dict):
        raise ConfigError(f"{path} is not a readable capsem config (not a JSON object)")
    missing = {k: v for k, v in LEGACY_VALUES.items() if k not in saved}
    if missing and path not in _LEGACY_LOGGED:
        _LEGACY_LOGGED.add(path)
        logging.info("%s predates %s; taken as the values that code trained with: %s", path,
                     ", ".join(sorted(missing)),
                     ", ".join(f"{k}={v!r}" for k, v in sorted(missing.items())))
    return {**missing, **saved}


_LEGACY_LOGGED = set()  # the config.json paths whose missing keys were logged


def _differences(saved, current, keys):
    """[(key, saved value, this run's value)] of the keys whose values differ."""
    return [(k, saved[k], current[k]) for k in keys if k in saved and saved[k] != current[k]]


def _format_differences(diffs):
    return ", ".join(f"{k}={old!r} (this run: {new!r})" for k, old, new in diffs)


def compare_with_saved_config(config, saved, has_checkpoint):
    """Checks this run's settings against the config.json of the run it resumes.

    Nothing is compared when there is no checkpoint to resume. A different
    architecture (`ARCHITECTURE_KEYS`) always stops the run; a different value
    of `COMPUTATION_KEYS` stops it unless `config.allow_config_change`;
    switching between a constant and a decaying learning rate stops it (the
    optimizer's checkpoint has another structure).

    Returns:
      the changes to log and record, a list of (key, saved value, new value):
      the optimizer hyper-parameters (`OPTIMIZER_KEYS`), and the allowed
      changes of `COMPUTATION_KEYS`.

    Raises:
      ConfigError: a change that is not allowed, with every difference listed.
    """
    if not saved or not has_checkpoint:
        return []
    current = config.to_dict()
    where = f"log_dir {config.log_dir}"
    diffs = _differences(saved, current, ARCHITECTURE_KEYS)
    if diffs:
        raise ConfigError(f"{where} holds a checkpoint of a different architecture: "
                          f"{_format_differences(diffs)}; use another --log_dir or the same flags")
    diffs = _differences(saved, current, COMPUTATION_KEYS)
    if diffs and not config.allow_config_change:
        raise ConfigError(f"{where} holds a run with different settings: "
                          f"{_format_differences(diffs)}; pass the saved values, or "
                          f"--allow_config_change to resume with the new ones, or use another "
                          f"--log_dir")
    if "lr_decay_rate" in saved and (saved["lr_decay_rate"] == 1.0) != (config.lr_decay_rate
                                                                         == 1.0):
        raise ConfigError(
            f"{where} was trained with lr_decay_rate={saved['lr_decay_rate']!r}, this run asks "
            f"for {config.lr_decay_rate!r}: a constant and a decaying learning rate keep "
            f"different optimizer state, so a run cannot switch between them; use another "
            f"--log_dir")
    saved_ema = saved.get("ema_momentum", 0.0)  # runs before the average have no key: none
    if bool(saved_ema) != bool(config.ema_momentum):
        raise ConfigError(
            f"{where} was trained with ema_momentum={saved_ema!r}, this "
            f"run asks for {config.ema_momentum!r}: the average of the weights starts with a "
            f"run, so a run cannot switch it on or off (another value > 0 is taken); pass "
            f"--ema_momentum={saved_ema!r} to resume it"
            + (" (runs of the paper recipe before 33e7692 had no average)"
               if saved.get("recipe") == "paper" and not saved_ema else "")
            + ", or use another --log_dir")
    return diffs + _differences(saved, current, OPTIMIZER_KEYS)


def checkpoint_candidates(log_dir):
    """The checkpoint prefixes in log_dir that a run would resume from, newest first.

    The checkpoints that the `checkpoint` state file names come first, then
    any other complete checkpoint (`ckpt-N.index` on disk), e.g. when the
    state file is missing or unreadable.

    Returns:
      a list of (prefix, named by the state file).
    """
    listed = []
    try:
        state = tf.train.get_checkpoint_state(log_dir)
    except Exception as e:  # an unreadable state file: the files on disk still tell
        logging.warning("The checkpoint state file of %s is unreadable (%s)", log_dir,
                        _first_line(e))
        state = None
    if state is not None:
        names = list(state.all_model_checkpoint_paths)
        if state.model_checkpoint_path and state.model_checkpoint_path not in names:
            names.append(state.model_checkpoint_path)
        listed = [os.path.join(log_dir, os.path.basename(n)) for n in names]
    on_disk = [p[:-len(".index")] for p in glob.glob(os.path.join(log_dir, "ckpt-*.index"))]
    listed = sorted(set(listed), key=_checkpoint_number, reverse=True)
    others = sorted(set(on_disk) - set(listed), key=_checkpoint_number, reverse=True)
    return [(p, True) for p in listed] + [(p, False) for p in others]


def _checkpoint_number(prefix):
    """N of a checkpoint prefix `.../ckpt-N`; -1 for any other name."""
    try:
        return int(prefix.rsplit("-", 1)[1])
    except (IndexError, ValueError):
        return -1


def _first_line(error, limit=300):
    """The first line of an error's text (`datasets._first_line`), cut at `limit` characters."""
    line = datasets._first_line(error) or type(error).__name__
    return line if len(line) <= limit else line[:limit] + "..."


def _write_json_atomically(path, obj):
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def eval_viewpoints(config, viewpoints=None):
    """The `viewpoints` argument of `datasets.make_dataset` for the test split of `config`.

    Args:
      config: a TrainConfig.
      viewpoints: one of `datasets.VIEWPOINTS` to use instead of
        `config.eval_viewpoints`.

    Returns:
      `viewpoints` or `config.eval_viewpoints` for a novel-viewpoint
      smallnorb_split; "all" for the standard split.
    """
    if config.smallnorb_split == "standard":
        return "all"
    return viewpoints or config.eval_viewpoints


def test_dataset(config, viewpoints=None):
    """The evaluation pipeline of `config`: its test split, viewpoints and crops.

    Args:
      config: a TrainConfig.
      viewpoints: see `eval_viewpoints` (None: `config.eval_viewpoints`).

    Returns:
      `datasets.make_dataset(config.dataset, "test", ...)`, batches of
      `config.eval_batch_size`.
    """
    return datasets.make_dataset(config.dataset, "test", dataset_dir=config.dataset_dir,
                                 data_source=config.data_source,
                                 batch_size=config.eval_batch_size,
                                 smallnorb_split=config.smallnorb_split,
                                 viewpoints=eval_viewpoints(config, viewpoints),
                                 test_crops=config.test_crops, download=config.download)


def describe_test_set(config):
    """What `test_dataset(config)` evaluates, for log lines: "" for the plain test set."""
    parts = []
    if config.smallnorb_split != "standard":
        parts.append(f"{config.smallnorb_split} split, {eval_viewpoints(config)} viewpoints")
    if config.test_crops > 1:
        kind = "crops" if config.dataset == "smallnorb" else "shifted copies"
        parts.append(f"{config.test_crops} {kind} averaged")
    return f" [{'; '.join(parts)}]" if parts else ""


def prepare_data(config):
    """Makes sure the data exists (converting the MNIST IDX files on first use) and checks it.

    TFRecords are read whole and checked here (`datasets.read_image_tfrecord`,
    which keeps them decoded in memory for the epochs to come); a file in
    dataset_dir that capsem did not write is used as it is or stops the run
    with a DataError, and is never modified (`datasets.convert_mnist`).

    Returns:
      `(num_train, num_test)`, the real number of examples of the two splits.
    """
    info = datasets.get_info(config.dataset)
    if config.data_source != "tfrecord":
        # The sizes of the prepared splits, not DatasetInfo's constants (a smaller split
        # would otherwise end every epoch early).
        # For a novel-viewpoint smallnorb_split: the familiar training examples and the
        # evaluated test examples (`eval_viewpoints`), counted from their labels.
        sizes = datasets.tfds_split_sizes(
            config.dataset, config.dataset_dir, smallnorb_split=config.smallnorb_split,
            viewpoints=eval_viewpoints(config), download=config.download)
        return sizes["train"], sizes["test"]
    if config.source_dir:
        # Idempotent: a no-op (checked against the sidecar files) when valid output exists;
        # files capsem did not write are checked and kept as they are.
        datasets.convert_mnist(config.source_dir, config.dataset_dir)
    counts = []
    for split in datasets.SPLITS:
        path = os.path.join(config.dataset_dir, f"mnist_{split}.tfrecord")
        if not os.path.exists(path):
            if not os.path.isdir(config.dataset_dir) or not os.listdir(config.dataset_dir):
                raise DataError(
                    f"dataset_dir {config.dataset_dir} is missing or empty: run python "
                    f"download_and_convert_mnist.py --dataset_dir={config.dataset_dir}")
            raise DataError(f"{path}: no such file; run python download_and_convert_mnist.py "
                            f"--dataset_dir={config.dataset_dir}")
        count = len(datasets.read_image_tfrecord(path, info.input_shape, info.num_classes)[1])
        if count == 0:
            raise DataError(f"{path}: holds no examples")
        counts.append(count)
    return tuple(counts)


def build_model(config, info):
    """The network of a config (`config.model`) for a dataset.

    "capsules": the article's network (`capsem.nets.capsules_net`); "cnn": the
    paper's baseline CNN (`capsem.baseline.cnn_net`, paper Sec. 5).
    """
    if config.model == "cnn":
        return baseline.cnn_net(num_classes=info.num_classes, input_shape=tuple(info.input_shape))
    return nets.capsules_net(num_classes=info.num_classes, iterations=config.iterations,
                             A=config.A, B=config.B, C=config.C, D=config.D,
                             input_shape=tuple(info.input_shape),
                             stable=config.stable_routing, routing=config.routing,
                             final_lambda=config.final_lambda,
                             transform_stddev=config.transform_stddev,
                             variance_floor=config.variance_floor,
                             assignment_gradient=config.assignment_gradient,
                             conv1_batch_norm=config.conv1_batch_norm,
                             inverse_temperature=(config.lambda_start
                                                  if config.lambda_schedule == "ramp" else None),
                             routing_cost=config.routing_cost,
                             conv1_padding=config.conv1_padding)


def loss_function(config):
    """The training and evaluation loss `(labels, activations, margin) -> scalar` of a config.

    The capsule network's spread loss (`capsem.losses.spread_loss_from_labels`),
    or for `model="cnn"` the softmax cross-entropy of the baseline's logits
    (`capsem.baseline.cross_entropy_loss`; paper Sec. 5: a softmax output layer).
    Both are summed over the batch.
    """
    if config.model == "cnn":
        return baseline.cross_entropy_loss
    return losses.spread_loss_from_labels


def margin_function(config, num_train):
    """The margin schedule `step -> margin` of a config (`capsem.losses.make_margin_schedule`)."""
    # The article: iterations_per_epoch = num_samples // batch_size.
    iterations_per_epoch = max(1, num_train // config.batch_size)
    ramp = max(1, int(round(config.margin_ramp_epochs * iterations_per_epoch)))
    return losses.make_margin_schedule(config.margin_schedule, iterations_per_epoch, ramp)


def inverse_temperature_function(config, num_train):
    """`global step -> inverse temperature` of a config with lambda_schedule "ramp", else None.

    The epoch of step s is `s * batch_size / num_train` (YuxianMeng's train.py
    adds 0.1 / (examples // batch size) per step).
    """
    if config.lambda_schedule != "ramp":
        return None
    per_step = config.batch_size / float(num_train)
    return lambda step: paper_routing.inverse_temperature_ramp(
        step * per_step, config.lambda_start, config.lambda_growth, config.final_lambda)


def learning_rate(config, total_steps=0, steps_per_epoch=0):
    """The learning rate (a schedule when `config.lr_decay_rate` < 1) of a config.

    Args:
      config: a `TrainConfig`.
      total_steps: the run's last step; the decay's span where
        `config.lr_decay_steps` is 0.
      steps_per_epoch: optimizer steps per epoch; with `config.lr_decay_steps`
        0, the decay spans at most `config.lr_decay_max_epochs` of them and at
        least `config.lr_decay_min_epochs`.

    Raises:
      ConfigError: `lr_decay_steps` is 0 and neither `total_steps` nor the
        `lr_decay_max_epochs` span is > 0.
    """
    if config.lr_decay_rate == 1.0:
        return config.learning_rate
    decay_steps = config.lr_decay_steps
    if decay_steps == 0:
        # The paper recipe's span (capsem.recipes.PAPER): the run, clamped to
        # [lr_decay_min_epochs, lr_decay_max_epochs] epochs (7 and 7: always 7 epochs).
        longest = round(config.lr_decay_max_epochs * steps_per_epoch)
        shortest = round(config.lr_decay_min_epochs * steps_per_epoch)
        spans = [n for n in (total_steps, longest) if n > 0]
        if not spans and not shortest:
            raise ConfigError("lr_decay_steps=0 decays the learning rate over the whole run, "
                              "which has no last step here: give epochs or max_steps")
        decay_steps = max(min(spans) if spans else 0, shortest)
    # IBM's implementation: tf.train.exponential_decay, not staircased.
    return keras.optimizers.schedules.ExponentialDecay(
        config.learning_rate, decay_steps, config.lr_decay_rate)


def make_strategy(distribute):
    """The `tf.distribute.Strategy` of `TrainConfig.distribute` (None for "none").

    "mirrored": `MirroredStrategy` over this machine's GPUs, or where there
    is none over its logical CPU devices (one, unless
    `tf.config.set_logical_device_configuration` made more). "multi_worker":
    `MultiWorkerMirroredStrategy` over the cluster that the `TF_CONFIG`
    environment variable describes (every process runs the same command with
    its own `TF_CONFIG`); it must be created before TensorFlow runs any
    operation, so `train` creates it first.
    """
    if distribute == "none":
        return None
    if distribute == "mirrored":
        devices = tf.config.list_logical_devices("GPU") or tf.config.list_logical_devices("CPU")
        return tf.distribute.MirroredStrategy([d.name for d in devices])
    if distribute == "multi_worker":
        if not os.environ.get("TF_CONFIG"):
            logging.warning("distribute=multi_worker without TF_CONFIG: one worker, this process")
        try:
            return tf.distribute.MultiWorkerMirroredStrategy()
        except (RuntimeError, ValueError) as e:
            raise ConfigError(f"distribute=multi_worker: cannot start the strategy "
                              f"({_first_line(e)}); check TF_CONFIG") from None
    raise ConfigError(f"distribute must be one of {', '.join(DISTRIBUTE_MODES)}, "
                      f"got {distribute!r}")


def is_chief(strategy):
    """Whether this process writes the log_dir: always without a multi-worker cluster.

    In a `TF_CONFIG` cluster the chief is the task of type "chief", or worker 0
    when the cluster has no "chief" task (the usual `tf.distribute` rule).
    """
    resolver = getattr(strategy, "cluster_resolver", None) if strategy is not None else None
    if resolver is None or not resolver.task_type:
        return True
    if resolver.task_type == "chief":
        return True
    return (resolver.task_type == "worker" and resolver.task_id == 0
            and "chief" not in resolver.cluster_spec().as_dict())


def worker_scratch_dir(log_dir, strategy):
    """The directory where a worker that is not the chief saves its checkpoints (then deletes).

    One name per log_dir and task in the temporary directory (`TMPDIR`), so that
    re-running a killed worker's command removes what the killed one left.
    """
    resolver = strategy.cluster_resolver
    tag = hashlib.sha256(os.path.abspath(log_dir).encode()).hexdigest()[:16]
    return os.path.join(tempfile.gettempdir(),
                        f"capsem-worker-{tag}-{resolver.task_type}{resolver.task_id}")


class _Progress:
    """A progress line: step, loss, accuracy, steps/s and ETA.

    A line is due (`due`) at a step that is a multiple of `every_steps` once
    `every_secs` seconds have passed since the previous line: every N steps or
    every T seconds, whichever is later, so a fast loop does not flood the log.
    The rate is measured between consecutive progress lines (the first line,
    after the step that traced and compiled the training step, only starts
    the clock), so it shows the current speed of the loop, comparable with
    `bench.py`; the ETA uses it too.
    """

    def __init__(self, total_steps, start_step, batch_size, every_steps=1, every_secs=0.0):
        self.total = total_steps
        self.batch_size = batch_size
        self.every_steps = every_steps
        self.every_secs = every_secs
        self.last_step = start_step
        self.last_time = None
        self.rate = 0.0

    def due(self, step, now=None):
        """Whether `step` gets a line: a multiple of every_steps, every_secs after the last."""
        if step % self.every_steps:
            return False
        now = time.time() if now is None else now
        return self.last_time is None or now - self.last_time >= self.every_secs

    def update(self, step):
        """Updates the rate at a progress line of `step`."""
        now = time.time()
        if self.last_time is not None and step > self.last_step and now > self.last_time:
            self.rate = (step - self.last_step) / (now - self.last_time)
        self.last_step, self.last_time = step, now
        return self.rate

    def line(self, step, loss, accuracy, margin, skipped):
        rate = self.update(step)
        where = f"step {step}/{self.total} ({100.0 * step / self.total:.1f}%)" if self.total \
            else f"step {step}"
        eta = _format_seconds((self.total - step) / rate) if self.total and rate > 0 else "?"
        speed = (f"{rate:.2f} steps/s ({rate * self.batch_size:.1f} images/s)" if rate > 0
                 else "compiling/warm-up")
        text = (f"{where} loss {loss:.4f} acc {accuracy:.3f} margin {margin:.1f} "
                f"{speed} ETA {eta}")
        if skipped:
            text += f" skipped {skipped}"
        return text


def _format_seconds(seconds):
    seconds = int(max(0, seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class _StopSignal:
    """Turns SIGINT / SIGTERM into a flag checked between steps."""

    def __init__(self):
        self.received = None
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not in the main thread
                pass
        return self

    def _handle(self, signum, frame):
        if self.received is not None:  # a second signal: stop now
            raise KeyboardInterrupt
        self.received = signal.Signals(signum).name

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        return False


class LogDirLock:
    """Makes one run the only writer of a log_dir, for as long as the run lasts.

    An exclusive `fcntl.flock` on `log_dir/.capsem.lock`, which holds the
    holder's PID. The kernel releases the lock when the process ends in any
    way (kill -9 included), so no stale lock is ever left; the file itself
    stays (it means nothing when nobody holds it). A run that stops with an
    error puts the file back as it was (or removes it if the run made it).

    Raises (on entering):
      ConfigError: another process holds the lock (its PID is in the message).
    """

    def __init__(self, log_dir):
        self.log_dir = log_dir
        self.path = os.path.join(log_dir, LOCK_FILE)
        self._fd = None

    def __enter__(self):
        try:
            import fcntl
        except ImportError:  # not a POSIX system: no lock
            logging.warning("No file locking on this system: nothing stops a second run from "
                            "writing to %s at the same time", self.log_dir)
            return self
        existed = os.path.exists(self.path)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = os.read(fd, 64).decode("ascii", "replace").strip() or "unknown"
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise ConfigError(
                    f"log_dir {self.log_dir} is in use by another run (PID {holder}): wait for "
                    f"it to end, stop it, or use another --log_dir") from None
            raise ConfigError(f"log_dir {self.log_dir}: cannot lock {self.path} "
                              f"({e.strerror or e})") from None
        self._previous = os.read(fd, 1 << 16) if existed else None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
        self._fd = fd
        return self

    def __exit__(self, exc_type, *exc):
        if self._fd is None:
            return False
        if exc_type is not None:
            # A run that stops with an error leaves the log_dir as it found it, lock file included.
            try:
                if self._previous is None:
                    os.remove(self.path)
                else:
                    os.ftruncate(self._fd, 0)
                    os.pwrite(self._fd, self._previous, 0)
            except OSError:
                pass
        os.close(self._fd)  # releases the lock
        self._fd = None
        return False


def _remove_orphan_checkpoint_files(log_dir, manager, candidates, restored,
                                    only_temporary=False):
    """Deletes files of checkpoint saves that never completed (e.g. killed mid-save).

    Called only after the restore succeeded (or found no checkpoint at all), by
    the run that holds the log_dir's lock. Never deleted: the checkpoints that
    the manager keeps, that the state file names (also without the timestamps
    TensorFlow's manager needs to list them, e.g. a state file edited by hand to
    resume from an older checkpoint), the restored one, and every complete
    checkpoint (with its `.index`) older than the restored one (e.g. one that a
    manager kept as preserved and left out of the state file). What goes: the
    temporary files of a save, pieces of a checkpoint without its `.index`, and a
    complete checkpoint newer than the restored one that the state file does not
    name (a save killed before it was named: the resumed run saves that step
    again). With `only_temporary`, only the temporary files go (used when the
    run did not resume from a checkpoint the state file names).

    Args:
      log_dir: the run's directory.
      manager: its `tf.train.CheckpointManager`.
      candidates: `checkpoint_candidates(log_dir)`, read before the restore.
      restored: the restored prefix, or None.
      only_temporary: see above.
    """
    kept_prefixes = set(manager.checkpoints)
    kept_prefixes.update(prefix for prefix, named in candidates if named)
    if restored:
        kept_prefixes.add(restored)
        kept_prefixes.update(prefix for prefix, _ in candidates
                             if _checkpoint_number(prefix) < _checkpoint_number(restored))
    keep = set()
    for prefix in kept_prefixes:
        keep.update(glob.glob(prefix + ".*"))
    for path in glob.glob(os.path.join(log_dir, "ckpt-*")):
        temporary = "_temp" in os.path.basename(path)
        if path in keep or (only_temporary and not temporary):
            continue
        try:
            if os.path.isdir(path):
                shutil.rmtree(path)
            else:
                os.remove(path)
            logging.info("Removed %s (left by an interrupted checkpoint save)", path)
        except OSError:
            pass
    for path in glob.glob(os.path.join(log_dir, "checkpoint.tmp*")) + glob.glob(
            os.path.join(log_dir, "*.tmp-*")):
        try:
            os.remove(path)
        except OSError:
            pass


def _restore_checkpoint(checkpoint, candidates, log_dir):
    """Restores the newest checkpoint of `candidates` that restores; returns its prefix.

    Any error restoring one checkpoint falls back to the next older one
    (logged). Returns None only when there is no candidate at all.

    Raises:
      ConfigError: a checkpoint of another architecture.
      CheckpointError: there are checkpoints and none restores (the message
        names each and why); nothing in log_dir was changed.
    """
    failures = []
    for prefix, _ in candidates:
        try:
            status = checkpoint.restore(prefix)
            status.assert_existing_objects_matched()
            return prefix
        except Exception as e:  # any failure (I/O, corrupt or truncated files): try an older one
            message = _first_line(e)
            if isinstance(e, ValueError) and ("shape" in message.lower()):
                raise ConfigError(
                    f"log_dir {log_dir} holds a checkpoint of a different architecture "
                    f"({message}); use another --log_dir or the same flags") from None
            logging.warning("Checkpoint %s cannot be restored (%s: %s); trying an older one",
                            prefix, type(e).__name__, message)
            failures.append(f"{os.path.basename(prefix)} ({type(e).__name__}: {message})")
    if failures:
        raise CheckpointError(
            f"log_dir {log_dir} holds checkpoints but none can be restored: "
            f"{'; '.join(failures)}; nothing was changed: fix or move them away (a run starts "
            f"from scratch only in a log_dir without checkpoints) or use another --log_dir")
    return None


# ---------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------


def crop_averaged_activations(eval_fn, images):
    """The class activations of `eval_fn` on a batch, averaged over test crops.

    The paper's multi-crop test (Sec. 5: "If we average class activations over
    multiple crops at test time we achieve 1.4%").

    Args:
      eval_fn: `images (N, H, W, C) -> (poses, activations (N, classes))`.
      images: a batch `(B, H, W, C)`, or `(B, K, H, W, C)` of K crops per example
        (`datasets.make_dataset(test_crops=K)`).

    Returns:
      the activations `(B, classes)`: of the images, or the mean over the K crops.
    """
    images = tf.convert_to_tensor(images)
    if images.shape.rank != 5:
        return eval_fn(images)[1]
    batch, crops = tf.shape(images)[0], images.shape[1]
    _, activations = eval_fn(tf.reshape(images, [-1, *images.shape[2:]]))
    return tf.reduce_mean(tf.reshape(activations, [batch, crops, -1]), axis=1)


def run_evaluation(model, eval_fn, dataset, num_classes, margin, loss_fn=None):
    """Accuracy, summed loss and confusion matrix of a model on a dataset.

    `loss_fn(labels, activations, margin)`: the loss (`loss_function`); None:
    the spread loss. With images of K test crops per example `(B, K, H, W, C)`
    the accuracy and loss use the class activations averaged over the crops
    (`crop_averaged_activations`).
    """
    loss_fn = loss_fn or losses.spread_loss_from_labels
    confusion = np.zeros((num_classes, num_classes), np.int64)
    total_loss = 0.0
    count = 0
    for images, labels in dataset:
        activations = crop_averaged_activations(eval_fn, images)
        pred = np.argmax(activations.numpy(), axis=-1)
        labels = labels.numpy()
        np.add.at(confusion, (labels, pred), 1)
        total_loss += float(loss_fn(labels, activations, margin))
        count += len(labels)
    accuracy = float(np.trace(confusion)) / max(count, 1)
    return {"accuracy": accuracy, "loss": total_loss, "mean_loss": total_loss / max(count, 1),
            "examples": count, "confusion": confusion}


def format_confusion(confusion):
    """The confusion matrix as text (rows: true class, columns: predicted)."""
    n = confusion.shape[0]
    width = max(5, len(str(int(confusion.max()))) + 1)
    lines = ["true\\pred" + "".join(f"{j:>{width}d}" for j in range(n))]
    for i in range(n):
        lines.append(f"{i:>9d}" + "".join(f"{int(v):>{width}d}" for v in confusion[i]))
    return "\n".join(lines)


def config_for_evaluation(config, explicit=()):
    """`config` with the model settings of the log_dir's config.json.

    The network is built as it was trained: every field of `MODEL_KEYS` comes
    from config.json, except those named in `explicit` (the flags the user
    gave), which are kept and, where they differ from the saved values,
    logged.

    Returns:
      a new TrainConfig (the same values when there is no config.json).
    """
    saved = read_saved_config(config.log_dir)
    if not saved:
        return config
    current = config.to_dict()
    values = {}
    for key in MODEL_KEYS:
        if key not in saved or saved[key] == current[key]:
            continue
        if key in explicit and key in ROUTING_KEYS:
            # Measured (docs/results.md 3.7): a small network trained with 2 iterations
            # tests at 96.96%, and at 10.1% / 18.5% / 12.4% with 1 / 3 / 4.
            logging.warning("Evaluating with %s=%r (the run was trained with %r): the routing "
                            "then computes what the network was not trained for, so expect a "
                            "much lower accuracy", key, current[key], saved[key])
        elif key in explicit:
            logging.info("Evaluating with %s=%r (the run was trained with %r)", key,
                         current[key], saved[key])
        else:
            values[key] = saved[key]
    if values:
        logging.info("Settings from %s: %s", os.path.join(config.log_dir, CONFIG_FILE),
                     ", ".join(f"{k}={v!r}" for k, v in sorted(values.items())))
    return dataclasses.replace(config, **values)


def restore_model(config, checkpoint_path=None):
    """The network of `config` with the weights of a checkpoint of `config.log_dir`.

    Args:
      config: a TrainConfig with the model settings of the run (see
        `config_for_evaluation`, `load_trained`).
      checkpoint_path: a checkpoint prefix; None: the latest of the log_dir.

    The weights are the run's average (`averaged_model`) where
    `config.ema_momentum` > 0, else the trained ones.

    Returns:
      `(model, global_step, checkpoint_path)`; `global_step` is the step of the
      checkpoint (an int64 variable).

    Raises:
      CheckpointError: no checkpoint, or one that does not fit the network.
    """
    model = build_model(config, datasets.get_info(config.dataset))
    global_step = tf.Variable(0, dtype=tf.int64, trainable=False, name="global_step")
    # A run with ema_momentum > 0 delivers its average of the weights.
    weights = "averaged_model" if config.ema_momentum else "model"
    checkpoint = tf.train.Checkpoint(global_step=global_step, **{weights: model})
    path = checkpoint_path or tf.train.latest_checkpoint(config.log_dir)
    if path is None:
        raise CheckpointError(f"no checkpoint in {config.log_dir}: train first or pass "
                              f"--checkpoint")
    try:
        checkpoint.restore(path).expect_partial().assert_existing_objects_matched()
    except Exception as e:  # any failure to read or match the checkpoint
        raise CheckpointError(f"{path}: cannot restore into this model "
                              f"({type(e).__name__}: {_first_line(e)})") from None
    return model, global_step, path


def run_config(log_dir):
    """The TrainConfig of a training run, from its log_dir's config.json.

    Raises:
      CheckpointError: no config.json in log_dir.
    """
    saved = read_saved_config(log_dir)
    if not saved:
        raise CheckpointError(f"{log_dir}: no {CONFIG_FILE}; pass the --log_dir of a training "
                              f"run (train.py writes it)")
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    config = TrainConfig(**{k: v for k, v in saved.items() if k in fields})
    return dataclasses.replace(config, log_dir=log_dir)


def load_trained(log_dir, checkpoint_path=None, models=MODELS, tool="this tool"):
    """A trained network from a training run's log_dir, built as its config.json says.

    For the tools that use a trained model (export, predict, visualize, attack).

    Args:
      log_dir: the run's log_dir.
      checkpoint_path: a checkpoint prefix (default: the latest).
      models: the values of `TrainConfig.model` the tool accepts.
      tool: the tool's name, for the error message.

    Returns:
      `(model, config, checkpoint_path, step)`.

    Raises:
      CheckpointError: no config.json or checkpoint in log_dir, or one that
        does not fit.
      ConfigError: a model the tool does not accept.
    """
    config = run_config(log_dir)
    if config.model not in models:
        raise ConfigError(f"{log_dir} holds a --model={config.model} network; {tool} takes "
                          f"--model={' or '.join(models)} networks")
    model, global_step, path = restore_model(config, checkpoint_path)
    return model, config, path, int(global_step.numpy())


def evaluate(config, checkpoint_path=None, explicit=()):
    """Evaluates a checkpoint of `config.log_dir` (or `checkpoint_path`) on the test set.

    The network is built from the log_dir's config.json (`config_for_evaluation`):
    the fields of `MODEL_KEYS` that are not named in `explicit` come from it.

    Returns:
      a dict with accuracy, loss (summed spread loss at the checkpoint's
      margin; the cross-entropy for the CNN), mean_loss, examples, confusion,
      step and checkpoint.
    """
    config = config_for_evaluation(config, explicit)
    config.validate()
    info = datasets.get_info(config.dataset)
    num_train, _ = prepare_data(config)
    model, global_step, path = restore_model(config, checkpoint_path)
    steps_per_epoch = math.ceil(num_train / config.batch_size)
    margin = margin_function(config, num_train)(int(global_step.numpy()))
    test_ds = test_dataset(config)
    eval_fn = step_lib.make_eval_step(model, config.jit_compile, config.routing_kernels)
    result = run_evaluation(model, eval_fn, test_ds, info.num_classes, margin,
                            loss_function(config))
    result.update(step=int(global_step.numpy()), checkpoint=path,
                  epoch=int(global_step.numpy()) / steps_per_epoch)
    logging.info("Evaluation of %s (step %d)%s: accuracy %.4f, loss %.4f (mean %.5f) on %d "
                 "examples\nconfusion matrix:\n%s", path, result["step"],
                 describe_test_set(config), result["accuracy"],
                 result["loss"], result["mean_loss"], result["examples"],
                 format_confusion(result["confusion"]))
    return result


# ---------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------


def _new_window():
    """Accumulators of the training metrics between two summaries."""
    return {"loss": 0.0, "correct": 0, "examples": 0, "steps": 0, "t": time.time()}


class _Trainer:
    """State of one training run (see `train`)."""

    def __init__(self, config, num_train, strategy=None):
        self.config = config
        self.strategy = strategy
        self.is_chief = is_chief(strategy)
        # A distributed run's workers stop together, at the first step whose all-reduced
        # signals show a stop request (`capsem.step.TrainStep`'s `signals`).
        self._stop_agreed = False
        self.write_dir = config.log_dir
        self.info = datasets.get_info(config.dataset)
        self.num_train = num_train
        self.steps_per_epoch = math.ceil(num_train / config.batch_size)
        # The article: iterations_per_epoch = num_samples // batch_size.
        self.iterations_per_epoch = max(1, num_train // config.batch_size)
        limits = []
        if config.epochs:
            limits.append(config.epochs * self.steps_per_epoch)
        if config.max_steps:
            limits.append(config.max_steps)
        self.total_steps = min(limits) if limits else 0
        self.margin_fn = margin_function(config, num_train)

    def setup(self):
        config = self.config
        if config.deterministic:
            tf.config.experimental.enable_op_determinism()
            if step_lib.onednn_enabled():
                logging.warning(
                    "deterministic=True but TensorFlow runs its oneDNN kernels, which are not "
                    "guaranteed to be run-to-run deterministic (their results depend on the "
                    "threads each call gets): set TF_ENABLE_ONEDNN_OPTS=0 before TensorFlow is "
                    "imported for bit-identical reruns and resumes (train.py --deterministic "
                    "does)")
        keras.utils.set_random_seed(config.seed)
        # With a strategy, the variables are mirrored over its replicas (created in its scope).
        scope = self.strategy.scope() if self.strategy is not None else contextlib.nullcontext()
        with scope:
            self.model = build_model(config, self.info)
            # The "parameter count printed at start" (paper Sec. 5 compares them).
            logging.info("Model %s (%s): %s parameters", config.model, self.model.name,
                         f"{self.model.count_params():,}")
            rate = learning_rate(config, self.total_steps, self.steps_per_epoch)
            if isinstance(rate, keras.optimizers.schedules.LearningRateSchedule):
                logging.info("Learning rate %g, multiplied by %g every %d steps%s",
                             config.learning_rate, config.lr_decay_rate, rate.decay_steps,
                             f" ({float(rate(self.total_steps)):.3g} at step "
                             f"{self.total_steps}, the run's last)" if self.total_steps else "")
            self.optimizer = step_lib.make_optimizer(rate, config.adam_epsilon,
                                                     config.weight_decay)
            self.global_step = tf.Variable(0, dtype=tf.int64, trainable=False,
                                           name="global_step")
            # --ema_momentum: a second network holds the average of the weights.
            self.averaged = build_model(config, self.info) if config.ema_momentum else None
            self.skipped = tf.Variable(0, dtype=tf.int64, trainable=False, name="skipped_steps")
        # "auto": the native kernels where every device of the step is a CPU, else XLA's.
        devices = step_lib.compute_devices(self.strategy)
        kernels = step_lib.resolve_routing_kernels(config.routing_kernels, devices)
        logging.info("EM routing kernels: %s (routing_kernels=%s; devices %s)", kernels,
                     config.routing_kernels, ", ".join(devices))
        kwargs = {}
        if config.micro_batch_size is not None:
            kwargs["micro_batch_size"] = config.micro_batch_size
        elif config.model == "cnn":
            kwargs["micro_batch_size"] = None  # no routing: the whole batch at once
        else:
            kwargs["micro_batch_size"] = step_lib.default_micro_batch_size(
                config.routing, config.jit_compile, kernels)
        if self.strategy is not None:
            kwargs["strategy"] = self.strategy
        self.weight_average = None
        if self.averaged is not None:
            # --ema_warmup counts the applied steps with the optimizer's iterations
            # (checkpointed with it; skipped steps do not count).
            self.weight_average = step_lib.WeightAverage(
                self.model, self.averaged, config.ema_momentum,
                updates=self.optimizer.iterations if config.ema_warmup else None)
            kwargs["weight_average"] = self.weight_average
        self.step_fn = step_lib.TrainStep(self.model, self.optimizer, self.iterations_per_epoch,
                                          clip_norm=config.clip_norm,
                                          jit_compile=config.jit_compile,
                                          routing_kernels=kernels,
                                          global_step=self.global_step,
                                          margin_fn=self.margin_fn,
                                          loss_fn=loss_function(config),
                                          inverse_temperature_fn=inverse_temperature_function(
                                              config, self.num_train), **kwargs)
        self.eval_fn = step_lib.make_eval_step(self.model, config.jit_compile, kernels)
        averaged = {}
        if self.averaged is not None:
            self.averaged_eval_fn = step_lib.make_eval_step(self.averaged, config.jit_compile,
                                                            kernels)
            averaged["averaged_model"] = self.averaged
        self.checkpoint = tf.train.Checkpoint(model=self.model, optimizer=self.optimizer,
                                              global_step=self.global_step,
                                              skipped_steps=self.skipped, **averaged)
        if not self.is_chief:
            # Another worker of a multi-worker run saves with the chief (saving may take
            # part in collective operations) but into a directory of its own, deleted at
            # the end (`close`); it restores from the chief's log_dir.
            self.write_dir = worker_scratch_dir(config.log_dir, self.strategy)
            # A worker that was killed left it behind: the same command removes it.
            shutil.rmtree(self.write_dir, ignore_errors=True)
            os.makedirs(self.write_dir)
        self.manager = tf.train.CheckpointManager(self.checkpoint, self.write_dir,
                                                  max_to_keep=config.keep_checkpoints,
                                                  checkpoint_name="ckpt")
        candidates = checkpoint_candidates(config.log_dir)
        restored = _restore_checkpoint(self.checkpoint, candidates, config.log_dir)
        self.resumed_from = restored
        listed = dict(candidates).get(restored, True)
        if self.is_chief:
            _remove_orphan_checkpoint_files(config.log_dir, self.manager, candidates, restored,
                                            only_temporary=not listed)
        if restored:
            logging.info("Resumed from %s at step %d", restored, int(self.global_step.numpy()))
            self._apply_optimizer_settings()
        else:
            logging.info("No checkpoint in %s: starting from scratch", config.log_dir)
            if self.weight_average is not None:
                self.weight_average.copy_from_model()
        if config.distribute == "multi_worker":
            self._check_workers_agree()
        if self.is_chief:
            self.writer = tf.summary.create_file_writer(config.log_dir)
        else:
            self.writer = tf.summary.create_noop_writer()

    def _check_workers_agree(self):
        """Stops a multi-worker run whose workers restored different global steps.

        Each worker restores from the log_dir it is given, which must be the
        chief's (a shared directory); one that found another checkpoint, or
        none, would train other weights. The steps' sum and sum of squares over
        the replicas tell every worker alike whether they all agree.
        """
        strategy = self.strategy
        local = float(self.global_step.numpy())

        @tf.function
        def sums(value):
            def replica(value):
                return tf.distribute.get_replica_context().all_reduce(
                    tf.distribute.ReduceOp.SUM, tf.stack([value, value * value]))
            return strategy.experimental_local_results(strategy.run(replica, args=(value,)))[0]

        total, squares = (int(round(v)) for v in sums(tf.constant(local, tf.float64)).numpy())
        replicas = strategy.num_replicas_in_sync
        if replicas * squares != total * total:
            raise CheckpointError(
                f"the workers restored different global steps (this one: {int(local)} from "
                f"--log_dir {self.config.log_dir}; mean {total / replicas:g}): to resume, every "
                f"worker must be given the chief's --log_dir, a directory they all share")

    def close(self):
        """Deletes a non-chief worker's checkpoint directory (`setup`)."""
        if not self.is_chief and self.write_dir != self.config.log_dir:
            shutil.rmtree(self.write_dir, ignore_errors=True)

    def _apply_optimizer_settings(self):
        """Gives the optimizer this run's hyper-parameters after a restore.

        The restore brings back the learning rate variable of the run that
        saved the checkpoint; a new `--learning_rate` replaces it here (a
        decaying rate is a schedule object of this run, Adam's epsilon and the
        weight decay Python numbers: all are this run's already).
        """
        if self.config.lr_decay_rate != 1.0:
            return
        restored = float(keras.ops.convert_to_numpy(self.optimizer.learning_rate))
        self.optimizer.learning_rate = self.config.learning_rate
        now = float(keras.ops.convert_to_numpy(self.optimizer.learning_rate))
        if restored != now:
            logging.info("Learning rate %g (restored from the checkpoint) replaced by this run's "
                         "%g", restored, now)

    def save(self, reason):
        step = int(self.global_step.numpy())
        if self.manager.latest_checkpoint and self.manager.latest_checkpoint.endswith(
                f"ckpt-{step}"):
            return self.manager.latest_checkpoint
        path = self.manager.save(checkpoint_number=step)
        if self.is_chief:
            logging.info("Saved checkpoint %s (%s)", path, reason)
        return path

    def augmentation_of_epoch(self, epoch):
        """The `make_dataset` augmentation arguments of (0-based) `epoch`."""
        if epoch < self.config.random_shift_after_epochs:
            return {"random_shift": 0, "random_rotation": 0.0, "random_scale": 0.0,
                    "random_elastic": 0.0}
        return {"random_shift": self.config.random_shift,
                "random_rotation": self.config.random_rotation,
                "random_scale": self.config.random_scale,
                "random_elastic": self.config.random_elastic,
                "elastic_sigma": self.config.elastic_sigma}

    def train_dataset(self, epoch, skip):
        ds = datasets.make_dataset(self.config.dataset, "train",
                                   dataset_dir=self.config.dataset_dir,
                                   data_source=self.config.data_source,
                                   batch_size=self.config.batch_size, training=True,
                                   seed=self.config.seed + epoch,
                                   **self.augmentation_of_epoch(epoch),
                                   smallnorb_split=self.config.smallnorb_split,
                                   download=self.config.download)
        return ds.skip(skip) if skip else ds

    def evaluate_and_log(self, step):
        """Tests the run's network: the average of the weights where there is one
        (`test/accuracy`, `test/loss`; the trained weights then as
        `test/trained_accuracy`, `test/trained_loss`), else the trained weights."""
        margin = self.margin_fn(step)
        evaluated = [("", self.model, self.eval_fn)]
        if self.averaged is not None:
            evaluated = [(" (average of the weights)", self.averaged, self.averaged_eval_fn),
                         (" (trained weights)", self.model, self.eval_fn)]
        # One test pipeline and loss for every evaluated network (a tf.data dataset
        # is iterated afresh by each `run_evaluation`).
        dataset, loss_fn = test_dataset(self.config), loss_function(self.config)
        results = []
        for which, model, eval_fn in evaluated:
            start = time.time()
            result = run_evaluation(model, eval_fn, dataset, self.info.num_classes, margin,
                                    loss_fn)
            logging.info("Test at step %d%s%s: accuracy %.4f, loss %.4f (mean %.5f), %d "
                         "examples in %.1f s\nconfusion matrix:\n%s", step,
                         describe_test_set(self.config), which, result["accuracy"],
                         result["loss"], result["mean_loss"], result["examples"],
                         time.time() - start, format_confusion(result["confusion"]))
            results.append(result)
        with self.writer.as_default(step=step):
            tf.summary.scalar("test/accuracy", results[0]["accuracy"])
            tf.summary.scalar("test/loss", results[0]["mean_loss"])
            if len(results) > 1:
                tf.summary.scalar("test/trained_accuracy", results[1]["accuracy"])
                tf.summary.scalar("test/trained_loss", results[1]["mean_loss"])
        self.writer.flush()
        return results[0]

    def write_histograms(self, images, labels, step):
        """Histograms of the capsules and routing, and pictures of them (`capsem.visualize`)."""
        if self.config.model == "cnn":
            with self.writer.as_default(step=step):
                baseline.write_histograms(self.model, images[:4])
            self.writer.flush()
            return
        # One pass of the capsule layers for both the histograms and the pictures.
        outputs = diagnostics.capsule_outputs(self.model, images[:4], votes=True)
        with self.writer.as_default(step=step):
            diagnostics.write_histograms(
                diagnostics.capsule_details(self.model, images[:4], outputs))
            visualize.write_image_summaries(self.model, images[:4], labels[:4],
                                            dataset=self.config.dataset, outputs=outputs)
        self.writer.flush()

    def run(self, stop):
        """The training loop; `stop` is a `_StopSignal` checked after every step."""
        config = self.config
        start_step = int(self.global_step.numpy())
        progress = _Progress(self.total_steps, start_step, config.batch_size,
                             config.log_every_steps, config.log_every_secs)
        history = {"loss": [], "steps": [], "test": []}
        last_summary = last_hist = last_ckpt = time.time()
        window = _new_window()
        consecutive_bad = 0
        step = start_step
        out = None
        first_summary = True
        last_test = None

        while not (self.total_steps and step >= self.total_steps) and not self._stopping(stop):
            epoch, offset = divmod(step, self.steps_per_epoch)
            pass_start = step
            for images, labels in self.train_dataset(epoch, offset):
                if self.strategy is None:
                    out = self.step_fn(images, labels)
                else:
                    # Every worker acts on the all-reduced requests: a stop (a signal to any
                    # worker) and a periodic save (the chief's clock), at the same step.
                    out = self.step_fn(images, labels, [
                        1.0 if stop.received else 0.0,
                        1.0 if self.is_chief and time.time() - last_ckpt >= config.checkpoint_secs
                        else 0.0])
                    signals = out["signals"].numpy()
                    self._stop_agreed = self._stop_agreed or bool(signals[0] > 0)
                loss = float(out["loss"])
                step = int(self.global_step.numpy())
                if bool(out["finite"]):
                    consecutive_bad = 0
                    window["loss"] += loss
                    window["correct"] += int(out["correct"])
                    window["examples"] += int(labels.shape[0])
                    window["steps"] += 1
                else:
                    consecutive_bad += 1
                    self._skipped_step(step, loss, consecutive_bad)
                history["loss"].append(loss)
                history["steps"].append(step)
                now = time.time()
                if (progress.due(step, now) or step == start_step + 1
                        or step == self.total_steps or self._stopping(stop)):
                    logging.info(progress.line(
                        step, window["loss"] / max(window["examples"], 1),
                        window["correct"] / max(window["examples"], 1),
                        float(out["margin"]), int(self.skipped.numpy())))
                if first_summary or now - last_summary >= config.summary_secs:
                    self._write_scalars(step, out, window)
                    window = _new_window()
                    last_summary = now
                    if first_summary or now - last_hist >= config.histogram_secs:
                        if self.is_chief:
                            self.write_histograms(images, labels, step)
                        last_hist = now
                    first_summary = False
                save_due = (now - last_ckpt >= config.checkpoint_secs if self.strategy is None
                            else bool(signals[1] > 0))
                if save_due and consecutive_bad == 0:
                    self.save("periodic")
                    last_ckpt = time.time()
                if self._stopping(stop) or (self.total_steps and step >= self.total_steps):
                    break
            if step == pass_start:  # a pass without a batch would repeat forever
                raise DataError(
                    f"the training data of {config.dataset} yielded no batch for epoch "
                    f"{epoch + 1} after skipping {offset} batches of {config.batch_size} "
                    f"({self.num_train} training examples expected, {self.steps_per_epoch} "
                    f"steps per epoch)")
            if self._stopping(stop):
                break
            if step % self.steps_per_epoch == 0:
                if consecutive_bad == 0:  # a bad streak keeps the last good checkpoint
                    self.save(f"end of epoch {step // self.steps_per_epoch}")
                    last_ckpt = time.time()
                if config.eval_every_epoch and self.is_chief:
                    last_test = self.evaluate_and_log(step)
                    history["test"].append((step, last_test["accuracy"]))

        self._write_scalars(step, out, window)
        stopped_by = stop.received
        if self._stopping(stop):
            stopped_by = stopped_by or "a signal to another worker"
            self.save(f"stopped by {stopped_by}")
            logging.info("Stopped by %s at step %d; the checkpoint is saved: run the same "
                         "command again to resume", stopped_by, step)
        else:
            self.save("end of training")
            if config.eval_every_epoch and self.is_chief and (
                    last_test is None or history["test"][-1][0] != step):
                last_test = self.evaluate_and_log(step)
                history["test"].append((step, last_test["accuracy"]))
        self.writer.flush()
        return {"step": step, "stopped_by": stopped_by, "history": history,
                "test": last_test, "skipped_steps": int(self.skipped.numpy()),
                "checkpoint": self.manager.latest_checkpoint if self.is_chief else None,
                "steps_per_sec": progress.rate}

    def _stopping(self, stop):
        """Whether the run stops: a signal to this process, or, distributed, to any worker."""
        return self._stop_agreed if self.strategy is not None else stop.received

    def _skipped_step(self, step, loss, consecutive_bad):
        """Counts and reports a step skipped for a non-finite loss or gradient."""
        self.skipped.assign_add(1)
        logging.warning("Step %d skipped: non-finite loss or gradient (loss %s); %d "
                        "consecutive, %d in all", step, loss, consecutive_bad,
                        int(self.skipped.numpy()))
        with self.writer.as_default(step=step):
            tf.summary.scalar("train/skipped_steps", self.skipped)
        self.writer.flush()
        if consecutive_bad >= self.config.max_bad_steps:
            raise TrainingError(
                f"{consecutive_bad} consecutive non-finite steps (last at step {step}); "
                f"stopped without saving, the last good checkpoint is "
                f"{self.manager.latest_checkpoint or 'none'}; try --stable_routing or a "
                f"lower --learning_rate")

    def _write_scalars(self, step, out, window):
        if out is None:
            return
        elapsed = max(time.time() - window["t"], 1e-9)
        with self.writer.as_default(step=step):
            if window["steps"]:
                # Per example, like test/loss (a step's loss is summed over its batch).
                tf.summary.scalar("train/loss", window["loss"] / max(window["examples"], 1))
                tf.summary.scalar("train/accuracy",
                                  window["correct"] / max(window["examples"], 1))
                tf.summary.scalar("train/steps_per_sec", window["steps"] / elapsed)
            # The margin the last step trained with (the schedule at its step).
            tf.summary.scalar("train/margin", float(out["margin"]))
            tf.summary.scalar("train/learning_rate",
                              float(keras.ops.convert_to_numpy(self.optimizer.learning_rate)))
            tf.summary.scalar("train/skipped_steps", self.skipped)
            if out is not None:
                tf.summary.scalar("train/grad_norm", out["grad_norm"])
        self.writer.flush()


def train(config):
    """Trains the article's network; resumes from the latest checkpoint of `config.log_dir`.

    The run holds `LogDirLock` on the log_dir for as long as it lasts. On
    resume, the settings are compared with the log_dir's config.json
    (`compare_with_saved_config`); allowed changes are logged and recorded
    under "changes" in config.json with the step where they began.

    Returns:
      a dict with the final `step`, `stopped_by` (None, 'SIGINT' or 'SIGTERM'),
      `history` (per-step losses), `test` (the last evaluation), `skipped_steps`,
      `checkpoint` (the last saved) and `steps_per_sec` (the rate of the last progress line).

    Raises:
      ConfigError, DataError, CheckpointError: bad input, before training starts.
      TrainingError: too many consecutive non-finite steps, or (distributed) a worker
        stopped or could not be reached.
    """
    config.validate()
    # First: MultiWorkerMirroredStrategy must exist before TensorFlow runs any operation.
    strategy = make_strategy(config.distribute)
    chief = is_chief(strategy)
    if strategy is not None:
        _log_strategy(config.distribute, strategy, chief, config.batch_size)
    with _StopSignal() as stop:
        # Read-only checks first: bad input stops the run before anything is written.
        saved = read_saved_config(config.log_dir)
        compare_with_saved_config(config, saved, bool(checkpoint_candidates(config.log_dir)))
        num_train, _ = prepare_data(config)
        if chief:
            _ensure_writable_dir(config.log_dir)
        # Only the chief writes the log_dir (the other workers of a multi-worker run read it).
        with LogDirLock(config.log_dir) if chief else contextlib.nullcontext():
            saved = read_saved_config(config.log_dir)  # again, now that no one else writes
            changes = compare_with_saved_config(config, saved,
                                                bool(checkpoint_candidates(config.log_dir)))
            trainer = _Trainer(config, num_train, strategy)
            try:
                trainer.setup()
                record = config.to_dict()
                record[CHANGES_KEY] = list(saved.get(CHANGES_KEY, [])) if (
                    saved and trainer.resumed_from) else []
                step = int(trainer.global_step.numpy())
                for key, old, new in changes:
                    logging.info("Resuming with %s=%r (was %r) from step %d", key, new, old,
                                 step)
                    record[CHANGES_KEY].append({"step": step, "setting": key, "saved": old,
                                                "new": new})
                if chief:
                    _write_json_atomically(os.path.join(config.log_dir, CONFIG_FILE), record)
                logging.info("Training %s on %s: %d steps per epoch, iterations_per_epoch %d "
                             "(margin schedule), %s", config.dataset, config.data_source,
                             trainer.steps_per_epoch, trainer.iterations_per_epoch,
                             f"until step {trainer.total_steps}" if trainer.total_steps
                             else "no step limit")
                try:
                    return trainer.run(stop)
                except (tf.errors.UnavailableError, tf.errors.CancelledError,
                        tf.errors.DeadlineExceededError) as e:
                    if strategy is None:
                        raise
                    # A worker died or cannot be reached: TensorFlow aborts the collective
                    # operations of the others (at once on a broken connection, or at its
                    # peer health check, every 30 s). The step in flight is lost.
                    raise TrainingError(
                        f"a worker of the {config.distribute} job stopped or cannot be "
                        f"reached ({type(e).__name__}: {_cause_line(e)}); stopped at "
                        f"step {int(trainer.global_step.numpy())} without saving; run every "
                        f"worker's command again to resume from the last checkpoint "
                        f"({_last_checkpoint(config.log_dir)})") from None
            finally:
                trainer.close()


def _cause_line(error, limit=200):
    """The line of a TensorFlow error that says what failed (a collective's cause), shortened."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    for line in lines:
        if any(k in line.lower() for k in ("connect", "is down", "unavailable", "deadline",
                                           "cancel", "abort")):
            return line[:limit]
    return lines[0][:limit] if lines else type(error).__name__


def _last_checkpoint(log_dir):
    """The latest checkpoint of a log_dir, as a message fragment."""
    path = tf.train.latest_checkpoint(log_dir)
    return os.path.basename(path) if path else f"none in {log_dir}: it starts again from step 0"


def _log_strategy(distribute, strategy, chief, batch_size):
    """Logs the replicas of a distributed run and how the global batch is split."""
    name = {"mirrored": "MirroredStrategy",
            "multi_worker": "MultiWorkerMirroredStrategy"}.get(distribute, distribute)
    replicas = strategy.num_replicas_in_sync
    resolver = getattr(strategy, "cluster_resolver", None)
    where = (f"worker {resolver.task_type}:{resolver.task_id}"
             if resolver is not None and resolver.task_type else "one process")
    logging.info("%s: %d replicas in sync (%s, %s), global batch %d, %s per replica",
                 name, replicas, where,
                 "chief: writes the log_dir" if chief else "not the chief: writes nothing",
                 batch_size, "/".join(str((r + 1) * batch_size // replicas
                                          - r * batch_size // replicas)
                                      for r in range(replicas)))
