"""Sets the step of a run's latest checkpoint, to time what train.py does near a given step.

    python docs/move_checkpoint.py LOG_DIR STEP [train.py flags of the run]

Restores the run in LOG_DIR (as train.py would, with the same flags), sets its global step
to STEP and saves a checkpoint `ckpt-STEP`; re-running train.py on LOG_DIR then resumes at
STEP with the run's weights. Used by docs/data_pipeline.md to measure the end of epoch 1
(step 2500 at batch 24) of the issue's network without training 2500 steps first.
"""
import os
import sys

sys.path.insert(0, os.getcwd())  # the capsem of the working directory (old or new code)

from absl import app, flags  # noqa: E402

import cap_config  # noqa: E402,F401  (defines train.py's flags)

FLAGS = flags.FLAGS


def main(argv):
    log_dir, step = argv[1], int(argv[2])
    from capsem import training
    config = cap_config.config_from_flags(FLAGS)
    config = training.dataclasses.replace(config, log_dir=log_dir)
    num_train, _ = training.prepare_data(config)
    trainer = training._Trainer(config, num_train)
    trainer.setup()
    trainer.global_step.assign(step)
    print("saved", trainer.manager.save(checkpoint_number=step))


if __name__ == "__main__":
    app.run(main)
