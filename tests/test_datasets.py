"""Tests of capsem.datasets' input pipelines (TFRecord and tensorflow-datasets)."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pathlib  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

from capsem import datasets  # noqa: E402
from capsem.errors import DataError  # noqa: E402
from mnist_fixtures import (flip_tfrecord_byte, snapshot, truncate_tfrecord,  # noqa: E402
                            write_idx, write_image_tfrecord)

N_TRAIN, N_TEST = 50, 20


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Converted tiny MNIST-like data: (dataset_dir, {split: (images, labels)})."""
    root = tmp_path_factory.mktemp("tiny")
    rng = np.random.default_rng(42)
    content = {}
    for split, n, prefix in (("train", N_TRAIN, "train"), ("test", N_TEST, "t10k")):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        images[0, 0, 0], images[0, 0, 1] = 0, 255
        labels = rng.integers(0, 10, size=n).astype(np.uint8)
        (root / "src").mkdir(exist_ok=True)
        write_idx(root / "src" / f"{prefix}-images-idx3-ubyte.gz", images)
        write_idx(root / "src" / f"{prefix}-labels-idx1-ubyte.gz", labels)
        content[split] = (images, labels)
    out = root / "out"
    datasets.convert_mnist(root / "src", out, expected_counts={"train": N_TRAIN, "test": N_TEST})
    return str(out), content


def _collect(ds):
    images, labels = [], []
    for x, y in ds:
        images.append(x.numpy())
        labels.append(y.numpy())
    return np.concatenate(images), np.concatenate(labels)


def test_info():
    assert datasets.get_info("mnist") == datasets.DatasetInfo("mnist", (28, 28, 1), 10, 60000, 10000)
    assert datasets.get_info("fashion_mnist").input_shape == (28, 28, 1)
    info = datasets.get_info("smallnorb")
    assert (info.input_shape, info.num_classes, info.num_train, info.num_test) == (
        (32, 32, 1), 5, 24300, 24300)
    with pytest.raises(DataError, match="accepted names are fashion_mnist, mnist, smallnorb"):
        datasets.get_info("cifar10")


def test_preprocess_image():
    x = np.array([0, 1, 127, 128, 255], dtype=np.uint8)
    y = datasets.preprocess_image(x)
    assert y.dtype == tf.float32
    np.testing.assert_array_equal(y.numpy(), (x.astype(np.float32) - 128) / 128)
    assert y.numpy()[0] == -1.0 and y.numpy()[-1] == 0.9921875


def test_tfrecord_test_split(tiny):
    dataset_dir, content = tiny
    ds = datasets.make_dataset("mnist", "test", dataset_dir=dataset_dir, batch_size=8)
    batches = list(ds)
    assert [int(b[0].shape[0]) for b in batches] == [8, 8, 4]
    for x, y in batches:
        assert x.dtype == tf.float32 and x.shape[1:] == (28, 28, 1)
        assert y.dtype == tf.int32 and y.shape.rank == 1
    images, labels = _collect(ds)
    expected_images, expected_labels = content["test"]
    np.testing.assert_array_equal(labels, expected_labels)
    np.testing.assert_array_equal(images[..., 0], (expected_images.astype(np.float32) - 128) / 128)
    assert images.min() == -1.0 and images.max() == 0.9921875

    ds = datasets.make_dataset("mnist", "test", dataset_dir=dataset_dir, batch_size=8,
                               drop_remainder=True)
    assert [int(b[1].shape[0]) for b in ds] == [8, 8]
    assert ds.element_spec[0].shape == (8, 28, 28, 1)


def _shifted(image, dy, dx):
    """A uint8 image moved by (dy, dx) pixels, the uncovered border zero."""
    out = np.zeros_like(image)
    height, width = image.shape
    out[max(dy, 0):height + min(dy, 0), max(dx, 0):width + min(dx, 0)] = \
        image[max(-dy, 0):height + min(-dy, 0), max(-dx, 0):width + min(-dx, 0)]
    return out


