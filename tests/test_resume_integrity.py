"""Resume integrity: a restore succeeds or stops, flags given on resume take effect or are
refused, one run per log_dir, tfds split sizes, and per-example training loss."""

import glob
import hashlib
import json
import os
import shutil
import signal
import time

import numpy as np
import pytest
import tensorflow as tf

from capsem import datasets, training
from capsem import step as step_lib
from capsem.errors import CheckpointError, ConfigError, DataError
from mnist_fixtures import make_tiny_tfrecords
from test_reliability import _start_train, _wait_for_checkpoint, _checkpoint_step
from test_training import TINY, read_events, run_train
from test_training import tiny_config as _tiny_config


def tiny_config(tmp_path, dataset_dir, **kwargs):
    """test_training's tiny config without an epoch limit (max_steps decides)."""
    return _tiny_config(tmp_path, dataset_dir, **{"epochs": 0, **kwargs})


def _digests(directory):
    """{file name: sha256} of every file in a directory (recursively)."""
    out = {}
    for root, _, files in os.walk(directory):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, directory)] = hashlib.sha256(f.read()).hexdigest()
    return out


def _step_of(log_dir):
    state = tf.train.load_checkpoint(tf.train.latest_checkpoint(log_dir))
    return int(state.get_tensor("global_step/.ATTRIBUTES/VARIABLE_VALUE"))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A log_dir trained to step 3, then resumed to step 6: checkpoints ckpt-3 and ckpt-6."""
    root = tmp_path_factory.mktemp("resume")
    _, dataset_dir = make_tiny_tfrecords(root, n_train=12, n_test=10)
    for steps in (3, 6):
        training.train(tiny_config(root, dataset_dir, max_steps=steps, eval_every_epoch=False))
    log_dir = str(root / "logs")
    assert sorted(os.path.basename(p) for p in glob.glob(os.path.join(log_dir, "ckpt-*.index"))) \
        == ["ckpt-3.index", "ckpt-6.index"]
    return root, dataset_dir, log_dir


def _copy(trained, tmp_path):
    root, dataset_dir, log_dir = trained
    shutil.copytree(log_dir, tmp_path / "logs")
    return dataset_dir, str(tmp_path / "logs")


def _garble(path):
    with open(path, "wb") as f:
        f.write(np.random.RandomState(0).bytes(400))


def _truncate_half(path):
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


# --- 1. a restore succeeds or stops ---------------------------------------------------------


@pytest.mark.parametrize("damage", ["unreadable_index", "truncated_data", "unexpected_error"])
def test_a_damaged_newest_checkpoint_falls_back_to_the_older_one(trained, tmp_path, damage,
                                                                 monkeypatch, caplog):
    dataset_dir, log_dir = _copy(trained, tmp_path)
    newest = os.path.join(log_dir, "ckpt-6")
    if damage == "unreadable_index":
        _garble(newest + ".index")
    elif damage == "truncated_data":
        _truncate_half(newest + ".data-00000-of-00001")
    else:
        original = tf.train.Checkpoint.restore

        def restore(self, path, *args, **kwargs):
            if path.endswith("ckpt-6"):
                raise RuntimeError("a transient read error")
            return original(self, path, *args, **kwargs)

        monkeypatch.setattr(tf.train.Checkpoint, "restore", restore)
    with caplog.at_level("INFO", logger="absl"):
        result = training.train(tiny_config(tmp_path, dataset_dir, max_steps=7,
                                            eval_every_epoch=False))
    assert "ckpt-6 cannot be restored" in caplog.text and "trying an older one" in caplog.text
    assert "Resumed from" in caplog.text and "ckpt-3 at step 3" in caplog.text
    assert "starting from scratch" not in caplog.text
    assert result["step"] == 7 and len(result["history"]["loss"]) == 4  # steps 4..7
    assert _step_of(log_dir) == 7


def test_no_restorable_checkpoint_stops_and_changes_nothing(trained, tmp_path):
    dataset_dir, log_dir = _copy(trained, tmp_path)
    _garble(os.path.join(log_dir, "ckpt-6.index"))
    _truncate_half(os.path.join(log_dir, "ckpt-3.data-00000-of-00001"))
    before = _digests(log_dir)
    with pytest.raises(CheckpointError) as info:
        training.train(tiny_config(tmp_path, dataset_dir, max_steps=8, eval_every_epoch=False))
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"log_dir {log_dir} holds checkpoints but none can be restored: "
                              f"ckpt-6 (")
    assert "; ckpt-3 (" in message and "nothing was changed" in message
    assert _digests(log_dir) == before

    # The same through train.py: exit 1, one error line, every file byte-identical.
    out = run_train(TINY + [f"--dataset_dir={dataset_dir}", "--source_dir=",
                            f"--log_dir={log_dir}", "--max_steps=8", "--seed=3",
                            "--epochs=2"])
    assert out.returncode == 1, out.stderr[-2000:]
    errors = [line for line in out.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "none can be restored" in errors[0], out.stderr[-2000:]
    assert "Traceback" not in out.stderr
    assert _digests(log_dir) == before


def test_checkpoints_are_found_without_the_state_file(trained, tmp_path, caplog):
    dataset_dir, log_dir = _copy(trained, tmp_path)
    os.remove(os.path.join(log_dir, "checkpoint"))
    assert [os.path.basename(p) for p, _ in training.checkpoint_candidates(log_dir)] == \
        ["ckpt-6", "ckpt-3"]
    with caplog.at_level("INFO", logger="absl"):
        result = training.train(tiny_config(tmp_path, dataset_dir, max_steps=7,
                                            eval_every_epoch=False))
    assert "ckpt-6 at step 6" in caplog.text and result["step"] == 7
    assert os.path.exists(os.path.join(log_dir, "ckpt-3.index"))  # not deleted


def test_a_state_file_written_by_hand_keeps_its_checkpoints(trained, tmp_path, caplog):
    """Rolling back by naming an older checkpoint in the state file, without the timestamps
    TensorFlow's manager needs to list it: the run resumes from it and keeps its files, also
    at the next resume, when the manager's state file no longer names it."""
    dataset_dir, log_dir = _copy(trained, tmp_path)
    with open(os.path.join(log_dir, "checkpoint"), "w") as f:
        f.write('model_checkpoint_path: "ckpt-3"\nall_model_checkpoint_paths: "ckpt-3"\n')

    def ckpt_3(directory):
        return {k: v for k, v in _digests(directory).items() if k.startswith("ckpt-3.")}

    before = ckpt_3(log_dir)
    assert sorted(before) == ["ckpt-3.data-00000-of-00001", "ckpt-3.index"]
    with caplog.at_level("INFO", logger="absl"):
        result = training.train(tiny_config(tmp_path, dataset_dir, max_steps=5,
                                            eval_every_epoch=False))
    assert "Resumed from" in caplog.text and "ckpt-3 at step 3" in caplog.text
    assert result["step"] == 5 and ckpt_3(log_dir) == before
    # The newer checkpoint that the state file no longer names goes, as a save killed
    # before it was named would: the resumed run saves that step again.
    assert "ckpt-3." not in caplog.text and "Removed" in caplog.text
    assert not glob.glob(os.path.join(log_dir, "ckpt-6.*"))
    assert [os.path.basename(p) for p, named in training.checkpoint_candidates(log_dir)
            if named] == ["ckpt-5"]
    caplog.clear()
    with caplog.at_level("INFO", logger="absl"):
        result = training.train(tiny_config(tmp_path, dataset_dir, max_steps=7,
                                            eval_every_epoch=False))
    assert "ckpt-5 at step 5" in caplog.text and "Removed" not in caplog.text
    assert result["step"] == 7 and ckpt_3(log_dir) == before


