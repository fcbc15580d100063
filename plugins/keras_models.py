"""keras_models: the built-in model loaders for Keras model files, keras.applications
names and ``package.module:function`` factories.

They register through the same hook as third-party loaders. The hook implementation is
``trylast``: these loaders claim specs by their form (a suffix, a name, ``a:b``), so
any other plugin's loader that claims the same spec is asked first (unless that
plugin's hook is ``trylast`` too: pluggy calls the later-registered of two ``trylast``
implementations last). The factory loader, whose ``a:b`` form is the catch-all, is
registered last of them.

Importing this module imports neither TensorFlow nor Keras; loading a model does.
"""

from __future__ import annotations

import hashlib
import re
import traceback
from pathlib import Path
from typing import Callable

from vizkit import LoadedModel, ModelLoader, ModelLoadError, hookimpl, kit

FILE_SCHEME = "keras-file"
APPLICATION_SCHEME = "keras-application"
FACTORY_SCHEME = "keras-factory"

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

#: ``package.module:function``: dotted identifiers, a colon, one identifier.
_FACTORY = re.compile(r"[^\W\d]\w*(?:\.[^\W\d]\w*)*:[^\W\d]\w*")


# ------------------------------------------------------------------------------- files


def is_model_file(spec: str) -> bool:
    """A name ending in .keras, .h5 or .hdf5, in any case (uppercase is refused on load)."""
    return Path(spec).suffix.lower() in MODEL_SUFFIXES


def load_file(spec: str) -> LoadedModel:
    import keras

    path = Path(spec)
    if path.suffix not in MODEL_SUFFIXES:
        raise ModelLoadError(
            f"Keras reads only lowercase {', '.join(MODEL_SUFFIXES)} names; rename {path.name} "
            f"to {path.stem}{path.suffix.lower()}"
        )
    if not path.exists():
        raise ModelLoadError(f"model file {path} does not exist")
    if not path.is_file():  # a FIFO would block Keras forever, a device never end
        raise ModelLoadError(f"model file {path} is not a regular file")
    try:
        model = keras.models.load_model(path, compile=False)
    except Exception as error:  # Keras raises many kinds here; all mean "cannot read it"
        raise ModelLoadError(
            f"cannot load model file {path}: {error}. vizkit reads .keras files and "
            "full-model .h5 files (architecture and weights, not weights only)"
        ) from error
    with path.open("rb") as file:  # streamed: a model can be gigabytes
        digest = hashlib.file_digest(file, "sha256").hexdigest()
    mode, reason = kit.guess_preprocess(model)
    return LoadedModel(model, model.name, str(path), digest, mode, reason)


# ------------------------------------------------------------------------ applications


def is_application(spec: str) -> bool:
    """A keras.applications short name, in any case, with or without ``-``/``_``."""
    return _normalize(spec) in _BY_NORMAL_NAME


def load_application(name: str, weights: str = "imagenet") -> LoadedModel:
    import keras


    short = _BY_NORMAL_NAME.get(_normalize(name))
    if short is None:
        raise ModelLoadError(f"keras.applications has no model {name!r} in vizkit's list: {', '.join(APPLICATIONS)}")
    constructor_name, mode = APPLICATIONS[short]
    if weights not in ("imagenet", "none"):
        raise ModelLoadError(f"--weights must be imagenet or none, not {weights!r}")
    constructor = getattr(keras.applications, constructor_name)
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
    labels = kit.imagenet_labels() if weights == "imagenet" else None
    return LoadedModel(model, short, f"keras.applications.{constructor_name}", None, mode, reason, labels)


# --------------------------------------------------------------------------- factories


def is_factory(spec: str) -> bool:
    """``package.module:function``: dotted identifiers, a colon, an identifier."""
    return _FACTORY.fullmatch(spec) is not None


