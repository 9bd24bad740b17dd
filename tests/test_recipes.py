"""Recipes (--recipe), their schedules, and a short training run of the paper recipe."""

import json
import os

import numpy as np
import pytest
import tensorflow as tf

from capsem import datasets, losses, nets, recipes, step, training
from capsem.errors import ConfigError
from mnist_fixtures import IDX_NAMES, make_tiny_tfrecords, write_idx
from test_training import read_events, tiny_config


def test_article_recipe_is_the_default_and_keeps_the_article_values():
    config = training.TrainConfig()
    for key, value in recipes.ARTICLE.items():
        assert getattr(config, key) == value, key
    assert config.recipe == "article" and config.routing == "article"
    assert training.TrainConfig.from_recipe("article") == config


def test_paper_recipe_shifts_mnist_only():
    for dataset, shift in (("mnist", 2), ("fashion_mnist", 2), ("smallnorb", 0)):
        config = training.TrainConfig.from_recipe("paper", dataset=dataset)
        assert config.random_shift == shift, dataset
    # Given, a shift is kept (and refused by smallNORB's pipeline); the article never shifts.
    assert training.TrainConfig.from_recipe("paper", dataset="smallnorb",
                                            random_shift=1).random_shift == 1
    assert training.TrainConfig.from_recipe("article", dataset="mnist").random_shift == 0
    paper = training.TrainConfig.from_recipe("paper")
    assert (paper.weight_decay, paper.lr_decay_max_epochs,
            paper.random_shift_after_epochs) == (1e-2, 7.0, 1)
    # Rotations and scalings: MNIST-like datasets with the paper recipe only.
    for recipe, dataset, expected in (("paper", "mnist", (10.0, 0.1)),
                                      ("paper", "fashion_mnist", (10.0, 0.1)),
                                      ("paper", "smallnorb", (0.0, 0.0)),
                                      ("article", "mnist", (0.0, 0.0))):
        config = training.TrainConfig.from_recipe(recipe, dataset=dataset)
        assert (config.random_rotation, config.random_scale) == expected, (recipe, dataset)
        config.validate()


def test_paper_recipe_averages_the_weights_on_one_device_only():
    paper = training.TrainConfig.from_recipe("paper")
    assert (paper.ema_momentum, paper.ema_warmup) == (0.999, True)
    article = training.TrainConfig.from_recipe("article")
    assert (article.ema_momentum, article.ema_warmup) == (0.0, False)
    # A distributed run cannot keep the average: the recipe's becomes none...
    mirrored = training.TrainConfig.from_recipe("paper", distribute="mirrored")
    assert (mirrored.ema_momentum, mirrored.ema_warmup) == (0.0, False)
    mirrored.validate()
    # ... but one given is kept, and refused.
    given = training.TrainConfig.from_recipe("paper", distribute="mirrored", ema_momentum=0.99)
    with pytest.raises(ConfigError, match="needs distribute='none'"):
        given.validate()
    # No average, nothing to warm up (config.json says so).
    none = training.TrainConfig.from_recipe("paper", ema_momentum=0.0)
    assert (none.ema_momentum, none.ema_warmup) == (0.0, False)


def test_paper_recipe_fills_in_only_what_is_not_given():
    config = training.TrainConfig.from_recipe("paper", learning_rate=None, final_lambda=2.5,
                                              batch_size=8)
    assert config.routing == "paper" and config.margin_schedule == "linear"
    assert config.learning_rate == recipes.PAPER["learning_rate"]
    assert config.final_lambda == 2.5 and config.batch_size == 8
    assert config.to_dict()["recipe"] == "paper"
    with pytest.raises(ConfigError, match="recipe must be one of article, paper"):
        training.TrainConfig.from_recipe("fast")
    with pytest.raises(ConfigError, match="routing must be one of article, paper"):
        training.TrainConfig(routing="fast").validate()
    with pytest.raises(ConfigError, match="lr_decay_rate must be in"):
        training.TrainConfig(lr_decay_rate=1.5).validate()


