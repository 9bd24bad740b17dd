"""Errors and round trips of capsem.compat (loading the article's TF1 weights)."""

import os

import numpy as np
import pytest

from capsem import compat, nets
from capsem.errors import CheckpointError
from conftest import GOLDEN, golden_weights


@pytest.fixture(scope="module")
def article_weights(golden):
    return golden_weights(golden("capsules_net"))


def _fresh_model():
    return nets.capsules_net()


def test_export_round_trip(article_weights):
    model = _fresh_model()
    compat.load_article_weights(model, article_weights)
    exported = compat.export_article_weights(model)
    assert list(exported) == list(article_weights)
    for name, value in article_weights.items():
        np.testing.assert_array_equal(exported[name], value)


def test_missing_variable_names_it_and_assigns_nothing(article_weights):
    model = _fresh_model()
    before = compat.export_article_weights(model)
    partial = dict(article_weights)
    del partial["capsules_em/conv_caps2/votes/w"]
    with pytest.raises(CheckpointError, match=r"no value for model variable "
                                              r"capsules_em/conv_caps2/votes/w \(shape "
                                              r"\(1, 288, 32, 4, 4\)\)"):
        compat.load_article_weights(model, partial)
    for name, value in compat.export_article_weights(model).items():
        np.testing.assert_array_equal(value, before[name])


def test_unknown_variable_is_an_error(article_weights):
    extra = dict(article_weights, **{"capsules_em/conv_caps3/votes/w": np.zeros((1, 2))})
    with pytest.raises(CheckpointError, match=r"holds capsules_em/conv_caps3/votes/w \(shape "
                                              r"\(1, 2\)\), which this model does not have"):
        compat.load_article_weights(_fresh_model(), extra)
    # Optimizer slots and counters of the article's checkpoints are ignored.
    slots = dict(article_weights, **{"capsules_em/relu_conv1/weights/Adam": np.zeros(1),
                                     "global_step": np.int64(3), "beta1_power": 0.9})
    compat.load_article_weights(_fresh_model(), slots)


def test_shape_mismatch_names_both_shapes(article_weights):
    small = nets.capsules_net(C=16)
    with pytest.raises(CheckpointError, match=r"shape mismatch for capsules_em/conv_caps1/votes/w:"
                                              r" source \(1, 288, 32, 4, 4\), model "
                                              r"\(1, 288, 16, 4, 4\)"):
        compat.load_article_weights(small, article_weights)


def test_bad_checkpoint_paths(tmp_path):
    with pytest.raises(CheckpointError, match=r"no TF checkpoint state file"):
        compat.load_article_weights(_fresh_model(), str(tmp_path))
    with pytest.raises(CheckpointError, match=r"nothing.ckpt: not a readable TF checkpoint"):
        compat.load_article_weights(_fresh_model(), str(tmp_path / "nothing.ckpt"))
    with pytest.raises(CheckpointError, match=r"source must be a checkpoint path or a mapping"):
        compat.load_article_weights(_fresh_model(), 42)


def test_read_article_checkpoint_skips_optimizer_state():
    values = compat.read_article_checkpoint(os.path.join(GOLDEN, "article_ckpt"))
    assert len(values) == 15
    assert all(name.startswith("capsules_em/") and not name.endswith(("Adam", "Adam_1"))
               for name in values)
