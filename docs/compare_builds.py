"""Compares the native kernels of two checkouts (README "Speed", the AVX2 rounding figures).

Run `save` with each checkout's capsem (each builds its own kernels), then `compare`:

    (cd OLD_CHECKOUT && python /path/to/docs/compare_builds.py save /tmp/old.npz)
    (cd NEW_CHECKOUT && python /path/to/docs/compare_builds.py save /tmp/new.npz)
    python docs/compare_builds.py compare /tmp/old.npz /tmp/new.npz

`save` builds the small network (A=64, B=8, C=D=16, Keras seed 1) with the article routing
(3 iterations) and the paper routing (1 and 3), and stores for 4 random images the class
activations, the class poses and the gradient of a fixed loss with respect to every weight.
`compare` prints, per routing, the largest difference of the activations, the largest
difference of the poses relative to their largest magnitude, and the largest such relative
difference over the gradients.
"""

import os
import sys

import numpy as np

SETTINGS = (("article", 3), ("paper", 1), ("paper", 3))


def save(path):
    sys.path.insert(0, os.getcwd())  # the checkout run from
    import keras
    import tensorflow as tf

    from capsem import nets

    out = {}
    for routing, iterations in SETTINGS:
        keras.utils.set_random_seed(1)
        model = nets.capsules_net(A=64, B=8, C=16, D=16, iterations=iterations,
                                  routing=routing)
        images = tf.constant(np.random.default_rng(1).uniform(-1, 1, (4, 28, 28, 1)),
                             tf.float32)
        with tf.GradientTape() as tape:
            poses, acts = model(images)
            loss = (tf.reduce_sum(acts * tf.range(10, dtype=tf.float32))
                    + 1e-3 * tf.reduce_sum(poses ** 2))
        grads = tape.gradient(loss, model.trainable_variables)
        key = f"{routing}{iterations}"
        out[f"{key}_acts"], out[f"{key}_poses"] = acts.numpy(), poses.numpy()
        for variable, grad in zip(model.trainable_variables, grads):
            out[f"{key}_grad_{variable.path}"] = grad.numpy()
    np.savez(path, **out)


def _rel(a, b):
    return float(np.max(np.abs(a - b)) / (np.max(np.abs(a)) + 1e-30))


def compare(path_a, path_b):
    a, b = np.load(path_a), np.load(path_b)
    for routing, iterations in SETTINGS:
        key = f"{routing}{iterations}"
        grads = [_rel(a[k], b[k]) for k in a.files if k.startswith(f"{key}_grad_")]
        print(f"{key}: activations {np.max(np.abs(a[key + '_acts'] - b[key + '_acts'])):.3g}, "
              f"poses (relative) {_rel(a[key + '_poses'], b[key + '_poses']):.3g}, "
              f"gradients (relative, largest) {max(grads):.3g}")


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "save":
        save(sys.argv[2])
    elif len(sys.argv) == 4 and sys.argv[1] == "compare":
        compare(sys.argv[2], sys.argv[3])
    else:
        sys.exit(__doc__)
