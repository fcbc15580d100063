"""The gradient CAM family beside Grad-CAM: Grad-CAM++, XGrad-CAM, LayerCAM, HiResCAM, and Eigen-CAM.

Each gradient method is one compiled ``kit.layer_gradients`` call per batch (the layer's
activations A and the gradients g = ∂S/∂A of each image's class score S), then a
method-specific rule turns (A, g) into weights W, broadcastable to A, and the map is
relu(Σ_k W_k ⊙ A_k), divided by its maximum. Only the rule differs between methods, so
the rules are all this module spells out per method; everything else is shared.
Eigen-CAM needs no gradient: the activations' first principal component.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import numpy as np

import vizkit
from vizkit import Artifact, Option, Technique, hookimpl, kit

if TYPE_CHECKING:
    from vizkit import ModelGraph


# -- the weight rules: (features A, gradients g), both N×h×w×C → W broadcastable to A ------


def _spatial_sum(x: np.ndarray) -> np.ndarray:
    return x.sum(axis=(1, 2), keepdims=True)


def gradcampp_weights(features: np.ndarray, gradients: np.ndarray) -> np.ndarray:
    """Grad-CAM++ (eq. 19 with an exponential score Y = exp(S)): w_k = Σ_ij α_kij relu(∂Y/∂A_kij),
    α_kij = g² / (2 g² + Σ_ab A_kab g³), g = ∂S/∂A_kij.

    ∂Y/∂A = exp(S) g, and exp(S) > 0 is one factor for every channel of an image: it
    scales the whole map, which the normalization by the maximum divides out, so it is
    left out (it would overflow float32 for logits above 88). In float64, so that g³
    cannot underflow. Where the denominator is 0 (always where g = 0) α is 0, as
    pytorch-grad-cam's ``where(grads != 0, ...)``, but without its ε = 1e-6, which is of
    the order of g² for a global-average-pooled head and would bias the alphas.
    """
    g = gradients.astype("float64")
    g2 = g * g
    denominator = 2 * g2 + _spatial_sum(features.astype("float64")) * g2 * g
    alphas = np.divide(g2, denominator, out=np.zeros_like(g2), where=denominator != 0)
    return _spatial_sum(alphas * np.maximum(g, 0))


def xgradcam_weights(features: np.ndarray, gradients: np.ndarray) -> np.ndarray:
    """XGrad-CAM: w_k = Σ_ij (A_kij / Σ_ab A_kab) ∂S/∂A_kij; 0 for a channel whose Σ_ab A_kab is 0.

    Where global average pooling follows the layer, g is the same at every position and
    this is Grad-CAM's mean gradient exactly (so is HiResCAM): they differ deeper inside.
    """
    activations = features.astype("float64")
    totals = _spatial_sum(activations)
    share = np.divide(activations, totals, out=np.zeros_like(activations), where=totals != 0)
    return _spatial_sum(share * gradients)


def layercam_weights(features: np.ndarray, gradients: np.ndarray) -> np.ndarray:
    """LayerCAM: each position's own weight, w_kij = relu(∂S/∂A_kij)."""
    return np.maximum(gradients, 0)


def hirescam_weights(features: np.ndarray, gradients: np.ndarray) -> np.ndarray:
    """HiResCAM: the gradient itself, element-wise (no averaging over positions): the map
    is Σ_k g_k ⊙ A_k, the class score's first-order share of each position."""
    return gradients


