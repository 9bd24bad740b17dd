"""Classifies image files with a trained network.

    python predict.py --log_dir=logs/mnist digit.png photo.jpg my_digits/
    python predict.py --log_dir=logs/mnist --json my_digits/

Prints one line per image (the predicted class and the top 3 class activations), or one
JSON object per line with --json. Images of any size and colour mode are converted as
capsem/predict.py describes (grey, resized, the training data's normalisation); a file
that cannot be read gets one `error:` line on stderr and the others are still classified
(exit status 1 if any failed).
"""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags, logging  # noqa: E402

import tool_flags  # noqa: E402  (--log_dir, --checkpoint)

flags.DEFINE_bool("json", False,
                  "Print one JSON object per image: file, class, activation, top "
                  "([[class, activation], ...]).")
flags.DEFINE_integer("top", 3, "How many classes to print per image, by activation.",
                     lower_bound=1)
flags.DEFINE_integer("batch_size", 32, "Images per call of the network.", lower_bound=1)
flags.adopt_module_key_flags(tool_flags)
tool_flags.log_dir_help("the network that classifies")

FLAGS = flags.FLAGS


def main(argv):
    paths = argv[1:]
    if not paths:
        raise app.UsageError("give one or more image files or folders")
    log_dir = tool_flags.required_log_dir()
    logging.set_verbosity(logging.WARNING)
    from capsem import predict

    files, errors = predict.list_images(paths)
    for line in errors:
        print(line, file=sys.stderr, flush=True)
    predictor = tool_flags.exit_on_error(predict.Predictor, log_dir, FLAGS.checkpoint,
                                         FLAGS.batch_size)
    failed = predict.predict_files(
        predictor, files, emit=lambda line: print(line, flush=True),
        error=lambda line: print(line, file=sys.stderr, flush=True),
        as_json=FLAGS.json, top=FLAGS.top)
    sys.exit(1 if failed or errors else 0)


if __name__ == "__main__":
    app.run(main)
