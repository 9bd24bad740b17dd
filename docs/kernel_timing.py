"""Times the three routing layers alone, article routing against paper routing (results.md 4).

For each network and routing mode the script builds the network, computes the
inputs of conv_caps1, conv_caps2 and class_capsules for one batch of random
images once, and then times each layer's call (votes, routing kernels and the
layout ops around them; forward) and its gradient (forward + backward with
respect to the layer's weights and inputs), each in a tf.function, as the median
of --repeats calls after two warm-up calls. It prints CPU seconds (process
time, which other work on the machine disturbs least) and wall seconds per
call, summed over the three layers, and the paper / article ratio.

    python docs/kernel_timing.py                         # small network, 1 thread
    python docs/kernel_timing.py --config=article --paper_iterations=3
"""

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from capsem.bench import CONFIGS  # noqa: E402  (the network sizes bench.py uses)

LAYERS = ("conv_caps1", "conv_caps2", "class_capsules")


def _median_times(fn, repeats):
    """(CPU s, wall s) per call of fn: medians of `repeats` calls after two warm-up calls."""
    for _ in range(2):
        fn()
    cpu, wall = [], []
    for _ in range(repeats):
        c0, w0 = time.process_time(), time.perf_counter()
        fn()
        cpu.append(time.process_time() - c0)
        wall.append(time.perf_counter() - w0)
    return statistics.median(cpu), statistics.median(wall)


def time_layers(config, routing, iterations, batch, repeats, seed=1):
    """{layer: {"forward": (cpu, wall), "gradient": (cpu, wall)}} for one network and routing."""
    import numpy as np
    import tensorflow as tf

    from capsem import diagnostics, nets

    tf.random.set_seed(seed)
    model = nets.capsules_net(iterations=iterations, routing=routing, **CONFIGS[config])
    images = tf.constant(np.random.default_rng(seed).uniform(-1, 1, (batch, 28, 28, 1)),
                         tf.float32)
    outputs = diagnostics.capsule_outputs(model, images)
    previous = "primary_caps"
    result = {}
    for name in LAYERS:
        layer = model.get_layer(name)
        poses = outputs[f"poses/{previous}"]
        acts = outputs[f"activations/{previous}"]

        @tf.function
        def forward(p=poses, a=acts, layer=layer):
            return layer([p, a])

        @tf.function
        def gradient(p=poses, a=acts, layer=layer):
            with tf.GradientTape() as tape:
                tape.watch([p, a])
                out_p, out_a = layer([p, a])
                loss = tf.reduce_sum(out_p) + tf.reduce_sum(out_a)
            return tape.gradient(loss, layer.trainable_variables + [p, a])

        result[name] = {"forward": _median_times(forward, repeats),
                        "gradient": _median_times(gradient, repeats)}
        previous = name
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", choices=sorted(CONFIGS), default="small",
                        help="small: A=64, B=8, C=D=16; article: A=B=C=D=32 (default small)")
    parser.add_argument("--paper_iterations", type=int, default=3,
                        help="EM iterations of the paper routing (the recipe: 2; default 3, "
                             "the article routing's)")
    parser.add_argument("--batch", type=int, default=24, help="images per call (default 24)")
    parser.add_argument("--repeats", type=int, default=10,
                        help="timed calls per measurement (default 10)")
    parser.add_argument("--threads", type=int, default=1,
                        help="TensorFlow intra- and inter-op threads (default 1; 0: "
                             "TensorFlow's choice)")
    args = parser.parse_args()
    for name, value in (("paper_iterations", args.paper_iterations), ("batch", args.batch),
                        ("repeats", args.repeats)):
        if value < 1:
            parser.error(f"--{name} must be >= 1, got {value}")
    if args.threads < 0:
        parser.error(f"--threads must be >= 0, got {args.threads}")
    from capsem import native, step

    step.configure_threads(args.threads, args.threads)
    print(f"{args.config} network, batch {args.batch}, {args.threads or 'default'} thread(s), "
          f"native kernels: {native.available()}; medians of {args.repeats} calls")
    runs = {"article": time_layers(args.config, "article", 3, args.batch, args.repeats),
            "paper": time_layers(args.config, "paper", args.paper_iterations, args.batch,
                                 args.repeats)}
    print(f"{'layer':16s} {'pass':9s} {'article (3 it.) cpu/wall s':>27s} "
          f"{f'paper ({args.paper_iterations} it.) cpu/wall s':>27s} {'paper/article cpu':>18s}")
    for kind in ("forward", "gradient"):
        totals = {"article": [0.0, 0.0], "paper": [0.0, 0.0]}
        for name in LAYERS + ("all three",):
            if name == "all three":
                cells = {mode: tuple(totals[mode]) for mode in runs}
            else:
                cells = {mode: runs[mode][name][kind] for mode in runs}
                for mode in runs:
                    totals[mode][0] += cells[mode][0]
                    totals[mode][1] += cells[mode][1]
            art, pap = cells["article"], cells["paper"]
            print(f"{name:16s} {kind:9s} {art[0]:13.4f} /{art[1]:9.4f}   "
                  f"{pap[0]:13.4f} /{pap[1]:9.4f}   {pap[0] / art[0]:15.2f}")


if __name__ == "__main__":
    main()
