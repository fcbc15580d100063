"""The helpers a technique plugin needs, public so that no plugin reaches into vizkit's insides.

The built-in techniques use exactly these. Importing this module is cheap: OpenCV and
TensorFlow load on first use, so a plugin can import it at the top and still be listed
by ``vizkit plugins`` in a blink. ``docs/api.md`` documents each name.
"""

from __future__ import annotations

import math
import os
import weakref
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np

from vizkit.files import atomic_path
from vizkit.importing import import_object
from vizkit.labels import class_index, describe_class, describe_predictions, imagenet_labels
from vizkit.models import guess_preprocess
from vizkit.preprocess import resolve as preprocessor
from vizkit.samples import sample_photos
from vizkit.technique import Artifact, Option

if TYPE_CHECKING:
    from vizkit.graph import ModelGraph
    from vizkit.layers import LayerInfo
    from vizkit.technique import Batch, RunContext

__all__ = [
    "COLORMAPS", "atomic_path", "guess_preprocess", "import_object", "preprocessor", "SCORES", "batch_option", "class_index", "class_option", "class_scores", "colorize", "conv_layer",
    "conv_layers", "deprocess_pattern", "describe_class", "describe_predictions", "explainable_layer", "explanation_map",
    "feature_map_layer", "gray_picture", "heatmap_artifacts", "heatmap_picture", "per_model", "overlay_options", "attribution_map", "imagenet_labels", "input_gradients", "last_feature_map_layer",
    "layer_gradients", "layer_option", "layers_option", "memory_budget", "check_memory", "activation_bytes", "image_bytes", "normalize_heatmap", "overlay_heatmap", "require_classifier",
    "resize", "resolve_class", "sample_photos", "score_option", "side_by_side", "spearman", "spread_evenly", "ssim", "standardize_channels",
    "target_classes", "tile", "tile_with_labels", "top_option", "usable_score",
]

#: Colormap names accepted by :func:`colorize` and :func:`overlay_heatmap` (OpenCV's).
COLORMAPS = ("jet", "turbo", "inferno", "magma", "plasma", "viridis", "hot", "bone")
#: What a gradient technique differentiates: the pre-softmax logit (the Grad-CAM paper,
#: today's libraries) or the model's output probability (the chapter).
SCORES = ("logit", "probability")


# -- pictures ----------------------------------------------------------------------------


def standardize_channels(activation: np.ndarray) -> np.ndarray:
    """Feature maps (H×W×C) as uint8 C×H×W, as the chapter shows each: (x − mean) / std × 64
    + 128, clipped, per channel. A constant channel (std = 0) comes out flat gray, not NaN."""
    x = np.moveaxis(activation.astype("float64"), -1, 0)
    x = x - x.mean(axis=(1, 2), keepdims=True)
    std = x.std(axis=(1, 2), keepdims=True)
    x = np.divide(x, std, out=x, where=std > 0)
    return np.clip(x * 64 + 128, 0, 255).astype("uint8")


def deprocess_pattern(x: np.ndarray) -> np.ndarray:
    """The chapter's deprocess of a filter pattern: center, std → 0.1, +0.5, clip, ×255."""
    x = x.astype("float64") - x.mean()
    x /= x.std() + 1e-5
    x = np.clip(x * 0.1 + 0.5, 0, 1)
    return np.clip(x * 255, 0, 255).astype("uint8")


