"""Every layer of a Keras model, nested models included, addressable by path.

``keras.Model(outer.inputs, inner_layer.output)`` fails when ``inner_layer`` lives in a
model used as a layer ("not connected to inputs"). ModelGraph instead re-traces the
whole model once on a fresh input, inlining nested Functional and Sequential models
layer by layer (same layer objects, so same weights), and records every layer's
output tensor under its path, e.g. ``mobilenetv2_1.00_224/block_16_project``. Any set
of those tensors then forms a probe model that runs in one forward pass.

A layer (or nested model) that the model calls more than once, such as a siamese
network's shared convolution, is addressed once per call: ``conv``, ``conv#2``,
``conv#3``...; the layers of a nested model's second call are ``base#2/conv1``. Calls
are numbered in the order the traced model runs them: a call that feeds another comes
before it; calls on parallel branches follow Keras's (deterministic) execution order.

Each trace calls every layer once more, and Keras keeps a record of each call (an
inbound node) on the layer for good. So a model is traced once: ``ModelGraph(model)``
and ``ModelGraph.of(model)`` both return the graph kept on the model, whose free-size
twin is traced once too, when first asked for. Probe and score models are built on the
traced tensors and call no layer again.

Class scores come as probabilities or as logits (``SCORES``): where the model ends in a
softmax or a sigmoid (a ``Dense`` with that activation, a ``Softmax`` layer, an
``Activation`` layer, or ``keras.ops.softmax``/``sigmoid``, in a nested model or not),
the logits are the values before it, computed with the same weights.

A model with several outputs is explained one output at a time: ``ModelGraph.of(model)``
explains the first, ``graph.select_output(name or index)`` another (the graph of a
``keras.Model`` on the same layers and weights with that output only). A single output
unit is a binary classifier only where it can be a probability (a sigmoid); one made
by a linear ``Dense`` (or ReLU, tanh, ...) is a regression, which class-based techniques
refuse. ``output_kind`` says which, in words, for the report.
"""

from __future__ import annotations

import difflib
from typing import Callable

import keras
import numpy as np

from vizkit.kit import SCORES
from vizkit.layers import LayerError, LayerInfo
from vizkit.technique import suggest

#: How many valid layers an error about a layer name lists, the closest first.
NEAREST_LAYERS = 5
_SQUASHING = ("softmax", "sigmoid")
#: Activations (names lowercased, without "_") whose single unit is a probability: a
#: binary classifier's p.
_PROBABILITY_ACTIVATIONS = frozenset({"sigmoid", "hardsigmoid", "softmax"})
#: Activations whose single unit is a value, not a probability: a regression. A single
#: unit made by anything else (a Lambda, a custom activation) is taken as a probability,
#: as before; the report says so (``output_kind``).
_VALUE_ACTIVATIONS = frozenset({
    "linear", "relu", "relu6", "leakyrelu", "elu", "selu", "celu", "gelu", "silu", "swish",
    "hardsilu", "hardswish", "mish", "softplus", "softsign", "sparseplus", "squareplus",
    "tanh", "hardtanh", "exponential", "exp", "prelu", "logsoftmax", "logsigmoid",
})


def is_graph_model(layer) -> bool:
    """Models whose inner layers can be traced (subclassed models are opaque)."""
    return isinstance(layer, keras.Sequential) or (
        isinstance(layer, keras.Model) and hasattr(layer, "operations")
    )


def _keras_tensors(structure) -> list:
    return [x for x in keras.tree.flatten(structure) if isinstance(x, keras.KerasTensor)]


def _config(operation) -> dict:
    try:
        return operation.get_config()
    except Exception:  # a custom layer without a config
        return {}


def _on_last_axis(axis, rank: int) -> bool:
    """Whether a softmax over ``axis`` normalizes each sample's last axis only."""
    axes = list(axis) if isinstance(axis, (list, tuple)) else [axis]
    return len(axes) == 1 and axes[0] in (-1, rank - 1)


