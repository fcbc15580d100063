"""The gradient attribution techniques against direct per-image implementations.

Every expected value here is computed one image at a time with a plain
``tf.GradientTape`` (or NumPy), walking the test models layer by layer with their own
weights: the class logits come from the last Dense layer's kernel and bias, Guided
Backpropagation's rule is applied by hand between per-layer vector-Jacobian products,
noise and baselines are drawn and blurred here. None of it goes through vizkit's
gradient helpers, ModelGraph, or the module under test.
"""

from __future__ import annotations

import json

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import build_nested, build_tiny
from PIL import Image

import vizkit
from vizkit import kit
from vizkit.plugins import attributions
from vizkit.plugins.attributions import (
    baselines,
    guided_backprop,
    guided_gradcam,
    guided_model,
    integrated_gradients,
    saliency,
    smoothgrad,
)


def unit(x):
    return x / 255.0


def build_binary(size: int = 32) -> keras.Model:
    """A sigmoid binary classifier (one unit), with a pooled feature map before its last conv."""
    keras.utils.set_random_seed(3)
    inputs = keras.Input((size, size, 3))
    x = keras.layers.Conv2D(6, 3, activation="relu", padding="same", bias_initializer="random_normal", name="conv1")(inputs)
    x = keras.layers.MaxPooling2D(name="pool")(x)
    x = keras.layers.Conv2D(8, 3, activation="relu", padding="same", bias_initializer="random_normal", name="conv2")(x)
    x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    outputs = keras.layers.Dense(1, activation="sigmoid", name="out")(x)
    return keras.Model(inputs, outputs, name="binary")


MODELS = {"tiny": build_tiny, "nested": build_nested, "binary": build_binary}


@pytest.fixture(scope="module")
def models():
    return {name: build() for name, build in MODELS.items()}


@pytest.fixture(scope="module")
def photos() -> np.ndarray:
    """vizkit's three sample photos (real files) at 32×32, N×32×32×3 float32 in 0-255."""
    return np.stack([
        np.asarray(Image.open(path).convert("RGB").resize((32, 32), Image.BILINEAR), dtype=np.float32)
        for path in kit.sample_photos()
    ])


# -- direct implementations -------------------------------------------------------------


def chain(model) -> list:
    """The model's layers in call order, nested models inlined (all test models are chains)."""
    layers = []
    for layer in model.layers:
        if isinstance(layer, keras.layers.InputLayer):
            continue
        layers += chain(layer) if isinstance(layer, keras.Model) else [layer]
    return layers


def head_scores(dense, features, score: str):
    """Per-class scores from the last Dense layer's own kernel and bias."""
    z = tf.matmul(features, dense.kernel) + dense.bias
    binary = dense.units == 1
    if score == "probability":
        p = tf.sigmoid(z) if binary else tf.nn.softmax(z)
        return tf.concat([1 - p, p], axis=-1) if binary else p
    return tf.concat([-z, z], axis=-1) if binary else z


def direct_scores(model, x, score: str = "logit"):
    """Class scores of preprocessed ``x``, layer by layer."""
    *body, dense = chain(model)
    for layer in body:
        x = layer(x)
    return head_scores(dense, x, score)


def direct_gradient(model, image, cls: int, preprocess=unit, score: str = "logit") -> np.ndarray:
    """∂S_c/∂x of one image (H×W×C, 0-255 pixels) with a plain GradientTape."""
    x = tf.constant(image[None], dtype=tf.float32)
    with tf.GradientTape() as tape:
        tape.watch(x)
        s = direct_scores(model, preprocess(x), score)[0, cls]
    return tape.gradient(s, x)[0].numpy()


def top1(model, pixels, score: str = "logit") -> np.ndarray:
    return np.argmax(direct_scores(model, unit(tf.constant(pixels)), score).numpy(), axis=-1)


def linear_part(layer, x):
    """A layer with a built-in ReLU, without it: the pre-activation z."""
    if isinstance(layer, keras.layers.Conv2D):
        return tf.nn.conv2d(x, layer.kernel, 1, layer.padding.upper()) + layer.bias
    return tf.matmul(x, layer.kernel) + layer.bias


