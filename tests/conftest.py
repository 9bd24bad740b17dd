"""Shared helpers of capsem's tests."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
GOLDEN = os.path.join(DATA, "golden")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_golden(name):
    """Loads `tests/data/golden/<name>.npz` as a dict of arrays."""
    with np.load(os.path.join(GOLDEN, name + ".npz")) as f:
        return {k: f[k] for k in f.files}


def golden_weights(d, prefix=""):
    """`{tf1_name: array}` of a golden file with `variable_names`/`variable_keys`."""
    return {str(n): d[prefix + str(k)] for n, k in zip(d["variable_names"], d["variable_keys"])}


def assert_close(actual, ref, max_rel=1e-5, elem_rel=0.0, what=""):
    """Asserts |actual - ref| <= max_rel * max|ref| + elem_rel * |ref| element-wise."""
    actual = np.asarray(actual, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    assert actual.shape == ref.shape, f"{what}: shape {actual.shape} != reference {ref.shape}"
    assert np.all(np.isfinite(actual)), f"{what}: non-finite values"
    bound = max_rel * np.max(np.abs(ref)) + elem_rel * np.abs(ref)
    err = np.abs(actual - ref)
    worst = np.unravel_index(np.argmax(err - bound), err.shape)
    assert np.all(err <= bound), (
        f"{what}: |port - ref| exceeds the bound at {worst}: port {actual[worst]!r}, "
        f"ref {ref[worst]!r}, diff {err[worst]:.3g}, bound {bound[worst]:.3g} "
        f"(max relative diff {np.max(err) / np.max(np.abs(ref)):.3g})")


def assert_single(actual, ref, what=""):
    """The golden README's tolerance for single functions."""
    assert_close(actual, ref, max_rel=1e-5, elem_rel=1e-5, what=what)


@pytest.fixture(scope="session")
def golden():
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = load_golden(name)
        return cache[name]

    return get


#: The ways EM routing can run: eagerly with TensorFlow ops ("eager"), in a
#: tf.function with the blocked XLA kernels ("xla_kernels"), and in the native
#: ops of capsem.native, eagerly ("native") and in a tf.function ("native_fn").
ROUTING_PATHS = ("eager", "xla_kernels", "native", "native_fn")


def native_or_skip():
    """Fails if the native kernels do not build; skips only under CAPSEM_NATIVE=0."""
    from capsem import native
    if not native.enabled_by_environment():
        pytest.skip("native routing kernels disabled by CAPSEM_NATIVE=0")
    native.load()  # raises NativeBuildError with the compiler's message


def routed(fn, path):
    """`fn` running its EM routing on `path` (one of ROUTING_PATHS)."""
    import tensorflow as tf
    from capsem import ops
    use_native = path.startswith("native")
    if use_native:
        native_or_skip()
    compiled = tf.function(fn) if path in ("xla_kernels", "native_fn") else fn

    def run(*args, **kwargs):
        with ops.native_routing_kernels(use_native):
            return compiled(*args, **kwargs)

    return run


@pytest.fixture(scope="session")
def tiny_runs(tmp_path_factory):
    """Trained tiny networks for the tools that use a log_dir (export, predict, visualize).

    `{routing: log_dir}` for the article's and the paper's routing (A=4, B=2, C=2, D=2,
    2 iterations, 2 steps of batch 4 on generated MNIST), and `"dataset_dir"`: the
    TFRecords they trained on (8 training and 6 test images).
    """
    from capsem import training
    from mnist_fixtures import make_tiny_tfrecords

    root = tmp_path_factory.mktemp("tiny_runs")
    _, dataset_dir = make_tiny_tfrecords(root, n_train=8, n_test=6)
    runs = {"dataset_dir": dataset_dir}
    for routing in ("article", "paper"):
        runs[routing] = str(root / routing)
        training.train(training.TrainConfig(
            dataset="mnist", data_source="tfrecord", source_dir=None, dataset_dir=dataset_dir,
            log_dir=runs[routing], batch_size=4, eval_batch_size=6, iterations=2, A=4, B=2,
            C=2, D=2, max_steps=2, epochs=0, seed=5, summary_secs=3600, histogram_secs=3600,
            checkpoint_secs=3600, log_every_steps=1, log_every_secs=0, routing=routing,
            eval_every_epoch=False))
    return runs
