"""The model randomization sanity check (Adebayo et al. 2018) on real tiny Keras models.

What must hold: the user's model is never touched; a map that ignores the weights (an
edge detector) is flagged while Grad-CAM is not; the cascade randomizes cumulatively from
the top, starts from the original weights for every technique, is seeded and pins the
class; nested models work, subclassed ones are refused with the fix. The techniques that
record what they were run on are written here, as plugins would write them.

Grad-CAM's "not flagged" is tested on white-noise images (64×64, the test kit's tiny model
at that size): on noise there is no structure that every network sees, so whatever the
maps of the seeded weights and of the random ones share comes from the weights. On the
sample photos at 32×32, two untrained nets both follow the photo's brightness, each with a
random sign, and the rank correlation at the last step spreads by seed: from −0.46 to
+0.58 over 80 draws (4 initializations of the tiny architecture × seeds 0-19), past the
threshold of 0.5 for some. On the noise images it stays within −0.26 to +0.20 over the
same 80 draws (seed 0 on the tiny model: −0.00), far from the threshold.
"""

from __future__ import annotations

import cv2
import keras
import numpy as np
import pytest
from conftest import build_nested, write_image

import vizkit
from vizkit import Artifact, Explanation, ModelGraph, Option, RunContext, Technique, kit
from vizkit import images as image_io
from vizkit.plugins import gradcam, randomization
from vizkit.preprocess import unit
from vizkit.chunk import add_predictions
from vizkit.testing import tiny_classifier


# -- running a technique, then the metric, as a run does -----------------------------------


def load(model, folder):
    """(graph, images with predictions) for the image files in ``folder``."""
    graph = ModelGraph.of(model)
    files, _ = image_io.collect([folder])
    images = image_io.load_all(files, graph.channels, graph.fixed_size)
    add_predictions(graph, images, unit, None)
    return graph, images


def explain(technique, graph, images, **params) -> Explanation:
    params = technique.resolve_params(params)
    return Explanation(technique, params, technique.apply(RunContext(graph, images, params, unit, None)))


def measure(explanation, graph, loaded, **params):
    """(per-image measurements by id, the technique's measurement, the metric's context)."""
    context = RunContext(graph, loaded, randomization.METRIC.resolve_params(params), unit, None)
    measurements = randomization.METRIC.measure(context, explanation)
    overall = [m for m in measurements if m.image_id is None]
    assert len(overall) == 1
    return {m.image_id: m for m in measurements if m.image_id is not None}, overall[0], context


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    folder = tmp_path_factory.mktemp("photos")
    for photo in kit.sample_photos():
        (folder / photo.name).write_bytes(photo.read_bytes())
    return folder


@pytest.fixture(scope="module")
def noise(tmp_path_factory):
    folder = tmp_path_factory.mktemp("noise")
    for seed in range(4):
        write_image(folder / f"noise{seed}.png", size=(64, 64), seed=seed)
    return folder


# -- techniques written for the tests ------------------------------------------------------


def sobel(pixels: np.ndarray) -> np.ndarray:
    gray = pixels.mean(axis=-1).astype("float32")
    return np.hypot(cv2.Sobel(gray, cv2.CV_32F, 1, 0), cv2.Sobel(gray, cv2.CV_32F, 0, 1))


def edges_batch(context, batch):
    return [
        Artifact(
            f"{image.id} edges", sobel(pixels), kit.gray_picture(kit.normalize_heatmap(sobel(pixels))),
            image.id, target=image.predictions[0]["index"],
        )
        for image, pixels in zip(batch.images, batch.pixels)
    ]


#: Ignores the model: the Sobel magnitude of the pixels, "explaining" the top-1 class.
EDGES = Technique(name="edges", run_batch=edges_batch, description="Sobel magnitude of the pixels.", comparable=True)


def recorder(original, with_class: bool = True):
    """A technique that records, per call, the images, its ``class`` option and which
    weighted layers of the model it was run on differ from ``original``'s; its maps depend
    on the model (the gradient of the class score), its targets are chosen per image so
    that several classes are pinned."""
    calls: list[dict] = []
    theirs = dict(randomization.leaf_layers(original))

    def run_batch(context, batch):
        model = context.model.model
        changed = sorted(
            path for path, layer in randomization.leaf_layers(model)
            if any(not np.array_equal(a, b) for a, b in zip(layer.get_weights(), theirs[path].get_weights()))
        )
        calls.append({
            "images": [image.id for image in batch.images],
            "class": context.params.get("class"),
            "changed": changed,
            "copy": model is not original,
            "weights": {path: layer.get_weights() for path, layer in randomization.leaf_layers(model)},
        })
        chosen = kit.resolve_class(context) if with_class else None
        order = sorted(image.id for image in context.images)
        targets = [chosen if chosen is not None else order.index(image.id) % 3 for image in batch.images]
        gradients, _ = kit.input_gradients(context.model, batch.pixels, targets, context.preprocess)
        return [
            Artifact(f"{image.id} recorded", g.astype("float32"), image.display, image.id, target=int(t))
            for image, g, t in zip(batch.images, gradients, targets)
        ]

    options = (kit.class_option(),) if with_class else ()
    technique = Technique(name="recorder", run_batch=run_batch, description="records its calls", comparable=True, options=options)
    return technique, calls


