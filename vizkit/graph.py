"""Every layer of a Keras model, nested models included, addressable by path.

``keras.Model(outer.inputs, inner_layer.output)`` fails when ``inner_layer`` lives in a
model used as a layer ("not connected to inputs"). ModelGraph instead re-traces the
whole model once on a fresh input, inlining nested Functional and Sequential models
layer by layer (same layer objects, so same weights), and records every layer's
output tensor under its path, e.g. ``mobilenetv2_1.00_224/block_16_project``. Any set
of those tensors then forms a probe model that runs in one forward pass.
"""

from __future__ import annotations

from dataclasses import dataclass

import keras
import numpy as np

from vizkit.technique import suggest


class LayerError(KeyError):
    """A layer name that the model does not have, or that a technique cannot use."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


@dataclass(frozen=True)
class LayerInfo:
    path: str
    kind: str  # the layer's class name
    shape: tuple  # output shape without the batch axis
    nested_model: bool
    feeds_output: bool = True  # on a path to the output that is explained

    @property
    def spatial(self) -> bool:
        """A feature-map layer (batch, height, width, channels)."""
        return len(self.shape) == 3

    @property
    def feature_map(self) -> bool:
        """A layer of its own with a feature-map output (a nested model is its layers)."""
        return self.spatial and not self.nested_model

    @property
    def conv(self) -> bool:
        return self.spatial and "Conv" in self.kind and not self.nested_model

    @property
    def pooling(self) -> bool:
        return self.spatial and "Pooling" in self.kind


def is_graph_model(layer) -> bool:
    """Models whose inner layers can be traced (subclassed models are opaque)."""
    return isinstance(layer, keras.Sequential) or (
        isinstance(layer, keras.Model) and hasattr(layer, "operations")
    )


def _output_layer_names(model) -> list[str]:
    """Which of ``model``'s layers produce its outputs (read before any re-tracing)."""
    names = []
    for tensor in model.outputs:
        for layer in model.layers:
            try:
                if layer.output is tensor:
                    names.append(layer.name)
                    break
            except (AttributeError, ValueError):  # a layer shared across several calls
                continue
        else:
            raise ValueError(f"cannot tell which layer of {model.name} produces its output")
    return names


