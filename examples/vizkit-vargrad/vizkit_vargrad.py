"""vargrad: where the class score's input gradient changes most under noise.

A vizkit technique plugin (Adebayo, Gilmer, Goodfellow & Kim 2018, "Local explanation
methods for deep neural networks lack sensitivity to parameter values",
https://arxiv.org/abs/1810.03307), written against vizkit's public API only (``vizkit``
and ``vizkit.kit``). VarGrad is SmoothGrad's sibling: where SmoothGrad (a vizkit
built-in) keeps the MEAN of the gradients of noisy copies of the image, VarGrad keeps
their VARIANCE. For an image x of class c:

    σ       = noise × (max(x) − min(x))
    g_k     = ∂S_c(x + ε_k) / ∂x,       ε_k ~ N(0, σ²), k = 1..n, n = samples
    V_c(x)  = 1/n Σ_k (g_k − ḡ)²,       ḡ = 1/n Σ_k g_k       (per pixel and channel)

S_c is the class logit (``score=logit``) or the model's output probability
(``score=probability``), and x the image in 0-255 pixels: the gradient goes through the
model's preprocessing, so maps of models with different preprocessing are comparable.
Each image draws its noise from ``np.random.default_rng(seed)``, so its map depends only
on the image, the class and the options, never on the other images.

(Up to 0.2.0 this package was vizkit-smoothgrad; SmoothGrad became a vizkit built-in, so
this worked example moved on to VarGrad in 0.3.0.)
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

import vizkit
from vizkit import Artifact, Option, Technique, hookimpl, kit

__version__ = "0.3.0"


def image_noise(image: np.ndarray, samples: int, noise: float, seed: int) -> np.ndarray:
    """The ``samples`` noise images added to ``image`` (H×W×C): standard normal draws of a
    fresh ``np.random.default_rng(seed)`` times σ = ``noise`` × (max − min) of its pixels."""
    sigma = np.float32(noise * (float(image.max()) - float(image.min())))
    draws = np.random.default_rng(seed).standard_normal((samples, *image.shape), dtype=np.float32)
    return draws * sigma


def vargrad(
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
    """(variances, classes): VarGrad of N images (N×H×W×C, 0-255 pixels), N×H×W×C float32
    (≥ 0), and the classes explained (default: each image's top-1 on the clean image).

    The noisy copies of an image go through the model ``batch`` at a time.
    """
    graph = vizkit.ModelGraph.of(model)
    kit.require_classifier(graph, "vargrad")
    pixels = np.asarray(batch_pixels, dtype=np.float32)
    if pixels.ndim != 4:
        raise ValueError(f"batch_pixels must be N×H×W×C, got shape {pixels.shape}")
    if samples < 1 or batch < 1 or noise < 0:
        raise ValueError(f"samples and batch must be at least 1 and noise not negative, got {samples}, {batch}, {noise}")
    targets = kit.target_classes(graph.class_scores(preprocess(pixels), score), classes)
    variances = np.zeros(pixels.shape, dtype=np.float32)
    for i, image in enumerate(pixels):
        noisy = image[None] + image_noise(image, samples, noise, seed)
        gradients = np.concatenate([
            kit.input_gradients(graph, noisy[start : start + batch], int(targets[i]), preprocess, score)[0]
            for start in range(0, samples, batch)
        ])
        variances[i] = gradients.astype(np.float64).var(axis=0)
    return variances, targets


def prepare(context) -> None:
    kit.require_classifier(context.model, "vargrad")
    p = context.params
    score, note = kit.usable_score(context.model, p["score"])
    if note:
        context.note(note)
    context.note(
        f"{p['samples']} noisy copies per image, Gaussian noise with σ = {p['noise']:g} × (max − min) of "
        f"the image's pixels, seed {p['seed']}; the array is the variance of the gradient of the class "
        f"{score} over the copies, per pixel and channel; the picture shows its largest channel, capped "
        "at its 99th percentile"
    )


def run_batch(context, batch) -> list[Artifact]:
    p = context.params
    variances, classes = vargrad(
        context.model, batch.pixels, kit.resolve_class(context), p["samples"], p["noise"], p["seed"],
        context.preprocess, p["per_pass"], kit.usable_score(context.model, p["score"])[0],
    )
    shown = kit.attribution_map(variances)
    return [
        Artifact(
            title=f"{image.id} · class {kit.describe_class(int(cls), context.labels)}",
            array=variance,
            picture=kit.heatmap_picture(image.display, heatmap, p),
            image_id=image.id,
            caption=f"σ = {p['noise'] * float(np.ptp(image.array)):.1f} pixel levels, {p['samples']} samples",
            target=int(cls),
        )
        for image, variance, heatmap, cls in zip(batch.images, variances, shown, classes)
    ]


TECHNIQUE = Technique(
    name="vargrad",
    run_batch=run_batch,
    prepare=prepare,
    description="VarGrad: the variance of the input gradient of the class score over noisy copies of the image (Adebayo et al. 2018).",
    comparable=True,
    options=(
        Option("samples", int, 25, "noisy copies per image", minimum=1),
        Option("noise", float, 0.15, "noise σ as a fraction of the image's (max − min) pixel range", minimum=0),
        kit.class_option(),
        kit.score_option("logit"),
        Option("seed", int, 0, "seed of the NumPy noise"),
        Option("per_pass", int, 25, "noisy copies per forward/backward pass", minimum=1),
        *kit.overlay_options(),
    ),
)


@hookimpl
def register_techniques(register):
    register(TECHNIQUE)
