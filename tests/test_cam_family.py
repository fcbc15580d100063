"""Grad-CAM++, XGrad-CAM, LayerCAM, HiResCAM and Eigen-CAM against their papers' formulas.

The expected maps come from direct implementations written here: one image at a time,
the activations A and the gradients of the class score from a plain GradientTape over
the model's own layers (the logit computed by hand from the head's weights), and each
paper's formula in NumPy with an explicit loop over channels. Real tiny Keras models,
no mocks.
"""

from __future__ import annotations

import json

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import build_nested, build_tiny
from test_techniques import bright_patch_model

import vizkit
from vizkit.plugins import cam_family
from vizkit.plugins.cam_family import eigen_projection, eigencam, gradcampp, hirescam, layercam, xgradcam

GRADIENT_METHODS = {"gradcampp": gradcampp, "xgradcam": xgradcam, "layercam": layercam, "hirescam": hirescam}
TOLERANCE = dict(rtol=1e-4, atol=1e-5)


@pytest.fixture(scope="module")
def tiny():
    return build_tiny()


@pytest.fixture(scope="module")
def nested():
    return build_nested()


def build_sigmoid(size: int = 32) -> keras.Model:
    """A binary classifier with one sigmoid unit: vizkit sees two classes, logits (−z, z)."""
    keras.utils.set_random_seed(3)
    inputs = keras.Input((size, size, 3))
    x = keras.layers.Rescaling(1 / 255, name="scale")(inputs)
    x = keras.layers.Conv2D(6, 3, activation="relu", padding="same", name="conv1")(x)
    x = keras.layers.Conv2D(8, 3, activation="relu", padding="same", name="conv2")(x)
    x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    outputs = keras.layers.Dense(1, activation="sigmoid", name="predictions")(x)
    return keras.Model(inputs, outputs, name="binary")


def images(count: int, size: int = 32, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (count, size, size, 3)).astype("float32")


# -- direct, per-image computations --------------------------------------------------------


def flat_forward(model, layer: str, binary: bool = False):
    """image → (A, logits) of a flat model: the layer and the pooled features from one call,
    the logits from the head's weights (for one sigmoid unit z: (−z, z))."""
    upto = keras.Model(model.inputs, [model.get_layer(layer).output, model.get_layer("gap").output])
    kernel, bias = model.get_layer("predictions").get_weights()

    def forward(image, tape):
        features, pooled = upto(tf.constant(image[None]), training=False)
        logits = tf.matmul(pooled, kernel) + bias
        return features, tf.concat([-logits, logits], axis=1) if binary else logits

    return forward


def nested_forward(nested, layer: str):
    """image → (A, logits) of the nested model in two stages, as one does by hand."""
    base = nested.get_layer("base")
    rescale, gap, head = nested.get_layer("rescale"), nested.get_layer("gap"), nested.get_layer("head")
    upto = keras.Model(base.inputs, base.get_layer(layer).output)
    kernel, bias = head.get_weights()

    def forward(image, tape):
        features = upto(rescale(tf.constant(image[None])), training=False)
        tape.watch(features)
        x = base.get_layer("base_conv2")(features) if layer == "base_conv1" else features
        return features, tf.matmul(gap(x), kernel) + bias

    return forward


def pieces(forward, image: np.ndarray, cls: int):
    """(A, g = ∂S/∂A, ∂exp(S)/∂A) for one image, float64, h×w×C."""
    with tf.GradientTape(persistent=True) as tape:
        features, logits = forward(image, tape)
        score = logits[0, cls]
        exponential = tf.exp(score)
    g, g_exp = tape.gradient(score, features), tape.gradient(exponential, features)
    return (features[0].numpy().astype("float64"), g[0].numpy().astype("float64"), g_exp[0].numpy().astype("float64"))


def normalized(cam: np.ndarray) -> np.ndarray:
    cam = np.maximum(cam, 0)
    return cam / cam.max() if cam.max() > 0 else cam


