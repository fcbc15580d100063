"""Tests of the vargrad plugin (package vizkit-vargrad), with vizkit's plugin test kit only.

The fixtures (vizkit_model, vizkit_model_file, vizkit_images, vizkit_context, vizkit_cli,
vizkit_plugin) come from vizkit's pytest11 entry point: no conftest.py. The last two
tests need the package installed (``pip install -e examples/vizkit-vargrad``) and are
skipped otherwise.
"""

from __future__ import annotations

import importlib.metadata
import json

import keras
import numpy as np
import pytest
import tensorflow as tf

import vizkit_vargrad
from vizkit_vargrad import TECHNIQUE, vargrad


def unit(x):
    return x / 255.0


def _installed() -> bool:
    try:
        importlib.metadata.distribution("vizkit-vargrad")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


needs_install = pytest.mark.skipif(
    not _installed(),
    reason="vizkit-vargrad is not installed, so its entry point cannot be discovered "
    "(pip install -e examples/vizkit-vargrad)",
)

#: Only the plugins a test registers with vizkit_plugin (no installed ones), so the
#: module is not registered twice once the package is installed.
NO_INSTALLED_PLUGINS = {"VIZKIT_LOAD_PLUGINS": ""}


@pytest.fixture
def pixels(vizkit_context):
    """The three sample images at the tiny model's size, N×32×32×3 in 0-255."""
    return np.stack([image.array for image in vizkit_context().images])


def gradients(model, x: np.ndarray, classes) -> np.ndarray:
    """d score[class] / d pixels for each row of ``x``, straight from a GradientTape."""
    x = tf.constant(x, dtype=tf.float32)
    with tf.GradientTape() as tape:
        tape.watch(x)
        scores = model(unit(x), training=False)
        chosen = tf.gather(scores, tf.constant(classes, dtype=tf.int32), axis=1, batch_dims=1)
    return tape.gradient(chosen, x).numpy()


# -- the computation ------------------------------------------------------------


def test_variances_match_a_direct_numpy_reimplementation(vizkit_model, pixels):
    samples, noise, seed, classes = 4, 0.2, 7, [1, 3, 0]
    # batch=3 splits each image's 4 noisy copies into two passes.
    variances, used = vargrad(
        vizkit_model, pixels, classes=classes, samples=samples, noise=noise, seed=seed,
        preprocess=unit, batch=3, score="probability",
    )
    np.testing.assert_array_equal(used, classes)
    assert variances.shape == pixels.shape and variances.dtype == np.float32

    for image, cls, got in zip(pixels, classes, variances):
        sigma = np.float32(noise * (image.max() - image.min()))
        eps = np.random.default_rng(seed).standard_normal((samples, *image.shape), dtype=np.float32) * sigma
        per_sample = np.stack([gradients(vizkit_model, (image + e)[None], [cls])[0] for e in eps]).astype(np.float64)
        mean = per_sample.sum(axis=0) / samples
        expected = ((per_sample - mean) ** 2).sum(axis=0) / samples  # 1/n Σ (g_k − ḡ)²
        scale = expected.max()
        assert scale > 0
        np.testing.assert_allclose(got, expected, rtol=1e-3, atol=1e-5 * scale)

    # The seed makes it reproducible, and another seed gives other noise.
    again, _ = vargrad(vizkit_model, pixels, classes=classes, samples=samples, noise=noise, seed=seed, preprocess=unit, score="probability")
    other, _ = vargrad(vizkit_model, pixels, classes=classes, samples=samples, noise=noise, seed=seed + 1, preprocess=unit, score="probability")
    np.testing.assert_allclose(again, variances, rtol=1e-5, atol=1e-6 * variances.max())
    assert np.abs(other - variances).max() > 0.1 * variances.max()


def test_one_sample_or_no_noise_has_no_variance(vizkit_model, pixels):
    one, _ = vargrad(vizkit_model, pixels, samples=1, noise=0.3, preprocess=unit)
    quiet, _ = vargrad(vizkit_model, pixels, samples=5, noise=0.0, preprocess=unit)
    assert not one.any()
    noisy, _ = vargrad(vizkit_model, pixels, samples=5, noise=0.3, preprocess=unit)
    assert (noisy >= 0).all() and noisy.any()
    assert np.abs(quiet).max() <= 1e-6 * noisy.max()  # five identical gradients