def guided_rule(layer):
    """For a ReLU-like layer: (its pre-activation function, its cap); None otherwise."""
    config = layer.get_config()
    if isinstance(layer, keras.layers.ReLU):
        return (lambda x: x), config["max_value"]
    if isinstance(layer, keras.layers.Activation) and config["activation"] in ("relu", "relu6"):
        return (lambda x: x), 6.0 if config["activation"] == "relu6" else None
    if config.get("activation") in ("relu", "relu6"):
        return (lambda x: linear_part(layer, x)), 6.0 if config["activation"] == "relu6" else None
    return None


def direct_guided(model, image, cls: int, preprocess=unit, score: str = "logit") -> np.ndarray:
    """Springenberg et al.'s rule by hand: backward through the layers one at a time, each
    ReLU passing g · [its input > 0] · [g > 0] (ReLU6 too: its cap is not in the rule)."""
    *body, dense = chain(model)
    x = tf.constant(image[None], dtype=tf.float32)
    inputs = [x]
    h = preprocess(x)
    for layer in body:
        inputs.append(h)
        h = layer(h)
    with tf.GradientTape() as tape:
        tape.watch(h)
        s = head_scores(dense, h, score)[0, cls]
    g = tape.gradient(s, h)
    for layer, a in zip(reversed(body), reversed(inputs[1:])):
        rule = guided_rule(layer)
        with tf.GradientTape() as tape:
            tape.watch(a)
            z = rule[0](a) if rule else layer(a)
        if rule:
            g = g * tf.cast(z > 0, g.dtype) * tf.cast(g > 0, g.dtype)
        g = tape.gradient(z, a, output_gradients=g)
    with tf.GradientTape() as tape:  # the preprocessing
        tape.watch(x)
        y = preprocess(x)
    return tape.gradient(y, x, output_gradients=g)[0].numpy()


def direct_gradcam(model, image, cls: int, layer_name: str, preprocess=unit, score: str = "logit") -> np.ndarray:
    """Grad-CAM of one image: ReLU(Σ_k mean(∂S_c/∂A_k) A_k), divided by its maximum."""
    *body, dense = chain(model)
    h = preprocess(tf.constant(image[None], dtype=tf.float32))
    with tf.GradientTape() as tape:
        for layer in body:
            h = layer(h)
            if layer.name == layer_name:
                features = h
                tape.watch(features)
        s = head_scores(dense, h, score)[0, cls]
    weights = tf.reduce_mean(tape.gradient(s, features), axis=(1, 2))
    cam = tf.nn.relu(tf.reduce_sum(features * weights[:, None, None, :], axis=-1))[0].numpy()
    assert cam.max() > 0, "no positive evidence: pick another image or class"
    return cam / cam.max()


def gaussian_blur(image: np.ndarray, sigma: float) -> np.ndarray:
    """A separable Gaussian (to ±3σ), edges mirrored without repeating the edge pixel."""
    radius = int(3 * sigma + 0.5)
    taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    taps /= taps.sum()
    out = image.astype(np.float64)
    for axis in (0, 1):
        padded = np.pad(out, [(radius, radius) if a == axis else (0, 0) for a in range(3)], mode="reflect")
        out = sum(w * np.take(padded, np.arange(i, i + image.shape[axis]), axis=axis) for i, w in enumerate(taps))
    return out


def direct_baseline(image: np.ndarray, kind: str, blur: float = 0.05) -> np.ndarray:
    if kind == "black":
        return np.zeros_like(image)
    if kind == "mean":
        return np.ones_like(image) * image.reshape(-1, 3).mean(axis=0)
    return gaussian_blur(image, blur * max(image.shape[:2]))


def direct_ig(model, image, cls: int, baseline: np.ndarray, steps: int, score: str = "logit") -> np.ndarray:
    """(x − x') · 1/m Σ_{k=1..m} ∂S_c(x' + (k/m)(x − x'))/∂x, one path point at a time."""
    total = sum(direct_gradient(model, baseline + (k / steps) * (image - baseline), cls, score=score) for k in range(1, steps + 1))
    return (image - baseline) * total / steps


