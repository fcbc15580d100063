"""occlusion and rise against direct, one-copy-at-a-time implementations of their papers.

The references below build each occluded or masked copy in a plain Python loop over patch
positions or masks, score it with the Keras model itself (logits from the penultimate
layer times the classifier's weights, never through vizkit), and sum the papers'
formulas; vizkit's batched versions must agree on tiny real models: a plain CNN (with a
preprocessing that is not the identity, so pixel-space filling is tested), a nested
transfer-learning model and a sigmoid binary classifier. Hand-set models give answers
worked out by hand.
"""

from __future__ import annotations

import json
import math

import cv2
import keras
import numpy as np
import pytest
from conftest import build_nested, build_tiny

from vizkit.plugins import perturbation
from vizkit.plugins.perturbation import occlusion, rise, rise_masks


def tf_style(x):
    """Pixels to [-1, 1]: a fill of 0 then means -1 to the model, 128 about 0."""
    return x / 127.5 - 1


def identity(x):
    return x


def unit(x):
    return x / 255


def build_sigmoid(size: int = 32) -> keras.Model:
    """A binary classifier with one sigmoid unit: class 1 = p, class 0 = 1 − p."""
    keras.utils.set_random_seed(4)
    inputs = keras.Input((size, size, 3))
    x = keras.layers.Conv2D(6, 3, activation="relu", padding="same", name="conv")(inputs)
    x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    outputs = keras.layers.Dense(1, activation="sigmoid", name="logit")(x)
    return keras.Model(inputs, outputs, name="binary")


# model, its classifier layer, its preprocessing
MODELS = {
    "tiny": (build_tiny, "predictions", tf_style),
    "nested": (build_nested, "head", identity),
    "sigmoid": (build_sigmoid, "logit", unit),
}


@pytest.fixture(scope="module", params=sorted(MODELS))
def case(request):
    build, head, preprocess = MODELS[request.param]
    return request.param, build(), head, preprocess


def photos(count: int, size: int = 32, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (count, size, size, 3)).astype("float32")


def direct_scores(model, head: str, x: np.ndarray, score: str) -> np.ndarray:
    """Class scores computed from the Keras model alone: its output (a sigmoid's p as
    (1 − p, p)), or the logits: the classifier's input times its kernel plus bias."""
    if score == "probability":
        out = keras.ops.convert_to_numpy(model(x, training=False))
    else:
        layer = model.get_layer(head)
        before = keras.Model(model.input, layer.input)
        kernel, bias = layer.get_weights()
        out = keras.ops.convert_to_numpy(before(x, training=False)) @ kernel + bias
    if out.shape[-1] == 1:
        return np.concatenate([1 - out, out], -1) if score == "probability" else np.concatenate([-out, out], -1)
    return out


# -- occlusion, written out --------------------------------------------------------------------


def reference_occlusion(model, head, image, preprocess, patch, stride, fill, cls, score):
    """Zeiler & Fergus: slide the patch; each pixel gets the mean drop of the patches covering it."""
    height, width = image.shape[:2]

    def starts(size):  # every stride, the last one flush with the far edge
        positions = list(range(0, size - patch + 1, stride))
        return positions if positions[-1] == size - patch else positions + [size - patch]

    base_scores = direct_scores(model, head, preprocess(image[None]), score)[0]
    cls = int(np.argmax(base_scores)) if cls is None else cls
    total, count = np.zeros((height, width)), np.zeros((height, width))
    for y in starts(height):
        for x in starts(width):
            copy = image.copy()
            copy[y : y + patch, x : x + patch] = fill
            drop = base_scores[cls] - direct_scores(model, head, preprocess(copy[None]), score)[0, cls]
            total[y : y + patch, x : x + patch] += drop
            count[y : y + patch, x : x + patch] += 1
    assert count.min() >= 1
    return total / count, cls


@pytest.mark.parametrize("score", ["probability", "logit"])
def test_occlusion_matches_the_direct_loop(case, score):
    name, model, head, preprocess = case
    pixels = photos(2, seed=1)
    # patch 6, stride 4 on 32 px: offsets 0, 4, …, 24 and a last one at 26
    classes = [1, 0] if name == "sigmoid" else None
    maps, chosen = occlusion(model, pixels, preprocess, patch=6, stride=4, fill=0.0, classes=classes, score=score)
    assert maps.shape == (2, 32, 32) and maps.dtype == np.float32
    for n, image in enumerate(pixels):
        expected, cls = reference_occlusion(
            model, head, image, preprocess, 6, 4, 0.0, None if classes is None else classes[n], score
        )
        assert chosen[n] == cls
        scale = np.abs(expected).max()
        assert scale > 0
        np.testing.assert_allclose(maps[n], expected, atol=2e-5 * max(1.0, scale), rtol=1e-4)


