"""scorecam and ablationcam against their papers' formulas, written out per image and per
channel with plain Keras layer calls, OpenCV and NumPy; then hand-worked answers and the CLI.

Each case gives the layer's activations A and "the rest of the model" from A (and the
image, for a branch that bypasses the layer) to the input of the classifier's Dense, by
calling the model's own layers by hand; the class scores come from that Dense's weights.
Nothing here goes through vizkit's graph, probes or compiled functions.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Callable

import cv2
import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import build_nested, build_tiny
from test_techniques import bright_patch_model

from vizkit.plugins.perturbation_cams import ablationcam, scorecam


def images(count: int, size: int = 32, seed: int = 0, scale: float = 1.0) -> np.ndarray:
    """Seeded float32 images in [0, scale): the models' preprocessed input."""
    return (np.random.default_rng(seed).random((count, size, size, 3)) * scale).astype("float32")


@dataclass
class Case:
    """A model cut by hand at a layer: x → A, and (x, A) → the classifier Dense's input."""

    model: keras.Model
    layer: str
    features: Callable[[np.ndarray], np.ndarray]
    rest: Callable[[np.ndarray, np.ndarray], np.ndarray]
    head: keras.layers.Dense

    def scores(self, x: np.ndarray, a: np.ndarray, score: str) -> np.ndarray:
        """Per-class scores of the head from its input: probabilities or logits; a single
        sigmoid unit as the two classes (1 − p, p), its logit z as (−z, z)."""
        kernel, bias = self.head.get_weights()
        z = np.asarray(self.rest(x, a), "float64") @ kernel + bias
        if kernel.shape[1] == 1:
            z = np.concatenate([-z, z], axis=1)
            return z if score == "logit" else 1 / (1 + np.exp(-z))  # σ(−z) = 1 − σ(z)
        if score == "logit":
            return z
        e = np.exp(z - z.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)


def apply(*layers):
    def run(x):
        for layer in layers:
            x = layer(tf.constant(x, tf.float32) if isinstance(x, np.ndarray) else x)
        return np.asarray(x)

    return run


def tiny_case(layer: str) -> Case:
    model = build_tiny()
    get = model.get_layer
    upto = keras.Model(model.inputs[0], get(layer).output)
    after = {"conv2": [], "conv1": [get("pool1"), get("conv2")]}[layer]
    rest = apply(*after, get("gap"))
    return Case(model, layer, lambda x: np.asarray(upto(x)), lambda x, a: rest(a), get("predictions"))


def nested_case(layer: str) -> Case:
    model = build_nested()
    base, rescale = model.get_layer("base"), model.get_layer("rescale")
    upto = keras.Model(base.inputs[0], base.get_layer(layer).output)
    after = {"base_conv2": [], "base_conv1": [base.get_layer("base_conv2")]}[layer]
    rest = apply(*after, model.get_layer("gap"))
    return Case(model, f"base/{layer}", lambda x: np.asarray(upto(rescale(x))), lambda x, a: rest(a), model.get_layer("head"))


def binary_case() -> Case:
    """A sigmoid binary classifier with hand-set weights: 4×4 cells of mean red, green and
    blue, pooled; z = 0.05 red − 0.05 green + 0.01 blue − 0.5: class 1 "red", class 0 "green"."""
    inputs = keras.Input((32, 32, 3))
    conv = keras.layers.Conv2D(3, 4, strides=4, activation="relu", name="colors")
    x = keras.layers.GlobalAveragePooling2D(name="gap")(conv(inputs))
    out = keras.layers.Dense(1, activation="sigmoid", name="out")
    model = keras.Model(inputs, out(x), name="binary")
    kernel = np.zeros((4, 4, 3, 3), "float32")
    for color in range(3):
        kernel[:, :, color, color] = 1 / 16
    conv.set_weights([kernel, np.zeros(3, "float32")])
    out.set_weights([np.array([[0.05], [-0.05], [0.01]], "float32"), np.array([-0.5], "float32")])
    upto = keras.Model(model.inputs[0], conv.output)
    rest = apply(model.get_layer("gap"))
    return Case(model, "colors", lambda x: np.asarray(upto(x)), lambda x, a: rest(a), out)


