"""White-box FGSM and BIM attacks on trained networks (the paper's Sec. 6, Fig. 3).

    python attack.py --log_dir=logs/caps --compare_log_dir=logs/cnn --out=attacks
    python attack.py --log_dir=logs/caps --compare_log_dir=logs/cnn --out=attacks \\
        --epsilons=0,0.05,0.1,0.2,0.3 --attack=fgsm,bim --targeted --num_images=1000
    tensorboard --logdir attacks/tensorboard

Writes --out/attacks.csv (one row per model, attack, mode and epsilon),
--out/attacks.png (accuracy after the untargeted attacks and success rate of the
targeted ones against epsilon, every model on the same axes) and TensorBoard
scalars attack/<model>/<attack>_<mode>/{success_rate,accuracy} with step
round(1000 * epsilon). Definitions (units of epsilon, success rate, the losses):
capsem/attacks.py and README "Baseline CNN and adversarial attacks".
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags  # noqa: E402

import tool_flags  # noqa: E402  (--log_dir, --checkpoint)

flags.DEFINE_string("compare_log_dir", None,
                    "A second train.py log_dir whose network is attacked the same way on the "
                    "same images and drawn on the same plot (e.g. the CNN of train.py "
                    "--model=cnn when --log_dir is a capsule network).")
flags.DEFINE_string("compare_checkpoint", None,
                    "Checkpoint prefix of --compare_log_dir (default: its latest).")
flags.DEFINE_string("out", None,
                    "Required: output directory (created if needed) of attacks.csv, attacks.png "
                    "and tensorboard/. If any of them exists nothing is done, unless "
                    "--overwrite.")
flags.DEFINE_bool("overwrite", False,
                  "Replace attacks.csv, attacks.png and the event files of tensorboard/ in --out "
                  "(its other files are kept).")
flags.DEFINE_list("epsilons", ["0", "0.05", "0.1", "0.2", "0.3"],
                  "Comma-separated epsilons (>= 0), the L-infinity size of the perturbation, in "
                  "--epsilon_units.")
flags.DEFINE_enum("epsilon_units", "input", ["input", "pixel"],
                  "Units of --epsilons and --bim_step_size: 'input' (default): the network's "
                  "input, the preprocessed image (x - 128) / 128 whose valid range is "
                  "[-1, 127/128] (one pixel level = 1/128), as the paper's epsilon changes its "
                  "network's input; 'pixel': fractions of the 0-255 pixel range (0.1 = 25.5 "
                  "levels = 0.199 in input units), the scale of the usual MNIST epsilons on "
                  "[0, 1] images.")
flags.DEFINE_list("attack", ["fgsm", "bim"],
                  "Comma-separated attacks: fgsm (one step of epsilon times the sign of the "
                  "gradient) and/or bim (the basic iterative method: --bim_steps clipped steps).")
flags.DEFINE_bool("untargeted", True,
                  "Run the untargeted attacks (away from the true class; the CSV's accuracy is "
                  "the paper's Fig. 3 left). --nountargeted with --targeted runs only those.")
flags.DEFINE_bool("targeted", False,
                  "Also run the targeted attacks (towards a wrong class; success rate = the "
                  "fraction of attacks classified as their target, the paper's Fig. 3 right).")
flags.DEFINE_enum("target_classes", "random", ["random", "all"],
                  "Targets of --targeted: 'random': one wrong class per image drawn with --seed "
                  "(the same expected success rate as 'all' at 1/9 of its cost on MNIST); "
                  "'all': every wrong class of every image, the paper's average over targets.")
flags.DEFINE_integer("bim_steps", 10, "Steps of BIM (the paper does not give them).",
                     lower_bound=1)
flags.DEFINE_float("bim_step_size", None,
                   "Size of each BIM step in --epsilon_units (default: 1.25 * epsilon / "
                   "--bim_steps at each epsilon, so that the steps add up to 1.25 epsilon as in "
                   "Kurakin et al. 2016).", lower_bound=0.0)
flags.DEFINE_integer("num_images", 1000, "How many test images to attack.", lower_bound=1)
flags.DEFINE_integer("first_image", 0,
                     "Test-set index of the first image: the images are first_image .. "
                     "first_image + num_images - 1, in the order of the test set.",
                     lower_bound=0)
flags.DEFINE_string("dataset_dir", None,
                    "Directory of the test data (default: the dataset_dir of --log_dir's "
                    "config.json, relative to the current directory).")
flags.DEFINE_integer("batch_size", 100, "Images per compiled gradient computation.",
                     lower_bound=1)
flags.DEFINE_integer("seed", 0, "Seed of the random targets of --target_classes=random.")
flags.DEFINE_integer("intra_op_threads", 0,
                     "TensorFlow intra-op threads (0: TensorFlow's default, one per core).",
                     lower_bound=0)
flags.DEFINE_integer("inter_op_threads", 0,
                     "TensorFlow inter-op threads (0: TensorFlow's default).", lower_bound=0)

flags.adopt_module_key_flags(tool_flags)
tool_flags.log_dir_help("the network to attack (a capsule network or the CNN of "
                        "--model=cnn)")

FLAGS = flags.FLAGS


def _floats(name, values):
    try:
        return [float(v) for v in values]
    except ValueError:
        raise app.UsageError(f"--{name} must be comma-separated numbers, got "
                             f"{','.join(values)}") from None


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    log_dir = tool_flags.required_log_dir()
    if not FLAGS.out:
        raise app.UsageError("--out is required: the directory of attacks.csv and attacks.png")
    if FLAGS.compare_checkpoint and not FLAGS.compare_log_dir:
        raise app.UsageError("--compare_checkpoint needs --compare_log_dir")
    epsilons = _floats("epsilons", FLAGS.epsilons)
    from capsem import attacks, step

    step.configure_threads(FLAGS.intra_op_threads, FLAGS.inter_op_threads)
    log_dirs = [log_dir] + ([FLAGS.compare_log_dir] if FLAGS.compare_log_dir else [])
    checkpoints = [FLAGS.checkpoint] + ([FLAGS.compare_checkpoint] if FLAGS.compare_log_dir
                                        else [])
    tool_flags.exit_on_error(
        attacks.run, log_dirs, FLAGS.out, checkpoints=checkpoints, epsilons=epsilons,
        epsilon_units=FLAGS.epsilon_units, attacks=FLAGS.attack, untargeted=FLAGS.untargeted,
        targeted=FLAGS.targeted, target_classes=FLAGS.target_classes,
        bim_steps=FLAGS.bim_steps, bim_step_size=FLAGS.bim_step_size,
        num_images=FLAGS.num_images, first_image=FLAGS.first_image,
        dataset_dir=FLAGS.dataset_dir, batch_size=FLAGS.batch_size, seed=FLAGS.seed,
        overwrite=FLAGS.overwrite, log=lambda line: print(line, flush=True))


if __name__ == "__main__":
    app.run(main)
