"""Accuracy of a trained run on its own training images, as they are (docs/results.md 3.21).

python docs/training_fit.py runs/aff_s1 [runs/... ...]

Prints, per run, the accuracy and the number of errors on the whole training split without
augmentation, and on the test split, with the weights `--mode=eval` uses (the average where
there is one). A network that overfits is near 100% on its training images; one that is at
the same level on both does not fit them, and more augmentation will not help it.
MNIST-like datasets (the run's own dataset and data directory).
"""

import sys

import numpy as np

from capsem import datasets, training


def accuracy(model, config, split):
    """(accuracy, errors) of `model` on `split` of the run's dataset, not augmented."""
    ds = datasets.make_dataset(config.dataset, split, dataset_dir=config.dataset_dir,
                               data_source=config.data_source, batch_size=500)
    correct = total = 0
    for images, labels in ds:
        predicted = np.asarray(model(images, training=False)[1]).argmax(1)  # (N,)
        correct += int((predicted == labels.numpy()).sum())
        total += len(predicted)
    return correct / total, total - correct


def main(log_dirs):
    for log_dir in log_dirs:
        model, config, _, step = training.load_trained(log_dir)
        (train, train_errors), (test, test_errors) = (accuracy(model, config, split)
                                                      for split in ("train", "test"))
        print(f"{log_dir} (step {step}): training images {100 * train:.2f}% "
              f"({train_errors} wrong), test {100 * test:.2f}% ({test_errors} wrong)")


if __name__ == "__main__":
    main(sys.argv[1:])