class ModelGraph:
    """A built single-input image model with every layer's output reachable by path."""

    @classmethod
    def of(cls, model) -> "ModelGraph":
        """``model`` itself if it is a ModelGraph, else the graph of a keras.Model, traced once.

        The graph is kept on the model (past Keras's attribute tracking), so it lives and
        dies with it.
        """
        if isinstance(model, ModelGraph):
            return model
        graph = model.__dict__.get("_vizkit_graph")
        if graph is None:
            graph = model.__dict__["_vizkit_graph"] = cls(model)
        return graph

    def __init__(self, model: keras.Model, free_size: bool = False):
        if not is_graph_model(model):
            raise ValueError(
                f"{model.name} is a subclassed model, whose layers cannot be traced; build it "
                "as a Functional or Sequential model (keras.Input(...) → layers → keras.Model)"
            )
        if len(model.inputs) != 1:
            raise ValueError(
                f"{model.name} has {len(model.inputs)} inputs; vizkit needs a model "
                "with one image input"
            )
        shape = tuple(model.inputs[0].shape[1:])
        if len(shape) != 3 or shape[-1] not in (1, 3):
            raise ValueError(
                f"{model.name} takes input of shape {shape}; vizkit needs images as "
                "(height, width, 1 or 3 channels), channels last"
            )
        self.model = model
        self.input_shape = (None, None, shape[-1]) if free_size else shape
        self._input = keras.Input(shape=self.input_shape, name="vizkit_input")
        self._tensors: dict[str, keras.KerasTensor] = {}
        self._layers: dict[str, keras.Layer] = {}
        self._output = None
        try:
            outputs = self._trace(model, self._input, prefix="")
            # several heads: the first is the one explained
            self._output = outputs[0] if isinstance(outputs, (list, tuple)) else outputs
        except Exception:
            if not free_size:
                raise
            # Layers after the feature extractor (Flatten → Dense) need the fixed size;
            # everything traced before them is what a free-size graph is for.
        self._output_model: keras.Model | None = None
        # The model to the explained output holds just the layers that feed it.
        feeding = {id(layer) for layer in self.output_model.layers} if self._output is not None else set()
        self.layers = [
            LayerInfo(
                path=path,
                kind=type(self._layers[path]).__name__,
                shape=tuple(tensor.shape[1:]),
                nested_model=is_graph_model(self._layers[path]),
                feeds_output=id(self._layers[path]) in feeding,
            )
            for path, tensor in self._tensors.items()
            if not isinstance(tensor, (list, tuple, dict))
        ]
        self._by_path = {info.path: info for info in self.layers}
        self._free: ModelGraph | None = self if free_size else None

    def free_size(self) -> "ModelGraph":
        """The same model traced for any input height and width, as far as its layers allow.

        Lets filter patterns use the chapter's 150×150 on a model built for 224×224:
        convolution layers do not care, and the layers that do come after them.
        """
        if self._free is None:
            self._free = ModelGraph(self.model, free_size=True)
        return self._free

    def _trace(self, model, inputs, prefix: str):
        def call(layer, *args, **kwargs):
            path = prefix + layer.name
            if is_graph_model(layer):
                out = self._trace(layer, args[0] if len(args) == 1 else list(args), path + "/")
            else:
                out = layer(*args, **kwargs)
            self._tensors[path] = out
            self._layers[path] = layer
            return out

        if isinstance(model, keras.Sequential):
            x = inputs
            for layer in model.layers:
                x = call(layer, x)
            return x
        output_names = _output_layer_names(model)
        keras.models.clone_model(
            model, input_tensors=inputs, clone_function=lambda layer: layer, call_function=call
        )
        outputs = [self._tensors[prefix + name] for name in output_names]
        return outputs[0] if len(outputs) == 1 else outputs

    # -- looking layers up -------------------------------------------------

    @property
    def name(self) -> str:
        return self.model.name

    @property
    def channels(self) -> int:
        return int(self.input_shape[-1])

    @property
    def fixed_size(self) -> tuple[int, int] | None:
        """(height, width) the model requires, or None where spatial size is free."""
        height, width = self.input_shape[:2]
        return None if height is None or width is None else (int(height), int(width))

    @property
    def output_shape(self) -> tuple:
        return tuple(self._output.shape[1:])

    @property
    def is_classifier(self) -> bool:
        """One score per class, (batch, classes); or one probability, (batch, 1), for two classes."""
        return len(self.output_shape) == 1 and (self.output_shape[0] or 0) >= 1

    @property
    def num_classes(self) -> int:
        return 2 if self.output_shape == (1,) else int(self.output_shape[0])

    def expand_scores(self, scores):
        """Scores per class: a binary model's single probability p becomes (1 - p, p)."""
        if self.output_shape == (1,):
            return keras.ops.concatenate([1 - scores, scores], axis=-1)
        return scores

    def class_scores(self, batch) -> np.ndarray:
        """Scores per class (N × num_classes) for a preprocessed batch, as NumPy."""
        return keras.ops.convert_to_numpy(self.expand_scores(self.output_model(batch, training=False)))

    def __contains__(self, path: str) -> bool:
        return path in self._by_path

    def info(self, path: str) -> LayerInfo:
        return self._by_path[path]

    def resolve(self, name: str, usable=None, purpose: str = "") -> str:
        """The path of layer ``name`` (a full path, or a layer name unique in the model).

        ``usable(info)`` narrows what is accepted; the error lists valid names, closest first.
        """
        candidates = [info for info in self.layers if usable is None or usable(info)]
        valid = [info.path for info in candidates]
        if name in valid:
            return name
        by_leaf = [path for path in valid if path.rsplit("/", 1)[-1] == name]
        if len(by_leaf) == 1:
            return by_leaf[0]
        if name in self._by_path or by_leaf:
            problem = f"layer {name!r} cannot be used{purpose}"
        else:
            problem = f"{self.name} has no layer {name!r}"
        raise LayerError(f"{problem}; valid layers: {suggest(name, valid) or '(none)'}")

    # -- running -----------------------------------------------------------

    def probe(self, paths: list[str], with_output: bool = False) -> keras.Model:
        """A model from the input to the outputs of ``paths`` (and the model's output).

        Like any Keras model it returns a list for several outputs, a tensor for one.
        """
        outputs = [self._tensors[path] for path in paths]
        if with_output:
            outputs.append(self._output)
        return keras.Model(self._input, outputs)

    @property
    def output_model(self) -> keras.Model:
        """The model from its input to its (first) output; differentiable, returns a tensor."""
        if self._output_model is None:
            self._output_model = keras.Model(self._input, self._output)
        return self._output_model

    def predict(self, batch: np.ndarray) -> np.ndarray:
        """The model's (first) output for a preprocessed batch, as NumPy."""
        return keras.ops.convert_to_numpy(self.output_model(batch, training=False))


def spread_evenly(items: list[str], count: int) -> list[str]:
    """``count`` items evenly spaced from first to last (all of them if there are fewer)."""
    if count <= 0 or len(items) <= count:
        return list(items)
    picks = np.linspace(0, len(items) - 1, count).round().astype(int)
    return [items[i] for i in dict.fromkeys(picks)]