def _summary(error: BaseException) -> str:
    """``RuntimeError: message (file.py:12)``: the exception and where it was raised
    (not when that is the call in this module: a wrong signature, say)."""
    frames = traceback.extract_tb(error.__traceback__)
    inside = frames and Path(frames[-1].filename) != Path(__file__)
    where = f" ({Path(frames[-1].filename).name}:{frames[-1].lineno})" if inside else ""
    return f"{type(error).__name__}: {error}{where}"


def _not_a_model(value: object) -> str:
    """What a factory returned instead of a keras.Model, and the fix where there is one:
    ``None``, ``a tuple of 2 (Functional, dict): return the model itself``, ``a Dense
    layer: build a model around it``, ``a tf_keras.src.engine.functional.Functional: a
    Keras 2 model``."""
    import keras

    kind = type(value)
    module = kind.__module__ or ""
    if value is None:
        return "None, not a keras.Model"
    if isinstance(value, (tuple, list)):
        items = ", ".join(type(item).__name__ for item in value[:4]) + (", …" if len(value) > 4 else "")
        return f"a {kind.__name__} of {len(value)} ({items}), not a keras.Model: return the model itself"
    if module.startswith(("tf_keras", "tensorflow.python.keras")):
        return f"a {module}.{kind.__qualname__}, a Keras 2 (tf_keras) object; vizkit needs a Keras 3 keras.Model"
    if isinstance(value, keras.layers.Layer):
        return f"a {kind.__name__} layer, not a keras.Model: build a model around it, keras.Model(inputs, outputs), and return that"
    name = kind.__name__ if module == "builtins" else f"{module}.{kind.__qualname__}"
    return f"a {name}, not a keras.Model"


def load_factory(spec: str) -> LoadedModel:
    """Import ``package.module:function`` and call it; whatever goes wrong is a ModelLoadError.

    The factory is the user's code: an exception it raises (``SystemExit`` included, only
    Ctrl-C passes), in the module's import or in the call, is a ModelLoadError naming the
    factory and the exception, and so is a result that is not a ``keras.Model``
    (``vizkit run`` and ``vizkit layers``: a usage error, exit status 2).
    """
    import keras

    try:
        factory = kit.import_object(spec, "model factory")
    except ValueError as error:  # not importable, no such attribute, not callable
        module = spec.partition(":")[0]
        missing = error.__cause__
        if isinstance(missing, ModuleNotFoundError) and missing.name == module.partition(".")[0]:
            raise ModelLoadError(
                f"{error}; if {module}: is meant as a model scheme, no loaded plugin provides it "
                "(load it with -p, or install it)"
            ) from error
        raise ModelLoadError(str(error)) from error
    except KeyboardInterrupt:
        raise
    except BaseException as error:  # the module raised (or exited) while being imported
        raise ModelLoadError(f"cannot import model factory {spec}: {_summary(error)}") from error
    try:
        model = factory()
    except KeyboardInterrupt:
        raise
    except BaseException as error:  # the user's own code failed: say so, without a traceback
        exited = " instead of returning a model" if isinstance(error, SystemExit) else ""
        raise ModelLoadError(f"the model factory {spec} raised {_summary(error)}{exited}") from error
    if not isinstance(model, keras.Model):
        raise ModelLoadError(f"the model factory {spec} returned {_not_a_model(model)}")
    mode, reason = kit.guess_preprocess(model)
    return LoadedModel(model, model.name, spec, None, mode, reason)


# -------------------------------------------------------------------------------- hook


@hookimpl(trylast=True)
def register_model_loaders(register: Callable[[ModelLoader], None]) -> None:
    register(ModelLoader(FILE_SCHEME, load_file, "a .keras, .h5 or .hdf5 model file (architecture and weights)", match=is_model_file))
    register(
        ModelLoader(
            APPLICATION_SCHEME,
            load_application,
            "a keras.applications model by name, with ImageNet weights (downloaded once) or, with --weights none, random ones",
            match=is_application,
            names=tuple(APPLICATIONS),
        )
    )
    # Last: its a:b form would claim any other loader's unprefixed spec with a colon.
    register(ModelLoader(FACTORY_SCHEME, load_factory, "package.module:function, a function that returns a keras.Model", match=is_factory))
