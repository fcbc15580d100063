"""faithfulness: deletion and insertion curves (Petsiuk et al. 2018, the RISE paper).

Does the map point at what the model uses? Rank the image's P = H·W pixels by the map,
highest first (ties in a seeded random order: a ReLU'd CAM is 0 over large areas, and
taking those row by row would delete the top of the image first), and take k + 1 steps i = 0..k, each touching the first n_i = round(i·P/k) pixels
(all channels of a pixel together):

* **deletion**: the image with its first n_i pixels replaced by the substrate;
* **insertion**: the substrate with the image's first n_i pixels revealed.

The curve is y_i = p_c(x_i), the model's probability of the explained class c (the
artifact's ``target``; an image's top-1 class for class-agnostic maps like Eigen-CAM), at
x = i/k, and its area is the trapezoid rule over [0, 1]: AUC = (Σ_i y_i − (y_0 + y_k)/2)/k.
A faithful map makes the probability fall fast when its pixels go (low deletion AUC) and
rise fast when they come back (high insertion AUC).

The numbers mean little alone (they depend on the model, the image and its score), so
each image also gets a **random baseline**: the same curves for a random map, seeded
(``seed`` and the image's sha256, so the same whatever the order of the images),
computed once per image and class and shared by every technique of the run. The random
map is shaped like a CAM: ``grid``×``grid`` uniform values (7: a CAM's resolution on a
224-pixel ImageNet model) upsampled bilinearly, so it removes connected regions as a
map does. A random order of single pixels would be the wrong yardstick: it scatters
the hidden pixels over the whole image, a salt-and-pepper texture no photo has, which
many models lose the class to faster than to the removal of any region, so every
region map would score "worse than chance" on deletion (Grad-CAM on EfficientNet-Lite0:
0.41 against 0.35, benchmarks/README.md). The same effect favours pixel-level
attributions (saliency, Integrated Gradients) on deletion: compare them on insertion.

**Substrate.** RISE deleted to black and inserted into a blurred copy of the image; vizkit
uses one substrate for both, so that both curves run between the same two scores, p_c(x)
and p_c(substrate), and can be compared: ``blur`` (default, RISE's insertion canvas),
``black`` (0 before preprocessing) or ``mean`` (each channel's mean of the image). The
blur is RISE's kernel: their ``gkern(klen=11, nsig=5)`` is ``scipy.ndimage.gaussian_filter``
of a unit impulse in an 11×11 window, a σ = 5 Gaussian cut at one σ, its tails folded
back by reflection (close to an 11-pixel box). vizkit builds the same kernel for any σ,
window 2·⌊σ + ½⌋ + 1 (exactly theirs at σ = 5), and scales σ with the image: 5 px per
224 px of the shorter side (0.71 px at 32 px) unless ``sigma`` says otherwise. Edges are
reflected (RISE padded with zeros, which darkens the border).

Every masked copy is built in pixel space (0-255, before preprocessing) from a rank
array compared with the thresholds n_i by broadcasting, ``per_pass`` copies at a time,
and scored by one compiled ``kit.class_scores`` pass; an image's copies never share a
pass with another image's, so its curves depend only on that image and the options.

In a notebook::

    from vizkit.plugins.faithfulness import auc, deletion_insertion
    deletion, insertion = deletion_insertion(model, pixels, maps, preprocess=preprocess)
    auc(deletion), auc(insertion)        # one number per image

``deletion_insertion(model, pixels, maps, classes=None, preprocess, steps=32,
substrate="blur", sigma=None, per_pass=64, seed=0)`` takes N×H×W×C 0-255 pixels and N maps
(h×w, resized bilinearly to H×W, or H×W×C attributions) and returns two N×(k+1) float64
arrays of probabilities; ``classes`` None explains each image's top-1 class. For a
random baseline, pass random maps.
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING, Sequence

import numpy as np

import vizkit
from vizkit import Column, Curve, Measurement, Metric, Option, hookimpl, kit

if TYPE_CHECKING:
    from vizkit import Explanation, LoadedImage, ModelGraph, RunContext

SUBSTRATES = ("blur", "black", "mean")
#: RISE's blur: σ = 5 px (an 11×11 window) on 224-pixel images.
RISE_SIGMA, RISE_SIZE = 5.0, 224


def _identity(x):
    return x


# -- the substrate ----------------------------------------------------------------------------


def default_sigma(height: int, width: int) -> float:
    """RISE's σ = 5 px at 224 px, scaled to the shorter side: the same blur relative to the image."""
    return RISE_SIGMA * min(height, width) / RISE_SIZE


