"""Throughput benchmark of the article's network: training steps and inference.

`python bench.py --config=article --mode=train` builds `capsem.nets.capsules_net`,
runs `--warmup` untimed steps (XLA compiles during the first one) and then
`--steps` timed ones on random data of the right shape, and reports the median
seconds per step, images per second, the peak resident memory of the process
and the thread settings. A training step is exactly the one `train.py` runs:
`capsem.step.TrainStep` (forward pass, spread loss, gradients through all EM
iterations, per-variable clipping at 4.0, Adam, with the `--recipe`'s weight decay
and, where the recipe has one, the update of its average of the weights,
`capsem.step.WeightAverage`; `--ema_momentum=0` times the step without it). Inference
is `capsem.step.make_eval_step`.

`--all` runs the four config x mode pairs, each in its own process (so that
peak memory figures do not mix), and prints a markdown table.
"""

import json
import os
import resource
import statistics
import subprocess
import sys
import time

from absl import flags

#: Network sizes of the named configurations (ReLU Conv1 channels A, capsule types B, C, D).
CONFIGS = {
    "article": dict(A=32, B=32, C=32, D=32),
    "small": dict(A=64, B=8, C=16, D=16),
}
MODES = ("train", "infer")

FLAGS = flags.FLAGS
_DEFINED = []


def define_flags():
    """Defines the benchmark's absl flags (once)."""
    if _DEFINED:
        return
    _DEFINED.append(True)
    flags.DEFINE_enum("config", "article", sorted(CONFIGS),
                      "Network size: 'article' (A=B=C=D=32) or 'small' (A=64, B=8, C=D=16).")
    flags.DEFINE_enum("mode", "train", MODES,
                      "'train': full TrainStep (forward, loss, backward, clipping, Adam); "
                      "'infer': make_eval_step (forward only).")
    flags.DEFINE_integer("batch_size", 24, "Images per step.", lower_bound=1)
    flags.DEFINE_integer("warmup", 2, "Untimed steps before timing (XLA compiles in the first).",
                         lower_bound=0)
    flags.DEFINE_integer("steps", 10, "Timed steps; the median time per step is reported.",
                         lower_bound=1)
    flags.DEFINE_integer("iterations", None,
                         "EM routing iterations of every capsule layer. Default: the "
                         "--recipe's (article 3, paper 1), as train.py.", lower_bound=1)
    flags.DEFINE_float("ema_momentum", None,
                       "Training: the momentum of the average of the weights updated after "
                       "every step (capsem.step.WeightAverage, as train.py's --ema_momentum). "
                       "Default: the --recipe's (article 0: none; paper 0.999); 0: no "
                       "average, to time the step without it.")
    flags.register_validator("ema_momentum", lambda v: v is None or 0.0 <= v < 1.0,
                             message="--ema_momentum must be in [0, 1) (0: no average)")
    flags.DEFINE_integer("num_classes", 10, "Number of class capsules.", lower_bound=2)
    flags.DEFINE_integer("image_size", 28, "Height and width of the (square) input images.",
                         lower_bound=13)
    flags.DEFINE_integer("channels", 1, "Channels of the input images.", lower_bound=1)
    for name in ("A", "B", "C", "D"):
        flags.DEFINE_integer(name, None, f"Override {name} of the chosen --config.",
                             lower_bound=1)
    flags.DEFINE_bool("stable", False, "Use the guarded EM routing (stable=True).")
    flags.DEFINE_enum("recipe", "article", ["article", "paper"],
                      "The routing of a training recipe (capsem.recipes): 'article' (the "
                      "article's EM routing) or 'paper' (capsem.paper_routing, with the "
                      "recipe's routing settings).")
    flags.DEFINE_integer("micro_batch_size", None,
                         "TrainStep micro-batch size; default: TrainStep's default; 0: the "
                         "whole batch at once.", lower_bound=0)
    flags.DEFINE_enum("jit", None, ["true", "false", "whole"],
                      "jit_compile of TrainStep / make_eval_step: 'true' (a TensorFlow "
                      "graph with the --routing_kernels), 'false' (no XLA), 'whole' (the "
                      "whole step in one XLA program); default: their default.")
    flags.DEFINE_integer("intra_op_threads", 0,
                         "TensorFlow intra-op threads (capsem.step.configure_threads; 0: "
                         "TensorFlow's default, one per core, which the native routing "
                         "kernels use).", lower_bound=0)
    flags.DEFINE_enum("routing_kernels", "auto", ["auto", "native", "xla"],
                      "EM routing kernels (TrainStep / make_eval_step routing_kernels): "
                      "'auto' (native on CPUs, xla on a GPU), 'native' (C++ ops of "
                      "capsem.native, CPU only) or 'xla' (blocked XLA kernels).")
    flags.DEFINE_integer("inter_op_threads", 0,
                         "tf.config.threading inter-op threads (0: TensorFlow's default).",
                         lower_bound=0)
    flags.DEFINE_integer("seed", 0, "Seed of the weights and the random data.")
    flags.DEFINE_bool("json", False, "Print one JSON line instead of text.")
    flags.DEFINE_bool("all", False, "Run the four config x mode pairs, each in a subprocess, "
                      "and print a markdown table.")