def scale_of(array) -> float:
    return float(np.abs(array).max())


# -- saliency ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", MODELS)
def test_saliency_is_the_plain_gradient(models, photos, name):
    model = models[name]
    got, classes = saliency(model, photos, preprocess=unit)
    np.testing.assert_array_equal(classes, top1(model, photos))
    assert got.shape == photos.shape and got.dtype == np.float32
    for image, cls, attribution in zip(photos, classes, got):
        expected = direct_gradient(model, image, cls)
        assert (expected < 0).any() and (expected > 0).any()  # signed, as kept
        np.testing.assert_allclose(attribution, expected, rtol=1e-4, atol=1e-5 * scale_of(expected))


# -- SmoothGrad ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", MODELS)
def test_smoothgrad_is_the_mean_gradient_of_seeded_noisy_copies(models, photos, name):
    model, samples, noise, seed = models[name], 3, 0.2, 5
    # per_pass=2: chunks of two rows, which straddle images
    got, classes = smoothgrad(model, photos, samples=samples, noise=noise, seed=seed, preprocess=unit, per_pass=2)
    np.testing.assert_array_equal(classes, top1(model, photos))
    for image, cls, attribution in zip(photos, classes, got):
        sigma = noise * (image.max() - image.min())
        eps = np.random.default_rng(seed).standard_normal((samples, *image.shape), dtype=np.float32) * np.float32(sigma)
        expected = np.mean([direct_gradient(model, image + e, cls) for e in eps], axis=0)
        np.testing.assert_allclose(attribution, expected, rtol=1e-4, atol=1e-5 * scale_of(expected))


def test_smoothgrad_is_seeded_and_independent_of_chunking(models, photos):
    model = models["tiny"]
    first, _ = smoothgrad(model, photos, classes=[0, 1, 2], samples=4, seed=3, preprocess=unit, per_pass=3)
    again, _ = smoothgrad(model, photos, classes=[0, 1, 2], samples=4, seed=3, preprocess=unit, per_pass=3)
    chunked, _ = smoothgrad(model, photos, classes=[0, 1, 2], samples=4, seed=3, preprocess=unit, per_pass=5)
    other, _ = smoothgrad(model, photos, classes=[0, 1, 2], samples=4, seed=4, preprocess=unit, per_pass=3)
    np.testing.assert_array_equal(first, again)
    np.testing.assert_allclose(chunked, first, rtol=1e-5, atol=1e-6 * scale_of(first))
    assert np.abs(other - first).max() > 0.05 * scale_of(first)


# -- Integrated Gradients -------------------------------------------------------------------


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("kind", attributions.BASELINES)
def test_integrated_gradients_is_the_right_riemann_sum(models, photos, name, kind):
    model, steps = models[name], 6
    got, classes, errors = integrated_gradients(model, photos, steps=steps, baseline=kind, preprocess=unit, per_pass=4)
    np.testing.assert_array_equal(classes, top1(model, photos))
    for image, cls, attribution, error in zip(photos, classes, got, errors):
        reference = direct_baseline(image, kind)
        np.testing.assert_allclose(baselines(image[None], kind)[0], reference, rtol=1e-5, atol=1e-3)
        expected = direct_ig(model, image, cls, reference.astype(np.float32), steps)
        np.testing.assert_allclose(attribution, expected, rtol=1e-4, atol=1e-4 * scale_of(expected))
        # the error the report states, from the direct scores
        ends = direct_scores(model, unit(tf.constant(np.stack([image, reference]), dtype=tf.float32))).numpy()[:, cls]
        change = ends[0] - ends[1]
        assert error == pytest.approx(abs(attribution.sum(dtype=np.float64) - change) / abs(change), rel=1e-3, abs=1e-5)