def blur_kernel(sigma: float) -> np.ndarray:
    """RISE's 1-D blur kernel for ``sigma``: ``scipy.ndimage.gaussian_filter1d`` of a unit
    impulse (σ, truncated at 4σ) in a window of 2·⌊σ + ½⌋ + 1 pixels (at least 3) with reflected edges
    (``mode="reflect"``); the outer product of two is their 2-D ``gkern``. Sums to 1."""
    radius = max(1, int(sigma + 0.5))  # a 1-pixel window would blur nothing
    window = 2 * radius + 1
    reach = int(4 * sigma + 0.5)
    offsets = np.arange(-reach, reach + 1)
    weights = np.exp(-0.5 * (offsets / sigma) ** 2)
    weights /= weights.sum()
    # where each tap of each output pixel lands in the window, reflected (d c b a | a b c d | d c b a)
    landing = (np.arange(window)[:, None] + offsets[None]) % (2 * window)
    landing = np.where(landing >= window, 2 * window - 1 - landing, landing)
    return (weights[None] * (landing == radius)).sum(axis=1).astype("float32")


def substrate_image(image: np.ndarray, substrate: str = "blur", sigma: float | None = None) -> np.ndarray:
    """What deleted pixels become and inserted pixels start from (H×W×C float32, 0-255):
    the image blurred with :func:`blur_kernel` (edges reflected), black, or each channel's
    mean. ``sigma`` None: :func:`default_sigma`."""
    image = np.asarray(image, dtype="float32")
    if substrate == "black":
        return np.zeros_like(image)
    if substrate == "mean":
        return np.broadcast_to(image.mean(axis=(0, 1), dtype="float64").astype("float32"), image.shape).copy()
    if substrate != "blur":
        raise ValueError(f"substrate {substrate!r} is not one of {', '.join(SUBSTRATES)}")
    import cv2

    kernel = blur_kernel(sigma if sigma is not None else default_sigma(*image.shape[:2]))
    blurred = cv2.sepFilter2D(image, -1, kernel, kernel, borderType=cv2.BORDER_REFLECT)
    return blurred.reshape(image.shape)  # OpenCV drops a single channel's axis


# -- rankings ---------------------------------------------------------------------------------


def pixel_ranks(ranking: np.ndarray, seed: int | None = None) -> np.ndarray:
    """H×W int64: each pixel's place in the order of deletion (0 first), by the map's value,
    highest first; ties in row-major order, or with ``seed`` in a random order drawn from
    the seed and the map's shape (the same for every map of that shape: no spatial bias,
    and equal maps still rank equally)."""
    ranking = np.asarray(ranking, dtype="float32")
    values = -ranking.ravel()
    if seed is None:
        order = np.argsort(values, kind="stable")
    else:
        shuffle = np.random.default_rng([int(seed), *ranking.shape]).permutation(values.size)
        order = shuffle[np.argsort(values[shuffle], kind="stable")]
    ranks = np.empty(order.size, dtype="int64")
    ranks[order] = np.arange(order.size)
    return ranks.reshape(ranking.shape)


def random_map(height: int, width: int, grid: int, seed: int, key: str = "") -> np.ndarray:
    """H×W float32: ``grid``×``grid`` uniform values from ``seed`` and ``key`` (an image's
    sha256), upsampled bilinearly: a random map shaped like a CAM, the same for an image
    whatever else is in the run."""
    words = [int(hashlib.sha256(key.encode()).hexdigest()[i : i + 8], 16) for i in range(0, 64, 8)]
    rng = np.random.default_rng([int(seed), *words])
    return kit.resize(rng.random((grid, grid), dtype="float32"), height, width, "bilinear")


def step_counts(pixels: int, steps: int) -> np.ndarray:
    """n_i = round(i·P/k) for i = 0..k (halves rounded up), in integers: exact for any P."""
    i = np.arange(steps + 1, dtype="int64")
    return (2 * i * pixels + steps) // (2 * steps)


def auc(curves: np.ndarray) -> np.ndarray | float:
    """The area under curves sampled at x = i/k over [0, 1] (trapezoid rule), along the
    last axis: (Σ y − (y_0 + y_k)/2) / k."""
    y = np.asarray(curves, dtype="float64")
    area = (y.sum(axis=-1) - (y[..., 0] + y[..., -1]) / 2) / (y.shape[-1] - 1)
    return float(area) if np.ndim(area) == 0 else area


# -- the curves -------------------------------------------------------------------------------


