"""capsem.visualize and visualize.py: pictures of capsules and routing, TensorBoard images.

A tiny network (A=4, B=2, C=2, D=2, 2 routing iterations) trains 2 steps on
generated MNIST (module fixture); the pictures are made from its checkpoint.
"""

import glob
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow as tf

from capsem import nets, training
from capsem import visualize as vis
from capsem.errors import ConfigError, DataError
from conftest import REPO

N_TEST = 6  # conftest.tiny_runs' test images
TINY = dict(A=4, B=2, C=2, D=2, iterations=2)


@pytest.fixture(scope="module")
def run(tiny_runs):
    """`(log_dir, dataset_dir)` of conftest's tiny network (article routing, 2 steps)."""
    return tiny_runs["article"], tiny_runs["dataset_dir"]


def test_training_writes_the_pictures_to_tensorboard(run):
    """train.py's first summary step writes the image summaries with the histograms."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    log_dir, _ = run
    events = EventAccumulator(log_dir, size_guidance={"images": 0, "tensors": 0})
    events.Reload()
    tags = set(events.Tags()["images"]) | set(events.Tags()["tensors"])
    assert set(vis.SUMMARY_TAGS) <= tags, sorted(tags)
    assert "activations/conv_caps1" in tags  # the histograms of the same step


def _images(n=3, seed=1):
    return tf.random.stateless_uniform((n, 28, 28, 1), (seed, 2), -1.0, 1.0)


def _decode(path):
    """The PNG at `path` as a uint8 array `(H, W, C)` (fails on an empty or corrupt file)."""
    data = tf.io.read_file(path)
    assert int(tf.strings.length(data)) > 0, path
    return tf.io.decode_png(data).numpy()


@pytest.mark.parametrize("batch_norm", [False, True])
def test_capsule_outputs_are_the_models_and_routing_rows_sum_to_one(batch_norm):
    model = nets.capsules_net(conv1_batch_norm=batch_norm, **TINY)
    images = _images()
    poses, activations = model(images)
    outputs = vis.capsule_outputs(model, images)
    # Every layer before primary_caps is run (also the batch norm and its ReLU).
    np.testing.assert_allclose(outputs["activations/class_capsules"], activations, atol=1e-6)
    np.testing.assert_allclose(outputs["poses/class_capsules"], poses, atol=1e-5)
    assert outputs["routing/conv_caps1"].shape == (3, 6, 6, 3 * 3 * 2, 2)
    assert outputs["routing/conv_caps2"].shape == (3, 4, 4, 3 * 3 * 2, 2)
    assert outputs["routing/class_capsules"].shape == (3, 4 * 4 * 2, 10)

    matrices = vis.routing_matrices(model, outputs)
    assert {k: v.shape for k, v in matrices.items()} == {
        "conv_caps1": (3, 2, 2), "conv_caps2": (3, 2, 2), "class_capsules": (3, 2, 10)}
    for name, matrix in matrices.items():
        np.testing.assert_allclose(matrix.sum(axis=-1), 1.0, atol=1e-5, err_msg=name)
    # The class layer's matrix by hand: child (h*W + w)*D + d, weighted by its activation.
    a = np.asarray(outputs["activations/conv_caps2"]).reshape(3, 16, 2)  # (N, H*W, D)
    rr = np.asarray(outputs["routing/class_capsules"]).reshape(3, 16, 2, 10)  # (N, H*W, D, E)
    mass = (a[..., None] * rr).sum(axis=1)  # (N, D, E)
    np.testing.assert_allclose(matrices["class_capsules"],
                               mass / mass.sum(axis=-1, keepdims=True), atol=1e-6)


def test_given_outputs_are_used_as_they_are():
    """The trainer passes one `capsule_outputs(..., votes=True)` to both the histograms and
    the pictures: the pictures of given outputs equal those computed inside, and the given
    ones are really used (pictures of another batch's outputs differ)."""
    from capsem import diagnostics
    model = nets.capsules_net(**TINY)
    images, other = _images(2, seed=3), _images(2, seed=4)
    outputs = diagnostics.capsule_outputs(model, images, votes=True)
    inside = vis.picture_data(model, images, labels=np.array([1, 2]))
    given = vis.picture_data(model, images, labels=np.array([1, 2]), outputs=outputs)
    assert set(inside) == set(given)
    for key in inside:
        if inside[key] is not None:
            np.testing.assert_array_equal(given[key], inside[key], err_msg=key)
    foreign = vis.picture_data(model, images, outputs=vis.capsule_outputs(model, other))
    assert not np.allclose(foreign["class_activations"], inside["class_activations"])
    details = diagnostics.capsule_details(model, images, outputs)
    assert "votes/conv_caps1" in details and not any(k.startswith("poses/") for k in details)
    np.testing.assert_array_equal(details["activations/class_capsules"],
                                  diagnostics.capsule_details(model, images)[
                                      "activations/class_capsules"])


def test_pose_study_recomputes_the_class_layer_on_offset_poses():
    model = nets.capsules_net(**TINY)
    images = _images(2, seed=5)
    offsets = vis.pose_offsets(0.25, 5)
    np.testing.assert_allclose(offsets, [-0.25, -0.125, 0.0, 0.125, 0.25])
    data = vis.picture_data(model, images, labels=np.array([3, 4]), offsets=offsets)
    study, predicted = data["pose_study"], data["pose_study_predictions"]
    assert study.shape == predicted.shape == (2, 16, 5)
    winners = data["predictions"]
    # Offset 0 is the network's own activation of the predicted class.
    np.testing.assert_allclose(study[:, :, 2], np.broadcast_to(
        data["class_activations"][np.arange(2), winners][:, None], (2, 16)), atol=1e-5)
    np.testing.assert_array_equal(predicted[:, :, 2], np.broadcast_to(winners[:, None], (2, 16)))
    # An offset of element [1, 2] of every ConvCaps2 pose, through the class layer by hand.
    outputs = vis.capsule_outputs(model, images[1:])
    poses = outputs["poses/conv_caps2"].numpy()
    poses[..., 1, 2] += 0.125
    _, acts = model.get_layer("class_capsules")([poses, outputs["activations/conv_caps2"]])
    np.testing.assert_allclose(study[1, 4 * 1 + 2, 3], acts[0, winners[1]], atol=1e-5)
    assert not np.allclose(study[1, 6], study[1, 6, 2])  # the offsets change the activation

    with pytest.raises(ConfigError, match="pose_steps"):
        vis.pose_offsets(0.25, 1)
    with pytest.raises(ConfigError, match="pose_offset"):
        vis.pose_offsets(0.0, 11)


def test_visualize_writes_every_picture_of_every_image(run, tmp_path):
    log_dir, dataset_dir = run
    out = str(tmp_path / "pictures")
    lines = []
    written = vis.visualize(log_dir, out, num_images=2, first_image=1, dataset_dir=dataset_dir,
                            pose_steps=5, log=lines.append)
    names = vis.file_names([1, 2])
    assert len(names) == 2 * len(vis.PICTURES) == 20
    assert names[:3] == ["image1_input.png", "image1_activations_primary_caps.png",
                         "image1_activations_conv_caps1.png"]
    assert written == [os.path.join(out, name) for name in names]
    assert sorted(os.listdir(out)) == sorted(names)
    assert lines[:20] == [f"wrote {path}" for path in written]
    assert len(lines) == 21 and "20 files for 2 test image(s) of mnist" in lines[-1]
    assert "step 2" in lines[-1]
    for path in written:
        image = _decode(path)
        assert image.shape[2] in (3, 4), path
        assert 150 <= image.shape[0] <= 1500 and 150 <= image.shape[1] <= 1500, (path, image.shape)
        assert image.std() > 5, path  # not a blank page


def test_visualize_refuses_files_it_would_write_and_bad_arguments(run, tmp_path):
    log_dir, dataset_dir = run
    out = tmp_path / "pictures"
    out.mkdir()
    mine = out / "image3_poses.png"
    mine.write_bytes(b"not capsem's")
    with pytest.raises(ConfigError) as info:
        vis.visualize(log_dir, str(out), num_images=2, first_image=2, dataset_dir=dataset_dir)
    message = str(info.value)
    assert str(mine) in message and "--overwrite" in message and "\n" not in message
    assert os.listdir(out) == ["image3_poses.png"] and mine.read_bytes() == b"not capsem's"

    with pytest.raises(DataError, match=f"needs {N_TEST + 1} test images.*has {N_TEST}"):
        vis.visualize(log_dir, str(out / "more"), num_images=2, first_image=N_TEST - 1,
                      dataset_dir=dataset_dir)
    assert not os.path.exists(out / "more")
    with pytest.raises(ConfigError, match="num_images"):
        vis.visualize(log_dir, str(out), num_images=0)
    with pytest.raises(ConfigError, match="not a directory"):
        vis.visualize(log_dir, str(mine))


def test_visualize_py_refuses_and_overwrite_replaces(run, tmp_path):
    log_dir, dataset_dir = run
    out = tmp_path / "pictures"
    out.mkdir()
    (out / "image0_pose_study.png").write_bytes(b"someone else's")
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    env["PYTHONPATH"] = os.pathsep.join([REPO] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH")
                                                  else []))
    args = [sys.executable, "visualize.py", f"--log_dir={log_dir}", f"--out={out}",
            "--num_images=1", f"--dataset_dir={dataset_dir}", "--pose_steps=3"]

    refused = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True,
                             timeout=300)
    assert refused.returncode == 1, refused.stderr[-3000:]
    error = refused.stderr.strip().splitlines()[-1]
    assert error.startswith("error: ") and "image0_pose_study.png exists" in error
    assert os.listdir(out) == ["image0_pose_study.png"]

    # --overwrite (in this process: the command line's writing is the same function).
    lines = []
    vis.visualize(log_dir, str(out), num_images=1, dataset_dir=dataset_dir, overwrite=True,
                  pose_steps=3, log=lines.append)
    names = vis.file_names([0])
    assert sorted(os.listdir(out)) == sorted(names)
    assert [line for line in lines if line.startswith("wrote ")] == [
        f"wrote {out / name}" for name in names]
    for name in names:
        _decode(str(out / name))


