"""Turning a model spec into a Keras model, through the model loaders plugins register.

Every kind of spec is a :class:`vizkit.extension.ModelLoader` registered with the
``register_model_loaders`` hook, vizkit's own included: ``.keras``/``.h5`` files,
keras.applications names and ``package.module:function`` factories
(``vizkit.plugins.keras_models``) and the bundled ``efficientnet-lite0``
(``vizkit.plugins.efficientnet_lite``). This module only picks the loader and checks
what it returns.

Importing this module imports neither TensorFlow nor Keras; loading a model does.
"""

from __future__ import annotations

import importlib
import inspect
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping

from vizkit.technique import suggest

if TYPE_CHECKING:
    import keras

    from vizkit.extension import ModelLoader

#: Keyword arguments a loader's ``load`` receives when it declares them (opt-in).
LOADER_ARGUMENTS = ("weights", "size")


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
    spec: str | os.PathLike | keras.Model,
    weights: str = "imagenet",
    size: int | None = None,
    loaders: Mapping[str, ModelLoader] | None = None,
) -> LoadedModel:
    """Load ``spec`` with the model loader that takes it.

    ``loaders`` maps schemes to :class:`vizkit.extension.ModelLoader`, in the order the
    hook called them (``host.model_loaders(pm)``); ``None`` means the built-in plugins'
    loaders (:func:`builtin_loaders`). The loader is, in this order: the one whose scheme
    is the part of ``spec`` before its first ``:`` (it gets the rest); else the first
    whose ``match`` claims the whole spec (it gets the spec). A ``keras.Model`` is used
    as it is.

    ``weights`` (``imagenet`` or ``none``) and ``size`` go to loaders that declare them;
    ``size`` also builds a Sequential model that was never called and has no input shape.
    """
    if not isinstance(spec, (str, os.PathLike)):
        import keras

        if not isinstance(spec, keras.Model):
            raise ModelLoadError(f"cannot load a {type(spec).__name__}: give a model spec (a string) or a keras.Model")
        mode, reason = guess_preprocess(spec)
        loaded = LoadedModel(spec, spec.name, "a keras.Model passed in Python", None, mode, reason)
        _ensure_built(loaded.model, size)
        return loaded
    spec = os.fspath(spec)
    loaders = builtin_loaders() if loaders is None else loaders
    loader, argument = pick_loader(spec, loaders)
    loaded = _call_loader(loader, spec, argument, {"weights": weights, "size": size})
    _ensure_built(loaded.model, size)
    return loaded


def pick_loader(spec: str, loaders: Mapping[str, ModelLoader]) -> tuple[ModelLoader, str]:
    """The loader for ``spec`` and what to pass it; ModelLoadError lists what is accepted."""
    scheme, colon, rest = spec.partition(":")
    if colon and scheme in loaders:
        return loaders[scheme], rest
    for loader in loaders.values():
        if loader.match is not None and _claims(loader, spec):
            return loader, spec
    raise ModelLoadError(_unknown_spec(spec, loaders))


def builtin_loaders() -> dict[str, ModelLoader]:
    """The model loaders of vizkit's built-in plugins, as ``vizkit run`` has them without
    any other plugin."""
    from vizkit import host

    pm = host.PluginHost()
    for name in host.BUILTIN_PLUGINS:
        pm.register(importlib.import_module(name), name=name)
    return host.model_loaders(pm)


def _claims(loader: ModelLoader, spec: str) -> bool:
    try:
        return bool(loader.match(spec))
    except KeyboardInterrupt:
        raise
    except BaseException as error:  # a plugin's match function is someone else's code (sys.exit too)
        raise ModelLoadError(f"the {loader.scheme}: model loader failed to check {spec!r}: {type(error).__name__}: {error}") from error


