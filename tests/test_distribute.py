"""Training with tf.distribute (train.py --distribute) against the one-device run.

A tiny network trains 4 steps (global batch 4, 12 training examples: an epoch
boundary at step 3) on generated MNIST: once in this process with
`distribute="none"`, once with `MirroredStrategy` over two logical CPU devices
(a subprocess: logical devices must be made before TensorFlow starts) and
once with `MultiWorkerMirroredStrategy` in two train.py processes on
127.0.0.1 (one replica each). Their weights must equal those of the
one-device run within 1e-5 of each array's maximum.

The one-device run sums the gradients of the same two halves of each global
batch (`micro_batch_size=2`: the same gradient as the whole batch, up to the
order of the float sums), as the two replicas' all-reduce does: a run that
sums in another order (the whole batch at once) gives the same weights only to
the tolerance of tests/test_golden_training.py, because Adam's first updates
are about lr * sign(g) and turn the last bits of the gradient elements near 0
(here the ConvCaps layers' beta_v, the biases) into differences of up to lr
per step. Summed in the same order, the weights came out bit-identical here.
"""

import glob
import json
import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow as tf

from conftest import REPO
from mnist_fixtures import make_tiny_tfrecords

STEPS = 4
SETTINGS = dict(dataset="mnist", data_source="tfrecord", source_dir=None, batch_size=4,
                eval_batch_size=5, iterations=2, A=4, B=2, C=2, D=2, max_steps=STEPS, epochs=0,
                seed=3, summary_secs=0, histogram_secs=3600, checkpoint_secs=3600,
                log_every_steps=1, log_every_secs=0, jit_compile=False)
FLAGS = ["--A=4", "--B=2", "--C=2", "--D=2", "--iterations=2", "--batch_size=4",
         "--eval_batch_size=5", f"--max_steps={STEPS}", "--epochs=0", "--seed=3",
         "--summary_secs=0", "--histogram_secs=3600", "--checkpoint_secs=3600",
         "--log_every_steps=1", "--log_every_secs=0", "--jit_compile=false", "--source_dir="]


def _env(**extra):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    env.pop("TF_CONFIG", None)
    env["PYTHONPATH"] = os.pathsep.join([REPO, os.path.join(REPO, "tests")] + (
        [env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env.update(extra)
    return env


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    _, dataset_dir = make_tiny_tfrecords(tmp_path_factory.mktemp("data"), n_train=12, n_test=10)
    return dataset_dir


def _free_ports(n):
    sockets = []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        sockets.append(s)
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


class _Run:
    """A training subprocess whose output goes to files (read by `wait`)."""

    def __init__(self, args, directory, **env):
        self.directory = directory
        os.makedirs(directory, exist_ok=True)
        self.stdout = open(os.path.join(directory, "stdout"), "w+")
        self.stderr = open(os.path.join(directory, "stderr"), "w+")
        self.process = subprocess.Popen([sys.executable] + args, env=_env(**env), cwd=REPO,
                                        stdout=self.stdout, stderr=self.stderr, text=True)

    def wait(self, timeout=300):
        """(returncode, stdout, stderr); kills the process after `timeout` seconds."""
        try:
            self.process.wait(timeout=timeout)
        finally:
            if self.process.poll() is None:
                self.process.kill()
                self.process.wait()
        outputs = []
        for f in (self.stdout, self.stderr):
            f.seek(0)
            outputs.append(f.read())
            f.close()
        return (self.process.returncode, *outputs)


@pytest.fixture(scope="module")
def runs(data, tmp_path_factory):
    """The distributed runs, started at once (they run while the reference trains here)."""
    root = tmp_path_factory.mktemp("distributed")
    launched = {"root": root, "start": time.time()}
    config = dict(SETTINGS, dataset_dir=data, log_dir=str(root / "mirrored"),
                  distribute="mirrored")
    launched["mirrored"] = _Run([os.path.abspath(__file__), json.dumps(config)],
                                str(root / "mirrored_out"))
    cluster = {"worker": [f"127.0.0.1:{p}" for p in _free_ports(2)]}
    launched["workers"] = []
    for index in range(2):
        tmp = root / f"tmp{index}"  # the worker's TMPDIR: must be empty at the end
        tmp.mkdir()
        tf_config = json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}})
        launched["workers"].append(_Run(
            [os.path.join(REPO, "train.py"), "--distribute=multi_worker",
             f"--dataset_dir={data}", f"--log_dir={root / 'multi'}"] + FLAGS,
            str(root / f"worker{index}_out"), TF_CONFIG=tf_config, TMPDIR=str(tmp)))
    yield launched
    for run in [launched["mirrored"]] + launched["workers"]:
        if run.process.poll() is None:
            run.process.kill()


