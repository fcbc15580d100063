"""filters: the input pattern each filter responds to most, by gradient ascent (the chapter's second technique)."""

from __future__ import annotations

import re
from typing import Callable

import numpy as np

import vizkit
from vizkit import Artifact, Option, Technique, featureviz, hookimpl, kit


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
    return featureviz.pixel_start(count, size, size, channels, seed)


# -- memory ---------------------------------------------------------------------------------

#: Bytes kept per value (pixel × channel) of each pattern until the layer is done: the
#: start and the optimized input (float32, the latter twice while joined), the pattern and
#: the grid (uint8).
KEPT_BYTES = 4 + 8 + 2 + 1


def memory_needed(graph, paths: list[str], count: int, size: int, batch: int, variants: int = 1) -> tuple[float, str]:
    """(bytes, what for): about the memory of ``count`` filters' patterns (× ``variants``)
    of ``size``×``size`` on each layer of ``paths``, ``batch`` patterns at a time (whole
    groups of variants): the largest batch's inputs and every layer's output up to the
    layer, with their gradients, plus the patterns kept."""
    peak, peak_at, kept = 0.0, (0, paths[0] if paths else ""), 0.0
    for path in paths:
        filters = min(count, graph.info(path).shape[-1]) * variants
        at_once = min(max(1, batch // variants) * variants, filters)
        ascent = at_once * kit.activation_bytes(graph, side=size, upto=path, gradients=True)
        if ascent > peak:
            peak, peak_at = ascent, (at_once, path)
        kept += filters * size * size * graph.channels * KEPT_BYTES
    what = f"(gradient ascent of {peak_at[0]} filters at a time through {peak_at[1]} at {size}×{size}, and the patterns)"
    return peak + kept, what


def check_fits(graph, paths: list[str], count: int, size: int, batch: int, variants: int = 1) -> None:
    """ValueError unless the patterns fit in memory (see :func:`memory_needed`), naming the
    largest size that does."""
    kit.check_memory(
        size, lambda s: memory_needed(graph, paths, count, s, batch, variants)[0],
        memory_needed(graph, paths, count, size, batch, variants)[1], "fewer filters at a time (batch)", low=8,
    )


#: What each parameterization defaults to: the chapter's ascent for ``pixel``; Lucid's
#: settings (Adam at 0.05, the standard transforms) for ``fourier``, with fewer steps than
#: its 512: on EfficientNet-Lite0 filter patterns of 128 and 256 steps look alike; class
#: images take CLASS_STEPS to look like the class (at 128 the model already gives them
#: p = 1.00, but they are pale: benchmarks/featureviz_quality.py --save).
DEFAULTS = {
    "pixel": {"steps": 40, "optimizer": "normalized", "transforms": "none"},
    "fourier": {"steps": 128, "optimizer": "adam", "transforms": "standard"},
}
CLASS_STEPS = 256
#: The step size each optimizer defaults to: the chapter's 1.0 on the normalized gradient,
#: Lucid's learning rate for Adam.
STEP = {"normalized": 1.0, "adam": 0.05}
#: Weight of the diversity term against the objective, Lucid's ``-1e2 * diversity``.
DIVERSITY = 100.0


def settings(param: str, objective: str = "channel", **given) -> dict:
    """The ascent's settings for ``param`` and ``objective``: DEFAULTS (CLASS_STEPS for
    fourier class images, the STEP of the optimizer) with the values given (None: default)."""
    if param not in DEFAULTS:
        raise ValueError(f"param must be one of {', '.join(DEFAULTS)}, not {param!r}")
    defaults = DEFAULTS[param] | ({"steps": CLASS_STEPS} if (param, objective) == ("fourier", "class") else {})
    chosen = defaults | {key: value for key, value in given.items() if value is not None}
    return {"step": STEP[chosen["optimizer"]]} | chosen


def with_diversity(score: Callable, variants: int, weight: float, split: Callable | None = None) -> Callable:
    """The objective ``score`` minus ``weight`` × Lucid's diversity over groups of
    ``variants`` images (just ``score`` for one variant). ``split(outputs)`` gives
    (features the diversity is measured on, what ``score`` scores); default: both are
    the probe's output."""
    if variants == 1 or not weight:
        return score
    split = split or (lambda outputs: (outputs, outputs))

    def objective(outputs, onehot):
        features, scored = split(outputs)
        return score(scored, onehot) - weight * featureviz.diversity(features, variants)

    return objective


def optimize(
    graph, probe, objective: Callable, targets: list[int], width: int, size: int, *,
    param: str = "pixel", seed: int = 0, preprocess: Callable = lambda x: x, batch: int = 16, variants: int = 1,
    start: np.ndarray | None = None, progress: Callable[[str], None] = lambda message: None,
    steps_per_call: int | None = None, what: str = "", precision: str = "float32", **given,
) -> tuple[np.ndarray, np.ndarray]:
    """(pictures, pixels): ``variants`` images per target (a channel or class index out of
    ``width``), each optimized up ``objective(probe(...), onehot)``, uint8 as displayed and
    float32 0-255 as the model saw them (before transforms).

    ``given``: steps, step, optimizer, transforms (None: the DEFAULTS of ``param``).
    ``precision``: what ``probe`` computes in, for the ascent's loss scale.
    Images go through in batches of ``batch`` (whole groups of variants), as compiled
    calls (see :func:`vizkit.featureviz.ascend_in_calls`); ``start`` overrides the
    parameterization's seeded start.
    """
    import tensorflow as tf

    chosen = settings(param, **given)
    parameterization = featureviz.PARAMETERIZATIONS[param](size, size, graph.channels)
    optimizer = featureviz.OPTIMIZERS[chosen["optimizer"]](chosen["step"])
    count, steps = len(targets) * variants, chosen["steps"]
    transform = featureviz.robust_transform(size, seed, count) if chosen["transforms"] == "standard" else None
    ascend = featureviz.ascent(probe, objective, parameterization, optimizer, preprocess, transform,
                               featureviz.LOSS_SCALES[precision])
    params = parameterization.init(count, seed) if start is None else np.asarray(start, dtype="float32")
    each = np.repeat(np.asarray(targets), variants)
    per_batch = max(1, batch // variants) * variants
    pixels = []
    for begin in range(0, count, per_batch):
        ids = np.arange(begin, min(begin + per_batch, count))
        which = f"{what}{each[ids[0]]}-{each[ids[-1]]} of {len(targets)}"
        progress(which)
        x, _ = featureviz.ascend_in_calls(
            ascend, tf.constant(params[ids]), optimizer.start(params[ids]), tf.one_hot(each[ids], width),
            tf.constant(ids, tf.int32), steps, steps_per_call, lambda done: progress(f"{which}, step {done} of {steps}"),
        )
        pixels.append(np.asarray(parameterization.to_pixels(x)))
    pixels = np.concatenate(pixels)
    return parameterization.display(pixels), pixels


def _in_precision(graph, precision: str):
    """The graph of a copy of the model computing in ``precision`` (the graph itself for
    float32 or when it already is such a copy)."""
    model = featureviz.in_precision(graph.model, precision)
    return graph if model is graph.model else vizkit.ModelGraph.of(model)


def _at_size(graph, size: int, layer: str | None):
    """The graph to run at ``size``: the model itself at its own input size, else its
    free-size trace; ValueError where ``layer`` (None: the output) is not in that."""
    if graph.fixed_size in (None, (size, size)):
        return graph
    free = graph.free_size()
    if layer:
        if layer in free:
            return free
    elif free.has_output and _runs_at(free, size):
        return free
    raise ValueError(f"{layer or 'the output'} works only at the model's input size {graph.fixed_size}; set size to that")


def _runs_at(graph, size: int) -> bool:
    """Whether the model's output computes at ``size``: a Flatten → Dense head traces at a
    free size but fails on anything but its own (one forward pass of zeros tells)."""
    try:
        graph.output_model(np.zeros((1, size, size, graph.channels), dtype="float32"), training=False)
    except Exception:  # whatever Keras or TensorFlow raise for the mismatch
        return False
    return True


def filter_patterns(
    model,
    layer: str,
    filters: list[int] | int = 64,
    size: int = 150,
    steps: int | None = None,
    step: float | None = None,
    seed: int = 0,
    preprocess: Callable = lambda x: x,
    batch: int = 16,
    start: np.ndarray | None = None,
    progress: Callable[[str], None] = lambda message: None,
    steps_per_call: int | None = None,
    *,
    param: str = "pixel",
    optimizer: str | None = None,
    transforms: str | None = None,
    objective: str = "channel",
    variants: int = 1,
    diversity: float = DIVERSITY,
    precision: str = "float32",
) -> tuple[np.ndarray, np.ndarray]:
    """(patterns, pixels): the pattern of each filter as displayed, uint8 N×size×size×C
    (N = filters × variants, the variants of a filter together), and the float32 0-255
    inputs they come from.

    ``filters`` is a list of filter indices or a count (the first N). ``objective``:
    "channel" (the filter's mean activation, the chapter's) or "neuron" (the filter at
    the centre position). With the defaults (``param="pixel"``) this is exactly the
    chapter's input-space ascent in 0-255 through ``preprocess`` (the identity in the
    chapter); ``param="fourier"`` is Olah et al.'s (see :mod:`vizkit.featureviz`).
    ``steps``, ``step``, ``optimizer``, ``transforms``: None for the param's DEFAULTS.
    ``variants`` > 1 makes that many patterns per filter, pushed apart by ``diversity`` ×
    Lucid's diversity term. ``precision``: float32, or bfloat16/float16 computed by a copy
    of the model (see :func:`vizkit.featureviz.fast_precisions` for where that is faster).
    ValueError, before any work, for patterns that would not fit in memory.
    """
    graph = vizkit.ModelGraph.of(model)
    path = graph.resolve(layer, kit.conv_layer, "filters (it is not a convolution layer)")
    channels_out = graph.info(path).shape[-1]
    indices = list(range(min(filters, channels_out))) if isinstance(filters, int) else list(filters)
    outside = [i for i in indices if not 0 <= i < channels_out]
    if outside:
        raise ValueError(f"{path} has filters 0-{channels_out - 1}; no filter {outside[0]}")
    if objective not in OBJECTIVES or objective == "class":
        raise ValueError(f"objective must be channel or neuron for filter patterns, not {objective!r}")
    if start is None:
        check_fits(graph, [path], len(indices), size, batch, variants)
    graph = _at_size(_in_precision(graph, precision), size, path)
    score = featureviz.neuron if objective == "neuron" else featureviz.channel_mean
    return optimize(
        graph, graph.probe([path]), with_diversity(score, variants, diversity), indices, channels_out, size,
        param=param, seed=seed, preprocess=preprocess, batch=batch, variants=variants, start=start,
        progress=progress, steps_per_call=steps_per_call, what=f"{path}: filters ", precision=precision,
        steps=steps, step=step, optimizer=optimizer, transforms=transforms,
    )


def class_patterns(
    model,
    classes: list[int],
    size: int | None = None,
    *,
    score: str | None = None,
    variants: int = 1,
    diversity: float = DIVERSITY,
    diversity_layer: str | None = None,
    param: str = "fourier",
    precision: str = "float32",
    **options,
) -> tuple[np.ndarray, np.ndarray]:
    """(pictures, pixels) like :func:`filter_patterns`, one image per class (× variants)
    maximizing that class's score: its logit where the model's logits are known (``score``
    None), which says what the class looks like rather than what the others do not.
    ``size``: the model's input size (None: that, or 224 for a free size); other sizes
    work where the model runs at them. Diversity is measured on ``diversity_layer``
    (default: the last convolution layer). ``options``: those of :func:`optimize`.
    """
    graph = vizkit.ModelGraph.of(model)
    score = score or ("logit" if graph.has_logits else "probability")
    size = size or class_size(graph)
    width = graph.num_classes
    outside = [c for c in classes if not 0 <= c < width]
    if outside:
        raise ValueError(f"{graph.name} has classes 0-{width - 1}; no class {outside[0]}")
    graph = _at_size(_in_precision(graph, precision), size, None)
    if variants > 1 and diversity:
        path = graph.resolve(diversity_layer, kit.conv_layer, "diversity") if diversity_layer else _diversity_layer(graph)
        probe = graph.probe([path], score=score)
        objective = with_diversity(featureviz.class_score, variants, diversity, split=lambda outputs: tuple(outputs))
    else:  # no class scores: scores_model says why, before any work
        probe, objective = graph.scores_model(score), featureviz.class_score
    options["steps"] = settings(param, "class", steps=options.get("steps"))["steps"]
    return optimize(graph, probe, objective, list(classes), width, size, param=param, variants=variants,
                    what="classes ", precision=precision, **options)


def class_size(graph) -> int:
    """The size class images default to: the model's own input size, where the classifier
    was trained to see (224 where it is free or not square)."""
    fixed = graph.fixed_size
    return fixed[0] if fixed and fixed[0] == fixed[1] else 224


def _diversity_layer(graph) -> str:
    """The last convolution layer, where class images' diversity is measured."""
    convs = kit.conv_layers(graph)
    if not convs:
        raise ValueError(f"{graph.name} has no convolution layer to measure the diversity of its class images on; use variants=1")
    return convs[-1]


#: The objectives the technique offers.
OBJECTIVES = ("channel", "neuron", "class")


def pattern_size(params, graph) -> int:
    """The ``size`` option, or its default: the chapter's 150, or for classes the model's
    own input size (224 where it is free), where the classifier was trained to see."""
    if params["size"]:
        return params["size"]
    return class_size(graph) if params["objective"] == "class" else 150


def _layer_paths(graph, params) -> tuple[list[str], str | None]:
    """(paths, why): the layers named by the ``layers`` option, else the default ones;
    for classes, the model's last layer (all of it runs)."""
    if params["objective"] == "class":
        return [graph.layers[-1].path], None
    if params["layers"]:
        return [graph.resolve(name, kit.conv_layer, "filters") for name in params["layers"]], None
    return default_layers(graph)


def _classes(params, graph, labels) -> list[int]:
    """The ``classes`` option as indices (names through the labels), else the first ``count``."""
    if not params["classes"]:
        return list(range(min(params["count"], graph.num_classes)))
    return [kit.class_index(value, labels, graph.num_classes) for value in params["classes"]]


def _precision(precision: str, context) -> str:
    """``precision`` where this machine computes it fast, else float32 and a note: a lower
    precision emulated in software is slower than float32."""
    if precision == "float32" or precision in featureviz.fast_precisions():
        return precision
    context.note(
        f"precision {precision} skipped, float32 used: this machine has no hardware that computes {precision} "
        "faster (a GPU of compute capability 8.0+ for bfloat16, 7.0+ for float16, or without a GPU a CPU with "
        "AVX-512 BF16 or AMX for bfloat16)"
    )
    return "float32"


def _check_objective(value: str, context) -> None:
    """A class objective needs class scores (the graph says why a model has none), a model
    that runs at the size asked, and a convolution layer for the diversity of variants."""
    if value == "class":
        graph, params = context.model, context.params
        graph.scores_model("logit" if graph.has_logits else "probability")
        _at_size(graph, pattern_size(params, graph), None)
        if params["variants"] > 1 and params["diversity"]:
            _diversity_layer(graph)


def _describe(param: str, params, precision: str) -> str:
    """How the patterns were made, for the caption."""
    chosen = settings(param, params["objective"], **{key: params[key] for key in ("steps", "step", "optimizer", "transforms")})
    transforms = ", transformation robustness" if chosen["transforms"] == "standard" else ""
    computed = f", in {precision}" if precision != "float32" else ""
    return f"{param}: {chosen['steps']} {chosen['optimizer']} steps of {chosen['step']:g}{transforms}{computed}"


def _grid(pictures: np.ndarray, labels: list[str]) -> np.ndarray:
    """The report's grid: 8 per row (the chapter's 8×8), 4 for up to 16 patterns."""
    grid = kit.tile_with_labels(pictures, labels, per_row=8 if len(pictures) > 16 else 4, margin=5)
    return grid[..., 0] if grid.shape[-1] == 1 else grid


def _note_ignored(params, context) -> None:
    """Say which options given have no effect with the others."""
    ignored = []
    if params["classes"] and params["objective"] != "class":
        ignored.append("classes (only for objective=class)")
    if params["layers"] and params["objective"] == "class":
        ignored.append("layers (a class objective runs the whole model)")
    if params["diversity"] != DIVERSITY and params["variants"] == 1:
        ignored.append("diversity (only with variants > 1)")
    if ignored:
        context.note("ignored: " + "; ".join(ignored))


def run(context) -> list[Artifact]:
    params = context.params
    paths, why = _layer_paths(context.model, params)
    if why:
        context.note(f"layers: {why}")
    if not paths:
        raise ValueError("the model has no convolution layers")
    _note_ignored(params, context)
    precision = _precision(params["precision"], context)
    graph = _in_precision(context.model, precision)  # one copy for every layer
    variants = params["variants"]
    common = {
        key: params[key] for key in ("steps", "step", "optimizer", "transforms", "seed", "batch", "variants", "diversity")
    } | {
        "size": pattern_size(params, graph), "preprocess": context.preprocess, "progress": context.progress,
        "precision": precision,
    }
    chosen = params["param"] or ("fourier" if params["objective"] == "class" else "pixel")
    params_shown = ("pixel", "fourier") if chosen == "both" else (chosen,)
    spread = f", {variants} per filter pushed apart by diversity {params['diversity']:g}" if variants > 1 else ""
    artifacts: list[Artifact] = []
    if params["objective"] == "class":
        classes = _classes(params, graph, context.labels)
        each = np.repeat(classes, variants)
        scorer = _at_size(graph, common["size"], None)
        for param in params_shown:
            pictures, pixels = class_patterns(graph, classes, param=param, **common)
            seen = kit.class_scores(scorer, context.preprocess(pixels), batch=params["batch"])[np.arange(len(each)), each]
            labels = [f"{kit.describe_class(c, context.labels)} {p:.2f}" for c, p in zip(each, seen)]
            artifacts.append(Artifact(
                title=f"classes ({param})", array=pictures, picture=_grid(pictures, labels),
                caption=f"{_describe(param, params, precision)}{spread}; under each, the class and the model's "
                "probability of it for that image",
            ))
        return artifacts
    for path in paths:  # a layer's pixel and fourier grids next to each other
        for param in params_shown:
            pictures, _ = filter_patterns(graph, path, filters=params["count"], param=param,
                                          objective=params["objective"], **common)
            indices = np.repeat(np.arange(len(pictures) // variants), variants)
            artifacts.append(Artifact(
                title=f"{path} ({param})" if chosen == "both" else path,
                array=pictures, picture=_grid(pictures, [str(i) for i in indices]), layer=path,
                caption=f"filters 0-{indices[-1]} by their {params['objective']} objective, "
                f"{_describe(param, params, precision)}{spread}",
            ))
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
        variants = params["variants"]
        targets = len(_classes(params, graph, context.labels)) if params["objective"] == "class" else params["count"]
        current = {"size": pattern_size(params, graph), "batch": params["batch"], "count": targets}
        defaults = {option.name: option.default for option in TECHNIQUE.options}
        baseline = defaults | {"size": pattern_size(params | {"size": None}, graph)}

        def needs(**changed) -> float:
            values = current | changed
            return memory_needed(graph, paths, values["count"], values["size"], values["batch"], variants)[0]

        needed = needs()
        if needed <= kit.memory_budget():
            return
        growth = {key: needed / needs(**{key: min(current[key], baseline[key])}) for key in SIZING}
        if max(SIZING, key=growth.__getitem__) != name:
            return
        what = memory_needed(graph, paths, current["count"], current["size"], current["batch"], variants)[1]
        minimum = int(next(option.minimum for option in TECHNIQUE.options if option.name == name))
        kit.check_memory(value, lambda v: needs(**{name: v}), what, OTHER_FIX[name], low=minimum)

    return check


TECHNIQUE = Technique(
    name="filters",
    run=run,
    description="The input pattern each filter of a conv layer responds to most, by gradient ascent.",
    accepts=kit.conv_layer,
    options=(
        kit.layers_option("filters", kit.conv_layer, "conv layers (comma list); default: first conv of each block"),
        Option("objective", str, "channel", "what a pattern maximizes: a filter's mean activation (channel, the chapter's), "
               "the filter at the centre position (neuron), or a class's logit (class)", choices=OBJECTIVES,
               check=_check_objective),
        Option("param", str, None, "pixel: the chapter's ascent on the pixels (default for filters); fourier: Olah et "
               "al.'s decorrelated Fourier image with transformation robustness (default for classes); both: each, side "
               "by side", choices=("pixel", "fourier", "both")),
        Option("count", int, 64, "filters per layer (or classes), from the first", minimum=1, check=_check_memory("count")),
        Option("classes", list, None, "for objective=class: class indices or labels (comma list); default: the first count",
               check=lambda value, context: _classes(context.params, context.model, context.labels)),
        Option(
            "size", int, None, "pattern size in pixels (any size, even on models with a fixed input); default 150, for "
            "classes the model's input size; at most what fits in memory", minimum=8, maximum=4096, check=_check_memory("size"),
        ),
        Option("steps", int, None, "ascent steps; default 40 for pixel (the chapter), 128 for fourier (256 for classes)", minimum=0),
        Option("step", float, None, "step size: on the RMS-normalized gradient (normalized, default 1.0) or Adam's "
               "learning rate (adam, default 0.05)", minimum=0),
        Option("optimizer", str, None, "normalized (the chapter's, pixel's default) or adam (fourier's default)",
               choices=tuple(featureviz.OPTIMIZERS)),
        Option("transforms", str, None, "none (pixel's default) or standard: random jitter, scale and rotation at every "
               "step, seeded (fourier's default)", choices=("none", "standard")),
        Option("variants", int, 1, "patterns per filter or class, pushed apart by the diversity term", minimum=1),
        Option("diversity", float, DIVERSITY, "weight of Lucid's diversity term when variants > 1", minimum=0),
        Option("precision", str, "float32", "float32, or bfloat16/float16 where the hardware computes them faster "
               "(else noted and float32 used)", choices=featureviz.PRECISIONS),
        Option("seed", int, 0, "seed of the start and of the transforms"),
        Option("batch", int, 16, "patterns optimized together in one batch", minimum=1, check=_check_memory("batch")),
    ),
)


@hookimpl
def register_techniques(register):
    register(TECHNIQUE)