def image_curves(
    graph: ModelGraph, image: np.ndarray, canvas: np.ndarray, ranks: np.ndarray, target: int,
    preprocess=_identity, steps: int = 32, per_pass: int = 64,
) -> tuple[np.ndarray, np.ndarray]:
    """(deletion, insertion) of one image (H×W×C, 0-255): p_target at each of the k + 1
    steps, float64. Row r of the 2(k+1) copies shows the substrate where ``ranks`` <
    n_r (deletion rows) or where it is not (insertion rows): one comparison broadcast
    over a chunk of ``per_pass`` rows, scored in one compiled pass."""
    thresholds = np.tile(step_counts(ranks.size, steps), 2)
    inserting = np.repeat([False, True], steps + 1)
    scores = []
    for start in range(0, len(thresholds), per_pass):
        stop = min(len(thresholds), start + per_pass)
        hidden = (ranks[None] < thresholds[start:stop, None, None]) != inserting[start:stop, None, None]
        copies = np.where(hidden[..., None], canvas[None], image[None])
        inputs = np.asarray(preprocess(copies), dtype="float32")
        scores.append(kit.class_scores(graph, inputs, "probability", batch=per_pass)[:, target])
    curves = np.concatenate(scores).astype("float64")
    return curves[: steps + 1], curves[steps + 1 :]