def direct_gradcampp(A, g, g_exp):
    """Chattopadhyay et al. eq. 19, with ∂Y/∂A of Y = exp(S) itself (not dropped)."""
    cam = np.zeros(A.shape[:2])
    for k in range(A.shape[-1]):
        a, gk = A[..., k], g[..., k]
        denominator = 2 * gk**2 + a.sum() * gk**3
        alpha = np.zeros_like(gk)
        alpha[denominator != 0] = gk[denominator != 0] ** 2 / denominator[denominator != 0]
        cam += (alpha * np.maximum(g_exp[..., k], 0)).sum() * a
    return normalized(cam)


def direct_xgradcam(A, g, g_exp):
    cam = np.zeros(A.shape[:2])
    for k in range(A.shape[-1]):
        a = A[..., k]
        if a.sum() != 0:
            cam += (a / a.sum() * g[..., k]).sum() * a
    return normalized(cam)


def direct_layercam(A, g, g_exp):
    return normalized(sum(np.maximum(g[..., k], 0) * A[..., k] for k in range(A.shape[-1])))


def direct_hirescam(A, g, g_exp):
    return normalized(sum(g[..., k] * A[..., k] for k in range(A.shape[-1])))


DIRECT = {"gradcampp": direct_gradcampp, "xgradcam": direct_xgradcam, "layercam": direct_layercam, "hirescam": direct_hirescam}


def direct_eigencam(A, center: bool = False):
    """SVD of the h·w × C activations; projection on v₁; sign: agree with the channel mean."""
    M = A.reshape(-1, A.shape[-1])
    if center:
        M = M - M.mean(axis=0)
    _, _, vt = np.linalg.svd(M)
    p = M @ vt[0]
    agreement = p @ A.reshape(-1, A.shape[-1]).mean(axis=1)
    if abs(agreement) < 1e-9 * np.linalg.norm(p) * np.linalg.norm(A.mean(axis=-1)):
        agreement = p[np.abs(p).argmax()]
    return normalized((p if agreement >= 0 else -p).reshape(A.shape[:2]))