# --- 2. flags on resume ----------------------------------------------------------------------


def _config_json(log_dir):
    with open(os.path.join(log_dir, "config.json")) as f:
        return json.load(f)


def test_a_new_learning_rate_and_weight_decay_take_effect_on_resume(trained, tmp_path,
                                                                   monkeypatch):
    dataset_dir, log_dir = _copy(trained, tmp_path)
    built = []  # the optimizers the resumed run trains with
    make = step_lib.make_optimizer
    monkeypatch.setattr(step_lib, "make_optimizer", lambda *a: built.append(make(*a)) or built[-1])
    training.train(tiny_config(tmp_path, dataset_dir, max_steps=8, learning_rate=1e-4,
                               weight_decay=0.01, eval_every_epoch=False))
    assert len(built) == 1 and built[0].weight_decay == pytest.approx(0.01)
    state = tf.train.load_checkpoint(tf.train.latest_checkpoint(log_dir))
    assert state.get_tensor("optimizer/_learning_rate/.ATTRIBUTES/VARIABLE_VALUE") == \
        np.float32(1e-4)
    rates = dict(read_events(log_dir)["train/learning_rate"])
    assert float(rates[6]) == pytest.approx(1e-3) and float(rates[7]) == pytest.approx(1e-4)
    assert float(rates[8]) == pytest.approx(1e-4)
    saved = _config_json(log_dir)
    assert saved["learning_rate"] == 1e-4 and saved["weight_decay"] == 0.01
    assert saved["changes"] == [{"step": 6, "setting": "learning_rate", "saved": 0.001,
                                 "new": 0.0001},
                                {"step": 6, "setting": "weight_decay", "saved": 0.0,
                                 "new": 0.01}]
    # A constant rate cannot become a decaying one (the optimizer state differs).
    with pytest.raises(ConfigError, match=r"lr_decay_rate=1\.0, this run asks for 0\.5"):
        training.train(tiny_config(tmp_path, dataset_dir, max_steps=9, lr_decay_rate=0.5,
                                   eval_every_epoch=False))


