"""activations: the feature maps of each layer for an input image (the chapter's first technique)."""

from __future__ import annotations

import numpy as np

import vizkit
from vizkit import Artifact, Option, Technique, hookimpl, kit


def default_layers(graph, max_layers: int) -> list[str]:
    """Every convolution and pooling layer, evenly thinned out to at most ``max_layers``."""
    paths = [info.path for info in graph.layers if (info.conv or info.pooling)]
    return kit.spread_evenly(paths, max_layers)


def feature_maps(model, batch: np.ndarray, layers: list[str]) -> dict[str, np.ndarray]:
    """Outputs of ``layers`` (names or paths) for a preprocessed batch, in one forward pass.

    ``model`` is a keras.Model or a ModelGraph; each value is N×H×W×C float32.
    """
    graph = vizkit.ModelGraph.of(model)
    paths = [graph.resolve(name, kit.feature_map_layer, "activations (it has no H×W×C output)") for name in layers]
    outputs = graph.probe(paths)(batch, training=False)
    if not isinstance(outputs, (list, tuple)):
        outputs = [outputs]
    return {path: np.asarray(output, dtype="float32") for path, output in zip(paths, outputs)}


def channel_grid(activation: np.ndarray, images_per_row: int, max_channels: int) -> np.ndarray:
    """One layer's H×W×C output as a grid of standardized channels, ``images_per_row`` wide."""
    channels = activation.shape[-1] if max_channels <= 0 else min(max_channels, activation.shape[-1])
    return kit.tile(kit.standardize_channels(activation[..., :channels]), images_per_row, margin=1, fill=255)


def _layers(context) -> list[str]:
    """The layers to show, chosen once per run (the first batch notes why)."""
    params, graph = context.params, context.model
    if params["layers"]:
        return [graph.resolve(n, kit.feature_map_layer, "activations") for n in params["layers"]]
    paths = default_layers(graph, params["max_layers"])
    if not paths:
        raise ValueError("the model has no convolution or pooling layers; name some with activations.layers")
    return paths


def run_batch(context, batch) -> list[Artifact]:
    params = context.params
    paths = _layers(context)
    context.progress(f"{len(batch)} image(s), {len(paths)} layers")
    maps = feature_maps(context.model, batch.inputs, paths)
    artifacts = []
    for i, image in enumerate(batch.images):
        for path in paths:
            activation = maps[path][i]
            shown = min(activation.shape[-1], params["max_channels"] or activation.shape[-1])
            artifacts.append(
                Artifact(
                    title=f"{path} · {image.id}",
                    array=activation,
                    picture=channel_grid(activation, params["images_per_row"], params["max_channels"]),
                    image_id=image.id,
                    layer=path,
                    caption=f"{activation.shape[0]}×{activation.shape[1]}, {shown} of {activation.shape[-1]} channels",
                )
            )
    return artifacts


def prepare(context) -> None:
    """The note on which layers were shown by default, and why."""
    if context.params["layers"]:
        return
    graph = context.model
    paths = _layers(context)
    total = sum(1 for info in graph.layers if info.conv or info.pooling)
    thinned = f", {len(paths)} of {total} spread evenly (max_layers)" if len(paths) < total else ""
    context.note(f"layers: the convolution and pooling layers{thinned}")


TECHNIQUE = Technique(
    name="activations",
    run_batch=run_batch,
    prepare=prepare,
    description="Feature maps of convolution and pooling layers for each image, one grid per layer.",
    accepts=kit.feature_map_layer,
    options=(
        kit.layers_option("activations", kit.feature_map_layer, "layers to show (comma list of names or paths); default: conv and pooling layers"),
        Option("max_layers", int, 16, "default layers are spread evenly to at most this many (0: all)", minimum=0),
        Option("images_per_row", int, 16, "channels per row of a grid", minimum=1),
        Option("max_channels", int, 128, "channels shown per layer (0: all); arrays keep all", minimum=0),
        kit.batch_option(8),
    ),
)


@hookimpl
def register_techniques(register):
    register(TECHNIQUE)