def weighted_map(features: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """relu(Σ_k W_k ⊙ A_k) of each image divided by its maximum: N×h×w float32 in [0, 1]."""
    return kit.normalize_heatmap((features * weights).sum(axis=-1))


# -- the gradient methods ----------------------------------------------------------------


@dataclass(frozen=True)
class GradientCam:
    """One gradient CAM method: its technique name, its rule, and how the report names it."""

    name: str
    title: str
    paper: str
    formula: str
    weights: Callable[[np.ndarray, np.ndarray], np.ndarray]


METHODS = {
    m.name: m
    for m in (
        GradientCam("gradcampp", "Grad-CAM++", "Chattopadhyay et al. 2018",
                    "closed-form pixel-wise alphas for an exponential score weight the positive gradients",
                    gradcampp_weights),
        GradientCam("xgradcam", "XGrad-CAM", "Fu et al. 2020",
                    "gradients averaged with the activations' own spatial distribution as weights",
                    xgradcam_weights),
        GradientCam("layercam", "LayerCAM", "Jiang et al. 2021",
                    "each position's activation weighted by its own positive gradient; works on early layers too",
                    layercam_weights),
        GradientCam("hirescam", "HiResCAM", "Draelos & Carin 2020",
                    "element-wise gradient × activation summed over channels, no gradient averaging",
                    hirescam_weights),
    )
}


def _layer(graph: ModelGraph, layer: str | None, purpose: str) -> tuple[str, str | None]:
    """(path, why it was chosen, or None when it was named): gradcam's default layer."""
    if layer:
        return graph.resolve(layer, kit.explainable_layer, purpose), None
    return kit.last_feature_map_layer(graph)


def gradient_cam(
    method: str, model, batch: np.ndarray, layer: str | None = None,
    classes: list[int] | int | None = None, score: str = "logit",
) -> tuple[np.ndarray, np.ndarray]:
    """(heatmaps, classes) of ``method`` (a key of ``METHODS``) for a preprocessed batch:
    N×h×w float32 in [0, 1] at the layer's resolution, from one compiled forward and
    backward pass. ``classes`` defaults to each image's top-1; ``score`` is what S is."""
    graph = vizkit.ModelGraph.of(model)
    path, _ = _layer(graph, layer, method)
    features, gradients, targets = kit.layer_gradients(graph, batch, path, classes, score)
    return weighted_map(features, METHODS[method].weights(features, gradients)), targets


def _notebook_function(method: GradientCam) -> Callable:
    def explain(model, batch, layer=None, classes=None, score="logit"):
        return gradient_cam(method.name, model, batch, layer, classes, score)

    explain.__name__ = explain.__qualname__ = method.name
    explain.__doc__ = (
        f"(heatmaps, classes): {method.title} ({method.paper}) of a preprocessed batch, N×h×w in [0, 1]; "
        "arguments as vizkit.plugins.gradcam.gradcam."
    )
    return explain


gradcampp, xgradcam, layercam, hirescam = (_notebook_function(METHODS[name]) for name in METHODS)


# -- Eigen-CAM -----------------------------------------------------------------------------
#
# All in TensorFlow, inside one compiled function with the forward pass: NumPy's LAPACK
# runs its own threads beside TensorFlow's, and on 2 busy cores a batched SVD or eigh
# there took 30-100 ms an image against under 1 ms here.


def _first_right_singular_vectors(tf, matrices):
    """v₁ of each P×C matrix M (N×P×C → N×C), up to sign: the top eigenvector of the
    smaller Gram matrix, MᵀM (C×C), or MMᵀ (P×P) mapped back by v₁ = Mᵀu₁ / ‖Mᵀu₁‖.

    The same vector as the SVD's first row of Vᵀ (in float64 the squared condition costs
    nothing that matters), but an ``eigh`` of side min(P, C): 49 for a 7×7×1280 map, 32
    for a 112×112×32 one.
    """

    def from_channels():
        return tf.linalg.eigh(tf.matmul(matrices, matrices, transpose_a=True))[1][..., -1]

    def from_positions():
        left = tf.linalg.eigh(tf.matmul(matrices, matrices, transpose_b=True))[1][..., -1]
        vectors = tf.linalg.matvec(matrices, left, transpose_a=True)
        return tf.math.divide_no_nan(vectors, tf.norm(vectors, axis=-1, keepdims=True))

    positions, channels = matrices.shape[1], matrices.shape[2]
    if positions is not None and channels is not None:
        return from_channels() if channels <= positions else from_positions()
    return tf.cond(tf.shape(matrices)[2] <= tf.shape(matrices)[1], from_channels, from_positions)


def _signed_projection(tf, features, center: bool):
    """TensorFlow ops of :func:`eigen_projection` (N×h×w×C → N×h×w float64)."""
    dims = [d if d is not None else tf.shape(features)[i + 1] for i, d in enumerate(features.shape[1:])]
    activations = tf.reshape(tf.cast(features, tf.float64), [-1, dims[0] * dims[1], dims[2]])
    matrices = activations - tf.reduce_mean(activations, axis=1, keepdims=True) if center else activations
    projections = tf.linalg.matvec(matrices, _first_right_singular_vectors(tf, matrices))
    mean = tf.reduce_mean(activations, axis=-1)
    agreement = tf.reduce_sum(projections * mean, axis=-1)
    scale = tf.norm(projections, axis=-1) * tf.norm(mean, axis=-1)
    largest = tf.gather(projections, tf.argmax(tf.abs(projections), axis=-1), axis=1, batch_dims=1)
    flip = tf.where(tf.abs(agreement) > 1e-9 * scale, agreement, largest) < 0
    return tf.reshape(tf.where(flip[:, None], -projections, projections), tf.shape(features)[:3])


_PROJECTIONS: dict = {}


def eigen_projection(features: np.ndarray, center: bool = False) -> np.ndarray:
    """Each image's activations (the h·w × C matrix M) projected on their first right
    singular vector v₁: M v₁, N×h×w float64, signed, batched and compiled.

    Uncentred, as the paper (M = U Σ Vᵀ of the activations themselves); ``center``
    subtracts each channel's mean first, as pytorch-grad-cam's ``get_2d_projection``.
    An SVD's sign is arbitrary, so it is fixed: the projection is flipped where its dot
    product with the channel-mean activation map Ā is negative (the map then points the
    way the activations do), and where that product is 0 (within rounding: Ā constant
    and M centred, say) where its entry of largest magnitude is negative.
    """
    import tensorflow as tf

    if center not in _PROJECTIONS:
        _PROJECTIONS[center] = tf.function(
            lambda x: _signed_projection(tf, x, center), reduce_retracing=True, autograph=False
        )
    return _PROJECTIONS[center](tf.convert_to_tensor(features)).numpy()


def eigencam(model, batch: np.ndarray, layer: str | None = None, center: bool = False) -> np.ndarray:
    """Eigen-CAM heatmaps of a preprocessed batch, N×h×w in [0, 1]: relu of the signed
    first-principal-component projection (:func:`eigen_projection`), divided by its
    maximum, with the forward pass in one compiled function. Gradient-free and
    class-agnostic: the same map whatever class one asks about."""
    import tensorflow as tf

    graph = vizkit.ModelGraph.of(model)
    path, _ = _layer(graph, layer, "eigencam")
    def build():
        probe = graph.probe([path])
        return tf.function(lambda x: _signed_projection(tf, probe(x, training=False), center), reduce_retracing=True, autograph=False)

    projections = kit.per_model(graph, ("eigencam", path, center), build)(tf.convert_to_tensor(batch, dtype=tf.float32))
    return kit.normalize_heatmap(projections.numpy())


# -- techniques ---------------------------------------------------------------------------


def _note_layer(context, name: str) -> None:
    path, why = _layer(context.model, context.params["layer"], name)
    if why:
        context.note(f"layer: {path}, {why}")


LAYER_HELP = "layer to explain, any feature map feeding the output; default: as gradcam, the last one before the classifier"


def _gradient_technique(method: GradientCam) -> Technique:
    def prepare(context) -> None:
        kit.require_classifier(context.model, method.title)
        _note_layer(context, method.name)
        _, note = kit.usable_score(context.model, context.params["score"])
        if note:
            context.note(note)

    def run_batch(context, batch) -> list[Artifact]:
        path, _ = _layer(context.model, context.params["layer"], method.name)
        score, _ = kit.usable_score(context.model, context.params["score"])
        context.progress(f"{len(batch)} image(s)")
        classes = kit.resolve_class(context)
        heatmaps, classes = gradient_cam(method.name, context.model, batch.inputs, path, classes, score)
        return kit.heatmap_artifacts(context, batch, heatmaps, classes, layer=path)

    return Technique(
        name=method.name,
        run_batch=run_batch,
        prepare=prepare,
        description=f"{method.title} ({method.paper}): {method.formula}.",
        accepts=kit.explainable_layer,
        comparable=True,
        by_default=False,
        options=(
            kit.layer_option(method.name, kit.explainable_layer, LAYER_HELP),
            kit.class_option(),
            kit.score_option("logit"),
            kit.top_option(),
            *kit.overlay_options(),
            kit.batch_option(8),
        ),
    )


EIGENCAM_NOTE = (
    "Eigen-CAM is gradient-free and class-agnostic: each map is the first principal component of the "
    "layer's activations ({centring}), the same whatever class is predicted; its sign is chosen so that "
    "the map agrees with the mean activation over channels (positive dot product)."
)


def _eigencam_prepare(context) -> None:
    _note_layer(context, "eigencam")
    centring = "centred per channel, as pytorch-grad-cam" if context.params["center"] else "uncentred, as the paper"
    context.note(EIGENCAM_NOTE.format(centring=centring))


def _eigencam_run_batch(context, batch) -> list[Artifact]:
    path, _ = _layer(context.model, context.params["layer"], "eigencam")
    context.progress(f"{len(batch)} image(s)")
    heatmaps = eigencam(context.model, batch.inputs, path, context.params["center"])
    return kit.heatmap_artifacts(context, batch, heatmaps, None, layer=path)


EIGENCAM = Technique(
    name="eigencam",
    run_batch=_eigencam_run_batch,
    prepare=_eigencam_prepare,
    description=(
        "Eigen-CAM (Muhammad & Yeasin 2020): the layer's activations projected on their first principal "
        "component; gradient-free and class-agnostic (one map per image, whatever the class)."
    ),
    accepts=kit.explainable_layer,
    comparable=True,
    by_default=False,
    options=(
        kit.layer_option("eigencam", kit.explainable_layer, LAYER_HELP),
        Option("center", bool, False, "subtract each channel's mean first (pytorch-grad-cam); default: uncentred, as the paper"),
        kit.top_option(),
        *kit.overlay_options(),
        kit.batch_option(8),
    ),
)

TECHNIQUES = (*(_gradient_technique(method) for method in METHODS.values()), EIGENCAM)


@hookimpl
def register_techniques(register):
    for technique in TECHNIQUES:
        register(technique)
