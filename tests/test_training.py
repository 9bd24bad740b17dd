"""End-to-end tests of train.py and capsem.training on tiny generated MNIST data."""

import glob
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from capsem import training
from conftest import REPO
from mnist_fixtures import make_tiny_tfrecords

# A tiny network; XLA compilation (the default) is left to the tests that check that path,
# because compiling takes longer than these tests' few steps.
TINY = ["--A=4", "--B=2", "--C=2", "--D=2", "--batch_size=4", "--eval_batch_size=5",
        "--iterations=2", "--jit_compile=false"]


def run_train(args, timeout=600):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    return subprocess.run([sys.executable, os.path.join(REPO, "train.py")] + args, env=env,
                          cwd=REPO, capture_output=True, text=True, timeout=timeout)


def read_events(log_dir):
    """{tag: [(step, value or histogram ndarray)]} of all event files in log_dir."""
    tags = {}
    for path in sorted(glob.glob(os.path.join(log_dir, "events.out.tfevents.*"))):
        for event in tf.compat.v1.train.summary_iterator(path):
            for value in event.summary.value:
                tensor = tf.make_ndarray(value.tensor)
                tags.setdefault(value.tag, []).append((event.step, tensor))
    return tags


def tiny_config(tmp_path, dataset_dir, **kwargs):
    values = dict(dataset="mnist", data_source="tfrecord", dataset_dir=dataset_dir,
                  source_dir=None, log_dir=str(tmp_path / "logs"), batch_size=4,
                  eval_batch_size=5, iterations=2, A=4, B=2, C=2, D=2, epochs=2, seed=3,
                  deterministic=True, summary_secs=0, histogram_secs=0,
                  checkpoint_secs=3600, log_every_steps=1, jit_compile=False)
    values.update(kwargs)
    return training.TrainConfig(**values)


def test_train_py_end_to_end_summaries_checkpoints_and_resume(tmp_path):
    _, dataset_dir = make_tiny_tfrecords(tmp_path, n_train=12, n_test=10)
    log_dir = str(tmp_path / "run")
    args = TINY[:-1] + [f"--dataset_dir={dataset_dir}", "--source_dir=", f"--log_dir={log_dir}",
                        "--epochs=2", "--summary_secs=0", "--histogram_secs=0",
                        "--checkpoint_secs=0"]
    out = run_train(args)  # the default, XLA-compiled path
    assert out.returncode == 0, out.stderr[-3000:]
    log = out.stderr
    assert "No checkpoint in" in log and "3 steps per epoch" in log
    assert "step 6/6 (100.0%) loss" in log and "steps/s" in log and "ETA" in log
    assert log.count("Test at step") == 2 and "confusion matrix" in log
    assert re.search(r"Final test accuracy \d\.\d{4} at step 6\n", log), log[-2000:]

    # Two checkpoints are kept, the state file names the last, the flags are saved.
    assert sorted(os.path.basename(p) for p in glob.glob(os.path.join(log_dir, "ckpt-*.index"))) \
        == ["ckpt-5.index", "ckpt-6.index"]
    assert tf.train.latest_checkpoint(log_dir).endswith("ckpt-6")
    with open(os.path.join(log_dir, "config.json")) as f:
        saved = json.load(f)
    assert (saved["A"], saved["batch_size"], saved["iterations"], saved["epochs"]) == (4, 4, 2, 2)

    events = read_events(log_dir)
    for tag in ("train/loss", "train/margin", "train/learning_rate", "train/accuracy",
                "train/steps_per_sec", "train/skipped_steps", "test/accuracy", "test/loss"):
        assert tag in events, f"missing scalar {tag}; have {sorted(events)}"
        values = np.array([v for _, v in events[tag]], dtype=np.float64)
        assert np.all(np.isfinite(values)), tag
    assert [s for s, _ in events["test/accuracy"]] == [3, 6]
    assert all(0.0 <= v <= 1.0 for _, v in events["test/accuracy"])
    np.testing.assert_allclose([v for _, v in events["train/learning_rate"]], 1e-3, rtol=1e-6)
    # The margin schedule uses the real iterations per epoch: 12 // 4 = 3. train/margin at
    # global step s is the margin the step that reached s trained with, the schedule at s - 1
    # (the article's piecewise schedule keeps 0.2 at the boundary step 3).
    margins = dict((s, float(v)) for s, v in events["train/margin"])
    assert margins[4] == pytest.approx(0.2) and margins[5] == pytest.approx(0.3)
    for layer in ("primary_caps", "conv_caps1", "conv_caps2", "class_capsules"):
        assert f"activations/{layer}" in events
    for layer in ("conv_caps1", "conv_caps2", "class_capsules"):
        assert f"votes/{layer}" in events and f"routing/{layer}" in events
    for tag in [t for t in events if t.split("/")[0] in ("activations", "votes", "routing")]:
        hist = events[tag][-1][1]  # (buckets, 3): left edge, right edge, count
        assert hist.ndim == 2 and hist.shape[1] == 3 and hist[:, 2].sum() > 0, tag
        assert np.all(np.isfinite(hist)), tag
    acts = events["activations/conv_caps1"][-1][1]
    assert acts[:, 0].min() >= 0.0 and acts[:, 1].max() <= 1.0
    saved_state = tf.train.load_checkpoint(log_dir)
    adam_iterations = saved_state.get_tensor("optimizer/_iterations/.ATTRIBUTES/VARIABLE_VALUE")
    assert int(adam_iterations) == 6

    # A second run of the same command with more epochs resumes at step 6.
    out2 = run_train(args[:-3] + ["--epochs=3", "--summary_secs=0", "--histogram_secs=0",
                                  "--checkpoint_secs=3600"])
    assert out2.returncode == 0, out2.stderr[-3000:]
    assert "Resumed from" in out2.stderr and "at step 6" in out2.stderr
    assert "step 7/9" in out2.stderr and "Test at step 9" in out2.stderr
    state = tf.train.load_checkpoint(log_dir)
    assert int(state.get_tensor("global_step/.ATTRIBUTES/VARIABLE_VALUE")) == 9
    assert int(state.get_tensor("optimizer/_iterations/.ATTRIBUTES/VARIABLE_VALUE")) == 9

    # --mode=eval evaluates the latest checkpoint.
    out3 = run_train(TINY + [f"--dataset_dir={dataset_dir}", "--source_dir=",
                             f"--log_dir={log_dir}", "--mode=eval"])
    assert out3.returncode == 0, out3.stderr[-3000:]
    assert "Evaluation of" in out3.stderr and "(step 9): accuracy" in out3.stderr
    assert "on 10 examples" in out3.stderr and "true\\pred" in out3.stderr


