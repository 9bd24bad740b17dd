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
    # Both replicas are CPUs: "auto" picked the native kernels for them.
    assert ("EM routing kernels: native (routing_kernels=auto; devices "
            "/job:localhost/replica:0/task:0/device:CPU:0, "
            "/job:localhost/replica:0/task:0/device:CPU:1)") in log
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


@pytest.mark.parametrize("requested, devices, expected", [
    ("auto", ["/job:localhost/replica:0/task:0/device:CPU:0"], "native"),
    ("auto", ["/device:CPU:0", "/device:CPU:1"], "native"),
    ("auto", ["/job:worker/replica:0/task:0/device:GPU:0"], "xla"),
    ("auto", ["/job:worker/replica:0/task:0/device:CPU:0",
              "/job:worker/replica:0/task:1/device:GPU:0"], "xla"),
    ("auto", ["/device:TPU:0"], "xla"),
    ("native", ["/device:CPU:0"], "native"),
    ("xla", ["/device:CPU:0"], "xla"),
    ("xla", ["/device:GPU:0", "/device:GPU:1"], "xla"),
])
def test_routing_kernels_follow_the_devices(requested, devices, expected):
    from capsem import step

    assert step.resolve_routing_kernels(requested, devices) == expected


def test_native_kernels_on_a_gpu_are_an_error_not_a_host_round_trip():
    from capsem import step
    from capsem.errors import ConfigError

    with pytest.raises(ConfigError, match=r"routing_kernels=native: the native routing kernels "
                       r"run on CPUs only, and this step runs on /device:GPU:1; use "
                       r"routing_kernels=auto or xla"):
        step.resolve_routing_kernels("native", ["/device:CPU:0", "/device:GPU:1"])
    with pytest.raises(ConfigError, match="routing_kernels must be one of auto, native, xla, "
                       "got 'gpu'"):
        step.resolve_routing_kernels("gpu", ["/device:CPU:0"])


def test_compute_devices_of_one_device_and_of_a_strategy():
    from capsem import step

    # No GPU here: TensorFlow places operations on the CPU, and "auto" means native.
    assert tf.config.list_logical_devices("GPU") == []
    assert step.compute_devices() == [tf.config.list_logical_devices("CPU")[0].name]
    strategy = tf.distribute.OneDeviceStrategy("/cpu:0")
    assert [tf.DeviceSpec.from_string(d).device_type
            for d in step.compute_devices(strategy)] == ["CPU"]
    assert step.resolve_routing_kernels("auto", step.compute_devices(strategy)) == "native"


KILL_STEPS = 60


def _workers(root, data, ports, tag):
    """Two multi-worker train.py processes (tiny network, a checkpoint every step).

    Worker i's TMPDIR is `root / f"tmp{i}"`, the same in every call.
    """
    cluster = {"worker": [f"127.0.0.1:{p}" for p in ports]}
    flags = [f for f in FLAGS if not f.startswith(("--max_steps", "--checkpoint_secs"))]
    runs = []
    for index in range(2):
        tf_config = json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}})
        tmp = root / f"tmp{index}"
        tmp.mkdir(exist_ok=True)
        runs.append(_Run([os.path.join(REPO, "train.py"), "--distribute=multi_worker",
                          f"--dataset_dir={data}", f"--log_dir={root / 'multi'}",
                          f"--max_steps={KILL_STEPS}", "--checkpoint_secs=0",
                          "--noeval_every_epoch"] + flags,
                         str(root / f"{tag}{index}"), TF_CONFIG=tf_config, TMPDIR=str(tmp)))
    return runs


def _kill_after(runs, killed, step):
    """Kills worker `killed` of `runs` once the chief saved ckpt-<step>; checks the other.

    The other worker must stop within 60 s with exit status 1 and one error line that
    names the last checkpoint. Returns `(last checkpoint prefix, its step)`.
    """
    chief_err = os.path.join(runs[0].directory, "stderr")
    deadline = time.time() + 240
    while time.time() < deadline and runs[0].process.poll() is None:
        with open(chief_err) as f:
            if f"ckpt-{step} (periodic)" in f.read():
                break
        time.sleep(0.1)
    assert runs[0].process.poll() is None, runs[0].wait()[2][-3000:]
    runs[killed].process.kill()
    killed_at = time.time()
    code, _, log = runs[1 - killed].wait(timeout=120)
    waited = time.time() - killed_at
    runs[killed].wait()
    assert code == 1, log[-3000:]
    assert waited < 60, waited
    errors = [line for line in log.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, log[-3000:]
    assert "a worker of the multi_worker job stopped or cannot be reached" in errors[0]
    assert "run every worker's command again to resume" in errors[0]
    last = tf.train.latest_checkpoint(os.path.join(os.path.dirname(runs[0].directory), "multi"))
    saved = int(last.rsplit("-", 1)[1])
    assert step <= saved < KILL_STEPS
    assert f"(ckpt-{saved})" in errors[0]
    return last, saved


def _resumed(run, last, saved):
    with open(os.path.join(run.directory, "stderr")) as f:
        log = f.read()
    assert f"Resumed from {last} at step {saved}" in log, log[-3000:]


def test_killed_workers_stop_the_others_and_the_same_commands_resume(data, tmp_path):
    """SIGKILL of worker 1, then of the chief: each time the other stops with one error
    line, and running the same commands again resumes from the last checkpoint."""
    ports = _free_ports(2)
    first = _workers(tmp_path, data, ports, "first")
    last, saved = _kill_after(first, 1, 5)
    assert os.listdir(tmp_path / "tmp0") == []  # the chief, stopped, left nothing

    second = _workers(tmp_path, data, ports, "second")
    last2, saved2 = _kill_after(second, 0, saved + 5)
    for run in second:
        _resumed(run, last, saved)

    third = _workers(tmp_path, data, ports, "third")
    outs = [run.wait() for run in third]
    for run, (code, _, log) in zip(third, outs):
        assert code == 0, log[-3000:]
        _resumed(run, last2, saved2)
        assert f"step {KILL_STEPS}/{KILL_STEPS}" in log
    assert tf.train.latest_checkpoint(str(tmp_path / "multi")).endswith(f"ckpt-{KILL_STEPS}")
    # Killed workers leave TensorFlow's temporaries (autograph's) in their TMPDIR, but no
    # capsem-worker-* scratch directory remains: worker 1's was removed by its next start.
    for index in range(2):
        left = os.listdir(tmp_path / f"tmp{index}")
        assert not [n for n in left if n.startswith("capsem-worker-")], left


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