def test_default_class_is_the_top1_of_the_clean_image(vizkit_model, pixels):
    _, classes = vargrad(vizkit_model, pixels, samples=2, preprocess=unit, score="probability")
    top1 = np.argmax(vizkit_model.predict(unit(pixels), verbose=0), axis=-1)
    np.testing.assert_array_equal(classes, top1)


def test_a_model_that_is_not_a_classifier_is_refused(pixels):
    inputs = keras.Input((32, 32, 3))
    feature_map = keras.layers.Conv2D(4, 3, padding="same", name="conv")(inputs)
    model = keras.Model(inputs, feature_map, name="segmenter")
    with pytest.raises(ValueError, match="needs a classifier.*segmenter"):
        vargrad(model, pixels, samples=1)


# -- the technique --------------------------------------------------------------


def test_run_gives_one_variance_per_image(vizkit_context):
    context = vizkit_context(TECHNIQUE, {"samples": "3"}, labels=["circle", "square", "triangle", "star"])
    artifacts = TECHNIQUE.apply(context)

    assert [a.image_id for a in artifacts] == [image.id for image in context.images]
    for artifact, image in zip(artifacts, context.images):
        assert artifact.array.shape == (32, 32, 3) and artifact.array.dtype == np.float32
        assert artifact.array.min() >= 0 and artifact.array.max() > 0
        assert artifact.picture.dtype == np.uint8 and artifact.picture.shape == (*image.display.shape[:2], 3)
        top1 = int(np.argmax(context.model.predict(context.preprocess(image.array[None]))[0]))
        assert artifact.title == f"{image.id} · class {top1} {context.labels[top1]}"
    assert context.notes  # says how the maps were made
    assert TECHNIQUE.comparable


def test_cli_run_with_the_plugin_registered(vizkit_plugin, vizkit_cli, vizkit_model_file, vizkit_images, tmp_path):
    vizkit_plugin(vizkit_vargrad)
    out = tmp_path / "out"
    result = vizkit_cli(
        "run", vizkit_model_file, vizkit_images, "-t", "vargrad", "-s", "vargrad.samples=4", "-o", out,
        env=NO_INSTALLED_PLUGINS,
    )
    assert result.exit_code == 0, result.output

    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    (technique,) = [t for t in report["techniques"] if t["name"] == "vargrad"]
    assert technique["status"] == "ok", technique["error"]
    assert technique["plugin"] == "vizkit_vargrad"
    assert technique["params"]["samples"] == 4
    assert len(technique["artifacts"]) == 3
    assert 'id="technique-vargrad"' in (out / "index.html").read_text(encoding="utf-8")


# -- installed: discovery through the entry point ---------------------------------


@needs_install
def test_the_entry_point_is_discovered(vizkit_cli):
    (entry,) = [e for e in importlib.metadata.entry_points(group="vizkit") if e.name == "vargrad"]
    assert entry.value == "vizkit_vargrad"

    result = vizkit_cli("plugins", "--json", env={"VIZKIT_LOAD_PLUGINS": None})
    assert result.exit_code == 0, result.output
    (row,) = [row for row in json.loads(result.stdout) if row["name"] == "vargrad"]
    assert row["status"] == "ok", row["error"]
    assert row["origin"] == "entry point"
    assert row["where"] == "vizkit-vargrad"
    assert row["version"] == "0.3.0" == vizkit_vargrad.__version__
    assert row["techniques"] == ["vargrad"]


@needs_install
def test_cli_run_through_the_entry_point(vizkit_cli, vizkit_model_file, vizkit_images, tmp_path):
    out = tmp_path / "out"
    result = vizkit_cli(
        "run", vizkit_model_file, vizkit_images, "-t", "vargrad", "-t", "smoothgrad",
        "-s", "vargrad.samples=2", "-s", "smoothgrad.samples=2", "-o", out,
        env={"VIZKIT_LOAD_PLUGINS": None},
    )
    assert result.exit_code == 0, result.output  # the built-in smoothgrad and vargrad side by side

    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    (technique,) = [t for t in report["techniques"] if t["name"] == "vargrad"]
    assert technique["status"] == "ok", technique["error"]
    assert technique["plugin"] == "vargrad"  # the entry point's name
    assert len(technique["artifacts"]) == 3
    assert 'id="technique-vargrad"' in (out / "index.html").read_text(encoding="utf-8")