@pytest.fixture(scope="module")
def reference(runs, data, tmp_path_factory):
    """The one-device run (distribute="none"), in this process: its log_dir."""
    from capsem import training

    log_dir = str(tmp_path_factory.mktemp("reference"))
    result = training.train(training.TrainConfig(dataset_dir=data, log_dir=log_dir,
                                                 micro_batch_size=2, **SETTINGS))
    assert result["step"] == STEPS
    return log_dir


def weights(log_dir):
    """{variable path: array} of the trained weights in log_dir's latest checkpoint."""
    from capsem import nets

    path = tf.train.latest_checkpoint(log_dir)
    assert path is not None and path.endswith(f"ckpt-{STEPS}"), path
    reader = tf.train.load_checkpoint(path)
    model = nets.capsules_net(iterations=2, A=4, B=2, C=2, D=2)
    # The checkpoint holds them (first) under the optimizer's list, in this order.
    return {v.path: reader.get_tensor(f"optimizer/_trainable_variables/{i}/.ATTRIBUTES/"
                                      f"VARIABLE_VALUE")
            for i, v in enumerate(model.trainable_variables)}


def assert_same_weights(log_dir, reference_dir):
    got, ref = weights(log_dir), weights(reference_dir)
    assert got.keys() == ref.keys() and len(ref) == 15
    for name, expected in ref.items():
        diff = np.abs(got[name] - expected)
        bound = 1e-5 * np.max(np.abs(expected))
        assert diff.max() <= bound, (f"{name}: max diff {diff.max():.3g} > 1e-5 * max "
                                     f"({bound:.3g})")


def test_mirrored_over_two_cpu_devices_equals_one_device(runs, reference):
    code, stdout, log = runs["mirrored"].wait()
    assert code == 0, log[-4000:]
    assert "MirroredStrategy: 2 replicas in sync" in log, log[-4000:]
    assert "global batch 4, 2/2 per replica" in log
    result = json.loads(stdout.strip().splitlines()[-1])
    assert result["step"] == STEPS and result["stopped_by"] is None
    assert result["test"] is not None  # evaluated at the end
    assert_same_weights(str(runs["root"] / "mirrored"), reference)
    print(f"mirrored run done {time.time() - runs['start']:.1f} s after the start")


def test_two_workers_equal_one_device_and_only_the_chief_writes(runs, reference):
    outs = [run.wait() for run in runs["workers"]]
    for code, _, log in outs:
        assert code == 0, log[-4000:]
    chief_log, worker_log = outs[0][2], outs[1][2]
    assert "MultiWorkerMirroredStrategy: 2 replicas in sync" in chief_log, chief_log[-4000:]
    assert "chief: writes the log_dir" in chief_log
    assert "not the chief: writes nothing" in worker_log
    assert f"step {STEPS}/{STEPS}" in chief_log and f"step {STEPS}/{STEPS}" in worker_log
    assert "Test at step" in chief_log and "Test at step" not in worker_log
    assert "Saved checkpoint" in chief_log and "Saved checkpoint" not in worker_log

    # The chief wrote checkpoints, summaries and config.json; the other worker left nothing.
    log_dir = str(runs["root"] / "multi")
    names = sorted(os.listdir(log_dir))
    assert "config.json" in names and "checkpoint" in names
    assert f"ckpt-{STEPS}.index" in names
    events = glob.glob(os.path.join(log_dir, "events.out.tfevents.*"))
    assert len(events) == 1, names
    for index in range(2):
        tmp = runs["root"] / f"tmp{index}"
        assert os.listdir(tmp) == [], f"{tmp}: {os.listdir(tmp)}"
    with open(os.path.join(log_dir, "config.json")) as f:
        assert json.load(f)["distribute"] == "multi_worker"
    assert_same_weights(log_dir, reference)
    print(f"two workers done {time.time() - runs['start']:.1f} s after the start")


def _main(config_json):
    """The mirrored run of the test above, in a process with two logical CPU devices."""
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    from absl import logging

    from capsem import training

    logging.set_verbosity(logging.INFO)
    result = training.train(training.TrainConfig(**json.loads(config_json)))
    print(json.dumps({"step": result["step"], "stopped_by": result["stopped_by"],
                      "test": None if result["test"] is None else result["test"]["accuracy"]}))


if __name__ == "__main__":
    _main(sys.argv[1])
