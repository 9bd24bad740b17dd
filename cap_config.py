"""Model and training flags of train.py (the article's cap_config.py).

Importing this module defines the flags; `config_from_flags` turns the parsed
flags into a `capsem.training.TrainConfig` (library code never reads FLAGS).
"""

import dataclasses
import os

from absl import flags
from absl import logging as _absl_logging  # noqa: F401  (defines --log_dir)

import mnist_config

# --- model ---------------------------------------------------------------
flags.DEFINE_enum(
    "model", "capsules", ["capsules", "cnn"],
    "Network to train: 'capsules' (the capsule network of --A..--D, spread loss) or 'cnn' "
    "(the paper's baseline CNN, Sec. 5: 5x5 convolutions of 32 and 64 channels, each with "
    "2x2 max pooling, a fully connected layer of 1024 units with dropout, softmax "
    "cross-entropy loss; capsem.baseline). The CNN ignores the capsule and routing settings; "
    "the optimizer, schedule, data, checkpoints and summaries are the same. A --log_dir "
    "keeps the model it was trained with.")
flags.DEFINE_integer("A", 32, "Channels of ReLU Conv1 (the article: 32).", lower_bound=1)
flags.DEFINE_integer("B", 32, "Capsule types of PrimaryCaps (the article: 32).", lower_bound=1)
flags.DEFINE_integer("C", 32, "Capsule types of ConvCaps1 (the article: 32).", lower_bound=1)
flags.DEFINE_integer("D", 32, "Capsule types of ConvCaps2 (the article: 32).", lower_bound=1)
flags.DEFINE_integer("iterations", None,
                     "EM routing iterations of every capsule layer (>= 1). Default: the "
                     "recipe's (article 3, paper 1).", lower_bound=1)
flags.DEFINE_bool(
    "stable_routing", False,
    "Guard EM routing's divisions by the summed assignments and by the variance (epsilon "
    "1e-9), which the article leaves unguarded: keeps losses and gradients finite when a "
    "parent capsule's votes agree exactly or all activations of a position are 0. Off by "
    "default, so that training computes exactly the article's numbers.")


# --- recipe: each setting below defaults to the recipe's value -------------------
# (enums repeat capsem.recipes / capsem.losses: flags are defined before TensorFlow
# may be imported.)
flags.DEFINE_enum(
    "recipe", "article", ["article", "paper"],
    "Training recipe (capsem.recipes): 'article' reproduces the article's code exactly; "
    "'paper' uses the paper's EM routing and schedule (README, Choosing a recipe). It sets "
    "--routing, --iterations, --final_lambda, --lambda_schedule, --lambda_start, "
    "--lambda_growth, --routing_cost, --variance_floor, --assignment_gradient, --batch_size, "
    "--transform_stddev, --margin_schedule, "
    "--margin_ramp_epochs, --learning_rate, --lr_decay_rate, --lr_decay_steps, "
    "--lr_decay_max_epochs, --lr_decay_min_epochs, --weight_decay, --ema_momentum, "
    "--ema_warmup, --random_shift, "
    "--random_shift_after_epochs, --random_rotation, --random_scale, --random_elastic, "
    "--elastic_sigma, --conv1_batch_norm and "
    "--conv1_padding wherever these are not given; config.json records the values used.")
flags.DEFINE_enum(
    "routing", None, ["article", "paper"],
    "EM routing: 'article' (the article's code: independent routing per position, cost "
    "normalised over the output capsules) or 'paper' (the paper's procedure, "
    "capsem.paper_routing: a variance floor; a child shared out over its parents at every "
    "position by the E-steps (--iterations >= 2) and, with --routing_cost=normalised, by "
    "the first assignments, whose data per parent that cost also normalises). Default: "
    "the recipe's (article / paper).")
flags.DEFINE_float("final_lambda", None,
                   "Paper routing: scale of the inverse temperature schedule "
                   "lambda_t = final_lambda * (1 - 0.95^(t+1)) (--lambda_schedule=iterations), "
                   "or the largest inverse temperature of the ramp. Default: the recipe's "
                   "(article 1.0; paper 0.5, with --D > 16 times 16/D: 0.25 for the article "
                   "network).")
flags.DEFINE_enum("lambda_schedule", None, ["iterations", "ramp"],
                  "Paper routing's inverse temperature: 'iterations' (final_lambda * "
                  "(1 - 0.95^(t+1)) at iteration t, constant through training; IBM's "
                  "implementation) or 'ramp' (min(final_lambda, lambda_start + lambda_growth "
                  "x epochs trained) at every iteration; YuxianMeng's). 'ramp' adds a "
                  "non-trainable weight to each capsule layer. Default: the recipe's (paper "
                  "ramp).")
