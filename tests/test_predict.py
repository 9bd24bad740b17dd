"""predict.py / capsem.predict on generated PNG and JPEG files of several sizes and modes."""

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from conftest import REPO


@pytest.fixture(scope="module")
def run(tiny_runs):
    """(log_dir, test images uint8 (6, 28, 28, 1)) of the tiny article-routing run."""
    from capsem import datasets

    images, _ = datasets.read_image_tfrecord(
        os.path.join(tiny_runs["dataset_dir"], "mnist_test.tfrecord"), (28, 28, 1), 10)
    return tiny_runs["article"], np.array(images)


def _write(path, data):
    with open(path, "wb") as f:
        f.write(data)
    return str(path)


def _files(tmp_path, images):
    """Image files of several kinds; returns {name: (path, the 28x28 grey input it holds)}."""
    grey = images[0]  # (28, 28, 1)
    big = np.kron(images[1], np.ones((2, 2, 1), np.uint8))  # (56, 56, 1): 2x each pixel
    rgb = np.concatenate([big] * 3, -1)  # (56, 56, 3), grey in colour
    alpha = np.full((28, 28, 1), 255, np.uint8)
    la = np.concatenate([images[2], alpha], -1)  # grey + opaque alpha
    folder = tmp_path / "folder"
    folder.mkdir()
    files = {
        "grey.png": (_write(tmp_path / "grey.png", tf.io.encode_png(grey).numpy()), grey),
        "rgb56.png": (_write(folder / "rgb56.png", tf.io.encode_png(rgb).numpy()), images[1]),
        "la.png": (_write(folder / "la.PNG", tf.io.encode_png(la).numpy()), images[2]),
        "photo.jpg": (_write(folder / "photo.jpg", tf.io.encode_jpeg(
            np.concatenate([np.kron(images[3], np.ones((3, 3, 1), np.uint8))] * 3, -1),
            quality=95).numpy()), None),  # (84, 84, 3), lossy
    }
    _write(folder / "notes.txt", b"not an image, not looked at")
    return files, folder


def test_image_to_input_converts_sizes_and_modes(run, tmp_path):
    from capsem import predict
    from capsem.errors import DataError

    _, images = run
    files, _ = _files(tmp_path, images)
    for name, (path, expected) in files.items():
        with open(path, "rb") as f:
            x = predict.image_to_input(f.read(), (28, 28, 1))
        assert x.shape == (28, 28, 1) and x.dtype == np.uint8, name
        if expected is not None:
            # Same size: exact; 2x nearest-upscaled: the 2x2 averages are the pixels again.
            assert np.abs(x.astype(int) - expected).max() <= 1, name
    # A fully transparent image is black (composited over MNIST's background).
    rgba = np.concatenate([np.full((5, 7, 3), 200, np.uint8), np.zeros((5, 7, 1), np.uint8)], -1)
    x = predict.image_to_input(tf.io.encode_png(rgba).numpy(), (28, 28, 1))
    assert x.max() == 0
    with pytest.raises(DataError, match="not an image TensorFlow can decode"):
        predict.image_to_input(b"\x89PNG\r\n\x1a\n broken", (28, 28, 1))


def test_predict_py_classifies_files_and_a_folder_and_reports_a_corrupt_file(run, tmp_path):
    from capsem import predict

    log_dir, images = run
    files, folder = _files(tmp_path, images)
    bad = _write(tmp_path / "bad.png", b"\x89PNG\r\n\x1a\n this is not a PNG")
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    args = [sys.executable, "predict.py", f"--log_dir={log_dir}", files["grey.png"][0], bad,
            str(folder), str(tmp_path / "missing.png")]
    out = subprocess.run(args + ["--json"], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 1, out.stderr[-3000:]
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 2, out.stderr[-3000:]
    assert errors[0].startswith(f"error: {bad}: not an image TensorFlow can decode")
    assert errors[1].startswith(f"error: {tmp_path / 'missing.png'}: cannot read")
    records = [json.loads(line) for line in out.stdout.splitlines()]
    expected_files = [files["grey.png"][0]] + sorted(
        [files["la.png"][0], files["photo.jpg"][0], files["rgb56.png"][0]])
    assert [r["file"] for r in records] == expected_files

    # The same numbers as the network on the converted images, in this process.
    predictor = predict.Predictor(log_dir)
    inputs = []
    for path in expected_files:
        with open(path, "rb") as f:
            inputs.append(predict.image_to_input(f.read(), (28, 28, 1)))
    acts = predictor.activations(np.stack(inputs))
    assert acts.shape == (4, 10)
    for record, row in zip(records, acts):
        order = np.argsort(-row, kind="stable")
        assert record["class"] == int(order[0])
        assert [c for c, _ in record["top"]] == [int(c) for c in order[:3]]
        np.testing.assert_allclose([a for _, a in record["top"]], row[order[:3]], rtol=1e-5)
    # The grey PNG holds test image 0 exactly: its activations are the test image's,
    # to float32 rounding: batches of 4 and 1 may take different oneDNN kernels (seen on
    # an AVX-512 machine: 1.2e-6 apart), hence the tolerance of the top activations above.
    np.testing.assert_allclose(acts[0], predictor.activations(images[:1])[0], rtol=1e-5)

    # Text lines (predict.py without --json), in this process.
    lines, problems = [], []
    failed = predict.predict_files(predictor, [files["grey.png"][0], bad], lines.append,
                                   problems.append)
    assert failed == 1 and len(problems) == 1 and problems[0].startswith(f"error: {bad}: ")
    assert len(lines) == 1
    assert re.fullmatch(re.escape(files["grey.png"][0]) + r": class \d \(\d\.\d{3}\); "
                        r"top 3: \d \d\.\d{3}, \d \d\.\d{3}, \d \d\.\d{3}", lines[0]), lines[0]


def test_list_images_of_a_folder(tmp_path):
    from capsem import predict

    (tmp_path / "b.JPG").write_bytes(b"x")
    (tmp_path / "a.png").write_bytes(b"x")
    (tmp_path / "c.txt").write_bytes(b"x")
    (tmp_path / "empty").mkdir()
    files, errors = predict.list_images([str(tmp_path), str(tmp_path / "empty"), "x.png"])
    assert files == [str(tmp_path / "a.png"), str(tmp_path / "b.JPG"), "x.png"]
    assert errors == [f"error: {tmp_path / 'empty'}: a folder without images (looked for "
                      f".png, .jpg, .jpeg, .gif, .bmp)"]