def red_and_green(count: int, seed: int) -> np.ndarray:
    """Noisy images, reddish on the left, greenish on the right, 0-255."""
    x = images(count, seed=seed, scale=80)
    x[:, :, :16, 0] += 150
    x[:, :, 16:, 1] += 150
    return x


def residual_case() -> Case:
    """A skip connection around the explained layer: ablating it must keep the other branch."""
    keras.utils.set_random_seed(5)
    inputs = keras.Input((32, 32, 3))
    first = keras.layers.Conv2D(6, 3, padding="same", activation="relu", name="c1")(inputs)
    second = keras.layers.Conv2D(6, 3, padding="same", activation="relu", name="c2")(first)
    x = keras.layers.Add(name="add")([first, second])
    x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    model = keras.Model(inputs, keras.layers.Dense(3, activation="softmax", name="head")(x), name="residual")
    to_c1 = keras.Model(model.inputs[0], first)
    upto = keras.Model(model.inputs[0], second)
    add, gap = model.get_layer("add"), model.get_layer("gap")

    def rest(x, a):
        return np.asarray(gap(add([to_c1(x), tf.constant(a)])))

    return Case(model, "c2", lambda x: np.asarray(upto(x)), rest, model.get_layer("head"))


# -- the papers' formulas, one image and one channel at a time ------------------------------


def normalized(cam: np.ndarray) -> np.ndarray:
    cam = np.maximum(cam, 0)
    return cam / cam.max() if cam.max() > 0 else cam


def direct_scorecam(case: Case, image: np.ndarray, cls: int, score: str, channels: list[int] | None = None) -> np.ndarray:
    """Wang et al.: H_k = minmax(bilinear_up(A_k)); w_k = f_c(X ∘ H_k) − f_c(0); relu(Σ w_k A_k)."""
    x = image[None]
    a = case.features(x)[0]

    def f(masked):
        return case.scores(masked, case.features(masked), score)[0, cls]

    baseline = f(np.zeros_like(x))
    cam = np.zeros(a.shape[:2])
    for k in range(a.shape[-1]) if channels is None else channels:
        up = cv2.resize(a[..., k], (image.shape[1], image.shape[0]), interpolation=cv2.INTER_LINEAR)
        if up.max() == up.min():
            continue  # an all-zero mask: X ∘ 0 is the baseline, no increase
        mask = (up - up.min()) / (up.max() - up.min())
        cam += (f((image * mask[..., None])[None].astype("float32")) - baseline) * a[..., k]
    return normalized(cam)


def direct_ablationcam(case: Case, image: np.ndarray, cls: int, score: str) -> np.ndarray:
    """Desai & Ramaswamy: w_k = (y_c − y_c^k) / y_c, y_c^k with channel k zeroed; relu(Σ w_k A_k).

    Divided by |y_c|, as vizkit does: the same for a probability (always positive)."""
    x = image[None]
    a = case.features(x)[0]
    y = case.scores(x, a[None], score)[0, cls]
    cam = np.zeros(a.shape[:2])
    for k in range(a.shape[-1]):
        ablated = a.copy()
        ablated[..., k] = 0
        cam += (y - case.scores(x, ablated[None], score)[0, cls]) / abs(y) * a[..., k]
    return normalized(cam)


METHODS = {"scorecam": (scorecam, direct_scorecam), "ablationcam": (ablationcam, direct_ablationcam)}


def check_against_direct(method: str, case: Case, batch: np.ndarray, score: str, classes=None, **options):
    batched, direct = METHODS[method]
    heatmaps, targets = batched(case.model, batch, case.layer, classes, score, **options)
    expected_classes = case.scores(batch, case.features(batch), "probability").argmax(1) if classes is None else classes
    np.testing.assert_array_equal(targets, np.broadcast_to(expected_classes, (len(batch),)))
    assert heatmaps.dtype == np.float32 and heatmaps.shape == (len(batch), *case.features(batch[:1]).shape[1:3])
    for i, (image, cls) in enumerate(zip(batch, targets)):
        expected = direct(case, image, int(cls), score)
        np.testing.assert_allclose(heatmaps[i], expected, rtol=1e-3, atol=2e-4, err_msg=f"{method} image {i}")
        assert expected.max() == pytest.approx(1.0)  # a real map, not two zero maps agreeing
    return heatmaps