def test_paper_recipe_scales_its_ramp_for_networks_wider_than_the_small_one():
    ramp = [recipes.PAPER[k] for k in recipes.RAMP_KEYS]
    assert ramp == [0.5, 0.3, 1e-3]  # final_lambda, lambda_growth, lambda_start

    def ramp_of(**kwargs):
        config = training.TrainConfig.from_recipe(**kwargs)
        return [getattr(config, k) for k in recipes.RAMP_KEYS]

    # The small network (D=16) and smaller ones keep the ramp it was chosen on...
    assert ramp_of(recipe="paper", A=64, B=8, C=16, D=16) == ramp
    assert ramp_of(recipe="paper", D=8) == ramp
    # ... the article network (D=32, TrainConfig's default) gets half of it, 16 / D.
    np.testing.assert_allclose(ramp_of(recipe="paper"), [0.25, 0.15, 5e-4], rtol=1e-12)
    np.testing.assert_allclose(ramp_of(recipe="paper", D=64), [0.125, 0.075, 2.5e-4],
                               rtol=1e-12)
    # Given values are kept; the article recipe and the CNN baseline are not scaled.
    np.testing.assert_allclose(ramp_of(recipe="paper", final_lambda=0.8), [0.8, 0.15, 5e-4],
                               rtol=1e-12)
    assert ramp_of(recipe="article") == [recipes.ARTICLE[k] for k in recipes.RAMP_KEYS]
    assert ramp_of(recipe="paper", model="cnn") == ramp
    assert recipes.resolve("paper", {}, D=32)["final_lambda"] == 0.25
    assert recipes.resolve("paper", {})["final_lambda"] == 0.5  # D unknown


def test_margin_schedules():
    article = losses.make_margin_schedule("article", 10)
    assert [round(float(article(s)), 6) for s in (0, 10, 11, 70, 71)] == [0.2, 0.2, 0.3, 0.8, 0.9]
    linear = losses.make_margin_schedule("linear", 10, ramp_steps=100)
    np.testing.assert_allclose([float(linear(s)) for s in (0, 50, 100, 1000)],
                               [0.2, 0.55, 0.9, 0.9], rtol=1e-6)
    with pytest.raises(ValueError, match="margin schedule must be one of"):
        losses.make_margin_schedule("cosine", 10)


def test_learning_rate_decay():
    config = training.TrainConfig(learning_rate=3e-3, lr_decay_rate=0.5, lr_decay_steps=100)
    schedule = training.learning_rate(config)
    np.testing.assert_allclose([float(schedule(0)), float(schedule(100)), float(schedule(50))],
                               [3e-3, 1.5e-3, 3e-3 * 0.5 ** 0.5], rtol=1e-6)
    assert training.learning_rate(training.TrainConfig()) == 1e-3


