"""export.py / capsem.export: a SavedModel that runs without capsem, and the .keras file.

A tiny network is trained for 2 steps on generated MNIST with each routing (the
article's and the paper's), exported, and the exports' outputs are compared with
those of the checkpoint's network evaluated as train.py evaluates it (native kernels)
on a batch of the test images, within 1e-5 of the largest value.
"""

import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest

from conftest import REPO

ROUTINGS = ("article", "paper")


@pytest.fixture(scope="module")
def trained(tiny_runs):
    """{routing: (log_dir, dataset_dir)} of the tiny runs of conftest.py."""
    return {routing: (tiny_runs[routing], tiny_runs["dataset_dir"]) for routing in ROUTINGS}


def _test_images(dataset_dir):
    from capsem import datasets

    images, _ = datasets.read_image_tfrecord(os.path.join(dataset_dir, "mnist_test.tfrecord"),
                                             (28, 28, 1), 10)
    return np.array(images)  # (6, 28, 28, 1) uint8


def _reference(log_dir, images):
    """The checkpoint's network as train.py evaluates it: (poses, activations)."""
    from capsem import datasets, step, training

    model, _, _, _ = training.load_trained(log_dir)
    poses, activations = step.make_eval_step(model)(datasets.preprocess_image(images))
    return poses.numpy(), activations.numpy()


def _close(got, expected, what):
    bound = 1e-5 * max(np.max(np.abs(expected)), 1e-30)
    diff = np.max(np.abs(np.asarray(got) - expected))
    assert diff <= bound, f"{what}: max diff {diff:.3g} > 1e-5 * max ({bound:.3g})"


def test_saved_model_runs_without_capsem_and_equals_the_checkpoint(trained, tmp_path):
    from capsem import export

    out = {}
    for routing, (log_dir, dataset_dir) in trained.items():
        export_dir = str(tmp_path / routing)
        info = export.export(log_dir, export_dir, log=lambda line: None)
        assert info["step"] == 2 and info["routing"] == routing
        assert sorted(os.listdir(export_dir)) == ["export.json", "model.keras", "serving"]
        assert not [n for n in os.listdir(tmp_path) if n.startswith(".capsem-export-")]
        images = _test_images(dataset_dir)
        np.save(tmp_path / f"{routing}_x.npy", images)
        out[routing] = (export_dir, images, _reference(log_dir, images))

    # A fresh process from another directory, where `import capsem` fails.
    code = (
        "import sys\n"
        "sys.modules['capsem'] = None  # import capsem raises ImportError\n"
        "import json, numpy as np, tensorflow as tf\n"
        "try:\n"
        "    import capsem\n"
        "    raise SystemExit('capsem is importable')\n"
        "except ImportError:\n"
        "    pass\n"
        "for routing in sys.argv[1:]:\n"
        f"    root = {str(tmp_path)!r}\n"
        "    loaded = tf.saved_model.load(f'{root}/{routing}/serving/1')\n"
        "    serve = loaded.signatures['serving_default']\n"
        "    spec = serve.structured_input_signature[1]['images']\n"
        "    assert spec.dtype == tf.uint8 and spec.shape.as_list() == [None, 28, 28, 1], spec\n"
        "    ops = {op.type for op in serve.graph.get_operations()}\n"
        "    for f in serve.graph._functions.values():\n"
        "        ops |= {op.type for op in f.graph.get_operations()}\n"
        "    assert not [t for t in ops if t.startswith('Capsem')], ops\n"
        "    res = serve(images=tf.constant(np.load(f'{root}/{routing}_x.npy')))\n"
        "    for k, v in res.items():\n"
        "        np.save(f'{root}/{routing}_{k}.npy', v.numpy())\n"
        "print('capsem' in sys.modules and sys.modules['capsem'] is not None)\n")
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    env.pop("PYTHONPATH", None)
    result = subprocess.run([sys.executable, "-c", code, *ROUTINGS], cwd=str(tmp_path), env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == "False"
    for routing, (export_dir, images, (poses, activations)) in out.items():
        got_a = np.load(tmp_path / f"{routing}_activations.npy")
        got_p = np.load(tmp_path / f"{routing}_poses.npy")
        ids = np.load(tmp_path / f"{routing}_class_ids.npy")
        assert got_a.shape == (6, 10) and got_p.shape == (6, 10, 4, 4) and ids.shape == (6,)
        _close(got_a, activations, f"{routing} activations")
        _close(got_p, poses, f"{routing} poses")
        np.testing.assert_array_equal(ids, np.argmax(got_a, -1))
        with open(os.path.join(export_dir, "export.json")) as f:
            assert json.load(f)["serving"]["input"]["images"] == ["uint8", [None, 28, 28, 1]]

        # The .keras file: keras.models.load_model after import capsem.
        from capsem import datasets

        model = keras.models.load_model(os.path.join(export_dir, "model.keras"))
        k_poses, k_acts = model(datasets.preprocess_image(images), training=False)
        _close(k_acts, activations, f"{routing} .keras activations")
        _close(k_poses, poses, f"{routing} .keras poses")


def test_export_never_overwrites_without_the_flag(trained, tmp_path):
    log_dir, _ = trained["article"]
    export_dir = tmp_path / "mine"
    export_dir.mkdir()
    (export_dir / "notes.txt").write_text("mine")
    (export_dir / "model.keras").write_text("not a model")
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    run = subprocess.run([sys.executable, "export.py", f"--log_dir={log_dir}",
                          f"--export_dir={export_dir}"], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 1
    errors = [line for line in run.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: export_dir {export_dir} is not empty; choose a new directory "
                      f"or pass --overwrite to replace serving, model.keras, export.json in it"]
    assert (export_dir / "model.keras").read_text() == "not a model"

    from capsem import export

    export.export(log_dir, str(export_dir), overwrite=True, log=lambda line: None)
    assert (export_dir / "notes.txt").read_text() == "mine"  # other files are kept
    assert sorted(os.listdir(export_dir)) == ["export.json", "model.keras", "notes.txt",
                                              "serving"]
    keras.models.load_model(str(export_dir / "model.keras"))

    from capsem.errors import CheckpointError

    with pytest.raises(CheckpointError, match="no config.json"):
        export.export(str(tmp_path / "nothing"), str(tmp_path / "out"))


def test_tools_for_capsules_refuse_a_cnn_log_dir(tmp_path):
    from capsem import export, visualize
    from capsem.errors import ConfigError

    (tmp_path / "config.json").write_text(json.dumps({"model": "cnn", "dataset": "mnist"}))
    with pytest.raises(ConfigError, match=r"holds a --model=cnn network; export.py takes "
                                          r"--model=capsules networks"):
        export.export(str(tmp_path), str(tmp_path / "out"))
    with pytest.raises(ConfigError, match="visualize.py takes --model=capsules networks"):
        visualize.visualize(str(tmp_path), str(tmp_path / "pictures"))
