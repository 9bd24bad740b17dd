"""Classify image files with a trained network (`predict.py`).

Images of any size and colour mode are converted to the network's input as the training
data were stored (`image_to_input`): decoded (PNG, JPEG, GIF, BMP; the first frame of an
animation), a transparent image composited over black (MNIST's background), colour
converted to grey with ITU-R BT.601 luma weights (`tf.image.rgb_to_grayscale`), resized
to the dataset's stored size (28 x 28 for MNIST: each pixel the mean of the area it
covers when the image is larger, bilinear interpolation when it is smaller), and rounded
to uint8; then preprocessed as the test pipeline does
(`capsem.datasets.preprocess_for_eval`). Nothing else is done: MNIST digits are light on a
dark background, so dark digits on white paper must be inverted first.
"""

import json
import os

import numpy as np
import tensorflow as tf

from capsem import datasets, step, training
from capsem.errors import DataError

#: File name endings of the images a folder is searched for.
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".gif", ".bmp")


def list_images(paths):
    """The image files named by `paths`, and an error line per path that names none.

    A folder contributes its files whose names end in one of `IMAGE_EXTENSIONS`
    (any case), sorted by name, not recursively; any other path is taken as a
    file (`predict_files` reports one that cannot be read).

    Returns:
      `(files, errors)`: a list of paths and a list of `error: ...` lines (folders
      without images).
    """
    files, errors = [], []
    for path in paths:
        if os.path.isdir(path):
            found = sorted(os.path.join(path, name) for name in os.listdir(path)
                           if name.lower().endswith(IMAGE_EXTENSIONS)
                           and os.path.isfile(os.path.join(path, name)))
            if not found:
                errors.append(f"error: {path}: a folder without images (looked for "
                              f"{', '.join(IMAGE_EXTENSIONS)})")
            files.extend(found)
        else:
            files.append(path)
    return files, errors


def image_to_input(data, shape):
    """Encoded image bytes as a uint8 `shape` array `(H, W, C)` (see the module docstring).

    Raises:
      DataError: the bytes are not an image TensorFlow can decode.
    """
    try:
        image = tf.io.decode_image(data, expand_animations=False)  # (h, w, c) uint8
    except (tf.errors.InvalidArgumentError, ValueError) as e:
        message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(f"not an image TensorFlow can decode ({message})") from None
    image = tf.cast(image, tf.float32)
    channels = image.shape[-1]
    if channels in (2, 4):  # an alpha channel: composite over black
        image = image[..., :-1] * (image[..., -1:] / 255.0)
    height, width, depth = shape
    if depth == 1 and image.shape[-1] == 3:
        image = tf.image.rgb_to_grayscale(image)
    elif depth == 3 and image.shape[-1] == 1:
        image = tf.image.grayscale_to_rgb(image)
    # Shrinking: each output pixel the mean of the input area it covers; enlarging: bilinear.
    shrink = image.shape[0] >= height and image.shape[1] >= width
    image = tf.image.resize(image, [height, width], method="area" if shrink else "bilinear")
    return np.asarray(tf.cast(tf.clip_by_value(tf.round(image), 0, 255), tf.uint8))


class Predictor:
    """A trained network of a log_dir, ready to classify uint8 images.

    Args:
      log_dir: a `train.py` run's directory.
      checkpoint_path: a checkpoint prefix (default: the latest).
      batch_size: images per call of the network.
    """

    def __init__(self, log_dir, checkpoint_path=None, batch_size=32):
        self.model, self.config, self.checkpoint, self.step = training.load_trained(
            log_dir, checkpoint_path)
        self.dataset = self.config.dataset
        self.shape = datasets.raw_image_shape(self.dataset)
        self.batch_size = batch_size
        self._eval = step.make_eval_step(self.model, self.config.jit_compile,
                                         self.config.routing_kernels)

    def activations(self, images):
        """Class activations `(N, classes)` of uint8 images `(N, *self.shape)`."""
        out = []
        for start in range(0, len(images), self.batch_size):
            batch = datasets.preprocess_for_eval(self.dataset,
                                                 images[start:start + self.batch_size])
            out.append(self._eval(batch)[1].numpy())
        return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


def result_record(path, activations, top=3):
    """The prediction of one image as a dict: file, class, activation and the `top` classes."""
    order = np.argsort(-activations, kind="stable")[:top]
    return {"file": path, "class": int(order[0]), "activation": float(activations[order[0]]),
            "top": [[int(c), float(activations[c])] for c in order]}


def format_text(record):
    """One line: `path: class 7 (0.981); top 3: 7 0.981, 1 0.412, 9 0.220`."""
    top = ", ".join(f"{c} {a:.3f}" for c, a in record["top"])
    return (f"{record['file']}: class {record['class']} ({record['activation']:.3f}); "
            f"top {len(record['top'])}: {top}")


def predict_files(predictor, files, emit, error, as_json=False, top=3):
    """Classifies `files`, calling `emit(line)` per image and `error(line)` per bad file.

    A file that cannot be read or decoded is reported and skipped; the others are
    classified in batches.

    Returns:
      the number of files that failed.
    """
    failed = 0
    pending = []

    def flush():
        if not pending:
            return
        acts = predictor.activations(np.stack([image for _, image in pending]))
        for (path, _), row in zip(pending, acts):
            record = result_record(path, row, top)
            emit(json.dumps(record) if as_json else format_text(record))
        pending.clear()

    for path in files:
        try:
            with open(path, "rb") as f:
                data = f.read()
            pending.append((path, image_to_input(data, predictor.shape)))
        except OSError as e:
            failed += 1
            error(f"error: {path}: cannot read ({e.strerror or e})")
        except DataError as e:
            failed += 1
            error(f"error: {path}: {e}")
        if len(pending) >= predictor.batch_size:
            flush()
    flush()
    return failed
