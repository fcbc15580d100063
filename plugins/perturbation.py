"""occlusion and rise: where the class score comes from, by hiding parts of the image.

Both are black-box methods: they only score perturbed copies of an image (no gradients),
so they work on any classifier. The copies are made in pixel space (0-255, before the
model's preprocessing), every image's copies are scored in forward passes of
``per_pass`` (one compiled function, ``kit.class_scores``), and an image's map depends
only on that image and the options: the same whatever else is in the batch.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Callable, Iterator, Sequence

import numpy as np

import vizkit
from vizkit import Artifact, Option, Technique, hookimpl, kit

if TYPE_CHECKING:
    from vizkit import ModelGraph, RunContext

Masks = Callable[[int, int], np.ndarray]  # masks(start, stop) -> (stop - start)×H×W in [0, 1], 1 = kept


def _identity(x):
    return x


# -- shared: scoring masked copies of one image -------------------------------------------


def target_scores(
    graph: ModelGraph, pixels: np.ndarray, preprocess, classes: int | Sequence[int] | None, score: str
) -> tuple[np.ndarray, np.ndarray]:
    """(scores, classes): each image's score S_c(x) for its class c (its top-1 by default).

    One image per pass, so S_c(x) does not depend on the batch (to the last bit)."""
    scores = np.concatenate([kit.class_scores(graph, np.asarray(preprocess(image[None])), score) for image in pixels])
    targets = kit.target_classes(scores, classes)
    return scores[np.arange(len(scores)), targets], targets


def masked_scores(
    graph: ModelGraph, image: np.ndarray, masks: Masks, count: int, target: int,
    preprocess, score: str, per_pass: int, fill: float = 0.0,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield (keep, scores) per forward pass: ``per_pass`` masks (k×H×W, 1 = pixel kept)
    and the class score S_c of each copy ``image·keep + fill·(1 − keep)``.

    The copies are built by broadcasting, made in pixel space and then preprocessed, as the
    model sees a real photo with that part hidden. Chunks never mix images, so an image's
    result does not depend on the batch it came in.
    """
    for start in range(0, count, per_pass):
        keep = masks(start, min(count, start + per_pass))[..., None]
        copies = image[None] * keep + fill * (1 - keep)
        scores = kit.class_scores(graph, np.asarray(preprocess(copies)), score, batch=per_pass)
        yield keep[..., 0], scores[:, target]


def _graph_and_pixels(model, pixels) -> tuple[ModelGraph, np.ndarray]:
    pixels = np.asarray(pixels, dtype="float32")
    if pixels.ndim != 4:
        raise ValueError(f"expected a batch of images N×H×W×C, got shape {pixels.shape}")
    return vizkit.ModelGraph.of(model), pixels


# -- occlusion ------------------------------------------------------------------------------


def default_patch(height: int, width: int) -> int:
    """1/8 of the shorter side (28 px at 224): the size of an object part."""
    return max(1, round(min(height, width) / 8))


def patch_starts(size: int, patch: int, stride: int) -> np.ndarray:
    """Patch offsets along one side: every ``stride``, plus one flush with the far edge so
    every pixel is covered (stride ≤ patch)."""
    starts = np.arange(0, size - patch + 1, stride)
    return starts if starts[-1] == size - patch else np.append(starts, size - patch)


def _covered(size: int, patch: int, stride: int) -> np.ndarray:
    """P×size float32: 1 where patch p covers the pixel, along one side."""
    starts = patch_starts(size, patch, stride)[:, None]
    pixel = np.arange(size)[None]
    return ((pixel >= starts) & (pixel < starts + patch)).astype("float32")