def test_learning_rate_decay_over_the_whole_run():
    # lr_decay_steps=0: the rate reaches learning_rate * lr_decay_rate at the run's last step.
    config = training.TrainConfig(learning_rate=4e-3, lr_decay_rate=0.1, lr_decay_steps=0,
                                  epochs=1)
    schedule = training.learning_rate(config, total_steps=2500)
    np.testing.assert_allclose([float(schedule(s)) for s in (0, 1250, 2500)],
                               [4e-3, 4e-3 * 0.1 ** 0.5, 4e-4], rtol=1e-6)
    with pytest.raises(ConfigError, match="which has no last step here"):
        training.learning_rate(config, total_steps=0)
    # A run without a length cannot decay over it; a constant rate does not need one.
    with pytest.raises(ConfigError, match="needs a length: give epochs or max_steps"):
        training.TrainConfig(lr_decay_rate=0.1, lr_decay_steps=0, epochs=0).validate()
    training.TrainConfig(lr_decay_rate=1.0, lr_decay_steps=0, epochs=0).validate()
    # lr_decay_max_epochs: the span is the run's, but at most that many epochs.
    capped = training.TrainConfig(learning_rate=4e-3, lr_decay_rate=0.1, lr_decay_steps=0,
                                  lr_decay_max_epochs=1.5, epochs=0)
    capped.validate()  # the cap gives the decay a length
    for total, span in ((2500, 1500), (1000, 1000), (0, 1500)):
        schedule = training.learning_rate(capped, total_steps=total, steps_per_epoch=1000)
        np.testing.assert_allclose([float(schedule(span)), float(schedule(2 * span))],
                                   [4e-4, 4e-5], rtol=1e-6)
    with pytest.raises(ConfigError, match="lr_decay_max_epochs must be >= 0, got -1"):
        training.TrainConfig(lr_decay_max_epochs=-1).validate()
    # lr_decay_min_epochs: a shorter run decays at the pace of a run that long; with the
    # paper recipe's 7 and 7 every run decays at one pace (1000 steps per epoch here).
    paced = training.TrainConfig.from_recipe("paper", learning_rate=4e-3, epochs=1)
    assert (paced.lr_decay_min_epochs, paced.lr_decay_max_epochs) == (7.0, 7.0)
    for total in (1000, 3000, 10000, 0):
        schedule = training.learning_rate(paced, total_steps=total, steps_per_epoch=1000)
        assert schedule.decay_steps == 7000, total
        np.testing.assert_allclose([float(schedule(1000)), float(schedule(14000))],
                                   [4e-3 * 0.1 ** (1 / 7), 4e-5], rtol=1e-6)
    floor = training.TrainConfig(lr_decay_rate=0.1, lr_decay_steps=0, lr_decay_min_epochs=2.5,
                                 epochs=0)
    floor.validate()  # the floor gives the decay a length too
    for total, span in ((1000, 2500), (4000, 4000), (0, 2500)):
        assert training.learning_rate(floor, total_steps=total,
                                      steps_per_epoch=1000).decay_steps == span, total
    with pytest.raises(ConfigError, match=r"lr_decay_min_epochs \(6.0\) must not exceed "
                                          r"lr_decay_max_epochs \(5.0; 0: no limit\)"):
        training.TrainConfig(lr_decay_min_epochs=6.0, lr_decay_max_epochs=5.0).validate()
    with pytest.raises(ConfigError, match="lr_decay_min_epochs must be >= 0, got -1"):
        training.TrainConfig(lr_decay_min_epochs=-1).validate()
    with pytest.raises(ConfigError, match="lr_decay_steps must be an integer >= 0, got -1"):
        training.TrainConfig(lr_decay_steps=-1).validate()


@pytest.mark.parametrize("max_epochs, min_epochs, spans",
                         [(0, 0, (6, 9)), (1, 0, (3, 3)), (0, 4, (12, 12))])
def test_training_decays_the_rate_over_the_run_it_is_given(tmp_path, max_epochs, min_epochs,
                                                           spans):
    _, dataset_dir = make_tiny_tfrecords(tmp_path, n_train=12, n_test=10)
    # 12 images, batch 4: 3 steps per epoch, 2 epochs: the rate is 1e-3 * 0.1^(s/6), or
    # with lr_decay_max_epochs=1 1e-3 * 0.1^(s/3), with lr_decay_min_epochs=4
    # 1e-3 * 0.1^(s/12).
    decay = dict(lr_decay_rate=0.1, lr_decay_steps=0, lr_decay_max_epochs=max_epochs,
                 lr_decay_min_epochs=min_epochs, eval_every_epoch=False)
    training.train(tiny_config(tmp_path, dataset_dir, **decay))
    rates = dict(read_events(str(tmp_path / "logs"))["train/learning_rate"])
    assert sorted(rates) == [1, 2, 3, 4, 5, 6]
    np.testing.assert_allclose([float(rates[s]) for s in (1, 3, 6)],
                               [1e-3 * 0.1 ** (s / spans[0]) for s in (1, 3, 6)], rtol=1e-5)
    # Resumed with a third epoch, the decay stretches over the 9 steps of the longer run
    # (up to the cap).
    training.train(tiny_config(tmp_path, dataset_dir, epochs=3, **decay))
    rates = dict(read_events(str(tmp_path / "logs"))["train/learning_rate"])
    np.testing.assert_allclose([float(rates[s]) for s in (7, 9)],
                               [1e-3 * 0.1 ** (s / spans[1]) for s in (7, 9)], rtol=1e-5)


