"""smallNORB experiments: novel-viewpoint splits, multi-crop evaluation, --download.

Uses `tfds.testing.mock_data` with a fake smallNORB that holds one example for
each of the 18 azimuths x 9 elevations, so no real data (and no network) is
needed.
"""

import numpy as np
import pytest
import tensorflow as tf

from capsem import datasets, training
from capsem.errors import ConfigError, DataError

AZIMUTHS = 18  # tfds label_azimuth: degrees / 20
ELEVATIONS = 9  # tfds label_elevation: (degrees - 30) / 5


@pytest.fixture(scope="module")
def tfds():
    import tensorflow_datasets

    return tensorflow_datasets


def _fake_examples(split):
    """One example per (azimuth, elevation) pair, in a fixed order; images differ."""
    rng = np.random.RandomState(0 if split == "train" else 1)
    for index in range(AZIMUTHS * ELEVATIONS):
        azimuth, elevation = index % AZIMUTHS, index // AZIMUTHS
        yield {
            "image": rng.randint(0, 256, size=(96, 96, 1)).astype(np.uint8),
            "image2": np.zeros((96, 96, 1), np.uint8),
            "label_category": np.int64(index % 5),
            "instance": np.int64(index % 10),
            "label_elevation": np.int64(elevation),
            "label_azimuth": np.int64(azimuth),
            "label_lighting": np.int64(index % 6),
        }


def _as_dataset(self, split, decoders=None, **kwargs):
    del decoders, kwargs  # the fake images are decoded already; counting reads labels only
    features = self.info.features
    signature = {k: tf.TensorSpec(features[k].shape, features[k].dtype)
                 for k in ("image", "image2", "label_category", "instance", "label_elevation",
                           "label_azimuth", "label_lighting")}
    return tf.data.Dataset.from_generator(lambda: _fake_examples(str(split)),
                                          output_signature=signature)


@pytest.fixture
def fake_norb(tfds):
    with tfds.testing.mock_data(as_dataset_fn=_as_dataset):
        yield tfds


def _degrees(example):
    return 20 * int(example["label_azimuth"]), 30 + 5 * int(example["label_elevation"])


def _viewpoints_of(tfds, split, smallnorb_split, viewpoints):
    ds = tfds.load("smallnorb", split=split, download=False)
    keep = datasets.smallnorb_viewpoint_filter(smallnorb_split, viewpoints)
    if keep is not None:
        ds = ds.filter(keep)
    return [_degrees(ex) for ex in ds]


ALL_AZIMUTHS = set(range(0, 360, 20))
ALL_ELEVATIONS = set(range(30, 75, 5))
# The paper, Sec. 5.1: train on azimuths (300, 320, 340, 0, 20, 40), test on 60 to 280;
# train on the 3 smaller elevations, test on the 6 larger.
FAMILIAR_AZIMUTHS = {300, 320, 340, 0, 20, 40}
FAMILIAR_ELEVATIONS = {30, 35, 40}


@pytest.mark.parametrize("smallnorb_split,viewpoints,azimuths,elevations", [
    ("azimuth", "familiar", FAMILIAR_AZIMUTHS, ALL_ELEVATIONS),
    ("azimuth", "novel", set(range(60, 281, 20)), ALL_ELEVATIONS),
    ("azimuth", "all", ALL_AZIMUTHS, ALL_ELEVATIONS),
    ("elevation", "familiar", ALL_AZIMUTHS, FAMILIAR_ELEVATIONS),
    ("elevation", "novel", ALL_AZIMUTHS, set(range(45, 71, 5))),
    ("standard", "all", ALL_AZIMUTHS, ALL_ELEVATIONS),
])
def test_viewpoint_filter(fake_norb, smallnorb_split, viewpoints, azimuths, elevations):
    for split in datasets.SPLITS:
        kept = _viewpoints_of(fake_norb, split, smallnorb_split, viewpoints)
        assert set(kept) == {(a, e) for a in azimuths for e in elevations}
        assert len(kept) == len(azimuths) * len(elevations)  # each pair once


def _collect(ds):
    images, labels = zip(*[(x.numpy(), y.numpy()) for x, y in ds])
    return np.concatenate(images), np.concatenate(labels)


def _kept_labels(tfds, split, smallnorb_split, viewpoints):
    ds = tfds.load("smallnorb", split=split, download=False)
    keep = datasets.smallnorb_viewpoint_filter(smallnorb_split, viewpoints)
    return [int(ex["label_category"]) for ex in (ds.filter(keep) if keep else ds)]


