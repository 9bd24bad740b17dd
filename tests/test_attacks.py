"""FGSM and BIM (capsem.attacks, attack.py) on tiny trained networks.

The capsule network is conftest.py's tiny article-routing run (2 steps); the CNN
is the paper's baseline (capsem.baseline) trained 2 steps on the same generated
MNIST. Properties checked: FGSM moves every pixel by exactly epsilon (or to the
bound of the valid range, or not at all where the gradient is exactly 0), BIM stays
inside the epsilon ball and the valid range, targeted steps raise the target's
score, attack_curve's numbers are those of the attacks, and attack.py writes its
CSV, PNG and TensorBoard scalars and refuses to overwrite them.
"""

import csv
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO

LOW, HIGH = -1.0, 127.0 / 128.0


@pytest.fixture(scope="module")
def runs(tiny_runs, tmp_path_factory):
    """{"capsules": log_dir, "cnn": log_dir, "dataset_dir": ...}: tiny trained networks."""
    from capsem import training

    cnn_dir = str(tmp_path_factory.mktemp("attacks") / "cnn")
    training.train(training.TrainConfig(
        model="cnn", dataset="mnist", data_source="tfrecord", source_dir=None,
        dataset_dir=tiny_runs["dataset_dir"], log_dir=cnn_dir, batch_size=4, max_steps=2,
        epochs=0, seed=5, summary_secs=3600, histogram_secs=3600, checkpoint_secs=3600,
        eval_every_epoch=False))
    return {"capsules": tiny_runs["article"], "cnn": cnn_dir,
            "dataset_dir": tiny_runs["dataset_dir"]}


@pytest.fixture(scope="module")
def models(runs):
    """{kind: AttackModel} of the two tiny networks (batches of 6)."""
    from capsem import attacks, training

    out = {}
    for kind in ("capsules", "cnn"):
        model, config, _, _ = training.load_trained(runs[kind])
        assert config.model == kind
        out[kind] = attacks.AttackModel.from_trained(model, config, batch_size=6)
    return out


def _images(n=6, seed=0, margin=0.3):
    """Images at least `margin` inside the valid range [-1, 127/128]."""
    rng = np.random.default_rng(seed)
    return rng.uniform(LOW + margin, HIGH - margin, (n, 28, 28, 1)).astype(np.float32)


@pytest.mark.parametrize("kind", ["capsules", "cnn"])
def test_fgsm_moves_every_pixel_by_epsilon(models, kind):
    from capsem import attacks

    model = models[kind]
    images, labels, eps = _images(), np.arange(6) % 10, 0.1
    grad, _ = model(images, labels)
    # The gradient reaches the pixels through relu_conv1 and every EM iteration.
    assert np.mean(grad != 0) > 0.9, f"{kind}: {np.mean(grad == 0):.2%} zero gradients"
    adversarial = attacks.fgsm(model, images, labels, eps)
    delta = adversarial - images
    moved = grad != 0
    np.testing.assert_allclose(delta[moved], eps * np.sign(grad[moved]), atol=1e-6)
    assert np.all(delta[~moved] == 0)
    # Targeted: a step of epsilon against the gradient of the target's loss.
    targets = (labels + 3) % 10
    target_grad, _ = model(images, targets)
    delta = attacks.fgsm(model, images, labels, eps, targets=targets) - images
    np.testing.assert_allclose(delta, -eps * np.sign(target_grad), atol=1e-6)

    # At the bounds of the valid range: exactly the clipped step, and nothing outside.
    edge = images.copy()
    edge[:, :14] = LOW
    edge[:, 14:, :3] = HIGH
    grad, _ = model(edge, labels)
    adversarial = attacks.fgsm(model, edge, labels, eps)
    assert adversarial.min() >= LOW and adversarial.max() <= HIGH
    np.testing.assert_array_equal(adversarial, np.clip(edge + np.float32(eps) * np.sign(grad),
                                                       LOW, HIGH).astype(np.float32))


