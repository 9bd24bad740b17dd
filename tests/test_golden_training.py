"""The training step against the article's own training graph (tests/data/golden/article_ckpt)."""

import numpy as np
import pytest

from capsem import compat, datasets, nets
from capsem import step as step_lib
from conftest import assert_close, golden_weights


@pytest.mark.parametrize("micro_batch_size,jit_compile", [("default", True), (1, False)])
def test_three_article_training_steps(golden, micro_batch_size, jit_compile):
    """Adam 1e-3 (epsilon 1e-8), per-variable clipping at 4.0, margin schedule with ipe = 1."""
    d = golden("capsules_net")
    e = golden("article_ckpt/expected")
    model = nets.capsules_net()
    compat.load_article_weights(model, golden_weights(d))
    kwargs = {} if micro_batch_size == "default" else {"micro_batch_size": micro_batch_size}
    lr = float(e["learning_rate"])
    train_step = step_lib.TrainStep(model, step_lib.make_optimizer(lr),
                                    int(e["iterations_per_epoch"]),
                                    clip_norm=float(e["clip_gradient_norm"]),
                                    jit_compile=jit_compile, **kwargs)
    images = datasets.preprocess_image(e["train_images_uint8"])
    outs = [train_step(images, e["train_labels"]) for _ in range(int(e["num_steps"]))]
    np.testing.assert_array_equal([o["margin"].numpy() for o in outs], e["step_margins"])
    assert all(bool(o["finite"]) for o in outs)
    assert int(train_step.global_step.numpy()) == int(e["final_global_step"])
    assert int(train_step.optimizer.iterations.numpy()) == int(e["num_steps"])
    assert_close([o["loss"].numpy() for o in outs], e["step_losses"], 1e-4, what="step losses")

    # Trained weights: the article's README for this data allows a few elements whose
    # gradient is near 0 to move by up to 2 * lr per step (Adam's first update is
    # ~lr * sign(g)); all others must agree to 1e-5 of the array's maximum.
    variables = nets.article_variables(model)
    budget = 2 * lr * int(e["num_steps"])
    outside, total = 0, 0
    for name, key in zip(e["model_variable_names"], e["model_variable_keys"]):
        ref = e[str(key)]
        got = variables[str(name)].numpy()
        diff = np.abs(got - ref)
        assert diff.max() <= budget, f"{name}: an element moved {diff.max():.3g} from the reference"
        outside += int(np.sum(diff > 1e-5 * np.max(np.abs(ref))))
        total += ref.size
    assert outside <= 1e-3 * total, f"{outside} of {total} trained weights beyond 1e-5 * max|ref|"