@pytest.mark.parametrize("smallnorb_split", ["azimuth", "elevation"])
def test_make_dataset_trains_on_familiar_and_tests_on_novel(fake_norb, smallnorb_split):
    sizes = datasets.tfds_split_sizes("smallnorb", smallnorb_split=smallnorb_split)
    assert sizes == {"train": 54, "test": 108}  # 1/3 and 2/3 of the 162 viewpoints
    assert datasets.tfds_split_sizes("smallnorb", smallnorb_split=smallnorb_split,
                                     viewpoints="familiar") == {"train": 54, "test": 54}
    assert datasets.tfds_split_sizes("smallnorb", smallnorb_split=smallnorb_split,
                                     viewpoints="all") == {"train": 54, "test": 162}

    train = datasets.make_dataset("smallnorb", "train", data_source="tfds", batch_size=16,
                                  training=True, seed=3, smallnorb_split=smallnorb_split)
    images, labels = _collect(train)
    assert images.shape == (54, 32, 32, 1)
    assert sorted(labels) == sorted(_kept_labels(fake_norb, "train", smallnorb_split,
                                                 "familiar"))
    for viewpoints, count in ((None, 108), ("novel", 108), ("familiar", 54), ("all", 162)):
        test = datasets.make_dataset("smallnorb", "test", data_source="tfds", batch_size=50,
                                     smallnorb_split=smallnorb_split, viewpoints=viewpoints)
        images, labels = _collect(test)
        assert images.shape == (count, 32, 32, 1)
        np.testing.assert_array_equal(labels, _kept_labels(
            fake_norb, "test", smallnorb_split, viewpoints or "novel"))


def test_standard_split_unchanged(fake_norb):
    assert datasets.tfds_split_sizes("smallnorb") == {"train": 162, "test": 162}
    for split, training in (("train", True), ("test", False)):
        old, old_labels = _collect(datasets.make_dataset(
            "smallnorb", split, data_source="tfds", batch_size=64, training=training, seed=1))
        new, new_labels = _collect(datasets.make_dataset(
            "smallnorb", split, data_source="tfds", batch_size=64, training=training, seed=1,
            smallnorb_split="standard", viewpoints="all", test_crops=1))
        assert old.shape == (162, 32, 32, 1)
        np.testing.assert_array_equal(old, new)
        np.testing.assert_array_equal(old_labels, new_labels)


def test_bad_viewpoint_arguments(fake_norb):
    with pytest.raises(DataError, match="smallnorb_split must be one of standard, azimuth, "
                                        "elevation, got 'lighting'"):
        datasets.make_dataset("smallnorb", "test", data_source="tfds",
                              smallnorb_split="lighting")
    with pytest.raises(DataError, match="viewpoints must be one of familiar, novel, all"):
        datasets.make_dataset("smallnorb", "test", data_source="tfds",
                              smallnorb_split="azimuth", viewpoints="new")
    with pytest.raises(DataError, match="viewpoints='novel' needs smallnorb_split"):
        datasets.make_dataset("smallnorb", "test", data_source="tfds", viewpoints="novel")
    with pytest.raises(DataError, match="applies to smallnorb only"):
        datasets.make_dataset("mnist", "test", data_source="tfds", smallnorb_split="azimuth")


# ------------------------------------------------------------------ test crops


def test_crop_offsets():
    assert datasets.smallnorb_crop_offsets(1) == ((8, 8),)
    grid = datasets.smallnorb_crop_offsets(datasets.MAX_TEST_CROPS)
    assert set(grid) == {(r, c) for r in (0, 8, 16) for c in (0, 8, 16)}
    assert grid[:5] == ((8, 8), (0, 0), (0, 16), (16, 0), (16, 16))
    for bad in (0, 10, 2.0, True):
        with pytest.raises(DataError, match=r"test_crops must be an int in \[1, 9\]"):
            datasets.smallnorb_crop_offsets(bad)


def test_test_crops_pipeline(fake_norb):
    centre, labels = _collect(datasets.make_dataset("smallnorb", "test", data_source="tfds",
                                                    batch_size=40))
    crops, crop_labels = _collect(datasets.make_dataset("smallnorb", "test", data_source="tfds",
                                                        batch_size=40, test_crops=5))
    assert crops.shape == (162, 5, 32, 32, 1) and crops.dtype == np.float32
    np.testing.assert_array_equal(crop_labels, labels)
    np.testing.assert_allclose(crops[:, 0], centre, atol=1e-6)  # the first crop: the centre
    raw = next(iter(fake_norb.load("smallnorb", split="test", download=False)))["image"]
    resized = tf.image.resize(tf.cast(raw, tf.float32), [48, 48], method="bilinear",
                              antialias=True) / 255.0
    for k, (row, col) in enumerate(datasets.smallnorb_crop_offsets(5)):
        expected = tf.image.per_image_standardization(resized[row:row + 32, col:col + 32])
        np.testing.assert_allclose(crops[0, k], expected.numpy(), atol=1e-5)
    with pytest.raises(DataError, match="test pipeline"):
        datasets.make_dataset("smallnorb", "train", data_source="tfds", training=True, seed=1,
                              test_crops=3)