def test_tfrecord_test_crops_are_shifted_copies(tiny):
    dataset_dir, content = tiny
    plain, labels = _collect(datasets.make_dataset("mnist", "test", dataset_dir=dataset_dir,
                                                   batch_size=8))
    crops, crop_labels = _collect(datasets.make_dataset("mnist", "test", dataset_dir=dataset_dir,
                                                        batch_size=8, test_crops=9))
    assert crops.shape == (N_TEST, 9, 28, 28, 1) and crops.dtype == np.float32
    np.testing.assert_array_equal(crop_labels, labels)
    np.testing.assert_array_equal(crops[:, 0], plain)  # the first copy: the image itself
    # The offsets in the image padded by one pixel: (1, 1) is the image, (0, 0) moves it one
    # pixel down and right, (2, 1) one pixel up.
    offsets = datasets.shifted_copy_offsets(9)
    assert offsets[:5] == ((1, 1), (0, 0), (0, 2), (2, 0), (2, 2))
    assert set(offsets) == {(r, c) for r in range(3) for c in range(3)}
    images = content["test"][0]
    for k, (row, col) in enumerate(offsets):
        expected = np.stack([_shifted(im, 1 - row, 1 - col) for im in images])
        np.testing.assert_array_equal(crops[:, k, ..., 0],
                                      (expected.astype(np.float32) - 128) / 128)
    assert crops[:, 1, 0].min() == crops[:, 1, 0].max() == -1.0  # padded: the background
    assert datasets.test_crop_offsets("mnist", 3) == offsets[:3]
    assert datasets.test_crop_offsets("smallnorb", 3) == datasets.smallnorb_crop_offsets(3)
    with pytest.raises(DataError, match="applies to test pipelines"):
        datasets.make_dataset("mnist", "train", dataset_dir=dataset_dir, training=True, seed=1,
                              test_crops=3)
    with pytest.raises(DataError, match=r"test_crops must be an int in \[1, 9\], got 10"):
        datasets.make_dataset("mnist", "test", dataset_dir=dataset_dir, test_crops=10)


def test_tfrecord_training_order(tiny):
    dataset_dir, content = tiny

    def make(seed):
        return datasets.make_dataset("mnist", "train", dataset_dir=dataset_dir, batch_size=7,
                                     training=True, seed=seed)

    images1, labels1 = _collect(make(1))
    images1b, labels1b = _collect(make(1))
    images2, labels2 = _collect(make(2))
    np.testing.assert_array_equal(images1, images1b)
    np.testing.assert_array_equal(labels1, labels1b)
    assert not np.array_equal(images1, images2)
    # Every image appears exactly once, with its label.
    expected = (content["train"][0].astype(np.float32) - 128) / 128
    order = [int(np.flatnonzero((expected == img[..., 0]).all(axis=(1, 2)))[0]) for img in images1]
    assert sorted(order) == list(range(N_TRAIN))
    np.testing.assert_array_equal(labels1, content["train"][1][order])
    # Iterating the same dataset again gives the same order (no reshuffling).
    ds = make(3)
    first, second = _collect(ds), _collect(ds)
    np.testing.assert_array_equal(first[0], second[0])
    # Resuming with skip(k) continues exactly where the full pass was.
    batches = list(make(1))
    resumed = list(make(1).skip(3))
    assert len(resumed) == len(batches) - 3
    for (xa, ya), (xb, yb) in zip(batches[3:], resumed):
        np.testing.assert_array_equal(xa.numpy(), xb.numpy())
        np.testing.assert_array_equal(ya.numpy(), yb.numpy())
    # A small shuffle buffer is honoured.
    _, labels = _collect(datasets.make_dataset("mnist", "train", dataset_dir=dataset_dir,
                                               training=True, seed=1, shuffle_buffer=1))
    np.testing.assert_array_equal(labels, content["train"][1])


def _decoded_train(path):
    """The images of a TFRecord file in file order, decoded with TensorFlow's ops."""
    return np.stack([datasets._parse_record(r)[0].numpy() for r in tf.data.TFRecordDataset(path)])