@pytest.mark.parametrize("routing", ["article", "paper"])
def test_weight_decay_shrinks_the_kernels_and_transforms_only(routing):
    # With zero gradients Adam's step is 0, so one step is the decay alone: every kernel
    # and transformation matrix times (1 - 0.5 * 0.1), the rest unchanged.
    model = nets.capsules_net(A=4, B=2, C=2, D=2, routing=routing)
    optimizer = step.make_optimizer(0.1, weight_decay=0.5)
    variables = model.trainable_variables
    before = [v.numpy() for v in variables]
    optimizer.apply([tf.zeros_like(v) for v in variables], variables)
    decayed = set()
    for v, old in zip(variables, before):
        if np.array_equal(v.numpy(), old):
            continue
        np.testing.assert_allclose(v.numpy(), old * np.float32(0.95), rtol=1e-6, err_msg=v.path)
        decayed.add(v.path)
    assert decayed == {"relu_conv1/kernel", "primary_caps/pose_weights",
                       "primary_caps/activation_weights", "conv_caps1/w", "conv_caps2/w",
                       "class_capsules/w"}
    # 0 (the default): Keras' Adam without weight decay, as the article's.
    assert step.make_optimizer(0.1).weight_decay is None
    for bad in (-0.1, float("nan"), float("inf")):
        with pytest.raises(ConfigError, match="weight_decay must be a finite number >= 0"):
            step.make_optimizer(0.1, weight_decay=bad)
    with pytest.raises(ConfigError, match="weight_decay must be >= 0, got -1"):
        training.TrainConfig(weight_decay=-1).validate()


def test_random_shift_moves_the_digit_and_keeps_the_background():
    image = np.zeros((28, 28, 1), np.uint8)
    image[10:14, 12:16] = 255
    seen = set()
    for k in range(40):
        out = datasets.random_shift_image(tf.constant(image), 2,
                                          tf.constant([k, 1], tf.int64)).numpy()
        ys, xs = np.nonzero(out[..., 0])
        dy, dx = ys.min() - 10, xs.min() - 12
        assert abs(dy) <= 2 and abs(dx) <= 2
        assert out.sum() == image.sum()  # the whole square, shifted
        seen.add((dy, dx))
    assert len(seen) > 10
    same = datasets.random_shift_image(tf.constant(image), 2, tf.constant([3, 1], tf.int64))
    again = datasets.random_shift_image(tf.constant(image), 2, tf.constant([3, 1], tf.int64))
    assert np.array_equal(same.numpy(), again.numpy())


def test_random_affine_image_rotates_and_scales_about_the_centre():
    image = np.zeros((28, 28, 1), np.uint8)
    image[6:22, 13:15] = 255  # a vertical bar through the centre
    pair = tf.constant([4, 1], tf.int64)
    # No rotation, no scaling: the image itself.
    same = datasets.random_affine_image(tf.constant(image), 0.0, 0.0, pair).numpy()
    np.testing.assert_array_equal(same, image)
    angles, spans = [], []
    for k in range(30):
        seed = tf.constant([k, 1], tf.int64)
        out = datasets.random_affine_image(tf.constant(image), 10.0, 0.0, seed).numpy()
        assert out.dtype == np.uint8 and out.shape == image.shape
        np.testing.assert_array_equal(out, datasets.random_affine_image(
            tf.constant(image), 10.0, 0.0, seed).numpy())  # stateless
        ys, xs = np.nonzero(out[..., 0] > 127)
        # The bar stays centred; its tilt is at most 10 degrees.
        assert abs(ys.mean() - 13.5) < 0.6 and abs(xs.mean() - 13.5) < 0.6
        slope = np.polyfit(ys, xs, 1)[0]
        angles.append(np.degrees(np.arctan(slope)))
        scaled = datasets.random_affine_image(tf.constant(image), 0.0, 0.1, seed).numpy()
        ys, _ = np.nonzero(scaled[..., 0] > 127)
        spans.append(ys.max() - ys.min() + 1)
    assert max(abs(a) for a in angles) <= 10.5 and max(abs(a) for a in angles) > 5
    assert min(angles) < 0 < max(angles)
    # Scaled by 0.9-1.1: the bar of 16 pixels is 14-18 long, and not always 16.
    assert 14 <= min(spans) and max(spans) <= 18 and len(set(spans)) > 1