flags.DEFINE_enum("routing_cost", None, ["normalised", "unnormalised"],
                  "Paper routing's M-step: 'normalised' (the data assigned to a parent "
                  "normalised, Gritzman 2019's pitfall 2; cost on log sigma) or "
                  "'unnormalised' (YuxianMeng's implementation: the paper's procedure 1 as "
                  "written, initial assignments 1/(all parents), cost on log sigma^2, "
                  "variance clamped at --variance_floor). Default: the recipe's (paper "
                  "unnormalised).")
flags.DEFINE_float("lambda_start", None,
                   "--lambda_schedule=ramp: the inverse temperature at step 0 (> 0). Default: "
                   "the recipe's (1e-3; paper recipe with --D > 16: times 16/D).")
flags.DEFINE_float("lambda_growth", None,
                   "--lambda_schedule=ramp: the inverse temperature's growth per epoch (>= 0). "
                   "Default: the recipe's (paper 0.3; with --D > 16: times 16/D).")
flags.DEFINE_float("variance_floor", None,
                   "Paper routing: added to every variance (a parent with one child must not "
                   "reach log 0). Default: the recipe's (paper 1e-2).")
flags.DEFINE_bool("assignment_gradient", None,
                  "Paper routing: let the gradient flow through the E-steps' assignments "
                  "(--noassignment_gradient treats them as constants). Default: the recipe's.")
flags.DEFINE_float("transform_stddev", None,
                   "Stddev of the truncated normal initializer of the transformation "
                   "matrices. Default: the recipe's (1.0, as the article).")
flags.DEFINE_bool("conv1_batch_norm", None,
                  "Batch normalisation between ReLU Conv1's convolution and its ReLU "
                  "(yl-1993's PyTorch code); changes the network's variables. Default: the "
                  "recipe's (off in both).")
flags.DEFINE_enum("conv1_padding", None, ["same", "valid"],
                  "ReLU Conv1's padding: 'same' (the article: a 14x14 grid for MNIST) or "
                  "'valid' (12x12, YuxianMeng's and yl-1993's PyTorch code); changes the "
                  "network's grids. Default: the recipe's (article same, paper valid).")
flags.DEFINE_enum("margin_schedule", None, ["article", "linear"],
                  "Spread-loss margin: 'article' (0.2, +0.1 per epoch, 0.9 after 7 epochs) or "
                  "'linear' (0.2 to 0.9 linearly over --margin_ramp_epochs, the paper). "
                  "Default: the recipe's (article / linear).")
flags.DEFINE_float("margin_ramp_epochs", None,
                   "Epochs of the linear margin ramp (--margin_schedule=linear). Default: the "
                   "recipe's (paper 7: 0.1 per epoch).")
flags.DEFINE_float("lr_decay_rate", None,
                   "Multiply the learning rate by this every --lr_decay_steps optimizer steps "
                   "(smoothly); 1: constant. Default: the recipe's (article 1, paper 0.1).")
flags.DEFINE_integer("lr_decay_steps", None,
                     "See --lr_decay_rate; 0: the whole run (the rate reaches --learning_rate x "
                     "--lr_decay_rate at the last step of --epochs or --max_steps). Default: "
                     "the recipe's (article 20000, paper 0).", lower_bound=0)
flags.DEFINE_float("lr_decay_max_epochs", None,
                   "With --lr_decay_steps=0: the decay spans the run, but at most this many "
                   "epochs (the rate goes on decaying at the same pace after them); 0: no "
                   "limit. Default: the recipe's (article 0, paper 7).", lower_bound=0)
flags.DEFINE_float("lr_decay_min_epochs", None,
                   "With --lr_decay_steps=0: the decay spans the run, but at least this many "
                   "epochs (a shorter run decays at the pace of a run this long, its rate "
                   "ending above --learning_rate x --lr_decay_rate); 0: none. Default: the "
                   "recipe's (article 0, paper 7).", lower_bound=0)
flags.DEFINE_integer("random_shift", None,
                     "Shift MNIST training images by up to this many pixels in each direction "
                     "(0: none). Default: the recipe's (article 0, paper 2).", lower_bound=0)
flags.DEFINE_float("random_rotation", None,
                   "Rotate MNIST training images by up to this many degrees about their "
                   "centre (0: none; 0 to 180). Default: the recipe's (article 0, paper 10).",
                   lower_bound=0, upper_bound=180)
