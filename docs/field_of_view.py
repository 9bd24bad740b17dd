"""Which image rows and columns a trained run's class activations depend on (results.md 3.19).

python docs/field_of_view.py runs/fl05_s1 [runs/... ...]

Inverts one row (then one column) of 16 test images at a time and prints those whose
inversion leaves every class activation unchanged to the bit: pixels the network does
not see.
"""

import sys

import numpy as np

from capsem import training


def main(log_dirs):
    for log_dir in log_dirs:
        model, config, _, _ = training.load_trained(log_dir)
        x = next(iter(training.test_dataset(config)))[0].numpy()[:16]  # (16, H, W, C)
        base = model(x, training=False)[1].numpy()
        unseen = {"rows": [], "columns": []}
        for axis, name in ((1, "rows"), (2, "columns")):
            for i in range(x.shape[axis]):
                y = x.copy()
                index = (slice(None), i) if axis == 1 else (slice(None), slice(None), i)
                y[index] = x.max() - y[index]
                if np.array_equal(model(y, training=False)[1].numpy(), base):
                    unseen[name].append(i)
        print(f"{log_dir} ({config.conv1_padding} padding): rows not seen {unseen['rows']}, "
              f"columns not seen {unseen['columns']}")


if __name__ == "__main__":
    main(sys.argv[1:])