def peak_rss_mb():
    """Peak resident memory of this process in MB (ru_maxrss is in KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def run_benchmark(config="article", mode="train", batch_size=24, warmup=2, steps=10,
                  iterations=None, num_classes=10, image_size=28, channels=1, sizes=None,
                  stable=False, micro_batch_size=None, jit=None, intra_op_threads=0,
                  inter_op_threads=0, seed=0, routing_kernels="auto", recipe="article",
                  ema_momentum=None):
    """Builds the network, times `steps` steps after `warmup` ones, returns a result dict.

    Args:
      config: a key of `CONFIGS`.
      mode: "train" or "infer".
      sizes: dict overriding A, B, C, D of the config.
      micro_batch_size: None: train.py's default (`capsem.step.default_micro_batch_size`);
        0: the whole batch; else the size.
      jit: None: the default of TrainStep / make_eval_step; else their
        jit_compile, True, False or "whole".
      intra_op_threads, inter_op_threads: for `capsem.step.configure_threads`
        (0: TensorFlow's default).
      routing_kernels: "auto", "native" or "xla", as `capsem.step.TrainStep`; the
        result's `routing_kernels` says which ran ("xla" where the native
        kernels could not be built), for either routing.
      recipe: "article" or "paper": the network's routing settings, the
        optimizer's weight decay and the average of the weights are the recipe's
        (`capsem.recipes`).
      ema_momentum: training only: None, the recipe's; 0, no average of the
        weights; else the momentum of the `capsem.step.WeightAverage` updated
        inside the timed step (its warm-up as the recipe's).
      Others: see the flags of `define_flags`.

    Returns:
      a dict with `images_per_sec`, `median_s_per_step`, `peak_rss_mb`, the
      settings, the step times and the TensorFlow version and thread counts.
    """
    import numpy as np
    import tensorflow as tf
    import keras

    from capsem import native, nets, recipes
    from capsem import step as step_lib

    step_lib.configure_threads(intra_op_threads, inter_op_threads)
    keras.utils.set_random_seed(seed)
    abcd = dict(CONFIGS[config])
    abcd.update({k: v for k, v in (sizes or {}).items() if v is not None})
    settings = recipes.resolve(recipe, {"iterations": iterations,
                                        "ema_momentum": ema_momentum}, D=abcd["D"])
    iterations = settings["iterations"]

    def build():
        return nets.capsules_net(num_classes=num_classes, iterations=iterations,
                                 input_shape=(image_size, image_size, channels), stable=stable,
                                 routing=settings["routing"],
                                 final_lambda=settings["final_lambda"],
                                 variance_floor=settings["variance_floor"],
                                 assignment_gradient=settings["assignment_gradient"],
                                 transform_stddev=settings["transform_stddev"],
                                 conv1_batch_norm=settings["conv1_batch_norm"],
                                 inverse_temperature=(settings["lambda_start"]
                                                      if settings["lambda_schedule"] == "ramp"
                                                      else None),
                                 routing_cost=settings["routing_cost"],
                                 conv1_padding=settings["conv1_padding"], **abcd)

    model = build()
    rng = np.random.RandomState(seed)
    # Preprocessed images lie in [-1, 1); labels are uniform over the classes.
    images = tf.constant(rng.uniform(-1.0, 1.0, (batch_size, image_size, image_size, channels))
                         .astype(np.float32))
    labels = tf.constant(rng.randint(0, num_classes, batch_size).astype(np.int32))

    kwargs = {} if jit is None else {"jit_compile": jit}
    routing_kernels = step_lib.resolve_routing_kernels(routing_kernels,
                                                       step_lib.compute_devices())
    kwargs["routing_kernels"] = routing_kernels
    if mode == "train":
        if micro_batch_size is not None:
            kwargs["micro_batch_size"] = micro_batch_size or None
        else:  # train.py's default (1 with the paper's routing in the XLA kernels)
            kwargs["micro_batch_size"] = step_lib.default_micro_batch_size(
                settings["routing"], kwargs.get("jit_compile", True), routing_kernels)
        optimizer = step_lib.make_optimizer(settings["learning_rate"],
                                            weight_decay=settings["weight_decay"])
        if settings["ema_momentum"]:  # as train.py's --ema_momentum / --ema_warmup
            kwargs["weight_average"] = step_lib.WeightAverage(
                model, build(), settings["ema_momentum"],
                updates=optimizer.iterations if settings["ema_warmup"] else None)
        train_step = step_lib.TrainStep(model, optimizer, iterations_per_epoch=1000,
                                        clip_norm=4.0, **kwargs)
        used_micro, used_jit = train_step.micro_batch_size, train_step.jit_compile

        def run_once():
            return float(train_step(images, labels)["loss"].numpy())
    else:
        eval_step = step_lib.make_eval_step(model, **kwargs)
        used_micro = None
        used_jit = kwargs.get("jit_compile", _default_arg(step_lib.make_eval_step, "jit_compile"))

        def run_once():
            return float(eval_step(images)[1].numpy().sum())

    start = time.perf_counter()
    for _ in range(warmup):
        value = run_once()
    warmup_s = time.perf_counter() - start
    times = []
    cpu_start = _cpu_seconds()
    for _ in range(steps):
        start = time.perf_counter()
        value = run_once()
        times.append(time.perf_counter() - start)
    cpu_per_step = (_cpu_seconds() - cpu_start) / steps
    median = statistics.median(times)
    return {
        "config": config,
        "mode": mode,
        "batch_size": batch_size,
        "iterations": iterations,
        "sizes": abcd,
        "images_per_sec": batch_size / median,
        "median_s_per_step": median,
        "min_s_per_step": min(times),
        "warmup_s": warmup_s,
        "cpu_s_per_step": cpu_per_step,
        "peak_rss_mb": peak_rss_mb(),
        "micro_batch_size": used_micro,
        "jit": used_jit,
        "recipe": recipe,
        "weight_decay": settings["weight_decay"] if mode == "train" else None,
        "ema_momentum": settings["ema_momentum"] if mode == "train" else None,
        "routing_kernels": ("native" if step_lib.requests_native_kernels(used_jit, routing_kernels)
                            and native.available() else "xla"),
        "stable": stable,
        "tf_version": tf.__version__,
        "threads": {
            "intra_op": tf.config.threading.get_intra_op_parallelism_threads(),
            "inter_op": tf.config.threading.get_inter_op_parallelism_threads(),
            "cpu_count": os.cpu_count(),
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        },
        "last_value": value,
        "step_times_s": times,
    }


def _cpu_seconds():
    """User + system CPU time of this process (all threads), in seconds."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _default_arg(fn, name):
    import inspect
    return inspect.signature(fn).parameters[name].default


def format_text(result):
    """Human-readable lines of a `run_benchmark` result."""
    t = result["threads"]
    return "\n".join([
        f"config={result['config']} {result['sizes']} recipe={result['recipe']} "
        f"mode={result['mode']} "
        f"batch_size={result['batch_size']} iterations={result['iterations']} "
        f"micro_batch_size={result['micro_batch_size']} jit={result['jit']} "
        f"routing_kernels={result['routing_kernels']}"
        + (f" weight_decay={result['weight_decay']:g} ema_momentum={result['ema_momentum']:g}"
           if result["mode"] == "train" else ""),
        f"median {result['median_s_per_step']:.4f} s/step (min {result['min_s_per_step']:.4f}), "
        f"{result['images_per_sec']:.1f} images/s, CPU {result['cpu_s_per_step']:.4f} s/step, "
        f"warmup {result['warmup_s']:.1f} s",
        f"peak RSS {result['peak_rss_mb']:.0f} MB",
        f"TensorFlow {result['tf_version']}, threads: intra-op {t['intra_op']} inter-op "
        f"{t['inter_op']} (0 = default), {t['cpu_count']} CPUs, "
        f"OMP_NUM_THREADS={t['omp_num_threads']}",
    ])


def _forwarded_flags():
    """Command-line flags passed to every subprocess of `--all`."""
    names = ["A", "B", "C", "D", "batch_size", "warmup", "steps", "iterations", "num_classes",
             "image_size", "channels", "stable", "micro_batch_size", "jit", "intra_op_threads",
             "inter_op_threads", "seed", "routing_kernels", "recipe", "ema_momentum"]
    args = []
    for name in names:
        value = FLAGS[name].value
        if value is None:
            continue
        if isinstance(value, bool):
            args.append(f"--{name}" if value else f"--no{name}")
        else:
            args.append(f"--{name}={value}")
    return args


def run_all(script):
    """Runs every config x mode pair in its own process; returns the results."""
    results = []
    for config in ("article", "small"):
        for mode in MODES:
            cmd = [sys.executable, script, f"--config={config}", f"--mode={mode}", "--json"]
            out = subprocess.run(cmd + _forwarded_flags(), check=True, capture_output=True,
                                 text=True).stdout
            results.append(json.loads(out.strip().splitlines()[-1]))
    return results


def markdown_table(results):
    """A markdown table of `run_benchmark` results."""
    lines = ["| config | recipe | mode | images/s | median s/step | peak RSS MB | micro-batch | "
             "jit | routing kernels |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['config']} | {r['recipe']} | {r['mode']} | "
                     f"{r['images_per_sec']:.1f} | "
                     f"{r['median_s_per_step']:.4f} | {r['peak_rss_mb']:.0f} | "
                     f"{r['micro_batch_size']} | {r['jit']} | {r['routing_kernels']} |")
    return "\n".join(lines)


def main(argv, script=None):
    """Entry point of `bench.py` (after absl parsed the flags)."""
    if len(argv) > 1:
        raise SystemExit(f"unexpected arguments: {argv[1:]}")
    if FLAGS.all:
        print(markdown_table(run_all(script or argv[0])))
        return
    result = run_benchmark(
        config=FLAGS.config, mode=FLAGS.mode, batch_size=FLAGS.batch_size,
        warmup=FLAGS.warmup, steps=FLAGS.steps, iterations=FLAGS.iterations,
        num_classes=FLAGS.num_classes, image_size=FLAGS.image_size, channels=FLAGS.channels,
        sizes={k: FLAGS[k].value for k in ("A", "B", "C", "D")}, stable=FLAGS.stable,
        micro_batch_size=FLAGS.micro_batch_size,
        jit={"true": True, "false": False, "whole": "whole", None: None}[FLAGS.jit],
        intra_op_threads=FLAGS.intra_op_threads, inter_op_threads=FLAGS.inter_op_threads,
        seed=FLAGS.seed, routing_kernels=FLAGS.routing_kernels, recipe=FLAGS.recipe,
        ema_momentum=FLAGS.ema_momentum)
    if FLAGS.json:
        print(json.dumps(result))
    else:
        print(format_text(result))
