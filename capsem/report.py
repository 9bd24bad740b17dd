"""Tables and plots of training runs from their TensorBoard event files.

    python -m capsem.report LOG_DIR [LOG_DIR ...] [--plot curves.png] [--markdown]

prints, for every run, its test accuracy after each evaluation (with the
epoch, the step and the wall time since the run's first event) and, with
`--plot`, writes a PNG of the test accuracy and the training loss against the
step, one curve per run; with `--activity`, how many capsules of each layer
are off (activation below 0.05) or on (above 0.95) in the run's activation
histograms (`capsem.diagnostics`, written every `--histogram_secs` on 4
training images); with `--routing`, how many children each routing layer
gives to one parent (an assignment above 0.5) in its routing histograms. The numbers in docs/results.md are made this way.
"""

import argparse
import glob
import json
import os
import sys

import numpy as np

#: Scalars read from the event files.
TAGS = ("test/accuracy", "test/loss", "train/loss", "train/accuracy", "train/margin",
        "train/learning_rate")


#: Prefix of the activation histograms (`capsem.diagnostics.capsule_details`).
ACTIVATION_PREFIX = "activations/"

#: An activation below OFF counts as off, above ON as on (`activity`).
OFF, ON = 0.05, 0.95

#: Prefix of the routing histograms: each layer's assignments of its last EM
#: iteration (`capsem.diagnostics.capsule_details`).
ROUTING_PREFIX = "routing/"

#: An assignment above DOMINANT gives its child to one parent (`dominance`).
DOMINANT = 0.5


class ReportError(Exception):
    """A log_dir without event files or with unreadable ones."""


def _read_events(log_dir, take):
    """Calls `take(event, value, tf)` for every summary value of the event files in `log_dir`.

    Raises:
      ReportError: no event file in `log_dir`, or one that cannot be read
        (`take`'s errors included).
    """
    import tensorflow as tf  # slow to import: only when reading

    paths = sorted(glob.glob(os.path.join(log_dir, "events.out.tfevents.*")))
    if not paths:
        raise ReportError(f"{log_dir}: no TensorBoard event files (events.out.tfevents.*); "
                          f"pass the --log_dir of a training run")
    for path in paths:
        try:
            for record in tf.data.TFRecordDataset(path):
                event = tf.compat.v1.Event.FromString(record.numpy())
                for value in event.summary.value:
                    take(event, value, tf)
        except tf.errors.DataLossError:
            # A run killed mid-write leaves a truncated last record: keep what was read.
            continue
        except Exception as e:  # noqa: BLE001 - name the file whatever went wrong
            raise ReportError(f"{path}: cannot read ({e})") from None


def read_scalars(log_dir, tags=TAGS):
    """The scalars of the event files in `log_dir`.

    Returns:
      a dict `{tag: [(step, wall_time, value), ...]}` sorted by step (a step
      written twice, e.g. by a resumed run, keeps its last value).

    Raises:
      ReportError: no event file in `log_dir`, or one that cannot be read.
    """
    found = {tag: {} for tag in tags}

    def take(event, value, tf):
        if value.tag not in found:
            return
        if value.HasField("tensor"):
            number = float(tf.make_ndarray(value.tensor))
        else:
            number = float(value.simple_value)
        found[value.tag][int(event.step)] = (event.wall_time, number)

    _read_events(log_dir, take)
    return {tag: sorted((step, t, v) for step, (t, v) in values.items())
            for tag, values in found.items()}


def read_histograms(log_dir, prefix=ACTIVATION_PREFIX):
    """The histograms of the event files in `log_dir` whose tag starts with `prefix`.

    Returns:
      a dict `{tag: [(step, buckets), ...]}` sorted by step, `buckets` an array
      `(k, 3)` of (left edge, right edge, count), as `tf.summary.histogram`
      writes them (a step written twice keeps its last histogram).

    Raises:
      ReportError: as `read_scalars`.
    """
    found = {}

    def take(event, value, tf):
        if not value.tag.startswith(prefix) or not value.HasField("tensor"):
            return
        buckets = tf.make_ndarray(value.tensor)
        if buckets.ndim == 2 and buckets.shape[1] == 3:
            found.setdefault(value.tag, {})[int(event.step)] = buckets

    _read_events(log_dir, take)
    return {tag: sorted(values.items(), key=lambda x: x[0]) for tag, values in found.items()}


def _shares(buckets):
    """`(centres, shares)` of a histogram's buckets (None if it is empty).

    Each bucket counts by its centre: the buckets of `tf.summary.histogram`
    span the values' range in 30 equal parts, a 1/30 resolution for values in
    [0, 1].
    """
    buckets = np.asarray(buckets, np.float64)
    total = buckets[:, 2].sum()
    if total <= 0:
        return None
    return (buckets[:, 0] + buckets[:, 1]) / 2.0, buckets[:, 2] / total


