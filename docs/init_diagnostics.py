"""The initialisation diagnostics of docs/results.md, section 2.

    python docs/init_diagnostics.py [--dataset_dir dataset/mnist]

Builds the small network (A=64, B=8, C=D=16) with several routing settings, runs one batch
of 32 MNIST test images and prints, per setting, the mean class activation, its spread across
the classes, the mean largest assignment of a child in ConvCaps1 and the norm of the gradient
of the spread loss (margin 0.2) with respect to the weights of ReLU Conv1, ConvCaps1 and the
class capsules. Needs the MNIST TFRecords (run `python train.py --dataset=mnist --max_steps=1`
or `download_and_convert_mnist.py` once).
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SETTINGS = [
    ("article routing, 3 iterations", dict(routing="article", iterations=3)),
    ("paper routing, 3 iterations", dict(routing="paper", iterations=3)),
    ("  assignments as constants", dict(routing="paper", iterations=3,
                                        assignment_gradient=False)),
    ("  variance floor 1e-2", dict(routing="paper", iterations=3, variance_floor=1e-2)),
    ("  transform_stddev 3", dict(routing="paper", iterations=3, transform_stddev=3.0)),
    ("  final_lambda 0.1", dict(routing="paper", iterations=3, final_lambda=0.1)),
    ("paper routing, 1 iteration", dict(routing="paper", iterations=1)),
]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset_dir", default="dataset/mnist")
    args = parser.parse_args()
    import keras
    import tensorflow as tf

    from capsem import datasets, diagnostics, losses, nets

    images, labels = next(iter(datasets.make_dataset("mnist", "test",
                                                     dataset_dir=args.dataset_dir,
                                                     batch_size=32)))
    print("| setting | class activation mean | spread across classes | largest assignment "
          "(ConvCaps1) | grad norm conv1 | ConvCaps1 w | class w |")
    print("|---|---|---|---|---|---|---|")
    for name, kwargs in SETTINGS:
        keras.utils.set_random_seed(1)
        model = nets.capsules_net(A=64, B=8, C=16, D=16, **kwargs)
        with tf.GradientTape() as tape:
            _, act = model(images)
            loss = losses.spread_loss_from_labels(labels, act, 0.2)
        weights = [model.get_layer("relu_conv1").kernel, model.get_layer("conv_caps1").w,
                   model.get_layer("class_capsules").w]
        grads = tape.gradient(loss, weights)
        rr = diagnostics.capsule_details(model, images[:8])["routing/conv_caps1"]
        print(f"| {name} | {float(tf.reduce_mean(act)):.3f} | "
              f"{float(tf.reduce_mean(tf.math.reduce_std(act, -1))):.3f} | "
              f"{float(tf.reduce_mean(tf.reduce_max(rr, -1))):.3f} | "
              + " | ".join(f"{float(tf.norm(g)):.3g}" for g in grads) + " |")


if __name__ == "__main__":
    main()
