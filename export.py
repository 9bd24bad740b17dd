"""Exports a trained network: a SavedModel for serving and the Keras .keras file.

    python export.py --log_dir=logs/mnist --export_dir=exported/mnist
    python export.py --log_dir=logs/mnist --checkpoint=logs/mnist/ckpt-2500 --export_dir=OUT

What is written and how to load it: capsem/export.py and README "Export, predict and
visualise".
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags  # noqa: E402

import tool_flags  # noqa: E402  (--log_dir, --checkpoint)

flags.DEFINE_string("export_dir", None,
                    "Directory to write: serving/1/ (a SavedModel with a serving_default "
                    "signature: uint8 images in; class_ids, activations, poses out), model.keras "
                    "and export.json. Must be new or empty unless --overwrite.")
flags.DEFINE_bool("overwrite", False,
                  "Replace serving/, model.keras and export.json in a non-empty --export_dir "
                  "(its other files are kept).")
flags.adopt_module_key_flags(tool_flags)
tool_flags.log_dir_help("the network to export")
flags.mark_flag_as_required("export_dir")

FLAGS = flags.FLAGS


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    log_dir = tool_flags.required_log_dir()
    from capsem import export

    tool_flags.exit_on_error(export.export, log_dir, FLAGS.export_dir, FLAGS.checkpoint,
                             FLAGS.overwrite)


if __name__ == "__main__":
    app.run(main)