# -- the user's model is never touched -----------------------------------------------------


def test_the_original_weights_stay_byte_identical(photos):
    model = tiny_classifier()
    graph, images = load(model, photos)
    before = [w.tobytes() for w in model.get_weights()]
    explanation = explain(gradcam.TECHNIQUE, graph, images)
    measure(explanation, graph, images)
    measure(explain(EDGES, graph, images), graph, images, steps=1)
    assert [w.tobytes() for w in model.get_weights()] == before
    # and the original graph still explains as before (its compiled functions saw no change)
    again = gradcam.TECHNIQUE.apply(RunContext(graph, images, explanation.params, unit, None))
    assert all(np.array_equal(a.array, b.array) for a, b in zip(again, explanation.artifacts))


# -- what it flags --------------------------------------------------------------------------


def test_a_map_that_ignores_the_weights_is_flagged_and_gradcam_is_not(noise):
    model = tiny_classifier(size=64)
    graph, images = load(model, noise)

    per_image, overall, context = measure(explain(EDGES, graph, images), graph, images)
    assert overall.warning and "barely changes" in overall.warning and "all 3 weighted layers" in overall.warning
    assert overall.values["spearman"] == pytest.approx(1.0)
    assert overall.values["ssim"] == pytest.approx(1.0)
    assert all(m.values[f"spearman_step{s}"] == pytest.approx(1.0) for m in per_image.values() for s in (1, 2, 3))
    assert "has no class option" in " ".join(context.notes)

    per_image, overall, _ = measure(explain(gradcam.TECHNIQUE, graph, images), graph, images)
    assert overall.warning is None
    assert abs(overall.values["spearman"]) < 0.3 < randomization.METRIC.resolve_params({})["threshold"]
    assert set(per_image) == {image.id for image in images}  # 4 images: the default
    assert overall.values["spearman"] == pytest.approx(np.mean([m.values["spearman"] for m in per_image.values()]))
    # what the report shows: curves from 1.0 (the original model) over the 3 steps, the cascade
    rho, ssim = overall.curves
    assert (rho.color, ssim.color) == ("red", "blue") and rho.values[0] == 1.0 and len(rho.values) == 4
    assert rho.values[1:] == tuple(overall.values[f"spearman_step{s}"] for s in (1, 2, 3))
    # the verdict's number is the last step's (all random); the cascade's mean is beside it
    assert overall.values["spearman"] == overall.values["spearman_step3"]
    assert overall.values["spearman_cascade"] == pytest.approx(np.mean(rho.values[1:]))
    height, width = images[0].display.shape[:2]
    assert overall.picture.dtype == np.uint8 and overall.picture.shape[0] == height
    assert overall.picture.shape[1] == 4 * width + 3 * 4  # the original, then each step
    assert "step 1: predictions (1 of 3 weighted layers)" in overall.caption
    assert per_image[images[0].id].caption.startswith("random weights: rank corr. ")


def test_the_threshold_decides_the_warning(noise):
    graph, images = load(tiny_classifier(size=64), noise)
    explanation = explain(gradcam.TECHNIQUE, graph, images)
    _, overall, _ = measure(explanation, graph, images, threshold=-1.0, images=2, steps=1)
    assert overall.warning and "with the top 1 of 3 weighted layers random" in overall.warning


def test_flat_maps_are_said_so(photos):
    model = tiny_classifier()
    graph, images = load(model, photos)

    def flat_on_the_copy(context, batch):
        flat = context.model.model is not model
        return [
            Artifact(image.id, np.ones((8, 8), "float32") if flat else sobel(pixels), image.display, image.id, target=0)
            for image, pixels in zip(batch.images, batch.pixels)
        ]

    technique = Technique(name="flat", run_batch=flat_on_the_copy, description="flat on the copy", comparable=True)
    per_image, overall, _ = measure(explain(technique, graph, images), graph, images, steps=1, images=1)
    (measured,) = per_image.values()
    assert measured.values["spearman"] == 0 and "the randomized map is flat" in measured.caption
    assert measured.warning is None and overall.warning is None

    blank = Explanation(EDGES, {}, [Artifact(a.title, np.zeros_like(a.array), a.picture, a.image_id, target=a.target)
                                    for a in explain(EDGES, graph, images).artifacts])
    per_image, _, _ = measure(blank, graph, images, steps=1)
    assert all("the original map is flat" in m.warning for m in per_image.values())


