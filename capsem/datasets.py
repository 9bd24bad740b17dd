"""Input pipelines: MNIST IDX files, the article's TFRecords, tensorflow-datasets.

The article ("Understanding Matrix capsules with EM Routing", Jonathan Hui) trains
on MNIST stored as TFRecords of PNG-encoded images, produced by a
``download_and_convert_mnist.py`` script, and preprocesses every image as
``(tf.cast(image, tf.float32) - 128) / 128``. This module provides:

* ``read_idx`` / ``load_mnist_idx``: strict readers of the original MNIST IDX
  files (gzipped or plain);
* ``convert_mnist``: the IDX -> TFRecord conversion, atomic, idempotent and
  reproducible, which never replaces a file it did not write
  (``written_by_capsem``);
* ``read_image_tfrecord``: a whole TFRecord of the article's image Examples
  (capsem's or another tool's), checked and decoded into memory once;
* ``make_dataset``: batched ``tf.data`` pipelines over those TFRecords (from
  memory, in ``epoch_order``), or over tensorflow-datasets' 'mnist',
  'fashion_mnist' and 'smallnorb';
* ``validate_tfrecord``: a full CRC-checked pass over a TFRecord file.

Every problem with the data is raised as a one-line ``capsem.errors.DataError``
naming the offending file or directory. Only ``download_mnist`` (and
``convert_mnist(download=True)``, which calls it) and tensorflow-datasets with
``make_dataset(..., download=True)`` / ``tfds_split_sizes(..., download=True)``
touch the network.
"""

import collections
import dataclasses
import gzip
import hashlib
import json
import os
import random
import secrets
import shutil
import struct
import urllib.error
import urllib.request
import zlib

import numpy as np
import tensorflow as tf
from absl import logging

from capsem.errors import DataError

__all__ = [
    "DatasetInfo",
    "DATASETS",
    "DATA_SOURCES",
    "SPLITS",
    "DEFAULT_MNIST_DIR",
    "MNIST_MIRRORS",
    "get_info",
    "preprocess_image",
    "read_idx",
    "load_mnist_idx",
    "download_mnist",
    "convert_mnist",
    "written_by_capsem",
    "read_image_tfrecord",
    "epoch_order",
    "random_shift_image",
    "random_affine_image",
    "random_elastic_image",
    "SMALLNORB_SPLITS",
    "VIEWPOINTS",
    "MAX_TEST_CROPS",
    "smallnorb_viewpoint_filter",
    "TEST_SHIFT",
    "smallnorb_crop_offsets",
    "shifted_copy_offsets",
    "test_crop_offsets",
    "make_dataset",
    "validate_tfrecord",
]


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """Static description of a dataset as the network sees it.

    Attributes:
      name: the dataset's name (a key of ``DATASETS``, also its tfds name).
      input_shape: (height, width, channels) of one preprocessed image.
      num_classes: number of labels (labels are 0 .. num_classes - 1).
      num_train: number of examples in the 'train' split.
      num_test: number of examples in the 'test' split.
    """

    name: str
    input_shape: tuple
    num_classes: int
    num_train: int
    num_test: int


DATASETS = {
    "mnist": DatasetInfo("mnist", (28, 28, 1), 10, 60000, 10000),
    "fashion_mnist": DatasetInfo("fashion_mnist", (28, 28, 1), 10, 60000, 10000),
    "smallnorb": DatasetInfo("smallnorb", (32, 32, 1), 5, 24300, 24300),
}

DATA_SOURCES = ("tfrecord", "tfds")
SPLITS = ("train", "test")

# Where download_and_convert_mnist.py writes, and make_dataset reads, the MNIST
# TFRecords by default: relative to the current directory (the repository root
# when the tools are run from there; /dataset/ is git-ignored).
DEFAULT_MNIST_DIR = os.path.join("dataset", "mnist")

# Mirrors of the original MNIST IDX .gz files, tried in order by download_mnist.
MNIST_MIRRORS = (
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
)

# IDX base names (without .gz) of the images and labels of each split.
_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_MNIST_COUNTS = {"train": 60000, "test": 10000}
_MNIST_SIZE = (28, 28)

_IDX_IMAGES_MAGIC = 2051
_IDX_LABELS_MAGIC = 2049

_SIDECAR_FORMAT = "capsem-mnist-tfrecord-v1"
_PROGRESS_EVERY = 10000
_HASH_CHUNK = 1 << 20

# Preprocessing of smallNORB as in the paper: downsample to 48x48, crop 32x32.
_SMALLNORB_RESIZED = 48
_SMALLNORB_CROP = 32
_SMALLNORB_BRIGHTNESS = 32.0 / 255.0
_SMALLNORB_CONTRAST = (0.5, 1.5)
# Second half of the stateless seed pair used for smallNORB augmentation.
_AUGMENT_SEED_SALT = 20180430

#: The values of `make_dataset(smallnorb_split=...)`: smallNORB's own train/test
#: split, or the paper's novel-viewpoint experiments (Hinton, Sabour & Frosst,
#: "Matrix capsules with EM routing", ICLR 2018, Sec. 5.1 "Generalization to
#: novel viewpoints"): "We trained [...] on one-third of the training data
#: containing azimuths of (300, 320, 340, 0, 20, 40) and tested on the two-thirds
#: of the test data that contained azimuths from 60 to 280. In a separate
#: experiment, we trained on the 3 smaller elevations and tested on the 6 larger
#: elevations."
SMALLNORB_SPLITS = ("standard", "azimuth", "elevation")
#: The values of `make_dataset(viewpoints=...)`: the viewpoints of the training
#: subset, the others, or every example of the split.
VIEWPOINTS = ("familiar", "novel", "all")
# The familiar viewpoints as tfds' labels. tfds' smallnorb builder stores
# `label_azimuth` = degrees / 20 (0..17: the .info files hold 0, 2, ..., 34, i.e.
# degrees / 10, which the builder halves) and `label_elevation` = (degrees - 30) / 5
# (0..8: 30 to 70 degrees every 5). So azimuths 300..40 degrees are labels 15, 16,
# 17, 0, 1, 2 and the 3 smallest elevations (30, 35, 40 degrees) labels 0, 1, 2.
_FAMILIAR_VIEWPOINTS = {
    "azimuth": ("label_azimuth", (15, 16, 17, 0, 1, 2)),
    "elevation": ("label_elevation", (0, 1, 2)),
}
#: The most crops `make_dataset(test_crops=...)` takes: a 3 x 3 grid of offsets.
MAX_TEST_CROPS = 9
#: MNIST-like test crops: copies of the test image shifted by up to this many pixels
#: (`shifted_copy_offsets`), within the training shifts' range (`random_shift`).
TEST_SHIFT = 1


def _one_line(text):
    """Collapses an error text (for example a TF error) into a single line."""
    lines = [line.strip() for line in str(text).splitlines() if line.strip()]
    return " ".join(lines)


def _first_line(text):
    """Returns the first non-empty line of an error text."""
    for line in str(text).splitlines():
        if line.strip():
            return line.strip()
    return ""


def _shape_str(shape):
    """Formats a shape as a Python tuple, e.g. '(28, 28, 1)'."""
    return str(tuple(int(d) for d in shape))


def get_info(name):
    """Returns the static description of a dataset.

    Args:
      name: one of the keys of ``DATASETS`` ('mnist', 'fashion_mnist', 'smallnorb').

    Returns:
      The dataset's ``DatasetInfo``.

    Raises:
      DataError: if ``name`` is not a known dataset.
    """
    try:
        return DATASETS[name]
    except (KeyError, TypeError):
        raise DataError(
            f"unknown dataset {name!r}: accepted names are {', '.join(sorted(DATASETS))}"
        ) from None


def preprocess_image(images_uint8):
    """The article's image preprocessing: ``(float32(x) - 128) / 128``.

    Maps uint8 pixel values 0 .. 255 to -1 .. 0.9921875 (127/128).

    Args:
      images_uint8: a uint8 tensor or array of any shape.

    Returns:
      A float32 tensor of the same shape.
    """
    images = tf.cast(images_uint8, tf.float32)
    return (images - 128.0) / 128.0


# --------------------------------------------------------------------------- IDX