def _fake_eval_fn(images):
    """A fake model: 3 'class activations' that are functions of the image."""
    x = tf.reshape(images, [tf.shape(images)[0], -1])
    activations = tf.stack([x[:, 0], x[:, 1], tf.reduce_mean(x, axis=1)], axis=1)
    return None, activations


def test_crop_averaged_activations():
    images = tf.random.stateless_normal([4, 3, 2, 2, 1], seed=[1, 2])
    averaged = training.crop_averaged_activations(_fake_eval_fn, images)
    assert averaged.shape == (4, 3)
    per_crop = np.stack([_fake_eval_fn(images[:, k])[1].numpy() for k in range(3)], axis=1)
    np.testing.assert_allclose(averaged.numpy(), per_crop.mean(axis=1), rtol=1e-6)
    plain = training.crop_averaged_activations(_fake_eval_fn, images[:, 0])
    np.testing.assert_allclose(plain.numpy(), per_crop[:, 0], rtol=1e-6)


def test_run_evaluation_uses_the_crop_average():
    # Example 0: the centre crop says class 0, the 3-crop average says class 1.
    # Example 1: both say class 1.
    images = np.zeros((2, 3, 2, 2, 1), np.float32)
    images[0, 0, 0, 0] = 1.0   # centre: activations (1, 0, .25) -> 0
    images[0, 1, 0, 1] = 3.0   # (0, 3, .75)
    images[0, 2, 0, 1] = 3.0   # mean over crops: (1/3, 2, ...) -> 1
    images[1, :, 0, 1] = 1.0   # every crop: class 1
    labels = np.array([1, 1], np.int32)
    dataset = tf.data.Dataset.from_tensor_slices((images, labels)).batch(2)
    loss = lambda y, a, m: tf.constant(0.0)  # noqa: E731
    result = training.run_evaluation(None, _fake_eval_fn, dataset, 3, 0.2, loss)
    assert result["accuracy"] == 1.0 and result["examples"] == 2
    centre_only = dataset.map(lambda x, y: (x[:, 0], y))
    result = training.run_evaluation(None, _fake_eval_fn, centre_only, 3, 0.2, loss)
    assert result["accuracy"] == 0.5


# ------------------------------------------------------------------- config


def _config(**kwargs):
    base = dict(dataset="smallnorb", data_source="tfds", dataset_dir=None)
    return training.TrainConfig(**{**base, **kwargs})


def test_config_validation():
    _config(smallnorb_split="azimuth", eval_viewpoints="familiar", test_crops=9,
            download=True).validate()
    mnist = _config(dataset="mnist", data_source="tfds", test_crops=2)
    mnist.validate()
    assert training.describe_test_set(mnist) == " [2 shifted copies averaged]"
    bad = [
        (dict(smallnorb_split="lighting"), "smallnorb_split must be one of standard, azimuth, "
                                           "elevation, got 'lighting'"),
        (dict(dataset="mnist", data_source="tfrecord", smallnorb_split="azimuth"),
         "needs dataset='smallnorb'"),
        (dict(eval_viewpoints="new"), "eval_viewpoints must be one of familiar, novel, all"),
        (dict(test_crops=10), r"test_crops must be an integer in \[1, 9\], got 10"),
        (dict(dataset="mnist", data_source="tfrecord", download=True),
         "download=True needs data_source='tfds'"),
    ]
    for kwargs, message in bad:
        with pytest.raises(ConfigError, match=message):
            _config(**kwargs).validate()
    assert "smallnorb_split" in training.COMPUTATION_KEYS  # a resume cannot silently switch
    assert "smallnorb_split" in training.MODEL_KEYS  # --mode=eval takes the run's split


def test_prepare_data_and_test_dataset(fake_norb):
    config = _config(smallnorb_split="elevation", eval_batch_size=64, test_crops=2)
    assert training.prepare_data(config) == (54, 108)
    images, _ = _collect(training.test_dataset(config))
    assert images.shape == (108, 2, 32, 32, 1)
    images, _ = _collect(training.test_dataset(config, viewpoints="familiar"))
    assert images.shape == (54, 2, 32, 32, 1)
    assert training.describe_test_set(config) == " [elevation split, novel viewpoints; " \
                                                 "2 crops averaged]"
    assert training.prepare_data(_config(eval_viewpoints="familiar")) == (162, 162)