@pytest.mark.parametrize("kind", attributions.BASELINES)
def test_integrated_gradients_is_complete_within_1_percent_at_64_steps(models, photos, kind):
    model = models["tiny"]
    got, classes, errors = integrated_gradients(model, photos, steps=64, baseline=kind, preprocess=unit)
    for image, cls, attribution, error in zip(photos, classes, got, errors):
        reference = direct_baseline(image, kind).astype(np.float32)
        ends = direct_scores(model, unit(tf.constant(np.stack([image, reference])))).numpy()[:, cls]
        change = float(ends[0] - ends[1])
        assert abs(change) > 1e-3  # a real score difference to account for
        assert abs(attribution.sum(dtype=np.float64) - change) < 0.01 * abs(change)
        assert error < 0.01


def test_integrated_gradients_of_a_linear_model_is_exact():
    """S_c(x) = w_c · x/255 + b_c: IG from black is x ⊙ w_c/255, whatever the steps."""
    inputs = keras.Input((2, 2, 3))
    dense = keras.layers.Dense(3, name="linear")
    model = keras.Model(inputs, dense(keras.layers.Flatten()(inputs)), name="linear")
    rng = np.random.default_rng(0)
    dense.set_weights([rng.normal(size=(12, 3)).astype("float32"), np.array([0.5, -1, 2], "float32")])
    x = rng.uniform(0, 255, (2, 2, 2, 3)).astype("float32")
    w = dense.get_weights()[0]
    got, classes, errors = integrated_gradients(model, x, classes=[2, 0], steps=3, preprocess=unit)
    for image, cls, attribution in zip(x, [2, 0], got):
        np.testing.assert_allclose(attribution, image * w[:, cls].reshape(2, 2, 3) / 255, rtol=1e-5, atol=1e-6)
    assert (errors < 1e-5).all()
    grads, _ = saliency(model, x, classes=[2, 0], preprocess=unit)
    np.testing.assert_allclose(grads[0], w[:, 2].reshape(2, 2, 3) / 255, rtol=1e-6)


# -- Guided Backpropagation -----------------------------------------------------------------


def hand_set_relus() -> keras.Model:
    """x (1×3×1) → Dense(I, relu) → ReLU(max 6) → Dense(2I, relu6) → Activation(relu) →
    keras.ops.relu → Dense(2, softmax) with class 0's weights w = (−1, 3, 2)."""
    inputs = keras.Input((1, 3, 1))
    x = keras.layers.Flatten()(inputs)
    first = keras.layers.Dense(3, activation="relu", name="first")
    x = keras.layers.ReLU(max_value=6.0, name="clip")(first(x))
    second = keras.layers.Dense(3, activation="relu6", name="second")
    x = keras.layers.Activation("relu", name="act")(second(x))
    x = keras.ops.relu(x)
    head = keras.layers.Dense(2, activation="softmax", name="head")
    model = keras.Model(inputs, head(x), name="hand_set")
    first.set_weights([np.eye(3, dtype="float32"), np.zeros(3, "float32")])
    second.set_weights([2 * np.eye(3, dtype="float32"), np.zeros(3, "float32")])
    head.set_weights([np.array([[-1, 1], [3, -3], [2, -2]], "float32"), np.zeros(2, "float32")])
    return model


def test_guided_backprop_known_answer_zeroes_negative_gradients_at_relus():
    """x = (2, −1, 8): first = (2, 0, 8), clip = (2, 0, 6), second = relu6(4, 0, 12) = (4, 0, 6).

    Plain gradient of logit 0 (w = (−1, 3, 2)): unit 2 is off (x < 0), unit 3 is cut by
    relu6 (12 > 6), unit 1 passes −1 × 2: (−2, 0, 0). Guided: unit 1's gradient is negative
    and stopped at the first ReLU it meets; unit 2 is still off; unit 3 passes +2 × 2
    through every ReLU, the relu6 above its cap included: (0, 0, 4).
    """
    model = hand_set_relus()
    x = np.array([2, -1, 8], "float32").reshape(1, 1, 3, 1)
    plain, _ = saliency(model, x, classes=0)
    guided, classes = guided_backprop(model, x, classes=0)
    np.testing.assert_allclose(plain.ravel(), [-2, 0, 0], atol=1e-6)
    np.testing.assert_allclose(guided.ravel(), [0, 0, 4], atol=1e-6)
    assert classes.tolist() == [0]
    copy = guided_model(model)
    assert copy.relus == ["first", "clip", "second", "act", "relu"]
    assert copy.capped == 2 and "5 ReLU(s) guided, 2 of them capped" in copy.describe()
    np.testing.assert_allclose(guided.ravel(), direct_guided(model, x[0], 0, preprocess=lambda v: v).ravel(), atol=1e-6)