@pytest.mark.parametrize("method", ["scorecam", "ablationcam"])
@pytest.mark.parametrize("layer", ["conv2", "conv1"])
def test_tiny_model_equals_the_papers_formula(method, layer):
    case = tiny_case(layer)
    batch = images(3, seed=1)
    heatmaps = check_against_direct(method, case, batch, "probability", masks_per_pass=7) if method == "scorecam" else (
        check_against_direct(method, case, batch, "probability", channels_per_pass=5)
    )
    assert not np.allclose(heatmaps[0], heatmaps[1], atol=1e-3)


@pytest.mark.parametrize("method", ["scorecam", "ablationcam"])
def test_tiny_model_logit_and_chosen_classes(method):
    case = tiny_case("conv2")
    batch = images(2, seed=2)
    check_against_direct(method, case, batch, "logit")
    # one class per image (with these random weights only 1 and 3 have positive evidence)
    check_against_direct(method, case, batch, "probability", classes=[3, 1])


@pytest.mark.parametrize("method", ["scorecam", "ablationcam"])
@pytest.mark.parametrize("layer", ["base_conv2", "base_conv1"])
def test_nested_model_equals_the_papers_formula(method, layer):
    check_against_direct(method, nested_case(layer), images(2, seed=3, scale=255), "probability")


@pytest.mark.parametrize("method", ["scorecam", "ablationcam"])
@pytest.mark.parametrize("score", ["probability", "logit"])
def test_sigmoid_binary_classifier_both_classes(method, score):
    case = binary_case()
    batch = red_and_green(2, seed=4)
    for cls, side, other in ((1, slice(None, 4), slice(4, None)), (0, slice(4, None), slice(None, 4))):
        heatmaps = check_against_direct(method, case, batch, score, classes=cls)
        # "red" comes from the left half, "green" from the right
        assert (heatmaps[:, :, side] > 0).all() and (heatmaps[:, :, other] == 0).all()


def test_ablation_keeps_the_branch_that_bypasses_the_layer():
    case = residual_case()
    check_against_direct("ablationcam", case, images(2, seed=5), "probability", channels_per_pass=4)
    check_against_direct("scorecam", case, images(1, seed=5), "probability")


def test_scorecam_channels_keeps_those_with_the_highest_mean_activation():
    case = tiny_case("conv2")
    batch = images(2, seed=6)
    heatmaps, classes = scorecam(case.model, batch, "conv2", channels=5)
    for i, image in enumerate(batch):
        means = case.features(image[None])[0].mean(axis=(0, 1))
        top = list(np.argsort(-means)[:5])
        expected = direct_scorecam(case, image, int(classes[i]), "probability", channels=top)
        np.testing.assert_allclose(heatmaps[i], expected, rtol=1e-3, atol=2e-4)
    all_of_them, _ = scorecam(case.model, batch, "conv2")
    assert not np.allclose(heatmaps, all_of_them, atol=1e-3)
    more_than_there_are, _ = scorecam(case.model, batch, "conv2", channels=99)
    np.testing.assert_array_equal(more_than_there_are, all_of_them)


@pytest.mark.parametrize("method", ["scorecam", "ablationcam"])
def test_an_image_in_a_batch_equals_it_alone_whatever_the_pass_size(method):
    model = build_tiny()
    batch = images(3, seed=7)
    passes = "masks_per_pass" if method == "scorecam" else "channels_per_pass"
    run = METHODS[method][0]
    together, classes = run(model, batch, "conv2", **{passes: 64})
    for i in range(3):
        alone, alone_class = run(model, batch[i : i + 1], "conv2", **{passes: 3})
        assert alone_class[0] == classes[i]
        np.testing.assert_allclose(alone[0], together[i], rtol=1e-5, atol=1e-6)
    again, _ = run(model, batch, "conv2", **{passes: 64})
    np.testing.assert_array_equal(again, together)  # deterministic


# -- answers worked out by hand --------------------------------------------------------------


def corner_image() -> np.ndarray:
    """A black 32×32 image with a white 8×8 square in the bottom-right corner."""
    image = np.zeros((1, 32, 32, 3), "float32")
    image[0, 24:, 24:] = 255.0
    return image


