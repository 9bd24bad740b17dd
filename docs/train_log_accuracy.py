"""Training accuracy from train.py's progress lines: the mean of the logged accuracies
(each over the steps since the previous line) of the last 200 steps, at chosen steps.

    python docs/train_log_accuracy.py runs/NAME.log [--at 500,1000,2000,2500]

Used for the tables of docs/results.md, section 3.1.
"""
import argparse
import re

LINE = re.compile(r"step (\d+)/\d+ .* acc ([0-9.]+)")


def accuracy_at(path, steps, window=200):
    """{step: mean of the logged accuracies of the lines in (step - window, step]}."""
    points = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            m = LINE.search(line)
            if m:
                points.append((int(m.group(1)), float(m.group(2))))
    out = {}
    for step in steps:
        values = [a for s, a in points if step - window < s <= step]
        out[step] = sum(values) / len(values) if values else None
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("logs", nargs="+")
    parser.add_argument("--at", default="500,1000,2000,2500")
    args = parser.parse_args()
    steps = [int(s) for s in args.at.split(",")]
    for path in args.logs:
        values = accuracy_at(path, steps)
        print(path, " ".join(f"{s}:{'-' if v is None else f'{v:.2f}'}" for s, v in values.items()))


if __name__ == "__main__":
    main()