def test_occlusion_default_geometry_and_gray_fill():
    """Defaults: patch 1/8 of the side (4 at 32), stride half of it, fill 128."""
    model, head, preprocess = build_tiny(), "predictions", tf_style
    pixels = photos(1, seed=5)
    maps, chosen = occlusion(model, pixels, preprocess)
    expected, cls = reference_occlusion(model, head, pixels[0], preprocess, 4, 2, 128.0, None, "probability")
    assert chosen[0] == cls
    np.testing.assert_allclose(maps[0], expected, atol=1e-5)  # float32 sums: oneDNN adds in its own order


def quadrant_model(size: int = 32) -> keras.Model:
    """Hand-set weights: logit 0 = mean brightness (0-1) of the bottom-right quadrant, logit 1 = 0.

    A stride-16 convolution averages each 16×16×3 quadrant; the dense layer reads the
    bottom-right one (flattened index 3) into class 0 and nothing into class 1.
    """
    half = size // 2
    inputs = keras.Input((size, size, 3))
    conv = keras.layers.Conv2D(1, half, strides=half, name="quadrants")
    x = keras.layers.Flatten(name="flat")(conv(inputs))
    dense = keras.layers.Dense(2, name="logits")  # no activation: the output is the logits
    model = keras.Model(inputs, dense(x), name="quadrant")
    conv.set_weights([np.full((half, half, 3, 1), 1 / (half * half * 3 * 255), "float32"), np.zeros(1, "float32")])
    kernel = np.zeros((4, 2), "float32")
    kernel[3, 0] = 1.0
    dense.set_weights([kernel, np.zeros(2, "float32")])
    return model


def test_occlusion_known_answer_lights_exactly_the_quadrant():
    model = quadrant_model()
    white = np.full((1, 32, 32, 3), 255.0, "float32")
    # 8×8 black patches, stride 8: a patch inside the quadrant hides 64 of its 256 pixels,
    # so the score (1 on a white image) drops by 0.25 there and by 0 anywhere else
    maps, classes = occlusion(model, white, patch=8, stride=8, fill=0.0, classes=0, score="logit")
    expected = np.zeros((32, 32), "float32")
    expected[16:, 16:] = 0.25
    assert classes[0] == 0
    np.testing.assert_allclose(maps[0], expected, atol=1e-5)  # float32 sums: oneDNN adds in its own order

    # overlapping patches: patches straddling the quadrant's edge drop part of it, so
    # pixels near it light up too, but nothing beyond one patch from the quadrant does
    maps, _ = occlusion(model, white, patch=8, stride=4, fill=0.0, classes=0, score="logit")
    assert (maps[0][16:, 16:] > 0).all()
    assert np.abs(maps[0][:9, :]).max() < 1e-6 and np.abs(maps[0][:, :9]).max() < 1e-6  # float rounding only
    assert maps[0][20:28, 20:28].min() == pytest.approx(0.25, abs=1e-5)  # inside: every covering patch hides 64 px

    # class 1's logit is 0 whatever the pixels: no drop anywhere
    flat, _ = occlusion(model, white, patch=8, stride=8, fill=0.0, classes=1, score="logit")
    assert np.abs(flat).max() < 1e-6


# -- RISE, written out -------------------------------------------------------------------------


def paper_resize(grid: np.ndarray, height: int, width: int) -> np.ndarray:
    """skimage's ``resize(grid, (height, width), order=1, mode="reflect")`` as the RISE
    authors call it: each output pixel bilinearly from the four nearest cells, pixel
    centres aligned, cells beyond the edge mirrored (d c b | a b c d)."""
    rows, cols = grid.shape
    y = (np.arange(height) + 0.5) * rows / height - 0.5
    x = (np.arange(width) + 0.5) * cols / width - 0.5
    y0, x0 = np.floor(y).astype(int), np.floor(x).astype(int)
    wy, wx = (y - y0)[:, None], (x - x0)[None, :]
    padded = np.pad(grid, 1, mode="reflect")  # index i of grid is i + 1 here; -1 reads cell 1
    a = padded[y0[:, None] + 1, x0[None, :] + 1]
    b = padded[y0[:, None] + 1, x0[None, :] + 2]
    c = padded[y0[:, None] + 2, x0[None, :] + 1]
    d = padded[y0[:, None] + 2, x0[None, :] + 2]
    return (1 - wy) * (1 - wx) * a + (1 - wy) * wx * b + wy * (1 - wx) * c + wy * wx * d