def test_changed_settings_are_refused_or_recorded_with_allow_config_change(trained, tmp_path):
    dataset_dir, log_dir = _copy(trained, tmp_path)
    before = _digests(log_dir)
    with pytest.raises(ConfigError) as info:
        training.train(tiny_config(tmp_path, dataset_dir, max_steps=8, iterations=3,
                                   batch_size=2, seed=4, stable_routing=True))
    message = str(info.value)
    assert message.startswith(f"log_dir {log_dir} holds a run with different settings: ")
    for part in ("iterations=2 (this run: 3)", "stable_routing=False (this run: True)",
                 "batch_size=4 (this run: 2)", "seed=3 (this run: 4)", "--allow_config_change"):
        assert part in message
    assert _digests(log_dir) == before

    out = run_train(TINY + [f"--dataset_dir={dataset_dir}", "--source_dir=",
                            f"--log_dir={log_dir}", "--max_steps=8", "--seed=3", "--epochs=2",
                            "--iterations=3"])
    assert out.returncode == 1
    assert "error: " in out.stderr and "iterations=2 (this run: 3)" in out.stderr
    assert _digests(log_dir) == before

    result = training.train(tiny_config(tmp_path, dataset_dir, max_steps=8, iterations=3,
                                        allow_config_change=True, eval_every_epoch=False))
    assert result["step"] == 8
    saved = _config_json(log_dir)
    assert saved["iterations"] == 3
    assert saved["changes"] == [{"step": 6, "setting": "iterations", "saved": 2, "new": 3}]
    # A further resume keeps the record; the architecture never changes.
    training.train(tiny_config(tmp_path, dataset_dir, max_steps=9, iterations=3,
                               eval_every_epoch=False))
    assert _config_json(log_dir)["changes"] == saved["changes"]
    with pytest.raises(ConfigError, match=r"different architecture: A=4 \(this run: 5\)"):
        training.train(tiny_config(tmp_path, dataset_dir, max_steps=10, iterations=3, A=5,
                                   allow_config_change=True))


def test_eval_builds_the_network_from_config_json(trained, tmp_path, caplog):
    dataset_dir, log_dir = _copy(trained, tmp_path)
    # The defaults of train.py (A=B=C=D=32, 3 iterations) are not what was trained.
    config = training.TrainConfig(dataset_dir=dataset_dir, log_dir=log_dir, jit_compile=False,
                                  eval_batch_size=5)
    with caplog.at_level("INFO", logger="absl"):
        result = training.evaluate(config)
    assert result["step"] == 6 and result["examples"] == 10
    assert "A=4" in caplog.text and "iterations=2" in caplog.text
    # A flag given explicitly wins, and is logged.
    caplog.clear()
    config = training.TrainConfig(dataset_dir=dataset_dir, log_dir=log_dir, jit_compile=False,
                                  eval_batch_size=5, iterations=3)
    with caplog.at_level("INFO", logger="absl"):
        training.evaluate(config, explicit={"iterations"})
    # A routing setting that differs from the run's is a warning (the network computes
    # something else), another explicit setting only information.
    warned = [r.getMessage() for r in caplog.records
              if r.levelname == "WARNING" and r.name == "absl"]
    assert any(m.startswith("Evaluating with iterations=3 (the run was trained with 2): the "
                            "routing then computes") for m in warned), warned
    caplog.clear()
    config = training.TrainConfig(dataset_dir=dataset_dir, log_dir=log_dir, jit_compile=False,
                                  eval_batch_size=5, margin_ramp_epochs=2.0)
    with caplog.at_level("INFO", logger="absl"):
        training.evaluate(config, explicit={"margin_ramp_epochs"})
    assert "Evaluating with margin_ramp_epochs=2.0 (the run was trained with" in caplog.text
    assert not [r for r in caplog.records if r.levelname == "WARNING" and r.name == "absl"]
    # train.py --mode=eval without the architecture flags.
    out = run_train([f"--dataset_dir={dataset_dir}", "--source_dir=", f"--log_dir={log_dir}",
                     "--mode=eval", "--jit_compile=false", "--eval_batch_size=5"])
    assert out.returncode == 0, out.stderr[-3000:]
    assert "Evaluation of" in out.stderr and "(step 6)" in out.stderr