def test_epochs_come_from_memory_in_the_tfrecord_pipelines_order(tiny, monkeypatch):
    """A training pass per epoch reads and decodes nothing (the split is decoded once), and
    visits the examples in the order of the former TFRecord pipeline,
    `TFRecordDataset.shuffle(buffer, seed, reshuffle_each_iteration=False)`: reproducible,
    different for each epoch's seed, and a resume with skip(k) continues it."""
    dataset_dir, _ = tiny
    path = os.path.join(dataset_dir, "mnist_train.tfrecord")
    tf.random.set_seed(7)  # training sets the global seed too; the order depends on it

    def make(seed):
        return datasets.make_dataset("mnist", "train", dataset_dir=dataset_dir, batch_size=6,
                                     training=True, seed=seed)

    make(0)  # reads and decodes the file once
    monkeypatch.setattr(datasets, "_scan_tfrecord",
                        lambda *args, **kwargs: pytest.fail("the TFRecord file was read again"))
    passes = []
    for epoch in range(3):
        seed = 100 + epoch
        images, labels = _collect(make(seed))
        reference = tf.data.TFRecordDataset(path).shuffle(
            60000, seed=seed, reshuffle_each_iteration=False).map(datasets._parse_record)
        ref_images, ref_labels = zip(*[(x.numpy(), y.numpy()) for x, y in reference])
        np.testing.assert_array_equal(images, datasets.preprocess_image(np.stack(ref_images)))
        np.testing.assert_array_equal(labels, ref_labels)
        np.testing.assert_array_equal(_collect(make(seed))[0], images)  # reproducible
        resumed, _ = _collect(make(seed).skip(3))  # mid-epoch resume: batch 3 onwards
        np.testing.assert_array_equal(resumed, images[3 * 6:])
        passes.append(labels)
    assert not np.array_equal(passes[0], passes[1]) and not np.array_equal(passes[1], passes[2])

    # A small shuffle buffer (a partial shuffle) with random shifts: the old expression too.
    images, labels = _collect(datasets.make_dataset(
        "mnist", "train", dataset_dir=dataset_dir, batch_size=6, training=True, seed=5,
        shuffle_buffer=7, random_shift=2))
    parsed = tf.data.TFRecordDataset(path).shuffle(
        7, seed=5, reshuffle_each_iteration=False).map(datasets._parse_record)
    augment = {"random_shift": 2, "random_rotation": 0.0, "random_scale": 0.0,
               "random_elastic": 0.0, "elastic_sigma": 4.0}
    reference = datasets._with_augmentation(parsed, augment, 5, lambda image, label: (
        datasets.preprocess_image(image), tf.cast(label, tf.int32)))
    ref_images, ref_labels = zip(*[(x.numpy(), y.numpy()) for x, y in reference])
    np.testing.assert_array_equal(images, np.stack(ref_images))
    np.testing.assert_array_equal(labels, ref_labels)
    order = datasets.epoch_order(N_TRAIN, 7, 5)
    assert sorted(order) == list(range(N_TRAIN)) and order[0] < 7  # a buffer of 7
    unshifted = datasets.preprocess_image(_decoded_train(path)[order]).numpy()
    assert not np.array_equal(images, unshifted)  # shifted


def _write_foreign_mnist(directory, n_train=13, n_test=10):
    """TFRecords of the article's format as another tool writes them (no sidecars)."""
    rng = np.random.default_rng(11)
    os.makedirs(directory, exist_ok=True)
    for split, n in (("train", n_train), ("test", n_test)):
        images = rng.integers(0, 256, size=(n, 28, 28, 1), dtype=np.uint8)
        write_image_tfrecord(os.path.join(directory, f"mnist_{split}.tfrecord"), images,
                             np.arange(n) % 10)