def reference_masks(count, s, p, height, width, seed):
    """The paper's generate_masks, one mask at a time, drawing from default_rng(seed):
    the grids first, then the shifts (vizkit's order, so both see the same masks)."""
    rng = np.random.default_rng(seed)
    grids = rng.random((count, s, s)) < p
    cell_h, cell_w = math.ceil(height / s), math.ceil(width / s)
    shifts = rng.integers(0, (cell_h, cell_w), size=(count, 2))
    masks = []
    for grid, (dy, dx) in zip(grids, shifts):
        up = paper_resize(grid.astype("float64"), (s + 1) * cell_h, (s + 1) * cell_w)
        masks.append(up[dy : dy + height, dx : dx + width])
    return np.array(masks)


def reference_rise(model, head, image, preprocess, masks, p, cls, score):
    """Σ_i S_c(x ⊙ M_i) M_i / (N p), one masked copy at a time."""
    base = direct_scores(model, head, preprocess(image[None]), score)[0]
    cls = int(np.argmax(base)) if cls is None else cls
    saliency = np.zeros(image.shape[:2])
    for mask in masks:
        masked = image * mask[..., None]
        saliency += direct_scores(model, head, preprocess(masked[None]), score)[0, cls] * mask
    return saliency / (len(masks) * p), cls


def test_rise_masks_are_the_papers():
    # a non-square input whose side the grid does not divide: C = ⌈30/7⌉ = 5 and ⌈44/7⌉ = 7
    masks = rise_masks(40, 7, 0.3, 30, 44, seed=11)(0, 40)
    expected = reference_masks(40, 7, 0.3, 30, 44, seed=11)
    assert masks.shape == (40, 30, 44)
    np.testing.assert_allclose(masks, expected, atol=1e-6)
    # chunks are slices of the same masks
    np.testing.assert_array_equal(rise_masks(40, 7, 0.3, 30, 44, seed=11)(13, 20), masks[13:20])


def test_paper_resize_is_the_usual_bilinear_away_from_the_edges():
    """The reference's interpolation is OpenCV's bilinear (same pixel centres) wherever
    the edge rule (mirror vs OpenCV's clamp) plays no part: beyond half a cell."""
    grid = np.random.default_rng(0).random((8, 8))
    up = paper_resize(grid, 36, 45)
    opencv = cv2.resize(grid, (45, 36), interpolation=cv2.INTER_LINEAR)
    np.testing.assert_allclose(up[3:-3, 3:-3], opencv[3:-3, 3:-3], atol=1e-9)
    assert not np.allclose(up[0], opencv[0])  # at the edge the paper mirrors


@pytest.mark.parametrize("score", ["probability", "logit"])
def test_rise_matches_the_direct_loop(case, score):
    name, model, head, preprocess = case
    pixels = photos(2, seed=2)
    classes = [0, 1] if name == "sigmoid" else None
    count, s, p, seed = 48, 4, 0.5, 3
    saliency, chosen = rise(
        model, pixels, preprocess, masks=count, grid=s, p=p, seed=seed, classes=classes, score=score, per_pass=20
    )
    masks = reference_masks(count, s, p, 32, 32, seed)
    assert saliency.shape == (2, 32, 32) and saliency.dtype == np.float32
    for n, image in enumerate(pixels):
        expected, cls = reference_rise(model, head, image, preprocess, masks, p, None if classes is None else classes[n], score)
        assert chosen[n] == cls
        scale = np.abs(expected).max()
        np.testing.assert_allclose(saliency[n], expected, atol=2e-5 * max(1.0, scale), rtol=1e-4)


def test_rise_known_answer_favours_the_quadrant():
    """The score is the mean of the mask over the bottom-right quadrant (a white image), so
    masks that keep a quadrant pixel score higher on average: E[S·M(q)]/p exceeds E[S] ≈ p
    inside the quadrant, and equals it far away, where M(q) and S are independent."""
    model = quadrant_model()
    white = np.full((1, 32, 32, 3), 255.0, "float32")
    saliency, _ = rise(model, white, masks=800, grid=4, p=0.5, seed=0, classes=0, score="logit")
    inside, far = saliency[0][18:, 18:], saliency[0][:10, :10]
    row, col = np.unravel_index(saliency[0].argmax(), (32, 32))
    assert row >= 16 and col >= 16, (row, col)
    assert inside.mean() > far.mean() + 0.05
    assert abs(far.mean() - 0.5) < 0.05  # E[S] = p: a far pixel's saliency is the mean score