flags.DEFINE_float("random_scale", None,
                   "Scale MNIST training images by a random factor in [1 - x, 1 + x] about "
                   "their centre (0: none; below 1). Default: the recipe's (article 0, paper "
                   "0.1).", lower_bound=0)
flags.DEFINE_float("random_elastic", None,
                   "Distort MNIST training images elastically (Simard et al. 2003): a random "
                   "displacement field smoothed by a Gaussian of --elastic_sigma pixels, times "
                   "this many pixels (their alpha; 0: none; up to 100). Default: the recipe's "
                   "(article 0, paper 0).", lower_bound=0, upper_bound=100)
flags.DEFINE_float("elastic_sigma", None,
                   "With --random_elastic: the smoothing Gaussian's standard deviation in "
                   "pixels (0.5 to 20). Default: the recipe's (4, Simard et al. 2003's).",
                   lower_bound=0.5, upper_bound=20)
flags.DEFINE_integer("random_shift_after_epochs", None,
                     "With --random_shift, --random_rotation, --random_scale or "
                     "--random_elastic: the first this "
                     "many epochs train on the images as they are, the augmentation starts "
                     "after them (0: from the first step). Default: the recipe's (article 0, "
                     "paper 1).", lower_bound=0)

# --- training --------------------------------------------------------------
flags.DEFINE_integer("batch_size", None,
                     "Training batch size. Default: the recipe's (article 24, paper 32). With "
                     "--distribute it is the GLOBAL "
                     "batch: split over all replicas of all workers, the step's loss and "
                     "gradients are summed over all of it.", lower_bound=1)
flags.DEFINE_enum("distribute", "none", ["none", "mirrored", "multi_worker"],
                  "Train on several devices or machines (README, Training on several devices "
                  "or machines): 'none' (one device), 'mirrored' (tf.distribute."
                  "MirroredStrategy over this machine's GPUs, else its CPU devices) or "
                  "'multi_worker' (tf.distribute.MultiWorkerMirroredStrategy over the "
                  "processes that TF_CONFIG lists; every process runs the same command, the "
                  "chief writes --log_dir, which must be shared to resume).")
flags.DEFINE_integer("eval_batch_size", 100, "Evaluation batch size.", lower_bound=1)
flags.DEFINE_integer("test_crops", 1,
                     "Evaluation averages the class activations over this many crops of each "
                     "test image, the paper's multi-crop test (Sec. 5). smallNORB: 32x32 crops "
                     "of the 48x48 resized image: the centre, then the four corners, then the "
                     "four edge midpoints (offsets 0, 8, 16). MNIST, Fashion-MNIST: copies of "
                     "the image shifted by up to one pixel in the same order (the image, the "
                     "four diagonal shifts, the four others). 1: the centre crop, the image. "
                     "Each crop costs one forward pass.", lower_bound=1, upper_bound=9)
flags.DEFINE_float("learning_rate", None,
                   "Adam learning rate. Default: the recipe's (article 1e-3, paper 2e-2).")
flags.DEFINE_float("adam_epsilon", 1e-8,
                   "Adam epsilon (TF1's AdamOptimizer default 1e-8, which the article uses; "
                   "Keras' default would be 1e-7).")
flags.DEFINE_float("weight_decay", None,
                   "Decoupled weight decay (AdamW): each step multiplies the convolution kernels "
                   "and the transformation matrices by (1 - weight_decay x learning rate); "
                   "biases, beta_v, beta_a and batch normalisation are not decayed. 0: none. "
                   "A new value takes effect when a run resumes. Default: the recipe's "
                   "(article 0, paper 1e-2).", lower_bound=0)
flags.DEFINE_float("ema_momentum", None,
                   "0: none. In (0, 1): the run also keeps an exponential moving "
                   "average of the weights (Polyak averaging; horizon about 1 / (1 - "
                   "ema_momentum) steps), saved in the checkpoints; the evaluations, "
                   "--mode=eval (give --ema_momentum=0 there for the trained weights), "
                   "export.py, predict.py, visualize.py, attack.py and viewpoints.py use the "
                   "average. A run cannot switch it on or off when it resumes. Default: the "
                   "recipe's (article 0, paper 0.999; 0 with --distribute).", lower_bound=0)
flags.DEFINE_boolean("ema_warmup", None,
                     "With --ema_momentum > 0: the n-th update of the average uses the momentum "
                     "min(ema_momentum, (1 + n) / (10 + n)), the warm-up of TF1's "
                     "ExponentialMovingAverage(num_updates), so that the average of a short run "
                     "holds the last steps' weights, not the initial ones (docs/results.md "
                     "3.17). A new value takes effect when a run resumes. Default: the recipe's "
                     "(article false, paper true).")