def test_scorecam_known_answer_bright_corner():
    """bright_patch_model: cells of 4×4 pixels, A_0 = brightness b, A_1 = 255 − b; class
    "bright" has logit 0.05 (mean A_0 − mean A_1) = 0.1 mean(X) − 12.75, linear in X, so
    w_k = 0.1 mean(X ∘ H_k). H_0 is 1 in the corner but on its first two rows and columns,
    where bilinear upsampling gives 0.625 and 0.875 (then 1, 1, 1, 1, 1, 1: 7.5 per line),
    and H_1 = 1 − H_0. X is white on the corner only, so w_1 / w_0 = (64 − 7.5²) / 7.5²."""
    model, image = bright_patch_model(), corner_image()
    heatmaps, classes = scorecam(model, image, "evidence", classes=0, score="logit")
    expected = np.full((8, 8), (64 - 7.5**2) / 7.5**2, "float32")
    expected[6:, 6:] = 1.0
    np.testing.assert_allclose(heatmaps[0], expected, rtol=1e-5)
    # "dark" is highest on the black baseline: masking can only lower it, every weight < 0
    dark, _ = scorecam(model, image, "evidence", classes=1, score="logit")
    assert (dark[0] == 0).all()
    # probabilities: a monotone function of the same logits, so the same order of weights
    bright, _ = scorecam(model, image, "evidence", classes=0)
    assert (bright[0][6:, 6:] == 1).all() and (bright[0][:6] < 1).all() and (bright[0][:, :6] < 1).all()


@pytest.mark.parametrize("score", ["probability", "logit"])
def test_ablationcam_known_answer_bright_corner(score):
    """Zeroing A_0 (brightness) lowers "bright", zeroing A_1 (darkness) raises it: w_0 > 0 >
    w_1, so relu(w_0 A_0 + w_1 A_1) is w_0 · 255 on the white cells and 0 on the black ones
    (the logit of "bright" is negative here: dividing by it, not by its size, would flip
    the map)."""
    model, image = bright_patch_model(), corner_image()
    heatmaps, classes = ablationcam(model, image, classes=0, score=score)  # default layer: evidence
    expected = np.zeros((8, 8), "float32")
    expected[6:, 6:] = 1.0
    np.testing.assert_allclose(heatmaps[0], expected, atol=1e-6)
    dark, classes = ablationcam(model, image, score=score)  # top-1: mostly black, so "dark"
    assert classes[0] == 1
    np.testing.assert_allclose(dark[0], 1.0 - expected, atol=1e-6)


# -- from the command line ------------------------------------------------------------------


def test_cli_runs_both_and_is_byte_identical_when_reproducible(vizkit_cli, vizkit_model_file, vizkit_images, tmp_path, monkeypatch):
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "0")
    outputs = []
    for run in ("one", "two"):
        out = tmp_path / run
        result = vizkit_cli(
            "run", vizkit_model_file, vizkit_images, "-o", out, "-q", "--save-arrays",
            "-t", "scorecam", "-t", "ablationcam", "-s", "scorecam.masks_per_pass=10", "-s", "scorecam.channels=12", "-s", "ablationcam.batch=2",
        )
        assert result.exit_code == 0, result.output
        outputs.append(out)
    data = json.loads((outputs[0] / "report.json").read_text(encoding="utf-8"))
    arrays = np.load(outputs[0] / "arrays.npz", allow_pickle=False)
    ids = sorted(image["id"] for image in data["images"])
    assert len(ids) == 3
    for name in ("scorecam", "ablationcam"):
        (technique,) = [t for t in data["techniques"] if t["name"] == name]
        assert technique["status"] == "ok", technique
        assert technique["notes"][0].startswith("layer: conv2, the last layer")
        assert sorted(a["image_id"] for a in technique["artifacts"]) == ids
        for artifact in technique["artifacts"]:
            assert artifact["layer"] == "conv2" and artifact["shape"] == [16, 16]
            heatmap = arrays[artifact["array"]]
            assert heatmap.dtype == np.float32 and heatmap.min() >= 0 and heatmap.max() == pytest.approx(1.0)
    (scorecam_notes,) = [t["notes"] for t in data["techniques"] if t["name"] == "scorecam"]
    assert "channels: the 12 of 16 with the highest mean activation in each image; the others weigh 0" in scorecam_notes
    for file in ("report.json", "arrays.npz", "index.html"):
        assert (outputs[0] / file).read_bytes() == (outputs[1] / file).read_bytes(), file
