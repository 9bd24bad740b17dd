"""Dataset flags of train.py (the article's mnist_config.py).

Importing this module defines the flags; `train.py` reads them.
"""

import os

from absl import flags

HERE = os.path.dirname(os.path.abspath(__file__))
#: The MNIST IDX files shipped with the repository (see data/mnist/README.md).
BUNDLED_MNIST = os.path.join(HERE, "data", "mnist")
DATASET_NAMES = ("mnist", "fashion_mnist", "smallnorb")

flags.DEFINE_enum(
    "dataset", "mnist", DATASET_NAMES,
    "Dataset to train on: 'mnist' (the article's; bundled with the repository), or the "
    "tensorflow-datasets names 'fashion_mnist' and 'smallnorb' (these need their tfds data "
    "prepared in --dataset_dir, or --download).")
flags.DEFINE_enum(
    "data_source", "auto", ("auto", "tfrecord", "tfds"),
    "Where the data comes from: 'tfrecord' reads the article's MNIST TFRecords "
    "(mnist_train.tfrecord / mnist_test.tfrecord in --dataset_dir, made from --source_dir on "
    "first use), 'tfds' reads tensorflow-datasets' prepared data (tfds.load(download=False)); "
    "'auto' is tfrecord for mnist and tfds otherwise.")
flags.DEFINE_string(
    "dataset_dir", None,
    "Directory of the data. For tfrecord: where the TFRecords are (default: dataset/mnist, "
    "created on first use); capsem (re)writes only files it wrote itself (a .json sidecar "
    "that matches them) and uses any other valid TFRecord of the article's format as it is, "
    "never modifying it (a corrupt one is an error). For tfds: tensorflow-datasets' data_dir (default: tfds' own, "
    "~/tensorflow_datasets).")
flags.DEFINE_string(
    "source_dir", BUNDLED_MNIST,
    "Directory of the four MNIST IDX .gz files the TFRecords are converted from on first "
    "use (default: the copy bundled with the repository, so no network is needed).")

flags.DEFINE_enum(
    "smallnorb_split", "standard", ("standard", "azimuth", "elevation"),
    "smallNORB only. 'standard': the dataset's train/test split. 'azimuth' and 'elevation': "
    "the paper's novel-viewpoint experiments (Sec. 5.1, 'Generalization to novel "
    "viewpoints'): train on the training examples of the familiar viewpoints (azimuths 300, "
    "320, 340, 0, 20, 40 degrees; or the 3 smallest elevations, 30-40 degrees) and evaluate "
    "on the test examples of --eval_viewpoints (default: the novel ones, azimuths 60-280 or "
    "elevations 45-70 degrees).")
flags.DEFINE_enum(
    "eval_viewpoints", "novel", ("novel", "familiar", "all"),
    "With --smallnorb_split=azimuth|elevation: the test examples evaluated (after every "
    "epoch and by --mode=eval): 'novel' (the paper's reported numbers), 'familiar' (the "
    "training viewpoints, on which the paper matches the capsules and the CNN) or 'all'. "
    "Ignored with --smallnorb_split=standard.")
flags.DEFINE_bool(
    "download", False,
    "With --data_source=tfds: let tensorflow-datasets download and prepare missing data in "
    "--dataset_dir (needs network access; smallnorb is about 250 MB to download). Off: the "
    "data must be prepared already (`tfds build NAME --data_dir=DIR`).")


def resolve_data_flags(values):
    """Returns (data_source, dataset_dir) with 'auto' and the defaults resolved."""
    source = values.data_source
    if source == "auto":
        source = "tfrecord" if values.dataset == "mnist" else "tfds"
    dataset_dir = values.dataset_dir
    if dataset_dir is None and source == "tfrecord":
        dataset_dir = os.path.join("dataset", "mnist")
    return source, dataset_dir


@flags.multi_flags_validator(
    ["dataset", "data_source"],
    message="--data_source=tfrecord only exists for --dataset=mnist; use --data_source=tfds")
def _check_tfrecord_is_mnist(values):
    return not (values["data_source"] == "tfrecord" and values["dataset"] != "mnist")


@flags.multi_flags_validator(
    ["dataset", "smallnorb_split"],
    message="--smallnorb_split=azimuth|elevation needs --dataset=smallnorb")
def _check_smallnorb_split(values):
    return values["smallnorb_split"] == "standard" or values["dataset"] == "smallnorb"
