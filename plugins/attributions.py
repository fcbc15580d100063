"""attributions: which input pixels a class score depends on, by its gradient.

The gradient attribution family, at the model's input resolution: vanilla gradients
(``saliency``), SmoothGrad, Integrated Gradients, Guided Backpropagation and Guided
Grad-CAM. Each gives, per image, a SIGNED attribution H×W×C float32 with respect to the
0-255 pixels (through the model's preprocessing, so models with different preprocessing
are comparable), kept as the artifact's array; the picture shows its magnitude
(``kit.attribution_map``). S_c is the class logit (``score=logit``, the papers) or the
model's output (``score=probability``); c is each image's top-1 class or the ``class``
option.

Everything that needs many gradients (SmoothGrad's noisy copies, Integrated Gradients'
path points) packs the copies of a whole batch of images into compiled gradient calls of
``per_pass`` rows (``kit.input_gradients``: one ``tf.function`` per model, traced once per
shape), so the only Python loops are over chunks and images.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Callable, Iterator, Sequence

import numpy as np

import vizkit
from vizkit import Artifact, Option, Technique, hookimpl, kit
from vizkit.plugins.gradcam import gradcam

if TYPE_CHECKING:
    from vizkit import ModelGraph

BASELINES = ("black", "mean", "blurred")
#: Gaussian kernels reach this many σ on each side (the blurred baseline).
BLUR_TRUNCATE = 3.0


def _identity(x):
    return x


# -- shared machinery --------------------------------------------------------------------


def _checked(model, pixels, technique: str) -> tuple["ModelGraph", np.ndarray]:
    """(graph, pixels as float32 N×H×W×C): a classifier and a batch of images, or ValueError."""
    graph = vizkit.ModelGraph.of(model)
    kit.require_classifier(graph, technique)
    pixels = np.asarray(pixels, dtype=np.float32)
    if pixels.ndim != 4:
        raise ValueError(f"{technique}: pixels must be N×H×W×C, got shape {pixels.shape}")
    return graph, pixels


def _clean_targets(graph, pixels, classes, preprocess, score) -> np.ndarray:
    """The classes to explain: ``classes``, or each image's top-1 on the clean image."""
    return kit.target_classes(kit.class_scores(graph, preprocess(pixels), score), classes)


def _chunks(images: int, copies: int, per_pass: int) -> Iterator[list[tuple[int, int, int]]]:
    """The ``images × copies`` gradient rows in chunks of ``per_pass`` rows, each chunk a
    list of (image, first copy, end copy) pieces, so a chunk can span several images."""
    chunk, size = [], 0
    for image in range(images):
        start = 0
        while start < copies:
            take = min(copies - start, per_pass - size)
            chunk.append((image, start, start + take))
            size, start = size + take, start + take
            if size == per_pass:
                yield chunk
                chunk, size = [], 0
    if chunk:
        yield chunk


def mean_gradients(
    graph: "ModelGraph",
    copies: Callable[[int], np.ndarray],
    count: int,
    targets: np.ndarray,
    preprocess: Callable = _identity,
    score: str = "logit",
    per_pass: int = 16,
) -> np.ndarray:
    """1/K Σ_k ∂S_c(copy_k)/∂x for each image (N×H×W×C float32).

    ``copies(i)`` gives image i's K = ``count`` copies (K×H×W×C pixels); the copies of all
    N = len(targets) images go through ``kit.input_gradients`` ``per_pass`` rows at a time,
    each row differentiated for its own image's class.
    """
    total: np.ndarray | None = None
    current, rows_of = -1, None
    for chunk in _chunks(len(targets), count, per_pass):
        rows, row_targets = [], []
        for image, first, end in chunk:
            if image != current:  # each image's copies are made once
                current, rows_of = image, np.asarray(copies(image), dtype=np.float32)
            rows.append(rows_of[first:end])
            row_targets.append(np.full(end - first, targets[image], dtype=np.int32))
        gradients, _ = kit.input_gradients(graph, np.concatenate(rows), np.concatenate(row_targets), preprocess, score)
        if total is None:
            total = np.zeros((len(targets), *gradients.shape[1:]), dtype=np.float64)
        offset = 0
        for image, first, end in chunk:
            total[image] += gradients[offset : offset + end - first].sum(axis=0, dtype=np.float64)
            offset += end - first
    return (total / count).astype(np.float32)