def read_idx(path):
    """Parses one MNIST IDX file, gzipped or plain.

    The file is a big-endian int32 magic number, 2051 for images (followed by the
    int32 count, rows and cols) or 2049 for labels (followed by the count), then
    exactly the announced number of uint8 values.

    Args:
      path: path of the file; gzip compression is recognised by its content.

    Returns:
      A uint8 array: (count, rows, cols) for an images file, (count,) for a
      labels file.

    Raises:
      DataError: naming the file if it is missing or unreadable, the gzip data is
        truncated or corrupt, the magic number or header is wrong, or the payload
        is not exactly as long as the header says.
    """
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise DataError(f"{path}: no such file (expected an MNIST IDX file)") from None
    except IsADirectoryError:
        raise DataError(f"{path}: is a directory, expected an MNIST IDX file") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read: {_one_line(e.strerror or e)}") from None

    if data[:2] == b"\x1f\x8b":
        try:
            data = gzip.decompress(data)
        except (EOFError, OSError, zlib.error) as e:
            raise DataError(
                f"{path}: truncated or corrupt gzip data ({_one_line(e)})"
            ) from None

    if len(data) < 8:
        raise DataError(
            f"{path}: truncated: {len(data)} bytes, an IDX header needs at least 8"
        )
    magic, count = struct.unpack(">ii", data[:8])
    if magic == _IDX_IMAGES_MAGIC:
        if len(data) < 16:
            raise DataError(
                f"{path}: truncated: {len(data)} bytes, an IDX images header needs 16"
            )
        rows, cols = struct.unpack(">ii", data[8:16])
        if count < 0 or rows <= 0 or cols <= 0:
            raise DataError(
                f"{path}: bad IDX header: {count} images of {rows}x{cols}"
            )
        expected = count * rows * cols
        payload = len(data) - 16
        if payload != expected:
            what = "truncated" if payload < expected else "trailing data"
            raise DataError(
                f"{path}: {what}: header says {count} images of {rows}x{cols} "
                f"({expected} bytes of pixels), file holds {payload} bytes of pixels"
            )
        return np.frombuffer(data, dtype=np.uint8, offset=16).reshape(count, rows, cols).copy()
    if magic == _IDX_LABELS_MAGIC:
        if count < 0:
            raise DataError(f"{path}: bad IDX header: {count} labels")
        payload = len(data) - 8
        if payload != count:
            what = "truncated" if payload < count else "trailing data"
            raise DataError(
                f"{path}: {what}: header says {count} labels, file holds {payload} bytes of labels"
            )
        return np.frombuffer(data, dtype=np.uint8, offset=8).copy()
    raise DataError(
        f"{path}: bad magic number {magic} (0x{magic & 0xFFFFFFFF:08x}): expected "
        f"{_IDX_IMAGES_MAGIC} (IDX images) or {_IDX_LABELS_MAGIC} (IDX labels)"
    )


def _check_split(split):
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}: accepted splits are {', '.join(SPLITS)}")


def _find_idx_file(source_dir, base):
    """Returns the path of ``base`` + '.gz' in source_dir, or of ``base`` if only it exists."""
    gz = os.path.join(source_dir, base + ".gz")
    plain = os.path.join(source_dir, base)
    if not os.path.exists(gz) and os.path.exists(plain):
        return plain
    return gz


def _source_paths(source_dir, split):
    """Returns the (images, labels) IDX paths of a split in source_dir."""
    return tuple(_find_idx_file(source_dir, base) for base in _MNIST_FILES[split])


def _resolve_count(split, expected_count):
    """Returns the expected number of examples, or None for 'any count'."""
    if expected_count is False:
        return None
    if expected_count is None:
        return _MNIST_COUNTS[split]
    if isinstance(expected_count, bool) or not isinstance(expected_count, (int, np.integer)):
        raise DataError(
            f"expected_count for split {split!r} must be None, False or a positive int, "
            f"got {expected_count!r}"
        )
    if expected_count <= 0:
        raise DataError(
            f"expected_count for split {split!r} must be positive, got {expected_count}"
        )
    return int(expected_count)


def load_mnist_idx(source_dir, split, expected_count=None):
    """Reads and checks the MNIST images and labels of one split from IDX files.

    Looks for ``train-images-idx3-ubyte.gz`` / ``train-labels-idx1-ubyte.gz``
    (split 'train') or ``t10k-images-idx3-ubyte.gz`` / ``t10k-labels-idx1-ubyte.gz``
    (split 'test') in ``source_dir``, or the same names without ``.gz``.

    Args:
      source_dir: directory holding the IDX files.
      split: 'train' or 'test'.
      expected_count: None for the standard count of the split (60000 or 10000),
        a positive int for another exact count (small generated files), or False
        to accept any count.

    Returns:
      (images, labels): uint8 array (N, 28, 28, 1) and int64 array (N,).

    Raises:
      DataError: naming the file if a file is missing or malformed, is of the
        wrong kind, holds images that are not 28x28, holds the wrong number of
        examples, or holds a label outside 0..9.
    """
    _check_split(split)
    count = _resolve_count(split, expected_count)
    source_dir = os.fspath(source_dir)
    images_path, labels_path = _source_paths(source_dir, split)

    images = read_idx(images_path)
    if images.ndim != 3:
        raise DataError(
            f"{images_path}: is an IDX labels file (magic {_IDX_LABELS_MAGIC}), "
            f"expected IDX images (magic {_IDX_IMAGES_MAGIC})"
        )
    if images.shape[1:] != _MNIST_SIZE:
        raise DataError(
            f"{images_path}: images are {images.shape[1]}x{images.shape[2]}, "
            f"expected {_MNIST_SIZE[0]}x{_MNIST_SIZE[1]}"
        )
    if count is not None and images.shape[0] != count:
        raise DataError(
            f"{images_path}: holds {images.shape[0]} images, expected {count} for the "
            f"{split} split"
        )

    labels = read_idx(labels_path)
    if labels.ndim != 1:
        raise DataError(
            f"{labels_path}: is an IDX images file (magic {_IDX_IMAGES_MAGIC}), "
            f"expected IDX labels (magic {_IDX_LABELS_MAGIC})"
        )
    if labels.shape[0] != images.shape[0]:
        raise DataError(
            f"{labels_path}: holds {labels.shape[0]} labels, expected {images.shape[0]} "
            f"(the number of images in {os.path.basename(images_path)})"
        )
    num_classes = DATASETS["mnist"].num_classes
    if labels.size and int(labels.max()) >= num_classes:
        bad = int(np.argmax(labels >= num_classes))
        raise DataError(
            f"{labels_path}: label {int(labels[bad])} at index {bad} is out of range, "
            f"expected 0..{num_classes - 1}"
        )
    return images[..., np.newaxis], labels.astype(np.int64)


# ---------------------------------------------------------------------- download


def download_mnist(source_dir, *, mirrors=MNIST_MIRRORS, progress=None, timeout=60):
    """Fetches the four MNIST IDX .gz files into source_dir, skipping present ones.

    Each file is downloaded to a temporary file, checked with ``read_idx`` and
    then moved into place; the mirrors are tried in order.

    Args:
      source_dir: directory to write into (created if missing).
      mirrors: base URLs ending with '/', tried in order for each file.
      progress: callable taking one line of text; default ``logging.info``.
      timeout: seconds to wait on each connection.

    Returns:
      The list of paths that were downloaded (empty if all files were present).

    Raises:
      DataError: if a file could not be fetched from any mirror, saying which
        URLs were tried.
    """
    log = progress or logging.info
    source_dir = os.fspath(source_dir)
    try:
        os.makedirs(source_dir, exist_ok=True)
    except OSError as e:
        raise DataError(f"{source_dir}: cannot create directory: {_one_line(e)}") from None
    fetched = []
    for split in SPLITS:
        for base in _MNIST_FILES[split]:
            name = base + ".gz"
            dest = os.path.join(source_dir, name)
            if os.path.exists(dest) or os.path.exists(os.path.join(source_dir, base)):
                continue
            failures = []
            for mirror in mirrors:
                url = mirror + name
                log(f"downloading {url}")
                fd, tmp = _create_temp(source_dir, name)
                try:
                    with os.fdopen(fd, "wb") as out:
                        with urllib.request.urlopen(url, timeout=timeout) as response:
                            shutil.copyfileobj(response, out)
                    read_idx(tmp)
                    os.replace(tmp, dest)
                except (urllib.error.URLError, OSError, ValueError) as e:
                    _remove_quietly(tmp)
                    reason = e.reason if isinstance(e, urllib.error.URLError) else e
                    failures.append(f"{url} ({_one_line(reason)})")
                    continue
                except BaseException:
                    _remove_quietly(tmp)
                    raise
                fetched.append(dest)
                break
            else:
                raise DataError(
                    f"could not download {name}: tried {'; '.join(failures) or 'no mirror'}; "
                    f"copy the four MNIST IDX .gz files into a directory and pass it with "
                    f"--source_dir"
                )
    return fetched


# ----------------------------------------------------------------------- convert


def _create_temp(directory, name):
    """Creates a new hidden temporary file for ``name`` in directory.

    Unlike tempfile.mkstemp, the file gets the usual permissions (0666 less the
    umask), so the file renamed into place is readable like any other output.

    Returns:
      (open file descriptor for writing, path).
    """
    while True:
        path = os.path.join(directory, f".{name}.{secrets.token_hex(6)}.tmp")
        try:
            return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), path
        except FileExistsError:  # pragma: no cover - 48 random bits
            continue


def _remove_quietly(path):
    try:
        os.remove(path)
    except FileNotFoundError:
        pass
    except OSError as e:  # pragma: no cover - only on odd file systems
        logging.warning("could not remove %s: %s", path, e)


