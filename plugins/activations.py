"""activations: the feature maps of each layer for an input image (the chapter's first technique)."""

from __future__ import annotations

import numpy as np

from vizkit import hookimpl
from vizkit.graph import LayerInfo, ModelGraph, spread_evenly
from vizkit.imaging import standardize_channel, tile
from vizkit.technique import Artifact, Option, RunContext, Technique


def _usable(info: LayerInfo) -> bool:
    return info.feature_map


def default_layers(graph: ModelGraph, max_layers: int) -> list[str]:
    """Every convolution and pooling layer, evenly thinned out to at most ``max_layers``."""
    paths = [info.path for info in graph.layers if (info.conv or info.pooling)]
    return spread_evenly(paths, max_layers)


def feature_maps(model, batch: np.ndarray, layers: list[str]) -> dict[str, np.ndarray]:
    """Outputs of ``layers`` (names or paths) for a preprocessed batch, in one forward pass.

    ``model`` is a keras.Model or a ModelGraph; each value is N×H×W×C float32.
    """
    graph = ModelGraph.of(model)
    paths = [graph.resolve(name, _usable, " for activations (it has no H×W×C output)") for name in layers]
    outputs = graph.probe(paths)(batch, training=False)
    if not isinstance(outputs, (list, tuple)):
        outputs = [outputs]
    return {path: np.asarray(output, dtype="float32") for path, output in zip(paths, outputs)}


def channel_grid(activation: np.ndarray, images_per_row: int, max_channels: int) -> np.ndarray:
    """One layer's H×W×C output as a grid of standardized channels, ``images_per_row`` wide."""
    channels = activation.shape[-1] if max_channels <= 0 else min(max_channels, activation.shape[-1])
    pictures = np.stack([standardize_channel(activation[..., c]) for c in range(channels)])
    return tile(pictures, images_per_row, margin=1, fill=255)


def run(context: RunContext) -> list[Artifact]:
    params, graph = context.params, context.model
    if params["layers"]:
        paths = [graph.resolve(n, _usable, " for activations") for n in params["layers"]]
    else:
        paths = default_layers(graph, params["max_layers"])
        total = sum(1 for info in graph.layers if info.conv or info.pooling)
        thinned = f", {len(paths)} of {total} spread evenly (max_layers)" if len(paths) < total else ""
        context.note(f"layers: the convolution and pooling layers{thinned}")
    if not paths:
        raise ValueError("the model has no convolution or pooling layers; name some with activations.layers")
    artifacts = []
    for images, batch in context.batches(params["batch"]):
        context.progress(f"{len(images)} image(s), {len(paths)} layers")
        maps = feature_maps(graph, batch, paths)
        for i, image in enumerate(images):
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


TECHNIQUE = Technique(
    name="activations",
    run=run,
    description="Feature maps of convolution and pooling layers for each image, one grid per layer.",
    accepts=_usable,
    options=(
        Option("layers", list, [], "layers to show (comma list of names or paths); default: conv and pooling layers"),
        Option("max_layers", int, 16, "default layers are spread evenly to at most this many (0: all)", minimum=0),
        Option("images_per_row", int, 16, "channels per row of a grid", minimum=1),
        Option("max_channels", int, 128, "channels shown per layer (0: all); arrays keep all", minimum=0),
        Option("batch", int, 8, "images per forward pass", minimum=1),
    ),
)


@hookimpl
def register_techniques(register):
    register(TECHNIQUE)