def _elastic_reference(image, alpha, sigma, field):
    """float64 numpy: Simard et al.'s elastic distortion of `image` (H, W, C) by the
    uniform draws `field` (H, W, 2) (dy, dx), before rounding."""
    height, width = image.shape[:2]
    radius = int(np.ceil(3 * sigma))
    taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    taps /= taps.sum()
    # Zeros beyond the image: the field padded by the kernel's radius on each side.
    padded = np.pad(field, [(radius, radius), (radius, radius), (0, 0)])
    rows = sum(t * padded[k:k + height] for k, t in enumerate(taps))  # (H, W + 2r, 2)
    smooth = alpha * sum(t * rows[:, k:k + width] for k, t in enumerate(taps))  # (H, W, 2)
    out = np.zeros(image.shape, np.float64)
    for i in range(height):
        for j in range(width):
            y, x = i + smooth[i, j, 0], j + smooth[i, j, 1]
            y0, x0 = int(np.floor(y)), int(np.floor(x))
            for yy, wy in ((y0, 1 - (y - y0)), (y0 + 1, y - y0)):
                for xx, wx in ((x0, 1 - (x - x0)), (x0 + 1, x - x0)):
                    if 0 <= yy < height and 0 <= xx < width:  # outside: the background, 0
                        out[i, j] += wy * wx * image[yy, xx]
    return out


def test_random_elastic_image_against_a_numpy_reference():
    rng = np.random.default_rng(3)
    image = rng.integers(0, 256, size=(13, 11, 2)).astype(np.uint8)  # odd, 2 channels
    for alpha, sigma, k in ((34.0, 4.0, 0), (8.0, 1.5, 1), (3.0, 0.7, 2)):
        pair = tf.constant([k, 5], tf.int64)
        out = datasets.random_elastic_image(tf.constant(image), alpha, sigma, pair).numpy()
        assert out.dtype == np.uint8 and out.shape == image.shape
        # The field: the uniform draws of the seed folded with 11 (the docstring's contract).
        field = tf.random.stateless_uniform(
            [1, 13, 11, 2], seed=tf.random.experimental.stateless_fold_in(pair, 11),
            minval=-1.0, maxval=1.0).numpy()[0].astype(np.float64)
        want = _elastic_reference(image.astype(np.float64), alpha, sigma, field)
        assert np.abs(out - want).max() <= 0.5 + 1e-3, (alpha, sigma)  # rounded, float32
        np.testing.assert_array_equal(out, datasets.random_elastic_image(
            tf.constant(image), alpha, sigma, pair).numpy())  # stateless
        assert np.abs(out.astype(int) - image).mean() > 5  # it did move the pixels
    # alpha 0 is the image itself; another seed, another field.
    pair = tf.constant([1, 2], tf.int64)
    np.testing.assert_array_equal(
        datasets.random_elastic_image(tf.constant(image), 0.0, 4.0, pair).numpy(), image)
    digit = np.zeros((28, 28, 1), np.uint8)
    digit[6:22, 12:16] = 255
    outs = [datasets.random_elastic_image(tf.constant(digit), 34.0, 4.0,
                                          tf.constant([k, 2], tf.int64)).numpy()
            for k in range(10)]
    assert len({o.tobytes() for o in outs}) == 10
    for out in outs:  # Simard's values bend and stretch the bar by pixels
        moved = np.abs(np.nonzero(out[..., 0] > 127)[1].mean() - 13.5)
        assert moved < 4 and 0.6 < out.sum() / digit.sum() < 1.4
    assert max(np.abs(o.astype(int) - digit).sum() for o in outs) > 20 * 255


