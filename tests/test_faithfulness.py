"""The faithfulness metric (deletion/insertion, Petsiuk et al. 2018) on real tiny Keras models.

A hand-set model whose class-0 probability depends only on the top-left quadrant gives
curves worked out by hand; a deliberately naive reference (one copy per step, pixels set
in a loop, ``model(x)`` one copy at a time, ``np.trapezoid``, its own blur) must agree
with the batched metric; then the options, the class of class-agnostic maps, and the
random baseline: the same whatever the order of the images, computed once per run.
"""

from __future__ import annotations

import math
from pathlib import Path

import keras
import numpy as np
import pytest

import vizkit
from vizkit import Artifact, Explanation, LoadedImage, OptionError, RunContext, Technique
from vizkit import kit
from vizkit.plugins import faithfulness
from vizkit.plugins.faithfulness import METRIC, deletion_insertion

SIZE = 32
trapezoid = getattr(np, "trapezoid", None) or np.trapz


def unit(x):
    return x / 255.0


def fake_technique(name: str = "fake") -> Technique:
    return Technique(name=name, run_batch=lambda context, batch: [], description="a test map", comparable=True)


def explanation(maps: dict, technique: Technique | None = None, targets: dict | None = None) -> Explanation:
    """An Explanation with one artifact per image id, ``maps[id]`` as its array; ``targets``
    None: class-agnostic artifacts, else each image's class (default 0)."""
    artifacts = [
        Artifact(f"{image_id} map", np.asarray(array, "float32"), picture=np.zeros((4, 4), np.uint8),
                 image_id=image_id, target=None if targets is None else targets.get(image_id, 0))
        for image_id, array in maps.items()
    ]
    return Explanation(technique or fake_technique(), {}, artifacts)


def by_image(measurements) -> dict:
    return {m.image_id: m for m in measurements}


# -- a known answer: a model that looks at one quadrant only ----------------------------------

A, B = 2.0, 3.0  # logit0 − logit1 = 2(A Σ_c m_c − B), m_c the quadrant's mean of channel c in [0, 1]


