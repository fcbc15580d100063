"""smoothgrad: which input pixels the class score is most sensitive to, with the noise averaged out.

A vizkit technique plugin (Smilkov et al. 2017, "SmoothGrad: removing noise by adding
noise", https://arxiv.org/abs/1706.03825), written against vizkit's public API only
(``vizkit`` and ``vizkit.kit``). For an image x of class c:

    σ        = noise × (max(x) − min(x))
    M̂_c(x)   = 1/n Σ_{k=1..n} ∂S_c(x + ε_k) / ∂x,     ε_k ~ N(0, σ²), n = samples
    map(x)   = max over channels of |M̂_c(x)|, divided by its maximum (all zero stays zero)

S_c is the class logit (``score=logit``, as in the paper) or the model's output
probability (``score=probability``), and x the image in 0-255 pixels: the gradient goes
through the model's preprocessing, so maps of models with different preprocessing are
comparable. Each image draws its noise from ``np.random.default_rng(seed)``, so its map
depends only on the image, the class and the options, never on the other images.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

import vizkit
from vizkit import Artifact, Option, Technique, hookimpl, kit

__version__ = "0.2.0"

#: The picture caps the map at this percentile (the paper's visualization); see display_scale.
DISPLAY_PERCENTILE = 99.0


def image_noise(image: np.ndarray, samples: int, noise: float, seed: int) -> np.ndarray:
    """The ``samples`` noise images added to ``image`` (H×W×C): standard normal draws of a
    fresh ``np.random.default_rng(seed)`` times σ = ``noise`` × (max − min) of its pixels."""
    sigma = np.float32(noise * (float(image.max()) - float(image.min())))
    draws = np.random.default_rng(seed).standard_normal((samples, *image.shape), dtype=np.float32)
    return draws * sigma


def smoothgrad(
    model,
    batch_pixels: np.ndarray,
    classes: int | Sequence[int] | None = None,
    samples: int = 25,
    noise: float = 0.15,
    seed: int = 0,
    preprocess: Callable = lambda x: x,
    batch: int = 25,
    score: str = "logit",
) -> tuple[np.ndarray, np.ndarray]:
    """(maps, classes): SmoothGrad of N images (N×H×W×C, 0-255 pixels), N×H×W float32 in
    [0, 1], and the classes explained (default: each image's top-1 on the clean image).

    The noisy copies of an image go through the model ``batch`` at a time.
    """
    graph = vizkit.ModelGraph.of(model)
    kit.require_classifier(graph, "smoothgrad")
    pixels = np.asarray(batch_pixels, dtype=np.float32)
    if pixels.ndim != 4:
        raise ValueError(f"batch_pixels must be N×H×W×C, got shape {pixels.shape}")
    if samples < 1 or batch < 1 or noise < 0:
        raise ValueError(f"samples and batch must be at least 1 and noise not negative, got {samples}, {batch}, {noise}")
    targets = kit.target_classes(graph.class_scores(preprocess(pixels)), classes)
    maps = np.zeros(pixels.shape[:3], dtype=np.float32)
    for i, image in enumerate(pixels):
        noisy = image[None] + image_noise(image, samples, noise, seed)
        total = np.zeros(image.shape, dtype=np.float64)
        for start in range(0, samples, batch):
            gradients, _ = kit.input_gradients(graph, noisy[start : start + batch], int(targets[i]), preprocess, score)
            total += gradients.sum(axis=0)
        maps[i] = kit.normalize_heatmap(np.abs(total / samples).max(axis=-1))
    return maps, targets


def display_scale(saliency: np.ndarray, percentile: float = DISPLAY_PERCENTILE) -> np.ndarray:
    """The map as shown: capped at its 99th percentile and stretched to [0, 1], so a few
    large gradients do not leave the rest black (the paper's figures do the same). Only
    the picture is scaled so; the artifact's array keeps the map divided by its maximum."""
    cap = float(np.percentile(saliency, percentile)) if saliency.size else 0.0
    cap = cap if cap > 0 else float(saliency.max(initial=0.0))
    return np.clip(saliency / cap, 0, 1).astype(np.float32) if cap > 0 else np.zeros_like(saliency, dtype=np.float32)


def prepare(context) -> None:
    kit.require_classifier(context.model, "smoothgrad")
    p = context.params
    score, note = kit.usable_score(context.model, p["score"])
    if note:
        context.note(note)
    context.note(
        f"{p['samples']} noisy copies per image, Gaussian noise with σ = {p['noise']:g} × (max − min) of "
        f"the image's pixels, seed {p['seed']}; the map is max over channels of |mean gradient of the "
        f"class {score}|, divided by its maximum"
    )


def run_batch(context, batch) -> list[Artifact]:
    p = context.params
    maps, classes = smoothgrad(
        context.model, batch.pixels, kit.resolve_class(context), p["samples"], p["noise"], p["seed"],
        context.preprocess, p["per_pass"], kit.usable_score(context.model, p["score"])[0],
    )
    artifacts = []
    for image, saliency, cls in zip(batch.images, maps, classes):
        shown = display_scale(saliency)
        height, width = image.display.shape[:2]
        artifacts.append(
            Artifact(
                title=f"{image.id} · class {kit.describe_class(int(cls), context.labels)}",
                array=saliency,
                picture=kit.side_by_side([kit.overlay_heatmap(image.display, shown, 0.5), kit.gray_picture(shown, height, width)]),
                image_id=image.id,
                caption=f"left: overlay; right: the map. σ = {p['noise'] * float(np.ptp(image.array)):.1f} pixel levels, {p['samples']} samples",
            )
        )
    return artifacts


TECHNIQUE = Technique(
    name="smoothgrad",
    run_batch=run_batch,
    prepare=prepare,
    description="SmoothGrad saliency: the input-pixel gradient of the class score, averaged over noisy copies (Smilkov et al. 2017).",
    options=(
        Option("samples", int, 25, "noisy copies averaged per image", minimum=1),
        Option("noise", float, 0.15, "noise σ as a fraction of the image's (max − min) pixel range", minimum=0),
        kit.class_option(),
        kit.score_option("logit"),
        Option("seed", int, 0, "seed of the NumPy noise"),
        Option("per_pass", int, 25, "noisy copies per forward/backward pass", minimum=1),
    ),
)


@hookimpl
def register_techniques(register):
    register(TECHNIQUE)