def test_train_py_uses_a_foreign_tfrecord_as_it_is_and_stops_on_a_damaged_one(tmp_path):
    """train.py with its default --source_dir (the bundled IDX files) on a --dataset_dir of
    TFRecords it did not write: valid ones are trained on, byte-identical afterwards, and
    the log says so; a corrupt or truncated one stops the run before training with one
    line naming the file and the record, exit 1, and nothing in the directory changes."""
    from test_training import TINY, run_train

    foreign = tmp_path / "foreign"
    _write_foreign_mnist(foreign)
    before = snapshot(foreign)
    out = run_train(TINY + [f"--dataset_dir={foreign}", f"--log_dir={tmp_path / 'log'}",
                            "--max_steps=2"])
    assert out.returncode == 0, out.stderr[-3000:]
    assert snapshot(foreign) == before  # byte-identical, nothing added
    for split, n in (("train", 13), ("test", 10)):
        assert (f"{foreign / f'mnist_{split}.tfrecord'}: {n} records, not written by capsem"
                in out.stderr), out.stderr[-3000:]
    assert "4 steps per epoch" in out.stderr  # 13 examples in batches of 4
    assert "10 examples in" in out.stderr  # the test set evaluated: the foreign file's 10
    assert "train: wrote" not in out.stderr and "test: wrote" not in out.stderr

    for damage in (flip_tfrecord_byte, truncate_tfrecord):
        damaged = tmp_path / damage.__name__
        _write_foreign_mnist(damaged)
        record = damage(damaged / "mnist_train.tfrecord")
        assert 0 < record < 13
        before = snapshot(damaged)
        log_dir = tmp_path / f"log_{damage.__name__}"
        out = run_train(TINY + [f"--dataset_dir={damaged}", f"--log_dir={log_dir}",
                                "--max_steps=2"])
        assert out.returncode == 1, out.stderr[-3000:]
        errors = [line for line in out.stderr.splitlines() if line.startswith("error: ")]
        assert len(errors) == 1, out.stderr[-3000:]
        prefix = (f"error: {damaged / 'mnist_train.tfrecord'}: corrupt or truncated TFRecord "
                  f"file: record {record} cannot be read (")
        assert errors[0].startswith(prefix), errors[0]
        assert errors[0].endswith("capsem leaves it as it is: remove it, or pass another "
                                  "--dataset_dir (download_and_convert_mnist.py --overwrite "
                                  "replaces it)"), errors[0]
        assert "Traceback" not in out.stderr
        assert snapshot(damaged) == before
        assert not log_dir.exists()  # stopped before training


def test_missing_dataset_dir(tmp_path):
    with pytest.raises(DataError) as info:
        datasets.make_dataset("mnist", "train", dataset_dir=str(tmp_path / "nowhere"))
    assert str(tmp_path / "nowhere") in str(info.value)
    assert "does not exist" in str(info.value)
    assert "download_and_convert_mnist.py" in str(info.value)
    with pytest.raises(DataError, match="is empty.*download_and_convert_mnist.py"):
        datasets.make_dataset("mnist", "train", dataset_dir=str(tmp_path))
    (tmp_path / "mnist_test.tfrecord").write_bytes(b"")
    with pytest.raises(DataError) as info:
        datasets.make_dataset("mnist", "train", dataset_dir=str(tmp_path))
    assert str(tmp_path / "mnist_train.tfrecord") in str(info.value)
    with pytest.raises(DataError, match="mnist_test.tfrecord: holds no records"):
        datasets.make_dataset("mnist", "test", dataset_dir=str(tmp_path))


def test_bad_arguments(tiny):
    dataset_dir, _ = tiny
    with pytest.raises(DataError, match="accepted splits are train, test"):
        datasets.make_dataset("mnist", "validation", dataset_dir=dataset_dir)
    with pytest.raises(DataError, match="accepted sources are tfrecord, tfds"):
        datasets.make_dataset("mnist", "train", dataset_dir=dataset_dir, data_source="idx")
    with pytest.raises(DataError, match="accepted names are"):
        datasets.make_dataset("cifar10", "train", dataset_dir=dataset_dir)
    with pytest.raises(DataError, match="data_source='tfds'"):
        datasets.make_dataset("smallnorb", "train", dataset_dir=dataset_dir)
    with pytest.raises(DataError, match="data_source='tfds'"):
        datasets.make_dataset("fashion_mnist", "train", dataset_dir=dataset_dir)
    with pytest.raises(DataError, match="batch_size"):
        datasets.make_dataset("mnist", "train", dataset_dir=dataset_dir, batch_size=0)