def test_bim_stays_inside_the_epsilon_ball_and_the_valid_range(models):
    from capsem import attacks

    model = models["capsules"]
    images, labels, eps = _images(margin=0.0), np.arange(6) % 10, 0.1
    images[:, :5] = LOW  # pixels on the bounds
    images[:, -5:] = HIGH
    for targets in (None, (labels + 1) % 10):
        adversarial = attacks.bim(model, images, labels, eps, steps=4, step_size=0.04,
                                  targets=targets)
        assert np.max(np.abs(adversarial - images)) <= eps + 1e-6
        assert adversarial.min() >= LOW and adversarial.max() <= HIGH
        assert np.any(np.abs(adversarial - images) > eps - 1e-6)  # the ball's bound was hit
    # One step of epsilon is FGSM.
    np.testing.assert_array_equal(attacks.bim(model, images, labels, eps, 1, eps),
                                  attacks.fgsm(model, images, labels, eps))
    # BIM raises the (attack) loss more than nothing: the untargeted loss goes up.
    loss = attacks.capsule_attack_loss
    adversarial = attacks.bim(model, images, labels, eps, steps=4, step_size=0.04)
    assert float(loss(labels, model.scores(adversarial))) > float(loss(labels,
                                                                       model.scores(images)))


@pytest.mark.parametrize("kind", ["capsules", "cnn"])
def test_a_targeted_attack_raises_the_score_of_the_target(models, kind):
    from capsem import attacks

    model = models[kind]
    images, labels = _images(seed=1), np.arange(6) % 10
    targets = (labels + 5) % 10
    rows = np.arange(len(labels))
    before = model.scores(images)[rows, targets]
    for adversarial in (attacks.fgsm(model, images, labels, 0.05, targets=targets),
                        attacks.bim(model, images, labels, 0.05, 3, 0.02, targets=targets)):
        after = model.scores(adversarial)[rows, targets]
        assert np.all(after > before), (kind, before, after)


def test_target_pairs():
    from capsem import attacks

    labels = np.array([3, 0, 9])
    indices, targets = attacks.target_pairs(labels, 10, "all")
    assert len(indices) == 27 and np.all(targets != labels[indices])
    for n in range(3):
        assert sorted(targets[indices == n]) == sorted(set(range(10)) - {labels[n]})
    indices, targets = attacks.target_pairs(labels, 10, "random", seed=4)
    assert list(indices) == [0, 1, 2] and np.all(targets != labels)
    assert list(attacks.target_pairs(labels, 10, "random", seed=4)[1]) == list(targets)


def test_attack_curve_measures_what_the_attacks_do(models):
    from capsem import attacks

    model = models["cnn"]
    images, labels = _images(seed=2), np.arange(6) % 10
    clean = np.argmax(model.scores(images), -1)
    rows = attacks.attack_curve(model, images, labels, [0.0, 0.2], "fgsm", num_classes=10)
    assert [r["epsilon"] for r in rows] == [0.0, 0.2]
    assert rows[0]["accuracy"] == rows[0]["clean_accuracy"] == np.mean(clean == labels)
    # Epsilon 0 changes nothing: no success (NaN when no image was classified right).
    assert rows[0]["success_rate"] == 0.0 or (np.isnan(rows[0]["success_rate"])
                                              and not np.any(clean == labels))
    pred = np.argmax(model.scores(attacks.fgsm(model, images, labels, 0.2)), -1)
    assert rows[1]["accuracy"] == np.mean(pred == labels)
    correct = clean == labels
    if correct.any():
        assert rows[1]["success_rate"] == np.mean(pred[correct] != labels[correct])
    rows = attacks.attack_curve(model, images, labels, [0.1], "bim", True, num_classes=10,
                                bim_steps=2, target_classes="all")
    assert rows[0]["attacks"] == 54 and rows[0]["bim_step_size"] == pytest.approx(0.0625)
    indices, targets = attacks.target_pairs(labels, 10, "all")
    pred = np.argmax(model.scores(attacks.bim(model, images[indices], labels[indices], 0.1, 2,
                                              0.0625, targets=targets)), -1)
    assert rows[0]["success_rate"] == np.mean(pred == targets)