# -- vanilla gradients -------------------------------------------------------------------


def saliency(
    model, pixels, classes: int | Sequence[int] | None = None, preprocess: Callable = _identity, score: str = "logit"
) -> tuple[np.ndarray, np.ndarray]:
    """(attributions, classes): ∂S_c/∂x of N images (N×H×W×C, 0-255 pixels), signed,
    N×H×W×C float32 (Simonyan et al. 2014), and the classes explained (default top-1)."""
    graph, pixels = _checked(model, pixels, "saliency")
    return kit.input_gradients(graph, pixels, classes, preprocess, score)


# -- SmoothGrad --------------------------------------------------------------------------


def image_noise(image: np.ndarray, samples: int, noise: float, seed: int) -> np.ndarray:
    """SmoothGrad's ``samples`` noise images for ``image`` (H×W×C): standard normal draws
    of a fresh ``np.random.default_rng(seed)`` times σ = ``noise`` × (max − min) of its
    pixels, so an image's noise never depends on the other images."""
    sigma = np.float32(noise * (float(image.max()) - float(image.min())))
    return np.random.default_rng(seed).standard_normal((samples, *image.shape), dtype=np.float32) * sigma


def smoothgrad(
    model,
    pixels,
    classes: int | Sequence[int] | None = None,
    samples: int = 25,
    noise: float = 0.15,
    seed: int = 0,
    preprocess: Callable = _identity,
    per_pass: int = 16,
    score: str = "logit",
) -> tuple[np.ndarray, np.ndarray]:
    """(attributions, classes): SmoothGrad (Smilkov et al. 2017), the signed mean over
    ``samples`` noisy copies x + ε_k, ε_k ~ N(0, σ²), of ∂S_c(x + ε_k)/∂x, N×H×W×C float32;
    c is each image's top-1 class on the clean image unless ``classes`` says otherwise."""
    graph, pixels = _checked(model, pixels, "smoothgrad")
    if samples < 1 or per_pass < 1 or noise < 0:
        raise ValueError(f"smoothgrad: samples and per_pass must be at least 1 and noise not negative, got {samples}, {per_pass}, {noise}")
    targets = _clean_targets(graph, pixels, classes, preprocess, score)
    mean = mean_gradients(
        graph, lambda i: pixels[i] + image_noise(pixels[i], samples, noise, seed), samples, targets, preprocess, score, per_pass
    )
    return mean, targets


# -- Integrated Gradients ----------------------------------------------------------------


def blur_kernel(sigma: float) -> np.ndarray:
    """A normalized 1-D Gaussian of σ ``sigma`` reaching BLUR_TRUNCATE σ on each side."""
    radius = max(1, int(BLUR_TRUNCATE * sigma + 0.5))
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    kernel = np.exp(-0.5 * (x / sigma) ** 2)
    return kernel / kernel.sum()


def baselines(pixels, kind: str = "black", blur: float = 0.05) -> np.ndarray:
    """Integrated Gradients' baselines x' for N images (0-255 pixels), N×H×W×C float32.

    ``black``: all zeros; ``mean``: each channel filled with that channel's mean over the
    image; ``blurred``: the image under a Gaussian blur of σ = ``blur`` × its longer side
    (kernel to ±3σ, edges mirrored as OpenCV's BORDER_REFLECT_101 does).
    """
    pixels = np.asarray(pixels, dtype=np.float32)
    if kind == "black":
        return np.zeros_like(pixels)
    if kind == "mean":
        return np.broadcast_to(pixels.mean(axis=(1, 2), keepdims=True), pixels.shape).astype(np.float32)
    if kind == "blurred":
        import cv2

        if blur <= 0:
            raise ValueError(f"blur must be positive, got {blur}")
        kernel = blur_kernel(blur * max(pixels.shape[1:3])).astype(np.float32)
        blurred = [cv2.sepFilter2D(image, -1, kernel, kernel, borderType=cv2.BORDER_REFLECT_101) for image in pixels]
        return np.stack(blurred).reshape(pixels.shape).astype(np.float32)
    raise ValueError(f"baseline must be one of {', '.join(BASELINES)}, not {kind!r}")


