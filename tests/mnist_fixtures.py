"""Tiny MNIST-like IDX files for tests (no network, no bundled data needed)."""

import gzip
import os
import struct

import numpy as np

IDX_NAMES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


def idx_bytes(array, magic=None):
    """The IDX encoding of a uint8 array (magic 2051 for images, 2049 for labels)."""
    array = np.asarray(array, dtype=np.uint8)
    if magic is None:
        magic = 2051 if array.ndim == 3 else 2049
    header = struct.pack(">i", magic) + b"".join(struct.pack(">i", d) for d in array.shape)
    return header + array.tobytes()


def write_idx(path, array, magic=None, compress=True, data=None):
    """Writes an IDX file (gzipped unless compress=False; `data` overrides the bytes)."""
    raw = idx_bytes(array, magic) if data is None else data
    with open(path, "wb") as f:
        f.write(gzip.compress(raw, mtime=0) if compress else raw)
    return path


def make_tiny_mnist(directory, n_train=12, n_test=10, seed=0, size=28):
    """Writes the four IDX .gz files of a tiny MNIST-like dataset.

    Images are uint8 with pixel (0, 0, 0) = 0 and (0, 0, 1) = 255 in the first
    image (so the value range is exercised), labels cycle through 0..9 shuffled.

    Returns:
      {split: (images (N, size, size) uint8, labels (N,) uint8)}.
    """
    rng = np.random.default_rng(seed)
    os.makedirs(directory, exist_ok=True)
    arrays = {}
    for split, n in (("train", n_train), ("test", n_test)):
        images = rng.integers(0, 256, size=(n, size, size), dtype=np.uint8)
        images[0, 0, 0], images[0, 0, 1] = 0, 255
        labels = (np.arange(n) % 10).astype(np.uint8)
        rng.shuffle(labels)
        img_name, lbl_name = IDX_NAMES[split]
        write_idx(os.path.join(directory, img_name), images)
        write_idx(os.path.join(directory, lbl_name), labels)
        arrays[split] = (images, labels)
    return arrays


def make_tiny_tfrecords(tmp_path, n_train=12, n_test=10, seed=0):
    """Tiny IDX files converted to the article's TFRecords; returns (source_dir, dataset_dir)."""
    from capsem import datasets

    source = os.path.join(str(tmp_path), "idx")
    dataset_dir = os.path.join(str(tmp_path), "tfrecords")
    make_tiny_mnist(source, n_train, n_test, seed)
    datasets.convert_mnist(source, dataset_dir, expected_counts=(n_train, n_test))
    return source, dataset_dir


def write_image_tfrecord(path, images, labels):
    """Writes image Examples in the article's format as another tool would: no sidecar.

    Features image/encoded (PNG), image/format and image/class/label, serialised
    without capsem's deterministic ordering.

    Returns:
      the byte offset where each record ends (`tfrecord_record_ends`).
    """
    import tensorflow as tf

    ends, offset = [], 0
    with tf.io.TFRecordWriter(str(path)) as writer:
        for image, label in zip(images, labels):
            png = tf.io.encode_png(image).numpy()
            example = tf.train.Example(features=tf.train.Features(feature={
                "image/encoded": tf.train.Feature(bytes_list=tf.train.BytesList(value=[png])),
                "image/format": tf.train.Feature(bytes_list=tf.train.BytesList(value=[b"png"])),
                "image/class/label": tf.train.Feature(
                    int64_list=tf.train.Int64List(value=[int(label)])),
            }))
            data = example.SerializeToString()
            writer.write(data)
            offset += 8 + 4 + len(data) + 4
            ends.append(offset)
    return ends


def tfrecord_record_ends(data):
    """The byte offset where each record of a TFRecord file's bytes ends.

    A record is an 8-byte little-endian length, a 4-byte CRC of it, the data
    and a 4-byte CRC of the data. A last record cut short ends at len(data).
    """
    ends, offset = [], 0
    while offset < len(data):
        (length,) = struct.unpack("<Q", data[offset:offset + 8])
        offset = min(offset + 8 + 4 + length + 4, len(data))
        ends.append(offset)
    return ends


def flip_tfrecord_byte(path):
    """Flips a byte in the middle of a TFRecord file; returns the index of its record."""
    with open(path, "rb") as f:
        data = bytearray(f.read())
    ends = tfrecord_record_ends(bytes(data))
    position = len(data) // 2
    data[position] ^= 0xFF
    with open(path, "wb") as f:
        f.write(bytes(data))
    return int(np.searchsorted(ends, position, side="right"))


def truncate_tfrecord(path):
    """Cuts the last 100 bytes of a TFRecord file; returns the index of the cut record."""
    with open(path, "rb") as f:
        data = f.read()
    cut = len(data) - 100
    with open(path, "wb") as f:
        f.write(data[:cut])
    return int(np.searchsorted(tfrecord_record_ends(data), cut, side="right"))


def snapshot(directory):
    """{name: bytes} of every file in a directory (not recursive)."""
    contents = {}
    for name in sorted(os.listdir(directory)):
        with open(os.path.join(directory, name), "rb") as f:
            contents[name] = f.read()
    return contents