def _occlusion_geometry(height: int, width: int, patch: int | None, stride: int | None) -> tuple[int, int]:
    patch = patch or default_patch(height, width)
    stride = stride or max(1, patch // 2)
    if patch > min(height, width):
        raise ValueError(f"patch {patch} is larger than the input ({height}×{width})")
    if stride > patch:
        raise ValueError(f"stride {stride} is larger than the patch {patch}: some pixels would never be hidden")
    return patch, stride


def occlusion(
    model, pixels: np.ndarray, preprocess=_identity, patch: int | None = None, stride: int | None = None,
    fill: float = 128.0, classes: int | Sequence[int] | None = None, score: str = "probability", per_pass: int = 64,
) -> tuple[np.ndarray, np.ndarray]:
    """(maps, classes): occlusion sensitivity (Zeiler & Fergus 2014) of 0-255 ``pixels``
    (N×H×W×C), N×H×W float32, signed.

    A ``patch``×``patch`` square of value ``fill`` slides over the image every ``stride``
    pixels; each pixel's value is the mean, over the patches covering it, of the score
    drop S_c(x) − S_c(x with the patch hidden). Positive: hiding it lowers the class
    score. ``patch`` defaults to 1/8 of the shorter side, ``stride`` to half the patch.
    """
    graph, pixels = _graph_and_pixels(model, pixels)
    height, width = pixels.shape[1:3]
    patch, stride = _occlusion_geometry(height, width, patch, stride)
    rows, cols = _covered(height, patch, stride), _covered(width, patch, stride)
    row_of, col_of = np.divmod(np.arange(len(rows) * len(cols)), len(cols))

    def keep(start: int, stop: int) -> np.ndarray:
        return 1 - rows[row_of[start:stop], :, None] * cols[col_of[start:stop], None, :]

    base, targets = target_scores(graph, pixels, preprocess, classes, score)
    covering = np.outer(rows.sum(axis=0), cols.sum(axis=0))  # patches per pixel, ≥ 1
    maps = np.zeros((len(pixels), height, width), dtype="float64")
    for n, image in enumerate(pixels):
        for kept, scores in masked_scores(graph, image, keep, len(row_of), targets[n], preprocess, score, per_pass, fill):
            maps[n] += np.tensordot(base[n] - scores, 1 - kept, axes=1)
    return (maps / covering).astype("float32"), targets


# -- RISE -------------------------------------------------------------------------------------


def _mirror(index: np.ndarray, size: int) -> np.ndarray:
    """Indices reflected about the edge pixels (d c b | a b c d | c b a), as skimage's
    ``mode="reflect"`` that the RISE authors resize with."""
    if size == 1:
        return np.zeros_like(index)
    period = 2 * (size - 1)
    index = np.abs(index) % period
    return np.where(index >= size, period - index, index)


def upsampling_matrix(size: int, out: int) -> np.ndarray:
    """out×size float32: bilinear (linear along one axis) resize of ``size`` cells to
    ``out`` pixels, pixel centres aligned as in skimage and OpenCV, edges mirrored."""
    source = (np.arange(out) + 0.5) * size / out - 0.5
    low = np.floor(source).astype("int64")
    high_weight = source - low
    matrix = np.zeros((out, size), dtype="float64")
    for index, weight in ((low, 1 - high_weight), (low + 1, high_weight)):
        np.add.at(matrix, (np.arange(out), _mirror(index, size)), weight)
    return matrix.astype("float32")


def rise_masks(count: int, grid: int, p: float, height: int, width: int, seed: int) -> Masks:
    """``masks(start, stop)``: RISE's random masks (Petsiuk et al. 2018), drawn from
    ``np.random.default_rng(seed)``: binary s×s grids (1 with probability p), then the
    grids upsampled bilinearly to (s+1)·C (C = ⌈H/s⌉ per axis) and cropped to H×W at a
    random shift in [0, C). All draws happen up front, so a mask does not depend on how
    the masks are chunked; the upsampling, separable, is a batched matrix product."""
    rng = np.random.default_rng(seed)
    cells = (math.ceil(height / grid), math.ceil(width / grid))
    grids = (rng.random((count, grid, grid)) < p).astype("float32")
    shifts = rng.integers(0, cells, size=(count, 2))
    up_rows = upsampling_matrix(grid, (grid + 1) * cells[0])
    up_cols = upsampling_matrix(grid, (grid + 1) * cells[1])

    def masks(start: int, stop: int) -> np.ndarray:
        rows = up_rows[shifts[start:stop, :1] + np.arange(height)]  # k×H×s
        cols = up_cols[shifts[start:stop, 1:] + np.arange(width)]  # k×W×s
        return rows @ grids[start:stop] @ cols.transpose(0, 2, 1)

    return masks


def rise(
    model, pixels: np.ndarray, preprocess=_identity, masks: int = 500, grid: int = 8, p: float = 0.5, seed: int = 0,
    classes: int | Sequence[int] | None = None, score: str = "probability", per_pass: int = 64,
) -> tuple[np.ndarray, np.ndarray]:
    """(saliency, classes): RISE (Petsiuk et al. 2018) of 0-255 ``pixels`` (N×H×W×C),
    N×H×W float32.

    The Monte Carlo estimate of the paper: Σ_i S_c(x ⊙ M_i) · M_i / (N · p) over N random
    masks M_i (see :func:`rise_masks`); x ⊙ M blacks out the masked pixels (0 in pixel
    space), as the paper masks the image. Every image gets the same masks (seeded by
    ``seed``), so its saliency depends only on the image and the options.
    """
    graph, pixels = _graph_and_pixels(model, pixels)
    height, width = pixels.shape[1:3]
    _, targets = target_scores(graph, pixels, preprocess, classes, score)
    drawn = rise_masks(masks, grid, p, height, width, seed)  # what default_rng(seed) gives any image of this size
    maps = np.zeros((len(pixels), height, width), dtype="float64")
    for n, image in enumerate(pixels):
        for kept, scores in masked_scores(graph, image, drawn, masks, targets[n], preprocess, score, per_pass):
            maps[n] += np.tensordot(scores, kept, axes=1)
    return (maps / (masks * p)).astype("float32"), targets


# -- the techniques ---------------------------------------------------------------------------


def _check_patch(value: int, context: RunContext) -> None:
    size = context.model.fixed_size
    if size and value > min(size):
        raise ValueError(f"patch {value} is larger than the input {size[0]}×{size[1]}")


def _check_stride(value: int, context: RunContext) -> None:
    size = context.model.fixed_size
    patch = context.params.get("patch") or (default_patch(*size) if size else None)
    if patch and value > patch:
        raise ValueError(f"stride {value} is larger than the patch {patch}: some pixels would never be hidden")


def _check_grid(value: int, context: RunContext) -> None:
    size = context.model.fixed_size
    if size and value > min(size):
        raise ValueError(f"a {value}×{value} grid is finer than the input {size[0]}×{size[1]}")
    masks = context.params["masks"]
    kit.check_memory(value, lambda grid: masks * _grid_bytes(grid), f"for {masks} random grids, drawn up front", "fewer masks")


#: RISE's default number of masks and grid side.
MASKS, GRID = 500, 8


def _grid_bytes(grid: int) -> int:
    """The memory of one RISE mask's draws (rise_masks): its grid as float64, bool and float32, its shift."""
    return grid * grid * 13 + 16


def _check_masks(value: int, context: RunContext) -> None:
    grid = context.params["grid"]
    if value / MASKS < _grid_bytes(grid) / _grid_bytes(GRID) or _grid_bytes(grid) > kit.memory_budget():
        return  # the grid grew more than the masks over their defaults: its check says what fits
    kit.check_memory(value, lambda masks: masks * _grid_bytes(grid), f"for {grid}×{grid} random grids, drawn up front", "a coarser grid")


def _copies(context: RunContext) -> int | None:
    """Perturbed copies of each image: RISE's masks, occlusion's patch positions (known
    where the model's input size is); None where unknown."""
    params, size = context.params, context.model.fixed_size
    if "masks" in params:
        return params["masks"]
    if not size:
        return None
    try:
        patch, stride = _occlusion_geometry(*size, params["patch"], params["stride"])
    except ValueError:
        return None  # the patch and stride checks say why
    return len(patch_starts(size[0], patch, stride)) * len(patch_starts(size[1], patch, stride))


def _check_per_pass(value: int, context: RunContext) -> None:
    """A forward pass holds its copies (the mask, the copy, its preprocessed input) and
    their activations: at most what fits (more than an image has copies changes nothing)."""
    graph, copies = context.model, _copies(context)
    image = kit.image_bytes(graph)
    per_copy = kit.activation_bytes(graph) + 2 * image + image // graph.channels
    kit.check_memory(value, lambda n: min(n, copies or n) * per_copy, "for the copies and their activations")


def _score(context: RunContext) -> str:
    return kit.usable_score(context.model, context.params["score"])[0]


def _prepare(name: str, describe: Callable[[RunContext], str]) -> Callable[[RunContext], None]:
    def prepare(context: RunContext) -> None:
        kit.require_classifier(context.model, name)
        context.note(describe(context))
        _, note = kit.usable_score(context.model, context.params["score"])
        if note:
            context.note(note)

    return prepare


def _describe_occlusion(context: RunContext) -> str:
    params, size = context.params, context.model.fixed_size
    if size:
        patch, stride = _occlusion_geometry(*size, params["patch"], params["stride"])
        copies = len(patch_starts(size[0], patch, stride)) * len(patch_starts(size[1], patch, stride))
        geometry = f"patch {patch} px, stride {stride} px: {copies} occluded copies per image"
    else:
        geometry = "patch 1/8 of the shorter side, stride half the patch"
    return (
        f"{geometry}, hidden pixels set to {params['fill']:g} (0-255, before preprocessing). "
        "Array: the signed score drop per pixel (H×W); shown: its positive part, divided by its maximum."
    )


def _describe_rise(context: RunContext) -> str:
    params = context.params
    return (
        f"{params['masks']} masks on a {params['grid']}×{params['grid']} grid, p = {params['p']:g}, "
        f"seed {params['seed']}; masked pixels are black (0 before preprocessing). "
        "Array: the saliency Σ S_c(x ⊙ M_i) M_i / (N p) (H×W); shown: scaled to [0, 1] between its "
        "minimum and maximum (it is an expected score, positive everywhere)."
    )


def run_occlusion(context: RunContext, batch) -> list[Artifact]:
    params = context.params
    context.progress(f"{len(batch)} image(s)")
    maps, classes = occlusion(
        context.model, batch.pixels, context.preprocess, params["patch"], params["stride"], params["fill"],
        kit.resolve_class(context), _score(context), params["per_pass"],
    )
    return kit.heatmap_artifacts(context, batch, kit.normalize_heatmap(maps), classes, arrays=maps)


def run_rise(context: RunContext, batch) -> list[Artifact]:
    params = context.params
    context.progress(f"{len(batch)} image(s)")
    maps, classes = rise(
        context.model, batch.pixels, context.preprocess, params["masks"], params["grid"], params["p"], params["seed"],
        kit.resolve_class(context), _score(context), params["per_pass"],
    )
    shifted = maps - maps.min(axis=(1, 2), keepdims=True)
    return kit.heatmap_artifacts(context, batch, kit.normalize_heatmap(shifted), classes, arrays=maps)


def _shared_options(per_pass_help: str) -> tuple[Option, ...]:
    return (
        kit.class_option(),
        kit.score_option("probability", "class score compared: probability (the papers) or logit"),
        Option("per_pass", int, 64, per_pass_help, minimum=1, check=_check_per_pass),
        kit.top_option(),
        *kit.overlay_options(),
        kit.batch_option(8),
    )


OCCLUSION = Technique(
    name="occlusion",
    run_batch=run_occlusion,
    prepare=_prepare("occlusion", _describe_occlusion),
    description=(
        "Occlusion sensitivity (Zeiler & Fergus 2014): how much the class score drops when a gray "
        "square hides each part of the image; all occluded copies scored in batches."
    ),
    comparable=True,
    by_default=False,
    options=(
        Option("patch", int, None, "side of the square patch in input pixels; default: 1/8 of the shorter side", minimum=1, check=_check_patch),
        Option("stride", int, None, "step between patches in pixels, at most the patch; default: half the patch", minimum=1, check=_check_stride),
        Option("fill", float, 128.0, "value of the hidden pixels, 0-255 before preprocessing (128: the paper's gray)", minimum=0, maximum=255),
        *_shared_options("occluded copies per forward pass"),
    ),
)

RISE = Technique(
    name="rise",
    run_batch=run_rise,
    prepare=_prepare("RISE", _describe_rise),
    description=(
        "RISE (Petsiuk et al. 2018): the class score of randomly masked copies, averaged per pixel "
        "over the masks that keep it; seeded random masks, scored in batches."
    ),
    comparable=True,
    by_default=False,
    options=(
        Option("masks", int, MASKS, "number of random masks N (at most what fits in memory)", minimum=1, check=_check_masks),
        Option("grid", int, GRID, "masks are drawn on an s×s grid, then upsampled", minimum=1, maximum=4096, check=_check_grid),
        Option("p", float, 0.5, "probability that a grid cell is kept", minimum=0.01, maximum=1),
        Option("seed", int, 0, "seed of the masks (the same for every image)", minimum=0),
        *_shared_options("masked copies per forward pass"),
    ),
)


TECHNIQUES = (OCCLUSION, RISE)


@hookimpl
def register_techniques(register):
    for technique in TECHNIQUES:
        register(technique)