def test_resume_continues_exactly_like_an_uninterrupted_run(tmp_path):
    """Weights, optimizer state, step, margin and data position all survive a restart."""
    _, dataset_dir = make_tiny_tfrecords(tmp_path, n_train=12, n_test=10)
    straight = training.train(tiny_config(tmp_path / "a", dataset_dir, epochs=3,
                                          eval_every_epoch=False))
    first = training.train(tiny_config(tmp_path / "b", dataset_dir, max_steps=4,
                                       eval_every_epoch=False, epochs=3))
    assert first["step"] == 4
    resumed = training.train(tiny_config(tmp_path / "b", dataset_dir, epochs=3,
                                         eval_every_epoch=False))
    assert resumed["step"] == 9 and resumed["history"]["steps"] == [5, 6, 7, 8, 9]
    assert first["history"]["loss"] + resumed["history"]["loss"] == straight["history"]["loss"]
    a = tf.train.load_checkpoint(str(tmp_path / "a" / "logs"))
    b = tf.train.load_checkpoint(str(tmp_path / "b" / "logs"))
    names = [n for n, _ in tf.train.list_variables(str(tmp_path / "a" / "logs"))
             if n != "_CHECKPOINTABLE_OBJECT_GRAPH" and not n.startswith("save_counter")]
    assert len(names) > 20
    for name in names:
        np.testing.assert_array_equal(a.get_tensor(name), b.get_tensor(name), err_msg=name)


def test_bad_flags_are_rejected_with_one_line(tmp_path):
    for flag, message in (("--batch_size=0", "--batch_size=0: 0 is not a positive integer"),
                          ("--iterations=0", "--iterations=0: 0 is not a positive integer"),
                          ("--dataset=cifar", "--dataset=cifar: value should be one of"),
                          ("--learning_rate=0", "--learning_rate must be > 0")):
        out = run_train([flag, f"--log_dir={tmp_path / 'x'}"], timeout=120)
        assert out.returncode != 0
        assert message in out.stderr, out.stderr
        assert "Traceback" not in out.stderr
        assert not os.path.exists(tmp_path / "x")


@pytest.mark.parametrize("dataset,shape", [("fashion_mnist", (28, 28, 1)),
                                           ("smallnorb", (32, 32, 1))])
def test_training_on_tfds_datasets(tmp_path, dataset, shape):
    """--dataset=fashion_mnist / smallnorb train through tensorflow-datasets (mocked here)."""
    import tensorflow_datasets as tfds

    config = tiny_config(tmp_path, None, dataset=dataset, data_source="tfds", max_steps=2,
                         eval_batch_size=4)
    with tfds.testing.mock_data(num_examples=8, policy=tfds.testing.MockPolicy.USE_CODE):
        result = training.train(config)
    assert result["step"] == 2 and np.all(np.isfinite(result["history"]["loss"]))
    assert result["test"]["examples"] == 8
    assert result["test"]["confusion"].shape == ((5, 5) if dataset == "smallnorb" else (10, 10))
    with open(os.path.join(config.log_dir, "config.json")) as f:
        assert json.load(f)["dataset"] == dataset
    model_input = training.build_model(config, training.datasets.get_info(dataset)).input_shape
    assert model_input == (None,) + shape