def test_guided_backprop_leaves_the_model_unchanged(photos):
    model = build_tiny()
    config, weights = model.get_config(), [w.copy() for w in model.get_weights()]
    before = model(unit(photos), training=False).numpy()
    guided_backprop(model, photos, preprocess=unit)
    copy = guided_model(model)
    assert model.get_config() == config
    assert all(np.array_equal(a, b) for a, b in zip(model.get_weights(), weights))
    assert np.array_equal(model(unit(photos), training=False).numpy(), before)
    # the guided copy computes the same function forward, with the same layers' weights
    np.testing.assert_allclose(copy.model(unit(photos), training=False).numpy(), before, rtol=1e-6)
    assert copy.model.get_layer("conv1") is model.get_layer("conv1")


def test_guided_backprop_follows_weight_changes_of_rebuilt_relu6_layers():
    model = hand_set_relus()
    x = np.array([2, -1, 8], "float32").reshape(1, 1, 3, 1)
    guided_backprop(model, x, classes=0)
    model.get_layer("second").set_weights([3 * np.eye(3, dtype="float32"), np.zeros(3, "float32")])
    guided, _ = guided_backprop(model, x, classes=0)
    np.testing.assert_allclose(guided.ravel(), [0, 0, 6], atol=1e-6)


@pytest.mark.parametrize("name", MODELS)
def test_guided_backprop_equals_the_rule_applied_by_hand(models, photos, name):
    model = models[name]
    got, classes = guided_backprop(model, photos, preprocess=unit)
    np.testing.assert_array_equal(classes, top1(model, photos))
    for image, cls, attribution in zip(photos, classes, got):
        expected = direct_guided(model, image, cls)
        plain = direct_gradient(model, image, cls)
        assert np.abs(expected - plain).max() > 0.1 * scale_of(plain)  # the rule changes something here
        np.testing.assert_allclose(attribution, expected, rtol=1e-4, atol=1e-5 * scale_of(expected))


def test_guided_backprop_needs_relus(photos):
    inputs = keras.Input((32, 32, 3))
    x = keras.layers.Conv2D(4, 3, activation="tanh")(inputs)
    model = keras.Model(inputs, keras.layers.Dense(2, activation="softmax")(keras.layers.GlobalAveragePooling2D()(x)), name="smooth")
    with pytest.raises(ValueError, match="smooth has none.*saliency"):
        guided_backprop(model, photos)


# -- Guided Grad-CAM ------------------------------------------------------------------------


@pytest.mark.parametrize("name, layer", [("tiny", "conv2"), ("nested", "base_conv2"), ("binary", "conv2"), ("tiny", "conv1")])
def test_guided_gradcam_is_guided_backprop_times_the_upsampled_gradcam(models, photos, name, layer):
    model = models[name]
    got, classes = guided_gradcam(model, photos, layer=layer if layer != "conv2" else None, preprocess=unit)
    np.testing.assert_array_equal(classes, top1(model, photos))
    for image, cls, attribution in zip(photos, classes, got):
        cam = direct_gradcam(model, image, cls, layer)
        upsampled = tf.image.resize(cam[..., None], (32, 32), method="bilinear").numpy()
        expected = direct_guided(model, image, cls) * upsampled
        np.testing.assert_allclose(attribution, expected, rtol=1e-4, atol=1e-4 * scale_of(expected))


# -- batches, techniques, CLI ----------------------------------------------------------------

