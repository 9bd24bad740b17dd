"""Each shifted test copy alone, and the averages of the first k (docs/results.md 3.19).

python docs/shifted_copies.py runs/fl05_s12345 [runs/... ...]

Prints, per run, the test accuracy of each of the 9 copies of `--test_crops=9`
(`capsem.datasets.shifted_copy_offsets`: the image, then the shifts by one pixel) on its
own, and of the average of the class activations of the first 1, 5 and 9 copies (what
`--mode=eval --test_crops=k` reports). Uses the weights `--mode=eval` uses (the average
where there is one). MNIST-like datasets only.
"""

import dataclasses
import sys

import numpy as np

from capsem import datasets, training

COPIES = 9


def main(log_dirs):
    offsets = datasets.shifted_copy_offsets(COPIES)
    for log_dir in log_dirs:
        model, config, _, step = training.load_trained(log_dir)
        config = dataclasses.replace(config, test_crops=COPIES)
        activations, labels = [], []
        for images, batch_labels in training.test_dataset(config):  # (B, 9, H, W, C)
            flat = np.reshape(images, (-1, *images.shape[2:]))  # (B*9, H, W, C)
            a = np.asarray(model(flat, training=False)[1])  # (B*9, classes)
            activations.append(a.reshape(images.shape[0], COPIES, -1))  # (B, 9, classes)
            labels.append(batch_labels.numpy())
        a, y = np.concatenate(activations), np.concatenate(labels)
        # TEST_SHIFT - offset: the copy's content moves by this many pixels (down, right).
        alone = ", ".join(
            f"({datasets.TEST_SHIFT - r:+d},{datasets.TEST_SHIFT - c:+d}) "
            f"{100 * np.mean(a[:, i].argmax(1) == y):.2f}"
            for i, (r, c) in enumerate(offsets))
        averaged = ", ".join(f"{k}: {100 * np.mean(a[:, :k].mean(1).argmax(1) == y):.2f}"
                             for k in (1, 5, 9))
        print(f"{log_dir} (step {step}): each copy alone (shift down, right) {alone}; "
              f"averaged {averaged}%")


if __name__ == "__main__":
    main(sys.argv[1:])