def test_progress_rate_is_measured_between_lines(monkeypatch):
    """The logged steps/s is the current rate (bench.py's), not an average since the start."""
    clock = [100.0]
    monkeypatch.setattr(training.time, "time", lambda: clock[0])
    progress = training._Progress(total_steps=1000, start_step=0, batch_size=24)
    first = progress.line(1, 2.5, 0.5, 0.2, 0)  # after the step that compiled
    assert "compiling/warm-up" in first and "ETA ?" in first
    clock[0] += 5.0  # 9 steps in 5 s
    line = progress.line(10, 2.0, 0.5, 0.2, 0)
    assert "1.80 steps/s (43.2 images/s)" in line and "ETA 9:10" in line, line
    clock[0] += 1.0  # 10 steps in 1 s: the rate follows the current speed
    line = progress.line(20, 2.0, 0.5, 0.2, 3)
    assert "10.00 steps/s (240.0 images/s)" in line and line.endswith("skipped 3"), line
    assert progress.rate == 10.0


def test_progress_lines_every_n_steps_or_t_seconds_whichever_is_later(monkeypatch):
    """A line at most every 10 steps (at multiples of 10) and at least 10 s after the
    previous one: fast loops log every ~10 s, slow ones every 10 steps."""
    clock = [0.0]
    monkeypatch.setattr(training.time, "time", lambda: clock[0])

    def logged_steps(seconds_per_step, steps, every_steps=10, every_secs=10.0):
        clock[0] = 0.0
        progress = training._Progress(total_steps=1000, start_step=0, batch_size=24,
                                      every_steps=every_steps, every_secs=every_secs)
        logged = []
        for step in range(1, steps + 1):
            clock[0] += seconds_per_step
            if step == 1 or progress.due(step):  # the training loop's rule
                progress.line(step, 1.0, 0.5, 0.2, 0)
                logged.append(step)
        return logged

    # 8 steps/s: the step multiple of 10 at least 10 s after the previous line.
    assert logged_steps(0.125, 260) == [1, 90, 170, 250]
    # 1 step/s: step 10 is 9 s after step 1's line, step 20 the first 10 s after it.
    assert logged_steps(1.0, 45) == [1, 20, 30, 40]
    # 1 step in 2 s: every 10 steps.
    assert logged_steps(2.0, 45) == [1, 10, 20, 30, 40]
    # No time floor: every 10 steps however fast; every 3 steps: multiples of 3.
    assert logged_steps(0.001, 45, every_secs=0.0) == [1, 10, 20, 30, 40]
    assert logged_steps(0.001, 10, every_steps=3, every_secs=0.0) == [1, 3, 6, 9]
    progress = training._Progress(1000, 0, 24, every_steps=10, every_secs=10.0)
    assert not progress.due(5, now=0.0) and progress.due(10, now=0.0)  # no line yet: due


def test_training_logs_progress_lines_at_the_flags_intervals(tmp_path, caplog):
    """The loop follows --log_every_steps / --log_every_secs; the first and last step
    always get a line."""
    _, dataset_dir = make_tiny_tfrecords(tmp_path, n_train=24, n_test=10)

    def progress_steps(name, **kwargs):
        caplog.clear()
        config = tiny_config(tmp_path, dataset_dir, log_dir=str(tmp_path / name), max_steps=5,
                             eval_every_epoch=False, summary_secs=3600, histogram_secs=3600,
                             **kwargs)
        with caplog.at_level("INFO", logger="absl"):
            training.train(config)
        lines = [re.match(r"step (\d+)/5 ", r.getMessage()) for r in caplog.records]
        return [int(m.group(1)) for m in lines if m]

    assert progress_steps("every_2", log_every_steps=2, log_every_secs=0.0) == [1, 2, 4, 5]
    assert progress_steps("hourly", log_every_steps=2, log_every_secs=3600.0) == [1, 5]


def test_histogram_sample_strides_large_tensors():
    import tensorflow as tf
    from capsem import diagnostics
    small = tf.reshape(tf.range(12.0), [3, 4])
    np.testing.assert_array_equal(diagnostics.histogram_sample(small, 12).numpy(), np.arange(12.0))
    big = tf.reshape(tf.range(1000.0), [10, 100])
    sample = diagnostics.histogram_sample(big, 300).numpy()
    np.testing.assert_array_equal(sample, np.arange(0.0, 1000.0, 4.0))  # every 4th: 250 values
