"""Benchmark of capsem's training step and inference; see `capsem/bench.py`.

Examples:
  python bench.py --config=article --mode=train --batch_size=24 --warmup=2 --steps=10
  python bench.py --config=small --mode=infer --json
  python bench.py --all
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app  # noqa: E402

from capsem import bench  # noqa: E402

bench.define_flags()

if __name__ == "__main__":
    app.run(lambda argv: bench.main(argv, script=os.path.abspath(__file__)))
