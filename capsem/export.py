"""Export a trained network: a TensorFlow SavedModel for serving and the Keras `.keras` file.

`export(log_dir, export_dir)` writes, from a checkpoint of a `train.py` run:

* `export_dir/serving/1/`: a SavedModel (version 1, the layout TensorFlow Serving reads
  with `--model_base_path=export_dir/serving`) whose `serving_default` signature takes
  `images`, uint8 `(None, H, W, C)` as the dataset stores them (28 x 28 x 1 for MNIST,
  96 x 96 x 1 for smallNORB), preprocesses them as the test pipeline does
  (`capsem.datasets.preprocess_for_eval`) and returns `class_ids` (int64 `(None,)`),
  `activations` (float32 `(None, classes)`) and `poses` (float32 `(None, classes, 4, 4)`).
  Its graph holds standard TensorFlow operations only (EM routing traced with the native
  kernels, the XLA kernels and the paper routing's compilation off), so a process without
  capsem loads and runs it with `tf.saved_model.load`.
* `export_dir/model.keras`: the Keras model (float32 preprocessed images in, `(poses,
  activations)` out), which `keras.models.load_model` reads after `import capsem`.
* `export_dir/export.json`: where it came from (log_dir, checkpoint, step, dataset, input
  shapes, signature).

Files are written into a temporary directory next to `export_dir` and moved into place
at the end, so a crash leaves no half-written export; an existing non-empty `export_dir`
is refused unless `overwrite=True`, which replaces only the three entries above.
"""

import contextlib
import json
import os
import shutil
import tempfile

import tensorflow as tf

from capsem import datasets, ops, paper_routing, training
from capsem.errors import ConfigError

SIGNATURE = "serving_default"
SERVING_DIR = os.path.join("serving", "1")
KERAS_FILE = "model.keras"
INFO_FILE = "export.json"
#: What `export` writes in export_dir (and, with overwrite, replaces).
ENTRIES = ("serving", KERAS_FILE, INFO_FILE)


class ServingModule(tf.Module):
    """The network with its preprocessing, as a `tf.Module` to save.

    Args:
      model: a `capsem.nets.capsules_net` model.
      dataset: the dataset name it was trained on (its stored image shape and
        preprocessing: `capsem.datasets.raw_image_shape`, `preprocess_for_eval`).

    Calling `serve(images)` with uint8 `(N, H, W, C)` images returns a dict of
    `class_ids` `(N,)` int64, `activations` `(N, classes)` and `poses`
    `(N, classes, 4, 4)`.
    """

    def __init__(self, model, dataset):
        super().__init__(name="capsem_serving")
        self.model = model
        self.dataset = datasets.get_info(dataset).name
        shape = datasets.raw_image_shape(self.dataset)
        self.serve = tf.function(self._serve, input_signature=[
            tf.TensorSpec((None,) + tuple(shape), tf.uint8, name="images")])

    def _serve(self, images):
        x = datasets.preprocess_for_eval(self.dataset, images)  # (N, H', W', C) float32
        poses, activations = self.model(x, training=False)  # (N, classes, 4, 4), (N, classes)
        return {"class_ids": tf.argmax(activations, axis=-1),
                "activations": tf.identity(activations),
                "poses": tf.identity(poses)}


@contextlib.contextmanager
def plain_tensorflow_routing():
    """A context in which EM routing is traced with standard TensorFlow operations only.

    No native custom ops (which a process without capsem cannot load), no XLA
    kernels and no XLA-compiled paper routing (which TensorFlow Serving need not
    support). The numbers agree with the other kernels to float32 rounding.
    """
    with ops.native_routing_kernels(False), ops.xla_routing_kernels(False), \
            paper_routing.compiled(False):
        yield


def _check_export_dir(export_dir, overwrite):
    if os.path.exists(export_dir) and not os.path.isdir(export_dir):
        raise ConfigError(f"export_dir {export_dir} exists and is not a directory")
    if os.path.isdir(export_dir) and os.listdir(export_dir) and not overwrite:
        raise ConfigError(f"export_dir {export_dir} is not empty; choose a new directory or "
                          f"pass --overwrite to replace {', '.join(ENTRIES)} in it")


def export(log_dir, export_dir, checkpoint_path=None, overwrite=False, log=print):
    """Exports a checkpoint of a training run (see the module docstring).

    Args:
      log_dir: the run's log_dir (config.json and checkpoints).
      export_dir: where to write; created if missing.
      checkpoint_path: a checkpoint prefix; None: the latest of log_dir.
      overwrite: replace the entries of `ENTRIES` in a non-empty export_dir
        (other files in it are kept).
      log: callable taking one line of progress.

    Returns:
      the dict written to export.json.

    Raises:
      ConfigError: export_dir is not empty (without overwrite) or not a directory.
      CheckpointError: no usable config.json or checkpoint in log_dir.
    """
    _check_export_dir(export_dir, overwrite)
    model, config, path, step = training.load_trained(log_dir, checkpoint_path, ("capsules",),
                                                      "export.py")
    log(f"Exporting {path} (step {step}, {config.dataset}, routing {config.routing})")
    parent = os.path.dirname(os.path.abspath(export_dir))
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".capsem-export-", dir=parent)
    try:
        module = ServingModule(model, config.dataset)
        # Saving traces the model's own functions too: all of it without capsem's ops.
        with plain_tensorflow_routing():
            tf.saved_model.save(module, os.path.join(staging, SERVING_DIR),
                                signatures={SIGNATURE: module.serve.get_concrete_function()})
        log(f"  SavedModel: {os.path.join(export_dir, SERVING_DIR)} (signature {SIGNATURE})")
        model.save(os.path.join(staging, KERAS_FILE))
        log(f"  Keras model: {os.path.join(export_dir, KERAS_FILE)}")
        info = {
            "log_dir": os.path.abspath(log_dir), "checkpoint": os.path.abspath(path),
            "step": step, "dataset": config.dataset, "routing": config.routing,
            "iterations": config.iterations,
            "serving": {"path": SERVING_DIR, "signature": SIGNATURE,
                        "input": {"images": ["uint8", [None] + list(
                            datasets.raw_image_shape(config.dataset))]},
                        "outputs": ["class_ids", "activations", "poses"]},
            "keras": {"path": KERAS_FILE, "input": ["float32", [None] + list(
                datasets.get_info(config.dataset).input_shape)]},
        }
        with open(os.path.join(staging, INFO_FILE), "w", encoding="utf-8") as f:
            json.dump(info, f, indent=2, sort_keys=True)
        if not os.path.isdir(export_dir):
            os.replace(staging, export_dir)
            staging = None
        else:
            for name in ENTRIES:
                target = os.path.join(export_dir, name)
                if os.path.isdir(target) and not os.path.islink(target):
                    shutil.rmtree(target)
                elif os.path.lexists(target):
                    os.remove(target)
                os.replace(os.path.join(staging, name), target)
        log(f"Exported to {export_dir}")
        return info
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