def _file_digest(path):
    """Returns (size in bytes, sha256 hex digest) of a file."""
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while True:
            chunk = f.read(_HASH_CHUNK)
            if not chunk:
                break
            size += len(chunk)
            h.update(chunk)
    return size, h.hexdigest()


def _sources_record(paths):
    """Sidecar description of the source files: {basename: {size, sha256}}."""
    record = {}
    for path in paths:
        size, digest = _file_digest(path)
        record[os.path.basename(path)] = {"size": size, "sha256": digest}
    return record


def _sidecar_path(tfrecord_path):
    return os.fspath(tfrecord_path) + ".json"


def _write_json_atomically(path, obj):
    directory = os.path.dirname(path) or "."
    fd, tmp = _create_temp(directory, os.path.basename(path))
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=1, sort_keys=True)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        _remove_quietly(tmp)
        raise


def _read_sidecar(tfrecord_path):
    """The parsed sidecar of a TFRecord when it is one of capsem's, else None."""
    try:
        with open(_sidecar_path(tfrecord_path), encoding="utf-8") as f:
            meta = json.load(f)
    except (OSError, ValueError):
        return None
    if not isinstance(meta, dict) or meta.get("format") != _SIDECAR_FORMAT:
        return None
    return meta


def written_by_capsem(tfrecord_path):
    """The sidecar of a TFRecord file that capsem wrote itself, else None.

    capsem wrote the file when its sidecar (``<file>.json``) is one of capsem's
    and records the file's present size and sha256. Any other file in a
    dataset directory is not capsem's: capsem reads it as it is and never
    modifies, moves or deletes it (`convert_mnist`).

    Returns:
      the sidecar's dict, or None.
    """
    meta = _read_sidecar(tfrecord_path)
    if meta is None:
        return None
    try:
        recorded = (int(meta["tfrecord"]["size"]), str(meta["tfrecord"]["sha256"]))
        if not os.path.isfile(tfrecord_path) or os.path.getsize(tfrecord_path) != recorded[0]:
            return None
        if _file_digest(tfrecord_path) != recorded:
            return None
    except (KeyError, TypeError, ValueError, AttributeError, OSError):
        return None
    return meta


def _up_to_date(meta, split, sources, count):
    """Whether capsem's output described by the sidecar `meta` is the conversion asked for.

    It is when the sidecar describes this split, its record count matches
    ``count`` (unless None), and the source files (when present) match it too.
    """
    try:
        if meta.get("split") != split:
            return False
        if count is not None and int(meta["num_records"]) != count:
            return False
        if all(os.path.isfile(p) for p in sources):
            return _sources_record(sources) == meta["sources"]
        # No source files at all: the output still matches its own record.
        return not any(os.path.isfile(p) for p in sources)
    except (KeyError, TypeError, ValueError, AttributeError, OSError):
        return False


def _encode_pngs(images):
    """Yields the PNG encodings of uint8 images (N, H, W, 1), in order."""
    if images.shape[0] == 0:
        return
    ds = tf.data.Dataset.from_tensor_slices(images)
    ds = ds.map(tf.io.encode_png, num_parallel_calls=tf.data.AUTOTUNE).batch(1000)
    for batch in ds.as_numpy_iterator():
        yield from batch


def _example(png, label, height, width):
    """The article's tf.train.Example for one PNG-encoded image."""
    feature = {
        "image/encoded": tf.train.Feature(bytes_list=tf.train.BytesList(value=[png])),
        "image/format": tf.train.Feature(bytes_list=tf.train.BytesList(value=[b"png"])),
        "image/class/label": tf.train.Feature(int64_list=tf.train.Int64List(value=[int(label)])),
        "image/height": tf.train.Feature(int64_list=tf.train.Int64List(value=[height])),
        "image/width": tf.train.Feature(int64_list=tf.train.Int64List(value=[width])),
    }
    return tf.train.Example(features=tf.train.Features(feature=feature))


def serialize_example(example):
    """The bytes of a tf.train.Example, the same in every process.

    A `Features` message is a protobuf map, whose entries protobuf writes in
    an order that can differ between processes (so two conversions of the
    same IDX files differed in bytes and in their sidecar's sha256);
    deterministic serialisation writes them sorted by key.
    """
    return example.SerializeToString(deterministic=True)


def _write_split(images, labels, tfrecord_path, split, sources_record, log):
    """Writes one split's TFRecord atomically, then its sidecar."""
    directory = os.path.dirname(tfrecord_path) or "."
    name = os.path.basename(tfrecord_path)
    _remove_quietly(_sidecar_path(tfrecord_path))
    fd, tmp = _create_temp(directory, name)
    os.close(fd)
    n = int(images.shape[0])
    height, width = int(images.shape[1]), int(images.shape[2])
    try:
        written = 0
        with tf.io.TFRecordWriter(tmp) as writer:
            for png, label in zip(_encode_pngs(images), labels):
                writer.write(serialize_example(_example(png, label, height, width)))
                written += 1
                if written % _PROGRESS_EVERY == 0 and written < n:
                    log(f"{split}: converted {written}/{n} images")
        if written != n:  # pragma: no cover - defensive
            raise DataError(f"{tfrecord_path}: wrote {written} records, expected {n}")
        log(f"{split}: converted {n}/{n} images")
        size, digest = _file_digest(tmp)
        os.replace(tmp, tfrecord_path)
    except BaseException:
        _remove_quietly(tmp)
        raise
    _write_json_atomically(
        _sidecar_path(tfrecord_path),
        {
            "format": _SIDECAR_FORMAT,
            "split": split,
            "num_records": n,
            "image_shape": [height, width, 1],
            "tfrecord": {"size": size, "sha256": digest},
            "sources": sources_record,
        },
    )


def _normalize_expected_counts(expected_counts):
    """Returns {split: count or None (any count)} from convert_mnist's argument."""
    if expected_counts is None:
        return dict(_MNIST_COUNTS)
    if expected_counts is False:
        return {split: None for split in SPLITS}
    if isinstance(expected_counts, dict):
        unknown = set(expected_counts) - set(SPLITS)
        if unknown:
            raise DataError(
                f"expected_counts has unknown splits {sorted(unknown)}: accepted keys are "
                f"{', '.join(SPLITS)}"
            )
        return {s: _resolve_count(s, expected_counts.get(s)) for s in SPLITS}
    if isinstance(expected_counts, (tuple, list)) and len(expected_counts) == len(SPLITS):
        return {s: _resolve_count(s, c) for s, c in zip(SPLITS, expected_counts)}
    raise DataError(
        f"expected_counts must be None, False, a (train, test) pair or a dict with keys "
        f"train/test, got {expected_counts!r}"
    )


def convert_mnist(source_dir, dataset_dir, *, expected_counts=None, download=False,
                  progress=None, overwrite=False):
    """Converts the MNIST IDX files to the article's TFRecords, never replacing another's file.

    Writes ``mnist_train.tfrecord`` and ``mnist_test.tfrecord`` into dataset_dir,
    one ``tf.train.Example`` per image in IDX order with the features
    ``image/encoded`` (PNG of the 28x28x1 uint8 image), ``image/format`` (b'png'),
    ``image/class/label``, ``image/height`` and ``image/width`` (int64). Each
    file is written to a temporary file in dataset_dir and renamed into place
    when complete, then a JSON sidecar (``<file>.json``) records its record
    count, size and sha256 and the source files' sizes and sha256.

    What happens to each split's file:

    * no file: it is converted;
    * a file capsem wrote (`written_by_capsem`: its sidecar records its size
      and sha256) that is the conversion asked for (same sources and count):
      kept as it is; one converted from other sources or with another count:
      converted again;
    * any other file (no sidecar, or one that does not match it, e.g. a TFRecord
      made by another tool): never modified, moved or deleted. It is read
      whole (`read_image_tfrecord`): a valid TFRecord of the article's format,
      with any number of records, is used as it is (logged as "not written by
      capsem"); a corrupt, truncated or foreign one stops with a DataError
      naming the file and the record where reading failed. With
      ``overwrite=True`` it is replaced by the conversion instead.

    All files are checked and all inputs to be converted are read before
    anything is written.

    Args:
      source_dir: directory holding the four IDX files (``.gz`` or plain).
      dataset_dir: output directory, created if missing.
      expected_counts: None for the standard counts (60000 train, 10000 test);
        a (train, test) pair or a dict {'train': n, 'test': m} of exact counts
        (None in it means standard, False any); or False to accept any count.
      download: fetch missing IDX files into source_dir first (``download_mnist``).
      progress: callable taking one line of text, called with progress and
        status lines; default ``logging.info``.
      overwrite: replace files that capsem did not write (and their sidecars).

    Returns:
      {'train': path, 'test': path} of the TFRecord files.

    Raises:
      DataError: on any problem with the inputs or with a file in dataset_dir
        that capsem did not write (one line naming the file), or when
        dataset_dir cannot be created.
    """
    log = progress or logging.info
    counts = _normalize_expected_counts(expected_counts)
    source_dir = os.fspath(source_dir)
    dataset_dir = os.fspath(dataset_dir)
    if download:
        download_mnist(source_dir, progress=log)
    if os.path.exists(dataset_dir) and not os.path.isdir(dataset_dir):
        raise DataError(f"{dataset_dir}: exists and is not a directory")
    try:
        os.makedirs(dataset_dir, exist_ok=True)
    except OSError as e:
        raise DataError(f"{dataset_dir}: cannot create directory: {_one_line(e)}") from None

    outputs = {}
    todo = []
    for split in SPLITS:
        path = os.path.join(dataset_dir, f"mnist_{split}.tfrecord")
        outputs[split] = path
        sidecar = _sidecar_path(path)
        meta = written_by_capsem(path)
        if meta is None and not overwrite:
            if os.path.lexists(path):  # not capsem's: read as it is, or stop
                read_image_tfrecord(path, (*_MNIST_SIZE, 1), DATASETS["mnist"].num_classes,
                                    log=log)
                continue
            if os.path.lexists(sidecar) and _read_sidecar(path) is None:
                raise DataError(f"{sidecar}: not a sidecar written by capsem, and capsem would "
                                f"write one there: {_LEFT_AS_IT_IS}")
        if meta is not None and _up_to_date(meta, split, _source_paths(source_dir, split),
                                            counts[split]):
            log(f"{split}: valid output already exists: {path} ({meta['num_records']} images)")
            continue
        if meta is not None:
            log(f"{split}: {path} was converted by capsem from other IDX files or with another "
                f"count: converting again")
        elif os.path.lexists(path):
            log(f"{split}: {path} was not written by capsem: replacing it (overwrite)")
        todo.append(split)

    # Read and check every input before writing anything.
    loaded = {}
    for split in todo:
        log(f"{split}: reading IDX files from {source_dir}")
        images, labels = load_mnist_idx(source_dir, split, expected_count=(
            False if counts[split] is None else counts[split]))
        loaded[split] = (images, labels, _sources_record(_source_paths(source_dir, split)))

    for split in todo:
        images, labels, sources = loaded.pop(split)
        _write_split(images, labels, outputs[split], split, sources, log)
        log(f"{split}: wrote {outputs[split]} ({images.shape[0]} images)")
    return outputs