def quadrant_model() -> keras.Model:
    """Class 0's probability is σ(2(A·Σ_c m_c − B)): only the top-left 16×16 quadrant counts,
    and the brighter it is, the likelier class 0."""
    inputs = keras.Input((SIZE, SIZE, 3))
    x = keras.layers.Cropping2D(((0, SIZE // 2), (0, SIZE // 2)))(inputs)
    x = keras.layers.GlobalAveragePooling2D()(x)
    head = keras.layers.Dense(2, activation="softmax")
    outputs = head(x)
    head.set_weights([np.tile([[A, -A]], (3, 1)).astype("float32"), np.array([-B, B], "float32")])
    return keras.Model(inputs, outputs, name="quadrant")


def p0(bright_fraction):
    """Class 0's probability when that fraction of the quadrant is white (255) and the rest black."""
    return 1 / (1 + np.exp(-2 * (A * 3 * np.asarray(bright_fraction, "float64") - B)))


@pytest.fixture(scope="module")
def quadrant():
    """(context, image): the quadrant model and one image, white in the quadrant, gray elsewhere."""
    pixels = np.full((SIZE, SIZE, 3), 90.0, dtype="float32")
    pixels[: SIZE // 2, : SIZE // 2] = 255
    graph = vizkit.ModelGraph.of(quadrant_model())
    image = LoadedImage(id="bright", path=Path("bright.png"), sha256="ab" * 32, array=pixels,
                        predictions=[{"index": 0, "score": float(p0(1))}, {"index": 1, "score": float(1 - p0(1))}])
    params = METRIC.resolve_params({"substrate": "black", "steps": "32"})
    return RunContext(graph, [image], params, unit), image


def test_known_answer_the_quadrant_first_beats_random_and_the_inverted_map(quadrant):
    context, image = quadrant
    first = np.zeros((SIZE, SIZE), "float32")
    first[: SIZE // 2, : SIZE // 2] = 1
    maps = {"first": first, "inverted": 1 - first, "random": np.random.default_rng(3).random((SIZE, SIZE))}
    results = {}
    for name, array in maps.items():
        [measurement] = METRIC.measure(context, explanation({"bright": array}, fake_technique(name), targets={}))
        results[name] = measurement

    # By hand: 32 steps of 32 pixels; the quadrant's 256 pixels go in steps 1-8 (first) or 25-32 (inverted).
    i = np.arange(33)
    curves = {curve.label: np.array(curve.values) for curve in results["first"].curves}
    np.testing.assert_allclose(curves["deletion"], p0(np.clip(1 - i / 8, 0, 1)), atol=1e-5)
    np.testing.assert_allclose(curves["insertion"], p0(np.clip(i / 8, 0, 1)), atol=1e-5)
    inverted = {curve.label: np.array(curve.values) for curve in results["inverted"].curves}
    np.testing.assert_allclose(inverted["deletion"], p0(np.clip((32 - i) / 8, 0, 1)), atol=1e-5)

    auc = {name: m.values for name, m in results.items()}
    assert auc["first"]["deletion_auc"] < auc["random"]["deletion_auc"] < auc["inverted"]["deletion_auc"]
    assert auc["first"]["insertion_auc"] > auc["random"]["insertion_auc"] > auc["inverted"]["insertion_auc"]
    baseline = auc["first"]  # the seeded random ranking, the same for every map of this image
    assert auc["first"]["deletion_auc"] < baseline["random_deletion_auc"] < auc["inverted"]["deletion_auc"]
    assert auc["first"]["insertion_auc"] > baseline["random_insertion_auc"] > auc["inverted"]["insertion_auc"]
    assert all(m.values["random_deletion_auc"] == baseline["random_deletion_auc"] for m in results.values())
    # the baseline ranks by the documented random map (7×7 uniform values upsampled, seeded by
    # the sha256): its deletion curve, by hand, is p0 of the quadrant's share still there
    ranks = faithfulness.pixel_ranks(faithfulness.random_map(SIZE, SIZE, 7, 0, "ab" * 32))
    gone = [(ranks[: SIZE // 2, : SIZE // 2] < n).sum() / (SIZE // 2) ** 2 for n in faithfulness.step_counts(SIZE * SIZE, 32)]
    random_curves = {curve.label: np.array(curve.values) for curve in results["first"].curves}
    np.testing.assert_allclose(random_curves["random deletion"], p0(1 - np.array(gone)), atol=1e-5)

    values = results["first"].values
    assert results["first"].caption == (
        f"deletion AUC {values['deletion_auc']:.2f} (random {values['random_deletion_auc']:.2f}) · "
        f"insertion AUC {values['insertion_auc']:.2f} (random {values['random_insertion_auc']:.2f})"
    )
    assert [(c.label, c.color, c.dashed) for c in results["first"].curves] == [
        ("deletion", "red", False), ("insertion", "blue", False),
        ("random deletion", "red", True), ("random insertion", "blue", True),
    ]
    assert results["first"].warning is None


# -- against a naive reference --------------------------------------------------------------


def naive_blur(image: np.ndarray, sigma: float) -> np.ndarray:
    """RISE's gkern built tap by tap (a Gaussian filter of an impulse, reflected at the
    window's edges), then a 2-D convolution over an edge-reflected copy of the image."""
    radius, reach = int(sigma + 0.5), int(4 * sigma + 0.5)
    window = 2 * radius + 1
    taps = {u: math.exp(-0.5 * (u / sigma) ** 2) for u in range(-reach, reach + 1)}
    total = sum(taps.values())

    def reflect(index):
        while not 0 <= index < window:
            index = -index - 1 if index < 0 else 2 * window - index - 1
        return index

    kernel = np.zeros((window, window))
    for a in range(window):
        for b in range(window):
            for u, wu in taps.items():
                for v, wv in taps.items():
                    if reflect(a + u) == radius and reflect(b + v) == radius:
                        kernel[a, b] += wu * wv / total**2
    padded = np.pad(image.astype("float64"), ((radius, radius), (radius, radius), (0, 0)), mode="symmetric")
    out = np.zeros(image.shape)
    height, width = image.shape[:2]
    for a in range(window):
        for b in range(window):
            out += kernel[a, b] * padded[a : a + height, b : b + width]
    return out


def naive_curves(model, image, ranking, target, steps, canvas, preprocess):
    """One copy per step, the first round(i·P/k) pixels set in a loop, scored one at a time."""
    height, width = ranking.shape
    order = np.argsort(-ranking.ravel())
    deletion, insertion = [], []
    for i in range(steps + 1):
        count = math.floor(i * height * width / steps + 0.5)
        deleted, inserted = image.copy(), canvas.copy()
        for index in order[:count]:
            row, col = divmod(int(index), width)
            deleted[row, col, :] = canvas[row, col, :]
            inserted[row, col, :] = image[row, col, :]
        for copy, curve in ((deleted, deletion), (inserted, insertion)):
            probabilities = np.asarray(model(preprocess(copy[None].astype("float32")), training=False))
            curve.append(float(probabilities[0, target]))
    x = np.linspace(0, 1, steps + 1)
    return np.array(deletion), np.array(insertion), trapezoid(deletion, x), trapezoid(insertion, x)


@pytest.fixture(scope="module")
def sharp_model():
    """The tiny test classifier with its head scaled up, so that its probabilities move."""
    from vizkit.testing import tiny_classifier

    model = tiny_classifier()
    head = model.get_layer("predictions")
    kernel, bias = head.get_weights()
    head.set_weights([kernel * 10, bias])
    return model


@pytest.mark.parametrize("substrate,sigma", [("blur", None), ("blur", 2.0), ("black", None)])
def test_matches_a_naive_one_copy_at_a_time_reference(sharp_model, vizkit_images, substrate, sigma):
    from vizkit import images as image_io

    graph = vizkit.ModelGraph.of(sharp_model)
    files, _ = image_io.collect([vizkit_images])
    image = image_io.load_all(files, 3, (SIZE, SIZE))[0]
    pixels = image.array
    ranking = np.random.default_rng(5).random((SIZE, SIZE)).astype("float32")
    assert len(np.unique(ranking)) == ranking.size  # no ties: any argsort gives this order
    steps, target = 8, int(np.argmax(sharp_model(unit(pixels[None]))))

    canvas = {"blur": naive_blur(pixels, sigma or 5 * SIZE / 224), "black": np.zeros_like(pixels)}[substrate]
    expected = naive_curves(sharp_model, pixels, ranking, target, steps, canvas, unit)
    assert min(np.ptp(expected[0]), np.ptp(expected[1])) > 0.01  # ≫ the tolerance: a wrong order would show

    params = METRIC.resolve_params({"steps": steps, "substrate": substrate, "per_pass": 5} | ({"sigma": sigma} if sigma else {}))
    context = RunContext(graph, [image], params, unit)
    [measurement] = METRIC.measure(context, explanation({image.id: ranking}, targets={image.id: target}))
    curves = {curve.label: np.array(curve.values) for curve in measurement.curves}
    np.testing.assert_allclose(curves["deletion"], expected[0], atol=1e-5)
    np.testing.assert_allclose(curves["insertion"], expected[1], atol=1e-5)
    assert measurement.values["deletion_auc"] == pytest.approx(expected[2], abs=1e-5)
    assert measurement.values["insertion_auc"] == pytest.approx(expected[3], abs=1e-5)

    # the notebook function computes the same, on a batch
    deletion, insertion = deletion_insertion(
        sharp_model, pixels[None], [ranking], target, unit, steps, substrate, sigma
    )
    np.testing.assert_allclose(deletion[0], expected[0], atol=1e-5)
    np.testing.assert_allclose(insertion[0], expected[1], atol=1e-5)


def test_the_blur_kernel_is_rises_gkern():
    """RISE: ``gkern(klen=11, nsig=5)`` is ``gaussian_filter`` of an impulse in 11×11."""
    ndimage = pytest.importorskip("scipy.ndimage")
    for sigma in (5.0, 0.714, 2.3):
        kernel = faithfulness.blur_kernel(sigma)
        impulse = np.zeros((len(kernel), len(kernel)))
        impulse[len(kernel) // 2, len(kernel) // 2] = 1
        np.testing.assert_allclose(np.outer(kernel, kernel), ndimage.gaussian_filter(impulse, sigma), atol=1e-7)
    assert len(faithfulness.blur_kernel(5.0)) == 11


def test_ranks_ties_and_step_counts():
    ranking = np.array([[0.5, 1.0, 0.5], [1.0, 0.0, 0.5]], "float32")
    np.testing.assert_array_equal(faithfulness.pixel_ranks(ranking), [[2, 0, 3], [1, 5, 4]])  # ties row-major
    # with a seed, ties in a random order drawn from the seed and the shape: values still rule
    seeded = faithfulness.pixel_ranks(ranking, seed=0)
    assert {int(seeded[0, 1]), int(seeded[1, 0])} == {0, 1} and seeded[1, 1] == 5
    np.testing.assert_array_equal(seeded, faithfulness.pixel_ranks(ranking.copy(), seed=0))
    flat = faithfulness.pixel_ranks(np.zeros((16, 16)), seed=0)  # a map that is 0 everywhere
    assert sorted(flat.ravel()) == list(range(256))
    top_half_first = (flat[:8] < 128).mean()  # row-major would delete the top half first: 1.0
    assert 0.3 < top_half_first < 0.7
    np.testing.assert_array_equal(faithfulness.step_counts(10, 4), [0, 3, 5, 8, 10])  # round(2.5) = 3, round(7.5) = 8
    assert faithfulness.auc([0.0, 1.0, 1.0]) == 0.75
    shuffled = faithfulness.random_map(14, 21, 7, 0, "ab" * 32)
    assert shuffled.shape == (14, 21) and 0 <= shuffled.min() and shuffled.max() <= 1
    np.testing.assert_array_equal(shuffled, faithfulness.random_map(14, 21, 7, 0, "ab" * 32))
    assert not np.array_equal(shuffled, faithfulness.random_map(14, 21, 7, 0, "cd" * 32))
    assert not np.array_equal(shuffled, faithfulness.random_map(14, 21, 7, 1, "ab" * 32))
    # a coarse map: neighbours agree far more than in a random order of single pixels
    assert np.corrcoef(shuffled[:, :-1].ravel(), shuffled[:, 1:].ravel())[0, 1] > 0.8
    assert len(np.unique(faithfulness.pixel_ranks(shuffled))) == 14 * 21


# -- options, classes, the random baseline ---------------------------------------------------


def test_options_are_validated():
    assert METRIC.resolve_params({}) == {"steps": 32, "substrate": "blur", "sigma": None, "seed": 0, "grid": 7, "per_pass": 64}
    assert METRIC.resolve_params({"steps": "2", "substrate": "mean", "per_pass": "1"})["steps"] == 2
    for bad in ({"steps": 1}, {"steps": 1025}, {"steps": "many"}, {"substrate": "gray"}, {"per_pass": 0},
                {"sigma": 0}, {"seed": -1}, {"stpes": 8}):
        with pytest.raises(OptionError):
            METRIC.resolve_params(bad)


def test_per_pass_class_agnostic_maps_and_the_mean_substrate(vizkit_context, vizkit_model):
    context = vizkit_context(METRIC, {"steps": 6, "substrate": "mean"})
    rng = np.random.default_rng(0)
    maps = {image.id: rng.random((7, 7)) for image in context.images}  # a CAM at its layer's resolution
    top1 = {image.id: image.predictions[0]["index"] for image in context.images}
    agnostic = by_image(METRIC.measure(context, explanation(maps)))
    explicit = by_image(METRIC.measure(context, explanation(maps, targets=top1)))
    other = by_image(METRIC.measure(context, explanation(maps, targets={k: (v + 1) % 4 for k, v in top1.items()})))
    small = vizkit_context(METRIC, {"steps": 6, "substrate": "mean", "per_pass": 5})
    chunked = by_image(METRIC.measure(small, explanation(maps)))
    assert len(agnostic) == 3
    for image_id, measurement in agnostic.items():
        assert measurement.values == explicit[image_id].values  # target None: the image's top-1 class
        assert measurement.values["deletion_auc"] != other[image_id].values["deletion_auc"]
        for key, value in measurement.values.items():
            assert chunked[image_id].values[key] == pytest.approx(value, abs=1e-6)


def test_the_random_baseline_is_shared_by_techniques_and_independent_of_image_order(vizkit_context):
    context = vizkit_context(METRIC, {"steps": 4})
    rng = np.random.default_rng(1)
    maps = {image.id: rng.random((SIZE, SIZE, 3)) - 0.5 for image in context.images}  # signed attributions
    cache = kit.per_model(context.model, faithfulness.BASELINE_CACHE, dict)
    first = by_image(METRIC.measure(context, explanation(maps, fake_technique("one"))))
    assert len(cache) == 3  # one per image (and class)
    second = by_image(METRIC.measure(context, explanation({k: v[..., ::-1, :] for k, v in maps.items()}, fake_technique("two"))))
    assert len(cache) == 3  # reused, not recomputed
    random_keys = ("random_deletion_auc", "random_insertion_auc")
    for image_id in first:
        assert [first[image_id].values[k] for k in random_keys] == [second[image_id].values[k] for k in random_keys]
        assert first[image_id].values["deletion_auc"] != second[image_id].values["deletion_auc"]
    # notes once per run, not once per technique
    assert len(context.notes) == len(set(context.notes)) == 2
    assert "blurred with RISE's Gaussian kernel" in context.notes[0]
    assert context.notes[1].startswith("Random maps (7×7 uniform values upsampled, seed 0") and "summary table" in context.notes[1]

    cache.clear()
    reordered = RunContext(context.model, context.images[::-1], context.params, context.preprocess)
    again = by_image(METRIC.measure(reordered, explanation(maps)))
    for image_id in first:
        assert [first[image_id].values[k] for k in random_keys] == [again[image_id].values[k] for k in random_keys]
    cache.clear()
    reseeded = RunContext(context.model, context.images, METRIC.resolve_params({"steps": 4, "seed": 1}), context.preprocess)
    other_seed = by_image(METRIC.measure(reseeded, explanation(maps)))
    assert any(first[i].values["random_deletion_auc"] != other_seed[i].values["random_deletion_auc"] for i in first)


def test_a_model_that_is_not_a_classifier_is_refused():
    inputs = keras.Input((SIZE, SIZE, 3))
    model = keras.Model(inputs, keras.layers.Conv2D(2, 3, padding="same")(inputs), name="segmenter")
    image = LoadedImage(id="a", path=Path("a.png"), array=np.zeros((SIZE, SIZE, 3), "float32"))
    context = RunContext(vizkit.ModelGraph.of(model), [image], METRIC.resolve_params({}), unit)
    with pytest.raises(ValueError, match="needs a classifier"):
        METRIC.measure(context, explanation({"a": np.ones((SIZE, SIZE))}))
    with pytest.raises(ValueError, match="needs a classifier"):
        deletion_insertion(model, image.array[None], [np.ones((SIZE, SIZE))])


def test_the_metric_is_registered(vizkit_host):
    from vizkit import host

    registered = host.metrics(vizkit_host())
    assert registered["faithfulness"].metric is METRIC
    assert [column.better for column in METRIC.columns] == ["lower", "higher", "", ""]  # then the random maps' yardstick


def test_the_baseline_follows_the_model_when_its_weights_change(vizkit_context):
    """A notebook may train the model between runs: the cached baseline must not outlive its weights."""
    context = vizkit_context(METRIC, {"steps": 4})
    maps = {image.id: np.random.default_rng(2).random((SIZE, SIZE)) for image in context.images}
    before = by_image(METRIC.measure(context, explanation(maps)))
    model = context.model.model
    model.set_weights([w * (-1.5 if w.ndim == 2 else 1) for w in model.get_weights()])  # the classifier's kernel
    after = by_image(METRIC.measure(context, explanation(maps)))
    kit.per_model(context.model, faithfulness.BASELINE_CACHE, dict).clear()
    fresh = by_image(METRIC.measure(context, explanation(maps)))
    for image_id in before:
        assert after[image_id].values["random_deletion_auc"] == fresh[image_id].values["random_deletion_auc"]
    assert any(before[i].values["random_deletion_auc"] != after[i].values["random_deletion_auc"] for i in before)


def test_a_small_image_is_still_blurred():
    """σ below ½ pixel would make a 1-pixel window: the substrate would be the image itself."""
    image = np.random.default_rng(3).uniform(0, 255, (16, 16, 3)).astype("float32")
    assert faithfulness.default_sigma(16, 16) < 0.5
    assert not np.allclose(faithfulness.substrate_image(image, "blur"), image)
