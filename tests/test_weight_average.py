"""--ema_momentum: the moving average of the weights, in the step, the checkpoints and the
tools that load a trained network."""

import dataclasses

import numpy as np
import pytest
import tensorflow as tf

from capsem import nets, step, training
from capsem.errors import ConfigError
from mnist_fixtures import make_tiny_tfrecords
from test_training import read_events, tiny_config


def _values(model):
    return [w.numpy() for w in model.weights]


def test_the_average_follows_each_applied_step_and_skips_a_bad_one():
    kwargs = dict(A=4, B=2, C=2, D=2, routing="paper", inverse_temperature=0.5)
    model, averaged = nets.capsules_net(**kwargs), nets.capsules_net(**kwargs)
    average = step.WeightAverage(model, averaged, 0.25)
    average.copy_from_model()
    # An inverse temperature that changes every step, so that its copy is seen.
    train = step.TrainStep(model, step.make_optimizer(0.05), iterations_per_epoch=10,
                           weight_average=average,
                           inverse_temperature_fn=lambda s: 0.5 + 0.1 * (s + 1))
    rng = np.random.default_rng(0)
    images = rng.uniform(0, 1, (4, 28, 28, 1)).astype(np.float32)
    labels = np.array([0, 1, 2, 3])
    seen = [_values(model)]
    for _ in range(2):
        assert bool(train(images, labels)["finite"])
        seen.append(_values(model))
    trainable = [w.trainable for w in model.weights]
    assert any(not t and not np.array_equal(a, b)
               for t, a, b in zip(trainable, seen[0], seen[2]))
    # m (m w0 + (1 - m) w1) + (1 - m) w2 with m = 0.25 for the trained weights; the others
    # (the inverse temperatures) copied.
    for k, (avg, is_trained) in enumerate(zip(_values(averaged), trainable)):
        want = (0.0625 * seen[0][k] + 0.1875 * seen[1][k] + 0.75 * seen[2][k] if is_trained
                else seen[2][k])
        np.testing.assert_allclose(avg, want, rtol=1e-5, atol=1e-7,
                                   err_msg=model.weights[k].path)
    assert any(not np.allclose(a, w) for a, w in zip(_values(averaged), seen[2]))
    before = _values(averaged)
    images[0, 0, 0, 0] = np.nan
    assert not bool(train(images, labels)["finite"])
    for a, b in zip(_values(averaged), before):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match=r"momentum must be in \[0, 1\), got 1.0"):
        step.WeightAverage(model, averaged, 1.0)
    with pytest.raises(ValueError, match="must be built as the trained one"):
        step.WeightAverage(model, nets.capsules_net(A=4, B=2, C=3, D=2), 0.5)
    for bad, match in (({"ema_momentum": 1.0}, r"ema_momentum must be in \[0, 1\)"),
                       ({"ema_momentum": -0.1}, r"ema_momentum must be in \[0, 1\)"),
                       ({"ema_momentum": 0.9, "ema_warmup": 1},
                        "ema_warmup must be True or False, got 1"),
                       ({"ema_momentum": 0.9, "distribute": "mirrored"},
                        "needs distribute='none'")):
        with pytest.raises(ConfigError, match=match):
            training.TrainConfig(**bad).validate()


def test_a_run_with_an_average_tests_saves_and_delivers_it(tmp_path):
    _, dataset_dir = make_tiny_tfrecords(tmp_path, n_train=12, n_test=10)
    config = tiny_config(tmp_path, dataset_dir, ema_momentum=0.5)  # 2 epochs of 3 steps
    result = training.train(config)
    events = read_events(config.log_dir)
    for name in ("test/accuracy", "test/loss", "test/trained_accuracy", "test/trained_loss"):
        assert [s for s, _ in events[name]] == [3, 6], name
    logged = {name: float(dict(events[name])[6]) for name in ("test/loss", "test/trained_loss")}
    assert logged["test/loss"] != pytest.approx(logged["test/trained_loss"], rel=1e-3)
    assert result["test"]["mean_loss"] == pytest.approx(logged["test/loss"], rel=1e-5)
    # --mode=eval tests what the run tested: the average, or with --ema_momentum=0 given,
    # the trained weights.
    averaged = training.evaluate(config)
    trained = training.evaluate(dataclasses.replace(config, ema_momentum=0.0),
                                explicit=("ema_momentum",))
    assert averaged["mean_loss"] == pytest.approx(logged["test/loss"], rel=1e-5)
    assert trained["mean_loss"] == pytest.approx(logged["test/trained_loss"], rel=1e-5)
    # The tools' loader gives the average too.
    model, _, _, step_ = training.load_trained(config.log_dir)
    assert step_ == 6
    raw, _, _ = training.restore_model(dataclasses.replace(config, ema_momentum=0.0))
    differ = [not np.array_equal(a, b) for a, b in zip(_values(model), _values(raw))]
    assert any(differ)
    # The average cannot be switched off (or on) when a run resumes; another momentum is taken.
    with pytest.raises(ConfigError, match=r"ema_momentum=0\.5, this run asks for 0\.0: .*"
                                          r"pass --ema_momentum=0\.5 to resume it, or use "
                                          r"another --log_dir$"):
        training.train(tiny_config(tmp_path, dataset_dir, epochs=3))
    # Only a paper run saved without an average is told why it may have none.
    paper = dataclasses.replace(config, recipe="paper")
    saved = dict(paper.to_dict(), ema_momentum=0.0)
    with pytest.raises(ConfigError, match=r"pass --ema_momentum=0\.0 to resume it \(runs of "
                                          r"the paper recipe before 33e7692 had no average\)"):
        training.compare_with_saved_config(paper, saved, has_checkpoint=True)
    training.train(tiny_config(tmp_path, dataset_dir, epochs=3, ema_momentum=0.25,
                               eval_every_epoch=False))
    assert training.read_saved_config(config.log_dir)["changes"] == [
        {"step": 6, "setting": "ema_momentum", "saved": 0.5, "new": 0.25}]