# -- the cascade ----------------------------------------------------------------------------


def test_the_cascade_is_cumulative_from_the_top_and_starts_afresh(photos):
    model = tiny_classifier()
    graph, images = load(model, photos)
    technique, calls = recorder(model)
    explanation = explain(technique, graph, images)
    original_calls = len(calls)

    _, overall, context = measure(explanation, graph, images, steps=1)
    steps = calls[original_calls:]
    assert {tuple(call["changed"]) for call in steps} == {("predictions",)}
    assert all(call["copy"] for call in steps)
    assert overall.values["layers_step1"] == 1 and "spearman_step2" not in overall.values
    assert "3 weighted layer(s)" in context.notes[0] and "seed 0" in context.notes[0]

    del calls[:]
    _, overall, _ = measure(explanation, graph, images, steps=3)
    by_step = [sorted({tuple(c["changed"]) for c in calls[i : i + 3]}) for i in range(0, 9, 3)]
    assert by_step == [[("predictions",)], [("conv2", "predictions")], [("conv1", "conv2", "predictions")]]
    assert [overall.values[f"layers_step{s}"] for s in (1, 2, 3)] == [1, 2, 3]

    # more steps than weighted layers: one per layer
    del calls[:]
    _, overall, context = measure(explanation, graph, images, steps=10)
    assert [overall.values[f"layers_step{s}"] for s in (1, 2, 3)] == [1, 2, 3] and "layers_step4" not in overall.values
    assert "only 3" in context.notes[0]


def test_random_weights_keep_each_tensors_scale_and_leave_statistics_alone(photos):
    keras.utils.set_random_seed(3)
    inputs = keras.Input((32, 32, 3))
    x = keras.layers.Conv2D(16, 3, padding="same", name="conv")(inputs)
    x = keras.layers.BatchNormalization(name="bn")(x)
    x = keras.layers.ReLU(name="relu")(x)
    x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    model = keras.Model(inputs, keras.layers.Dense(4, activation="softmax", name="predictions")(x))
    bn = model.get_layer("bn")
    bn.set_weights([np.full(16, 1.5), np.linspace(-1, 1, 16), np.linspace(0, 2, 16), np.linspace(1, 3, 16)])
    graph, images = load(model, photos)
    technique, calls = recorder(model)
    measure(explain(technique, graph, images), graph, images, steps=3, images=1)
    last = calls[-1]["weights"]  # everything randomized
    kernel, bias = model.get_layer("conv").get_weights()
    new_kernel, new_bias = last["conv"]
    assert not np.array_equal(new_kernel, kernel)
    assert new_kernel.mean() == pytest.approx(kernel.mean(), abs=0.02) and new_kernel.std() == pytest.approx(kernel.std(), rel=0.15)
    assert np.array_equal(new_bias, bias)  # all zero: no spread, kept
    gamma, beta, moving_mean, moving_variance = last["bn"]
    assert np.array_equal(gamma, np.full(16, 1.5))  # constant: kept
    assert not np.array_equal(beta, bn.get_weights()[1])  # learned, spread: redrawn
    assert np.array_equal(moving_mean, bn.get_weights()[2]) and np.array_equal(moving_variance, bn.get_weights()[3])
    assert calls[-1]["changed"] == ["bn", "conv", "predictions"]


def test_it_is_deterministic_and_the_same_for_every_copy(photos):
    graph, images = load(tiny_classifier(), photos)
    explanation = explain(gradcam.TECHNIQUE, graph, images)
    first = measure(explanation, graph, images)[1].values
    assert measure(explanation, graph, images)[1].values == first
    fresh, fresh_images = load(tiny_classifier(), photos)  # another model, another copy
    assert measure(explain(gradcam.TECHNIQUE, fresh, fresh_images), fresh, fresh_images)[1].values == first
    assert measure(explanation, graph, images, seed=1)[1].values != first


def test_the_class_is_pinned_to_the_original_maps(photos):
    model = tiny_classifier()
    graph, images = load(model, photos)
    technique, calls = recorder(model)
    explanation = explain(technique, graph, images)
    targets = {a.image_id: a.target for a in explanation.artifacts}
    assert len(set(targets.values())) == 3  # three classes: three reruns per step
    del calls[:]
    measure(explanation, graph, images, steps=2)
    assert len(calls) == 2 * 3
    for call in calls:
        assert call["class"] is not None and {targets[i] for i in call["images"]} == {int(call["class"])}

    unpinned, calls = recorder(model, with_class=False)
    explanation = explain(unpinned, graph, images)
    del calls[:]
    _, _, context = measure(explanation, graph, images, steps=1)
    assert [call["class"] for call in calls] == [None] and len(calls[0]["images"]) == 3
    assert any("recorder has no class option" in note for note in context.notes)


