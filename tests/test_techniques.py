"""Each technique against a direct implementation of the chapter's formulas.

"Deep Learning with Python" (Keras 2.2), section 5.4, "visualizing what convnets learn":
activations, filter patterns by gradient ascent, and Grad-CAM. The expected values below
are written out the way the chapter's code computes them (sub-models built with
``keras.Model(model.inputs, layer.output)``, one image or one filter at a time, with
``tf.GradientTape``), never with vizkit's own helpers, and compared with vizkit's results
on the same real (tiny) Keras models.
"""

from __future__ import annotations

import cv2
import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import build_nested, build_tiny, write_image
from PIL import Image

from vizkit.graph import LayerError, ModelGraph
from vizkit.kit import last_feature_map_layer, overlay_heatmap
from vizkit.plugins import activations as activations_plugin
from vizkit.plugins import filters as filters_plugin
from vizkit.plugins.activations import channel_grid, feature_maps
from vizkit.plugins.filters import filter_patterns, initial_inputs
from vizkit.plugins.gradcam import gradcam as gradcam_of_score


# -- models and inputs shared by the module (built once: they are deterministic) -------


@pytest.fixture(scope="module")
def tiny():
    return build_tiny()


@pytest.fixture(scope="module")
def nested():
    return build_nested()


def images(count: int, size: int = 32, seed: int = 0) -> np.ndarray:
    """A seeded batch of pixel-valued (0-255) float32 images."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (count, size, size, 3)).astype("float32")


def sub_model(model, layer_name: str) -> keras.Model:
    """The chapter's ``Model(inputs=model.input, outputs=layer.output)``."""
    return keras.Model(model.inputs, model.get_layer(layer_name).output)


def call(model, x):
    """``model(x)``, x wrapped in a list where the model was built with a list of inputs."""
    x = tf.convert_to_tensor(x, dtype=tf.float32)
    return model([x] if isinstance(model.input, (list, tuple)) else x, training=False)


def run(model, x) -> np.ndarray:
    return keras.ops.convert_to_numpy(call(model, x))


# -- the chapter's formulas, written out --------------------------------------------


def chapter_channel(channel: np.ndarray) -> np.ndarray:
    """Listing 5.30's post-processing of one feature map (vizkit's guard for std = 0)."""
    x = channel.astype("float32").copy()
    x -= x.mean()
    std = x.std()
    if std == 0:
        return np.full(x.shape, 128, dtype="uint8")
    x /= std
    x *= 64
    x += 128
    return np.clip(x, 0, 255).astype("uint8")


def chapter_ascent(model, layer_name: str, filter_index: int, start: np.ndarray, steps: int, step: float = 1.0):
    """Listings 5.32-5.36: one filter, one image, eager GradientTape, RMS-normalized steps."""
    sub = sub_model(model, layer_name)
    x = tf.constant(start[None], dtype=tf.float32)
    for _ in range(steps):
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = tf.reduce_mean(call(sub, x)[:, :, :, filter_index])
        grads = tape.gradient(loss, x)
        grads /= tf.sqrt(tf.reduce_mean(tf.square(grads))) + 1e-5
        x += grads * step
    return x.numpy()[0]


def chapter_deprocess(x: np.ndarray) -> np.ndarray:
    """Listing 5.37."""
    x = x.astype("float32").copy()
    x -= x.mean()
    x /= x.std() + 1e-5
    x *= 0.1
    x += 0.5
    x = np.clip(x, 0, 1)
    x *= 255
    return np.clip(x, 0, 255).astype("uint8")


def chapter_normalize(heatmap: np.ndarray) -> np.ndarray:
    heatmap = np.maximum(heatmap, 0)
    assert heatmap.max() > 0, "test input gives no positive evidence: pick another class/image"
    return heatmap / heatmap.max()


def chapter_gradcam(model, layer_name: str, image: np.ndarray, class_index: int) -> np.ndarray:
    """Listings 5.40-5.42, with GradientTape: one image at a time."""
    grad_model = keras.Model(model.inputs, [model.get_layer(layer_name).output, model.output])
    with tf.GradientTape() as tape:
        conv_output, predictions = call(grad_model, image[None])
        class_score = predictions[:, class_index]
    grads = tape.gradient(class_score, conv_output)
    pooled = tf.reduce_mean(grads, axis=(0, 1, 2))
    heatmap = tf.reduce_mean(conv_output[0] * pooled, axis=-1).numpy()
    return chapter_normalize(heatmap)


