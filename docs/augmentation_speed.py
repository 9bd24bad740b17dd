"""Batches per second of the MNIST training pipeline with each augmentation (README, options).

python docs/augmentation_speed.py [--dataset_dir=dataset/mnist] [--batches=400] [--threads=1]

Times `capsem.datasets.make_dataset`'s training pipeline (batch 32, the paper recipe's) alone,
without a network: the first 20 batches (warm-up) are not timed, then `--batches` are, for
no augmentation, the shifts, the recipe's shifts, rotations and scalings, and those with
the elastic distortions (Simard's alpha 34, sigma 4). A pipeline whose rate is well above a
run's steps/s costs that run nothing where tf.data has a core to itself; on a machine whose
cores all train (one thread per run), its time is taken from the training.
"""

import argparse
import time

import tensorflow as tf

from capsem import datasets

SETTINGS = {
    "none": {},
    "shifts (2 px)": {"random_shift": 2},
    "the paper recipe's (shifts, rotations 10, scalings 0.1)":
        {"random_shift": 2, "random_rotation": 10.0, "random_scale": 0.1},
    "the recipe's + elastic (alpha 34, sigma 4)":
        {"random_shift": 2, "random_rotation": 10.0, "random_scale": 0.1,
         "random_elastic": 34.0, "elastic_sigma": 4.0},
}


def batches_per_second(dataset_dir, batches, augment):
    """Batches/s of one training epoch's pipeline with `augment`, after 20 warm-up batches."""
    ds = datasets.make_dataset("mnist", "train", dataset_dir=dataset_dir, batch_size=32,
                               training=True, seed=12346, **augment)
    iterator = iter(ds)
    for _ in range(20):
        next(iterator)
    start = time.perf_counter()
    for _ in range(batches):
        next(iterator)
    return batches / (time.perf_counter() - start)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dataset_dir", default="dataset/mnist")
    parser.add_argument("--batches", type=int, default=400)
    parser.add_argument("--threads", type=int, default=1,
                        help="TensorFlow's intra- and inter-op threads (train.py's flags)")
    args = parser.parse_args()
    tf.config.threading.set_intra_op_parallelism_threads(args.threads)
    tf.config.threading.set_inter_op_parallelism_threads(args.threads)
    for name, augment in SETTINGS.items():
        rate = batches_per_second(args.dataset_dir, args.batches, augment)
        print(f"{name}: {rate:.0f} batches/s ({32 * rate:.0f} images/s)")


if __name__ == "__main__":
    main()