def test_visualize_py_help_lists_its_flags():
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    result = subprocess.run([sys.executable, "visualize.py", "--helpshort"], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=120)
    assert "Pictures of a trained network" in result.stdout, result.stderr[-2000:]
    for flag in ("--log_dir", "--out", "--checkpoint", "--num_images", "--first_image",
                 "--dataset_dir", "--overwrite", "--pose_offset", "--pose_steps"):
        assert flag in result.stdout, flag


def test_write_image_summaries_writes_the_tags(run, tmp_path):
    log_dir, dataset_dir = run
    model, config, _, _ = training.load_trained(log_dir)
    images, labels = vis.load_test_images(config, 0, 3, dataset_dir)
    summaries = str(tmp_path / "summaries")
    writer = tf.summary.create_file_writer(summaries)
    with writer.as_default(step=7):
        vis.write_image_summaries(model, images, labels, max_outputs=2, dataset="mnist")
        start = time.perf_counter()
        tags = vis.write_image_summaries(model, images, labels, max_outputs=2, dataset="mnist")
        seconds = time.perf_counter() - start
    writer.close()
    assert tags == list(vis.SUMMARY_TAGS)
    assert seconds < 5, seconds  # about 0.1 s when the machine is idle

    found = {}
    for path in glob.glob(os.path.join(summaries, "events.out.tfevents.*")):
        for event in tf.compat.v1.train.summary_iterator(path):
            for value in event.summary.value:
                assert event.step == 7
                assert value.metadata.plugin_data.plugin_name == "images"
                found.setdefault(value.tag, []).append(tf.make_ndarray(value.tensor))
    assert sorted(found) == sorted(vis.SUMMARY_TAGS)
    for tag, tensors in found.items():
        # [width, height, png of image 0, png of image 1]
        width, height, *pngs = tensors[0]
        assert len(pngs) == 2, tag
        image = tf.io.decode_png(pngs[0]).numpy()
        assert image.shape[:2] == (int(height), int(width)), tag
        assert min(image.shape[:2]) >= 28 and image.shape[2] in (1, 3), (tag, image.shape)
    inputs = [tf.io.decode_png(png).numpy() for png in found["pictures/input"][0][2:]]
    np.testing.assert_array_equal(
        np.stack(inputs), vis.display_images(images[:2], "mnist"))