def test_augmentation_starts_after_the_epochs_the_config_gives(tmp_path):
    _, dataset_dir = make_tiny_tfrecords(tmp_path, n_train=12, n_test=10)
    config = tiny_config(tmp_path, dataset_dir, random_shift=2, random_shift_after_epochs=1,
                         random_rotation=10.0, random_scale=0.1)
    trainer = training._Trainer(config, num_train=12)

    def images(ds):
        return np.concatenate([x.numpy() for x, _ in ds])

    def expected(epoch, shift, rotation=0.0, scale=0.0):
        return images(datasets.make_dataset(
            "mnist", "train", dataset_dir=dataset_dir, data_source="tfrecord", batch_size=4,
            training=True, seed=config.seed + epoch, random_shift=shift,
            random_rotation=rotation, random_scale=scale))

    first, second = images(trainer.train_dataset(0, 0)), images(trainer.train_dataset(1, 0))
    np.testing.assert_array_equal(first, expected(0, 0))  # the images as they are
    np.testing.assert_array_equal(second, expected(1, 2, 10.0, 0.1))  # augmented
    assert not np.array_equal(second, expected(1, 2))  # rotated and scaled, not only shifted
    assert not np.array_equal(second, expected(1, 0))
    # Rotations alone (no shift) are applied too.
    assert not np.array_equal(expected(1, 0, 10.0), expected(1, 0))
    # Elastic distortions, from the same epoch on, on top of the others.
    config = tiny_config(tmp_path, dataset_dir, random_shift=2, random_shift_after_epochs=1,
                         random_rotation=10.0, random_scale=0.1, random_elastic=20.0,
                         elastic_sigma=3.0)
    trainer = training._Trainer(config, num_train=12)
    np.testing.assert_array_equal(images(trainer.train_dataset(0, 0)), expected(0, 0))
    elastic = images(trainer.train_dataset(1, 0))
    np.testing.assert_array_equal(elastic, images(datasets.make_dataset(
        "mnist", "train", dataset_dir=dataset_dir, data_source="tfrecord", batch_size=4,
        training=True, seed=config.seed + 1, random_shift=2, random_rotation=10.0,
        random_scale=0.1, random_elastic=20.0, elastic_sigma=3.0)))
    assert not np.array_equal(elastic, second)
    with pytest.raises(ConfigError, match="random_shift_after_epochs must be an integer >= 0"):
        training.TrainConfig(random_shift_after_epochs=-1).validate()
    for kwargs, message in ((dict(random_rotation=-1.0), r"random_rotation must be a number "
                                                         r"of degrees in \[0, 180\], got -1.0"),
                            (dict(random_rotation=float("nan")), "random_rotation must be"),
                            (dict(random_scale=1.0), r"random_scale must be a number in "
                                                     r"\[0, 1\), got 1.0")):
        with pytest.raises(ConfigError, match=message):
            training.TrainConfig(**kwargs).validate()
    for kwargs, message in ((dict(random_elastic=-1.0), r"random_elastic must be a number "
                                                        r"of pixels in \[0, 100\], got -1.0"),
                            (dict(random_elastic=True), "random_elastic must be"),
                            (dict(random_elastic=34.0, elastic_sigma=0.0),
                             r"elastic_sigma must be a number of pixels in \[0.5, 20\], "
                             r"got 0.0")):
        with pytest.raises(ConfigError, match=message):
            training.TrainConfig(**kwargs).validate()
    from capsem.errors import DataError
    with pytest.raises(DataError, match=r"random_scale must be a number in \[0, 1\)"):
        datasets.make_dataset("mnist", "train", dataset_dir=dataset_dir, training=True, seed=1,
                              random_scale=1.5)
    with pytest.raises(DataError, match="random_rotation applies to MNIST-like datasets"):
        datasets.make_dataset("smallnorb", "train", data_source="tfds", training=True, seed=1,
                              random_rotation=5.0)
    with pytest.raises(DataError, match="random_elastic applies to MNIST-like datasets"):
        datasets.make_dataset("smallnorb", "train", data_source="tfds", training=True, seed=1,
                              random_elastic=34.0)
    with pytest.raises(DataError, match=r"elastic_sigma must be a number of pixels"):
        datasets.make_dataset("mnist", "train", dataset_dir=dataset_dir, training=True, seed=1,
                              random_elastic=34.0, elastic_sigma=50.0)


