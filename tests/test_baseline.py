"""The paper's baseline CNN (capsem.baseline, train.py --model=cnn).

Its layers and exact parameter count (paper Sec. 5: "4.2M parameters" on smallNORB),
its loss, and a few training steps through capsem.training.train on generated
MNIST-like data whose classes are learnable (a bright bar whose place is the label).
"""

import json
import logging
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO
from mnist_fixtures import IDX_NAMES, write_idx


def make_pattern_tfrecords(root, n_train=12, n_test=10, seed=0):
    """TFRecords of 28x28 images: faint noise and a 6x4 bar whose place encodes the label."""
    from capsem import datasets

    rng = np.random.default_rng(seed)
    source = os.path.join(str(root), "idx")
    os.makedirs(source)
    for split, n in (("train", n_train), ("test", n_test)):
        labels = (np.arange(n) % 10).astype(np.uint8)
        images = rng.integers(0, 40, size=(n, 28, 28), dtype=np.uint8)
        for image, label in zip(images, labels):
            row, col = (label // 5) * 14 + 4, (label % 5) * 5 + 2
            image[row:row + 6, col:col + 4] = 255
        write_idx(os.path.join(source, IDX_NAMES[split][0]), images)
        write_idx(os.path.join(source, IDX_NAMES[split][1]), labels)
    dataset_dir = os.path.join(str(root), "tfrecords")
    datasets.convert_mnist(source, dataset_dir, expected_counts=(n_train, n_test))
    return dataset_dir


def expected_parameters(height, width, depth, classes):
    """Parameters from the paper's layer sizes (Sec. 5): 5x5 convolutions of 32 and 64
    channels (SAME, stride 1) each followed by 2x2 max pooling, 1024 units, classes."""
    conv1 = 5 * 5 * depth * 32 + 32
    conv2 = 5 * 5 * 32 * 64 + 64
    fc1 = (height // 4) * (width // 4) * 64 * 1024 + 1024
    logits = 1024 * classes + classes
    return conv1 + conv2 + fc1 + logits


def test_cnn_layers_outputs_and_parameter_count():
    from capsem import baseline

    model = baseline.cnn_net(num_classes=10, input_shape=(28, 28, 1))
    assert [tuple(t.shape) for t in model.outputs] == [(None, 1024), (None, 10)]
    shapes = {layer.name: tuple(layer.output.shape) for layer in model.layers[1:]}
    assert shapes == {"conv1": (None, 28, 28, 32), "pool1": (None, 14, 14, 32),
                      "conv2": (None, 14, 14, 64), "pool2": (None, 7, 7, 64),
                      "flatten": (None, 3136), "fc1": (None, 1024), "dropout": (None, 1024),
                      "logits": (None, 10)}
    assert model.get_layer("conv1").kernel.shape == (5, 5, 1, 32)
    assert model.get_layer("conv2").kernel.shape == (5, 5, 32, 64)
    assert model.count_params() == expected_parameters(28, 28, 1, 10) == 3_274_634
    assert baseline.parameter_count(10, (28, 28, 1)) == 3_274_634
    # The paper's smallNORB network (32x32 crops, 5 classes): "4.2M parameters".
    norb = baseline.cnn_net(num_classes=5, input_shape=(32, 32, 1))
    assert norb.count_params() == expected_parameters(32, 32, 1, 5) == 4_252_549
    features, logits = model(np.zeros((3, 28, 28, 1), np.float32), training=False)
    assert features.shape == (3, 1024) and logits.shape == (3, 10)
    with pytest.raises(ValueError, match="input_shape"):
        baseline.cnn_net(input_shape=(3, 3, 1))


def test_cross_entropy_loss_is_the_summed_softmax_cross_entropy():
    from capsem import baseline

    logits = np.array([[2.0, 0.5, -1.0], [0.0, 3.0, 1.0]], np.float32)
    labels = np.array([0, 2])
    log_softmax = logits - np.log(np.sum(np.exp(logits), axis=1, keepdims=True))
    expected = -(log_softmax[0, 0] + log_softmax[1, 2])
    got = float(baseline.cross_entropy_loss(labels, logits, margin=0.5))
    assert abs(got - expected) < 1e-5


def test_config_rejects_an_unknown_model():
    from capsem import training
    from capsem.errors import ConfigError

    with pytest.raises(ConfigError, match="model must be one of capsules, cnn, got 'mlp'"):
        training.TrainConfig(model="mlp").validate()


def test_train_py_has_the_model_flag():
    out = subprocess.run([sys.executable, "train.py", "--help"], cwd=REPO, capture_output=True,
                         text=True, timeout=120)
    # (absl's --help exits with status 1.)
    assert "--model: <capsules|cnn>" in out.stdout, out.stdout + out.stderr


def test_training_the_cnn_lowers_its_loss_and_saves_a_checkpoint(tmp_path, caplog):
    import keras

    from capsem import datasets, training
    from capsem.errors import ConfigError

    dataset_dir = make_pattern_tfrecords(tmp_path)
    config = training.TrainConfig(
        model="cnn", dataset="mnist", data_source="tfrecord", source_dir=None,
        dataset_dir=dataset_dir, log_dir=str(tmp_path / "cnn"), batch_size=4, eval_batch_size=5,
        max_steps=9, epochs=0, seed=1, summary_secs=0, histogram_secs=0, checkpoint_secs=3600,
        log_every_steps=1, log_every_secs=0)
    info = datasets.get_info("mnist")
    # The starting point: the network train() builds (the same seed), on the test set.
    keras.utils.set_random_seed(config.seed)
    initial = training.build_model(config, info)
    test = datasets.make_dataset("mnist", "test", dataset_dir=dataset_dir, batch_size=5)
    before = training.run_evaluation(initial, lambda x: initial(x, training=False), test, 10,
                                     0.2, training.loss_function(config))

    # The absl logger's own level too: an earlier test in the same process that parsed
    # absl flags may have left it at WARNING (seen when the files ran in another order).
    with caplog.at_level(logging.INFO, logger="absl"):
        result = training.train(config)
    assert "Model cnn (baseline_cnn): 3,274,634 parameters" in caplog.text
    assert result["step"] == 9 and result["skipped_steps"] == 0
    assert result["checkpoint"].endswith("ckpt-9")
    assert os.path.exists(result["checkpoint"] + ".index")
    # (Measured: mean cross-entropy 2.32 -> 1.79, accuracy 0.1 -> 0.8 on the test images.)
    assert result["test"]["mean_loss"] < 0.9 * before["mean_loss"], (before, result["test"])
    assert result["test"]["accuracy"] >= before["accuracy"] + 0.3
    with open(tmp_path / "cnn" / "config.json") as f:
        assert json.load(f)["model"] == "cnn"

    # The checkpoint loads as the CNN (export, predict, attack.py) and evaluates alike.
    model, loaded, _, step = training.load_trained(config.log_dir)
    assert (loaded.model, step, model.name) == ("cnn", 9, "baseline_cnn")
    evaluation = training.evaluate(training.TrainConfig(log_dir=config.log_dir,
                                                        dataset_dir=dataset_dir))
    assert evaluation["accuracy"] == result["test"]["accuracy"]
    assert abs(evaluation["loss"] - result["test"]["loss"]) < 1e-3 * result["test"]["loss"]
    # The log_dir holds a CNN: a capsule network cannot resume it.
    capsules = training.TrainConfig(**{**config.to_dict(), "model": "capsules"})
    with pytest.raises(ConfigError, match="different architecture: model='cnn'"):
        training.compare_with_saved_config(capsules, training.read_saved_config(config.log_dir),
                                           True)
