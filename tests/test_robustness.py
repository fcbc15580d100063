"""Inputs and models that used to cost the user a run: each gets a clear error or a partial report."""

from __future__ import annotations

import json

import keras
import numpy as np
import pytest
import tensorflow as tf

import vizkit
from conftest import write_image
from vizkit.extension import ReportSection
from vizkit.graph import ModelGraph
from vizkit.kit import last_feature_map_layer as default_layer
from vizkit.plugins.gradcam import gradcam
from vizkit.runner import RunOptions, UsageError, run
from vizkit.technique import Artifact, Technique

CHEAP = {"activations": {"max_channels": 2}, "filters": {"count": 1, "steps": 1, "size": 16}}


def _report(outdir):
    return json.loads((outdir / "report.json").read_text(encoding="utf-8"))


def test_non_finite_option_is_a_usage_error(vizkit_cli, vizkit_model_file, image_dir, tmp_path):
    for value in ("nan", "inf"):
        result = vizkit_cli("run", vizkit_model_file, image_dir, "-o", tmp_path / "out", "-s", f"gradcam.alpha={value}")
        assert result.exit_code == 2 and "gradcam.alpha" in result.output
    assert not (tmp_path / "out").exists()


class _BadPlugin:
    @vizkit.hookimpl
    def register_techniques(self, register):
        def run_bad(context):
            return [Artifact("float picture", np.zeros((4, 4)), np.zeros((4, 4)), context.images[0].id)]

        register(Technique("bad", run_bad, "Returns a picture the report cannot show."))

    @vizkit.hookimpl
    def report_sections(self, report):
        return [ReportSection("Not JSON", "<p>x</p>", data=np.float32(1.5)), ReportSection("Fine", "<p>fine</p>")]


def test_bad_artifacts_and_sections_are_errors_not_crashes(vizkit_plugin, vizkit_host, vizkit_model_file, image_dir, tmp_path):
    vizkit_plugin(_BadPlugin(), "bad-plugin")
    outdir = tmp_path / "out"
    report, index = run(str(vizkit_model_file), [image_dir], RunOptions(techniques=["bad", "gradcam"]), outdir, pm=vizkit_host())
    assert report.failed and index.is_file()
    data = _report(outdir)
    statuses = {t["name"]: (t["status"], t["error"]) for t in data["techniques"]}
    assert statuses["gradcam"][0] == "ok"
    assert statuses["bad"][0] == "error" and "uint8" in statuses["bad"][1]
    assert [s["title"] for s in data["sections"]] == ["Fine"]
    assert any("not JSON serializable" in e for e in data["plugin_errors"])


class _BrokenTemplatePlugin:
    def __init__(self, folder):
        self.folder = folder

    @vizkit.hookimpl
    def report_templates(self):
        return self.folder


def test_a_broken_template_falls_back_to_the_builtin_page(vizkit_plugin, vizkit_host, vizkit_model_file, image_dir, tmp_path):
    folder = tmp_path / "templates"
    folder.mkdir()
    (folder / "report.html").write_text("{% extends 'vizkit/report.html' %}{% block footer %}{{ nope(",
                                        encoding="utf-8")
    vizkit_plugin(_BrokenTemplatePlugin(folder), "broken-template")
    outdir = tmp_path / "out"
    report, index = run(str(vizkit_model_file), [image_dir], RunOptions(techniques=["gradcam"]), outdir, pm=vizkit_host())
    assert report.failed and 'id="technique-gradcam"' in index.read_text(encoding="utf-8")
    assert any("templates" in e for e in _report(outdir)["plugin_errors"])


def _free_size_classifier():
    inputs = keras.Input((None, None, 3))
    x = keras.layers.Conv2D(4, 3, name="conv_a")(inputs)
    x = keras.layers.Conv2D(4, 3, name="conv_b")(x)
    x = keras.layers.Conv2D(4, 3, name="conv_c")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, keras.layers.Dense(3, activation="softmax")(x), name="free")


