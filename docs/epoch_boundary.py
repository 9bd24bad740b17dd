"""The epoch-boundary cost of the MNIST TFRecord pipeline, old against new (docs/data_pipeline.md).

    python docs/epoch_boundary.py [--old_rev e929fe1] [--epochs 3] [--step_secs 0]

Converts the bundled MNIST (data/mnist) into a temporary dataset directory, then, in one
fresh process per implementation (the `capsem/datasets.py` of commit --old_rev, read with
`git show`, and the working tree's), does what `train.py` does with the training data:
checks the two splits once (`validate_tfrecord` / `read_image_tfrecord`), then for each
epoch builds the training pipeline (`make_dataset(..., training=True, seed=12345 + epoch)`,
batch 24, the global seed set as `train.py` sets it), takes every batch (sleeping
--step_secs after each one, as a training step would take time) and reaches the end of
the iterator. It prints, per implementation, the start-up check; per epoch boundary the
end of the previous iterator, building the next pipeline and its first batch, in seconds;
the wall and CPU time of each pass and the peak resident memory; and whether both
implementations gave the same batches in the same order (a sha256 per batch of images and
labels).
"""

import argparse
import hashlib
import importlib.util
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def _load_datasets(source):
    """The capsem.datasets module of `source`: a file path, or None for the working tree's."""
    if source is None:
        from capsem import datasets
        return datasets
    spec = importlib.util.spec_from_file_location("old_datasets", source)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def measure(args):
    """One implementation in this process; prints one JSON line."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras

    datasets = _load_datasets(args.module)
    keras.utils.set_random_seed(12345)  # as train.py does (capsem.training._Trainer.setup)
    start = time.perf_counter()
    for split in ("train", "test"):  # capsem.training.prepare_data
        path = os.path.join(args.dataset_dir, f"mnist_{split}.tfrecord")
        if hasattr(datasets, "read_image_tfrecord"):
            datasets.read_image_tfrecord(path, (28, 28, 1), 10, log=lambda line: None)
        else:
            datasets.validate_tfrecord(path, expected_shape=(28, 28, 1))
    result = {"module": args.module or "working tree", "startup_check": time.perf_counter() - start,
              "end": [], "build": [], "first_batch": [], "pass": [], "pass_cpu": []}
    digests = []
    build_start = time.perf_counter()
    ds = None
    for epoch in range(args.epochs):
        ds = datasets.make_dataset("mnist", "train", dataset_dir=args.dataset_dir,
                                   batch_size=24, training=True, seed=12345 + epoch)
        built = time.perf_counter()
        iterator = iter(ds)
        images, labels = next(iterator)
        first = time.perf_counter()
        if epoch:
            result["build"].append(built - build_start)
            result["first_batch"].append(first - built)
        cpu = time.process_time()
        batches = 0
        while True:
            digests.append(hashlib.sha256(images.numpy().tobytes()
                                          + labels.numpy().tobytes()).hexdigest())
            batches += 1
            if args.step_secs:
                time.sleep(args.step_secs)
            last = time.perf_counter()
            try:
                images, labels = next(iterator)
            except StopIteration:
                break
        del iterator
        build_start = time.perf_counter()
        result["end"].append(build_start - last)
        result["pass"].append(build_start - first)
        result["pass_cpu"].append(time.process_time() - cpu)
        result["batches"] = batches
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result["order_sha256"] = hashlib.sha256("".join(digests).encode()).hexdigest()
    result["boundary"] = [e + b + f for e, b, f in
                          zip(result["end"], result["build"], result["first_batch"])]
    print(json.dumps(result), flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--old_rev", default="e929fe1",
                        help="git revision of the old capsem/datasets.py")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--step_secs", type=float, default=0.0,
                        help="seconds slept after each batch (a training step's time)")
    parser.add_argument("--module", help=argparse.SUPPRESS)
    parser.add_argument("--dataset_dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.dataset_dir:
        measure(args)
        return

    from capsem import datasets

    with tempfile.TemporaryDirectory() as tmp:
        dataset_dir = os.path.join(tmp, "mnist")
        start = time.perf_counter()
        datasets.convert_mnist(os.path.join(REPO, "data", "mnist"), dataset_dir,
                               progress=lambda line: None)
        print(f"converted data/mnist into {dataset_dir} in {time.perf_counter() - start:.1f} s")
        old = os.path.join(tmp, "old_datasets.py")
        with open(old, "wb") as f:
            f.write(subprocess.run(["git", "show", f"{args.old_rev}:capsem/datasets.py"],
                                   cwd=REPO, check=True, capture_output=True).stdout)
        results = {}
        for name, module in ((f"old ({args.old_rev})", old), ("new (working tree)", None)):
            command = [sys.executable, os.path.abspath(__file__), f"--dataset_dir={dataset_dir}",
                       f"--epochs={args.epochs}", f"--step_secs={args.step_secs}"]
            if module:
                command.append(f"--module={module}")
            out = subprocess.run(command, cwd=REPO, check=True, capture_output=True, text=True)
            results[name] = json.loads(out.stdout.strip().splitlines()[-1])

    def seconds(values):
        return ", ".join(f"{v:.3f}" for v in values)

    for name, r in results.items():
        print(f"{name}: start-up check {r['startup_check']:.2f} s; {r['batches']} batches per "
              f"epoch; per epoch boundary: end of iterator {seconds(r['end'][:-1])}, build "
              f"{seconds(r['build'])}, first batch {seconds(r['first_batch'])}, total "
              f"{seconds(r['boundary'])} s; a pass {seconds(r['pass'])} s wall, "
              f"{seconds(r['pass_cpu'])} s CPU; peak RSS {r['peak_rss_mb']:.0f} MB")
    orders = {r["order_sha256"] for r in results.values()}
    print("same batches in the same order:", "yes" if len(orders) == 1 else "NO")


if __name__ == "__main__":
    main()
