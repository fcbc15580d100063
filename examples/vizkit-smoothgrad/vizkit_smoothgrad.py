"""smoothgrad: which input pixels the class score is most sensitive to, with the noise averaged out.

A vizkit technique plugin (Smilkov et al. 2017, "SmoothGrad: removing noise by adding
noise", https://arxiv.org/abs/1706.03825). For an image x of class c:

    σ        = noise × (max(x) − min(x))
    M̂_c(x)   = 1/n Σ_{k=1..n} ∂S_c(x + ε_k) / ∂x,     ε_k ~ N(0, σ²), n = samples
    map(x)   = max over channels of |M̂_c(x)|, divided by its maximum (all zero stays zero)

S_c is the model's output for class c (as Grad-CAM uses it), and x the image in 0-255
pixels: the gradient goes through the model's preprocessing, so maps of models with
different preprocessing are comparable. The noise comes from NumPy: each image draws
``np.random.default_rng(seed).standard_normal((samples, H, W, C), dtype=float32)`` and
scales it by its own σ, so an image's map depends only on the image, the class and the
options, never on which other images are in the run or in which order.

Installed, the package declares this module under the ``vizkit`` entry point group, so
``vizkit run MODEL IMAGES -t smoothgrad`` finds it; ``smoothgrad()`` is the same
computation for notebooks.
"""

from __future__ import annotations

import weakref
from typing import Callable, Sequence

import numpy as np
import tensorflow as tf

from vizkit import hookimpl
from vizkit.graph import ModelGraph
from vizkit.imaging import overlay_heatmap
from vizkit.technique import Artifact, Option, RunContext, Technique

__version__ = "0.1.0"

#: Gap between the overlay and the grayscale map in the report's picture, in pixels.
GAP = 4
ALPHA = 0.5
#: The picture caps the map at this percentile (the paper's visualization); see display_scale.
DISPLAY_PERCENTILE = 99.0


def identity(x):
    """No preprocessing: the model takes 0-255 pixels."""
    return x


# A differentiable model from the graph's input to its (first) output, one per graph.
_FORWARD: "weakref.WeakKeyDictionary[ModelGraph, object]" = weakref.WeakKeyDictionary()


def _forward(graph: ModelGraph):
    if graph not in _FORWARD:
        probe = graph.probe([], with_output=True)

        def forward(x):
            out = probe(x, training=False)
            # Keras returns a one-output model's output bare or as a one-element list.
            return out[0] if isinstance(out, (list, tuple)) else out

        _FORWARD[graph] = forward
    return _FORWARD[graph]


def _require_classifier(graph: ModelGraph) -> None:
    if not graph.is_classifier:
        raise ValueError(
            "smoothgrad needs a classifier (output: one score per class, more than one class); "
            f"{graph.name} outputs shape {graph.output_shape}"
        )


def image_noise(image: np.ndarray, samples: int, noise: float, seed: int) -> np.ndarray:
    """The ``samples`` noise images added to ``image`` (H×W×C), samples×H×W×C float32.

    Standard normal draws of a fresh ``np.random.default_rng(seed)``, times
    σ = ``noise`` × (max − min) of the image's pixels.
    """
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
    preprocess: Callable = identity,
    batch: int = 25,
) -> tuple[np.ndarray, np.ndarray]:
    """(maps, classes): SmoothGrad of N images, N×H×W float32 in [0, 1], and the classes explained.

    ``model`` is a keras.Model or a :class:`vizkit.graph.ModelGraph`; ``batch_pixels`` are
    N×H×W×C images in 0-255 pixels (not preprocessed: ``preprocess`` maps them to the
    model's input and is differentiated through). ``classes`` is one class for all images,
    one per image, or None for each image's top-1 class on the clean image. The noisy
    copies of an image go through the model in batches of up to ``batch``, one
    GradientTape per batch.
    """
    graph = ModelGraph.of(model)
    _require_classifier(graph)
    pixels = np.asarray(batch_pixels, dtype=np.float32)
    if pixels.ndim != 4:
        raise ValueError(f"batch_pixels must be N×H×W×C, got shape {pixels.shape}")
    if samples < 1 or batch < 1:
        raise ValueError(f"samples and batch must be at least 1, got {samples} and {batch}")
    if noise < 0:
        raise ValueError(f"noise must not be negative, got {noise}")
    forward = _forward(graph)
    count = len(pixels)
    num_classes = graph.output_shape[0]
    if classes is None:
        scores = forward(preprocess(tf.convert_to_tensor(pixels)))
        targets = tf.argmax(scores, axis=-1, output_type=tf.int32).numpy()
    else:
        targets = np.broadcast_to(np.asarray(classes, dtype=np.int32), (count,)).copy()
        bad = targets[(targets < 0) | (targets >= num_classes)]
        if bad.size:
            raise ValueError(f"class {int(bad[0])} is outside 0-{num_classes - 1}")

    maps = np.zeros(pixels.shape[:3], dtype=np.float32)
    for i, image in enumerate(pixels):
        noisy = image[None] + image_noise(image, samples, noise, seed)
        total = np.zeros(image.shape, dtype=np.float64)
        for start in range(0, samples, batch):
            x = tf.convert_to_tensor(noisy[start : start + batch])
            with tf.GradientTape() as tape:
                tape.watch(x)
                class_scores = forward(preprocess(x))[:, int(targets[i])]
            # The rows do not mix (inference mode), so the gradient of their sum is each
            # row's own gradient.
            grads = tape.gradient(class_scores, x)
            total += tf.reduce_sum(grads, axis=0).numpy()
        saliency = np.abs(total / samples).max(axis=-1)
        peak = saliency.max()
        if peak > 0:
            maps[i] = saliency / peak
    return maps, targets