flags.DEFINE_float("clip_norm", 4.0,
                   "Clip each variable's gradient separately to this L2 norm, as the article's "
                   "slim train op (clip_gradient_norm=4.0); 0 disables clipping.")
flags.DEFINE_integer("epochs", 10,
                     "Stop after this many epochs (0: no limit). The margin reaches 0.9 after "
                     "7 epochs.", lower_bound=0)
flags.DEFINE_integer("max_steps", 0, "Stop at this global step (0: no limit).", lower_bound=0)
flags.DEFINE_integer("seed", 12345, "Seed of the initial weights and of the data order.")
flags.DEFINE_bool("deterministic", False,
                  "Bit-identical reruns and resumes: the same --seed and the same thread "
                  "settings (--intra_op_threads, --inter_op_threads; 0 means one per core) "
                  "give the same weights bit for bit (README, Failure and recovery). Turns "
                  "on TensorFlow's op determinism and turns off its oneDNN kernels "
                  "(TF_ENABLE_ONEDNN_OPTS=0), whose results can change from run to run.")
flags.DEFINE_integer("micro_batch_size", None,
                     "Split each batch into micro-batches of this size and sum their "
                     "gradients (the same gradient with less memory); default: the fast "
                     "setting of capsem.step.TrainStep.", lower_bound=1)
flags.DEFINE_bool("jit_compile", True,
                  "Run the training and evaluation steps as compiled TensorFlow graphs (with "
                  "--routing_kernels=xla: EM routing in XLA kernels); --nojit_compile: no XLA.")
flags.DEFINE_enum("routing_kernels", "auto", ["auto", "native", "xla"],
                  "EM routing kernels: 'auto' (default: 'native' where every training device "
                  "is a CPU, 'xla' on GPUs), 'native' (C++ CPU ops of capsem.native, compiled "
                  "with the machine's C++ compiler on first use; falls back to 'xla' with a "
                  "warning where they cannot be built; an error on a GPU) or 'xla' (blocked "
                  "XLA kernels, any device). The numbers agree to float32 rounding.")
flags.DEFINE_integer("intra_op_threads", 0,
                     "TensorFlow intra-op threads (capsem.step.configure_threads); 0: "
                     "TensorFlow's default, one per core (the native routing kernels split "
                     "each layer's routing over them).",
                     lower_bound=0)
flags.DEFINE_integer("inter_op_threads", 0,
                     "TensorFlow inter-op threads: operations (EM routing kernels) run "
                     "concurrently; 0: TensorFlow's default (the number of cores).",
                     lower_bound=0)
flags.DEFINE_integer("max_bad_steps", 10,
                     "Stop with an error after this many consecutive steps with a non-finite "
                     "loss or gradient (such steps are skipped and counted).", lower_bound=1)

# --- logging, summaries, checkpoints --------------------------------------------
# absl.logging defines --log_dir already (for log files it only writes when asked to);
# capsem uses that flag as its run directory, with its own help text.
flags.FLAGS["log_dir"].help = (
    "Directory of checkpoints, TensorBoard summaries and the saved flags (config.json) "
    "(default: logs/<dataset>). Re-running with the same --log_dir resumes.")
flags.DEFINE_integer("log_every_steps", 10,
                     "Log a progress line at most every this many steps (at multiples of it), "
                     "and at least --log_every_secs apart: every 10 steps or 10 s, whichever is "
                     "later, by default. The first and the last step always get one.",
                     lower_bound=1)
flags.DEFINE_float("log_every_secs", 10.0,
                   "Minimum seconds between two progress lines (see --log_every_steps); 0: a "
                   "line every --log_every_steps steps, however fast.", lower_bound=0.0)
flags.DEFINE_float("summary_secs", 60.0, "Write TensorBoard scalars every this many seconds.",
                   lower_bound=0.0)
flags.DEFINE_float("histogram_secs", 600.0,
                   "Write TensorBoard histograms (activations, votes, routing assignments of "
                   "every capsule layer) and pictures (capsem.visualize.write_image_summaries) "
                   "every this many seconds.", lower_bound=0.0)
flags.DEFINE_float("checkpoint_secs", 600.0, "Save a checkpoint every this many seconds.",
                   lower_bound=0.0)
flags.DEFINE_integer("keep_checkpoints", 2, "How many recent checkpoints to keep.",
                     lower_bound=1)
flags.DEFINE_bool("eval_every_epoch", True,
                  "Evaluate on the full test set after every epoch.")