def test_the_warm_up_follows_the_count_of_applied_steps():
    """--ema_warmup: the n-th update uses min(momentum, (1 + n) / (10 + n)); n is the
    optimizer's count of applied steps, which a skipped step leaves alone."""
    kwargs = dict(A=4, B=2, C=2, D=2, routing="paper", inverse_temperature=0.5)
    model, averaged = nets.capsules_net(**kwargs), nets.capsules_net(**kwargs)
    optimizer = step.make_optimizer(0.05)
    average = step.WeightAverage(model, averaged, 0.9, updates=optimizer.iterations)
    average.copy_from_model()
    train = step.TrainStep(model, optimizer, iterations_per_epoch=10, weight_average=average)
    rng = np.random.default_rng(1)
    images = rng.uniform(0, 1, (4, 28, 28, 1)).astype(np.float32)
    labels = np.array([0, 1, 2, 3])
    seen = [_values(model)]
    bad = images.copy()
    bad[0, 0, 0, 0] = np.nan
    assert not bool(train(bad, labels)["finite"])  # not counted: the next update is n = 1
    for _ in range(2):
        assert bool(train(images, labels)["finite"])
        seen.append(_values(model))
    assert int(optimizer.iterations) == 2
    m1, m2 = 2 / 11, 3 / 12  # both below 0.9
    trainable = [w.trainable for w in model.weights]
    for k, (avg, is_trained) in enumerate(zip(_values(averaged), trainable)):
        want = (m2 * (m1 * seen[0][k] + (1 - m1) * seen[1][k]) + (1 - m2) * seen[2][k]
                if is_trained else seen[2][k])
        np.testing.assert_allclose(avg, want, rtol=1e-5, atol=1e-7,
                                   err_msg=model.weights[k].path)
    # Past (10 m - 1) / (1 - m) = 81 updates the fixed momentum rules.
    counter = tf.Variable(500, dtype=tf.int64)
    capped = step.WeightAverage(model, averaged, 0.9, updates=counter)
    before = _values(averaged)
    capped.update()
    for k, (avg, is_trained) in enumerate(zip(_values(averaged), trainable)):
        if is_trained:
            np.testing.assert_allclose(avg, 0.9 * before[k] + 0.1 * seen[2][k], rtol=1e-5,
                                       atol=1e-7, err_msg=model.weights[k].path)


def test_a_run_warms_up_its_average(tmp_path):
    """The run's step passes its optimizer's count: after one step of a run with momentum
    0.5, the average is 2/11 of the initial weights, not 1/2."""
    _, dataset_dir = make_tiny_tfrecords(tmp_path, n_train=12, n_test=10)
    gaps = {}
    for warmup in (False, True):
        config = tiny_config(tmp_path / str(warmup), dataset_dir, ema_momentum=0.5,
                             ema_warmup=warmup, max_steps=1, epochs=0, eval_every_epoch=False)
        training.train(config)
        average, _, _, _ = training.load_trained(config.log_dir)
        trained, _, _ = training.restore_model(dataclasses.replace(config, ema_momentum=0.0))
        gaps[warmup] = [a - t for a, t, w in zip(_values(average), _values(trained),
                                                 trained.weights) if w.trainable]
        assert training.read_saved_config(config.log_dir)["ema_warmup"] is warmup
    # average - w1 = m (w0 - w1), and both runs take the same first step (deterministic).
    moved = [np.abs(g).max() > 1e-4 for g in gaps[False]]
    assert sum(moved) >= 5
    for plain, warm, big in zip(gaps[False], gaps[True], moved):
        if big:
            np.testing.assert_allclose(warm, plain * (2 / 11) / 0.5, rtol=1e-3, atol=1e-6)
