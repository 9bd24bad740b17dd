"""What export.py, predict.py and visualize.py share: --log_dir, --checkpoint and errors.

Each tool adopts these flags (`flags.adopt_module_key_flags(tool_flags)`, so that
`--help` lists them), calls `log_dir_help` with what the run's network is used for,
checks them with `required_log_dir` and runs its work through `exit_on_error`, which
prints a capsem error as one `error: ...` line and exits with status 1.
"""

import sys

from absl import app, flags
from absl import logging as _absl_logging  # noqa: F401  (defines --log_dir)

flags.DEFINE_string("checkpoint", None,
                    "Checkpoint prefix to use (e.g. logs/mnist/ckpt-2500; default: the latest "
                    "in --log_dir).")
flags.declare_key_flag("log_dir")


def log_dir_help(what):
    """Sets the help of --log_dir (absl's flag) to what it means for a tool."""
    flags.FLAGS["log_dir"].help = (f"The log_dir of a train.py run (its config.json and "
                                   f"checkpoints): {what}. Required.")


def required_log_dir():
    """--log_dir, or a usage error."""
    if not flags.FLAGS.log_dir:
        raise app.UsageError("--log_dir is required: the log_dir of a train.py run")
    return flags.FLAGS.log_dir


def exit_on_error(fn, *args, **kwargs):
    """`fn(*args, **kwargs)`; a `capsem.errors.CapsemError` is one `error:` line and exit 1."""
    from capsem.errors import CapsemError

    try:
        return fn(*args, **kwargs)
    except CapsemError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
