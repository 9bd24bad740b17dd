"""capsem: Matrix capsules with EM routing (Hinton, Sabour & Frosst, ICLR 2018).

A TensorFlow 2 / Keras 3 port of the TF1 code of Jonathan Hui's article
"Understanding Matrix capsules with EM Routing", numerically faithful to it.

Modules:
  ops:      tensor functions named after the article's (kernel_tile, mat_transform,
            coord_addition, m_step, e_step, em_routing).
  layers:   Keras layers PrimaryCaps, ConvCaps, ClassCaps (imported, and so
            registered with Keras, by `import capsem`).
  nets:     capsules_net(), the article's network as a keras.Model.
  losses:   spread_loss and the article's margin schedule.
  compat:   load_article_weights() for TF1 checkpoints of the article's train.py.
  datasets: MNIST IDX / TFRecord / tensorflow-datasets input pipelines.
  training: the training and evaluation loops used by train.py.
"""

__version__ = "0.1.0"

from capsem import errors  # noqa: F401

# Registers the layers with Keras (keras.saving.register_keras_serializable),
# so that keras.models.load_model reads a saved capsem model after only
# `import capsem`. This imports TensorFlow; the native routing kernels are
# still compiled and loaded only when routing first runs (capsem.native).
from capsem import layers  # noqa: F401
