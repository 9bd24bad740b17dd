"""Class activations of a trained run's misclassified test images (docs/results.md 3.19).

python docs/error_activations.py runs/fl05_s1 [runs/... ...]

Prints, per run, how many test images are wrong, the median activation of their true
class and of the wrong winner, and the share of them whose true class is below 0.01
(saturated off). Uses the weights `--mode=eval` uses (the average where there is one).
"""

import sys

import numpy as np

from capsem import training


def main(log_dirs):
    for log_dir in log_dirs:
        model, config, _, step = training.load_trained(log_dir)
        activations, labels = [], []
        for images, batch_labels in training.test_dataset(config):
            activations.append(np.asarray(model(images, training=False)[1]))  # (N, classes)
            labels.append(batch_labels.numpy())
        a, y = np.concatenate(activations), np.concatenate(labels)
        wrong = a.argmax(1) != y
        true = a[np.arange(len(y)), y]
        winner = a.max(1)
        print(f"{log_dir} (step {step}): {wrong.sum()} wrong of {len(y)}; true class median "
              f"{np.median(true[wrong]):.3f}, below 0.01 for {(true[wrong] < 0.01).mean():.2f}; "
              f"wrong winner median {np.median(winner[wrong]):.3f}")


if __name__ == "__main__":
    main(sys.argv[1:])