def test_validate_tfrecord_detects_corruption(tiny, tmp_path):
    dataset_dir, _ = tiny
    source = pathlib.Path(dataset_dir) / "mnist_train.tfrecord"
    assert datasets.validate_tfrecord(source) == N_TRAIN
    assert datasets.validate_tfrecord(source, expected_shape=(28, 28, 1)) == N_TRAIN
    data = source.read_bytes()

    flipped = tmp_path / "flipped.tfrecord"
    middle = bytearray(data)
    for i in range(len(data) // 2, len(data) // 2 + 4):
        middle[i] ^= 0xFF
    flipped.write_bytes(bytes(middle))
    with pytest.raises(DataError) as info:
        datasets.validate_tfrecord(flipped)
    assert "flipped.tfrecord" in str(info.value) and "corrupt" in str(info.value)
    assert "\n" not in str(info.value)

    truncated = tmp_path / "truncated.tfrecord"
    truncated.write_bytes(data[: len(data) - 100])
    with pytest.raises(DataError, match="truncated.tfrecord: corrupt or truncated TFRecord file: "
                                        f"record {N_TRAIN - 1} cannot be read"):
        datasets.validate_tfrecord(truncated, expected_shape=(28, 28, 1))

    with pytest.raises(DataError, match="absent.tfrecord: no such TFRecord file"):
        datasets.validate_tfrecord(tmp_path / "absent.tfrecord")


def test_wrong_image_size(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(5, 32, 32, 1), dtype=np.uint8)
    write_image_tfrecord(tmp_path / "mnist_train.tfrecord", images, range(5))
    with pytest.raises(DataError) as info:
        datasets.make_dataset("mnist", "train", dataset_dir=str(tmp_path))
    message = str(info.value)
    assert "mnist_train.tfrecord" in message
    assert "(32, 32, 1)" in message and "(28, 28, 1)" in message
    with pytest.raises(DataError) as info:
        datasets.validate_tfrecord(tmp_path / "mnist_train.tfrecord", expected_shape=(28, 28, 1))
    assert "(32, 32, 1)" in str(info.value) and "(28, 28, 1)" in str(info.value)
    assert "record 0" in str(info.value)

    # A wrong size after good records is found before any batch, naming file and record.
    good = rng.integers(0, 256, size=(3, 28, 28, 1), dtype=np.uint8)
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    write_image_tfrecord(mixed / "mnist_test.tfrecord", list(good) + [images[0]], range(4))
    with pytest.raises(DataError, match=r"record 3 holds an image of shape \(32, 32, 1\)"):
        datasets.validate_tfrecord(mixed / "mnist_test.tfrecord", expected_shape=(28, 28, 1))
    with pytest.raises(DataError, match=r"mnist_test.tfrecord: record 3 holds an image of shape "
                                        r"\(32, 32, 1\), expected \(28, 28, 1\); capsem leaves it"):
        datasets.make_dataset("mnist", "test", dataset_dir=str(mixed), batch_size=2)
    # So is a label out of range.
    labelled = tmp_path / "labelled"
    labelled.mkdir()
    write_image_tfrecord(labelled / "mnist_test.tfrecord", good, [1, 10, 2])
    with pytest.raises(DataError, match=r"mnist_test.tfrecord: record 1 has label 10, "
                                        r"expected 0..9"):
        datasets.make_dataset("mnist", "test", dataset_dir=str(labelled))


# ---------------------------------------------------------------- tfds (mocked)


@pytest.fixture(scope="module")
def tfds():
    import tensorflow_datasets

    return tensorflow_datasets


def _mock(tfds, n):
    return tfds.testing.mock_data(num_examples=n, policy=tfds.testing.MockPolicy.USE_CODE)


@pytest.mark.parametrize("name", ["mnist", "fashion_mnist"])
def test_tfds_mnist_like(tfds, name):
    with _mock(tfds, 10):
        for split, training in (("train", True), ("test", False)):
            ds = datasets.make_dataset(name, split, data_source="tfds", batch_size=4,
                                       training=training, seed=5)
            images, labels = _collect(ds)
            assert images.shape == (10, 28, 28, 1) and images.dtype == np.float32
            assert labels.dtype == np.int32
            assert labels.min() >= 0 and labels.max() <= 9
            assert images.min() >= -1.0 and images.max() <= 0.9921875
        raw = next(iter(tfds.load(name, split="test", download=False)))
        np.testing.assert_array_equal(
            images[0], (raw["image"].numpy().astype(np.float32) - 128) / 128)
        assert labels[0] == raw["label"].numpy()
        crops, crop_labels = _collect(datasets.make_dataset(name, "test", data_source="tfds",
                                                            batch_size=4, test_crops=2))
        assert crops.shape == (10, 2, 28, 28, 1)
        np.testing.assert_array_equal(crop_labels, labels)
        np.testing.assert_array_equal(crops[:, 0], images)
        shifted = _shifted(raw["image"].numpy()[..., 0], 1, 1)  # offset (0, 0)
        np.testing.assert_array_equal(crops[0, 1, ..., 0], (shifted.astype(np.float32) - 128) / 128)


def test_tfds_smallnorb(tfds):
    with _mock(tfds, 6):
        def train(seed):
            return _collect(datasets.make_dataset(
                "smallnorb", "train", data_source="tfds", batch_size=4, training=True,
                seed=seed, shuffle_buffer=1))

        images1, labels1 = train(1)
        images1b, _ = train(1)
        images2, labels2 = train(2)
        assert images1.shape == (6, 32, 32, 1) and images1.dtype == np.float32
        assert labels1.dtype == np.int32 and labels1.min() >= 0 and labels1.max() <= 4
        np.testing.assert_array_equal(labels1, labels2)  # same examples (shuffle_buffer=1)
        np.testing.assert_array_equal(images1, images1b)  # same seed, same augmentation
        assert not np.allclose(images1, images2)  # other seed, other crops
        np.testing.assert_allclose(images1.mean(axis=(1, 2, 3)), 0.0, atol=1e-4)
        np.testing.assert_allclose(images1.std(axis=(1, 2, 3)), 1.0, atol=1e-3)

        images, labels = _collect(datasets.make_dataset("smallnorb", "test", data_source="tfds",
                                                        batch_size=4))
        assert images.shape == (6, 32, 32, 1) and labels.dtype == np.int32
        raws = list(tfds.load("smallnorb", split="test", download=False))
        np.testing.assert_array_equal(labels, [r["label_category"].numpy() for r in raws])
        # The test image is the centre 32x32 crop of the 48x48 resized image, standardised.
        resized = tf.image.resize(tf.cast(raws[0]["image"], tf.float32), [48, 48],
                                  method="bilinear", antialias=True).numpy()
        crop = resized[8:40, 8:40, :].astype(np.float64)
        expected = (crop - crop.mean()) / max(crop.std(), 1.0 / np.sqrt(crop.size))
        np.testing.assert_allclose(images[0], expected, atol=1e-4)
        again, _ = _collect(datasets.make_dataset("smallnorb", "test", data_source="tfds",
                                                  batch_size=4))
        np.testing.assert_array_equal(images, again)


def test_tfds_missing_data(tfds, tmp_path):
    with pytest.raises(DataError) as info:
        datasets.make_dataset("mnist", "train", data_source="tfds", dataset_dir=str(tmp_path))
    message = str(info.value)
    assert str(tmp_path) in message and "tfds build mnist" in message
    assert "\n" not in message