def tile(pictures: np.ndarray, per_row: int, margin: int = 0, fill: int = 0) -> np.ndarray:
    """Lay N same-sized pictures (N×H×W or N×H×W×C) out in rows of ``per_row``."""
    count, height, width = pictures.shape[:3]
    rest = pictures.shape[3:]
    per_row = max(1, min(per_row, count))
    rows = -(-count // per_row)
    cells = np.full((rows * per_row, height + margin, width + margin) + rest, fill, dtype=pictures.dtype)
    cells[:count, :height, :width] = pictures
    grid = cells.reshape((rows, per_row, height + margin, width + margin) + rest).swapaxes(1, 2)
    grid = grid.reshape((rows * (height + margin), per_row * (width + margin)) + rest)
    return grid[: grid.shape[0] - margin, : grid.shape[1] - margin]


def tile_with_labels(pictures: np.ndarray, labels: Sequence[str], per_row: int, margin: int = 5) -> np.ndarray:
    """:func:`tile` (black margins) with each picture's label written in white on a black
    strip under it (a filter's index, a class name), shrunk or cut with "..." to fit;
    non-ASCII characters become "?" (OpenCV's fonts have no others)."""
    import cv2

    count, height, width = pictures.shape[:3]
    if len(labels) != count:
        raise ValueError(f"{len(labels)} labels for {count} pictures")
    strip = max(10, min(18, height // 8))
    cells = np.zeros((count, height + strip, width) + pictures.shape[3:], dtype=np.uint8)
    cells[:, :height] = pictures
    font, white = cv2.FONT_HERSHEY_SIMPLEX, (255,) * (pictures.shape[3] if pictures.ndim == 4 else 1)
    for cell, label in zip(cells, labels):
        text = str(label).encode("ascii", "replace").decode()
        scale = (strip - 4) / 22  # the font's cap height is about 22 px at scale 1
        while len(text) > 1 and cv2.getTextSize(text, font, scale, 1)[0][0] > width - 4:
            text = text[:-4] + "..." if len(text) > 4 else text[:-1]
        cv2.putText(cell, text, (2, height + strip - 3), font, scale, white, 1, cv2.LINE_AA)
    return tile(cells, per_row, margin, 0)


def normalize_heatmap(heatmap: np.ndarray) -> np.ndarray:
    """Negative values cut to 0, then each map (the last two axes) divided by its maximum.

    Grad-CAM's normalization; for a signed attribution, pass ``np.abs(attribution)``.
    A map with no positive value stays all zero instead of becoming NaN.
    """
    positive = np.maximum(np.asarray(heatmap, dtype="float32"), 0)
    peaks = positive.max(axis=(-2, -1), keepdims=True) if positive.size else positive
    return np.divide(positive, peaks, out=np.zeros_like(positive), where=peaks > 0)


def resize(array: np.ndarray, height: int, width: int, interpolation: str = "bilinear") -> np.ndarray:
    """An H×W or H×W×C array resized to ``height``×``width`` (bilinear, nearest or area)."""
    import cv2

    modes = {"bilinear": cv2.INTER_LINEAR, "nearest": cv2.INTER_NEAREST, "area": cv2.INTER_AREA}
    if interpolation not in modes:
        raise ValueError(f"interpolation {interpolation!r} is not one of {', '.join(modes)}")
    source = np.asarray(array)
    dtype = source.dtype if source.dtype == np.uint8 else np.dtype("float32")
    return cv2.resize(source.astype(dtype, copy=False), (int(width), int(height)), interpolation=modes[interpolation])


def colorize(heatmap: np.ndarray, colormap: str = "jet") -> np.ndarray:
    """A map in [0, 1] (H×W) as an RGB uint8 picture through an OpenCV colormap."""
    import cv2

    if colormap not in COLORMAPS:
        raise ValueError(f"colormap {colormap!r} is not one of {', '.join(COLORMAPS)}")
    code = getattr(cv2, f"COLORMAP_{colormap.upper()}")
    colored = cv2.applyColorMap(np.uint8(255 * np.clip(heatmap, 0, 1)), code)
    return cv2.cvtColor(colored, cv2.COLOR_BGR2RGB)


#: The heatmap's weight when none is given, by overlay mode: an even blend, and the chapter's 0.4.
_ALPHA = {"blend": 0.5, "add": 0.4}


def overlay_heatmap(
    image: np.ndarray, heatmap: np.ndarray, alpha: float | None = None, mode: str = "blend", colormap: str = "jet"
) -> np.ndarray:
    """A heatmap in [0, 1], resized to ``image`` (uint8 H×W or H×W×3) and colored, over it.

    ``mode="blend"`` (the default) mixes ``(1 − alpha) × image + alpha × colored``, so the
    photo stays readable; ``mode="add"`` is the chapter's overlay, ``colored × alpha +
    image`` clipped (bright photos wash out). ``alpha`` None: 0.5 to blend, the chapter's
    0.4 to add.
    """
    if mode not in _ALPHA:
        raise ValueError(f"overlay mode {mode!r} is not add or blend")
    alpha = _ALPHA[mode] if alpha is None else alpha
    rgb = np.repeat(image[..., None], 3, axis=-1) if image.ndim == 2 else image[..., :3]
    colored = colorize(resize(heatmap, *rgb.shape[:2]), colormap).astype("float32")
    if mode == "add":
        mixed = colored * alpha + rgb
    else:
        mixed = (1 - alpha) * rgb.astype("float32") + alpha * colored
    return np.clip(mixed, 0, 255).astype("uint8")


def gray_picture(heatmap: np.ndarray, height: int | None = None, width: int | None = None) -> np.ndarray:
    """A map in [0, 1] as a uint8 gray picture, resized (nearest: pixels stay visible) if asked."""
    shown = np.clip(np.asarray(heatmap, dtype="float32"), 0, 1)
    if height is not None and width is not None:
        shown = resize(shown, height, width, "nearest")
    return np.uint8(np.round(255 * shown))


def side_by_side(pictures: Sequence[np.ndarray], gap: int = 4, fill: int = 255) -> np.ndarray:
    """uint8 pictures (gray or RGB) in one row, top-aligned, ``gap`` pixels apart."""
    rgb = [np.repeat(p[..., None], 3, axis=-1) if p.ndim == 2 else p for p in pictures]
    height = max(p.shape[0] for p in rgb)
    width = sum(p.shape[1] for p in rgb) + gap * (len(rgb) - 1)
    out = np.full((height, width, 3), fill, dtype=np.uint8)
    left = 0
    for picture in rgb:
        out[: picture.shape[0], left : left + picture.shape[1]] = picture
        left += picture.shape[1] + gap
    return out


# -- layers ------------------------------------------------------------------------------


def feature_map_layer(info: "LayerInfo") -> bool:
    """A layer with an H×W×C output (a nested model counts as its layers, not itself)."""
    return info.feature_map


def explainable_layer(info: "LayerInfo") -> bool:
    """A feature-map layer on the path to the output that is explained (CAM methods)."""
    return info.feature_map and info.feeds_output


def conv_layer(info: "LayerInfo") -> bool:
    return info.conv


def conv_layers(graph: "ModelGraph") -> list[str]:
    """Paths of the convolution layers, in order."""
    return [info.path for info in graph.layers if info.conv]


def spread_evenly(items: list[str], count: int) -> list[str]:
    """``count`` items evenly spaced from first to last (all of them if there are fewer)."""
    if count <= 0 or len(items) <= count:
        return list(items)
    picks = np.linspace(0, len(items) - 1, count).round().astype(int)
    return [items[i] for i in dict.fromkeys(picks)]


def last_feature_map_layer(graph: "ModelGraph") -> tuple[str, str]:
    """(path, why): the last feature-map layer before the classifier, pooling and 1×1 skipped.

    Grad-CAM's layer: ``block5_conv3`` on VGG16, as in the chapter; found inside nested
    models too.
    """
    for info in reversed(graph.layers):
        if explainable_layer(info) and not info.pooling and (info.shape[0] or 2) * (info.shape[1] or 2) > 1:
            return info.path, (
                "the last layer with an H×W×C output larger than 1×1 before the classifier "
                "(pooling layers skipped)"
            )
    raise ValueError("the model has no layer with an H×W×C output to explain; name one with the layer option")


# -- classes -----------------------------------------------------------------------------


def require_classifier(graph: "ModelGraph", technique: str) -> None:
    """ValueError unless the model gives one score per class (or one sigmoid unit); the
    message says what the output is instead (a regression, say)."""
    if not graph.is_classifier:
        message = (
            f"{technique} needs a classifier (output: one score per class, or one sigmoid unit); "
            f"{graph.name} outputs shape {graph.output_shape}"
        )
        if getattr(graph, "is_regression", False):  # not a classifier though its shape fits one
            message += (
                f" from {graph.output_name!r}, a {graph.output_kind}. A single unit counts as a "
                "binary classifier only where it ends in a sigmoid: if this one is a binary "
                "classifier's logit, end the model in keras.layers.Activation('sigmoid')"
            )
        raise ValueError(message)


def target_classes(scores: np.ndarray, classes: int | Sequence[int] | None = None) -> np.ndarray:
    """The class to explain for each row of ``scores`` (N × classes): the top-1 class, or
    ``classes`` (one for all, or one per row), checked against the number of classes."""
    scores = np.asarray(scores)
    if classes is None:
        return np.argmax(scores, axis=-1).astype("int32")
    return _checked_classes(classes, len(scores), scores.shape[-1])


# -- options shared by techniques --------------------------------------------------------


def layer_option(purpose: str, usable: Callable[["LayerInfo"], bool], help: str) -> Option:
    """A ``layer`` option checked against the model before the run (a usage error if it
    names no usable layer); None lets the technique choose."""

    def check(value: str, context: "RunContext") -> None:
        context.model.resolve(value, usable, purpose)

    return Option("layer", str, None, help, check=check)


def layers_option(purpose: str, usable: Callable[["LayerInfo"], bool], help: str) -> Option:
    """A ``layers`` option (a comma list), each checked like :func:`layer_option`'s."""

    def check(names: list[str], context: "RunContext") -> None:
        for name in names:
            context.model.resolve(name, usable, purpose)

    return Option("layers", list, [], help, check=check)


def _check_class(value: str, context: "RunContext") -> None:
    require_classifier(context.model, "a class option")
    class_index(value, context.labels, context.model.num_classes)


def class_option() -> Option:
    """A ``class`` option: an index or a label; default each image's top-1 class."""
    return Option("class", str, None, "class index or label to explain; default: each image's top-1 class", check=_check_class)


def resolve_class(context: "RunContext", option: str = "class") -> int | None:
    """The class the ``option`` names as an index, or None for each image's top-1."""
    value = context.params.get(option)
    return None if value is None else class_index(value, context.labels, context.model.num_classes)


def score_option(default: str = "logit", help: str | None = None) -> Option:
    """A ``score`` option: the class score explained, its logit or its probability."""
    return Option(
        "score", str, default,
        help or "what is differentiated: the class logit (the Grad-CAM paper) or its probability (the chapter)",
        choices=SCORES,
    )


def usable_score(graph: "ModelGraph", score: str) -> tuple[str, str | None]:
    """(score, note): ``score``, or ``probability`` with a note for the report where the
    model shows no logit to differentiate (it ends in no softmax, sigmoid or linear layer)."""
    if score == "logit" and not graph.has_logits:
        return "probability", "score: the model's output (it ends in no softmax or sigmoid whose logit could be taken)"
    return score, None


def overlay_options(alpha: float | None = None) -> tuple[Option, ...]:
    """``alpha``, ``overlay`` and ``colormap``: how a heatmap is laid over the photo, the
    same options for every heatmap technique so the comparison view can match them.
    ``alpha`` None (the default): 0.5 to blend, the chapter's 0.4 to add."""
    return (
        Option("alpha", float, alpha, "heatmap weight in the overlay" + (
            "; default 0.5 with blend, 0.4 (the chapter's) with add" if alpha is None else ""), minimum=0, maximum=1),
        Option("overlay", str, "blend", "blend: (1 − alpha) × photo + alpha × heatmap, the photo stays readable; "
               "add: the chapter's heatmap × alpha + photo, clipped (bright photos wash out)", choices=("blend", "add")),
        Option("colormap", str, "jet", "colormap of the heatmap", choices=COLORMAPS),
    )


def heatmap_picture(display: np.ndarray, heatmap: np.ndarray, params: dict) -> np.ndarray:
    """The picture of a heatmap in [0, 1] over a photo, as :func:`overlay_options` set it."""
    return overlay_heatmap(display, heatmap, params["alpha"], params["overlay"], params["colormap"])


def heatmap_artifacts(
    context: "RunContext",
    batch: "Batch",
    shown: np.ndarray,
    classes: Sequence[int] | None,
    arrays: np.ndarray | None = None,
    layer: str | None = None,
    captions: Sequence[str] | None = None,
) -> list["Artifact"]:
    """One artifact per image of a heatmap technique, as the built-ins make them.

    ``shown`` (N×h×w in [0, 1]) goes over each photo (``heatmap_picture``); ``arrays``
    (default ``shown``: the signed attribution, say) is what report.json and arrays.npz
    keep. Titled "image · class 285 Egyptian cat" (``classes`` None: class-agnostic), the
    caption lists the top predictions (the ``top`` option) and then ``captions[i]``. An
    all-zero map gets a note, so a blank picture is not mistaken for a bug.
    """
    params = context.params
    arrays = shown if arrays is None else arrays
    artifacts = []
    for index, image in enumerate(batch.images):
        explained = "class-agnostic" if classes is None else f"class {describe_class(int(classes[index]), context.labels)}"
        if not shown[index].any():
            context.note(f"{image.id}: the map is all zero ({explained})")
        caption = [describe_predictions(image.predictions[: params.get("top", 3)]), captions[index] if captions else ""]
        artifacts.append(
            Artifact(
                title=f"{image.id} · {explained}",
                array=np.ascontiguousarray(arrays[index], dtype="float32"),
                picture=heatmap_picture(image.display, shown[index], params),
                image_id=image.id,
                layer=layer,
                caption="; ".join(part for part in caption if part),
                target=None if classes is None else int(classes[index]),
            )
        )
    return artifacts


def attribution_map(attribution: np.ndarray, percentile: float = 99.0) -> np.ndarray:
    """A signed attribution (N×H×W×C or H×W×C) as the map shown: the largest |value| over
    the channels, capped at its ``percentile`` and divided by the cap, in [0, 1] (the
    SmoothGrad paper's display; a few extreme pixels would leave the rest black)."""
    magnitude = np.abs(np.asarray(attribution, dtype="float32")).max(axis=-1)
    caps = np.percentile(magnitude, percentile, axis=(-2, -1), keepdims=True).astype("float32")
    caps = np.where(caps > 0, caps, magnitude.max(axis=(-2, -1), keepdims=True))
    return np.clip(np.divide(magnitude, caps, out=np.zeros_like(magnitude), where=caps > 0), 0, 1)


# -- comparing maps (metrics, sanity checks, report comparisons) ------------------------


def explanation_map(array: np.ndarray, height: int | None = None, width: int | None = None) -> np.ndarray:
    """An artifact's array as one H×W float32 map that ranks pixels: a 2-D map as it is
    (a CAM, occlusion's score drops), a 3-D one (H×W×C attributions) as its largest
    |value| over the channels, as the report shows it, uncapped; resized bilinearly to
    ``height``×``width`` if given (a CAM at its layer's resolution, to the image's)."""
    values = np.asarray(array, dtype="float32")
    if values.ndim == 3:
        values = np.abs(values).max(axis=-1)
    if values.ndim != 2:
        raise ValueError(f"an explanation map is H×W or H×W×C, not shape {values.shape}")
    if height is not None and width is not None and values.shape != (height, width):
        values = resize(values, height, width, "bilinear")
    return values


def _ranks(values: np.ndarray) -> np.ndarray:
    """Ranks 1..n of a flat array, ties given their average rank (as Spearman's ρ needs)."""
    order = np.argsort(values, kind="stable")
    _, first, counts = np.unique(values[order], return_index=True, return_counts=True)
    average = first + (counts + 1) / 2.0
    ranks = np.empty(values.size, dtype="float64")
    ranks[order] = np.repeat(average, counts)
    return ranks


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rank correlation of two maps of one shape (ties averaged); 0 where one
    of them is constant (nothing to rank)."""
    a, b = np.ravel(a).astype("float64"), np.ravel(b).astype("float64")
    if a.shape != b.shape:
        raise ValueError(f"maps of {a.size} and {b.size} values cannot be compared")
    ra, rb = _ranks(a) - (a.size + 1) / 2.0, _ranks(b) - (b.size + 1) / 2.0
    scale = np.sqrt((ra * ra).sum() * (rb * rb).sum())
    return float((ra * rb).sum() / scale) if scale > 0 else 0.0


def ssim(a: np.ndarray, b: np.ndarray, sigma: float = 1.5) -> float:
    """Structural similarity (Wang et al. 2004) of two H×W maps, each scaled to [0, 1] by
    its own minimum and maximum first (maps of different methods have no common unit):
    a Gaussian window of ``sigma`` pixels, C1 = 0.01², C2 = 0.03², the mean over pixels."""
    import cv2

    def unit(x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype="float64")
        span = x.max() - x.min() if x.size else 0.0
        return (x - x.min()) / span if span > 0 else np.zeros_like(x)

    if np.shape(a) != np.shape(b) or np.ndim(a) != 2:
        raise ValueError(f"ssim compares two H×W maps of one shape, not {np.shape(a)} and {np.shape(b)}")
    x, y = unit(a), unit(b)
    blur = lambda z: cv2.GaussianBlur(z, (0, 0), sigma, borderType=cv2.BORDER_REFLECT)  # noqa: E731
    mx, my = blur(x), blur(y)
    vx, vy, cov = blur(x * x) - mx * mx, blur(y * y) - my * my, blur(x * y) - mx * my
    c1, c2 = 0.01**2, 0.03**2
    index = ((2 * mx * my + c1) * (2 * cov + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    return float(index.mean())


def top_option(default: int = 3) -> Option:
    """A ``top`` option: how many predictions a heatmap's caption lists."""
    return Option("top", int, default, "predictions listed per image", minimum=0)


def batch_option(default: int = 8) -> Option:
    """A ``batch`` option: images per ``run_batch`` call, at most what fits in memory
    (each image's pass with gradients, :func:`activation_bytes`)."""
    return Option("batch", int, default, "images per batch", minimum=1, check=_check_batch)


def _check_batch(value: int, context: "RunContext") -> None:
    per_image = activation_bytes(context.model, gradients=True)
    check_memory(value, lambda n: n * per_image, "for the images' activations and gradients")


# -- memory: bounds for options that size allocations ----------------------------------

# The side activation_bytes assumes for a model that takes any size: a run scales images
# down to 512 on their longest side (unless --size says otherwise).
_FREE_SIDE = 512
_REFERENCE_SIDE = 256  # where a free-size model's layer shapes are worked out


def _cgroup_limit() -> int | None:
    """The memory limit of this process's container (cgroup v2 or v1), None if none."""
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            with open(path, encoding="ascii") as file:
                text = file.read(64).strip()
        except (OSError, ValueError):
            continue
        if text.isdigit() and int(text) < 1 << 60:  # v1 writes a huge number for "no limit"
            return int(text)
    return None


def _memory() -> tuple[int | None, str]:
    """(bytes, what they are): the container's memory limit where there is a lower one,
    else the machine's physical memory; (None, …) where neither can be read."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, OSError, ValueError):  # not on every platform
        total = 0
    limit = _cgroup_limit()
    if limit and (total <= 0 or limit < total):
        return limit, "the container's memory limit"
    return (total, "this machine's memory") if total > 0 else (None, "")


def memory_budget() -> int:
    """Bytes that one technique's options may plan to hold at once: 3/4 of this machine's
    physical memory (``os.sysconf``), or of its container's limit where that is lower;
    8 GiB where neither can be read."""
    total, _ = _memory()
    return total * 3 // 4 if total else 8 << 30


def _bytes(count: float, digits: int = 1) -> str:
    """``1.5 GiB``: a byte count for a person."""
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if count < 1024 or unit == "PiB":
            return f"{count:.0f} {unit}" if unit == "bytes" else f"{count:.{digits}f} {unit}"
        count /= 1024
    raise AssertionError("unreachable")


def check_memory(value: int, needs: Callable[[int], float], what: str = "", fix: str = "", low: int = 1) -> None:
    """ValueError unless ``needs(value)`` bytes fit in :func:`memory_budget`: for an
    Option ``check``. ``needs`` must grow with the value; the message gives the bytes
    needed (``what`` says for what), the budget and the largest value from ``low`` up that
    fits (``use at most N``), then ``fix``, another way out."""
    budget = memory_budget()
    needed = needs(value)
    if needed <= budget:
        return
    total, where = _memory()
    digits = next((d for d in (1, 2, 3) if _bytes(needed, d) != _bytes(budget, d)), 3)  # 3.0 GiB > 3.0 GiB reads wrong
    said = (
        f"{value} needs about {_bytes(needed, digits)} of memory{' ' + what if what else ''}, more than the "
        f"{_bytes(budget, digits)} vizkit plans with" + (f" (3/4 of {where})" if total and budget == total * 3 // 4 else "")
    )
    if low >= value or needs(low) > budget:
        even = f"; even {low} needs {_bytes(needs(low))}" if low < value else ""
        raise ValueError(said + even + (f"; use {fix}" if fix else ""))
    fits, too_many = low, value  # bisection: needs(fits) fits, needs(too_many) does not
    while too_many - fits > 1:
        middle = (fits + too_many) // 2
        fits, too_many = (middle, too_many) if needs(middle) <= budget else (fits, middle)
    raise ValueError(f"{said}; use at most {fits}" + (f", or {fix}" if fix else ""))


def _floats_per_pixel(graph: "ModelGraph", upto: str | None) -> tuple[list[float], float]:
    """(floats per input pixel of each layer's output, largest first; floats of the
    outputs whose size does not depend on the input's) for one image, up to ``upto``:
    from the layers' shapes, or for a model that takes any size from their shapes at a
    reference side (worked out symbolically: nothing is computed)."""
    infos = list(graph.layers)
    if upto is not None:
        path = graph.resolve(upto)
        infos = infos[: next(i for i, info in enumerate(infos) if info.path == path) + 1]
    infos = [info for info in infos if not info.nested_model]  # its output is its last layer's
    spatial = [info for info in infos if info.spatial]
    constant = float(sum(math.prod(d or 1 for d in info.shape) for info in infos if not info.spatial))
    if graph.fixed_size:
        area = graph.fixed_size[0] * graph.fixed_size[1]
        shapes = [info.shape for info in spatial]
    else:
        area = _REFERENCE_SIDE**2
        try:
            import keras

            probe = graph.probe([info.path for info in spatial]) if spatial else None
            specs = probe.compute_output_spec(keras.KerasTensor((1, _REFERENCE_SIDE, _REFERENCE_SIDE, graph.channels))) if probe else []
            specs = specs if isinstance(specs, (list, tuple)) else [specs]
            shapes = [tuple(spec.shape[1:]) for spec in specs]
        except Exception:  # a layer Keras cannot infer shapes for: count the input alone
            shapes = []
    return sorted((math.prod(d or 1 for d in shape) / area for shape in shapes), reverse=True), constant


def image_bytes(graph: "ModelGraph") -> int:
    """The bytes of one float32 input image: at the model's input size, or 512×512 for a
    model that takes any size (a run's images are at most that, unless ``--size``)."""
    height, width = graph.fixed_size or (_FREE_SIDE, _FREE_SIDE)
    return 4 * height * width * graph.channels


def activation_bytes(graph: "ModelGraph", side: int | None = None, upto: str | None = None, gradients: bool = False) -> int:
    """About the memory of one image's pass through the model (up to and including the
    layer ``upto``), in bytes, for a ``side``×``side`` input (default: as :func:`image_bytes`).

    A forward pass: the input and the three largest layer outputs (TensorFlow frees an
    output once the layers after it have used it). With ``gradients``, a pass that also
    differentiates: the input, every layer's output (kept for the backward pass) and the
    gradient of the largest. Float32 outputs, scaled with the input's area; rough (models
    with batch normalization need less), for memory bounds (:func:`check_memory`)."""
    sizes, constant = per_model(graph, ("activation floats", upto), lambda: _floats_per_pixel(graph, upto))
    per_pixel = graph.channels + (sum(sizes) + sizes[0] if gradients else sum(sizes[:3])) if sizes else graph.channels
    if side is not None:
        area = side * side
    else:
        area = image_bytes(graph) // (4 * graph.channels)
    return int(4 * (per_pixel * area + constant))


# -- compiled forward and backward passes (TensorFlow loads here) -------------------------
#
# Each is one tf.function per (model, layer, score, ...), kept as long as the model's
# graph lives and traced once per input shape (reduce_retracing relaxes the batch size
# after the first change), so a technique calling them once per batch pays the tracing
# once per run.

_PER_MODEL: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def per_model(graph: "ModelGraph", key: tuple, build: Callable[[], Any]) -> Any:
    """``build()`` once per model graph and ``key``, kept as long as the graph lives: for a
    plugin's compiled functions and derived models (traced once, then reused per batch)."""
    made = _PER_MODEL.setdefault(graph, {})
    if key not in made:
        made[key] = build()
    return made[key]


def _targets(graph: "ModelGraph", count: int, classes: int | Sequence[int] | None) -> np.ndarray:
    """One class per image, checked; -1 stands for "the image's top-1 class"."""
    if classes is None:
        return np.full((count,), -1, dtype="int32")
    return _checked_classes(classes, count, graph.num_classes)


def _checked_classes(classes: int | Sequence[int], count: int, num_classes: int) -> np.ndarray:
    targets = np.broadcast_to(np.asarray(classes, dtype="int32"), (count,)).copy()
    outside = targets[(targets < 0) | (targets >= num_classes)]
    if outside.size:
        raise ValueError(f"class {int(outside[0])} is outside 0-{num_classes - 1}")
    return targets


def _chosen_scores(tf, scores, targets):
    """Each row's score for its target class (its top-1 where the target is -1)."""
    chosen = tf.where(targets < 0, tf.argmax(scores, axis=-1, output_type=tf.int32), targets)
    return chosen, tf.gather(scores, chosen, axis=1, batch_dims=1)


def layer_gradients(
    graph: "ModelGraph", inputs: np.ndarray, layer: str, classes: int | Sequence[int] | None = None, score: str = "logit"
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(features, gradients, classes) of a preprocessed batch: the layer's N×h×w×C output,
    the gradient of each image's class score with respect to it, and the classes used.

    The batch does not mix (inference mode), so one tape gives every image's own gradient.
    """
    import tensorflow as tf

    path = graph.resolve(layer)

    def build():
        probe = graph.probe([path], with_output=True, score=score)

        @tf.function(reduce_retracing=True)
        def run(x, targets):
            with tf.GradientTape() as tape:
                features, scores = probe(x, training=False)
                chosen, selected = _chosen_scores(tf, scores, targets)
            return features, tape.gradient(selected, features), chosen

        return run

    run = per_model(graph, ("layer", path, score), build)
    features, gradients, chosen = run(tf.convert_to_tensor(inputs, dtype=tf.float32), _targets(graph, len(inputs), classes))
    return features.numpy(), gradients.numpy(), chosen.numpy()


def input_gradients(
    graph: "ModelGraph",
    pixels: np.ndarray,
    classes: int | Sequence[int] | None = None,
    preprocess: Callable[[Any], Any] = lambda x: x,
    score: str = "logit",
) -> tuple[np.ndarray, np.ndarray]:
    """(gradients, classes): the gradient of each image's class score with respect to its
    0-255 pixels (N×H×W×C), through ``preprocess``, and the classes used."""
    import tensorflow as tf

    def build():
        model = graph.scores_model(score)

        @tf.function(reduce_retracing=True)
        def run(x, targets):
            with tf.GradientTape() as tape:
                tape.watch(x)
                chosen, selected = _chosen_scores(tf, model(preprocess(x), training=False), targets)
            return tape.gradient(selected, x), chosen

        return run

    run = per_model(graph, ("input", score, preprocess), build)
    gradients, chosen = run(tf.convert_to_tensor(pixels, dtype=tf.float32), _targets(graph, len(pixels), classes))
    return gradients.numpy(), chosen.numpy()


def class_scores(graph: "ModelGraph", inputs: np.ndarray, score: str = "probability", batch: int = 64) -> np.ndarray:
    """Scores per class (N × classes) of a preprocessed batch, ``batch`` rows per compiled
    forward pass: for perturbation methods that score many masked copies of an image."""
    import tensorflow as tf

    def build():
        model = graph.scores_model(score)
        return tf.function(lambda x: model(x, training=False), reduce_retracing=True)

    run = per_model(graph, ("scores", score), build)
    inputs = np.asarray(inputs, dtype="float32")
    parts = [run(tf.convert_to_tensor(inputs[i : i + batch])).numpy() for i in range(0, len(inputs), batch)]
    return np.concatenate(parts) if parts else np.zeros((0, graph.num_classes), dtype="float32")