# ---------------------------------------------------------------------- TFRecord

_FEATURES = {
    "image/encoded": tf.io.FixedLenFeature([], tf.string),
    "image/class/label": tf.io.FixedLenFeature([], tf.int64),
}


def _parse_record(serialized):
    """Parses one serialized Example into (uint8 image (H, W, 1), int64 label)."""
    parsed = tf.io.parse_single_example(serialized, _FEATURES)
    image = tf.io.decode_png(parsed["image/encoded"], channels=1)
    return image, parsed["image/class/label"]


# What a user can do about a file in a dataset directory that capsem cannot use.
_LEFT_AS_IT_IS = ("capsem leaves it as it is: remove it, or pass another --dataset_dir "
                  "(download_and_convert_mnist.py --overwrite replaces it)")

# Records per batch of a pass over a whole TFRecord file.
_SCAN_BATCH = 4096

# TFRecord files read whole into memory by read_image_tfrecord, by file identity.
_LOADED = collections.OrderedDict()
_LOADED_MAX = 4


def _failing_record(path, parse, start):
    """(index, error) of the first record from ``start`` on that cannot be read or parsed."""
    index = start
    iterator = iter(tf.data.TFRecordDataset(path).skip(start))
    while True:
        try:
            record = next(iterator)
        except StopIteration:
            return index, None
        except tf.errors.OpError as e:
            return index, ("read", e)
        if parse is not None:
            try:
                parse(record)
            except tf.errors.OpError as e:
                return index, ("parse", e)
        index += 1


