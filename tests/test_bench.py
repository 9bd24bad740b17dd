"""bench.py runs end to end and reports sane numbers (no timing assertions)."""

import json
import math
import os
import subprocess
import sys

from capsem import step
from conftest import REPO, native_or_skip

TINY = ["--A=4", "--B=2", "--C=2", "--D=2", "--batch_size=2", "--steps=1", "--warmup=1"]
KEYS = ("images_per_sec", "median_s_per_step", "peak_rss_mb", "config", "mode", "batch_size",
        "tf_version", "threads", "micro_batch_size", "jit")


def _run_bench(*args):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    proc = subprocess.run([sys.executable, os.path.join(REPO, "bench.py"), *args],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_bench_json_line_has_positive_finite_numbers():
    out = _run_bench("--mode=train", "--json", *TINY)
    result = json.loads(out.strip().splitlines()[-1])
    for key in KEYS:
        assert key in result, f"missing {key} in {sorted(result)}"
    for key in ("images_per_sec", "median_s_per_step", "peak_rss_mb"):
        assert isinstance(result[key], float) and math.isfinite(result[key]) and result[key] > 0
    assert result["mode"] == "train" and result["config"] == "article"
    assert result["batch_size"] == 2 and result["jit"] is True
    assert result["sizes"] == {"A": 4, "B": 2, "C": 2, "D": 2}
    assert math.isfinite(result["last_value"])


def test_bench_paper_recipe_runs_the_paper_routing():
    native_or_skip()
    out = _run_bench("--mode=train", "--json", "--recipe=paper", "--jit=false", *TINY)
    result = json.loads(out.strip().splitlines()[-1])
    # The recipe's inverse temperature ramp and unnormalised M-step run in the native
    # kernels, the whole batch at once (as train.py).
    assert result["recipe"] == "paper" and result["routing_kernels"] == "native"
    assert result["micro_batch_size"] is None
    assert result["images_per_sec"] > 0 and math.isfinite(result["last_value"])
    out = _run_bench("--mode=train", "--json", "--recipe=paper", "--routing_kernels=xla",
                     *TINY)
    result = json.loads(out.strip().splitlines()[-1])
    # In the XLA kernels: train.py's micro-batches of one example.
    assert result["routing_kernels"] == "xla"
    assert result["micro_batch_size"] == step.PAPER_MICRO_BATCH_SIZE


def test_bench_paper_recipe_times_its_weight_decay_and_average(monkeypatch):
    from capsem import bench, recipes
    updates = []
    original = step.WeightAverage.update

    def counted(self):
        updates.append(self.momentum)
        return original(self)

    monkeypatch.setattr(step.WeightAverage, "update", counted)
    tiny = dict(sizes={"A": 4, "B": 2, "C": 2, "D": 2}, batch_size=2, steps=1, warmup=1,
                jit=False, recipe="paper")
    result = bench.run_benchmark(**tiny)
    # The recipe's AdamW and warmed-up average, as train.py: the average's update is
    # traced into the timed step.
    assert result["weight_decay"] == recipes.PAPER["weight_decay"] == 1e-2
    assert result["ema_momentum"] == recipes.PAPER["ema_momentum"] == 0.999
    assert updates and set(updates) == {0.999}
    updates.clear()
    result = bench.run_benchmark(ema_momentum=0.0, **tiny)
    assert result["ema_momentum"] == 0.0 and updates == []
    result = bench.run_benchmark(**dict(tiny, recipe="article"))
    assert result["weight_decay"] == 0.0 and result["ema_momentum"] == 0.0 and updates == []
    result = bench.run_benchmark(mode="infer", **tiny)
    assert result["ema_momentum"] is None and updates == []


def test_bench_text_output():
    out = _run_bench("--mode=infer", "--config=small", "--jit=false", "--intra_op_threads=1",
                     *TINY)
    assert "images/s" in out and "peak RSS" in out and "TensorFlow" in out
    assert "threads: intra-op 1 " in out
    assert "ema_momentum" not in out  # inference: no optimizer, no average
    out = _run_bench("--mode=train", "--recipe=paper", "--ema_momentum=0", "--jit=false", *TINY)
    assert "recipe=paper mode=train" in out and "weight_decay=0.01 ema_momentum=0\n" in out
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    proc = subprocess.run([sys.executable, os.path.join(REPO, "bench.py"), "--ema_momentum=1"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode != 0
    assert "--ema_momentum must be in [0, 1) (0: no average)" in proc.stderr


def test_configure_threads_sets_pools_and_rejects_late_or_bad_calls():
    code = (
        "from capsem import step\n"
        "import tensorflow as tf\n"
        "step.configure_threads(1, 3)\n"
        "print(tf.config.threading.get_intra_op_parallelism_threads(),"
        " tf.config.threading.get_inter_op_parallelism_threads())\n"
        "tf.constant(1.0) + 1.0\n"
        "step.configure_threads(1, 3)\n"  # the same sizes again: fine
        "for args in ((2, 3), (-1, 0), (1.5, 0)):\n"
        "    try:\n"
        "        step.configure_threads(*args)\n"
        "    except (RuntimeError, ValueError) as e:\n"
        "        print(type(e).__name__, e)\n")
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert lines[0] == "1 3"
    assert lines[1].startswith("RuntimeError configure_threads(intra_op_threads=2")
    assert "before TensorFlow runs its first operation" in lines[1]
    assert "fixed at intra-op 1, inter-op 3" in lines[1]
    assert lines[2] == ("ValueError intra_op_threads must be an integer >= 0 "
                        "(0: TensorFlow's default), got -1")
    assert lines[3].endswith("got 1.5")


def test_bench_all_runs_each_pair_in_its_own_process():
    out = _run_bench("--all", "--jit=false", *TINY)
    rows = [line for line in out.strip().splitlines() if line.startswith("| ")]
    assert rows[0].startswith("| config | recipe | mode | images/s | median s/step | peak RSS")
    pairs = [tuple(cell.strip() for cell in row.split("|")[1:4]) for row in rows[1:]]
    assert pairs == [("article", "article", "train"), ("article", "article", "infer"),
                     ("small", "article", "train"), ("small", "article", "infer")]
    for row in rows[1:]:
        images_per_sec = float(row.split("|")[4])
        assert math.isfinite(images_per_sec) and images_per_sec > 0
