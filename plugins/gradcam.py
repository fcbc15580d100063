"""gradcam: where in the image the predicted class comes from (Selvaraju et al.; the chapter's third technique)."""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from vizkit import hookimpl
from vizkit.graph import LayerInfo, ModelGraph
from vizkit.imaging import overlay_heatmap
from vizkit.labels import class_index, describe_class, describe_predictions
from vizkit.technique import Artifact, Option, RunContext, Technique


def _usable(info: LayerInfo) -> bool:
    return info.feature_map and info.feeds_output


def default_layer(graph: ModelGraph) -> tuple[str, str]:
    """(path, why): the last feature-map layer before the classifier, pooling skipped."""
    for info in reversed(graph.layers):
        if _usable(info) and not info.pooling and (info.shape[0] or 2) * (info.shape[1] or 2) > 1:
            return info.path, (
                "the last layer with an H×W×C output larger than 1×1 before the classifier "
                "(pooling layers skipped)"
            )
    raise ValueError("the model has no layer with an H×W×C output to explain; name one with gradcam.layer")


def gradcam(
    model, batch: np.ndarray, layer: str | None = None, classes: list[int] | int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(heatmaps, classes): Grad-CAM of a preprocessed batch, N×h×w in [0, 1] at the layer's resolution.

    Gradients of the class score (the model's output for that class, as in the chapter)
    with respect to the layer's output, averaged per channel, weight the channels; their
    mean over channels, through a ReLU, is normalized by its maximum. ``classes`` defaults
    to each image's top-1 class.
    """
    graph = ModelGraph.of(model)
    path = graph.resolve(layer, _usable, " for gradcam") if layer else default_layer(graph)[0]
    probe = graph.probe([path], with_output=True)
    x = tf.convert_to_tensor(batch, dtype=tf.float32)
    with tf.GradientTape() as tape:
        features, scores = probe(x, training=False)
        scores = graph.expand_scores(scores)
        if classes is None:
            targets = tf.argmax(scores, axis=-1, output_type=tf.int32)
        else:
            targets = tf.constant(np.broadcast_to(classes, (len(batch),)), dtype=tf.int32)
        class_scores = tf.gather(scores, targets, axis=1, batch_dims=1)
    grads = tape.gradient(class_scores, features)  # per image: the batch does not mix
    weights = tf.reduce_mean(grads, axis=(1, 2), keepdims=True)
    heatmaps = tf.nn.relu(tf.reduce_mean(features * weights, axis=-1)).numpy()
    peaks = heatmaps.max(axis=(1, 2), keepdims=True)
    heatmaps = np.divide(heatmaps, peaks, out=np.zeros_like(heatmaps), where=peaks > 0)
    return heatmaps.astype("float32"), targets.numpy()


def run(context: RunContext) -> list[Artifact]:
    params, graph = context.params, context.model
    if not graph.is_classifier:
        raise ValueError(f"Grad-CAM needs a classifier (output: one score per class); this model outputs {graph.output_shape}")
    if params["layer"]:
        path = graph.resolve(params["layer"], _usable, " for gradcam")
    else:
        path, why = default_layer(graph)
        context.note(f"layer: {path}, {why}")
    if params["class"] is None:
        target = None
    else:
        try:
            target = class_index(params["class"], context.labels, graph.num_classes)
        except ValueError as error:
            raise ValueError(f"gradcam.class: {error}") from None
    artifacts = []
    for images, batch in context.batches(params["batch"]):
        context.progress(f"{len(images)} image(s)")
        heatmaps, classes = gradcam(graph, batch, path, target)
        for image, heatmap, cls in zip(images, heatmaps, classes):
            if not heatmap.any():
                context.note(f"{image.id}: the heatmap is all zero (no positive evidence for class {cls} at {path})")
            artifacts.append(
                Artifact(
                    title=f"{image.id} · class {describe_class(int(cls), context.labels)}",
                    array=heatmap,
                    picture=overlay_heatmap(image.display, heatmap, params["alpha"]),
                    image_id=image.id,
                    layer=path,
                    caption=describe_predictions(image.predictions[: params["top"]]),
                )
            )
    return artifacts


TECHNIQUE = Technique(
    name="gradcam",
    run=run,
    description="Grad-CAM heatmaps of where in each image the predicted (or chosen) class comes from.",
    accepts=_usable,
    options=(
        Option("layer", str, None, "layer to explain; default: the last feature-map layer before the classifier"),
        Option("class", str, None, "class index or label to explain; default: each image's top-1 class"),
        Option("top", int, 3, "predictions listed per image", minimum=0),
        Option("alpha", float, 0.4, "heatmap weight in the overlay", minimum=0),
        Option("batch", int, 8, "images per batch", minimum=1),
    ),
)


@hookimpl
def register_techniques(register):
    register(TECHNIQUE)
