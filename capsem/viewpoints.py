"""The paper's novel-viewpoint comparison (Sec. 5.1) of trained networks (`viewpoints.py`).

Given networks trained on the familiar viewpoints of smallNORB (`train.py
--dataset=smallnorb --smallnorb_split=azimuth|elevation`), typically a capsule
network and the baseline CNN (`--model=cnn`), `viewpoint_report` evaluates each on
the familiar and the novel viewpoints of the test split (`capsem.training.evaluate`
with `eval_viewpoints`), with the crops each was trained to be tested with
(`--test_crops` of its config.json unless given). The paper compares the two at
matched familiar accuracy (it stops the capsule network's training when its
familiar-viewpoint accuracy matches the CNN's): pick checkpoints with
`checkpoints` (`--checkpoint` / `--compare_checkpoint`) to match them.
"""

import dataclasses

from capsem import training
from capsem.errors import ConfigError

#: The viewpoints reported, in order.
REPORTED = ("familiar", "novel")


def viewpoint_report(log_dirs, checkpoints=None, dataset_dir=None, test_crops=None):
    """Test accuracy on familiar and novel viewpoints of each run of `log_dirs`.

    Args:
      log_dirs: log_dirs of smallNORB runs trained with the same novel-viewpoint
        split.
      checkpoints: None, or one checkpoint prefix (or None: the latest) per log_dir.
      dataset_dir: where the tfds data is (default: each run's config.json).
      test_crops: crops averaged at test time (default: each run's config.json).

    Returns:
      a list of dicts (one per run and viewpoint set): `log_dir`, `model`, `split`,
      `viewpoints`, `step`, `checkpoint`, `accuracy`, `error`, `examples`.

    Raises:
      ConfigError: a run that is not a smallNORB novel-viewpoint run, or runs with
        different splits.
      CheckpointError: a log_dir without config.json or checkpoint.
    """
    checkpoints = list(checkpoints or [None] * len(log_dirs))
    if len(checkpoints) != len(log_dirs):
        raise ConfigError(f"{len(checkpoints)} checkpoints for {len(log_dirs)} log_dirs")
    rows, splits = [], set()
    for log_dir, checkpoint in zip(log_dirs, checkpoints):
        config = training.run_config(log_dir)
        split = config.smallnorb_split
        if config.dataset != "smallnorb" or split == "standard":
            raise ConfigError(f"{log_dir} was trained with dataset={config.dataset}, "
                              f"smallnorb_split={split}; the report needs runs of "
                              f"--dataset=smallnorb --smallnorb_split=azimuth or elevation")
        splits.add(split)
        config = dataclasses.replace(
            config, dataset_dir=dataset_dir or config.dataset_dir,
            test_crops=test_crops or config.test_crops)
        for viewpoints in REPORTED:
            result = training.evaluate(dataclasses.replace(config, eval_viewpoints=viewpoints),
                                       checkpoint, explicit=("eval_viewpoints",))
            rows.append({"log_dir": log_dir, "model": config.model, "split": split,
                         "viewpoints": viewpoints, "step": result["step"],
                         "checkpoint": result["checkpoint"], "accuracy": result["accuracy"],
                         "error": 1.0 - result["accuracy"], "examples": result["examples"],
                         "test_crops": config.test_crops})
    if len(splits) > 1:
        raise ConfigError(f"the runs were trained on different splits ({', '.join(sorted(splits))})"
                          f": compare runs of one split")
    return rows


def format_report(rows):
    """The rows of `viewpoint_report` as a markdown table."""
    lines = ["| run | model | step | split | familiar error | novel error | test crops |",
             "|---|---|---|---|---|---|---|"]
    by_run = {}
    for row in rows:
        by_run.setdefault(row["log_dir"], {})[row["viewpoints"]] = row
    for log_dir, views in by_run.items():
        first = views["familiar"]
        lines.append(f"| {log_dir} | {first['model']} | {first['step']} | {first['split']} | "
                     f"{100 * views['familiar']['error']:.2f}% "
                     f"({views['familiar']['examples']}) | "
                     f"{100 * views['novel']['error']:.2f}% ({views['novel']['examples']}) | "
                     f"{first['test_crops']} |")
    return "\n".join(lines)