def _two_classes(rng, n):
    """Two classes: noisy dark images (label 0) or noisy bright ones (label 1)."""
    labels = rng.integers(0, 2, size=n).astype(np.uint8)
    base = np.where(labels[:, None, None] == 1, 170, 20)
    images = (base + rng.integers(0, 80, size=(n, 28, 28))).astype(np.uint8)
    return images, labels


def test_paper_recipe_learns_a_two_class_problem(tmp_path):
    rng = np.random.default_rng(0)
    source = tmp_path / "idx"
    source.mkdir()
    for split, n in (("train", 160), ("test", 60)):
        images, labels = _two_classes(rng, n)
        write_idx(os.path.join(source, IDX_NAMES[split][0]), images)
        write_idx(os.path.join(source, IDX_NAMES[split][1]), labels)
    dataset_dir = str(tmp_path / "tfrecords")
    datasets.convert_mnist(str(source), dataset_dir, expected_counts=(160, 60))
    config = training.TrainConfig.from_recipe(
        "paper", dataset_dir=dataset_dir, log_dir=str(tmp_path / "logs"), batch_size=8,
        eval_batch_size=20, iterations=None, A=8, B=4, C=4, D=4, epochs=3, seed=1,
        summary_secs=3600, histogram_secs=3600, checkpoint_secs=3600, log_every_steps=100,
        jit_compile=False, learning_rate=None, margin_ramp_epochs=0.5, lambda_growth=0.02)
    # The schedules that count epochs are shortened for this run of 480 images (an MNIST
    # epoch is 60,000): the margin reaches 0.9 after half an epoch, and the inverse
    # temperature grows by 0.02 per epoch (the recipe: 0.3), so that it stays below 0.07,
    # where the class activations are not yet saturated (with 0.1 per epoch they saturate
    # within this run and the two classes tie).
    result = training.train(config)
    losses_ = result["history"]["loss"]  # 20 steps per epoch; the margin is 0.9 from step 10
    assert np.mean(losses_[-10:]) < 0.2 * np.mean(losses_[10:20]), losses_
    assert result["test"]["accuracy"] >= 0.9, result["test"]  # chance: 0.5
    saved = json.load(open(os.path.join(config.log_dir, "config.json")))
    assert saved["recipe"] == "paper" and saved["routing"] == "paper"
    assert saved["learning_rate"] == recipes.PAPER["learning_rate"]


def test_a_checkpoint_of_one_routing_is_not_resumed_with_the_other(tmp_path):
    from mnist_fixtures import make_tiny_tfrecords

    _, dataset_dir = make_tiny_tfrecords(tmp_path)
    common = dict(dataset_dir=dataset_dir, log_dir=str(tmp_path / "logs"), batch_size=4,
                  eval_batch_size=5, A=4, B=2, C=2, D=2, max_steps=1, seed=3,
                  summary_secs=3600, histogram_secs=3600, checkpoint_secs=3600,
                  jit_compile=False, eval_every_epoch=False)
    training.train(training.TrainConfig.from_recipe("article", **common))
    # The recipe's inverse temperature ramp adds weights, and its ReLU Conv1 has no padding:
    # another architecture.
    with pytest.raises(ConfigError, match=r"different architecture: lambda_schedule="
                                          r"'iterations' \(this run: 'ramp'\)"):
        training.train(training.TrainConfig.from_recipe("paper", **common))
    with pytest.raises(ConfigError, match=r"routing='article' \(this run: 'paper'\)"):
        training.train(training.TrainConfig.from_recipe(
            "paper", lambda_schedule="iterations", conv1_padding="same", **common))