# -- the technique -------------------------------------------------------------


def _label(index: int, labels: list[str] | None) -> str:
    return f"{index} {labels[index]}" if labels and 0 <= index < len(labels) else str(index)


def _resize_nearest(array: np.ndarray, height: int, width: int) -> np.ndarray:
    rows = np.arange(height) * array.shape[0] // height
    cols = np.arange(width) * array.shape[1] // width
    return array[rows[:, None], cols[None, :]]


def display_scale(saliency: np.ndarray, percentile: float = DISPLAY_PERCENTILE) -> np.ndarray:
    """The map as shown: capped at its 99th percentile and stretched to [0, 1].

    A few pixels with the largest gradients would otherwise leave the rest of the map
    black; the paper's figures cap the same way. Only the picture is scaled so; the
    artifact's array keeps the map divided by its maximum.
    """
    cap = float(np.percentile(saliency, percentile)) if saliency.size else 0.0
    if cap <= 0:
        cap = float(saliency.max())
    if cap <= 0:
        return np.zeros_like(saliency, dtype=np.float32)
    return np.clip(saliency / cap, 0, 1).astype(np.float32)


def picture(display: np.ndarray, saliency: np.ndarray, alpha: float = ALPHA) -> np.ndarray:
    """The report's picture: the JET overlay on the photo, and the map in grayscale beside it."""
    shown = display_scale(saliency)
    overlay = overlay_heatmap(display, shown, alpha)
    height, width = overlay.shape[:2]
    gray = np.uint8(np.round(255 * _resize_nearest(shown, height, width)))
    out = np.full((height, 2 * width + GAP, 3), 255, dtype=np.uint8)
    out[:, :width] = overlay
    out[:, width + GAP :] = gray[..., None]
    return out


def run(context: RunContext) -> list[Artifact]:
    params = {option.name: option.default for option in OPTIONS} | dict(context.params)
    graph = context.model
    _require_classifier(graph)
    target = params["class"]
    if target is not None and not 0 <= target < graph.output_shape[0]:
        raise ValueError(f"smoothgrad.class: {target} is outside 0-{graph.output_shape[0] - 1}")
    context.note(
        f"{params['samples']} noisy copies per image, Gaussian noise with σ = {params['noise']:g} × "
        f"(max − min) of the image's pixels, seed {params['seed']}; "
        "the map is max over channels of |mean gradient|, divided by its maximum"
    )
    artifacts = []
    for image in context.images:
        context.progress(image.id)
        maps, classes = smoothgrad(
            graph,
            image.array[None],
            classes=target,
            samples=params["samples"],
            noise=params["noise"],
            seed=params["seed"],
            preprocess=context.preprocess,
            batch=params["batch"],
        )
        saliency, cls = maps[0], int(classes[0])
        if not saliency.any():
            context.note(f"{image.id}: the map is all zero (the score of class {cls} has no gradient here)")
        sigma = params["noise"] * float(image.array.max() - image.array.min())
        artifacts.append(
            Artifact(
                title=f"{image.id} · class {_label(cls, context.labels)}",
                array=saliency,
                picture=picture(image.display, saliency),
                image_id=image.id,
                caption=f"left: overlay; right: the map. σ = {sigma:.1f} pixel levels, {params['samples']} samples",
            )
        )
    return artifacts


OPTIONS = (
    Option("samples", int, 25, "noisy copies averaged per image", minimum=1),
    Option("noise", float, 0.15, "noise σ as a fraction of the image's (max − min) pixel range", minimum=0),
    Option("class", int, None, "class index to explain; default: each image's top-1 class", minimum=0),
    Option("seed", int, 0, "seed of the NumPy noise"),
    Option("batch", int, 25, "noisy copies per forward/backward pass", minimum=1),
)

TECHNIQUE = Technique(
    name="smoothgrad",
    run=run,
    description="SmoothGrad saliency: the input-pixel gradient of the class score, averaged over noisy copies (Smilkov et al. 2017).",
    options=OPTIONS,
)


@hookimpl
def register_techniques(register):
    register(TECHNIQUE)
