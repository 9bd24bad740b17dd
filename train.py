"""Trains or evaluates the article's matrix-capsule network.

    python train.py --dataset=mnist                 # train (resumes from --log_dir)
    python train.py --dataset=mnist --mode=eval     # evaluate the latest checkpoint
    tensorboard --logdir logs/mnist
    python train.py --distribute=mirrored           # on all GPUs of this machine
    TF_CONFIG='{...}' python train.py --distribute=multi_worker   # on every machine

Flags: mnist_config.py (data) and cap_config.py (model, training); --help lists them all.
"""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags, logging  # noqa: E402

import cap_config  # noqa: E402  (defines the model and training flags)
import mnist_config  # noqa: E402  (defines the data flags)

flags.DEFINE_enum("mode", "train", ("train", "eval"),
                  "'train' trains (resuming from the latest checkpoint in --log_dir); 'eval' "
                  "evaluates a checkpoint on the test set (accuracy, loss, confusion matrix) "
                  "with the network of --log_dir's config.json (flags given explicitly win).")
flags.DEFINE_string("checkpoint", None,
                    "With --mode=eval: the checkpoint prefix to evaluate (default: the latest "
                    "in --log_dir).")

# --help lists the flags of the two config modules too, and --log_dir (defined by absl.logging).
flags.adopt_module_key_flags(cap_config)
flags.adopt_module_key_flags(mnist_config)
flags.declare_key_flag("log_dir")

FLAGS = flags.FLAGS


def _without_onednn():
    """--deterministic: TensorFlow without its oneDNN kernels (before TensorFlow is imported).

    oneDNN's convolutions sum in an order that depends on the threads each call
    gets, so their results can differ in the last bits from run to run;
    TensorFlow's own kernels are deterministic for the same thread settings
    (capsem.step.onednn_enabled).
    """
    if "tensorflow" in sys.modules:
        raise RuntimeError("train.py imported TensorFlow before reading --deterministic")
    value = os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
    if value.strip() == "0":
        logging.info("--deterministic: TensorFlow's oneDNN kernels off (TF_ENABLE_ONEDNN_OPTS=0), "
                     "op determinism on")
    else:
        logging.warning("--deterministic with TF_ENABLE_ONEDNN_OPTS=%s: oneDNN's kernels are not "
                        "guaranteed to be run-to-run deterministic; unset it for bit-identical "
                        "reruns", value)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    logging.set_verbosity(logging.INFO)
    if FLAGS.deterministic:
        _without_onednn()
    from capsem import step, training
    from capsem.errors import CapsemError

    step.configure_threads(FLAGS.intra_op_threads, FLAGS.inter_op_threads)

    config = cap_config.config_from_flags(FLAGS)
    try:
        if FLAGS.mode == "train":
            result = training.train(config)
            if result["test"]:
                # The step of the last evaluation, which a stopped run did not repeat.
                tested_at = result["history"]["test"][-1][0]
                logging.info("%s test accuracy %.4f at step %d%s",
                             "Last" if tested_at != result["step"] else "Final",
                             result["test"]["accuracy"], tested_at,
                             f" (training stopped at step {result['step']})"
                             if tested_at != result["step"] else "")
        else:
            training.evaluate(config, FLAGS.checkpoint,
                              explicit=cap_config.explicit_settings(FLAGS))
    except CapsemError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    app.run(main)