# --- 3. one writer per log_dir ---------------------------------------------------------------


def test_a_held_log_dir_is_refused_in_process(trained, tmp_path):
    dataset_dir, log_dir = _copy(trained, tmp_path)
    before = _digests(log_dir)
    with training.LogDirLock(log_dir):
        with pytest.raises(ConfigError, match=rf"log_dir {log_dir} is in use by another run "
                                              rf"\(PID {os.getpid()}\)"):
            training.train(tiny_config(tmp_path, dataset_dir, max_steps=8))
    def without_lock(digests):
        return {k: v for k, v in digests.items() if k != training.LOCK_FILE}

    assert without_lock(_digests(log_dir)) == without_lock(before)
    # Released: the next run proceeds.
    assert training.train(tiny_config(tmp_path, dataset_dir, max_steps=7,
                                      eval_every_epoch=False))["step"] == 7


def test_a_second_train_py_is_refused_and_a_killed_holder_leaves_no_lock(tmp_path):
    _, dataset_dir = make_tiny_tfrecords(tmp_path, n_train=400)
    log_dir = str(tmp_path / "run")
    args = TINY + [f"--dataset_dir={dataset_dir}", "--source_dir=", f"--log_dir={log_dir}",
                   "--epochs=0", "--checkpoint_secs=0.5"]
    first = _start_train(args + ["--max_steps=1000000"])
    _wait_for_checkpoint(log_dir, first)
    second = run_train(args + ["--max_steps=1000000"])
    assert second.returncode == 1, second.stderr[-2000:]
    errors = [line for line in second.stderr.splitlines() if line.startswith("error: ")]
    assert errors == [f"error: log_dir {log_dir} is in use by another run (PID {first.pid}): "
                      f"wait for it to end, stop it, or use another --log_dir"]
    assert "Removed" not in second.stderr
    assert first.poll() is None  # the first run goes on, and ends normally
    first.send_signal(signal.SIGTERM)
    _, err = first.communicate(timeout=120)
    assert first.returncode == 0 and "Stopped by SIGTERM" in err, err[-2000:]

    # kill -9: the kernel releases the lock, the next run resumes at once.
    third = _start_train(args + ["--max_steps=1000000"])
    _wait_for_checkpoint(log_dir, third)
    time.sleep(0.5)
    third.send_signal(signal.SIGKILL)
    third.communicate(timeout=60)
    step = _checkpoint_step(log_dir)
    out = run_train(args + [f"--max_steps={step + 1}"])
    assert out.returncode == 0, out.stderr[-2000:]
    assert "Resumed from" in out.stderr and _checkpoint_step(log_dir) == step + 1


# --- 4. loose ends of the loop ---------------------------------------------------------------


def test_tfds_steps_per_epoch_come_from_the_prepared_splits(tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets")
    with tfds.testing.mock_data(num_examples=10, policy=tfds.testing.MockPolicy.USE_CODE):
        assert datasets.tfds_split_sizes("mnist") == {"train": 10, "test": 10}
        config = tiny_config(tmp_path, None, data_source="tfds", epochs=2)
        result = training.train(config)
    assert result["step"] == 6  # ceil(10 / 4) = 3 steps per epoch, not 60000 / 4
    assert [s for s, _ in result["history"]["test"]] == [3, 6]


def test_a_pass_without_a_batch_is_an_error(tmp_path, monkeypatch):
    _, dataset_dir = make_tiny_tfrecords(tmp_path, n_train=12, n_test=10)
    # The loop is told the split holds 40 examples (10 steps) while it holds 12 (3 steps).
    monkeypatch.setattr(training, "prepare_data", lambda config: (40, 10))
    with pytest.raises(DataError, match=r"yielded no batch for epoch 1 after skipping 3 batches"):
        training.train(tiny_config(tmp_path, dataset_dir, epochs=1))


def test_training_loss_summary_is_per_example_and_margin_is_the_trained_one(tmp_path):
    _, dataset_dir = make_tiny_tfrecords(tmp_path, n_train=12, n_test=10)
    result = training.train(tiny_config(tmp_path, dataset_dir, max_steps=4,
                                        eval_every_epoch=False))
    events = read_events(str(tmp_path / "logs"))
    losses = dict((s, float(v)) for s, v in events["train/loss"])
    # summary_secs=0: one step per summary; a step's loss is summed over its batch of 4.
    for step in (1, 2, 3, 4):
        assert losses[step] == pytest.approx(result["history"]["loss"][step - 1] / 4, rel=1e-6)
    margins = dict((s, float(v)) for s, v in events["train/margin"])
    assert margins[4] == pytest.approx(0.2)  # the schedule at step 3 (boundary: still 0.2)