def _dense_logits(dense, x):
    """``dense``'s output before its activation, reading its weights when run (so shared)."""

    def logits(inputs):
        z = keras.ops.matmul(inputs, keras.ops.cast(dense.kernel, inputs.dtype))
        if dense.bias is not None:
            z = z + keras.ops.cast(dense.bias, inputs.dtype)
        return z

    return keras.layers.Lambda(logits, name=f"vizkit_logits_of_{dense.name}")(x)


def _nearest(name: str, valid: list[str], count: int) -> list[str]:
    """The ``count`` names of ``valid`` closest to ``name``, in vizkit.technique.suggest's order."""
    if not any(", " in path for path in valid):
        return suggest(name, valid).split(", ")[:count] if valid else []
    # names with ", " in them cannot be split back out of suggest's comma list
    ratio = lambda path: -difflib.SequenceMatcher(None, name, path).ratio()  # noqa: E731
    return sorted(valid, key=ratio)[:count]


def _purpose_phrase(purpose: str) -> str:
    """ "gradcam" → "for gradcam"; the older " for gradcam (reason)" form reads the same."""
    purpose = purpose.strip()
    if purpose.startswith("for "):
        purpose = purpose[len("for "):].lstrip()
    return f"for {purpose}" if purpose else "here"


def _kept_graph(model):
    if isinstance(model, ModelGraph):
        return model
    return getattr(model, "__dict__", {}).get("_vizkit_graph")


