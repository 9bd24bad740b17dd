"""Converts MNIST's IDX files to the TFRecords that train.py reads.

Writes mnist_train.tfrecord and mnist_test.tfrecord (one tf.train.Example per
image: PNG-encoded 28x28x1 image, label, height, width, format) into
--dataset_dir, from the IDX .gz files in --source_dir (by default the copy
bundled in data/mnist/). Nothing is rewritten when valid output already exists.

A file in --dataset_dir that this script did not write (no .json sidecar that
matches it, e.g. a TFRecord made by another tool) is never modified: a valid
one in the article's format is kept and used as it is, a corrupt or truncated
one is an error (exit 1) naming the file and the record where reading failed.
--overwrite replaces such files with the conversion.

Usage:
  python download_and_convert_mnist.py                       # bundled copy -> dataset/mnist
  python download_and_convert_mnist.py --dataset_dir=/data/mnist
  python download_and_convert_mnist.py --source_dir=/tmp/idx --download
  python download_and_convert_mnist.py --source_dir=tiny --expected_counts=50,20
  python download_and_convert_mnist.py --dataset_dir=DIR --overwrite   # replace DIR's files

Exits with code 1 and a one-line 'error: ...' message on bad input.
"""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app  # noqa: E402
from absl import flags  # noqa: E402

from capsem import datasets  # noqa: E402
from capsem.errors import DataError  # noqa: E402

_BUNDLED_SOURCE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "mnist")

FLAGS = flags.FLAGS

flags.DEFINE_string(
    "dataset_dir", datasets.DEFAULT_MNIST_DIR,
    "Directory to write mnist_train.tfrecord, mnist_test.tfrecord and their .json "
    "sidecars into; created if missing. Default: dataset/mnist relative to the current "
    "directory (the default dataset directory of capsem.datasets.make_dataset).")
flags.DEFINE_string(
    "source_dir", _BUNDLED_SOURCE_DIR,
    "Directory holding the four MNIST IDX files (train-images-idx3-ubyte.gz, "
    "train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz; "
    "gzipped or not). Default: the copy bundled with this repository in data/mnist.")
flags.DEFINE_bool(
    "download", False,
    "First fetch the IDX .gz files missing from --source_dir from the standard MNIST "
    "mirrors (needs network access); files already there are kept.")
flags.DEFINE_bool(
    "overwrite", False,
    "Replace mnist_train.tfrecord / mnist_test.tfrecord (and their .json sidecars) in "
    "--dataset_dir even when this script did not write them (no sidecar that matches them, "
    "e.g. TFRecords made by another tool, or corrupt files). Without it such files are never "
    "modified: a valid one is used as it is, a corrupt one is an error. Output this script "
    "wrote from the same IDX files is kept either way (a conversion gives the same bytes).")
flags.DEFINE_string(
    "expected_counts", "",
    "Number of images expected in the IDX files as 'TRAIN,TEST' (e.g. '50,20' for small "
    "generated test files), or 'any' to accept any counts. Default (empty): the "
    "standard 60000,10000.")


def parse_expected_counts(text):
    """Parses the --expected_counts flag.

    Args:
      text: '' (standard counts), 'any', or 'TRAIN,TEST' with positive ints.

    Returns:
      None, False, or a (train, test) tuple of ints, as convert_mnist accepts.

    Raises:
      DataError: if the text is none of these.
    """
    text = text.strip()
    if not text:
        return None
    if text.lower() == "any":
        return False
    parts = [p.strip() for p in text.split(",")]
    try:
        counts = tuple(int(p) for p in parts)
    except ValueError:
        counts = ()
    if len(counts) != 2 or min(counts) <= 0:
        raise DataError(
            f"--expected_counts={text!r}: expected 'TRAIN,TEST' with two positive ints "
            f"(e.g. '60000,10000'), 'any', or empty for the standard counts")
    return counts


def main(argv):
    if len(argv) > 1:
        print(f"error: unexpected arguments: {' '.join(argv[1:])}", file=sys.stderr)
        return 1
    try:
        outputs = datasets.convert_mnist(
            FLAGS.source_dir, FLAGS.dataset_dir,
            expected_counts=parse_expected_counts(FLAGS.expected_counts),
            download=FLAGS.download, overwrite=FLAGS.overwrite,
            progress=lambda line: print(line, flush=True))
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    for split in datasets.SPLITS:
        print(f"{split}: {outputs[split]}")
    return 0


if __name__ == "__main__":
    app.run(main)
