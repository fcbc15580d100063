"""filters: the input pattern each filter responds to most, by gradient ascent (the chapter's second technique)."""

from __future__ import annotations

import re
import time
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


#: The ascent runs as compiled calls of about this many seconds each (the steps per call
#: adapt to it), so Ctrl-C, which Python sees between calls, stops it within a second or so.
SECONDS_PER_CALL = 0.25
#: Progress is reported at most this often during a long ascent.
PROGRESS_EVERY_S = 2.0


def _ascent(probe, preprocess: Callable, step: float):
    """A compiled ``ascend(x, onehot, steps)``: ``steps`` (a scalar int32 tensor, so one
    trace serves every call) steps that move a batch of inputs, each up its own filter's
    mean activation."""
    import tensorflow as tf

    @tf.function(reduce_retracing=True)
    def ascend(x, onehot, steps):
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


def _ascend_in_calls(ascend, x, onehot, steps: int, steps_per_call: int | None, progress: Callable[[int], None]):
    """``x`` after ``steps`` steps of ``ascend``, run as several compiled calls: the same
    numbers as one call of all the steps, but Python (and so Ctrl-C) gets control between
    calls. ``steps_per_call`` None: start at 1 and adapt to about SECONDS_PER_CALL per call
    (at most 4 times more steps than the call before). ``progress(done)`` now and then."""
    import tensorflow as tf

    done, per_call, reported = 0, steps_per_call or 1, time.monotonic()
    while done < steps:
        take = min(per_call, steps - done)
        started = time.perf_counter()
        x = ascend(x, onehot, tf.constant(take, dtype=tf.int32))
        elapsed = time.perf_counter() - started
        done += take
        if steps_per_call is None:  # the first call also traces: it only ever makes calls shorter
            per_call = max(1, min(4 * take, int(take * SECONDS_PER_CALL / max(elapsed, 1e-6))))
        if done < steps and time.monotonic() - reported >= PROGRESS_EVERY_S:
            progress(done)
            reported = time.monotonic()
    return x


# -- memory ---------------------------------------------------------------------------------

#: Bytes kept per value (pixel × channel) of each pattern until the layer is done: the
#: start and the optimized input (float32, the latter twice while joined), the pattern and
#: the grid (uint8).
KEPT_BYTES = 4 + 8 + 2 + 1


def memory_needed(graph, paths: list[str], count: int, size: int, batch: int) -> tuple[float, str]:
    """(bytes, what for): about the memory of ``count`` patterns of ``size``×``size`` on
    each layer of ``paths``, ``batch`` filters at a time: the largest batch's inputs and
    every layer's output up to the layer, with their gradients, plus the patterns kept."""
    peak, peak_at, kept = 0.0, (0, paths[0] if paths else ""), 0.0
    for path in paths:
        filters = min(count, graph.info(path).shape[-1])
        at_once = min(batch, filters)
        ascent = at_once * kit.activation_bytes(graph, side=size, upto=path, gradients=True)
        if ascent > peak:
            peak, peak_at = ascent, (at_once, path)
        kept += filters * size * size * graph.channels * KEPT_BYTES
    what = f"(gradient ascent of {peak_at[0]} filters at a time through {peak_at[1]} at {size}×{size}, and the patterns)"
    return peak + kept, what