def test_a_nested_model_is_randomized_inside(photos):
    model = build_nested()
    graph, images = load(model, photos)
    before = [w.tobytes() for w in model.get_weights()]
    technique, calls = recorder(model)
    explanation = explain(technique, graph, images)
    del calls[:]
    measure(explanation, graph, images, steps=3, images=1)
    assert [call["changed"] for call in calls] == [
        ["head"], ["base/base_conv2", "head"], ["base/base_conv1", "base/base_conv2", "head"],
    ]
    _, overall, _ = measure(explain(gradcam.TECHNIQUE, graph, images), graph, images)
    assert "down to base/base_conv1 (all 3)" in overall.caption
    assert [w.tobytes() for w in model.get_weights()] == before


def test_a_frozen_base_is_randomized_too(photos):
    model = build_nested()
    model.get_layer("base").trainable = False
    graph, images = load(model, photos)
    technique, calls = recorder(model)
    explanation = explain(technique, graph, images)
    del calls[:]
    measure(explanation, graph, images, steps=3, images=1)
    assert calls[-1]["changed"] == ["base/base_conv1", "base/base_conv2", "head"]
    assert not model.get_layer("base").trainable  # the user's model as it was


class Scaled(keras.layers.Layer):
    """A custom layer without get_config whose argument Keras cannot serialize."""

    def __init__(self, scale: np.ndarray, **kwargs):
        super().__init__(**kwargs)
        self.scale = scale

    def call(self, x):
        return x * self.scale


def test_a_model_keras_cannot_clone_is_refused_with_the_fix(photos):
    inputs = keras.Input((32, 32, 3))
    x = keras.layers.Conv2D(4, 3, name="conv")(inputs)
    x = Scaled(np.array([0.5], "float32"), name="scaled")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    model = keras.Model(inputs, keras.layers.Dense(3, activation="softmax")(x))
    graph, images = load(model, photos)
    explanation = explain(gradcam.TECHNIQUE, graph, images)
    with pytest.raises(ValueError, match="clone_model cannot copy.*get_config"):
        measure(explanation, graph, images)

    class Subclassed(keras.Model):
        def __init__(self):
            super().__init__()
            self.dense = keras.layers.Dense(3)

        def call(self, x):
            return self.dense(keras.ops.mean(x, axis=(1, 2)))

    subclassed = Subclassed()
    subclassed(np.zeros((1, 8, 8, 3), "float32"))
    with pytest.raises(ValueError, match="subclassed model.*Functional or Sequential"):
        randomization.copy_model(subclassed)


def test_the_metric_is_registered_with_its_columns():
    from vizkit import host

    metric = host.metrics(host.plugin_manager((), ()))["randomization"].metric
    assert metric is randomization.METRIC
    assert [(c.key, c.better) for c in metric.columns] == [("spearman", "lower"), ("ssim", "lower"), ("spearman_cascade", "lower")]
    assert randomization.METRIC.resolve_params({}) == {"steps": 3, "images": 4, "seed": 0, "threshold": 0.5}
    with pytest.raises(vizkit.OptionError):
        randomization.METRIC.resolve_params({"steps": 0})


# -- the rank correlation itself ------------------------------------------------------------


def test_spearman_agrees_with_scipy_with_ties():
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(0)
    a = rng.integers(0, 5, (7, 9)).astype("float32")  # many ties
    b = a + rng.normal(0, 2, a.shape)
    b[b < 1] = 0  # ties at zero, as a ReLU'd CAM has
    assert kit.spearman(a, b) == pytest.approx(stats.spearmanr(a.ravel(), b.ravel()).statistic, abs=1e-12)


def test_spearman_is_pearsons_r_of_the_tie_averaged_ranks():
    a = np.array([1.0, 2.0, 2.0, 3.0, 5.0, 5.0])
    b = np.array([0.0, 0.0, 1.0, 4.0, 3.0, 2.0])
    ranks_a = np.array([1, 2.5, 2.5, 4, 5.5, 5.5])  # by hand
    ranks_b = np.array([1.5, 1.5, 3, 6, 5, 4])
    ra, rb = ranks_a - ranks_a.mean(), ranks_b - ranks_b.mean()
    assert kit.spearman(a, b) == pytest.approx((ra @ rb) / np.sqrt((ra @ ra) * (rb @ rb)), abs=1e-12)
    # without ties it is 1 - 6 Σd² / (n (n² - 1))
    x, y = np.array([3.0, 1.0, 4.0, 1.5, 5.0]), np.array([2.0, 7.0, 1.0, 8.0, 2.5])
    d = np.argsort(np.argsort(x)) - np.argsort(np.argsort(y))
    assert kit.spearman(x, y) == pytest.approx(1 - 6 * (d @ d) / (5 * 24), abs=1e-12)
    assert kit.spearman(np.zeros(5), y) == 0.0
