"""python -m capsem.report: tables and curves from the event files of runs."""

import json
import os

import numpy as np
import tensorflow as tf

from capsem import report


def _fake_run(log_dir, accuracies, batch_size=24):
    os.makedirs(log_dir)
    with open(os.path.join(log_dir, "config.json"), "w") as f:
        json.dump({"dataset": "mnist", "batch_size": batch_size, "recipe": "paper",
                   "A": 64}, f)
    writer = tf.summary.create_file_writer(log_dir)
    with writer.as_default():
        for step in range(1, 101):
            tf.summary.scalar("train/loss", 10.0 / step, step=step)
        for k, acc in enumerate(accuracies):
            tf.summary.scalar("test/accuracy", acc, step=2500 * (k + 1))
    writer.close()


def test_report_prints_the_accuracies_and_plots(tmp_path, capsys):
    run_a, run_b = str(tmp_path / "a"), str(tmp_path / "b")
    _fake_run(run_a, [0.9, 0.95])
    _fake_run(run_b, [0.5])
    png = str(tmp_path / "curves.png")
    assert report.main([run_a, run_b, "--plot", png, "--markdown"]) == 0
    out = capsys.readouterr().out
    assert "| 1.00 | 2500 | 0.9000 |" in out and "| 2.00 | 5000 | 0.9500 |" in out
    assert "| 1.00 | 2500 | 0.5000 |" in out and "recipe=paper" in out
    with open(png, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    summary = report.run_summary(run_a)
    np.testing.assert_allclose([x[2] for x in summary["scalars"]["train/loss"]][:3],
                               [10.0, 5.0, 10.0 / 3], rtol=1e-6)
    # An existing plot is not replaced without --overwrite.
    assert report.main([run_a, "--plot", png]) == 1
    assert "exists" in capsys.readouterr().err
    assert report.main([run_a, "--plot", png, "--overwrite"]) == 0


def test_report_names_a_directory_without_events(tmp_path, capsys):
    assert report.main([str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert str(tmp_path) in err and "no TensorBoard event files" in err


def test_report_activity_counts_capsules_off_and_on_per_layer(tmp_path, capsys):
    run = str(tmp_path / "a")
    _fake_run(run, [0.9])
    writer = tf.summary.create_file_writer(run)
    with writer.as_default():
        # 70 capsules off, 10 on, 20 in between; then all in between.
        values = np.concatenate([np.full(70, 0.01), np.full(10, 0.99), np.full(20, 0.5)])
        tf.summary.histogram("activations/conv_caps2", values, step=100)
        tf.summary.histogram("activations/conv_caps2", np.full(8, 0.5), step=200)
        tf.summary.histogram("activations/class_capsules", np.linspace(0, 1, 50), step=200)
        tf.summary.histogram("votes/conv_caps2", values, step=100)  # not an activation
    writer.close()
    histograms = report.read_histograms(run)
    assert sorted(histograms) == ["activations/class_capsules", "activations/conv_caps2"]
    assert [step for step, _ in histograms["activations/conv_caps2"]] == [100, 200]
    share = report.activity(histograms["activations/conv_caps2"][0][1])
    assert share["off"] == 0.7 and share["on"] == 0.1
    assert abs(share["mean"] - (70 * 0.01 + 10 * 0.99 + 20 * 0.5) / 100) < 1 / 30
    assert report.activity(histograms["activations/conv_caps2"][1][1])["off"] == 0.0
    assert report.main([run, "--activity"]) == 0
    out = capsys.readouterr().out
    lines = out[out.index("capsules off"):].splitlines()
    assert lines[1].split() == ["step", "class_capsules", "conv_caps2"]
    # At step 100 the class capsules have no histogram.
    assert lines[2].split()[:2] == ["100", "-"] and "0.70 / 0.10 / 0.2" in lines[2]
    assert lines[3].split()[0] == "200" and lines[3].endswith("0.00 / 0.00 / 0.50")


def test_report_routing_counts_children_given_to_one_parent(tmp_path, capsys):
    run = str(tmp_path / "r")
    _fake_run(run, [0.9])
    with open(os.path.join(run, "config.json"), "w") as f:
        json.dump({"dataset": "mnist", "batch_size": 24, "A": 8, "B": 8, "C": 4, "D": 3}, f)
    one_hot, uniform = [0.85, 0.05, 0.05, 0.05], [0.25] * 4  # O = 4 parents per child
    writer = tf.summary.create_file_writer(run)
    with writer.as_default():
        # 6 of 10 children given to one parent, then none.
        tf.summary.histogram("routing/conv_caps1", np.array(6 * one_hot + 4 * uniform),
                             step=100)
        tf.summary.histogram("routing/conv_caps1", np.array(10 * uniform), step=200)
        # Class capsules (O = 10 for MNIST): 1 of 2 children one-hot.
        tf.summary.histogram("routing/class_capsules",
                             np.array([0.91] + [0.01] * 9 + [0.1] * 10), step=200)
        tf.summary.histogram("activations/conv_caps1", np.full(8, 0.9), step=100)
    writer.close()
    histograms = report.read_histograms(run, report.ROUTING_PREFIX)
    assert sorted(histograms) == ["routing/class_capsules", "routing/conv_caps1"]
    assert abs(report.dominance(histograms["routing/conv_caps1"][0][1], 4) - 0.6) < 1e-9
    assert report.dominance(histograms["routing/conv_caps1"][1][1], 4) == 0.0
    assert abs(report.dominance(histograms["routing/class_capsules"][0][1], 10) - 0.5) < 1e-9
    assert report.routing_parents({"dataset": "mnist", "C": 4, "D": 3}) == {
        "conv_caps1": 4, "conv_caps2": 3, "class_capsules": 10}
    assert report.routing_parents({"dataset": "some_tfds_set", "C": 4, "D": 3}) == {
        "conv_caps1": 4, "conv_caps2": 3}
    assert report.main([run, "--routing"]) == 0
    out = capsys.readouterr().out
    lines = out[out.index("children with an assignment"):].splitlines()
    assert lines[1].split() == ["step", "class_capsules", "(O=10)", "conv_caps1", "(O=4)"]
    assert lines[2].split() == ["100", "-", "0.60"]
    assert lines[3].split() == ["200", "0.50", "0.00"]