class ModelGraph:
    """A built single-input image model with every layer's output reachable by path.

    ``ModelGraph(model)`` and ``ModelGraph.of(model)`` are the same: the model is traced
    the first time, and its graph is kept on it (past Keras's attribute tracking, so it
    lives and dies with the model); every later call returns that graph. Given a
    ModelGraph, both return it.
    """

    @classmethod
    def of(cls, model) -> "ModelGraph":
        """``model`` itself if it is a ModelGraph, else the graph of a keras.Model, traced once."""
        return cls(model)

    def __new__(cls, model=None, free_size: bool = False):
        kept = None if free_size else _kept_graph(model)
        if isinstance(kept, cls):
            return kept  # Python then calls __init__ on it, which sees it is done
        return super().__new__(cls)

    def __init__(self, model: keras.Model, free_size: bool = False):
        if self.__dict__.get("_traced"):
            return
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
        self._tensors: dict[str, keras.KerasTensor] = {}  # path → traced output
        self._layers: dict[str, keras.Operation] = {}  # path → layer (or keras.ops operation)
        self._calls: dict[str, tuple] = {}  # path → the traced (args, kwargs) it was called with
        self._producer: dict[int, str] = {}  # id of a traced tensor → the innermost path making it
        self._output = None
        self._outputs: list = []  # every traced output, in the model's order
        self._selected: dict[int, ModelGraph] = {}  # output index → the graph of that output alone
        try:
            outputs = self._trace(model, self._input, prefix="")
            self._outputs = list(outputs) if isinstance(outputs, (list, tuple)) else [outputs]
            # several heads: the first is the one explained (select_output picks another)
            self._output = self._outputs[0]
        except Exception:
            if not free_size:
                raise
            # Layers after the feature extractor (Flatten → Dense) need the fixed size;
            # everything traced before them is what a free-size graph is for.
        self._output_model: keras.Model | None = None
        self._score_tensors: dict[str, keras.KerasTensor] = {}
        self._score_models: dict[str, keras.Model] = {}
        self._probes: dict[tuple, keras.Model] = {}
        self._ending_found: tuple | None = None
        feeding = self._feeding_output()
        self.layers = [
            LayerInfo(
                path=path,
                kind=type(self._layers[path]).__name__,
                shape=tuple(tensor.shape[1:]),
                nested_model=is_graph_model(self._layers[path]),
                feeds_output=path in feeding,
            )
            for path, tensor in self._tensors.items()
            if not isinstance(tensor, (list, tuple, dict))
        ]
        self._by_path = {info.path: info for info in self.layers}
        self._free: ModelGraph | None = self if free_size else None
        self._traced = True
        if not free_size:
            model.__dict__["_vizkit_graph"] = self

    def free_size(self) -> "ModelGraph":
        """The same model traced for any input height and width, as far as its layers allow.

        Lets filter patterns use the chapter's 150×150 on a model built for 224×224:
        convolution layers do not care, and the layers that do come after them. Traced
        once, then kept.
        """
        if self._free is None:
            self._free = ModelGraph(self.model, free_size=True)
        return self._free

    # -- tracing -----------------------------------------------------------

    def _call_path(self, prefix: str, name: str) -> str:
        """``prefix + name`` for a layer's first call, then ``name#2``, ``name#3``..."""
        path, count = prefix + name, 1
        while path in self._layers:
            count += 1
            path = f"{prefix}{name}#{count}"
        return path

    def _trace(self, model, inputs, prefix: str):
        def call(layer, *args, **kwargs):
            path = self._call_path(prefix, layer.name)
            self._layers[path] = layer  # claims the path before a nested model's layers run
            if is_graph_model(layer):
                out = self._trace(layer, args[0] if len(args) == 1 else list(args), path + "/")
            else:
                out = layer(*args, **kwargs)
            self._tensors[path] = out
            self._calls[path] = (args, kwargs)
            for tensor in _keras_tensors(out):  # a nested model's outputs keep their inner maker
                self._producer.setdefault(id(tensor), path)
            return out

        if isinstance(model, keras.Sequential):
            x = inputs
            for layer in model.layers:
                x = call(layer, x)
            return x
        traced = keras.models.clone_model(
            model, input_tensors=inputs, clone_function=lambda layer: layer, call_function=call
        )
        outputs = [
            self._traced_output(model, index, prefix, tensor)
            for index, tensor in enumerate(traced.outputs)
        ]
        return outputs[0] if len(outputs) == 1 else outputs

    def _traced_output(self, model, index: int, prefix: str, tensor):
        """The traced tensor behind output ``index`` of the re-traced ``model``.

        On the outermost model it is that very tensor. A nested model's trace starts from
        intermediate tensors, and Keras builds the re-traced model on copies of its
        outputs (named after them); the traced original is what later layers must use.
        """
        if id(tensor) in self._producer or tensor is self._input:
            return tensor
        traced = [t for value in self._tensors.values() for t in _keras_tensors(value)]
        named = [t for t in traced if tensor.name in (t.name, f"{t.name}_clone")]
        if len(named) == 1:
            return named[0]
        # Else the operation whose first call made the model's output, if called once here.
        original = model.outputs[index]
        for operation in model.operations:
            try:
                made_it = operation.output is original
            except (AttributeError, ValueError):
                continue
            path = prefix + operation.name
            if made_it and path in self._tensors and f"{path}#2" not in self._layers:
                return self._tensors[path]  # its only call here
        raise ValueError(f"cannot tell which layer of {model.name} produces its output {index}")

    def _feeding_output(self) -> set[str]:
        """The paths that the explained output depends on (a nested model: through its layers)."""
        start = self._producer.get(id(self._output)) if self._output is not None else None
        feeding, todo = set(), [start] if start else []
        while todo:
            path = todo.pop()
            if path in feeding:
                continue
            feeding.add(path)
            args, kwargs = self._calls[path]
            todo.extend(
                self._producer[id(t)] for t in _keras_tensors((args, kwargs)) if id(t) in self._producer
            )
        for path, layer in self._layers.items():
            if is_graph_model(layer) and any(
                self._producer.get(id(t)) in feeding for t in _keras_tensors(self._tensors.get(path))
            ):
                feeding.add(path)
        return feeding

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
    def has_output(self) -> bool:
        """Whether the output could be traced: false for a free-size trace whose head could
        not be traced without the fixed size. A head that traces but only runs at its own
        size (Flatten → Dense, in Keras 3) reads true: run it to know."""
        return self._output is not None

    @property
    def output_shape(self) -> tuple:
        return tuple(self._output.shape[1:])

    @property
    def is_classifier(self) -> bool:
        """One score per class, (batch, classes); or one probability, (batch, 1), for two
        classes. A single unit that cannot be a probability (is_regression) is not one."""
        return len(self.output_shape) == 1 and (self.output_shape[0] or 0) >= 1 and not self.is_regression

    @property
    def is_regression(self) -> bool:
        """One output unit that is a value, not a probability: made by a linear Dense (or a
        ReLU, tanh, softplus, ... activation). One sigmoid unit is a binary classifier."""
        if self._output is None or self.output_shape != (1,):
            return False
        return self._final_activation() in _VALUE_ACTIVATIONS

    @property
    def num_classes(self) -> int:
        return 2 if self.output_shape == (1,) else int(self.output_shape[0])

    # -- outputs -----------------------------------------------------------

    @property
    def output_names(self) -> list[str]:
        """The model's outputs, in its order, each by the path of the layer that makes it
        (``predictions``; ``head/value`` in a nested model); ``select_output`` takes them."""
        names = getattr(self.model, "output_names", None) or []
        return [
            self._producer.get(id(tensor)) or (names[i] if i < len(names) else f"output_{i}")
            for i, tensor in enumerate(self._outputs)
        ]

    @property
    def output_name(self) -> str | None:
        """The name (as in ``output_names``) of the output that is explained; None where
        it could not be traced (a free-size graph of a model with Flatten → Dense)."""
        if self._output is None:
            return None
        index = next((i for i, tensor in enumerate(self._outputs) if tensor is self._output), 0)
        return self.output_names[index]

    def select_output(self, output: str | int | None = None) -> "ModelGraph":
        """The graph that explains one output of a model with several.

        ``output``: its name (an ``output_names`` entry, a layer name unique among them,
        the name Keras gives it, or its key in a dict of outputs) or its index (an int,
        or digits). For a model with one output this graph itself (``output`` must name
        it, if given); else the graph of ``keras.Model(model.inputs, that output)``,
        which shares the model's layers and weights, traced once and kept. ``None``:
        this graph where the model has one output; ValueError listing the outputs where
        it has several, as for a name or index that is none of them.
        """
        index = self._output_index(output)
        if len(self._outputs) <= 1:
            return self
        if index not in self._selected:
            model = self.model
            single = keras.Model(model.inputs[0], model.outputs[index], name=model.name)
            self._selected[index] = ModelGraph(single)
        return self._selected[index]

    def _outputs_listed(self) -> str:
        return ", ".join(
            f"{i}: {name!r} (shape {tuple(tensor.shape[1:])})"
            for i, (name, tensor) in enumerate(zip(self.output_names, self._outputs))
        )

    def _output_index(self, output: str | int | None) -> int:
        names, count = self.output_names, len(self._outputs)
        listed = f"its output{'s' if count != 1 else ''}: {self._outputs_listed()}"
        if output is None:
            if count > 1:
                raise ValueError(
                    f"{self.name} has {count} outputs ({self._outputs_listed()}); name the one to "
                    "explain (--output NAME, or its index)"
                )
            return 0
        if isinstance(output, str) and output.strip().isdigit() and output.strip().isascii():
            output = int(output.strip())
        if isinstance(output, int) and not isinstance(output, bool):
            if 0 <= output < count:
                return output
            raise ValueError(f"{self.name} has no output {output}; {listed}")
        keras_names = list(getattr(self.model, "output_names", None) or [])
        struct = getattr(self.model, "_outputs_struct", None)
        keys = list(struct) if isinstance(struct, dict) and len(struct) == count else []
        for candidates in (
            names,
            [name.rsplit("/", 1)[-1] for name in names],
            keras_names if len(keras_names) == count else [],
            keys,
        ):
            found = [i for i, name in enumerate(candidates) if name == output]
            if len(found) == 1:
                return found[0]
            if len(found) > 1:
                raise ValueError(f"{self.name} has several outputs named {output!r}; name one by its index ({listed})")
        raise ValueError(f"{self.name} has no output {output!r}; {listed}")

    @property
    def output_kind(self) -> str | None:
        """What the explained output is taken to be, in words, as the report says it: e.g.
        "classifier (softmax over 10 classes)", "binary classifier (one sigmoid unit)",
        "regression (one linear unit): class-based techniques refuse it"; None where the
        output could not be traced."""
        if self._output is None:
            return None
        shape = self.output_shape
        refused = "class-based techniques refuse it"
        if len(shape) != 1 or not (shape[0] or 0) >= 1:
            return f"not a classifier (output shape {shape}): {refused}"
        activation = self._final_activation()
        if self.is_regression:
            return f"regression ({self._regression_unit()}): {refused}"
        kind = self.output_activation
        if shape == (1,):
            if kind == "sigmoid" or activation in _PROBABILITY_ACTIVATIONS - {"softmax"}:
                return "binary classifier (one sigmoid unit: p is class 1, 1 - p class 0)"
            if activation == "softmax":
                return "binary classifier (one unit taken as the probability p of class 1, but a softmax over one unit is always 1)"
            return (
                "binary classifier (one unit, taken as the probability p of class 1; vizkit "
                "cannot see what makes it)"
            )
        count = shape[0]
        if kind == "softmax":
            return f"classifier (softmax over {count} classes)"
        if kind == "linear":
            return f"classifier ({count} logits, one per class; their softmax gives the probabilities)"
        if kind == "sigmoid":
            return f"multi-label classifier ({count} sigmoid units, one probability per class)"
        return f"classifier ({count} scores, one per class, taken as they are; vizkit cannot see what makes them)"

    def _regression_unit(self) -> str:
        activation = self._final_activation()
        return "one linear unit" if activation == "linear" else f"one unit with a {activation} activation"

    def _final_activation(self) -> str | None:
        """The activation that makes the explained output, lowercased without "_", where
        vizkit can see it: a layer's ``activation`` option (Dense, Activation, ...), an
        activation layer (ReLU, Softmax, ...) or a keras.ops activation; else None."""
        path = self._producer.get(id(self._output)) if self._output is not None else None
        if path is None:
            return None
        layer = self._layers[path]
        normal = lambda name: name.lower().replace("_", "")  # noqa: E731
        activation = _config(layer).get("activation") if isinstance(layer, keras.Layer) else None
        if isinstance(activation, str):
            name = normal(activation)
            return name if name in _PROBABILITY_ACTIVATIONS | _VALUE_ACTIVATIONS else None
        name = normal(type(layer).__name__)
        return name if name in _PROBABILITY_ACTIVATIONS | _VALUE_ACTIVATIONS else None

    def __contains__(self, path: str) -> bool:
        return path in self._by_path

    def info(self, path: str) -> LayerInfo:
        return self._by_path[path]

    def resolve(self, name: str, usable=None, purpose: str = "", reason: str = "") -> str:
        """The path of layer ``name`` (a full path, or a layer name unique in the model).

        ``usable(info)`` narrows what is accepted. A refused name raises LayerError: "layer
        'x' cannot be used for PURPOSE (REASON)" for a layer that ``usable`` rejects
        (``purpose`` is a technique name or phrase, "gradcam"; the older " for gradcam"
        reads the same), else "MODEL has no layer 'x'"; then the valid layers closest to
        ``name``, at most NEAREST_LAYERS of them, and how many more there are.
        """
        candidates = [info for info in self.layers if usable is None or usable(info)]
        valid = [info.path for info in candidates]
        if name in valid:
            return name
        by_leaf = [path for path in valid if path.rsplit("/", 1)[-1] == name]
        if len(by_leaf) == 1:
            return by_leaf[0]
        if len(by_leaf) > 1:
            raise LayerError(
                f"{self.name} has several layers named {name!r} ({', '.join(by_leaf)}); "
                "name one by its full path"
            )
        if name in self._by_path or any(path.rsplit("/", 1)[-1] == name for path in self._by_path):
            problem = f"layer {name!r} cannot be used {_purpose_phrase(purpose)}"
            if reason:
                problem += f" ({reason})"
        else:
            problem = f"{self.name} has no layer {name!r}"
        nearest = _nearest(name, valid, NEAREST_LAYERS)
        listed = ", ".join(nearest) or "(none)"
        if len(valid) > len(nearest):
            listed += f", … and {len(valid) - len(nearest)} more (see `vizkit layers MODEL`)"
        raise LayerError(f"{problem}; valid layers: {listed}")

    # -- class scores ------------------------------------------------------

    def _ending(self) -> tuple[str | None, Callable[[], object] | None, str]:
        """How the explained output is made: (kind, pre-activation maker, the maker's path).

        kind is "softmax" or "sigmoid" (the maker builds the values before it), "linear"
        (a Dense without activation: the output is the logits), or None (unknown).
        """
        if self._ending_found is None:
            self._ending_found = self._find_ending()
        return self._ending_found

    def _find_ending(self):
        path = self._producer.get(id(self._output)) if self._output is not None else None
        if path is None:
            return None, None, ""
        layer = self._layers[path]
        args, kwargs = self._calls[path]
        x = args[0] if args else None
        rank = len(self._output.shape)
        config = _config(layer)
        kind, pre_activation = None, (lambda: x)
        if isinstance(layer, keras.layers.Softmax):
            if _on_last_axis(config.get("axis", -1), rank) and kwargs.get("mask") is None:
                kind = "softmax"
        elif isinstance(layer, keras.layers.Activation):
            if config.get("activation") in _SQUASHING:
                kind = config["activation"]
        elif isinstance(layer, keras.layers.Dense):
            activation = config.get("activation")
            quantized = getattr(layer, "quantization_mode", None)
            if activation == "linear":
                return "linear", None, path
            if activation in _SQUASHING and not quantized:
                kind, pre_activation = activation, (lambda: _dense_logits(layer, x))
        elif not isinstance(layer, keras.Layer):  # keras.ops.softmax / sigmoid on a tensor
            op = type(layer).__name__.lower()
            if op == "sigmoid" or (op == "softmax" and _on_last_axis(config.get("axis", -1), rank)):
                kind = op
        if kind is None or x is None or not isinstance(x, keras.KerasTensor):
            return None, None, path
        if kind == "softmax" and self.output_shape == (1,):
            return None, None, path  # a softmax over one unit is always 1
        return kind, pre_activation, path

    @property
    def output_activation(self) -> str | None:
        """What makes the explained output, as far as vizkit can see.

        "softmax" or "sigmoid": it ends in one (a Dense with that activation, a Softmax
        or an Activation layer, keras.ops.softmax or keras.ops.sigmoid); "linear": a
        Dense without activation, so the output is already logits; None: something else.
        """
        if self._output is None:
            return None
        return self._ending()[0]

    @property
    def has_logits(self) -> bool:
        """Whether ``score="logit"`` works: a classifier whose output_activation is known."""
        return self._output is not None and self.is_classifier and self.output_activation is not None

    def _scores(self, score: str):
        """The traced per-class scores (binary models expanded to two columns)."""
        if score not in SCORES:
            raise ValueError(f"score must be one of {', '.join(SCORES)}, not {score!r}")
        if score in self._score_tensors:
            return self._score_tensors[score]
        if self._output is None or not self.is_classifier:
            if self._output is None:
                raise ValueError(f"{self.name} is not a classifier (output shape unknown); it has no class scores")
            if self.is_regression:
                raise ValueError(
                    f"{self.name} is not a classifier: its output {self.output_name!r} is a regression "
                    f"({self._regression_unit()}); it has no class scores"
                )
            raise ValueError(
                f"{self.name} is not a classifier (output {self.output_name!r}, shape {self.output_shape}); "
                "it has no class scores"
            )
        kind, pre_activation, path = self._ending()
        binary = self.output_shape == (1,)
        if score == "probability":
            scores = self._output
            if kind == "linear":  # logits in, probabilities out
                scores = keras.ops.sigmoid(scores) if binary else keras.ops.softmax(scores, axis=-1)
            scores = self.expand_scores(scores)
        else:
            if kind is None:
                maker = f"{type(self._layers[path]).__name__} {path!r}" if path else "an unknown operation"
                raise ValueError(
                    f"{self.name} has no class logits vizkit can find: its output comes from "
                    f"{maker}; logits are known when a model ends in a softmax or a sigmoid "
                    "(a Dense with that activation, a Softmax or Activation layer, "
                    "keras.ops.softmax/sigmoid) or in a Dense without activation"
                )
            logits = self._output if kind == "linear" else pre_activation()
            # a single sigmoid unit: each class's log-odds, log(p/(1-p)) = z and -z
            scores = keras.ops.concatenate([-logits, logits], axis=-1) if binary else logits
        self._score_tensors[score] = scores
        return scores

    def scores_model(self, score: str = "probability") -> keras.Model:
        """A model from the input to the per-class scores, (batch, num_classes); differentiable.

        "probability": the model's output, a binary model's p expanded to (1 - p, p); for a
        model ending in a Dense without activation, softmax of it (sigmoid for one unit);
        for an ending vizkit cannot see through, the output as it is. "logit": the values
        before the final softmax (or the linear Dense's output); for one sigmoid unit with
        pre-sigmoid value z, (-z, z), the log-odds of each class. ValueError where the model
        is not a classifier, or for "logit" where has_logits is false.
        """
        if score not in self._score_models:
            self._score_models[score] = keras.Model(self._input, self._scores(score))
        return self._score_models[score]

    def expand_scores(self, scores):
        """Scores per class: a binary model's single probability p becomes (1 - p, p)."""
        if self.output_shape == (1,):
            return keras.ops.concatenate([1 - scores, scores], axis=-1)
        return scores

    def class_scores(self, batch, score: str = "probability") -> np.ndarray:
        """Scores per class (N × num_classes) for a preprocessed batch, as NumPy (see scores_model)."""
        return keras.ops.convert_to_numpy(self.scores_model(score)(batch, training=False))

    # -- running -----------------------------------------------------------

    def probe(self, paths: list[str], with_output: bool = False, score: str | None = None) -> keras.Model:
        """A model from the input to the outputs of ``paths`` (and the model's output).

        ``with_output`` appends the model's (first) output as it is; ``score`` ("logit" or
        "probability") appends the per-class scores of scores_model instead, so that
        features and class scores come from one differentiable call. Like any Keras model
        it returns a list for several outputs, a tensor for one.
        """
        key = (tuple(paths), with_output, score)
        if key not in self._probes:  # once per set of layers: a technique asks once per batch
            outputs = [self._tensors[path] for path in paths]
            if score is not None:
                outputs.append(self._scores(score))
            elif with_output:
                outputs.append(self._output)
            self._probes[key] = keras.Model(self._input, outputs)
        return self._probes[key]

    @property
    def output_model(self) -> keras.Model:
        """The model from its input to its (first) output; differentiable, returns a tensor."""
        if self._output_model is None:
            self._output_model = keras.Model(self._input, self._output)
        return self._output_model

    def predict(self, batch: np.ndarray) -> np.ndarray:
        """The model's (first) output for a preprocessed batch, as NumPy."""
        return keras.ops.convert_to_numpy(self.output_model(batch, training=False))