# ------------------------------------------------------------------ download


def test_download_reaches_tfds(tfds, monkeypatch):
    calls = []

    def fake_load(name, **kwargs):
        calls.append(kwargs["download"])
        return tf.data.Dataset.from_generator(lambda: _fake_examples(kwargs["split"]),
                                              output_signature=_SIGNATURE)

    monkeypatch.setattr(tfds, "load", fake_load)
    datasets.make_dataset("smallnorb", "test", data_source="tfds")
    datasets.make_dataset("smallnorb", "test", data_source="tfds", download=True)
    datasets.tfds_split_sizes("smallnorb", download=True)
    assert calls == [False, True, True, True]
    calls.clear()
    config = _config(download=True, smallnorb_split="azimuth")
    training.prepare_data(config)
    training.test_dataset(config)
    assert calls == [True, True, True]
    with pytest.raises(DataError, match="download=True applies to data_source='tfds'"):
        datasets.make_dataset("mnist", "test", data_source="tfrecord", download=True)


_SIGNATURE = {
    "image": tf.TensorSpec((96, 96, 1), tf.uint8),
    "image2": tf.TensorSpec((96, 96, 1), tf.uint8),
    **{k: tf.TensorSpec((), tf.int64) for k in (
        "label_category", "instance", "label_elevation", "label_azimuth", "label_lighting")},
}


def test_missing_data_mentions_download(tfds, tmp_path):
    with pytest.raises(DataError) as info:
        datasets.make_dataset("smallnorb", "test", data_source="tfds",
                              dataset_dir=str(tmp_path))
    message = str(info.value)
    assert "--download" in message and str(tmp_path) in message and "\n" not in message


def test_flags_reach_the_config():
    from absl import flags

    import cap_config
    import mnist_config  # noqa: F401  (defines the data flags)

    values = flags.FLAGS
    try:
        values(["train.py", "--dataset=smallnorb", "--smallnorb_split=azimuth",
                "--eval_viewpoints=familiar", "--test_crops=4", "--download"])
        config = cap_config.config_from_flags(values)
    finally:
        values.unparse_flags()
    assert (config.smallnorb_split, config.eval_viewpoints, config.test_crops,
            config.download, config.data_source) == ("azimuth", "familiar", 4, True, "tfds")
    config.validate()


def test_viewpoint_report_of_a_capsule_network_and_a_cnn(fake_norb, tmp_path, tiny_runs):
    """viewpoints.py's report: familiar and novel test error of runs trained on one split."""
    from capsem import step, viewpoints

    log_dirs = []
    for model in ("capsules", "cnn"):
        log_dir = str(tmp_path / model)
        training.train(training.TrainConfig(
            dataset="smallnorb", data_source="tfds", dataset_dir=str(tmp_path / "data"),
            source_dir=None, smallnorb_split="azimuth", model=model, log_dir=log_dir,
            batch_size=4, eval_batch_size=27, iterations=2, A=4, B=2, C=2, D=2, max_steps=2,
            epochs=0, seed=5, summary_secs=3600, histogram_secs=3600, checkpoint_secs=3600,
            log_every_steps=1, log_every_secs=0, eval_every_epoch=False))
        log_dirs.append(log_dir)
    rows = viewpoints.viewpoint_report(log_dirs)
    assert [(r["model"], r["viewpoints"], r["examples"]) for r in rows] == [
        ("capsules", "familiar", 54), ("capsules", "novel", 108),
        ("cnn", "familiar", 54), ("cnn", "novel", 108)]

    # The capsule network's accuracies, computed here from its checkpoint and the splits.
    model, config, _, _ = training.load_trained(log_dirs[0])
    eval_fn = step.make_eval_step(model)
    for row in rows[:2]:
        correct = total = 0
        for images, labels in datasets.make_dataset(
                "smallnorb", "test", dataset_dir=str(tmp_path / "data"), data_source="tfds",
                batch_size=27, smallnorb_split="azimuth", viewpoints=row["viewpoints"]):
            predicted = np.argmax(eval_fn(images)[1].numpy(), -1)
            correct += int(np.sum(predicted == labels.numpy()))
            total += int(labels.shape[0])
        assert total == row["examples"]
        assert row["accuracy"] == pytest.approx(correct / total)
        assert row["error"] == pytest.approx(1 - correct / total)
    table = viewpoints.format_report(rows)
    assert table.count("\n") == 3 and "| cnn |" in table and "(108)" in table

    with pytest.raises(ConfigError, match="the report needs runs of --dataset=smallnorb "
                                          "--smallnorb_split=azimuth or elevation"):
        viewpoints.viewpoint_report([tiny_runs["article"]])
