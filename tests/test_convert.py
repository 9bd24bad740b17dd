"""Tests of the MNIST IDX reader, the IDX -> TFRecord conversion and its script."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pathlib  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

from capsem import datasets  # noqa: E402
from capsem.errors import DataError  # noqa: E402
from mnist_fixtures import (IDX_NAMES, flip_tfrecord_byte, idx_bytes,  # noqa: E402
                            make_tiny_mnist, snapshot, truncate_tfrecord, write_idx,
                            write_image_tfrecord)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUNDLED = os.path.join(REPO, "data", "mnist")
SCRIPT = os.path.join(REPO, "download_and_convert_mnist.py")

N_TRAIN, N_TEST = 50, 20
FILES = IDX_NAMES


def make_source(directory, n_train=N_TRAIN, n_test=N_TEST, seed=0):
    """Writes tiny random MNIST-like IDX .gz files; returns {split: (images, labels)}."""
    return make_tiny_mnist(directory, n_train, n_test, seed)


def read_records(path):
    """Parses every Example of a TFRecord file into a list of feature dicts."""
    features = {
        "image/encoded": tf.io.FixedLenFeature([], tf.string),
        "image/format": tf.io.FixedLenFeature([], tf.string),
        "image/class/label": tf.io.FixedLenFeature([], tf.int64),
        "image/height": tf.io.FixedLenFeature([], tf.int64),
        "image/width": tf.io.FixedLenFeature([], tf.int64),
    }
    out = []
    for raw in tf.data.TFRecordDataset(str(path)):
        ex = tf.io.parse_single_example(raw, features)
        out.append({k: v.numpy() for k, v in ex.items()})
    return out


TINY = {"train": N_TRAIN, "test": N_TEST}


def test_round_trip(tmp_path):
    content = make_source(tmp_path / "src")
    lines = []
    out = datasets.convert_mnist(tmp_path / "src", tmp_path / "out", expected_counts=TINY,
                                 progress=lines.append)
    assert set(out) == {"train", "test"}
    assert out["train"] == str(tmp_path / "out" / "mnist_train.tfrecord")
    assert out["test"] == str(tmp_path / "out" / "mnist_test.tfrecord")
    assert any("wrote" in line and "50 images" in line for line in lines)
    for split, (images, labels) in content.items():
        records = read_records(out[split])
        assert len(records) == len(labels)
        for i, ex in enumerate(records):
            assert ex["image/format"] == b"png"
            assert ex["image/height"] == 28 and ex["image/width"] == 28
            assert ex["image/class/label"] == labels[i]
            decoded = tf.io.decode_png(ex["image/encoded"], channels=1).numpy()
            assert decoded.shape == (28, 28, 1)
            np.testing.assert_array_equal(decoded[..., 0], images[i])
        assert datasets.validate_tfrecord(out[split], (28, 28, 1)) == len(labels)
    assert sorted(os.listdir(tmp_path / "out")) == [
        "mnist_test.tfrecord", "mnist_test.tfrecord.json",
        "mnist_train.tfrecord", "mnist_train.tfrecord.json"]


def test_load_mnist_idx_shapes_and_plain_files(tmp_path):
    content = make_source(tmp_path)
    images, labels = datasets.load_mnist_idx(tmp_path, "train", expected_count=N_TRAIN)
    assert images.dtype == np.uint8 and images.shape == (N_TRAIN, 28, 28, 1)
    assert labels.dtype == np.int64 and labels.shape == (N_TRAIN,)
    np.testing.assert_array_equal(images[..., 0], content["train"][0])
    # Uncompressed IDX files are accepted too, under the name without .gz.
    os.remove(tmp_path / FILES["test"][0])
    write_idx(tmp_path / FILES["test"][0][:-3], content["test"][0], compress=False)
    images, _ = datasets.load_mnist_idx(tmp_path, "test", expected_count=False)
    np.testing.assert_array_equal(images[..., 0], content["test"][0])
    with pytest.raises(DataError, match="holds 20 images, expected 10000"):
        datasets.load_mnist_idx(tmp_path, "test")
    with pytest.raises(DataError, match="accepted splits are train, test"):
        datasets.load_mnist_idx(tmp_path, "validation")


def test_second_call_is_a_noop_and_stale_output_is_rewritten(tmp_path):
    make_source(tmp_path / "src")
    out = datasets.convert_mnist(tmp_path / "src", tmp_path / "out", expected_counts=TINY)
    mtimes = {s: os.stat(p).st_mtime_ns for s, p in out.items()}
    lines = []
    start = time.perf_counter()
    again = datasets.convert_mnist(tmp_path / "src", tmp_path / "out", expected_counts=TINY,
                                   progress=lines.append)
    assert time.perf_counter() - start < 2.0
    assert again == out
    assert {s: os.stat(p).st_mtime_ns for s, p in out.items()} == mtimes
    assert sum("already exists" in line for line in lines) == 2

    # capsem's own output (its sidecar records its size and sha256) converted from other
    # IDX files is converted again.
    test_bytes = pathlib.Path(out["test"]).read_bytes()
    new = make_source(tmp_path / "src", seed=1)
    lines.clear()
    datasets.convert_mnist(tmp_path / "src", tmp_path / "out", expected_counts=TINY,
                           progress=lines.append)
    assert any(line.startswith("train: wrote") for line in lines), lines
    assert any(line.startswith("test: wrote") for line in lines), lines
    assert any("was converted by capsem from other IDX files" in line for line in lines)
    first = read_records(out["train"])[0]
    decoded = tf.io.decode_png(first["image/encoded"]).numpy()[..., 0]
    np.testing.assert_array_equal(decoded, new["train"][0][0])
    assert pathlib.Path(out["test"]).read_bytes() != test_bytes
    assert datasets.written_by_capsem(out["train"])["num_records"] == N_TRAIN


def test_a_file_capsem_did_not_write_is_used_as_it_is(tmp_path):
    """Without a sidecar that records its size and sha256, a TFRecord is not capsem's: it
    is read (whatever its record count) and never modified, whatever the source files."""
    make_source(tmp_path / "src")
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    rng = np.random.default_rng(5)
    images = rng.integers(0, 256, size=(7, 28, 28, 1), dtype=np.uint8)
    write_image_tfrecord(out_dir / "mnist_train.tfrecord", images, [3, 1, 4, 1, 5, 9, 2])
    before = snapshot(out_dir)
    lines = []
    out = datasets.convert_mnist(tmp_path / "src", out_dir, expected_counts=TINY,
                                 progress=lines.append)
    assert snapshot(out_dir)["mnist_train.tfrecord"] == before["mnist_train.tfrecord"]
    assert not (out_dir / "mnist_train.tfrecord.json").exists()
    assert any(line == f"{out['train']}: 7 records, not written by capsem (no sidecar that "
               f"matches it): used as it is, never modified (download_and_convert_mnist.py "
               f"--overwrite replaces it)" for line in lines), lines
    assert any(line.startswith("test: wrote") for line in lines)  # no file: converted
    read, labels = datasets.read_image_tfrecord(out["train"], (28, 28, 1), 10)
    np.testing.assert_array_equal(read, images)
    assert labels.tolist() == [3, 1, 4, 1, 5, 9, 2]

    # capsem's own file, changed after capsem wrote it (its sidecar no longer matches),
    # is not capsem's any more either: kept, sidecar included, even with other sources.
    test_path = pathlib.Path(out["test"])
    write_image_tfrecord(test_path, images[:3], [0, 1, 2])
    before = snapshot(out_dir)
    make_source(tmp_path / "src", seed=2)
    lines.clear()
    datasets.convert_mnist(tmp_path / "src", out_dir, expected_counts=TINY,
                           progress=lines.append)
    assert snapshot(out_dir) == before
    assert not any("wrote" in line for line in lines), lines
    assert any(line.startswith(f"{test_path}: 3 records, not written by capsem")
               for line in lines), lines
    assert datasets.written_by_capsem(test_path) is None


@pytest.mark.parametrize("damage", [flip_tfrecord_byte, truncate_tfrecord])
def test_a_corrupt_file_capsem_did_not_write_stops_the_conversion(tmp_path, damage):
    """A damaged TFRecord whose sidecar no longer matches is an error naming the file, the
    record and what to do; nothing in the directory changes, the other split included."""
    make_source(tmp_path / "src")
    out = datasets.convert_mnist(tmp_path / "src", tmp_path / "out", expected_counts=TINY)
    os.remove(out["train"])  # "no file at all" would be converted: the error comes first
    record = damage(out["test"])
    assert 0 < record < N_TEST
    before = snapshot(tmp_path / "out")
    with pytest.raises(DataError) as info:
        datasets.convert_mnist(tmp_path / "src", tmp_path / "out", expected_counts=TINY)
    message = str(info.value)
    assert message.startswith(f"{out['test']}: corrupt or truncated TFRecord file: record "
                              f"{record} cannot be read (") and "\n" not in message, message
    assert message.endswith("remove it, or pass another --dataset_dir "
                            "(download_and_convert_mnist.py --overwrite replaces it)"), message
    assert snapshot(tmp_path / "out") == before

    # A file named like capsem's sidecar that capsem did not write is not replaced either.
    with open(out["train"] + ".json", "w") as f:
        f.write("{}")
    os.remove(out["test"])
    os.remove(out["test"] + ".json")
    with pytest.raises(DataError, match=r"mnist_train.tfrecord.json: not a sidecar written by "
                                        r"capsem.*remove it, or pass another --dataset_dir"):
        datasets.convert_mnist(tmp_path / "src", tmp_path / "out", expected_counts=TINY)
    assert snapshot(tmp_path / "out") == {"mnist_train.tfrecord.json": b"{}"}


def test_overwrite_replaces_files_capsem_did_not_write(tmp_path):
    make_source(tmp_path / "src")
    datasets.convert_mnist(tmp_path / "src", tmp_path / "ref", expected_counts=TINY)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    write_image_tfrecord(out_dir / "mnist_train.tfrecord", np.zeros((2, 28, 28, 1), np.uint8),
                         [0, 1])
    (out_dir / "mnist_test.tfrecord").write_bytes(b"not a TFRecord")
    (out_dir / "mnist_test.tfrecord.json").write_text("{}")
    lines = []
    datasets.convert_mnist(tmp_path / "src", out_dir, expected_counts=TINY, overwrite=True,
                           progress=lines.append)
    assert sum("was not written by capsem: replacing it (overwrite)" in line
               for line in lines) == 2, lines
    assert snapshot(out_dir) == snapshot(tmp_path / "ref")  # the conversion, sidecars too
    assert datasets.written_by_capsem(out_dir / "mnist_train.tfrecord")["num_records"] == N_TRAIN
    # capsem's own up-to-date output is kept with overwrite=True too.
    mtime = os.stat(out_dir / "mnist_train.tfrecord").st_mtime_ns
    lines.clear()
    datasets.convert_mnist(tmp_path / "src", out_dir, expected_counts=TINY, overwrite=True,
                           progress=lines.append)
    assert sum("already exists" in line for line in lines) == 2
    assert os.stat(out_dir / "mnist_train.tfrecord").st_mtime_ns == mtime


def _corrupt_truncated_gzip(src):
    path = src / FILES["train"][0]
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return FILES["train"][0], "truncated or corrupt gzip"


def _corrupt_bad_magic(src):
    images = np.zeros((N_TEST, 28, 28), np.uint8)
    write_idx(src / FILES["test"][0], images, magic=2052)
    return FILES["test"][0], "bad magic number 2052"


def _corrupt_short_payload(src):
    raw = idx_bytes(np.zeros((N_TRAIN, 28, 28), np.uint8))
    write_idx(src / FILES["train"][0], None, data=raw[:-100])
    return FILES["train"][0], "truncated: header says 50 images of 28x28"


def _corrupt_long_payload(src):
    raw = idx_bytes(np.zeros(N_TEST, np.uint8))
    write_idx(src / FILES["test"][1], None, data=raw + b"\x00")
    return FILES["test"][1], "trailing data: header says 20 labels"


def _corrupt_label_range(src):
    labels = np.zeros(N_TEST, np.uint8)
    labels[7] = 10
    write_idx(src / FILES["test"][1], labels)
    return FILES["test"][1], "label 10 at index 7 is out of range"


def _corrupt_missing(src):
    os.remove(src / FILES["train"][1])
    return FILES["train"][1], "no such file"


def _corrupt_wrong_kind(src):
    write_idx(src / FILES["train"][1], np.zeros((N_TRAIN, 28, 28), np.uint8))
    return FILES["train"][1], "expected IDX labels"


def _corrupt_wrong_size(src):
    write_idx(src / FILES["test"][0], np.zeros((N_TEST, 32, 32), np.uint8))
    return FILES["test"][0], "images are 32x32, expected 28x28"


def _corrupt_label_count(src):
    write_idx(src / FILES["train"][1], np.zeros(N_TRAIN - 1, np.uint8))
    return FILES["train"][1], "holds 49 labels, expected 50"


@pytest.mark.parametrize("corrupt", [
    _corrupt_truncated_gzip, _corrupt_bad_magic, _corrupt_short_payload, _corrupt_long_payload,
    _corrupt_label_range, _corrupt_missing, _corrupt_wrong_kind, _corrupt_wrong_size,
    _corrupt_label_count])
def test_bad_input_is_a_one_line_data_error_and_leaves_no_output(tmp_path, corrupt):
    src = tmp_path / "src"
    make_source(src)
    name, expected = corrupt(src)
    with pytest.raises(DataError) as info:
        datasets.convert_mnist(src, tmp_path / "out", expected_counts=TINY)
    message = str(info.value)
    assert name in message
    assert expected in message
    assert "\n" not in message
    assert os.listdir(tmp_path / "out") == []


def test_read_idx_errors_name_the_file(tmp_path):
    with pytest.raises(DataError, match="nope.gz: no such file"):
        datasets.read_idx(tmp_path / "nope.gz")
    path = write_idx(tmp_path / "short", None, data=b"\x00\x00\x08", compress=False)
    with pytest.raises(DataError, match="short: truncated: 3 bytes"):
        datasets.read_idx(path)
    labels = np.arange(10, dtype=np.uint8)
    path = write_idx(tmp_path / "labels.gz", labels)
    np.testing.assert_array_equal(datasets.read_idx(path), labels)


def test_exception_while_writing_leaves_no_file(tmp_path, monkeypatch):
    make_source(tmp_path / "src")
    calls = []
    original = datasets._example

    def failing(*args):
        calls.append(1)
        if len(calls) > 10:
            raise RuntimeError("simulated crash")
        return original(*args)

    monkeypatch.setattr(datasets, "_example", failing)
    with pytest.raises(RuntimeError, match="simulated crash"):
        datasets.convert_mnist(tmp_path / "src", tmp_path / "out", expected_counts=TINY)
    assert os.listdir(tmp_path / "out") == []


def test_expected_counts_argument(tmp_path):
    make_source(tmp_path / "src")
    with pytest.raises(DataError, match="holds 50 images, expected 60000"):
        datasets.convert_mnist(tmp_path / "src", tmp_path / "out")
    out = datasets.convert_mnist(tmp_path / "src", tmp_path / "out", expected_counts=False)
    assert datasets.validate_tfrecord(out["train"]) == N_TRAIN
    # Output for 50 images is not "valid" when 51 are expected: it is rewritten (and fails).
    with pytest.raises(DataError, match="expected 51"):
        datasets.convert_mnist(tmp_path / "src", tmp_path / "out", expected_counts=(51, 20))
    with pytest.raises(DataError, match="expected_counts"):
        datasets.convert_mnist(tmp_path / "src", tmp_path / "out", expected_counts=(1, 2, 3))
    with pytest.raises(DataError, match="accepted keys are train, test"):
        datasets.convert_mnist(tmp_path / "src", tmp_path / "out", expected_counts={"val": 3})


def test_download_from_mirrors(tmp_path):
    mirror = tmp_path / "mirror"
    make_source(mirror)
    missing = (tmp_path / "missing").as_uri() + "/"
    src = tmp_path / "src"
    fetched = datasets.download_mnist(src, mirrors=(missing, mirror.as_uri() + "/"))
    assert sorted(os.path.basename(p) for p in fetched) == sorted(sum(FILES.values(), ()))
    for name in sum(FILES.values(), ()):
        assert (src / name).read_bytes() == (mirror / name).read_bytes()
    assert datasets.download_mnist(src, mirrors=(missing,)) == []  # present files are kept
    out = datasets.convert_mnist(src, tmp_path / "out", expected_counts=TINY, download=True)
    assert datasets.validate_tfrecord(out["test"]) == N_TEST

    with pytest.raises(DataError) as info:
        datasets.download_mnist(tmp_path / "empty", mirrors=(missing, missing + "other/"))
    message = str(info.value)
    assert missing + "train-images-idx3-ubyte.gz" in message
    assert missing + "other/train-images-idx3-ubyte.gz" in message
    assert "--source_dir" in message and "\n" not in message
    assert os.listdir(tmp_path / "empty") == []


def _run_script(*args):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    return subprocess.run([sys.executable, SCRIPT, *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)


def test_script_converts_tiny_data(tmp_path):
    content = make_source(tmp_path / "src")
    result = _run_script(f"--source_dir={tmp_path / 'src'}", f"--dataset_dir={tmp_path / 'out'}",
                         "--expected_counts=50,20")
    assert result.returncode == 0, result.stderr
    assert "wrote" in result.stdout and "(50 images)" in result.stdout
    assert "(20 images)" in result.stdout
    records = read_records(tmp_path / "out" / "mnist_test.tfrecord")
    assert [r["image/class/label"] for r in records] == list(content["test"][1])


def test_script_reports_bad_input_without_traceback(tmp_path):
    src = tmp_path / "src"
    make_source(src)
    _corrupt_bad_magic(src)
    result = _run_script(f"--source_dir={src}", f"--dataset_dir={tmp_path / 'out'}",
                         "--expected_counts=50,20")
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    assert FILES["test"][0] in errors[0] and "bad magic number" in errors[0]
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists() or os.listdir(tmp_path / "out") == []


def test_script_keeps_files_it_did_not_write_and_overwrite_replaces_them(tmp_path):
    """download_and_convert_mnist.py: the same rules as train.py, and --overwrite; two
    conversions of the same IDX files (in two processes) give the same bytes."""
    make_source(tmp_path / "src")
    args = (f"--source_dir={tmp_path / 'src'}", f"--dataset_dir={tmp_path / 'out'}",
            "--expected_counts=50,20")
    reference = datasets.convert_mnist(tmp_path / "src", tmp_path / "ref", expected_counts=TINY)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    train = out_dir / "mnist_train.tfrecord"
    write_image_tfrecord(train, np.full((4, 28, 28, 1), 9, np.uint8), [1, 2, 3, 4])
    foreign = train.read_bytes()

    result = _run_script(*args)  # a valid foreign train file: used as it is
    assert result.returncode == 0, result.stderr
    assert f"{train}: 4 records, not written by capsem" in result.stdout
    assert train.read_bytes() == foreign and not (out_dir / "mnist_train.tfrecord.json").exists()
    assert "test: wrote" in result.stdout

    record = truncate_tfrecord(train)  # truncated: exit 1, one line, nothing changes
    assert record == 3
    before = snapshot(out_dir)
    result = _run_script(*args)
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: {train}: corrupt or truncated TFRecord file: record 3 cannot be "
                      f"read ({errors[0].split(' cannot be read (', 1)[1]}"], result.stderr
    assert "remove it, or pass another --dataset_dir" in errors[0]
    assert "Traceback" not in result.stderr
    assert snapshot(out_dir) == before

    result = _run_script(*args, "--overwrite")  # replaced by the conversion, byte for byte
    assert result.returncode == 0, result.stderr
    assert "train: wrote" in result.stdout and "test: valid output already exists" in result.stdout
    assert snapshot(out_dir) == snapshot(tmp_path / "ref")
    assert train.read_bytes() == pathlib.Path(reference["train"]).read_bytes()


# The canonical MNIST facts (from the bundled data's README).
TRAIN_HISTOGRAM = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
TEST_HISTOGRAM = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


def test_bundled_mnist_parses():
    train_labels = datasets.read_idx(os.path.join(BUNDLED, FILES["train"][1]))
    test_labels = datasets.read_idx(os.path.join(BUNDLED, FILES["test"][1]))
    assert train_labels.shape == (60000,) and test_labels.shape == (10000,)
    assert list(train_labels[:10]) == [5, 0, 4, 1, 9, 2, 1, 3, 1, 4]
    assert list(test_labels[:10]) == [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]
    assert np.bincount(train_labels, minlength=10).tolist() == TRAIN_HISTOGRAM
    assert np.bincount(test_labels, minlength=10).tolist() == TEST_HISTOGRAM
    for split in ("train", "test"):
        images, labels = datasets.load_mnist_idx(BUNDLED, split)
        assert images.shape == ({"train": 60000, "test": 10000}[split], 28, 28, 1)
        assert images.dtype == np.uint8 and images.max() == 255 and images.min() == 0
        assert labels.dtype == np.int64


def test_examples_serialise_to_the_same_bytes_whatever_the_map_order():
    """Features is a protobuf map; the converter writes its entries sorted by key, so the
    same IDX files give byte-identical TFRecords in every process."""
    import tensorflow as tf

    example = datasets._example(b"\x89PNG", 7, 28, 28)
    items = list(example.features.feature.items())
    reversed_example = tf.train.Example()
    for key, value in reversed(items):
        reversed_example.features.feature[key].CopyFrom(value)
    assert reversed_example == example
    assert datasets.serialize_example(reversed_example) == datasets.serialize_example(example)
    # Sorted by key: image/class/label, image/encoded, image/format, image/height, image/width.
    data = datasets.serialize_example(example)
    positions = [data.index(key.encode()) for key in sorted(k for k, _ in items)]
    assert positions == sorted(positions)