def activity(buckets, off=OFF, on=ON):
    """The share of values below `off` and above `on`, and the mean, of one histogram.

    Buckets count by their centre (`_shares`).

    Returns:
      `{"off": share, "on": share, "mean": mean}`; None for an empty histogram.
    """
    found = _shares(buckets)
    if found is None:
        return None
    centres, shares = found
    return {"off": float(shares[centres < off].sum()), "on": float(shares[centres > on].sum()),
            "mean": float((shares * centres).sum())}


def dominance(buckets, parents, dominant=DOMINANT):
    """The share of children given to one parent, from a histogram of assignments.

    In the article's routing the assignments of a child at one output
    position sum to 1 over that position's `parents` (O) output capsules, so
    at most one of them exceeds 0.5 and the histogram holds O values per
    (child, position): the share of (child, position) pairs with an
    assignment above `dominant` is `O * (values above it) / values` (buckets
    counted by their centre, `_shares`). Uniform assignments are 1/O; a share
    near 1 means near one-hot routing. (In the paper routing a child is
    shared out over several positions, so this counts the pairs that hold a
    child's dominant parent, a lower bound of the children's share.)

    Returns:
      the share (float in [0, 1]); None for an empty histogram.
    """
    found = _shares(buckets)
    if found is None:
        return None
    centres, shares = found
    return float(min(1.0, parents * shares[centres > dominant].sum()))


def routing_parents(config):
    """`{layer: O}` of a `capsules_net` run, from its config.json (`{}` if unknown)."""
    if "C" not in config or "D" not in config:
        return {}
    parents = {"conv_caps1": int(config["C"]), "conv_caps2": int(config["D"])}
    from capsem.datasets import DATASETS  # imports TensorFlow: only when asked

    info = DATASETS.get(config.get("dataset"))
    if info is not None:  # a tfds dataset's class count is not recorded
        parents["class_capsules"] = int(info.num_classes)
    return parents


