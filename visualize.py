"""Pictures of a trained network's capsules and routing; see `capsem/visualize.py`.

    python visualize.py --log_dir=logs/mnist --out=pictures
    python visualize.py --log_dir=logs/mnist --out=pictures --num_images=8 --first_image=100
    python visualize.py --log_dir=logs/mnist --checkpoint=logs/mnist/ckpt-2500 --out=pictures
    python visualize.py --log_dir=logs/mnist --out=pictures --dataset_dir=dataset/mnist --overwrite

For each test image k it writes ten PNGs, image<k>_<picture>.png: input,
activations_{primary_caps,conv_caps1,conv_caps2,class_capsules},
routing_{conv_caps1,conv_caps2,class_capsules}, poses and pose_study.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags  # noqa: E402

import tool_flags  # noqa: E402  (--log_dir, --checkpoint)

flags.DEFINE_string("out", None,
                    "Required: directory of the PNGs (created if needed). Files of the names "
                    "visualize.py would write are never replaced unless --overwrite.")
flags.DEFINE_integer("num_images", 4, "How many test images to picture.", lower_bound=1)
flags.DEFINE_integer("first_image", 0,
                     "Test-set index of the first image: the images are first_image .. "
                     "first_image + num_images - 1, in the order of the test TFRecord (or "
                     "tfds split).", lower_bound=0)
flags.DEFINE_string("dataset_dir", None,
                    "Directory of the test data (default: the dataset_dir of --log_dir's "
                    "config.json, relative to the current directory).")
flags.DEFINE_bool("overwrite", False,
                  "Replace files of --out that have the names visualize.py writes (without "
                  "it such a file is an error and nothing is written).")
flags.DEFINE_float("pose_offset", 0.25,
                   "The pose study adds offsets in [-pose_offset, pose_offset] to one pose "
                   "element of every ConvCaps2 capsule.", lower_bound=0.0)
flags.DEFINE_integer("pose_steps", 11, "Number of offsets of the pose study.", lower_bound=2)

flags.adopt_module_key_flags(tool_flags)
tool_flags.log_dir_help("the network to picture")

FLAGS = flags.FLAGS


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    log_dir = tool_flags.required_log_dir()
    if not FLAGS.out:
        raise app.UsageError("--out is required: the directory of the PNGs")
    from capsem import visualize

    tool_flags.exit_on_error(
        visualize.visualize, log_dir, FLAGS.out, checkpoint=FLAGS.checkpoint,
        num_images=FLAGS.num_images, first_image=FLAGS.first_image,
        dataset_dir=FLAGS.dataset_dir, overwrite=FLAGS.overwrite,
        pose_offset=FLAGS.pose_offset, pose_steps=FLAGS.pose_steps,
        log=lambda line: print(line, flush=True))


if __name__ == "__main__":
    app.run(main)