flags.DEFINE_bool("allow_config_change", False,
                  "Resume a --log_dir whose config.json has other values of settings that "
                  "change what is computed (iterations, routing, recipe, batch size, seed, "
                  "clip norm, ...): each change is logged and recorded in config.json with the "
                  "step where it began. Without it such a resume stops with an error listing "
                  "the differences. The architecture (--A..--D, --dataset) can never change.")


# Settings a recipe decides are None when not given; given, they must be > 0.
for _name in ("learning_rate", "final_lambda", "variance_floor", "transform_stddev",
              "margin_ramp_epochs", "lambda_start"):
    flags.register_validator(_name, lambda value: value is None or value > 0,
                             message=f"--{_name} must be > 0")


@flags.validator("lr_decay_rate", message="--lr_decay_rate must be in (0, 1] (1: no decay)")
def _decay(value):
    return value is None or 0 < value <= 1


@flags.validator("lambda_growth", message="--lambda_growth must be >= 0")
def _growth(value):
    return value is None or value >= 0


@flags.validator("adam_epsilon", message="--adam_epsilon must be > 0")
def _positive_eps(value):
    return value > 0


@flags.validator("clip_norm", message="--clip_norm must be >= 0 (0 disables clipping)")
def _clip(value):
    return value >= 0


def config_from_flags(values):
    """Builds a `capsem.training.TrainConfig` from parsed flags."""
    from capsem.training import TrainConfig  # imports TensorFlow: only after parsing

    data_source, dataset_dir = mnist_config.resolve_data_flags(values)
    return TrainConfig.from_recipe(
        values.recipe,
        routing=values.routing, iterations=values.iterations, final_lambda=values.final_lambda,
        lambda_schedule=values.lambda_schedule, lambda_start=values.lambda_start,
        lambda_growth=values.lambda_growth, routing_cost=values.routing_cost,
        transform_stddev=values.transform_stddev, variance_floor=values.variance_floor,
        assignment_gradient=values.assignment_gradient, margin_schedule=values.margin_schedule,
        margin_ramp_epochs=values.margin_ramp_epochs, learning_rate=values.learning_rate,
        lr_decay_rate=values.lr_decay_rate, lr_decay_steps=values.lr_decay_steps,
        lr_decay_max_epochs=values.lr_decay_max_epochs,
        lr_decay_min_epochs=values.lr_decay_min_epochs, weight_decay=values.weight_decay,
        ema_momentum=values.ema_momentum, ema_warmup=values.ema_warmup,
        random_shift=values.random_shift,
        random_shift_after_epochs=values.random_shift_after_epochs,
        random_rotation=values.random_rotation, random_scale=values.random_scale,
        random_elastic=values.random_elastic, elastic_sigma=values.elastic_sigma,
        conv1_batch_norm=values.conv1_batch_norm,
        conv1_padding=values.conv1_padding,
        model=values.model, dataset=values.dataset, data_source=data_source,
        dataset_dir=dataset_dir, smallnorb_split=values.smallnorb_split,
        eval_viewpoints=values.eval_viewpoints, test_crops=values.test_crops,
        download=values.download,
        source_dir=values.source_dir if data_source == "tfrecord" else None,
        log_dir=values.log_dir or os.path.join("logs", values.dataset),
        batch_size=values.batch_size, eval_batch_size=values.eval_batch_size,
        A=values.A, B=values.B, C=values.C, D=values.D,
        adam_epsilon=values.adam_epsilon,
        clip_norm=values.clip_norm, epochs=values.epochs, max_steps=values.max_steps,
        seed=values.seed, deterministic=values.deterministic,
        stable_routing=values.stable_routing, micro_batch_size=values.micro_batch_size,
        jit_compile=values.jit_compile, routing_kernels=values.routing_kernels,
        log_every_steps=values.log_every_steps, log_every_secs=values.log_every_secs,
        summary_secs=values.summary_secs, histogram_secs=values.histogram_secs,
        checkpoint_secs=values.checkpoint_secs, keep_checkpoints=values.keep_checkpoints,
        eval_every_epoch=values.eval_every_epoch, max_bad_steps=values.max_bad_steps,
        allow_config_change=values.allow_config_change, distribute=values.distribute)


def explicit_settings(values):
    """The names of the TrainConfig fields whose flags the user gave on the command line."""
    from capsem.training import TrainConfig

    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    given = {name for name in fields if name in values and values[name].present}
    if "dataset_dir" in values and values["dataset_dir"].present:
        given.add("dataset_dir")
    return given