# -- activations ---------------------------------------------------------------------


def test_activations_equal_chapter_sub_model(tiny):
    batch = images(3, seed=1)
    maps = feature_maps(tiny, batch, ["conv1", "pool1", "conv2"])
    assert list(maps) == ["conv1", "pool1", "conv2"]
    for name, got in maps.items():
        expected = run(sub_model(tiny, name), batch)
        assert got.shape == expected.shape
        assert got.dtype == np.float32
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-4)
    # each image is its own: one image alone gives the same maps as inside the batch
    alone = feature_maps(tiny, batch[1:2], ["conv2"])["conv2"]
    np.testing.assert_allclose(alone[0], maps["conv2"][1], rtol=1e-5, atol=1e-4)
    assert not np.allclose(maps["conv2"][0], maps["conv2"][1])


def test_activation_grid_standardizes_each_channel_and_tiles_16_per_row(tiny):
    x = images(1, seed=2)
    activation = run(sub_model(tiny, "conv2"), x)[0]  # 16×16×16
    # 40 channels, so that rows of 16 hold 16, 16 and 8 pictures
    stacked = np.concatenate([activation, activation[..., ::-1] * 2.0, activation[..., :8] + 1.0], axis=-1)
    height, width, channels = stacked.shape
    assert channels == 40
    grid = channel_grid(stacked, images_per_row=16, max_channels=0)
    assert grid.dtype == np.uint8
    assert grid.shape == (3 * height + 2, 16 * width + 15)
    shown = np.zeros(grid.shape, bool)
    for c in range(channels):
        top, left = (c // 16) * (height + 1), (c % 16) * (width + 1)
        tile_ = grid[top : top + height, left : left + width]
        expected = chapter_channel(stacked[..., c])
        assert np.abs(tile_.astype(int) - expected).max() <= 1, f"channel {c}"
        assert (tile_ == expected).mean() > 0.99, f"channel {c}"
        shown[top : top + height, left : left + width] = True
    # margins and the unused end of the last row are white
    assert (grid[~shown] == 255).all()
    # the pictures really differ from channel to channel (placement is checked, not luck)
    assert not np.array_equal(grid[:height, :width], grid[:height, width + 1 : 2 * width + 1])


def test_activation_grid_constant_channel_is_gray_and_max_channels_limits(tiny):
    x = images(1, seed=3)
    activation = run(sub_model(tiny, "conv1"), x)[0]  # 32×32×8, ReLU
    activation[..., 3] = 0.0  # a dead ReLU channel: the chapter would divide by std = 0
    grid = channel_grid(activation, images_per_row=16, max_channels=5)
    height, width = activation.shape[:2]
    assert grid.shape == (height, 5 * width + 4)  # one row, only the first 5 channels
    dead = grid[:, 3 * (width + 1) : 3 * (width + 1) + width]
    assert (dead == 128).all()
    live = grid[:, :width]
    assert np.abs(live.astype(int) - chapter_channel(activation[..., 0])).max() <= 1


# -- filter patterns -----------------------------------------------------------------


def test_initial_inputs_are_the_chapter_gray_noise():
    start = initial_inputs(3, 20, 3, seed=7)
    assert start.shape == (3, 20, 20, 3) and start.dtype == np.float32
    assert start.min() >= 128 and start.max() < 148
    assert 137 < start.mean() < 139  # uniform [0, 1) × 20 + 128 has mean 138
    np.testing.assert_array_equal(start, initial_inputs(3, 20, 3, seed=7))
    assert not np.array_equal(start, initial_inputs(3, 20, 3, seed=8))


@pytest.mark.parametrize("layer", ["conv1", "conv2"])
def test_filter_patterns_equal_chapter_gradient_ascent(tiny, layer):
    steps, seed = 10, 3
    indices = [0, 2, 5, 6, 1] if layer == "conv1" else [12, 0, 11, 3, 7]
    # batch=2: the filters go through vizkit in chunks of 2, 2 and 1
    patterns, raw = filter_patterns(tiny, layer, filters=indices, size=32, steps=steps, step=1.0, seed=seed, batch=2)
    start = initial_inputs(len(indices), 32, 3, seed)
    assert patterns.shape == raw.shape == (len(indices), 32, 32, 3)
    assert patterns.dtype == np.uint8 and raw.dtype == np.float32

    sub = sub_model(tiny, layer)
    for k, f in enumerate(indices):
        expected = chapter_ascent(tiny, layer, f, start[k], steps)
        # 10 float32 steps of RMS size 1 on values near 138 (spacing ~1.5e-5): round-off
        # and batched-vs-single convolution order stay far below 1e-3
        np.testing.assert_allclose(raw[k], expected, rtol=0, atol=1e-3, err_msg=f"filter {f}")
        assert np.abs(patterns[k].astype(int) - chapter_deprocess(expected)).max() <= 1
        before = run(sub, start[k : k + 1])[..., f].mean()
        after = run(sub, raw[k : k + 1])[..., f].mean()
        if np.abs(raw[k] - start[k]).max() == 0:
            # a filter dead on the start (ReLU all zero): no gradient, so no step, as in the chapter
            assert before == after == 0
        else:
            assert after > before, f"filter {f}: mean activation {before} -> {after}"
    # most filters moved, each about steps × step in RMS
    moved = [k for k in range(len(indices)) if not np.array_equal(raw[k], start[k])]
    assert len(moved) >= len(indices) - 2
    for k in moved:
        rms = np.sqrt(np.mean((raw[k] - start[k]) ** 2))
        assert 2 < rms <= steps + 1e-3


def test_filter_patterns_count_seed_and_start(tiny):
    by_count, raw_count = filter_patterns(tiny, "conv1", filters=3, size=32, steps=3, seed=5)
    by_list, raw_list = filter_patterns(tiny, "conv1", filters=[0, 1, 2], size=32, steps=3, seed=5, batch=1)
    np.testing.assert_allclose(raw_count, raw_list, atol=1e-4)
    start = initial_inputs(3, 32, 3, 5)
    _, raw_start = filter_patterns(tiny, "conv1", filters=3, size=32, steps=3, seed=99, start=start)
    np.testing.assert_allclose(raw_start, raw_count, atol=1e-4)
    # count larger than the layer: all 8 filters
    assert filter_patterns(tiny, "conv1", filters=100, size=32, steps=0)[0].shape[0] == 8
    # zero steps: the raw input is the start itself
    _, raw0 = filter_patterns(tiny, "conv1", filters=2, size=32, steps=0, seed=5)
    np.testing.assert_array_equal(raw0, initial_inputs(2, 32, 3, 5))


def test_filter_patterns_through_a_preprocess_function(tiny):
    """Ascent in 0-255 pixel space through preprocess == the chapter's ascent on the
    model preprocess ∘ model (the chapter's own setup is the identity)."""
    scale = lambda x: x / 127.5 - 1.0  # noqa: E731
    inputs = keras.Input((32, 32, 3))
    composed = keras.Model(inputs, sub_model(tiny, "conv2")(keras.layers.Rescaling(1 / 127.5, offset=-1)(inputs)))
    _, raw = filter_patterns(tiny, "conv2", filters=[0, 12], size=32, steps=5, seed=1, preprocess=scale)
    start = initial_inputs(2, 32, 3, 1)
    for k, f in enumerate([0, 12]):
        x = tf.constant(start[k : k + 1])
        for _ in range(5):
            with tf.GradientTape() as tape:
                tape.watch(x)
                loss = tf.reduce_mean(call(composed, x)[..., f])
            grads = tape.gradient(loss, x)
            x += grads / (tf.sqrt(tf.reduce_mean(tf.square(grads))) + 1e-5)
        np.testing.assert_allclose(raw[k], x.numpy()[0], atol=1e-3)


def test_filter_index_out_of_range_is_an_error(tiny):
    """conv1 has 8 filters. The chapter's ``layer_output[:, :, :, 8]`` fails; a pattern
    silently left as the starting noise (one_hot of an out-of-range index is all zero)
    would be shown as if it were filter 8's."""
    with pytest.raises((ValueError, IndexError, LayerError)):
        filter_patterns(tiny, "conv1", filters=[8], size=32, steps=2)


def test_filter_index_minus_one_is_the_last_filter_or_an_error(tiny):
    """The chapter's ``layer_output[:, :, :, -1]`` is the last filter (conv1: filter 7)."""
    try:
        _, raw = filter_patterns(tiny, "conv1", filters=[-1], size=32, steps=2, seed=0)
    except (ValueError, IndexError, LayerError):
        return
    _, last = filter_patterns(tiny, "conv1", filters=[7], size=32, steps=2, seed=0)
    assert not np.array_equal(last[0], initial_inputs(1, 32, 3, 0)[0])  # filter 7 does move
    np.testing.assert_allclose(raw, last, atol=1e-4)


# -- Grad-CAM ------------------------------------------------------------------------


def gradcam(*args, **kwargs):
    """Grad-CAM of the chapter's score: the model's output (softmax), not the logit."""
    return gradcam_of_score(*args, score="probability", **kwargs)


def logit_gradcam_direct(model, layer_name: str, image: np.ndarray, class_index: int) -> np.ndarray:
    """The paper's Grad-CAM on the tiny model: the pre-softmax logit x·W + b of the head."""
    upto = keras.Model(model.inputs, [model.get_layer(layer_name).output, model.get_layer("gap").output])
    kernel, bias = model.get_layer("predictions").get_weights()
    with tf.GradientTape() as tape:
        features, pooled = call(upto, image[None])
        logit = (tf.matmul(pooled, kernel) + bias)[:, class_index]
    grads = tape.gradient(logit, features)
    heatmap = tf.reduce_mean(features[0] * tf.reduce_mean(grads, axis=(0, 1, 2)), axis=-1).numpy()
    return chapter_normalize(heatmap)


def test_gradcam_of_the_logit_by_default(tiny):
    batch = images(4, seed=4)
    heatmaps, classes = gradcam_of_score(tiny, batch, "conv2")
    np.testing.assert_array_equal(classes, run(tiny, batch).argmax(-1))  # top-1 is the same either way
    for i in range(4):
        expected = logit_gradcam_direct(tiny, "conv2", batch[i], int(classes[i]))
        np.testing.assert_allclose(heatmaps[i], expected, rtol=1e-4, atol=1e-5, err_msg=f"image {i}")
    of_probability, _ = gradcam(tiny, batch, "conv2")
    assert not np.allclose(heatmaps, of_probability, atol=1e-3)  # the softmax mixes in the other classes


def test_gradcam_equals_chapter_per_image_in_a_batch(tiny):
    batch = images(4, seed=4)
    predictions = run(tiny, batch)
    heatmaps, classes = gradcam(tiny, batch, "conv2")
    np.testing.assert_array_equal(classes, predictions.argmax(-1))
    assert heatmaps.shape == (4, 16, 16) and heatmaps.dtype == np.float32
    for i in range(4):
        expected = chapter_gradcam(tiny, "conv2", batch[i], int(classes[i]))
        np.testing.assert_allclose(heatmaps[i], expected, rtol=1e-4, atol=1e-5, err_msg=f"image {i}")
        assert heatmaps[i].max() == pytest.approx(1.0) and heatmaps[i].min() >= 0

    # explicit, different classes per image: still each image with its own class
    # (with these random weights classes 1 and 3 have positive evidence, 0 and 2 none)
    chosen = [3, 1, 1, 3]
    heatmaps, classes = gradcam(tiny, batch, "conv1", chosen)
    np.testing.assert_array_equal(classes, chosen)
    assert heatmaps.shape == (4, 32, 32)
    for i in range(4):
        expected = chapter_gradcam(tiny, "conv1", batch[i], chosen[i])
        np.testing.assert_allclose(heatmaps[i], expected, rtol=1e-4, atol=1e-5, err_msg=f"image {i}")

    # one class for all, and an image alone gives the same heatmap as in the batch
    heatmaps, classes = gradcam(tiny, batch, "conv2", 3)
    np.testing.assert_array_equal(classes, [3, 3, 3, 3])
    alone, _ = gradcam(tiny, batch[2:3], "conv2", 3)
    np.testing.assert_allclose(alone[0], heatmaps[2], rtol=1e-4, atol=1e-5)
    assert not np.allclose(heatmaps[0], heatmaps[1])


def test_gradcam_without_positive_evidence_is_zero_not_nan(tiny):
    """Class 0 has no positive evidence at conv2 (the chapter would divide 0 by 0)."""
    batch = images(2, seed=4)
    grad_model = keras.Model(tiny.inputs, [tiny.get_layer("conv2").output, tiny.output])
    with tf.GradientTape() as tape:
        conv_output, predictions = call(grad_model, batch[:1])
        class_score = predictions[:, 0]
    grads = tape.gradient(class_score, conv_output)
    raw = tf.reduce_mean(conv_output[0] * tf.reduce_mean(grads, axis=(0, 1, 2)), axis=-1).numpy()
    assert raw.max() <= 0
    heatmaps, _ = gradcam(tiny, batch, "conv2", 0)
    assert np.isfinite(heatmaps).all() and (heatmaps == 0).all()


def test_gradcam_default_layer_of_tiny_model(tiny):
    graph = ModelGraph.of(tiny)
    assert last_feature_map_layer(graph)[0] == "conv2"
    batch = images(2, seed=5)
    by_default, _ = gradcam(tiny, batch)
    named, _ = gradcam(tiny, batch, "conv2")
    np.testing.assert_array_equal(by_default, named)


def bright_patch_model(size: int = 32) -> keras.Model:
    """Hand-set weights: class 0 = "bright", class 1 = "dark".

    A 4×4 stride-4 convolution averages brightness into channel 0 and darkness
    (255 - brightness) into channel 1; global average pooling; the dense layer scores
    class 0 by brightness minus darkness and class 1 the other way round.
    """
    inputs = keras.Input((size, size, 3))
    conv = keras.layers.Conv2D(2, 4, strides=4, activation="relu", name="evidence")
    x = conv(inputs)
    x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    dense = keras.layers.Dense(2, activation="softmax", name="predictions")
    outputs = dense(x)
    model = keras.Model(inputs, outputs, name="bright_patch")
    kernel = np.zeros((4, 4, 3, 2), "float32")
    kernel[..., 0] = 1 / 48
    kernel[..., 1] = -1 / 48
    conv.set_weights([kernel, np.array([0.0, 255.0], "float32")])
    dense.set_weights([np.array([[0.05, -0.05], [-0.05, 0.05]], "float32"), np.zeros(2, "float32")])
    return model


def test_gradcam_known_answer_bright_corner():
    model = bright_patch_model()
    image = np.zeros((1, 32, 32, 3), "float32")
    image[0, 24:, 24:] = 255.0  # bright 8×8 square in the bottom-right corner of a dark image
    # the answer is not at the argmax of an all-zero map (0, 0): that would be top-left
    heatmaps, classes = gradcam(model, image)  # default layer: the convolution
    assert last_feature_map_layer(ModelGraph.of(model))[0] == "evidence"
    heatmap = heatmaps[0]
    assert heatmap.shape == (8, 8)
    assert classes[0] == 1  # mostly dark: "dark" wins
    # explained class "dark": evidence everywhere but the bright corner
    assert (heatmap[6:, 6:] == 0).all() and (heatmap[:6, :] == 1).all()

    bright, classes = gradcam(model, image, classes=0)
    assert classes[0] == 0
    row, col = np.unravel_index(bright[0].argmax(), bright[0].shape)
    assert row >= 6 and col >= 6, (row, col)
    # exactly the corner: 1 there, 0 elsewhere (dark cells are evidence against "bright")
    expected = np.zeros((8, 8), "float32")
    expected[6:, 6:] = 1
    np.testing.assert_allclose(bright[0], expected, atol=1e-6)
    np.testing.assert_allclose(bright[0], chapter_gradcam(model, "evidence", image[0], 0), atol=1e-6)


def test_overlay_heatmap_is_the_chapter_superimposition(tmp_path):
    # a real image file, 56 wide × 40 high (not square: catches a width/height swap)
    path = write_image(tmp_path / "photo.png", size=(56, 40), seed=6)
    image = np.asarray(Image.open(path).convert("RGB"))
    assert image.shape == (40, 56, 3)
    rng = np.random.default_rng(6)
    heatmap = rng.random((5, 7)).astype("float32")
    heatmap /= heatmap.max()

    got = overlay_heatmap(image, heatmap, 0.4, mode="add")
    resized = cv2.resize(heatmap, (image.shape[1], image.shape[0]))
    jet = cv2.applyColorMap(np.uint8(255 * resized), cv2.COLORMAP_JET)
    jet = cv2.cvtColor(jet, cv2.COLOR_BGR2RGB)
    expected = np.clip(jet * 0.4 + image, 0, 255).astype("uint8")
    assert got.shape == image.shape and got.dtype == np.uint8
    assert np.abs(got.astype(int) - expected).max() <= 1

    # RGB order checked independently of cv2: JET runs from dark blue (0) to dark red (1)
    black = np.zeros((4, 4, 3), "uint8")
    hot = overlay_heatmap(black, np.ones((2, 2), "float32"), 1.0, mode="add")
    cold = overlay_heatmap(black, np.zeros((2, 2), "float32"), 1.0, mode="add")
    assert hot[0, 0, 0] > 100 and hot[0, 0, 1] == 0 and hot[0, 0, 2] == 0
    assert cold[0, 0, 2] > 100 and cold[0, 0, 0] == 0 and cold[0, 0, 1] == 0
    # a grayscale image is overlaid as gray RGB
    gray = image[..., 0]
    np.testing.assert_array_equal(
        overlay_heatmap(gray, heatmap, 0.4), overlay_heatmap(np.repeat(gray[..., None], 3, -1), heatmap, 0.4)
    )


# -- nested models -------------------------------------------------------------------


def test_nested_activations_equal_inner_sub_model(nested):
    batch = images(2, seed=7)
    base = nested.get_layer("base")
    rescaled = batch / 127.5 - 1.0  # the outer model's Rescaling(1/127.5, offset=-1)
    for name in ["base_conv1", "base_conv2"]:
        expected = run(keras.Model(base.inputs, base.get_layer(name).output), rescaled)
        got = feature_maps(nested, batch, [f"base/{name}"])[f"base/{name}"]
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    # a layer name unique in the model resolves to its path
    assert list(feature_maps(nested, batch, ["base_conv1"])) == ["base/base_conv1"]


def nested_gradcam_direct(nested, layer_name: str, image: np.ndarray, class_index: int) -> np.ndarray:
    """Two stages, as one would do by hand for a nested base: base up to the layer, then the rest."""
    base = nested.get_layer("base")
    rescale, gap, head = nested.get_layer("rescale"), nested.get_layer("gap"), nested.get_layer("head")
    upto = keras.Model(base.inputs, base.get_layer(layer_name).output)
    features = call(upto, rescale(tf.constant(image[None])))
    with tf.GradientTape() as tape:
        tape.watch(features)
        x = features
        if layer_name == "base_conv1":
            x = base.get_layer("base_conv2")(x)
        predictions = head(gap(x))
        class_score = predictions[:, class_index]
    grads = tape.gradient(class_score, features)
    pooled = tf.reduce_mean(grads, axis=(0, 1, 2))
    heatmap = tf.reduce_mean(features[0] * pooled, axis=-1).numpy()
    return chapter_normalize(heatmap)


def test_nested_gradcam_equals_two_stage_computation(nested):
    batch = images(3, seed=8)
    graph = ModelGraph.of(nested)
    assert last_feature_map_layer(graph)[0] == "base/base_conv2"
    predictions = run(nested, batch)
    by_default, classes = gradcam(nested, batch)
    np.testing.assert_array_equal(classes, predictions.argmax(-1))
    for layer in ["base_conv2", "base_conv1"]:
        heatmaps, _ = gradcam(nested, batch, f"base/{layer}", list(classes))
        if layer == "base_conv2":
            np.testing.assert_array_equal(heatmaps, by_default)
        for i in range(3):
            expected = nested_gradcam_direct(nested, layer, batch[i], int(classes[i]))
            np.testing.assert_allclose(heatmaps[i], expected, rtol=1e-4, atol=1e-5, err_msg=f"{layer} image {i}")


# -- defaults on real architectures (weights=None: nothing is downloaded) -----------


@pytest.fixture(scope="module")
def vgg16():
    keras.utils.set_random_seed(0)
    # Without the top (138 M → 15 M random weights, 40× faster to build), at a fixed 224×224 input.
    return keras.applications.VGG16(weights=None, include_top=False, input_shape=(224, 224, 3))


def test_vgg16_default_layers(vgg16):
    graph = ModelGraph.of(vgg16)
    layers, _ = filters_plugin.default_layers(graph)
    assert layers == [f"block{i}_conv1" for i in range(1, 6)]
    assert last_feature_map_layer(graph)[0] == "block5_conv3"
    assert graph.fixed_size == (224, 224)


def test_vgg16_filters_at_free_size(vgg16):
    patterns, raw = filter_patterns(vgg16, "block1_conv1", filters=2, size=48, steps=2, seed=0)
    assert patterns.shape == raw.shape == (2, 48, 48, 3)
    start = initial_inputs(2, 48, 3, 0)
    conv = vgg16.get_layer("block1_conv1")  # the first layer: applied directly to a 48×48 input
    for f in range(2):
        x = tf.constant(start[f : f + 1])
        for _ in range(2):
            with tf.GradientTape() as tape:
                tape.watch(x)
                loss = tf.reduce_mean(conv(x)[..., f])
            grads = tape.gradient(loss, x)
            x += grads / (tf.sqrt(tf.reduce_mean(tf.square(grads))) + 1e-5)
        np.testing.assert_allclose(raw[f], x.numpy()[0], atol=1e-3)
        assert conv(raw[f : f + 1]).numpy()[..., f].mean() > conv(start[f : f + 1]).numpy()[..., f].mean()


def test_default_gradcam_layer_inside_nested_mobilenetv2():
    keras.utils.set_random_seed(0)
    base = keras.applications.MobileNetV2(weights=None, alpha=0.35, input_shape=(96, 96, 3), include_top=False)
    inputs = keras.Input((96, 96, 3))
    features = base(inputs)
    x = keras.layers.GlobalAveragePooling2D(name="pool")(features)
    outputs = keras.layers.Dense(5, activation="softmax", name="head")(x)
    model = keras.Model(inputs, outputs, name="transfer")
    graph = ModelGraph.of(model)
    path = last_feature_map_layer(graph)[0]
    assert path == f"{base.name}/out_relu"
    assert graph.info(path).shape == (3, 3, 1280)

    # and Grad-CAM runs there: the same as a two-stage computation
    batch = images(1, size=96, seed=9)
    heatmaps, classes = gradcam(model, batch)
    assert heatmaps.shape == (1, 3, 3)
    conv = tf.constant(run(base, batch))
    with tf.GradientTape() as tape:
        tape.watch(conv)
        score = model.get_layer("head")(model.get_layer("pool")(conv))[:, int(classes[0])]
    grads = tape.gradient(score, conv)
    heatmap = tf.reduce_mean(conv[0] * tf.reduce_mean(grads, axis=(0, 1, 2)), axis=-1).numpy()
    np.testing.assert_allclose(heatmaps[0], chapter_normalize(heatmap), rtol=1e-3, atol=1e-4)


# -- errors --------------------------------------------------------------------------


def suggestions(error: LayerError) -> list[str]:
    message = str(error)
    assert "valid layers: " in message
    return message.split("valid layers: ", 1)[1].split(", ")


def test_unknown_layer_lists_valid_layers_closest_first(tiny):
    batch = images(1, seed=10)
    with pytest.raises(LayerError) as caught:
        feature_maps(tiny, batch, ["conv_2"])
    assert "conv_2" in str(caught.value)
    listed = suggestions(caught.value)
    assert listed[0] == "conv2"
    assert sorted(listed) == ["conv1", "conv2", "pool1"]  # the layers activations can show

    with pytest.raises(LayerError) as caught:
        gradcam(tiny, batch, "conv_2")
    assert suggestions(caught.value)[0] == "conv2"

    with pytest.raises(LayerError) as caught:
        filter_patterns(tiny, "conv_2", filters=1, size=32, steps=1)
    assert suggestions(caught.value) == ["conv2", "conv1"]  # only conv layers have filters

    # a real layer that the technique cannot use: said so, with what can be used
    with pytest.raises(LayerError) as caught:
        filter_patterns(tiny, "pool1", filters=1, size=32, steps=1)
    assert "cannot be used" in str(caught.value)
    assert "pool1" not in suggestions(caught.value)
    assert isinstance(caught.value, KeyError)


def test_activation_default_layers_of_tiny_model(tiny):
    graph = ModelGraph.of(tiny)
    assert activations_plugin.default_layers(graph, 16) == ["conv1", "pool1", "conv2"]
    assert activations_plugin.default_layers(graph, 2) == ["conv1", "conv2"]