def _format_layers(title, histograms, prefix, cell, width, rows, label=str):
    """A table of `cell(layer, buckets)` per layer (columns headed `label(layer)`)."""
    layers = sorted(histograms)
    steps = sorted({step for tag in layers for step, _ in histograms[tag]})
    shown = steps[::max(1, -(-len(steps) // rows))]
    if steps[-1] not in shown:
        shown.append(steps[-1])
    names = [tag[len(prefix):] for tag in layers]
    lines = [title, "  step    " + "".join(f"{label(name):>{width}}" for name in names)]
    by_step = {tag: dict(histograms[tag]) for tag in layers}
    for step in shown:
        cells = []
        for tag, name in zip(layers, names):
            buckets = by_step[tag].get(step)
            value = cell(name, buckets) if buckets is not None else None
            cells.append("-" if value is None else value)
        lines.append(f"  {step:<8d}" + "".join(f"{c:>{width}}" for c in cells))
    return "\n".join(lines) + "\n"


def format_routing(log_dir, histograms, parents, rows=8):
    """Per routing layer, the share of children given to one parent at up to `rows` steps."""
    known = {tag: h for tag, h in histograms.items() if tag[len(ROUTING_PREFIX):] in parents}
    if not known:
        return f"{log_dir}: no routing histograms of known layers\n"

    def cell(name, buckets):
        share = dominance(buckets, parents[name])
        return None if share is None else f"{share:.2f}"

    return _format_layers(f"{log_dir}: children with an assignment above {DOMINANT} (near "
                          f"one-hot routing; uniform is 1/O)", known, ROUTING_PREFIX, cell,
                          26, rows, label=lambda name: f"{name} (O={parents[name]})")


def format_activity(log_dir, histograms, rows=8):
    """Per layer, the share of capsules off and on at up to `rows` steps."""
    if not histograms:
        return f"{log_dir}: no activation histograms\n"

    def cell(name, buckets):
        share = activity(buckets)
        return None if share is None else (
            f"{share['off']:.2f} / {share['on']:.2f} / {share['mean']:.2f}")

    return _format_layers(f"{log_dir}: capsules off (activation < {OFF}) / on (> {ON}) / "
                          f"mean activation", histograms, ACTIVATION_PREFIX, cell, 22, rows)


def run_summary(log_dir):
    """What a report shows of one run: its config, test accuracies and times."""
    scalars = read_scalars(log_dir)
    config = {}
    path = os.path.join(log_dir, "config.json")
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    times = [t for values in scalars.values() for _, t, _ in values]
    start = min(times) if times else 0.0
    steps_per_epoch = None
    if config.get("batch_size"):
        # The MNIST-like datasets have 60000 training images; others: steps only.
        num_train = {"mnist": 60000, "fashion_mnist": 60000}.get(config.get("dataset"))
        if num_train:
            steps_per_epoch = -(-num_train // int(config["batch_size"]))
    tests = [{"step": step, "epoch": step / steps_per_epoch if steps_per_epoch else None,
              "minutes": (t - start) / 60.0, "accuracy": acc}
             for step, t, acc in scalars["test/accuracy"]]
    return {"log_dir": log_dir, "config": config, "tests": tests, "scalars": scalars}


def format_table(summaries, markdown=False):
    """The test accuracies of several runs as text (or a markdown table)."""
    lines = []
    for s in summaries:
        c = s["config"]
        what = ", ".join(f"{k}={c[k]}" for k in ("recipe", "routing", "A", "B", "C", "D",
                                                 "batch_size", "seed") if k in c)
        lines.append(f"{s['log_dir']}" + (f" ({what})" if what else ""))
        if markdown:
            lines += ["", "| epoch | step | test accuracy | minutes |", "|---|---|---|---|"]
        for t in s["tests"]:
            epoch = f"{t['epoch']:.2f}" if t["epoch"] is not None else "-"
            if markdown:
                lines.append(f"| {epoch} | {t['step']} | {t['accuracy']:.4f} | "
                             f"{t['minutes']:.1f} |")
            else:
                lines.append(f"  epoch {epoch:>6}  step {t['step']:>7d}  test accuracy "
                             f"{t['accuracy']:.4f}  ({t['minutes']:.1f} min)")
        if not s["tests"]:
            lines.append("  (no test evaluation yet)")
        lines.append("")
    return "\n".join(lines)


def plot(summaries, path, smooth=20):
    """Writes a PNG: test accuracy and (smoothed) training loss against the step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(12, 4.5))
    for s in summaries:
        label = os.path.basename(os.path.normpath(s["log_dir"]))
        tests = s["tests"]
        if tests:
            ax_acc.plot([t["step"] for t in tests], [t["accuracy"] for t in tests], "o-",
                        label=label)
        loss = s["scalars"]["train/loss"]
        if loss:
            steps = np.array([x[0] for x in loss])
            values = np.array([x[2] for x in loss])
            window = max(1, min(smooth, len(values) // 10))  # short runs: little smoothing
            if window > 1:
                values = np.convolve(values, np.ones(window) / window, mode="valid")
                steps = steps[window - 1:]
            ax_loss.plot(steps, values, label=label)
    ax_acc.set(xlabel="step", ylabel="test accuracy", title="Test accuracy")
    ax_acc.grid(True, alpha=0.3)
    ax_loss.set(xlabel="step", ylabel="train/loss (per example; older runs: batch sum)",
                yscale="log",
                title=f"Training loss (moving average of up to {smooth} summaries)")
    ax_loss.grid(True, alpha=0.3)
    for ax in (ax_acc, ax_loss):
        if ax.lines:
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m capsem.report",
        description="Test accuracy per evaluation of training runs (from their TensorBoard "
                    "event files), and a PNG of the curves.")
    parser.add_argument("log_dirs", nargs="+", metavar="LOG_DIR",
                        help="the --log_dir of one or more training runs")
    parser.add_argument("--plot", metavar="PNG",
                        help="write the test accuracy and training loss curves to this PNG "
                             "(an existing file is not replaced unless --overwrite)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing --plot file")
    parser.add_argument("--markdown", action="store_true", help="print markdown tables")
    parser.add_argument("--activity", action="store_true",
                        help=f"also print, per capsule layer, the share of activations below "
                             f"{OFF} (off) and above {ON} (on) and their mean, from the runs' "
                             f"activation histograms")
    parser.add_argument("--routing", action="store_true",
                        help=f"also print, per routing layer, the share of children whose "
                             f"largest assignment is above {DOMINANT} (near one-hot routing), "
                             f"from the runs' routing histograms")
    args = parser.parse_args(argv)
    if args.plot and os.path.exists(args.plot) and not args.overwrite:
        print(f"error: {args.plot} exists; pass --overwrite to replace it", file=sys.stderr)
        return 1
    try:
        summaries = [run_summary(d) for d in args.log_dirs]
    except ReportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(format_table(summaries, markdown=args.markdown))
    if args.activity:
        try:
            for d in args.log_dirs:
                print(format_activity(d, read_histograms(d)))
        except ReportError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
    if args.routing:
        try:
            for s in summaries:
                print(format_routing(s["log_dir"], read_histograms(s["log_dir"], ROUTING_PREFIX),
                                     routing_parents(s["config"])))
        except ReportError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
    if args.plot:
        plot(summaries, args.plot)
        print(f"wrote {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
