"""The paper's novel-viewpoint comparison: test error on familiar and novel smallNORB viewpoints.

    python viewpoints.py --log_dir=logs/norb_azimuth_caps --compare_log_dir=logs/norb_azimuth_cnn

Both runs trained with --dataset=smallnorb --smallnorb_split=azimuth (or elevation);
see capsem/viewpoints.py and README "smallNORB experiments".
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags  # noqa: E402

import tool_flags  # noqa: E402  (--log_dir, --checkpoint)

flags.DEFINE_string("compare_log_dir", None,
                    "A second run to report beside --log_dir (e.g. the baseline CNN trained "
                    "on the same split).")
flags.DEFINE_string("compare_checkpoint", None,
                    "Checkpoint prefix of --compare_log_dir (default: its latest); choose the "
                    "checkpoints so that the familiar errors match, as the paper does.")
flags.DEFINE_string("dataset_dir", None,
                    "Directory of the tfds data (default: each run's config.json).")
flags.DEFINE_integer("test_crops", None,
                     "Crops averaged at test time (default: each run's config.json).",
                     lower_bound=1)
flags.adopt_module_key_flags(tool_flags)
tool_flags.log_dir_help("the (capsule) network to report")

FLAGS = flags.FLAGS


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    log_dirs = [tool_flags.required_log_dir()]
    checkpoints = [FLAGS.checkpoint]
    if FLAGS.compare_log_dir:
        log_dirs.append(FLAGS.compare_log_dir)
        checkpoints.append(FLAGS.compare_checkpoint)
    from capsem import viewpoints

    rows = tool_flags.exit_on_error(viewpoints.viewpoint_report, log_dirs, checkpoints,
                                    FLAGS.dataset_dir, FLAGS.test_crops)
    print(viewpoints.format_report(rows))


if __name__ == "__main__":
    app.run(main)