def _unknown_spec(spec: str, loaders: Mapping[str, ModelLoader]) -> str:
    """What went wrong and what would work: the loaders, their schemes and names, closest first."""
    message = f"unknown model {spec!r}"
    scheme, colon, _ = spec.partition(":")
    if colon and scheme and loaders:
        message += f": no model loader has the scheme {scheme!r} (schemes: {suggest(scheme, list(loaders))})"
    if not loaders:
        return message + ": no model loaders are registered (are their plugins disabled?)"
    accepted = "; ".join(f"{loader.description or 'models'} ({loader.scheme}:)" for loader in loaders.values())
    message += f". Give {accepted}. A SCHEME: prefix picks that loader"
    names = list(dict.fromkeys(name for loader in loaders.values() for name in loader.names))
    if names:
        message += f". Model names, closest first: one of: {suggest(spec.lower(), names)}"
    return message


def _keyword_arguments(load, offered: dict[str, Any]) -> dict[str, Any]:
    """Those of ``offered`` that ``load`` declares as parameters besides its first (the spec)."""
    try:
        parameters = list(inspect.signature(load).parameters.values())
    except (TypeError, ValueError):  # a builtin without a signature: the spec only
        return {}
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    if parameters and parameters[0].kind in positional:
        parameters = parameters[1:]
    declared = {
        p.name for p in parameters if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    }
    return {name: value for name, value in offered.items() if name in declared}


def _call_loader(loader: ModelLoader, spec: str, argument: str, offered: dict[str, Any]) -> LoadedModel:
    import keras

    try:
        result = loader.load(argument, **_keyword_arguments(loader.load, offered))
    except (ModelLoadError, KeyboardInterrupt):
        raise
    except BaseException as error:  # the plugin's own failure (sys.exit too), named as such
        raise ModelLoadError(
            f"the {loader.scheme}: model loader failed on {spec!r}: {type(error).__name__}: {error}"
        ) from error
    if isinstance(result, LoadedModel):
        if not isinstance(result.model, keras.Model):
            raise ModelLoadError(
                f"the {loader.scheme}: model loader returned a LoadedModel holding "
                f"{type(result.model).__name__}, not a keras.Model"
            )
        return result
    if not isinstance(result, keras.Model):
        raise ModelLoadError(f"the {loader.scheme}: model loader returned {type(result).__name__}, not a keras.Model")
    mode, reason = guess_preprocess(result)
    return LoadedModel(result, result.name, spec, None, mode, reason)


def guess_preprocess(model: keras.Model) -> tuple[str, str]:
    """The default preprocessing for ``model`` and why: ``none`` when the model rescales
    inside, else ``unit`` (the usual 1/255 training).

    Looks at the layers before the first convolution or dense layer, inside nested
    models too, so augmentation layers in front of a Rescaling do not hide it.
    """
    found = _leading_rescaling(model)
    if found is not None:
        return "none", f"the model rescales its input itself ({type(found).__name__} layer {found.name})"
    return "unit", "the usual default for a model file: pixels / 255 (pass --preprocess to change)"


def _flat_layers(model: keras.Model):
    """Layers in order, those of nested models in place of the model."""
    import keras

    for layer in model.layers:
        if isinstance(layer, keras.Model):
            yield from _flat_layers(layer)
        else:
            yield layer


def _leading_rescaling(model: keras.Model):
    """The Rescaling or Normalization layer in front of the first conv or dense layer, if any."""
    import keras

    for layer in _flat_layers(model):
        if isinstance(layer, (keras.layers.Rescaling, keras.layers.Normalization)):
            return layer
        if "Conv" in type(layer).__name__ or isinstance(layer, keras.layers.Dense):
            return None
    return None


def _ensure_built(model: keras.Model, size: int | None) -> None:
    """Build a Sequential model that was never called, from its input shape or ``size``."""
    from vizkit.graph import is_graph_model

    if not is_graph_model(model):
        return  # ModelGraph explains why a subclassed model cannot be used
    if model.built and _has_inputs(model):
        return
    if size is None:
        raise ModelLoadError(
            f"{model.name} was never built and declares no input shape; pass --size N to "
            "build it for N×N RGB images (or add keras.Input(shape) as its first layer)"
        )
    try:
        model.build((None, size, size, 3))
    except Exception as error:  # the model's own layers refuse that input
        raise ModelLoadError(
            f"{model.name} was never built, and building it for {size}×{size} RGB images failed: "
            f"{type(error).__name__}: {error}"
        ) from error


def _has_inputs(model: keras.Model) -> bool:
    try:
        return bool(model.inputs)
    except AttributeError:
        return False