def check_against_direct(model, forward, batch, layer, classes=None):
    """Every gradient method and Eigen-CAM on ``batch`` equal the direct per-image maps."""
    nonzero = {}
    for name, method in GRADIENT_METHODS.items():
        heatmaps, used = method(model, batch, layer, classes)
        assert heatmaps.shape[0] == len(batch) and heatmaps.dtype == np.float32
        for i in range(len(batch)):
            expected = DIRECT[name](*pieces(forward, batch[i], int(used[i])))
            np.testing.assert_allclose(heatmaps[i], expected, **TOLERANCE, err_msg=f"{name} {layer} image {i}")
        nonzero[name] = int((heatmaps.max(axis=(1, 2)) == 1).sum())
    # the comparison is not vacuous: most maps have positive evidence
    assert all(count >= len(batch) // 2 for count in nonzero.values()), nonzero
    maps = eigencam(model, batch, layer)
    for i in range(len(batch)):
        A, _, _ = pieces(forward, batch[i], 0)
        np.testing.assert_allclose(maps[i], direct_eigencam(A), **TOLERANCE, err_msg=f"eigencam {layer} image {i}")
        assert maps[i].max() == pytest.approx(1.0)
    return used


# -- the formulas, on three kinds of model ------------------------------------------------------


def test_tiny_model_every_method_equals_its_formula(tiny):
    batch = images(4, seed=4)
    used = check_against_direct(tiny, flat_forward(tiny, "conv2"), batch, "conv2")
    np.testing.assert_array_equal(used, tiny(batch).numpy().argmax(-1))  # default: each image's top-1
    # an early layer, different explicit classes per image
    used = check_against_direct(tiny, flat_forward(tiny, "conv1"), batch, "conv1", [3, 1, 1, 3])
    np.testing.assert_array_equal(used, [3, 1, 1, 3])


def test_tiny_model_of_the_probability(tiny):
    """score=probability: S is the softmax output; still the same formulas."""
    batch = images(2, seed=9)
    upto = keras.Model(tiny.inputs, [tiny.get_layer("conv2").output, tiny.output])

    def forward(image, tape):
        return upto(tf.constant(image[None]), training=False)

    for name, method in GRADIENT_METHODS.items():
        heatmaps, used = method(tiny, batch, "conv2", [1, 3], score="probability")
        logit_maps, _ = method(tiny, batch, "conv2", [1, 3])
        for i in range(2):
            expected = DIRECT[name](*pieces(forward, batch[i], int(used[i])))
            np.testing.assert_allclose(heatmaps[i], expected, **TOLERANCE, err_msg=f"{name} image {i}")
        assert not np.allclose(heatmaps, logit_maps, atol=1e-3), name  # the softmax mixes in the other classes


def test_nested_model_every_method_equals_two_stage_formula(nested):
    batch = images(3, seed=8)
    for layer in ("base_conv2", "base_conv1"):
        check_against_direct(nested, nested_forward(nested, layer), batch, f"base/{layer}")
    # the default layer is gradcam's, inside the nested base
    for method in GRADIENT_METHODS.values():
        np.testing.assert_array_equal(method(nested, batch)[0], method(nested, batch, "base/base_conv2")[0])
    np.testing.assert_array_equal(eigencam(nested, batch), eigencam(nested, batch, "base_conv2"))


def test_sigmoid_binary_classifier_both_classes():
    model = build_sigmoid()
    graph = vizkit.ModelGraph.of(model)
    assert graph.num_classes == 2 and graph.has_logits
    batch = images(4, seed=11)
    forward = flat_forward(model, "conv2", binary=True)
    top = check_against_direct(model, forward, batch, "conv2")
    np.testing.assert_array_equal(top, (model(batch).numpy()[:, 0] > 0.5).astype(int))
    for cls in (0, 1):  # class 0's score is −z: the evidence swaps
        for name, method in GRADIENT_METHODS.items():
            heatmaps, _ = method(model, batch[:2], "conv2", cls)
            for i in range(2):
                expected = DIRECT[name](*pieces(forward, batch[i], cls))
                np.testing.assert_allclose(heatmaps[i], expected, **TOLERANCE, err_msg=f"{name} class {cls} image {i}")


def test_each_image_in_a_batch_as_alone(tiny):
    batch = images(5, seed=12)
    for name, method in {**GRADIENT_METHODS, "eigencam": eigencam}.items():
        together = method(tiny, batch, "conv2")
        alone = method(tiny, batch[3:4], "conv2")
        if name != "eigencam":
            (together, classes), (alone, alone_classes) = together, alone
            assert alone_classes[0] == classes[3]
        np.testing.assert_allclose(alone[0], together[3], **TOLERANCE, err_msg=name)
        assert not np.allclose(together[0], together[1]), name


# -- known answers -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bright_corner():
    """The bright-patch model (channel 0 = brightness, 1 = darkness per 4×4 cell, class 0
    "bright" = 0.05 (mean ch0 − mean ch1), class 1 "dark" the opposite) on a dark image
    with a bright 8×8 square in the bottom-right corner: cells [6:, 6:] of the 8×8 map."""
    image = np.zeros((1, 32, 32, 3), "float32")
    image[0, 24:, 24:] = 255.0
    corner = np.zeros((8, 8), "float32")
    corner[6:, 6:] = 1
    return bright_patch_model(), image, corner


def test_known_answer_bright_corner(bright_corner):
    """By hand: for "bright", g = +c on channel 0 and −c on channel 1 everywhere (c = 0.05/64).
    Grad-CAM++: α = 1/(2 + 1020c) on channel 0, relu(g) = 0 on channel 1, so the map is A₀:
    the corner. XGrad-CAM: w = (c, −c); HiResCAM: c(A₀ − A₁); LayerCAM: c A₀; after the
    ReLU each is the corner. For "dark" (the top-1) the signs swap: everything but the corner."""
    model, image, corner = bright_corner
    for name, method in GRADIENT_METHODS.items():
        bright, classes = method(model, image, classes=0)
        assert classes[0] == 0
        np.testing.assert_allclose(bright[0], corner, atol=1e-6, err_msg=name)
        dark, classes = method(model, image)
        assert classes[0] == 1
        np.testing.assert_allclose(dark[0], 1 - corner, atol=1e-6, err_msg=name)


def test_eigencam_known_answer_and_sign_convention(bright_corner):
    """The 64 × 2 activation matrix has rows (255, 0) at the 4 corner cells and (0, 255) at the
    60 others. Uncentred, v₁ = ±(0, 1): the projection is the darkness channel, and the sign
    rule (agree with the channel mean, 127.5 everywhere) takes +: everything but the corner.
    Centred, v₁ = ±(1, −1)/√2 and the projection sums to 0, so its dot product with a
    constant mean is 0: the tie rule (largest entry positive) picks the corner, the rare
    pattern (239 against −16)."""
    model, image, corner = bright_corner
    np.testing.assert_allclose(eigencam(model, image)[0], 1 - corner, atol=1e-6)
    np.testing.assert_allclose(eigencam(model, image, center=True)[0], corner, atol=1e-6)


@pytest.mark.parametrize("shape", [(16, 5, 6, 7), (16, 2, 3, 16)], ids=["more positions", "more channels"])
def test_eigen_projection_sign_agrees_with_mean_activation(shape):
    """Non-negative (post-ReLU) activations: the signed projection is the SVD's (up to sign)
    and has a positive dot product with the channel-mean map, whatever sign the SVD
    returns (it returns both here). Both shapes: fewer channels than positions, and more."""
    rng = np.random.default_rng(5)
    features = rng.gamma(1.0, 1.0, shape).astype("float32") * rng.random((shape[0], 1, 1, shape[-1]))
    mean = features.mean(axis=-1)
    raw_signs = set()
    for center in (False, True):
        projections = eigen_projection(features, center)
        assert ((projections * mean).sum(axis=(1, 2)) > 0).all()
        for i in range(len(features)):
            M = features[i].reshape(-1, shape[-1]).astype("float64")
            M = M - M.mean(axis=0) if center else M
            raw = M @ np.linalg.svd(M)[2][0]
            raw_signs.add(bool(raw @ mean[i].ravel() > 0))
            np.testing.assert_allclose(np.abs(projections[i].ravel()), np.abs(raw), rtol=1e-6, atol=1e-9)
        # negated activations: the projection follows them (the rule, not LAPACK, decides)
        np.testing.assert_allclose(eigen_projection(-features, center), -projections, rtol=1e-6, atol=1e-9)
    assert raw_signs == {True, False}, "the SVD's own sign would have passed: the test checks nothing"


def test_eigen_projection_tie_goes_to_the_largest_entry():
    """Centred, the projection sums to 0, so against a constant channel mean (here ±127.5)
    the dot product is 0 for either sign: the entry of largest magnitude decides. The
    bright-corner activations (corner bottom-right, top-left, and negated) all put the
    corner (±239 against ∓16) up, whatever sign the SVD returns (it returns both here)."""
    features = np.zeros((3, 8, 8, 2), "float32")
    features[..., 1] = 255
    features[:, 6:, 6:] = (255, 0)
    features[1:] = features[1:, ::-1, ::-1]
    features[2] *= -1
    corners = np.zeros((8, 8), bool)
    corners[6:, 6:] = True
    projections = eigen_projection(features, center=True)
    raw_corner_signs = set()
    for i, p in enumerate(projections):
        corner = corners if i == 0 else corners[::-1, ::-1]
        assert (p[corner] > 0).all() and (p[~corner] < 0).all(), i
        M = features[i].reshape(64, 2).astype("float64")
        M = M - M.mean(axis=0)
        raw = (M @ np.linalg.svd(M)[2][0]).reshape(8, 8)
        np.testing.assert_allclose(np.abs(p), np.abs(raw), rtol=1e-9)
        raw_corner_signs.add(bool(raw[corner][0] > 0))
    assert raw_corner_signs == {True, False}, "the SVD's own sign would have passed: the test checks nothing"


def test_free_size_model_two_input_sizes():
    """A model without a fixed input size: the compiled functions relax to unknown h and w
    (Eigen-CAM then picks its Gram matrix at run time) and still match the formulas."""
    model = build_tiny(size=None)
    for shape, seed in (((2, 24, 40, 3), 14), ((2, 6, 8, 3), 15)):  # 240, then 12 positions; 16 channels
        batch = np.random.default_rng(seed).integers(0, 256, shape).astype("float32")
        forward = flat_forward(model, "conv2")
        heatmaps, used = layercam(model, batch, "conv2")
        maps = eigencam(model, batch, "conv2", center=True)
        assert heatmaps.shape == maps.shape == (2, shape[1] // 2, shape[2] // 2)
        for i in range(2):
            A, g, g_exp = pieces(forward, batch[i], int(used[i]))
            np.testing.assert_allclose(heatmaps[i], direct_layercam(A, g, g_exp), **TOLERANCE)
            np.testing.assert_allclose(maps[i], direct_eigencam(A, center=True), **TOLERANCE)


def test_eigencam_centred_equals_direct(tiny):
    batch = images(3, seed=13)
    forward = flat_forward(tiny, "conv2")
    maps = eigencam(tiny, batch, "conv2", center=True)
    for i in range(3):
        A, _, _ = pieces(forward, batch[i], 0)
        np.testing.assert_allclose(maps[i], direct_eigencam(A, center=True), **TOLERANCE, err_msg=f"image {i}")


# -- from the command line -----------------------------------------------------------------


NAMES = ("gradcampp", "xgradcam", "layercam", "hirescam", "eigencam")


def run_all(vizkit_cli, model_file, folder, out, env=None):
    selected = [arg for name in NAMES for arg in ("-t", name)]
    return vizkit_cli(
        "run", model_file, folder, *selected, "-s", "layercam.layer=conv1", "-s", "eigencam.center=yes",
        "--save-arrays", "-o", out, env=env,
    )


def test_cli_runs_every_technique_reproducibly(vizkit_cli, vizkit_model_file, vizkit_images, tmp_path):
    env = {"SOURCE_DATE_EPOCH": "1700000000"}
    result = run_all(vizkit_cli, vizkit_model_file, vizkit_images, tmp_path / "one", env)
    assert result.exit_code == vizkit.ExitCode.OK, result.output
    report = json.loads((tmp_path / "one" / "report.json").read_text())
    arrays = np.load(tmp_path / "one" / "arrays.npz")
    ids = [image["id"] for image in report["images"]]
    assert len(ids) == 3
    by_name = {t["name"]: t for t in report["techniques"]}
    assert list(by_name) == list(NAMES)
    for name, technique in by_name.items():
        assert technique["status"] == "ok", technique
        assert technique["plugin"] == "vizkit.plugins.cam_family"
        assert [a["image_id"] for a in technique["artifacts"]] == ids
        for artifact in technique["artifacts"]:
            expected_layer = "conv1" if name == "layercam" else "conv2"
            assert artifact["layer"] == expected_layer
            heatmap = arrays[artifact["array"]]
            assert heatmap.shape == ((32, 32) if name == "layercam" else (16, 16)) and heatmap.dtype == np.float32
            assert heatmap.min() >= 0 and heatmap.max() == 1
    assert any("class-agnostic" in note for note in by_name["eigencam"]["notes"])
    assert all("class-agnostic" in a["title"] for a in by_name["eigencam"]["artifacts"])
    assert "class" in by_name["gradcampp"]["params"] and "class" not in by_name["eigencam"]["params"]

    again = run_all(vizkit_cli, vizkit_model_file, vizkit_images, tmp_path / "two", env)
    assert again.exit_code == vizkit.ExitCode.OK, again.output
    for name in ("report.json", "arrays.npz", "index.html"):
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes(), name


@pytest.mark.parametrize(
    "setting", ["eigencam.class=1", "eigencam.score=logit", "layercam.layer=gap", "xgradcam.layer=nope", "gradcampp.class=7"]
)
def test_cli_rejects_options_that_cannot_work(setting, vizkit_cli, vizkit_model_file, vizkit_images, tmp_path):
    name = setting.split(".")[0]
    result = vizkit_cli("run", vizkit_model_file, vizkit_images, "-t", name, "-s", setting, "-o", tmp_path / "out")
    assert result.exit_code == vizkit.ExitCode.USAGE_ERROR, result.output
    assert not (tmp_path / "out").exists()


def test_registered_techniques_are_comparable_and_cite_their_papers():
    techniques = {t.name: t for t in cam_family.TECHNIQUES}
    assert set(techniques) == set(NAMES)
    papers = {"gradcampp": "2018", "xgradcam": "2020", "layercam": "2021", "hirescam": "2020", "eigencam": "2020"}
    for name, technique in techniques.items():
        assert technique.comparable and papers[name] in technique.description
        assert technique.accepts is vizkit.kit.explainable_layer
    assert "class-agnostic" in techniques["eigencam"].description