def test_free_size_model_caps_big_images_and_isolates_too_small_ones(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    write_image(folder / "big.png", size=(1200, 600))
    write_image(folder / "tiny.png", size=(3, 3))  # smaller than three 3×3 valid convolutions need
    outdir = tmp_path / "out"
    report, _ = run(_free_size_classifier(), [folder], RunOptions(techniques=["activations"], config=CHEAP), outdir)
    images = {i["id"]: i for i in _report(outdir)["images"]}
    assert images["big"]["status"] == "ok" and any("512×256" in w for w in images["big"]["warnings"])
    assert images["tiny"]["status"] == "error" and "cannot take this image" in images["tiny"]["error"]
    (technique,) = _report(outdir)["techniques"]
    assert technique["status"] == "ok" and technique["artifacts"][0]["image_id"] == "big"
    assert report.failed


def test_imagenet_preprocessing_on_a_gray_model_is_a_usage_error(image_dir, tmp_path):
    inputs = keras.Input((16, 16, 1))
    x = keras.layers.GlobalAveragePooling2D()(keras.layers.Conv2D(2, 3)(inputs))
    gray = keras.Model(inputs, keras.layers.Dense(2, activation="softmax")(x))
    with pytest.raises(UsageError, match="one channel"):
        run(gray, [image_dir], RunOptions(preprocess="caffe"), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def _binary_classifier():
    """The chapter's cats-vs-dogs shape: one sigmoid unit."""
    keras.utils.set_random_seed(4)
    inputs = keras.Input((24, 24, 3))
    x = keras.layers.Conv2D(6, 3, activation="relu", name="conv")(inputs)
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, keras.layers.Dense(1, activation="sigmoid")(x))


def test_single_sigmoid_output_is_a_two_class_classifier():
    model = _binary_classifier()
    graph = ModelGraph(model)
    assert graph.is_classifier and graph.num_classes == 2
    x = np.random.default_rng(0).random((2, 24, 24, 3)).astype("float32")
    p = np.asarray(model(x))[:, 0]
    np.testing.assert_allclose(graph.class_scores(x), np.stack([1 - p, p], axis=1), rtol=1e-6)
    # Grad-CAM for class 0 explains 1 - p: its gradients are those of p, negated.
    sub = keras.Model(model.input, [model.get_layer("conv").output, model.output])
    with tf.GradientTape() as tape:
        features, out = sub(x[:1])
        score = 1 - out[:, 0]
    grads = tape.gradient(score, features)
    expected = np.maximum(np.mean(features[0] * np.mean(grads, axis=(0, 1, 2)), axis=-1), 0)
    heatmaps, classes = gradcam(model, x[:1], "conv", 0, score="probability")
    assert classes[0] == 0
    peak = expected.max()
    np.testing.assert_allclose(heatmaps[0], expected / peak if peak > 0 else expected, atol=1e-5)


def test_default_gradcam_layer_feeds_the_explained_output():
    inputs = keras.Input((16, 16, 3))
    trunk = keras.layers.Conv2D(4, 3, padding="same", name="trunk")(inputs)
    classes = keras.layers.Dense(3, activation="softmax", name="classes")(keras.layers.GlobalAveragePooling2D()(trunk))
    segmentation = keras.layers.Conv2D(2, 1, name="segmentation")(trunk)  # a later 4-D layer, other head
    graph = ModelGraph(keras.Model(inputs, [classes, segmentation]))
    assert default_layer(graph)[0] == "trunk"
    assert not graph.info("segmentation").feeds_output


def test_subclassed_model_gets_a_clear_error(image_dir, tmp_path):
    class Sub(keras.Model):
        def __init__(self):
            super().__init__()
            self.conv = keras.layers.Conv2D(2, 3)
            self.head = keras.layers.Dense(2)

        def call(self, x):
            return self.head(keras.ops.mean(self.conv(x), axis=(1, 2)))

    model = Sub()
    model(np.zeros((1, 8, 8, 3), "float32"))
    with pytest.raises(UsageError, match="subclassed"):
        run(model, [image_dir], RunOptions(), tmp_path / "out")


def test_unwritable_outdir_and_bad_epoch_fail_before_any_work(vizkit_cli, vizkit_model_file, image_dir, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    result = vizkit_cli("run", vizkit_model_file, image_dir, "-o", blocker / "out")
    assert result.exit_code == 2 and "is a file" in result.output
    result = vizkit_cli("run", vizkit_model_file, image_dir, "-o", tmp_path / "out", env={"SOURCE_DATE_EPOCH": "soon"})
    assert result.exit_code == 2 and "SOURCE_DATE_EPOCH" in result.output


def test_random_weights_are_seeded_in_reproducible_mode(monkeypatch, image_dir, tmp_path):
    """A factory with random weights gives the same numbers twice when SOURCE_DATE_EPOCH is set."""
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "0")
    (tmp_path / "seeded_factory.py").write_text(
        "import keras\n"
        "def build():\n"
        "    inputs = keras.Input((16, 16, 3))\n"
        "    x = keras.layers.GlobalAveragePooling2D()(keras.layers.Conv2D(3, 3)(inputs))\n"
        "    return keras.Model(inputs, keras.layers.Dense(3, activation='softmax')(x))\n",
        encoding="utf-8",
    )
    monkeypatch.syspath_prepend(tmp_path)
    reports = []
    for seed in (1, 2):
        keras.utils.set_random_seed(seed)  # whatever ran before must not matter
        reports.append(run("seeded_factory:build", [image_dir], RunOptions(techniques=["gradcam"]), tmp_path / str(seed))[0])
    assert reports[0].images[0].predictions == reports[1].images[0].predictions
