"""filters: the input pattern each filter responds to most, by gradient ascent (the chapter's second technique)."""

from __future__ import annotations

import re
from typing import Callable

import numpy as np

import vizkit
from vizkit import Artifact, Option, Technique, hookimpl, kit


def default_layers(graph, spread_count: int = 5) -> tuple[list[str], str]:
    """The first conv layer of each ``blockN`` (VGG-style names), else an even spread."""
    convs = kit.conv_layers(graph)
    firsts: dict[str, str] = {}
    for path in convs:
        match = re.match(r"(.*?block\d+)[a-z]?_", path.rsplit("/", 1)[-1])
        if match:
            firsts.setdefault(match.group(1), path)
    if 2 <= len(firsts) <= 8:
        return list(firsts.values()), "the first convolution layer of each block"
    return kit.spread_evenly(convs, spread_count), f"{min(spread_count, len(convs))} convolution layers spread evenly"


def initial_inputs(count: int, size: int, channels: int, seed: int) -> np.ndarray:
    """The chapter's start: gray plus noise, uniform [0, 1) × 20 + 128, in pixel space."""
    rng = np.random.default_rng(seed)
    return (rng.random((count, size, size, channels)) * 20 + 128).astype("float32")


def _ascent(probe, preprocess: Callable, steps: int, step: float):
    """One compiled loop that moves a batch of inputs, each up its own filter's mean activation."""
    import tensorflow as tf

    @tf.function(reduce_retracing=True)
    def ascend(x, onehot):
        for _ in tf.range(steps):
            with tf.GradientTape() as tape:
                tape.watch(x)
                activation = probe(preprocess(x), training=False)
                loss = tf.reduce_sum(tf.reduce_mean(activation, axis=(1, 2)) * onehot)
            grads = tape.gradient(loss, x)
            norms = tf.sqrt(tf.reduce_mean(tf.square(grads), axis=(1, 2, 3), keepdims=True))
            x = x + step * grads / (norms + 1e-5)
        return x

    return ascend


def filter_patterns(
    model,
    layer: str,
    filters: list[int] | int = 64,
    size: int = 150,
    steps: int = 40,
    step: float = 1.0,
    seed: int = 0,
    preprocess: Callable = lambda x: x,
    batch: int = 16,
    start: np.ndarray | None = None,
    progress: Callable[[str], None] = lambda message: None,
) -> tuple[np.ndarray, np.ndarray]:
    """(patterns, optimized): the pattern of each filter as displayed, uint8 N×size×size×C,
    and the raw float32 inputs it was deprocessed from.

    ``filters`` is a list of filter indices or a count (the first N). The ascent runs in
    0-255 pixel space through ``preprocess``, so with the identity (the chapter's setup)
    it is exactly the chapter's input-space ascent. ``start`` overrides the seeded noise.
    """
    import tensorflow as tf

    graph = vizkit.ModelGraph.of(model)
    path = graph.resolve(layer, kit.conv_layer, "filters (it is not a convolution layer)")
    channels_out = graph.info(path).shape[-1]
    indices = list(range(min(filters, channels_out))) if isinstance(filters, int) else list(filters)
    outside = [i for i in indices if not 0 <= i < channels_out]
    if outside:
        raise ValueError(f"{path} has filters 0-{channels_out - 1}; no filter {outside[0]}")
    if start is None:
        start = initial_inputs(len(indices), size, graph.channels, seed)
    if graph.fixed_size not in (None, (size, size)):
        fixed, graph = graph.fixed_size, graph.free_size()
        if path not in graph:
            raise ValueError(f"{path} works only at the model's input size {fixed}; set size to that")
    ascend = _ascent(graph.probe([path]), preprocess, steps, step)
    optimized = []
    for begin in range(0, len(indices), batch):
        chunk = indices[begin : begin + batch]
        progress(f"{path}: filters {chunk[0]}-{chunk[-1]} of {len(indices)}")
        onehot = tf.one_hot(chunk, channels_out, dtype=tf.float32)
        x = tf.constant(start[begin : begin + len(chunk)], dtype=tf.float32)
        optimized.append(ascend(x, onehot).numpy())
    raw = np.concatenate(optimized)
    return np.stack([kit.deprocess_pattern(x) for x in raw]), raw


def run(context) -> list[Artifact]:
    params, graph = context.params, context.model
    if params["layers"]:
        paths = [graph.resolve(name, kit.conv_layer, "filters") for name in params["layers"]]
    else:
        paths, why = default_layers(graph)
        context.note(f"layers: {why}")
    if not paths:
        raise ValueError("the model has no convolution layers")
    artifacts = []
    for path in paths:
        patterns, _ = filter_patterns(
            graph,
            path,
            filters=params["count"],
            size=params["size"],
            steps=params["steps"],
            step=params["step"],
            seed=params["seed"],
            preprocess=context.preprocess,
            batch=params["batch"],
            progress=context.progress,
        )
        picture = kit.tile(patterns, per_row=8, margin=5, fill=0)
        artifacts.append(
            Artifact(
                title=path,
                array=patterns,
                picture=picture[..., 0] if picture.shape[-1] == 1 else picture,
                layer=path,
                caption=f"filters 0-{len(patterns) - 1}, {params['steps']} steps of {params['step']:g}",
            )
        )
    return artifacts


TECHNIQUE = Technique(
    name="filters",
    run=run,
    description="The input pattern each filter of a conv layer responds to most, by gradient ascent.",
    accepts=kit.conv_layer,
    options=(
        kit.layers_option("filters", kit.conv_layer, "conv layers (comma list); default: first conv of each block"),
        Option("count", int, 64, "filters per layer, from the first", minimum=1),
        Option("size", int, 150, "pattern size in pixels (any size, even on models with a fixed input)", minimum=8),
        Option("steps", int, 40, "gradient ascent steps", minimum=0),
        Option("step", float, 1.0, "step size on the RMS-normalized gradient", minimum=0),
        Option("seed", int, 0, "seed of the starting noise"),
        Option("batch", int, 16, "filters optimized together in one batch", minimum=1),
    ),
)


@hookimpl
def register_techniques(register):
    register(TECHNIQUE)
