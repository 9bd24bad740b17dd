"""Saved `.keras` models load in a fresh process after only `import capsem`."""

import os
import subprocess
import sys

import keras
import numpy as np

from capsem import nets
from conftest import REPO, assert_close


def test_import_capsem_registers_the_layers_for_load_model(tmp_path):
    keras.utils.set_random_seed(0)
    model = nets.capsules_net(A=4, B=4, C=4, D=4, iterations=2, input_shape=(14, 14, 1))
    x = np.random.RandomState(0).uniform(-1, 1, (3, 14, 14, 1)).astype(np.float32)
    poses, activations = model(x)
    path = str(tmp_path / "model.keras")
    model.save(path)
    np.save(tmp_path / "x.npy", x)
    code = (
        "import capsem, keras\n"
        "import numpy as np\n"
        f"model = keras.models.load_model({path!r})\n"
        f"poses, activations = model(np.load({str(tmp_path / 'x.npy')!r}))\n"
        f"np.save({str(tmp_path / 'poses.npy')!r}, poses)\n"
        f"np.save({str(tmp_path / 'activations.npy')!r}, activations)\n")
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert_close(np.load(tmp_path / "poses.npy"), poses, 1e-6, what="poses")
    assert_close(np.load(tmp_path / "activations.npy"), activations, 1e-6, what="activations")