# -- seeding and batching -------------------------------------------------------------------


def test_rise_is_seeded_and_byte_identical():
    model = build_tiny()
    pixels = photos(2, seed=3)
    first, _ = rise(model, pixels, tf_style, masks=30, grid=4, seed=7)
    second, _ = rise(model, pixels, tf_style, masks=30, grid=4, seed=7)
    assert first.tobytes() == second.tobytes()
    other, _ = rise(model, pixels, tf_style, masks=30, grid=4, seed=8)
    assert not np.allclose(first, other)


@pytest.mark.parametrize("method", ["occlusion", "rise"])
def test_an_image_in_a_batch_equals_the_image_alone(method):
    model = build_nested()
    pixels = photos(3, seed=4)
    run = {
        "occlusion": lambda x: occlusion(model, x, patch=8, stride=4, per_pass=16)[0],
        "rise": lambda x: rise(model, x, masks=40, grid=4, per_pass=16)[0],
    }[method]
    together = run(pixels)
    for n in range(3):
        np.testing.assert_array_equal(run(pixels[n : n + 1])[0], together[n])


def test_occlusion_refuses_a_patch_larger_than_the_input():
    with pytest.raises(ValueError, match="larger than the input"):
        occlusion(build_tiny(), photos(1), patch=33)
    with pytest.raises(ValueError, match="never be hidden"):
        occlusion(build_tiny(), photos(1), patch=4, stride=5)


# -- the command line ---------------------------------------------------------------------------


def test_cli_runs_both_byte_identical(vizkit_cli, vizkit_model_file, vizkit_images, tmp_path):
    runs = []
    for attempt in ("a", "b"):
        out = tmp_path / attempt
        result = vizkit_cli(
            "run", vizkit_model_file, vizkit_images, "-t", "occlusion", "-t", "rise", "-s", "rise.masks=40",
            "-s", "occlusion.patch=8", "--save-arrays", "-o", out, "-q", env={"SOURCE_DATE_EPOCH": "0"},
        )
        assert result.exit_code == 0, result.output
        runs.append(out)
    report = json.loads((runs[0] / "report.json").read_text())
    images = [image["id"] for image in report["images"]]
    assert len(images) == 3
    for technique in report["techniques"]:
        assert technique["status"] == "ok", technique
        assert [a["image_id"] for a in technique["artifacts"]] == images
        assert all(a["shape"] == [32, 32] and a["dtype"] == "float32" for a in technique["artifacts"])
    assert (runs[0] / "arrays.npz").read_bytes() == (runs[1] / "arrays.npz").read_bytes()
    assert (runs[0] / "report.json").read_bytes() == (runs[1] / "report.json").read_bytes()
    arrays = np.load(runs[0] / "arrays.npz")
    assert sorted(arrays.files) == sorted(f"{t}/{i}" for t in ("occlusion", "rise") for i in images)


@pytest.mark.parametrize(
    "setting, message",
    [("occlusion.patch=40", "larger than the input"), ("occlusion.stride=9", "never be hidden"), ("rise.grid=33", "finer than")],
)
def test_cli_refuses_values_the_model_cannot_take(vizkit_cli, vizkit_model_file, vizkit_images, tmp_path, setting, message):
    technique = setting.split(".")[0]
    extra = ["-s", "occlusion.patch=8"] if "stride" in setting else []
    result = vizkit_cli("run", vizkit_model_file, vizkit_images, "-t", technique, "-s", setting, *extra, "-o", tmp_path / "out")
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert not (tmp_path / "out").exists()


def test_techniques_are_listed_with_their_papers(vizkit_cli):
    result = vizkit_cli("techniques", "occlusion")
    assert result.exit_code == 0 and "Zeiler & Fergus 2014" in result.output and "occlusion.patch" in result.output
    result = vizkit_cli("techniques", "rise")
    assert result.exit_code == 0 and "Petsiuk et al. 2018" in result.output and "rise.seed" in result.output
    assert perturbation.OCCLUSION.comparable and perturbation.RISE.comparable
