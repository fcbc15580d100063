"""scorecam and ablationcam: class activation maps whose channel weights come from forward
passes, not gradients (Wang et al. 2020; Desai & Ramaswamy 2020).

Both weight the chosen layer's channels A_k (h×w) and show relu(Σ_k w_k A_k) divided by
its maximum, at the layer's resolution, as the other CAM techniques do. They differ in
how w_k is measured:

- Score-CAM masks the (preprocessed) input with each channel, upsampled and min-max
  normalized, and scores the masked copies: w_k = f_c(X ∘ H_k) − f_c(X_b), the paper's
  "increase of confidence" over the baseline X_b = 0 (the input with everything masked).
- Ablation-CAM sets channel k of the layer's output to zero and runs the rest of the
  model: w_k = (y_c − y_c^k) / |y_c| (the paper's y_c, a probability, is positive).

Every masked or ablated copy of every image of a batch is one row of a flat stream,
cut into chunks of ``masks_per_pass`` / ``channels_per_pass`` rows, one compiled forward
pass each: the only Python loop is over those chunks.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Iterator

import numpy as np

import vizkit
from vizkit import Artifact, Option, Technique, hookimpl, kit

if TYPE_CHECKING:
    from vizkit import ModelGraph


# -- shared by both techniques ----------------------------------------------------------

def _features_and_scores(graph: "ModelGraph", inputs: np.ndarray, path: str, score: str) -> tuple[np.ndarray, np.ndarray]:
    """(the layer's N×h×w×K output, the N×classes scores) of a preprocessed batch, one pass."""
    import tensorflow as tf

    def build():
        probe = graph.probe([path], score=score)
        return tf.function(lambda x: probe(x, training=False), reduce_retracing=True)

    features, scores = kit.per_model(graph, ("probe", path, score), build)(tf.convert_to_tensor(inputs, dtype=tf.float32))
    return features.numpy(), scores.numpy()


def _resolve_layer(graph: "ModelGraph", layer: str | None, purpose: str) -> str:
    return graph.resolve(layer, kit.explainable_layer, purpose) if layer else kit.last_feature_map_layer(graph)[0]


def _chunks(total: int, size: int) -> Iterator[slice]:
    """Consecutive slices of at most ``size`` rows covering ``range(total)``."""
    for start in range(0, total, size):
        yield slice(start, min(start + size, total))


def _weighted_map(features: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """relu(Σ_k w_k A_k), each map divided by its maximum: N×h×w×K features, N×K weights."""
    return kit.normalize_heatmap(np.einsum("nhwk,nk->nhw", features.astype("float64"), weights))


# -- Score-CAM ----------------------------------------------------------------------------


def _bilinear_matrix(size_out: int, size_in: int) -> np.ndarray:
    """The size_out × size_in matrix of 1-D bilinear resizing with half-pixel centres (as
    OpenCV's and TensorFlow's), so that upsampling every channel is two matrix products."""
    source = np.clip((np.arange(size_out) + 0.5) * size_in / size_out - 0.5, 0, size_in - 1)
    low = np.floor(source).astype(int)
    high = np.minimum(low + 1, size_in - 1)
    matrix = np.zeros((size_out, size_in))
    np.add.at(matrix, (np.arange(size_out), low), 1 - (source - low))
    np.add.at(matrix, (np.arange(size_out), high), source - low)
    return matrix


def _masks(maps: np.ndarray, height: int, width: int) -> np.ndarray:
    """H_k = s(Up(A_k)) of M maps (M×h×w): bilinear upsampling to height×width, then each
    map's min-max normalization to [0, 1]; a constant map gives an all-zero mask."""
    rows = _bilinear_matrix(height, maps.shape[1]).astype("float32")
    columns = _bilinear_matrix(width, maps.shape[2]).astype("float32")
    up = rows @ maps.astype("float32") @ columns.T  # M×H×W, two batched matrix products
    low = up.min(axis=(1, 2), keepdims=True)
    spread = up.max(axis=(1, 2), keepdims=True) - low
    return np.divide(up - low, spread, out=np.zeros_like(up), where=spread > 0).astype("float32")


def _chosen_channels(features: np.ndarray, channels: int) -> np.ndarray:
    """N×K' channel indices per image: all of them, or the ``channels`` with the highest mean
    activation (ties to the lower index, so the choice is deterministic)."""
    count, _, _, depth = features.shape
    if channels <= 0 or channels >= depth:
        return np.broadcast_to(np.arange(depth), (count, depth))
    means = features.mean(axis=(1, 2))
    return np.argsort(-means, axis=1, kind="stable")[:, :channels]


def scorecam(
    model,
    batch: np.ndarray,
    layer: str | None = None,
    classes: list[int] | int | None = None,
    score: str = "probability",
    channels: int = 0,
    masks_per_pass: int = 64,
) -> tuple[np.ndarray, np.ndarray]:
    """(heatmaps, classes): Score-CAM of a preprocessed batch, N×h×w in [0, 1].

    Each channel A_k of the layer, upsampled bilinearly to the input size and min-max
    normalized to H_k, masks the preprocessed input; w_k = f_c(X ∘ H_k) − f_c(X_b) is how
    much the class score rises over the baseline X_b = 0 (the fully masked input: zero in
    the model's input space, the dataset mean for mean-subtracting preprocessing); the map
    is relu(Σ_k w_k A_k) over its maximum. ``score`` is f: ``probability`` (the paper's
    confidence) or ``logit``. ``channels`` > 0 keeps each image's channels with the highest
    mean activation (the others weigh 0); ``masks_per_pass`` masked copies go through one
    compiled forward pass. ``classes`` defaults to each image's top-1 class.
    """
    graph = vizkit.ModelGraph.of(model)
    path = _resolve_layer(graph, layer, "scorecam")
    inputs = np.asarray(batch, dtype="float32")
    features, scores = _features_and_scores(graph, inputs, path, score)
    targets = kit.target_classes(scores, classes)
    chosen = _chosen_channels(features, channels)
    images = np.repeat(np.arange(len(inputs)), chosen.shape[1])  # one row per (image, channel)
    channel_of_row, target_of_row = chosen.reshape(-1), targets[images]
    baseline = kit.class_scores(graph, np.zeros((1, *inputs.shape[1:]), "float32"), score, batch=1)[0]
    gains = np.zeros(len(images))
    constant = np.zeros(len(images), dtype=bool)
    for rows in _chunks(len(images), masks_per_pass):
        masks = _masks(features[images[rows], :, :, channel_of_row[rows]], *inputs.shape[1:3])  # M×H×W
        constant[rows] = ~masks.any(axis=(1, 2))
        masked = inputs[images[rows]] * masks[..., None]
        masked_scores = kit.class_scores(graph, masked, score, batch=masks_per_pass)
        gains[rows] = masked_scores[np.arange(len(masked)), target_of_row[rows]] - baseline[target_of_row[rows]]
    gains[constant] = 0.0  # X ∘ 0 is the baseline itself: exactly no increase
    weights = np.zeros((len(inputs), features.shape[-1]))
    weights[images, channel_of_row] = gains
    return _weighted_map(features, weights), targets


# -- Ablation-CAM -------------------------------------------------------------------------


def _ablation_runner(graph: "ModelGraph", path: str, score: str) -> Callable:
    """A compiled ``run(inputs, features, images, channels)``: the class scores of the model
    with the layer's output replaced by ``features[images[i]]`` with channel ``channels[i]``
    set to zero, one row per (image, channel) pair.

    The rest of the model is a Keras model whose inputs are the graph's input *and* the
    layer's traced output tensor: Keras builds a functional model from intermediate
    tensors by stopping the graph walk at them, so the layer's value is taken as given
    while anything that bypasses the layer (a residual branch) is still computed from
    the image. Nested and branching models work alike, since the graph is already
    flattened (vizkit's probes are built on its traced tensors). Where nothing bypasses
    the layer, the image input is simply unused.
    """
    import keras
    import tensorflow as tf

    def build():
        probe = graph.probe([path], score=score)
        image, (layer_output, scores) = probe.inputs[0], probe.outputs
        rest = keras.Model([image, layer_output], scores)

        @tf.function(reduce_retracing=True)
        def run(inputs, features, images, channels):
            kept = 1.0 - tf.one_hot(channels, tf.shape(features)[-1], dtype=features.dtype)
            ablated = tf.gather(features, images) * kept[:, None, None, :]
            return rest([tf.gather(inputs, images), ablated], training=False)

        return run

    return kit.per_model(graph, ("ablation", path, score), build)


def ablationcam(
    model,
    batch: np.ndarray,
    layer: str | None = None,
    classes: list[int] | int | None = None,
    score: str = "probability",
    channels_per_pass: int = 64,
) -> tuple[np.ndarray, np.ndarray]:
    """(heatmaps, classes): Ablation-CAM of a preprocessed batch, N×h×w in [0, 1].

    w_k = (y_c − y_c^k) / |y_c|: the fraction of the class score y_c lost when channel k of
    the layer's output is set to zero and the rest of the model runs (the paper divides
    by y_c, which is positive for its probability; the absolute value keeps a negative
    logit from flipping every sign); the map is relu(Σ_k w_k A_k) over its maximum.
    ``channels_per_pass`` ablated copies go through one compiled forward pass of the
    model from the layer on. ``classes`` defaults to each image's top-1 class.
    """
    import tensorflow as tf

    graph = vizkit.ModelGraph.of(model)
    path = _resolve_layer(graph, layer, "ablationcam")
    inputs = np.asarray(batch, dtype="float32")
    features, scores = _features_and_scores(graph, inputs, path, score)
    targets = kit.target_classes(scores, classes)
    count, depth = len(inputs), features.shape[-1]
    images, channels = (index.reshape(-1).astype("int32") for index in np.indices((count, depth)))
    run = _ablation_runner(graph, path, score)
    inputs_t, features_t = tf.constant(inputs), tf.constant(features)
    ablated = np.zeros(len(images))
    for rows in _chunks(len(images), channels_per_pass):
        row_scores = run(inputs_t, features_t, tf.constant(images[rows]), tf.constant(channels[rows])).numpy()
        ablated[rows] = row_scores[np.arange(len(row_scores)), targets[images[rows]]]
    original = scores[np.arange(count), targets].astype("float64")
    scale = np.abs(original)
    drops = original[:, None] - ablated.reshape(count, depth)
    weights = np.divide(drops, scale[:, None], out=np.zeros_like(drops), where=scale[:, None] > 0)
    return _weighted_map(features, weights), targets


# -- the plugin -----------------------------------------------------------------------


def _layer(context, name: str) -> tuple[str, str | None]:
    """(path, why it was chosen, or None when the user named it)."""
    if context.params["layer"]:
        return context.model.resolve(context.params["layer"], kit.explainable_layer, name), None
    return kit.last_feature_map_layer(context.model)


def _check_per_pass(value: int, context) -> None:
    """A forward pass holds its copies (the masked input, or the ablated layer output) and
    their activations: at most what fits (more rows than a batch has changes nothing)."""
    graph, params = context.model, context.params
    try:
        depth = graph.info(_layer(context, "a per-pass option")[0]).shape[-1]
    except (ValueError, KeyError):
        return  # no layer to explain: the technique says so when it runs
    channels = params.get("channels") or depth
    rows = params["batch"] * min(channels, depth)
    per_row = kit.activation_bytes(graph) + 2 * kit.image_bytes(graph)
    kit.check_memory(value, lambda n: min(n, rows) * per_row, "for the copies and their activations")


def _prepare(context, name: str, title: str) -> None:
    kit.require_classifier(context.model, title)
    path, why = _layer(context, name)
    if why:
        context.note(f"layer: {path}, {why}")
    _, note = kit.usable_score(context.model, context.params["score"])
    if note:
        context.note(note)


def _common_options(name: str) -> tuple[Option, ...]:
    return (
        kit.layer_option(name, kit.explainable_layer, "layer to explain; default: the last feature-map layer before the classifier"),
        kit.class_option(),
        kit.score_option("probability", "what is measured: the class probability (the paper) or its logit"),
        kit.top_option(),
        *kit.overlay_options(),
    )


def prepare_scorecam(context) -> None:
    _prepare(context, "scorecam", "Score-CAM")
    channels, depth = context.params["channels"], context.model.info(_layer(context, "scorecam")[0]).shape[-1]
    if 0 < channels < depth:
        context.note(f"channels: the {channels} of {depth} with the highest mean activation in each image; the others weigh 0")


def run_scorecam(context, batch) -> list[Artifact]:
    params = context.params
    path, _ = _layer(context, "scorecam")
    score, _ = kit.usable_score(context.model, params["score"])
    context.progress(f"{len(batch)} image(s)")
    heatmaps, classes = scorecam(
        context.model, batch.inputs, path, kit.resolve_class(context), score, params["channels"], params["masks_per_pass"]
    )
    return kit.heatmap_artifacts(context, batch, heatmaps, classes, layer=path)


def prepare_ablationcam(context) -> None:
    _prepare(context, "ablationcam", "Ablation-CAM")


def run_ablationcam(context, batch) -> list[Artifact]:
    params = context.params
    path, _ = _layer(context, "ablationcam")
    score, _ = kit.usable_score(context.model, params["score"])
    context.progress(f"{len(batch)} image(s)")
    heatmaps, classes = ablationcam(
        context.model, batch.inputs, path, kit.resolve_class(context), score, params["channels_per_pass"]
    )
    return kit.heatmap_artifacts(context, batch, heatmaps, classes, layer=path)


SCORECAM = Technique(
    name="scorecam",
    run_batch=run_scorecam,
    prepare=prepare_scorecam,
    description=(
        "Score-CAM (Wang et al. 2020): each channel, upsampled and min-max normalized, masks the model's "
        "(preprocessed) input, and weighs by how much the class score rises over the all-masked input; "
        "gradient-free, one forward pass per channel."
    ),
    accepts=kit.explainable_layer,
    comparable=True,
    by_default=False,
    options=(
        *_common_options("scorecam"),
        Option("channels", int, 0, "channels scored per image, those with the highest mean activation; 0: all", minimum=0),
        Option("masks_per_pass", int, 64, "masked copies per forward pass", minimum=1, check=_check_per_pass),
        kit.batch_option(4),
    ),
)

ABLATIONCAM = Technique(
    name="ablationcam",
    run_batch=run_ablationcam,
    prepare=prepare_ablationcam,
    description=(
        "Ablation-CAM (Desai & Ramaswamy 2020): channels weighted by the fraction of the class score "
        "lost when each is set to zero; gradient-free, the model run from the layer on."
    ),
    accepts=kit.explainable_layer,
    comparable=True,
    by_default=False,
    options=(
        *_common_options("ablationcam"),
        Option("channels_per_pass", int, 64, "ablated copies per forward pass", minimum=1, check=_check_per_pass),
        kit.batch_option(8),
    ),
)


TECHNIQUES = (SCORECAM, ABLATIONCAM)


@hookimpl
def register_techniques(register):
    for technique in TECHNIQUES:
        register(technique)