FUNCTIONS = {
    "saliency": lambda m, x: saliency(m, x, preprocess=unit)[0],
    "smoothgrad": lambda m, x: smoothgrad(m, x, samples=3, preprocess=unit, per_pass=4)[0],
    "integrated_gradients": lambda m, x: integrated_gradients(m, x, steps=5, baseline="blurred", preprocess=unit, per_pass=4)[0],
    "guided_backprop": lambda m, x: guided_backprop(m, x, preprocess=unit)[0],
    "guided_gradcam": lambda m, x: guided_gradcam(m, x, preprocess=unit)[0],
}


@pytest.mark.parametrize("name", FUNCTIONS)
def test_an_image_in_a_batch_gets_what_it_gets_alone(models, photos, name):
    model, explain = models["nested"], FUNCTIONS[name]
    together = explain(model, photos)
    for i in range(len(photos)):
        alone = explain(model, photos[i : i + 1])[0]
        np.testing.assert_allclose(together[i], alone, rtol=1e-4, atol=1e-5 * scale_of(alone))


def test_techniques_are_comparable_and_cite_their_papers():
    cited = {
        "saliency": "Simonyan et al. 2014", "smoothgrad": "Smilkov et al. 2017",
        "integrated_gradients": "Sundararajan et al. 2017", "guided_backprop": "Springenberg et al. 2015",
        "guided_gradcam": "Selvaraju et al. 2017",
    }
    assert [t.name for t in attributions.TECHNIQUES] == list(cited)
    for technique in attributions.TECHNIQUES:
        assert technique.comparable and cited[technique.name] in technique.description
        assert {"class", "score", "top", "alpha", "overlay", "colormap", "batch"} <= {o.name for o in technique.options}


def test_a_non_classifier_is_refused(photos):
    inputs = keras.Input((32, 32, 3))
    model = keras.Model(inputs, keras.layers.Conv2D(4, 3, activation="relu")(inputs), name="segmenter")
    for name, explain in FUNCTIONS.items():
        with pytest.raises(ValueError, match="needs a classifier"):
            explain(model, photos)


def test_cli_runs_every_attribution_reproducibly(vizkit_cli, tiny_model_file, vizkit_images, tmp_path):
    names = [t.name for t in attributions.TECHNIQUES]
    settings = ["-s", "smoothgrad.samples=3", "-s", "integrated_gradients.steps=8", "-s", "integrated_gradients.baseline=mean"]
    outs = [tmp_path / "one", tmp_path / "two"]
    for out in outs:
        args = ["run", tiny_model_file, vizkit_images, *sum((["-t", n] for n in names), []), *settings, "--save-arrays", "-o", out]
        result = vizkit_cli(*args, env={"SOURCE_DATE_EPOCH": "1700000000"})
        assert result.exit_code == vizkit.ExitCode.OK, result.output
    report = json.loads((outs[0] / "report.json").read_text(encoding="utf-8"))
    arrays = np.load(outs[0] / "arrays.npz")
    by_name = {t["name"]: t for t in report["techniques"]}
    assert list(by_name) == names
    for name in names:
        technique = by_name[name]
        assert technique["status"] == "ok", technique["error"]
        assert [a["image_id"] for a in technique["artifacts"]] == [image["id"] for image in report["images"]]
        for artifact in technique["artifacts"]:
            assert artifact["shape"] == [32, 32, 3] and artifact["dtype"] == "float32"
            assert arrays[artifact["array"]].shape == (32, 32, 3)
    errors = [a["caption"] for a in by_name["integrated_gradients"]["artifacts"]]
    assert all("completeness error" in caption for caption in errors)
    assert any("completeness error" in note for note in by_name["integrated_gradients"]["notes"])
    assert any("ReLU(s) guided" in note for note in by_name["guided_backprop"]["notes"])
    assert by_name["guided_gradcam"]["artifacts"][0]["layer"] == "conv2"
    for name in ("report.json", "arrays.npz", "index.html"):
        assert (outs[0] / name).read_bytes() == (outs[1] / name).read_bytes(), name