def test_conv1_batch_norm():
    """--conv1_batch_norm: conv (no bias) -> batch norm -> ReLU; training updates the moving
    statistics, inference uses them (an image's output does not depend on its batch)."""

    with pytest.raises(ValueError, match="conv1_batch_norm must be True or False"):
        nets.capsules_net(A=8, B=4, C=4, D=4, conv1_batch_norm=1)
    with pytest.raises(ConfigError, match="conv1_batch_norm must be True or False"):
        training.TrainConfig(conv1_batch_norm="yes").validate()
    plain = nets.capsules_net(A=8, B=4, C=4, D=4)
    model = nets.capsules_net(A=8, B=4, C=4, D=4, routing="paper", iterations=2,
                              conv1_batch_norm=True)
    names = [layer.name for layer in model.layers]
    assert names[1:4] == ["relu_conv1", "conv1_batch_norm", "conv1_relu"]
    assert model.get_layer("relu_conv1").bias is None
    # The conv bias (A) is replaced by the batch norm's gamma and beta (2A).
    assert model.count_params() == plain.count_params() + 8 + 2 * 8
    rng = np.random.default_rng(0)
    images = rng.uniform(-1, 1, (6, 28, 28, 1)).astype(np.float32)
    bn = model.get_layer("conv1_batch_norm")
    before = bn.moving_mean.numpy().copy()
    train_step = step.TrainStep(model, step.make_optimizer(3e-3), iterations_per_epoch=10)
    train_step(images, np.arange(6) % 10)
    assert np.abs(bn.moving_mean.numpy() - before).max() > 1e-6
    whole = model(images, training=False)[1].numpy()
    single = model(images[:1], training=False)[1].numpy()
    np.testing.assert_allclose(single, whole[:1], rtol=1e-4, atol=1e-6)
    assert recipes.ARTICLE["conv1_batch_norm"] is False


def test_the_average_flags_reach_the_config():
    """--ema_momentum / --ema_warmup default to the recipe's values; given ones win."""
    from absl import flags

    import cap_config
    import mnist_config  # noqa: F401  (defines the data flags)

    def config_of(argv):
        try:
            flags.FLAGS(["train.py", *argv])
            return cap_config.config_from_flags(flags.FLAGS)
        finally:
            flags.FLAGS.unparse_flags()

    # The ramp's scale follows --D (the article network's default D=32: half the ramp).
    for argv, want in ((["--recipe=paper"], 0.25), (["--recipe=paper", "--D=16"], 0.5),
                       (["--recipe=paper", "--final_lambda=0.7"], 0.7), ([], 1.0)):
        assert config_of(argv).final_lambda == want, argv
    for argv, want in ((["--recipe=paper"], (0.999, True)),
                       (["--recipe=paper", "--ema_momentum=0"], (0.0, False)),
                       (["--recipe=paper", "--distribute=mirrored"], (0.0, False)),
                       (["--recipe=paper", "--noema_warmup"], (0.999, False)),
                       ([], (0.0, False)),
                       (["--ema_momentum=0.99", "--ema_warmup"], (0.99, True))):
        config = config_of(argv)
        assert (config.ema_momentum, config.ema_warmup) == want, argv
    # Elastic distortions: off in both recipes, sigma 4 unless given; the decay's shortest
    # span: the paper recipe's 7 epochs.
    for argv, want in ((["--recipe=paper"], (0.0, 4.0, 7.0)), ([], (0.0, 4.0, 0.0)),
                       (["--recipe=paper", "--random_elastic=34"], (34.0, 4.0, 7.0)),
                       (["--random_elastic=20", "--elastic_sigma=6", "--lr_decay_min_epochs=2"],
                        (20.0, 6.0, 2.0))):
        config = config_of(argv)
        assert (config.random_elastic, config.elastic_sigma,
                config.lr_decay_min_epochs) == want, argv