def completeness_errors(graph, pixels, references, attributions, targets, preprocess=_identity, score="logit") -> np.ndarray:
    """|Σ attributions − (S_c(x) − S_c(x'))| / |S_c(x) − S_c(x')| per image (NaN where the
    score does not change along the path): how far the attributions are from the axiom."""
    count = len(pixels)
    scores = kit.class_scores(graph, preprocess(np.concatenate([pixels, references])), score)
    chosen = scores[np.arange(2 * count), np.concatenate([targets, targets])].astype(np.float64)
    change = chosen[:count] - chosen[count:]
    gap = np.abs(attributions.reshape(count, -1).sum(axis=1, dtype=np.float64) - change)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(change != 0, gap / np.abs(change), np.nan)


def integrated_gradients(
    model,
    pixels,
    classes: int | Sequence[int] | None = None,
    steps: int = 64,
    baseline: str = "black",
    blur: float = 0.05,
    preprocess: Callable = _identity,
    per_pass: int = 16,
    score: str = "logit",
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(attributions, classes, completeness errors): Integrated Gradients (Sundararajan et
    al. 2017) from the ``baseline`` x' (see :func:`baselines`), by the paper's right
    Riemann sum over m = ``steps`` points,

        (x − x') ⊙ 1/m Σ_{k=1..m} ∂S_c(x' + (k/m)(x − x'))/∂x,

    N×H×W×C float32; and per image the relative completeness error
    (:func:`completeness_errors`). The right sum leaves out the baseline itself, where a
    ReLU network's gradient is often degenerate (a black image with zero biases puts every
    ReLU at 0, whose gradient is 0); a ReLU network without biases is positively
    homogeneous, and there the right sum is exact.
    """
    graph, pixels = _checked(model, pixels, "integrated_gradients")
    if steps < 1 or per_pass < 1:
        raise ValueError(f"integrated_gradients: steps and per_pass must be at least 1, got {steps}, {per_pass}")
    references = baselines(pixels, baseline, blur)
    targets = _clean_targets(graph, pixels, classes, preprocess, score)
    path = (np.arange(1, steps + 1, dtype=np.float32) / steps).reshape(-1, 1, 1, 1)
    differences = pixels - references
    average = mean_gradients(
        graph, lambda i: references[i] + path * differences[i], steps, targets, preprocess, score, per_pass
    )
    attributions = differences * average
    return attributions, targets, completeness_errors(graph, pixels, references, attributions, targets, preprocess, score)


# -- Guided Backpropagation ----------------------------------------------------------------
#
# A guided copy of the model is rebuilt with keras.models.clone_model (public), calling the
# ORIGINAL layers (same weights, the model itself untouched) with every ReLU's backward
# pass replaced by the guided rule through tf.custom_gradient (public):
#     forward  y = min(max(x, 0), cap)                 (cap: ∞ for relu, 6 for relu6)
#     backward ∂/∂x = g · [x > 0] · [g > 0]
# ReLU6 is guided like ReLU: its upper clip is kept in the forward pass and ignored in the
# backward pass, so a unit above 6 still passes positive gradient.
#   - ReLU layers (no slope, no threshold), Activation("relu"/"relu6"), keras.ops.relu/relu6:
#     replaced by the guided ReLU;
#   - a layer with activation="relu" built in (Conv2D, Dense, ...): called as it is, then a
#     guided ReLU on its output, which is ≥ 0 (so the forward is unchanged); its backward
#     keeps g > 0 where the output is > 0, and the layer's own ReLU derivative adds nothing;
#   - a layer with activation="relu6" built in: its relu6 would zero the gradient above 6,
#     so it is rebuilt from its config with no activation, its weights copied from the
#     original (again before every use, so they never go stale), and guided-ReLU6'd;
#   - nested Functional and Sequential models: guided recursively; a layer Keras cannot
#     see into (a subclassed model or layer) keeps the gradient of whatever ReLU it holds.


def _guided_relu_layer():
    """The Keras layer class of the guided ReLU (made on first use: Keras loads here)."""
    if "layer" not in _GUIDED_RELU:
        import keras
        import tensorflow as tf

        class GuidedReLU(keras.layers.Layer):
            """min(max(x, 0), cap) forward; gradient g · [x > 0] · [g > 0] backward."""

            def __init__(self, cap: float | None = None, **kwargs):
                super().__init__(**kwargs)
                self.cap = cap

            def call(self, x):
                cap = self.cap

                @tf.custom_gradient
                def guided(x):
                    y = tf.nn.relu(x) if cap is None else tf.minimum(tf.nn.relu(x), tf.cast(cap, x.dtype))

                    def backward(g):
                        return g * tf.cast(x > 0, g.dtype) * tf.cast(g > 0, g.dtype)

                    return y, backward

                return guided(x)

            def compute_output_shape(self, input_shape):
                return input_shape

            def get_config(self):
                return {**super().get_config(), "cap": self.cap}

        _GUIDED_RELU["layer"] = GuidedReLU
    return _GUIDED_RELU["layer"]


_GUIDED_RELU: dict = {}
_CAPS = {"relu": None, "relu6": 6.0}


def _relu_cap(operation) -> tuple[bool, float | None]:
    """(is a plain ReLU, its cap): ReLU layers without slope or threshold, Activation
    layers and keras.ops of relu/relu6."""
    import keras

    if isinstance(operation, keras.layers.ReLU):
        config = operation.get_config()
        if not config.get("negative_slope") and not config.get("threshold"):
            cap = config.get("max_value")
            return True, None if cap is None else float(cap)
        return False, None
    if isinstance(operation, keras.layers.Activation):
        activation = operation.get_config().get("activation")
        return activation in _CAPS, _CAPS.get(activation)
    if not isinstance(operation, keras.layers.Layer):
        name = type(operation).__name__.lower()  # keras.ops.relu → Relu, relu6 → Relu6
        return name in _CAPS, _CAPS.get(name)
    return False, None


def _built_in_activation(layer) -> str | None:
    try:
        activation = layer.get_config().get("activation")
    except Exception:  # a custom layer without a config
        return None
    return activation if activation in _CAPS else None


class GuidedModel:
    """The guided copy of a model: ``model`` (a keras.Model), its ``graph``, and what was
    guided (``relus``: the ReLU calls, by path; ``capped``: how many of them clip from above,
    as ReLU6 does)."""

    def __init__(self, model):
        self._relu = _guided_relu_layer()
        self._copies: list[tuple] = []  # (original, rebuilt) layers with relu6 built in
        self._clones: dict[int, object] = {}  # a nested model used twice is guided once
        self.relus: list[str] = []
        self.capped = 0
        self.model = self._guide(model, "")
        self.graph = vizkit.ModelGraph.of(self.model)

    def _guide(self, model, prefix: str):
        import keras

        if id(model) in self._clones:
            return self._clones[id(model)]

        def call(layer, *args, **kwargs):
            return self._call(layer, prefix, *args, **kwargs)

        if isinstance(model, keras.Sequential):  # clone_model takes no call_function for these
            inputs = keras.Input(batch_shape=model.inputs[0].shape, dtype=model.inputs[0].dtype)
            x = inputs
            for layer in model.layers:
                x = call(layer, x)
            clone = keras.Model(inputs, x, name=model.name)
        else:
            clone = keras.models.clone_model(model, clone_function=lambda layer: layer, call_function=call)
        self._clones[id(model)] = clone
        return clone

    def _call(self, layer, prefix: str, *args, **kwargs):
        name = getattr(layer, "name", type(layer).__name__)
        if _nested_model(layer):
            return self._guide(layer, f"{prefix}{name}/")(*args, **kwargs)
        is_relu, cap = _relu_cap(layer)
        if is_relu:
            return self._guided(f"{prefix}{name}", cap, args[0])
        activation = _built_in_activation(layer)
        if activation == "relu":
            return self._guided(f"{prefix}{name}", None, layer(*args, **kwargs))
        if activation == "relu6":
            linear = type(layer).from_config({**layer.get_config(), "activation": "linear"})
            out = linear(*args, **kwargs)
            linear.set_weights(layer.get_weights())
            self._copies.append((layer, linear))
            return self._guided(f"{prefix}{name}", 6.0, out)
        return layer(*args, **kwargs)

    def _guided(self, path: str, cap: float | None, x):
        """The guided ReLU after ``path``; a layer called twice gets ``path#2``."""
        calls = sum(1 for seen in self.relus if seen.split("#")[0] == path)
        path = f"{path}#{calls + 1}" if calls else path
        self.relus.append(path)
        self.capped += cap is not None
        name = path.replace("/", "_").replace("#", "_")
        return self._relu(cap, name=f"{name}_guided")(x)

    def sync(self) -> None:
        """Copy the current weights into the layers rebuilt for a built-in relu6."""
        for original, rebuilt in self._copies:
            rebuilt.set_weights(original.get_weights())

    def describe(self) -> str:
        kinds = f", {self.capped} of them capped like ReLU6 (the cap ignored in the backward pass)" if self.capped else ""
        return f"{len(self.relus)} ReLU(s) guided{kinds}"


def _nested_model(layer) -> bool:
    """A nested model whose layers can be guided: Functional or Sequential."""
    import keras

    return isinstance(layer, keras.Sequential) or (isinstance(layer, keras.Model) and hasattr(layer, "operations"))


def guided_model(model) -> GuidedModel:
    """The guided copy of ``model`` (a keras.Model or ModelGraph), made once per model and
    kept while its graph lives; ValueError for a model without a ReLU to guide."""
    graph = vizkit.ModelGraph.of(model)
    guided = kit.per_model(graph, ("guided",), lambda: GuidedModel(graph.model))
    if not guided.relus:
        raise ValueError(
            f"guided backpropagation changes the gradient at ReLUs, and {graph.name} has none "
            "(ReLU, relu or relu6 activations); its plain gradient is the saliency technique"
        )
    guided.sync()
    return guided


def guided_backprop(
    model, pixels, classes: int | Sequence[int] | None = None, preprocess: Callable = _identity, score: str = "logit"
) -> tuple[np.ndarray, np.ndarray]:
    """(attributions, classes): Guided Backpropagation (Springenberg et al. 2015), the
    gradient of S_c with every ReLU's backward pass keeping only positive gradient where its
    input is positive, N×H×W×C float32 (signed: the first layer's weights can flip signs)."""
    graph, pixels = _checked(model, pixels, "guided_backprop")
    return kit.input_gradients(guided_model(graph).graph, pixels, classes, preprocess, score)


def guided_gradcam(
    model,
    pixels,
    layer: str | None = None,
    classes: int | Sequence[int] | None = None,
    preprocess: Callable = _identity,
    score: str = "logit",
) -> tuple[np.ndarray, np.ndarray]:
    """(attributions, classes): Guided Grad-CAM (Selvaraju et al. 2017), guided
    backpropagation ⊙ the Grad-CAM map of ``layer`` upsampled bilinearly to the input size
    (the same map for every channel), N×H×W×C float32."""
    graph, pixels = _checked(model, pixels, "guided_gradcam")
    heatmaps, targets = gradcam(graph, np.asarray(preprocess(pixels), dtype=np.float32), layer, classes, score)
    guided, _ = guided_backprop(graph, pixels, targets, preprocess, score)
    height, width = pixels.shape[1:3]
    upsampled = np.stack([kit.resize(heatmap, height, width, "bilinear") for heatmap in heatmaps])
    return guided * upsampled[..., None], targets


# -- the techniques ----------------------------------------------------------------------


def _score(context) -> str:
    return kit.usable_score(context.model, context.params["score"])[0]


def _prepare(name: str, explanation: Callable[[object, str], str]):
    """A ``prepare`` that checks the model and notes the score and how the map is made."""

    def prepare(context) -> None:
        kit.require_classifier(context.model, name)
        score, note = kit.usable_score(context.model, context.params["score"])
        if note:
            context.note(note)
        context.note(explanation(context, score))

    return prepare


def _artifacts(context, batch, attributions, classes, layer=None, extra=None) -> list[Artifact]:
    """One artifact per image: the signed attribution as its array, its magnitude shown."""
    return kit.heatmap_artifacts(
        context, batch, kit.attribution_map(attributions), classes, arrays=attributions, layer=layer, captions=extra
    )


def _shared_options(batch: int = 8) -> tuple[Option, ...]:
    return (
        kit.class_option(),
        kit.score_option("logit"),
        kit.top_option(),
        *kit.overlay_options(),
        kit.batch_option(batch),
    )


def _check_per_pass(value: int, context) -> None:
    """A compiled pass holds its rows' activations and gradients: at most what fits (a
    batch has ``batch`` × copies rows, so more per pass changes nothing)."""
    params, graph = context.params, context.model
    rows = params["batch"] * (params.get("samples") or params.get("steps") or 1)
    per_row = kit.activation_bytes(graph, gradients=True) + kit.image_bytes(graph)
    kit.check_memory(value, lambda n: min(n, rows) * per_row, "for the rows' activations and gradients")


def _check_copies(arrays: int) -> Callable:
    """Each image's copies are made up front, ``arrays`` arrays of them: at most what fits."""

    def check(value: int, context) -> None:
        per_copy = arrays * kit.image_bytes(context.model)
        kit.check_memory(value, lambda n: n * per_copy, "for each image's copies, made up front")

    return check


PER_PASS = Option("per_pass", int, 16, "gradient rows (copies of the batch's images) per compiled pass", minimum=1, check=_check_per_pass)
SHOWN = "shown: the largest |attribution| over the channels, capped at its 99th percentile"


def _run_saliency(context, batch) -> list[Artifact]:
    attributions, classes = saliency(context.model, batch.pixels, kit.resolve_class(context), context.preprocess, _score(context))
    return _artifacts(context, batch, attributions, classes)


SALIENCY = Technique(
    name="saliency",
    run_batch=_run_saliency,
    prepare=_prepare("saliency", lambda context, score: f"the gradient of the class {score} with respect to the 0-255 pixels, ∂S_c/∂x; {SHOWN}"),
    description="Vanilla gradient saliency: the gradient of the class score with respect to the input pixels (Simonyan et al. 2014).",
    comparable=True,
    by_default=False,
    options=_shared_options(8),
)


def _run_smoothgrad(context, batch) -> list[Artifact]:
    p = context.params
    attributions, classes = smoothgrad(
        context.model, batch.pixels, kit.resolve_class(context), p["samples"], p["noise"], p["seed"],
        context.preprocess, p["per_pass"], _score(context),
    )
    return _artifacts(context, batch, attributions, classes)


SMOOTHGRAD = Technique(
    name="smoothgrad",
    run_batch=_run_smoothgrad,
    prepare=_prepare("smoothgrad", lambda context, score: (
        f"the mean of ∂S_c/∂x (S_c: the class {score}) over {context.params['samples']} noisy copies x + ε, "
        f"ε ~ N(0, σ²), σ = {context.params['noise']:g} × (max − min) of the image's pixels, "
        f"noise seeded per image with {context.params['seed']}; {SHOWN}"
    )),
    description="SmoothGrad: the input gradient of the class score averaged over noisy copies of the image (Smilkov et al. 2017).",
    comparable=True,
    by_default=False,
    options=(
        Option("samples", int, 25, "noisy copies averaged per image", minimum=1, check=_check_copies(3)),
        Option("noise", float, 0.15, "noise σ as a fraction of the image's (max − min) pixel range", minimum=0),
        Option("seed", int, 0, "seed of each image's NumPy noise"),
        PER_PASS,
        *_shared_options(8),
    ),
)


#: A completeness error above this gets a note asking for more steps.
COARSE = 0.05


def _percent(error: float) -> str:
    return "n/a (S_c(x) = S_c(x'))" if math.isnan(error) else f"{100 * error:.2f} %"


def _run_integrated_gradients(context, batch) -> list[Artifact]:
    p = context.params
    attributions, classes, errors = integrated_gradients(
        context.model, batch.pixels, kit.resolve_class(context), p["steps"], p["baseline"], p["blur"],
        context.preprocess, p["per_pass"], _score(context),
    )
    context.note(
        "completeness error |Σ a − (S_c(x) − S_c(x'))| / |S_c(x) − S_c(x')|: "
        + ", ".join(f"{image.id} {_percent(error)}" for image, error in zip(batch.images, errors))
    )
    coarse = [image.id for image, error in zip(batch.images, errors) if error > COARSE]
    if coarse:
        context.note(
            f"{', '.join(coarse)}: completeness error above {COARSE:.0%}, so {p['steps']} steps sample the path "
            "too coarsely (the score changes sharply along it); raise integrated_gradients.steps"
        )
    return _artifacts(context, batch, attributions, classes, extra=[f"completeness error {_percent(e)}" for e in errors])


def _baseline_phrase(params) -> str:
    return {
        "black": "the black image (0 in 0-255 pixels)",
        "mean": "each channel's mean over the image",
        "blurred": f"the image under a Gaussian blur of σ = {params['blur']:g} × its longer side",
    }[params["baseline"]]


INTEGRATED_GRADIENTS = Technique(
    name="integrated_gradients",
    run_batch=_run_integrated_gradients,
    prepare=_prepare("integrated_gradients", lambda context, score: (
        f"(x − x') ⊙ the path integral of ∂S_c/∂x (S_c: the class {score}) from the baseline x' = "
        f"{_baseline_phrase(context.params)} to x, by the right Riemann sum over {context.params['steps']} points "
        f"x' + (k/m)(x − x'), k = 1..m; {SHOWN}"
    )),
    description="Integrated Gradients: the gradient integrated along the straight path from a baseline to the image (Sundararajan et al. 2017).",
    comparable=True,
    by_default=False,
    options=(
        Option("steps", int, 64, "points of the Riemann sum along the path (one gradient each)", minimum=1, maximum=4096, check=_check_copies(2)),
        Option("baseline", str, "black", "black: zeros; mean: each channel's mean; blurred: a Gaussian blur of the image", choices=BASELINES),
        Option("blur", float, 0.05, "σ of the blurred baseline, as a fraction of the image's longer side", minimum=0.001, maximum=0.25),
        PER_PASS,
        *_shared_options(8),
    ),
)


def _prepare_guided(name: str, more: Callable[[object], str]):
    """Notes what was guided; a model without ReLUs fails the technique here."""

    def explanation(context, score) -> str:
        guided = guided_model(context.model)
        return (
            f"{more(context)}gradients of the class {score} through a copy of the model whose ReLUs pass only "
            f"positive gradient where their input is positive; {guided.describe()}; {SHOWN}"
        )

    return _prepare(name, explanation)


def _run_guided_backprop(context, batch) -> list[Artifact]:
    attributions, classes = guided_backprop(context.model, batch.pixels, kit.resolve_class(context), context.preprocess, _score(context))
    return _artifacts(context, batch, attributions, classes)


GUIDED_BACKPROP = Technique(
    name="guided_backprop",
    run_batch=_run_guided_backprop,
    prepare=_prepare_guided("guided_backprop", lambda context: ""),
    description="Guided Backpropagation: the input gradient with negative gradients stopped at every ReLU (Springenberg et al. 2015).",
    comparable=True,
    by_default=False,
    options=_shared_options(8),
)


def _gradcam_layer(context) -> tuple[str, str | None]:
    """(path, why it was chosen, or None when the user named it)."""
    if context.params["layer"]:
        return context.model.resolve(context.params["layer"], kit.explainable_layer, "guided_gradcam"), None
    return kit.last_feature_map_layer(context.model)


def _run_guided_gradcam(context, batch) -> list[Artifact]:
    path, _ = _gradcam_layer(context)
    attributions, classes = guided_gradcam(
        context.model, batch.pixels, path, kit.resolve_class(context), context.preprocess, _score(context)
    )
    return _artifacts(context, batch, attributions, classes, layer=path)


def _guided_gradcam_layer_phrase(context) -> str:
    path, why = _gradcam_layer(context)
    return f"Grad-CAM of layer {path}{f' — {why} —' if why else ''} upsampled bilinearly to the input, times the "


GUIDED_GRADCAM = Technique(
    name="guided_gradcam",
    run_batch=_run_guided_gradcam,
    prepare=_prepare_guided("guided_gradcam", _guided_gradcam_layer_phrase),
    description="Guided Grad-CAM: guided backpropagation times the Grad-CAM map upsampled to the input (Selvaraju et al. 2017).",
    accepts=kit.explainable_layer,
    comparable=True,
    by_default=False,
    options=(
        kit.layer_option("guided_gradcam", kit.explainable_layer, "Grad-CAM's layer; default: the last feature-map layer before the classifier"),
        *_shared_options(8),
    ),
)

TECHNIQUES = (SALIENCY, SMOOTHGRAD, INTEGRATED_GRADIENTS, GUIDED_BACKPROP, GUIDED_GRADCAM)


@hookimpl
def register_techniques(register):
    for technique in TECHNIQUES:
        register(technique)
