"""gradcam: where in the image the predicted class comes from (Selvaraju et al.; the chapter's third technique)."""

from __future__ import annotations

import numpy as np

import vizkit
from vizkit import Artifact, Technique, hookimpl, kit


def gradcam(
    model, batch: np.ndarray, layer: str | None = None, classes: list[int] | int | None = None, score: str = "logit"
) -> tuple[np.ndarray, np.ndarray]:
    """(heatmaps, classes): Grad-CAM of a preprocessed batch, N×h×w in [0, 1] at the layer's resolution.

    Gradients of the class score with respect to the layer's output, averaged per channel,
    weight the channels; their mean over channels, through a ReLU, is normalized by its
    maximum. ``score="logit"`` differentiates the pre-softmax logit (the paper);
    ``"probability"`` the model's output, as the chapter does. ``classes`` defaults to
    each image's top-1 class.
    """
    graph = vizkit.ModelGraph.of(model)
    path = graph.resolve(layer, kit.explainable_layer, "gradcam") if layer else kit.last_feature_map_layer(graph)[0]
    features, gradients, targets = kit.layer_gradients(graph, batch, path, classes, score)
    weights = gradients.mean(axis=(1, 2), keepdims=True)
    return kit.normalize_heatmap((features * weights).mean(axis=-1)), targets


def _layer(context) -> tuple[str, str | None]:
    """(path, why it was chosen, or None when the user named it)."""
    if context.params["layer"]:
        return context.model.resolve(context.params["layer"], kit.explainable_layer, "gradcam"), None
    return kit.last_feature_map_layer(context.model)


def prepare(context) -> None:
    kit.require_classifier(context.model, "Grad-CAM")
    path, why = _layer(context)
    if why:
        context.note(f"layer: {path}, {why}")
    _, note = kit.usable_score(context.model, context.params["score"])
    if note:
        context.note(note)


def run_batch(context, batch) -> list[Artifact]:
    path, _ = _layer(context)
    context.progress(f"{len(batch)} image(s)")
    score, _ = kit.usable_score(context.model, context.params["score"])
    heatmaps, classes = gradcam(context.model, batch.inputs, path, kit.resolve_class(context), score)
    return kit.heatmap_artifacts(context, batch, heatmaps, classes, layer=path)


TECHNIQUE = Technique(
    name="gradcam",
    run_batch=run_batch,
    prepare=prepare,
    description="Grad-CAM heatmaps of where in each image the predicted (or chosen) class comes from (Selvaraju et al. 2017).",
    accepts=kit.explainable_layer,
    comparable=True,
    options=(
        kit.layer_option("gradcam", kit.explainable_layer, "layer to explain; default: the last feature-map layer before the classifier"),
        kit.class_option(),
        kit.score_option("logit"),
        kit.top_option(),
        *kit.overlay_options(),
        kit.batch_option(8),
    ),
)


@hookimpl
def register_techniques(register):
    register(TECHNIQUE)