def test_epsilon_units():
    from capsem import attacks
    from capsem.errors import ConfigError

    assert attacks.to_input_units(0.1, "input") == 0.1
    assert attacks.to_input_units(0.1, "pixel") == pytest.approx(0.1 * 255 / 128)
    with pytest.raises(ConfigError, match="units 'pixel'"):
        attacks.to_input_units(0.1, "pixel", "smallnorb")


def test_run_writes_csv_png_and_tensorboard_and_refuses_to_overwrite(runs, tmp_path):
    import tensorflow as tf

    from capsem import attacks
    from capsem.errors import ConfigError

    out = tmp_path / "out"
    lines = []
    rows = attacks.run([runs["capsules"], runs["cnn"]], str(out), epsilons=[0.0, 0.1],
                       attacks=["fgsm", "bim"], targeted=True, bim_steps=2, num_images=4,
                       dataset_dir=runs["dataset_dir"], batch_size=4, log=lines.append)
    assert len(rows) == 2 * 2 * 2 * 2  # models x attacks x modes x epsilons
    with open(out / "attacks.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert list(table[0]) == list(attacks.CSV_COLUMNS)
    assert len(table) == 16
    assert {(r["model"], r["attack"], r["targeted"]) for r in table} == {
        (m, a, t) for m in ("capsules", "cnn") for a in ("fgsm", "bim") for t in ("False", "True")}
    for r in table:
        assert r["images"] == "4" and r["attacks"] == "4"
        assert 0 <= float(r["accuracy"]) <= 1 and r["epsilon_units"] == "input"
        if r["attack"] == "bim":
            assert r["bim_steps"] == "2"
            assert float(r["bim_step_size_input"]) == pytest.approx(1.25 * float(r["epsilon"]) / 2)
    png = tf.io.decode_png(tf.io.read_file(str(out / "attacks.png")))
    assert png.shape[0] > 200 and png.shape[1] > 400
    events = os.listdir(out / "tensorboard")
    assert len(events) == 1 and events[0].startswith("events.out.tfevents.")
    tags = set()
    for event in tf.compat.v1.train.summary_iterator(str(out / "tensorboard" / events[0])):
        tags.update(v.tag for v in event.summary.value)
    assert "attack/cnn/bim_targeted/success_rate" in tags
    assert "attack/capsules/fgsm_untargeted/accuracy" in tags
    assert any("ETA" in line for line in lines)

    with pytest.raises(ConfigError, match="attacks.csv exists: attack.py does not overwrite"):
        attacks.run([runs["cnn"]], str(out), epsilons=[0.1], num_images=2,
                    dataset_dir=runs["dataset_dir"], log=lines.append)
    # --overwrite: the three outputs are replaced (one new event file), other files kept.
    (out / "notes.txt").write_text("mine")
    rows = attacks.run([runs["cnn"]], str(out), epsilons=[0.1], attacks=["fgsm"], num_images=2,
                       dataset_dir=runs["dataset_dir"], overwrite=True, log=lines.append)
    with open(out / "attacks.csv", newline="") as f:
        assert len(list(csv.DictReader(f))) == 1
    assert len(os.listdir(out / "tensorboard")) == 1
    assert (out / "notes.txt").read_text() == "mine"


def test_attack_py_refuses_to_overwrite_with_one_error_line(runs, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "attacks.png").write_bytes(b"not ours")
    proc = subprocess.run(
        [sys.executable, "attack.py", f"--log_dir={runs['cnn']}", f"--out={out}",
         "--epsilons=0.1", "--num_images=2"], cwd=REPO, capture_output=True, text=True,
        timeout=300)
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        f"error: {out}/attacks.png exists: attack.py does not overwrite files; pass "
        f"--overwrite or another --out")
    assert (out / "attacks.png").read_bytes() == b"not ours"
    assert sorted(os.listdir(out)) == ["attacks.png"]
