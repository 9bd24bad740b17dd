"""Loading weights of the article's TF1 code into capsem models."""

import os

import numpy as np
import tensorflow as tf

from capsem import nets
from capsem.errors import CheckpointError

#: Checkpoint variables of the article's training graph that are not model weights.
_NON_MODEL_SUFFIXES = ("/Adam", "/Adam_1", "/ExponentialMovingAverage")
_NON_MODEL_NAMES = ("beta1_power", "beta2_power", "global_step")


def _is_model_name(name):
    if name in _NON_MODEL_NAMES or name.endswith(_NON_MODEL_SUFFIXES):
        return False
    return True


def read_article_checkpoint(path):
    """Reads the model weights of a TF1 checkpoint written by the article's train.py.

    Args:
      path: a checkpoint prefix (`.../model.ckpt-3`) or a directory holding a
        `checkpoint` state file.

    Returns:
      a dict `{tf1_variable_name: ndarray}` without the optimizer slots,
      `beta1_power`, `beta2_power` and `global_step`.
    """
    prefix = path
    if os.path.isdir(path):
        prefix = tf.train.latest_checkpoint(path)
        if prefix is None:
            raise CheckpointError(f"{path}: no TF checkpoint state file ('checkpoint') in this directory")
    try:
        reader = tf.train.load_checkpoint(prefix)
    except (tf.errors.OpError, ValueError) as e:
        raise CheckpointError(
            f"{prefix}: not a readable TF checkpoint ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''})") from None
    names = reader.get_variable_to_shape_map()
    return {name: reader.get_tensor(name) for name in sorted(names) if _is_model_name(name)}


def load_article_weights(model, source, scope="capsules_em"):
    """Puts weights of the article's TF1 network into a `capsules_net` model.

    Args:
      model: a model built by `capsem.nets.capsules_net` (layer names as the
        article's scopes).
      source: a TF1 checkpoint prefix or directory written by the article's
        train.py (optimizer slots, `beta1_power`, `beta2_power` and
        `global_step` are ignored), or a mapping `{tf1_variable_name: array}`
        such as `{"capsules_em/conv_caps1/votes/w": ...}`.
      scope: the network's TF1 scope (`capsules_em` in the article's train.py).

    Returns:
      the list of TF1 names that were loaded, in the article's creation order.

    Raises:
      CheckpointError: if a model variable has no value in `source`, `source`
        holds a name the model does not have, or a shape differs; the message
        names the variable and both shapes. Nothing is assigned in that case.
    """
    if isinstance(source, (str, os.PathLike)):
        values = read_article_checkpoint(os.fspath(source))
    else:
        try:
            values = {str(k): v for k, v in dict(source).items() if _is_model_name(str(k))}
        except (TypeError, ValueError):
            raise CheckpointError(
                f"source must be a checkpoint path or a mapping {{tf1_name: array}}, "
                f"got {type(source).__name__}") from None
    targets = nets.article_variables(model, scope=scope)
    missing = [name for name in targets if name not in values]
    unknown = sorted(name for name in values if name not in targets)
    if missing:
        raise CheckpointError(
            f"the source has no value for model variable {missing[0]} (shape "
            f"{tuple(targets[missing[0]].shape)})"
            + (f" and {len(missing) - 1} more" if len(missing) > 1 else ""))
    if unknown:
        raise CheckpointError(
            f"the source holds {unknown[0]} (shape {np.shape(values[unknown[0]])}), "
            f"which this model does not have; model variables are under '{scope}/'"
            + (f" ({len(unknown) - 1} more unknown)" if len(unknown) > 1 else ""))
    arrays = {}
    for name, var in targets.items():
        array = np.asarray(values[name])
        if tuple(array.shape) != tuple(var.shape):
            raise CheckpointError(
                f"shape mismatch for {name}: source {tuple(array.shape)}, model {tuple(var.shape)}")
        arrays[name] = array.astype(np.float32)
    for name, var in targets.items():
        var.assign(arrays[name])
    return list(targets)


def export_article_weights(model, scope="capsules_em"):
    """The model's weights as `{tf1_variable_name: ndarray}` (the inverse of loading)."""
    return {name: np.asarray(var.numpy()) for name, var in
            nets.article_variables(model, scope=scope).items()}