def check_fits(graph, paths: list[str], count: int, size: int, batch: int) -> None:
    """ValueError unless the patterns fit in memory (see :func:`memory_needed`), naming the
    largest size that does."""
    kit.check_memory(
        size, lambda s: memory_needed(graph, paths, count, s, batch)[0],
        memory_needed(graph, paths, count, size, batch)[1], "fewer filters at a time (batch)", low=8,
    )


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
    steps_per_call: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(patterns, optimized): the pattern of each filter as displayed, uint8 N×size×size×C,
    and the raw float32 inputs it was deprocessed from.

    ``filters`` is a list of filter indices or a count (the first N). The ascent runs in
    0-255 pixel space through ``preprocess``, so with the identity (the chapter's setup)
    it is exactly the chapter's input-space ascent. ``start`` overrides the seeded noise.
    The steps run as compiled calls of ``steps_per_call`` steps (None: about a quarter of a
    second each), so Ctrl-C stops a long ascent; the numbers do not depend on it.
    ValueError, before any work, for patterns that would not fit in memory.
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
        check_fits(graph, [path], len(indices), size, batch)
        start = initial_inputs(len(indices), size, graph.channels, seed)
    if graph.fixed_size not in (None, (size, size)):
        fixed, graph = graph.fixed_size, graph.free_size()
        if path not in graph:
            raise ValueError(f"{path} works only at the model's input size {fixed}; set size to that")
    ascend = _ascent(graph.probe([path]), preprocess, step)
    optimized = []
    for begin in range(0, len(indices), batch):
        chunk = indices[begin : begin + batch]
        which = f"{path}: filters {chunk[0]}-{chunk[-1]} of {len(indices)}"
        progress(which)
        onehot = tf.one_hot(chunk, channels_out, dtype=tf.float32)
        x = tf.constant(start[begin : begin + len(chunk)], dtype=tf.float32)
        x = _ascend_in_calls(ascend, x, onehot, steps, steps_per_call, lambda done: progress(f"{which}, step {done} of {steps}"))
        optimized.append(np.asarray(x))
    raw = np.concatenate(optimized)
    return np.stack([kit.deprocess_pattern(x) for x in raw]), raw


def _layer_paths(graph, params) -> tuple[list[str], str | None]:
    """(paths, why): the layers named by the ``layers`` option, else the default ones."""
    if params["layers"]:
        return [graph.resolve(name, kit.conv_layer, "filters") for name in params["layers"]], None
    return default_layers(graph)


def run(context) -> list[Artifact]:
    params, graph = context.params, context.model
    paths, why = _layer_paths(graph, params)
    if why:
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


#: The options whose values size the memory, in the order they are blamed on a tie.
SIZING = ("size", "batch", "count")
#: What else brings the memory down, per option blamed.
OTHER_FIX = {
    "size": "fewer filters at a time (filters.batch)",
    "batch": "a smaller filters.size",
    "count": "fewer filters at a time (filters.batch) or a smaller filters.size",
}


def _check_memory(name: str) -> Callable:
    """The check of one of SIZING: the patterns must fit in memory. Where they do not, the
    option blamed is the one whose value costs the most memory over its default (so
    ``size=4096`` is blamed on the size, ``batch=512`` on the batch), and only its check
    fails, saying the largest value that fits."""

    def check(value: int, context) -> None:
        params, graph = context.params, context.model
        paths, _ = _layer_paths(graph, params)
        if not paths:
            return  # run() says there are no convolution layers

        def needs(**changed) -> float:
            values = {key: params[key] for key in SIZING} | changed
            return memory_needed(graph, paths, values["count"], values["size"], values["batch"])[0]

        needed = needs()
        if needed <= kit.memory_budget():
            return
        defaults = {option.name: option for option in TECHNIQUE.options}
        growth = {key: needed / needs(**{key: min(params[key], defaults[key].default)}) for key in SIZING}
        if max(SIZING, key=growth.__getitem__) != name:
            return
        values = {key: params[key] for key in SIZING}
        what = memory_needed(graph, paths, values["count"], values["size"], values["batch"])[1]
        kit.check_memory(value, lambda v: needs(**{name: v}), what, OTHER_FIX[name], low=int(defaults[name].minimum))

    return check


TECHNIQUE = Technique(
    name="filters",
    run=run,
    description="The input pattern each filter of a conv layer responds to most, by gradient ascent.",
    accepts=kit.conv_layer,
    options=(
        kit.layers_option("filters", kit.conv_layer, "conv layers (comma list); default: first conv of each block"),
        Option("count", int, 64, "filters per layer, from the first", minimum=1, check=_check_memory("count")),
        Option(
            "size", int, 150, "pattern size in pixels (any size, even on models with a fixed input); at most what fits in memory",
            minimum=8, maximum=4096, check=_check_memory("size"),
        ),
        Option("steps", int, 40, "gradient ascent steps", minimum=0),
        Option("step", float, 1.0, "step size on the RMS-normalized gradient", minimum=0),
        Option("seed", int, 0, "seed of the starting noise"),
        Option("batch", int, 16, "filters optimized together in one batch", minimum=1, check=_check_memory("batch")),
    ),
)


@hookimpl
def register_techniques(register):
    register(TECHNIQUE)
