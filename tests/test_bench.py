"""bench.py runs end to end and reports sane numbers (no timing assertions)."""

import json
import math
import os
import subprocess
import sys

from conftest import REPO

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


def test_bench_text_output():
    out = _run_bench("--mode=infer", "--config=small", "--jit=false", *TINY)
    assert "images/s" in out and "peak RSS" in out and "TensorFlow" in out