def deletion_insertion(
    model, pixels: np.ndarray, maps: Sequence[np.ndarray] | np.ndarray, classes: int | Sequence[int] | None = None,
    preprocess=_identity, steps: int = 32, substrate: str = "blur", sigma: float | None = None, per_pass: int = 64,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """(deletion, insertion): N×(steps+1) float64 curves of p_c for 0-255 ``pixels``
    (N×H×W×C) ranked by ``maps`` (one per image: h×w, resized bilinearly, or h×w×C,
    ranked by the largest |value| over the channels: ``kit.explanation_map``).

    ``classes``: one for all, one per image, or None for each image's top-1 class.
    ``substrate`` and ``sigma`` as :func:`substrate_image`. Pass random maps for a
    random baseline; :func:`auc` turns the curves into the metric's numbers. ``seed``
    orders tied pixels, as the metric's ``seed`` does.
    """
    graph = vizkit.ModelGraph.of(model)
    kit.require_classifier(graph, "deletion/insertion")
    pixels = np.asarray(pixels, dtype="float32")
    if pixels.ndim != 4:
        raise ValueError(f"expected a batch of images N×H×W×C, got shape {pixels.shape}")
    if len(maps) != len(pixels):
        raise ValueError(f"{len(maps)} maps for {len(pixels)} images")
    if steps < 1:
        raise ValueError(f"steps must be at least 1, not {steps}")
    height, width = pixels.shape[1:3]
    if classes is None:
        scores = np.concatenate([kit.class_scores(graph, np.asarray(preprocess(image[None]), "float32")) for image in pixels])
        targets = kit.target_classes(scores)
    else:
        targets = kit.target_classes(np.zeros((len(pixels), graph.num_classes)), classes)
    deletion = np.zeros((len(pixels), steps + 1))
    insertion = np.zeros((len(pixels), steps + 1))
    for n, image in enumerate(pixels):
        ranks = pixel_ranks(kit.explanation_map(maps[n], height, width), seed)
        canvas = substrate_image(image, substrate, sigma)
        deletion[n], insertion[n] = image_curves(graph, image, canvas, ranks, int(targets[n]), preprocess, steps, per_pass)
    return deletion, insertion


# -- the metric -------------------------------------------------------------------------------

#: ``kit.per_model`` key of the random baselines: one dict per model, shared by every
#: technique of a run (and by later runs on the same model in a notebook).
BASELINE_CACHE = ("faithfulness", "random baselines")


def _target(graph: ModelGraph, image: LoadedImage, target: int | None) -> int:
    """The artifact's class, or the image's top-1 prediction for a class-agnostic map."""
    if target is None:
        if not image.predictions:
            raise ValueError(f"{image.id}: the map explains no class and the image has no predictions")
        target = image.predictions[0]["index"]
    if not 0 <= int(target) < graph.num_classes:
        raise ValueError(f"{image.id}: class {target} is outside 0-{graph.num_classes - 1}")
    return int(target)


def _describe_substrate(params: dict) -> str:
    if params["substrate"] == "black":
        return "black (0 before preprocessing)"
    if params["substrate"] == "mean":
        return "each channel's mean of the image"
    sigma = f"σ = {params['sigma']:g} px" if params["sigma"] else "σ = 5 px per 224 px of the shorter side"
    return f"the image blurred with RISE's Gaussian kernel ({sigma})"


def _check_per_pass(value: int, context: RunContext) -> None:
    """A forward pass holds its copies (and their preprocessed inputs) and their
    activations: at most what fits (a curve pair has 2(steps + 1) copies)."""
    graph, rows = context.model, 2 * (context.params["steps"] + 1)
    per_copy = kit.activation_bytes(graph) + 2 * kit.image_bytes(graph)
    kit.check_memory(value, lambda n: min(n, rows) * per_copy, "for the copies and their activations")


def evaluate(context: RunContext, explanation: Explanation) -> list[Measurement]:
    """Deletion and insertion curves of each of the technique's heatmaps, beside the
    image's random baseline (from the cache when another technique already needed it)."""
    graph, params = context.model, context.params
    kit.require_classifier(graph, "faithfulness (deletion/insertion)")
    steps, seed, per_pass = params["steps"], params["seed"], params["per_pass"]
    baselines = kit.per_model(graph, BASELINE_CACHE, dict)
    # the weights belong in the key: a notebook may train the model between two runs
    weights = hashlib.sha256(b"".join(np.ascontiguousarray(w).tobytes() for w in graph.model.get_weights())).hexdigest()
    pairs = explanation.pairs(context.images)
    measurements = []
    for number, (image, artifact) in enumerate(pairs, 1):
        context.progress(f"{explanation.technique.name}: image {number}/{len(pairs)}")
        pixels = np.asarray(image.array, dtype="float32")
        height, width = pixels.shape[:2]
        sigma = params["sigma"] or default_sigma(height, width)
        canvas = substrate_image(pixels, params["substrate"], sigma)
        target = _target(graph, image, artifact.target)
        ranks = pixel_ranks(kit.explanation_map(artifact.array, height, width), seed)
        deletion, insertion = image_curves(graph, pixels, canvas, ranks, target, context.preprocess, steps, per_pass)

        identity = image.sha256 or hashlib.sha256(np.ascontiguousarray(pixels).tobytes()).hexdigest()
        content = hashlib.sha256(np.ascontiguousarray(pixels).tobytes()).hexdigest()
        key = (content, pixels.shape, identity, target, steps, params["substrate"], sigma, seed, params["grid"], context.preprocess, weights)
        if key not in baselines:
            shuffled = pixel_ranks(random_map(height, width, params["grid"], seed, identity))
            baselines[key] = image_curves(graph, pixels, canvas, shuffled, target, context.preprocess, steps, per_pass)
        random_deletion, random_insertion = baselines[key]

        values = {
            "deletion_auc": auc(deletion),
            "insertion_auc": auc(insertion),
            "random_deletion_auc": auc(random_deletion),
            "random_insertion_auc": auc(random_insertion),
        }
        measurements.append(
            Measurement(
                values=values,
                image_id=image.id,
                caption=(
                    f"deletion AUC {values['deletion_auc']:.2f} (random {values['random_deletion_auc']:.2f}) · "
                    f"insertion AUC {values['insertion_auc']:.2f} (random {values['random_insertion_auc']:.2f})"
                ),
                curves=(
                    Curve("deletion", deletion, "red"),
                    Curve("insertion", insertion, "blue"),
                    Curve("random deletion", random_deletion, "red", dashed=True),
                    Curve("random insertion", random_insertion, "blue", dashed=True),
                ),
            )
        )
    context.note(
        f"Deletion/insertion: the pixels, ranked by each map, removed (deletion) or revealed (insertion) in "
        f"{steps} steps of 1/{steps} of the image; a hidden pixel shows {_describe_substrate(params)}. "
        "Curves: the probability of the explained class; AUC over [0, 1].",
    )
    if pairs:  # the random maps' means are summary columns: a note's count would be per chunk
        context.note(
            f"Random maps ({params['grid']}×{params['grid']} uniform values upsampled, seed {seed}, one per image): "
            "their mean AUCs are in the summary table, the yardstick of the two columns before them.",
        )
    return measurements


METRIC = Metric(
    name="faithfulness",
    description=(
        "Deletion and insertion (Petsiuk et al. 2018): the area under the explained class's probability "
        "as the map's top pixels are removed or revealed first; a lower deletion AUC and a higher "
        "insertion AUC mean a map more faithful to what the model uses."
    ),
    evaluate=evaluate,
    columns=(
        Column("deletion_auc", "deletion AUC", "lower"),
        Column("insertion_auc", "insertion AUC", "higher"),
        Column("random_deletion_auc", "deletion AUC, random map"),
        Column("random_insertion_auc", "insertion AUC, random map"),
    ),
    options=(
        Option("steps", int, 32, "steps k: each removes or reveals 1/k of the pixels (k + 1 scored copies per curve)", minimum=2, maximum=1024),
        Option("substrate", str, "blur", "what removed pixels show: blur (RISE's insertion canvas), black (0 before preprocessing) or mean (each channel's)", choices=SUBSTRATES),
        Option("sigma", float, None, "blur σ in input pixels; default: RISE's 5 px at 224, scaled to the shorter side", minimum=0.1),
        Option("seed", int, 0, "seed of the random baseline's map (with each image's sha256) and of the order of tied pixels", minimum=0),
        Option("grid", int, 7, "the random baseline's map: grid×grid random values upsampled (a CAM's coarseness)", minimum=1, maximum=512),
        Option("per_pass", int, 64, "masked copies per forward pass", minimum=1, check=_check_per_pass),
    ),
)


@hookimpl
def register_metrics(register):
    register(METRIC)