def _scan_tfrecord(path, parse=None, hint=""):
    """Reads every record of a TFRecord file (CRC-checked), parsed by ``parse`` when given.

    Returns:
      the list of numpy batches of ``parse``'s outputs (of raw records when
      ``parse`` is None), in file order.

    Raises:
      DataError: naming the file and the index of the first record that cannot
        be read (corrupt or truncated file) or parsed, followed by ``hint``.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise DataError(f"{path}: no such TFRecord file")
    if not os.path.isfile(path):
        raise DataError(f"{path}: is not a file{hint}")
    ds = tf.data.TFRecordDataset(path)
    if parse is not None:
        ds = ds.map(parse, num_parallel_calls=tf.data.AUTOTUNE)
    batches, count = [], 0
    try:
        for batch in ds.batch(_SCAN_BATCH).as_numpy_iterator():
            batches.append(batch)
            count += len(batch[0] if isinstance(batch, tuple) else batch)
    except tf.errors.OpError as e:
        index, failure = _failing_record(path, parse, count)
        kind, error = failure or ("read", e)
        detail = _first_line(error.message)
        if kind == "read":
            raise DataError(f"{path}: corrupt or truncated TFRecord file: record {index} cannot "
                            f"be read ({detail}){hint}") from None
        raise DataError(f"{path}: record {index} is not an image Example of the article's "
                        f"format (features image/encoded PNG, image/class/label) ({detail})"
                        f"{hint}") from None
    return batches


def _parse_and_check(expected):
    """A record parser giving (image, label, decoded shape); a misshapen image comes as zeros."""

    def parse(serialized):
        image, label = _parse_record(serialized)  # (H, W, 1)
        shape = tf.shape(image, out_type=tf.int32)
        if len(expected) == 3:
            same = tf.reduce_all(tf.equal(shape, tf.constant(expected, tf.int32)))
            image = tf.cond(same, lambda: tf.reshape(image, expected),
                            lambda: tf.zeros(expected, tf.uint8))
        else:
            image = tf.zeros(expected, tf.uint8)
        return image, label, shape

    return parse


def _read_images(path, expected_shape, num_classes, hint):
    """(images uint8 (N, *expected_shape), labels int64 (N,)) of a TFRecord file, all checked."""
    expected = tuple(int(d) for d in expected_shape)
    batches = _scan_tfrecord(path, _parse_and_check(expected), hint)
    if not batches:
        return np.zeros((0, *expected), np.uint8), np.zeros((0,), np.int64)
    images = np.concatenate([b[0] for b in batches])
    labels = np.concatenate([b[1] for b in batches]).astype(np.int64)
    shapes = np.concatenate([b[2] for b in batches])
    if len(expected) == shapes.shape[1]:
        bad = np.flatnonzero(np.any(shapes != np.asarray(expected), axis=1))
    else:
        bad = np.arange(len(shapes))
    if bad.size:
        i = int(bad[0])
        raise DataError(f"{path}: record {i} holds an image of shape {_shape_str(shapes[i])}, "
                        f"expected {_shape_str(expected)}{hint}")
    if num_classes is not None:
        bad = np.flatnonzero((labels < 0) | (labels >= num_classes))
        if bad.size:
            i = int(bad[0])
            raise DataError(f"{path}: record {i} has label {int(labels[i])}, expected "
                            f"0..{num_classes - 1}{hint}")
    return images, labels


def validate_tfrecord(path, expected_shape=None):
    """Reads a whole TFRecord file, checking every record's CRC.

    Args:
      path: the TFRecord file.
      expected_shape: if given, every record is also parsed as an image Example
        and its decoded image must have this (height, width, channels) shape.

    Returns:
      The number of records.

    Raises:
      DataError: naming the file if it is missing, corrupt or truncated, if a
        record is not an image Example, or if an image's shape differs from
        expected_shape (naming both shapes), with the index of the record.
    """
    if expected_shape is None:
        return sum(len(batch) for batch in _scan_tfrecord(path))
    return len(_read_images(os.fspath(path), expected_shape, None, "")[1])


def read_image_tfrecord(path, expected_shape, num_classes, log=None):
    """Every image and label of a TFRecord file of the article's image Examples, checked.

    The whole file is read (every record's CRC), every record parsed (features
    ``image/encoded`` PNG, ``image/class/label``) and decoded; every image must
    have ``expected_shape`` and every label be in 0 .. num_classes - 1. The
    arrays are kept in memory for the file's identity (path, device, inode,
    size, modification time): reading the same file again costs nothing, so a
    training pass per epoch does not decode PNGs again. The first read logs
    the path, the record count and whether capsem wrote the file
    (`written_by_capsem`); a file capsem did not write is used as it is.

    Args:
      path: the TFRecord file.
      expected_shape: (height, width, channels) of every image.
      num_classes: labels must be in 0 .. num_classes - 1.
      log: callable taking one line of text; default ``logging.info``.

    Returns:
      (images, labels): read-only uint8 array (N, *expected_shape) and int64
      array (N,).

    Raises:
      DataError: one line naming the file, the record where reading or
        checking failed, and what to do; the file is not touched.
    """
    path = os.fspath(path)
    expected = tuple(int(d) for d in expected_shape)
    try:
        st = os.stat(path)
        key = (os.path.abspath(path), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns,
               expected, num_classes)
    except OSError:
        key = None
    if key is not None and key in _LOADED:
        _LOADED.move_to_end(key)
        return _LOADED[key]
    images, labels = _read_images(path, expected, num_classes, f"; {_LEFT_AS_IT_IS}")
    images.setflags(write=False)
    labels.setflags(write=False)
    origin = ("written by capsem" if written_by_capsem(path) is not None else
              "not written by capsem (no sidecar that matches it): used as it is, never "
              "modified (download_and_convert_mnist.py --overwrite replaces it)")
    (log or logging.info)(f"{path}: {len(labels)} records, {origin}")
    if key is not None:
        _LOADED[key] = (images, labels)
        while len(_LOADED) > _LOADED_MAX:
            _LOADED.popitem(last=False)
    return images, labels


def _mnist_tfrecord_path(dataset_dir, split):
    """Returns the checked path of mnist_{split}.tfrecord in dataset_dir."""
    directory = os.fspath(dataset_dir) if dataset_dir is not None else DEFAULT_MNIST_DIR
    hint = f"run `python download_and_convert_mnist.py --dataset_dir={directory}`"
    if not os.path.isdir(directory):
        raise DataError(f"{directory}: dataset directory does not exist; {hint}")
    if not os.listdir(directory):
        raise DataError(f"{directory}: dataset directory is empty; {hint}")
    path = os.path.join(directory, f"mnist_{split}.tfrecord")
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such file; {hint}")
    return path


def random_shift_image(image, max_shift, seed_pair):
    """Shifts a uint8 image `(H, W, C)` by up to `max_shift` pixels in each direction.

    The image is zero-padded by `max_shift` on every side and a random
    window of its size is cut out (stateless: the same `seed_pair` gives the
    same shift). A common MNIST augmentation (Sabour et al. 2017; `random_shift`
    in `capsem.recipes`; measured in docs/results.md, section 3.8).
    """
    shape = image.shape
    padded = tf.pad(image, [[max_shift, max_shift], [max_shift, max_shift], [0, 0]])
    out = tf.image.stateless_random_crop(padded, tf.shape(image), seed=seed_pair)
    return tf.ensure_shape(out, shape)


def random_affine_image(image, max_rotation, max_scale, seed_pair):
    """Rotates and scales a uint8 image `(H, W, C)` about its centre, at random.

    The angle is drawn uniformly in [-max_rotation, max_rotation] degrees and
    the scale in [1 - max_scale, 1 + max_scale] (stateless: the same
    `seed_pair` gives the same transformation; the draws use a seed folded
    from it, so the shift `random_shift_image` draws from `seed_pair` is the
    one it draws without this transformation). Bilinear interpolation, zeros
    (the background) outside the image, rounded back to uint8. Affine
    distortions of MNIST training images: Simard, Steinkraus & Platt 2003
    ("Best practices for convolutional neural networks applied to visual
    document analysis"); `random_rotation`, `random_scale` in
    `capsem.recipes`, measured in docs/results.md 3.19.
    """
    shape = image.shape
    height, width = float(shape[0]), float(shape[1])
    draws = tf.random.stateless_uniform(
        [2], seed=tf.random.experimental.stateless_fold_in(seed_pair, 7), minval=-1.0,
        maxval=1.0)
    angle = draws[0] * max_rotation * np.pi / 180.0
    scale = 1.0 + draws[1] * max_scale
    # The transform maps an output pixel (x, y) to the input pixel it reads:
    # R(angle) / scale about the centre (cx, cy).
    cos, sin = tf.cos(angle) / scale, tf.sin(angle) / scale
    cx, cy = (width - 1.0) / 2.0, (height - 1.0) / 2.0
    transform = tf.stack([cos, -sin, cx - cos * cx + sin * cy,
                          sin, cos, cy - sin * cx - cos * cy, 0.0, 0.0])[None]  # (1, 8)
    out = tf.raw_ops.ImageProjectiveTransformV3(
        images=tf.cast(image, tf.float32)[None], transforms=transform,
        output_shape=tf.constant([int(height), int(width)]), fill_value=0.0,
        interpolation="BILINEAR", fill_mode="CONSTANT")[0]  # (H, W, C)
    out = tf.cast(tf.clip_by_value(tf.round(out), 0.0, 255.0), tf.uint8)
    return tf.ensure_shape(out, shape)


def _gaussian_kernel(sigma):
    """A normalised 1-D Gaussian of standard deviation `sigma` pixels, cut at 3 sigma."""
    radius = max(1, int(np.ceil(3.0 * sigma)))
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    kernel = np.exp(-0.5 * (x / sigma) ** 2)
    return (kernel / kernel.sum()).astype(np.float32)


def random_elastic_image(image, alpha, sigma, seed_pair):
    """Distorts a uint8 image `(H, W, C)` with a random smooth displacement field.

    The elastic distortions of Simard, Steinkraus & Platt 2003 ("Best practices
    for convolutional neural networks applied to visual document analysis",
    Sec. 2): a displacement drawn uniformly in [-1, 1] for each pixel and axis,
    smoothed by a Gaussian of standard deviation `sigma` pixels (zeros beyond
    the image) and multiplied by `alpha`; each output pixel (x, y) reads the
    input at (x + dx, y + dy), bilinearly, zeros (the background) outside the
    image, rounded back to uint8. Simard's MNIST values: sigma 4, alpha 34.
    Stateless: the same `seed_pair` gives the same field (drawn from a seed
    folded from it, so the rotation, scale and shift drawn from `seed_pair`
    are those drawn without this distortion). `random_elastic`,
    `elastic_sigma` in `capsem.training.TrainConfig`, measured in
    docs/results.md 3.21.
    """
    shape = image.shape
    height, width = int(shape[0]), int(shape[1])
    field = tf.random.stateless_uniform(
        [1, height, width, 2], seed=tf.random.experimental.stateless_fold_in(seed_pair, 11),
        minval=-1.0, maxval=1.0)  # (1, H, W, 2): dy, dx
    kernel = _gaussian_kernel(sigma)  # (k,)
    # Separable smoothing, each axis of the field on its own (depthwise), zero-padded.
    rows = np.repeat(kernel[:, None, None, None], 2, axis=2)  # (k, 1, 2, 1)
    cols = np.repeat(kernel[None, :, None, None], 2, axis=2)  # (1, k, 2, 1)
    field = tf.nn.depthwise_conv2d(field, rows, [1, 1, 1, 1], "SAME")
    field = tf.nn.depthwise_conv2d(field, cols, [1, 1, 1, 1], "SAME")[0] * alpha  # (H, W, 2)
    grid_y, grid_x = tf.meshgrid(tf.range(height, dtype=tf.float32),
                                 tf.range(width, dtype=tf.float32), indexing="ij")  # (H, W)
    # Source coordinates, clipped to the ring of background around the image.
    y = tf.clip_by_value(grid_y + field[..., 0], -1.0, float(height))  # (H, W)
    x = tf.clip_by_value(grid_x + field[..., 1], -1.0, float(width))  # (H, W)
    y0, x0 = tf.floor(y), tf.floor(x)
    wy, wx = (y - y0)[..., None], (x - x0)[..., None]  # (H, W, 1)
    # The image with a ring of zeros: source row r is padded row r + 1.
    padded = tf.pad(tf.cast(image, tf.float32), [[1, 2], [1, 2], [0, 0]])  # (H+3, W+3, C)
    iy0, ix0 = tf.cast(y0, tf.int32) + 1, tf.cast(x0, tf.int32) + 1  # (H, W)

    def read(iy, ix):
        return tf.gather_nd(padded, tf.stack([iy, ix], axis=-1))  # (H, W, C)

    out = ((1 - wy) * ((1 - wx) * read(iy0, ix0) + wx * read(iy0, ix0 + 1))
           + wy * ((1 - wx) * read(iy0 + 1, ix0) + wx * read(iy0 + 1, ix0 + 1)))
    out = tf.cast(tf.clip_by_value(tf.round(out), 0.0, 255.0), tf.uint8)
    return tf.ensure_shape(out, shape)


#: The bounds of the rotation, scaling and elastic distortion settings:
#: name -> (low, high, high included, unit in the error message).
_AUGMENTATION_BOUNDS = {
    "random_rotation": (0, 180, True, " of degrees"),
    "random_scale": (0, 1, False, ""),
    "random_elastic": (0, 100, True, " of pixels"),
    "elastic_sigma": (0.5, 20, True, " of pixels"),
}


def augmentation_problem(**settings):
    """What is wrong with the given `_AUGMENTATION_BOUNDS` settings (`random_affine_image`'s,
    `random_elastic_image`'s), in one line; None if nothing."""
    for name, value in settings.items():
        low, high, closed, unit = _AUGMENTATION_BOUNDS[name]
        if isinstance(value, bool) or not isinstance(value, (int, float)) \
                or not (low <= value <= high if closed else low <= value < high):
            return (f"{name} must be a number{unit} in [{low}, {high}{']' if closed else ')'}, "
                    f"got {value!r}")
    return None


def _augments(augment):
    """Whether `make_dataset`'s augmentation arguments change the training images."""
    return bool(augment["random_shift"] or augment["random_rotation"]
                or augment["random_scale"] or augment["random_elastic"])


def _with_augmentation(ds, augment, seed, decode):
    """`ds` of (uint8 image, label) decoded by `decode` after a random rotation and
    scaling (`random_affine_image`, where either is > 0), an elastic distortion
    (`random_elastic_image`, where `random_elastic` > 0), then shift, per example.
    `augment`: `make_dataset`'s augmentation arguments, by name."""
    base = tf.constant([seed if seed is not None else 0, _AUGMENT_SEED_SALT + 1], tf.int64)

    def augmented(index, example):
        image, label = example
        pair = tf.random.experimental.stateless_fold_in(base, index)
        if augment["random_rotation"] or augment["random_scale"]:
            image = random_affine_image(image, augment["random_rotation"],
                                        augment["random_scale"], pair)
        if augment["random_elastic"]:
            image = random_elastic_image(image, augment["random_elastic"],
                                         augment["elastic_sigma"], pair)
        if augment["random_shift"]:
            image = random_shift_image(image, augment["random_shift"], pair)
        return decode(image, label)

    return ds.enumerate().map(augmented, num_parallel_calls=tf.data.AUTOTUNE)


def epoch_order(n, buffer_size, seed):
    """The order of a training pass over ``n`` examples shuffled with ``seed``.

    The permutation that ``ds.shuffle(buffer_size, seed=seed,
    reshuffle_each_iteration=False)`` applies to any dataset of ``n`` elements
    (it depends only on ``n``, the buffer size, ``seed`` and TensorFlow's
    global seed), i.e. the order in which capsem's TFRecord pipeline has
    always visited the examples.

    Returns:
      an int64 array of the ``n`` indices in the order of the pass.
    """
    if n == 0:
        return np.zeros((0,), np.int64)
    ds = tf.data.Dataset.range(n).shuffle(buffer_size, seed=seed, reshuffle_each_iteration=False)
    return ds.batch(n).get_single_element().numpy()


def _tfrecord_batches(info, split, dataset_dir, training, seed, buffer_size, batch_size,
                      drop_remainder, augment, test_crops=1):
    """The batches of an MNIST TFRecord split, from its images decoded once into memory.

    A training pass visits the examples in `epoch_order` with ``buffer_size``
    (``make_dataset``'s: ``shuffle_buffer``, else the split's nominal size), the
    order of the former ``TFRecordDataset(path).shuffle(buffer_size, seed,
    reshuffle_each_iteration=False)`` pipeline. With ``test_crops`` > 1 each
    example is its `_shifted_copies`.
    """
    if info.name != "mnist":
        raise DataError(
            f"dataset {info.name!r} has no TFRecord converter: use data_source='tfds' "
            f"(data_source='tfrecord' supports only 'mnist')"
        )
    path = _mnist_tfrecord_path(dataset_dir, split)
    images, labels = read_image_tfrecord(path, info.input_shape, info.num_classes)
    if not len(labels):
        raise DataError(
            f"{path}: holds no records; run `python download_and_convert_mnist.py` again"
        )
    labels = labels.astype(np.int32)
    if training:
        order = epoch_order(len(labels), buffer_size, seed)
        images, labels = images[order], labels[order]
    ds = tf.data.Dataset.from_tensor_slices((images, labels))
    if training and _augments(augment):
        ds = _with_augmentation(ds, augment, seed,
                                lambda image, label: (preprocess_image(image), label))
        return ds.batch(batch_size, drop_remainder=drop_remainder)
    if test_crops > 1:
        offsets = shifted_copy_offsets(test_crops)
        ds = ds.map(lambda image, label: (_shifted_copies(image, offsets), label),
                    num_parallel_calls=tf.data.AUTOTUNE)
        return ds.batch(batch_size, drop_remainder=drop_remainder)
    # Preprocessing is elementwise: per batch gives the same numbers as per image.
    ds = ds.batch(batch_size, drop_remainder=drop_remainder)
    return ds.map(lambda image, label: (preprocess_image(image), label),
                  num_parallel_calls=tf.data.AUTOTUNE)


# -------------------------------------------------------------------------- tfds


def _smallnorb_resized(image):
    """A uint8 (96, 96, 1) smallNORB image resized to 48 x 48, float32 in [0, 1]."""
    x = tf.image.resize(tf.cast(image, tf.float32),
                        [_SMALLNORB_RESIZED, _SMALLNORB_RESIZED],
                        method=tf.image.ResizeMethod.BILINEAR, antialias=True)
    return x / 255.0


def _smallnorb_image(image, training, seed_pair):
    """The paper's smallNORB preprocessing of one uint8 (96, 96, 1) image."""
    x = _smallnorb_resized(image)
    if training:
        seeds = tf.random.experimental.stateless_split(seed_pair, num=3)
        x = tf.image.stateless_random_crop(x, [_SMALLNORB_CROP, _SMALLNORB_CROP, 1], seed=seeds[0])
        x = tf.image.stateless_random_brightness(x, _SMALLNORB_BRIGHTNESS, seed=seeds[1])
        x = tf.image.stateless_random_contrast(x, *_SMALLNORB_CONTRAST, seed=seeds[2])
    else:
        offset = (_SMALLNORB_RESIZED - _SMALLNORB_CROP) // 2
        x = x[offset:offset + _SMALLNORB_CROP, offset:offset + _SMALLNORB_CROP, :]
    x = tf.image.per_image_standardization(x)
    return tf.ensure_shape(x, (_SMALLNORB_CROP, _SMALLNORB_CROP, 1))


def smallnorb_crop_offsets(num_crops):
    """The (row, column) offsets of the test crops in the 48 x 48 resized smallNORB image.

    The paper (Sec. 5: "If we average class activations over multiple crops at
    test time we achieve 1.4%") does not say which crops; capsem takes a fixed
    3 x 3 grid of offsets {0, 8, 16}^2 of the 32 x 32 crops, in this order: the
    centre (8, 8) (the single-crop evaluation), the four corners (0, 0),
    (0, 16), (16, 0), (16, 16), then the four edge midpoints (0, 8), (8, 0),
    (8, 16), (16, 8); `num_crops` takes the first ones.

    Args:
      num_crops: an int in [1, MAX_TEST_CROPS].

    Returns:
      a tuple of `num_crops` (row, column) pairs.

    Raises:
      DataError: num_crops outside [1, MAX_TEST_CROPS].
    """
    return _crop_grid(_SMALLNORB_RESIZED - _SMALLNORB_CROP, num_crops)


def shifted_copy_offsets(num_crops):
    """The (row, column) offsets of an MNIST-like image's test crops in the padded image.

    The MNIST counterpart of the paper's multi-crop test (Sec. 5;
    `smallnorb_crop_offsets`): the image is padded by `TEST_SHIFT` background
    pixels on every side and cut back to its size at the offsets {0, 1, 2}^2,
    i.e. copies shifted by up to one pixel, in the order of the smallNORB grid:
    the unshifted image (1, 1) first, then the four diagonal shifts, then the
    four shifts along one axis. Measured (docs/results.md 3.19): 9 copies lift the
    test accuracy of ten checkpoints of the paper recipe (whose training shifts the
    images by up to 2 pixels; both networks) by 0.08-0.16 points.

    Arguments, result and errors as `smallnorb_crop_offsets`'s.
    """
    return _crop_grid(2 * TEST_SHIFT, num_crops)


def test_crop_offsets(name, num_crops):
    """The offsets of dataset `name`'s test crops: `smallnorb_crop_offsets` or `shifted_copy_offsets`."""
    if name == "smallnorb":
        return smallnorb_crop_offsets(num_crops)
    return shifted_copy_offsets(num_crops)


def _crop_grid(high, num_crops):
    """The first `num_crops` offsets of the grid {0, high / 2, high}^2: centre, corners, edges."""
    if isinstance(num_crops, bool) or not isinstance(num_crops, (int, np.integer)) \
            or not 1 <= num_crops <= MAX_TEST_CROPS:
        raise DataError(f"test_crops must be an int in [1, {MAX_TEST_CROPS}], got {num_crops!r}")
    low, mid = 0, high // 2
    grid = ((mid, mid), (low, low), (low, high), (high, low), (high, high),
            (low, mid), (mid, low), (mid, high), (high, mid))
    return grid[:int(num_crops)]


def _smallnorb_crops(image, offsets):
    """The standardised 32 x 32 test crops of one smallNORB image at `offsets`: (N, 32, 32, 1)."""
    x = _smallnorb_resized(image)
    crops = [tf.image.per_image_standardization(
        x[row:row + _SMALLNORB_CROP, col:col + _SMALLNORB_CROP, :]) for row, col in offsets]
    return tf.ensure_shape(tf.stack(crops), (len(offsets), _SMALLNORB_CROP, _SMALLNORB_CROP, 1))


def _shifted_copies(image, offsets):
    """The preprocessed test crops of one uint8 MNIST-like image `(H, W, C)`: `(N, H, W, C)`.

    The image is padded with zeros (the background, -1 after `preprocess_image`)
    by `TEST_SHIFT` on every side and cut back to `(H, W)` at `offsets`.
    """
    height, width, channels = image.shape
    padded = tf.pad(image, [[TEST_SHIFT, TEST_SHIFT], [TEST_SHIFT, TEST_SHIFT], [0, 0]])
    crops = [padded[row:row + height, col:col + width, :] for row, col in offsets]
    # (N, H, W, C)
    return tf.ensure_shape(preprocess_image(tf.stack(crops)),
                           (len(offsets), height, width, channels))


def raw_image_shape(name):
    """The (height, width, channels) of a dataset's stored uint8 images, before preprocessing.

    MNIST-like datasets: their input shape; smallNORB: (96, 96, 1), which the
    test preprocessing resizes and crops to the network's 32 x 32.
    """
    info = get_info(name)
    return (96, 96, 1) if info.name == "smallnorb" else tuple(info.input_shape)


def preprocess_for_eval(name, images_uint8):
    """A batch of stored uint8 images `(N, *raw_image_shape(name))` as the test pipeline feeds
    them to the network: `preprocess_image` for MNIST-like datasets, smallNORB's centre crop
    and standardisation (`make_dataset(..., training=False)`).

    Returns:
      float32 `(N, *get_info(name).input_shape)`.
    """
    info = get_info(name)
    if info.name == "smallnorb":
        return tf.map_fn(lambda image: _smallnorb_image(image, False, None), images_uint8,
                         fn_output_signature=tf.float32)
    return preprocess_image(images_uint8)


def _tfds_load(info, split, dataset_dir, download=False, decoders=None):
    """tensorflow-datasets' prepared split, or a DataError saying how to prepare it.

    With `download`, tfds downloads and prepares missing data in dataset_dir
    (tfds' default data directory when None) first.
    """
    import tensorflow_datasets as tfds  # slow to import: only when asked for

    where = os.fspath(dataset_dir) if dataset_dir is not None else os.environ.get(
        "TFDS_DATA_DIR", os.path.join("~", "tensorflow_datasets"))
    not_found = (AssertionError, FileNotFoundError, tf.errors.NotFoundError,
                 tfds.core.DatasetNotFoundError)
    try:
        return tfds.load(info.name, split=split, data_dir=dataset_dir, download=bool(download),
                         decoders=decoders)
    except not_found as e:
        raise DataError(
            f"{where}: no prepared tensorflow-datasets data for {info.name!r}; pass --download "
            f"(download=True) to let tfds download and prepare it there, or prepare it where "
            f"there is network access with `tfds build {info.name} --data_dir=DIR`, copy DIR "
            f"here and pass it as the dataset directory ({_first_line(e)})"
        ) from None


def _check_choice(name, value, accepted):
    if value not in accepted:
        raise DataError(f"{name} must be one of {', '.join(accepted)}, got {value!r}")


def _default_viewpoints(split, smallnorb_split):
    if smallnorb_split == "standard":
        return "all"
    return "familiar" if split == "train" else "novel"


def _check_viewpoints(info, smallnorb_split, viewpoints):
    _check_choice("smallnorb_split", smallnorb_split, SMALLNORB_SPLITS)
    if smallnorb_split != "standard" and info.name != "smallnorb":
        raise DataError(f"smallnorb_split={smallnorb_split!r} applies to smallnorb only, not "
                        f"{info.name!r}; use smallnorb_split='standard'")
    if viewpoints is None:
        return
    _check_choice("viewpoints", viewpoints, VIEWPOINTS)
    if smallnorb_split == "standard" and viewpoints != "all":
        raise DataError(f"viewpoints={viewpoints!r} needs smallnorb_split='azimuth' or "
                        f"'elevation' (the standard split has no novel viewpoints); use "
                        f"viewpoints='all' or None")


def smallnorb_viewpoint_filter(smallnorb_split, viewpoints):
    """A predicate on tfds smallnorb examples selecting a novel-viewpoint subset.

    Implements the paper's Sec. 5.1 ("Generalization to novel viewpoints",
    see `SMALLNORB_SPLITS`): for 'azimuth' the familiar viewpoints are the
    azimuths 300, 320, 340, 0, 20 and 40 degrees (tfds `label_azimuth` 15, 16,
    17, 0, 1, 2), the novel ones 60 to 280 degrees; for 'elevation' the
    familiar viewpoints are the 3 smallest elevations, 30, 35 and 40 degrees
    (`label_elevation` 0, 1, 2), the novel ones the 6 larger, 45 to 70 degrees.

    Args:
      smallnorb_split: one of `SMALLNORB_SPLITS`.
      viewpoints: one of `VIEWPOINTS`.

    Returns:
      a function `example dict -> scalar bool tensor` for `tf.data.Dataset.filter`,
      or None when every example is kept ('standard' or 'all').

    Raises:
      DataError: an unknown value, or 'familiar'/'novel' with 'standard'.
    """
    _check_viewpoints(get_info("smallnorb"), smallnorb_split, viewpoints)
    if smallnorb_split == "standard" or viewpoints == "all":
        return None
    key, familiar = _FAMILIAR_VIEWPOINTS[smallnorb_split]
    familiar = tf.constant(familiar, tf.int64)
    want_familiar = viewpoints == "familiar"

    def keep(example):
        is_familiar = tf.reduce_any(tf.equal(tf.cast(example[key], tf.int64), familiar))
        return is_familiar if want_familiar else tf.logical_not(is_familiar)

    return keep


def _label_only_decoders(info):
    """tfds decoders that leave smallNORB's images encoded (counting needs only labels)."""
    if info.name != "smallnorb":
        return None
    import tensorflow_datasets as tfds

    return {"image": tfds.decode.SkipDecoding(), "image2": tfds.decode.SkipDecoding()}


def tfds_split_sizes(name, dataset_dir=None, *, smallnorb_split="standard", viewpoints=None,
                     download=False):
    """The numbers of examples of the prepared tfds splits of a dataset.

    What the prepared data hold, which can differ from `DatasetInfo`'s
    constants (another version of the dataset, a subset). For a novel-viewpoint
    `smallnorb_split` the examples of the selected viewpoints are counted (by
    reading the labels only, leaving the images encoded), so that epochs end
    where `make_dataset` with the same arguments ends them.

    Args:
      name: 'mnist', 'fashion_mnist' or 'smallnorb'.
      dataset_dir: tfds' data_dir (None: tfds' default).
      smallnorb_split: one of `SMALLNORB_SPLITS`.
      viewpoints: the viewpoints counted in the test split (one of `VIEWPOINTS`);
        None: 'novel' ('all' for 'standard'). The train split always counts the
        familiar viewpoints, which training uses.
      download: let tfds download and prepare missing data.

    Returns:
      a dict {split: number of examples} for `SPLITS`.

    Raises:
      DataError: the data are not prepared, a bad argument, or a split (subset)
        holds no example.
    """
    info = get_info(name)
    _check_viewpoints(info, smallnorb_split, viewpoints)
    sizes = {}
    for split in SPLITS:
        chosen = _default_viewpoints(split, smallnorb_split) if split == "train" or \
            viewpoints is None else viewpoints
        keep = smallnorb_viewpoint_filter(smallnorb_split, chosen) \
            if info.name == "smallnorb" else None
        ds = _tfds_load(info, split, dataset_dir, download,
                        _label_only_decoders(info) if keep is not None else None)
        if keep is not None:
            ds = ds.filter(keep)
        count = int(ds.cardinality())
        if count < 0:  # unknown (or filtered): count them
            count = int(ds.reduce(np.int64(0), lambda n, _: n + 1))
        if count == 0:
            subset = f" ({smallnorb_split} split, {chosen} viewpoints)" if keep is not None \
                else ""
            raise DataError(f"the prepared tensorflow-datasets split {name}/{split}{subset} "
                            f"holds no examples")
        sizes[split] = count
    return sizes


def _tfds_examples(info, split, dataset_dir, training, seed, buffer_size, augment,
                   smallnorb_split="standard", viewpoints=None, test_crops=1, download=False):
    ds = _tfds_load(info, split, dataset_dir, download)
    if info.name == "smallnorb":
        keep = smallnorb_viewpoint_filter(
            smallnorb_split, viewpoints or _default_viewpoints(split, smallnorb_split))
        if keep is not None:
            ds = ds.filter(keep)
    label_key = "label_category" if info.name == "smallnorb" else "label"
    ds = ds.map(lambda ex: (ex["image"], ex[label_key]))
    if training:
        ds = ds.shuffle(buffer_size, seed=seed, reshuffle_each_iteration=False)

    if info.name == "smallnorb":
        if training:
            base = tf.constant([seed, _AUGMENT_SEED_SALT], dtype=tf.int64)

            def augment(index, example):
                image, label = example
                pair = tf.random.experimental.stateless_fold_in(base, index)
                return _smallnorb_image(image, True, pair), tf.cast(label, tf.int32)

            return ds.enumerate().map(augment, num_parallel_calls=tf.data.AUTOTUNE)

        if test_crops > 1:
            offsets = smallnorb_crop_offsets(test_crops)

            def crops(image, label):
                return _smallnorb_crops(image, offsets), tf.cast(label, tf.int32)

            return ds.map(crops, num_parallel_calls=tf.data.AUTOTUNE)

        def centre(image, label):
            return _smallnorb_image(image, False, None), tf.cast(label, tf.int32)

        return ds.map(centre, num_parallel_calls=tf.data.AUTOTUNE)

    def decode(image, label):
        image = tf.ensure_shape(image, info.input_shape)
        return preprocess_image(image), tf.cast(label, tf.int32)

    if training and _augments(augment):
        return _with_augmentation(ds, augment, seed, decode)
    if test_crops > 1:
        offsets = shifted_copy_offsets(test_crops)

        def shifted_copies(image, label):
            image = tf.ensure_shape(image, info.input_shape)
            return _shifted_copies(image, offsets), tf.cast(label, tf.int32)

        return ds.map(shifted_copies, num_parallel_calls=tf.data.AUTOTUNE)
    return ds.map(decode, num_parallel_calls=tf.data.AUTOTUNE)


# ------------------------------------------------------------------ make_dataset


def _check_positive_int(name, value, allow_none=False):
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
        raise DataError(f"{name} must be a positive int, got {value!r}")


def make_dataset(name, split, *, dataset_dir=None, data_source="tfrecord", batch_size=24,
                 training=False, seed=None, shuffle_buffer=None, drop_remainder=False,
                 random_shift=0, smallnorb_split="standard", viewpoints=None, test_crops=1,
                 download=False, random_rotation=0.0, random_scale=0.0, random_elastic=0.0,
                 elastic_sigma=4.0):
    """Builds the batched input pipeline of a dataset split.

    'tfrecord' (MNIST only) reads ``dataset_dir/mnist_{split}.tfrecord`` (written
    by ``convert_mnist`` or by another tool in the article's format), decoded
    whole into memory once per process (``read_image_tfrecord``), so building
    the pipeline of another epoch costs no decoding; 'tfds' reads
    tensorflow-datasets' prepared data from ``dataset_dir`` (tfds' default data
    directory when None), downloading only with ``download=True``.
    MNIST and Fashion-MNIST images get the article's ``preprocess_image``;
    smallNORB images are resized to 48x48, then randomly cropped to 32x32 with
    random brightness and contrast (training) or centre-cropped (test), and
    standardised per image.

    When training, the whole split (or ``shuffle_buffer`` examples) is shuffled
    with ``seed`` and ``reshuffle_each_iteration=False`` (for TFRecords: in
    ``epoch_order``, the same order), so a given seed always yields the same
    order (pass a different seed per epoch; resume with ``.skip(k)``). All ops
    are deterministic.

    Args:
      name: 'mnist', 'fashion_mnist' or 'smallnorb'.
      split: 'train' or 'test'.
      dataset_dir: directory of the TFRecords or of tfds' data; for 'tfrecord'
        None means ``DEFAULT_MNIST_DIR``.
      data_source: 'tfrecord' or 'tfds'.
      batch_size: examples per batch.
      training: shuffle (and, for smallNORB, augment) the data.
      seed: shuffle (and augmentation) seed; None draws a random one.
      shuffle_buffer: shuffle buffer size; None means the split's size.
      drop_remainder: drop a last batch smaller than batch_size.
      random_shift: when training on MNIST or Fashion-MNIST, shift every
        image by up to this many pixels in each direction
        (`random_shift_image`, one stateless shift per example derived from
        ``seed``); 0: no shift. smallNORB has its own augmentation.
      random_rotation, random_scale: when training on MNIST or Fashion-MNIST,
        rotate every image by up to this many degrees and scale it by a factor
        in [1 - random_scale, 1 + random_scale] (`random_affine_image`, before
        the shift); 0: none.
      random_elastic, elastic_sigma: when training on MNIST or Fashion-MNIST,
        distort every image elastically: a random displacement field smoothed
        by a Gaussian of ``elastic_sigma`` pixels and scaled by
        ``random_elastic`` (`random_elastic_image`, after the rotation and
        before the shift; Simard et al. 2003: 34 and 4); 0: none.
      smallnorb_split: smallNORB only: 'standard' (the dataset's train/test
        split), or the paper's novel-viewpoint experiments (Sec. 5.1,
        `smallnorb_viewpoint_filter`): 'azimuth' (familiar: azimuths 300 to 40
        degrees) or 'elevation' (familiar: the 3 smallest elevations).
      viewpoints: which examples of the split to keep with a novel-viewpoint
        smallnorb_split: 'familiar', 'novel' or 'all'; None: 'familiar' for the
        train split (what the paper trains on), 'novel' for the test split
        (what it reports). With 'standard' only None or 'all'.
      test_crops: test pipelines only: with N > 1 every example is N crops,
        images float32 (B, N, H, W, C), whose class activations the evaluation
        averages (the paper's multi-crop test, Sec. 5): for smallNORB the 32x32
        crops of `smallnorb_crop_offsets(N)` (the centre first), for MNIST-like
        datasets copies shifted by up to `TEST_SHIFT` pixels
        (`shifted_copy_offsets(N)`, the image itself first). 1: the centre crop
        (smallNORB), the image (MNIST).
      download: let tensorflow-datasets download and prepare missing data in
        ``dataset_dir`` ('tfds' only; needs network access).

    Returns:
      A ``tf.data.Dataset`` of (images float32 (B, H, W, C), labels int32 (B,))
      ((B, N, H, W, C) images with ``test_crops=N > 1``).

    Raises:
      DataError: for an unknown name, split or data source, a bad argument, or
        missing, empty, corrupt or wrongly shaped data (naming the path).
    """
    info = get_info(name)
    if data_source not in DATA_SOURCES:
        raise DataError(
            f"unknown data source {data_source!r}: accepted sources are {', '.join(DATA_SOURCES)}"
        )
    _check_split(split)
    _check_positive_int("batch_size", batch_size)
    _check_positive_int("shuffle_buffer", shuffle_buffer, allow_none=True)
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, (int, np.integer))):
        raise DataError(f"seed must be None or an int, got {seed!r}")
    if seed is None and training and info.name == "smallnorb":
        seed = random.SystemRandom().randrange(2**31)
    if seed is not None:
        seed = int(seed)
    buffer_size = shuffle_buffer or (info.num_train if split == "train" else info.num_test)
    if isinstance(random_shift, bool) or not isinstance(random_shift, (int, np.integer)) \
            or random_shift < 0 or (random_shift and 2 * random_shift >= min(
                info.input_shape[:2])):
        raise DataError(f"random_shift must be an int in [0, {min(info.input_shape[:2]) // 2})"
                        f" for {info.name}, got {random_shift!r}")
    problem = augmentation_problem(random_rotation=random_rotation, random_scale=random_scale,
                                   random_elastic=random_elastic, elastic_sigma=elastic_sigma)
    if problem:
        raise DataError(problem)
    augment = {"random_shift": random_shift, "random_rotation": random_rotation,
               "random_scale": random_scale, "random_elastic": random_elastic,
               "elastic_sigma": elastic_sigma}
    for key in ("random_shift", "random_rotation", "random_scale", "random_elastic"):
        value = augment[key]
        if value and info.name == "smallnorb":
            raise DataError(f"{key} applies to MNIST-like datasets; smallnorb is augmented "
                            f"with random crops already")
    _check_viewpoints(info, smallnorb_split, viewpoints)
    test_crop_offsets(info.name, test_crops)  # checks it
    if test_crops != 1 and training:
        raise DataError(f"test_crops={test_crops!r} applies to test pipelines "
                        f"(training=False) only; use test_crops=1")
    if download and data_source != "tfds":
        raise DataError(f"download=True applies to data_source='tfds', not {data_source!r} "
                        f"(MNIST TFRecords: download_and_convert_mnist.py)")

    if data_source == "tfrecord":
        if info.name == "smallnorb":
            raise DataError(
                "smallnorb is not available as TFRecords: use data_source='tfds' "
                "(tensorflow-datasets' 'smallnorb')"
            )
        ds = _tfrecord_batches(info, split, dataset_dir, training, seed, buffer_size,
                               batch_size, drop_remainder, augment, test_crops)
    else:
        ds = _tfds_examples(info, split, dataset_dir, training, seed, buffer_size,
                            augment, smallnorb_split, viewpoints, test_crops, download)
        ds = ds.batch(batch_size, drop_remainder=drop_remainder)
    # tf.data's autotuning off: with it, ending an epoch's iterator while the training step
    # holds the cores waited 6-8 s in half of the epochs (docs/data_pipeline.md); the data
    # and their order are the same either way.
    options = tf.data.Options()
    options.autotune.enabled = False
    return ds.prefetch(2).with_options(options)
