"""What the all-reduce costs: one process with 2 threads against two workers with 1 thread each.

    python docs/distribute_speed.py [--steps 120] [--skip 40] [--net small|article]
                                    [--batch_size 24] [--recipe article]

Trains the same network on real MNIST (the bundled IDX files, converted into a temporary
dataset directory) for --steps steps, from scratch, in three ways:

* `one process`: `train.py --distribute=none --intra_op_threads=2 --inter_op_threads=2`;
* `two workers`: two `train.py --distribute=multi_worker` processes on 127.0.0.1 (free ports,
  `TF_CONFIG`), each with `--intra_op_threads=1 --inter_op_threads=1`, global batch
  --batch_size (half per worker);
* `one process, 1 thread`: the one-process run with one thread, the speed of one worker
  alone.

and prints, for each, the training speed of the chief (images/s of the global batch,
from its progress lines: the steps after --skip, which leave out start-up and tracing) and
the wall time. Nothing else may run on the machine meanwhile.
"""

import argparse
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NETS = {"small": ["--A=64", "--B=8", "--C=16", "--D=16"], "article": []}


def _free_ports(n):
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def _speed(log_path, skip, batch_size):
    """Images/s between the first progress line at or after step `skip` and the last one."""
    points = []
    with open(log_path) as f:
        for line in f:
            m = re.search(r"^I(\d{4}) (\d\d):(\d\d):(\d\d\.\d+) .*\] step (\d+)/\d+ ", line)
            if m:
                secs = int(m.group(2)) * 3600 + int(m.group(3)) * 60 + float(m.group(4))
                points.append((int(m.group(5)), secs))
    points = [p for p in points if p[0] >= skip]
    if len(points) < 2:
        raise SystemExit(f"{log_path}: fewer than two progress lines after step {skip}")
    (s0, t0), (s1, t1) = points[0], points[-1]
    return (s1 - s0) * batch_size / (t1 - t0)


def _run(commands, envs, logs):
    start = time.time()
    procs = []
    for command, env, log in zip(commands, envs, logs):
        with open(log, "w") as out:
            procs.append(subprocess.Popen(command, env=env, cwd=REPO, stdout=out,
                                          stderr=subprocess.STDOUT))
    codes = [p.wait() for p in procs]
    if any(codes):
        raise SystemExit(f"a run failed ({codes}): see {logs}")
    return time.time() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--skip", type=int, default=40)
    parser.add_argument("--net", choices=sorted(NETS), default="small")
    parser.add_argument("--batch_size", type=int, default=24)
    parser.add_argument("--recipe", default="article")
    args = parser.parse_args()

    work = tempfile.mkdtemp(prefix="capsem-distribute-speed-")
    base = [sys.executable, os.path.join(REPO, "train.py"), "--dataset=mnist",
            f"--dataset_dir={work}/mnist", f"--source_dir={REPO}/data/mnist",
            f"--recipe={args.recipe}", f"--batch_size={args.batch_size}",
            f"--max_steps={args.steps}", "--epochs=0", "--noeval_every_epoch",
            "--log_every_steps=10", "--log_every_secs=0", "--summary_secs=600",
            "--histogram_secs=100000", "--checkpoint_secs=100000"] + NETS[args.net]
    env = dict(os.environ)
    env.pop("TF_CONFIG", None)
    # Convert MNIST and compile the native kernels once, outside the measurements.
    _run([base + [f"--log_dir={work}/warm", "--max_steps=1"]], [env], [f"{work}/warm.log"])

    results = {}
    wall = _run([base + [f"--log_dir={work}/one", "--intra_op_threads=2",
                         "--inter_op_threads=2"]], [env], [f"{work}/one.log"])
    results["one process, 2 threads"] = (_speed(f"{work}/one.log", args.skip,
                                                args.batch_size), wall)
    cluster = {"worker": [f"127.0.0.1:{p}" for p in _free_ports(2)]}
    commands, envs, logs = [], [], []
    for index in range(2):
        commands.append(base + [f"--log_dir={work}/multi", "--distribute=multi_worker",
                                "--intra_op_threads=1", "--inter_op_threads=1"])
        envs.append(dict(env, TF_CONFIG=json.dumps(
            {"cluster": cluster, "task": {"type": "worker", "index": index}})))
        logs.append(f"{work}/worker{index}.log")
    wall = _run(commands, envs, logs)
    results["two workers, 1 thread each"] = (_speed(logs[0], args.skip, args.batch_size), wall)
    wall = _run([base + [f"--log_dir={work}/single", "--intra_op_threads=1",
                         "--inter_op_threads=1"]], [env], [f"{work}/single.log"])
    results["one process, 1 thread"] = (_speed(f"{work}/single.log", args.skip,
                                               args.batch_size), wall)

    print(f"{args.net} network, recipe {args.recipe}, global batch {args.batch_size}, steps "
          f"{args.skip}-{args.steps} (logs in {work})")
    print("| run | images/s | wall time (s), start-up included |")
    print("|---|---|---|")
    for name, (speed, wall) in results.items():
        print(f"| {name} | {speed:.1f} | {wall:.0f} |")


if __name__ == "__main__":
    main()
