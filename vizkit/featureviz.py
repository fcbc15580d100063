"""Feature visualization by optimizing an input: image parameterizations, transformation
robustness, optimizers, objectives and the compiled ascent that joins them.

Two parameterizations. ``pixel`` is the chapter's: the input itself, in 0-255, moved by
RMS-normalized gradient steps. ``fourier`` is Olah et al.'s (Distill, "Feature
Visualization", 2017; Lucid's ``fft_image`` + ``to_valid_rgb``): the image is the inverse
real FFT of a learned spectrum scaled by 1/frequency, so every frequency starts with the
same energy per unit of natural-image contrast and gradient steps do not pile up in the
highest frequencies; its colours are decorrelated with the square root of ImageNet's
colour covariance, and a sigmoid keeps it in range. Optimized with Adam.

Everything runs as one ``tf.function`` over a batch (each element its own channel or
class), traced once per shape; the random transforms are stateless and seeded by
(seed, step), so a result depends only on its options, not on how the steps are split
into calls.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np

from vizkit import kit

__all__ = [
    "COLOR_CORRELATION", "FOURIER_IMAGE_SCALE", "FOURIER_INIT_SD", "JITTER_PER_224PX", "LOSS_SCALES",
    "OPTIMIZERS", "PARAMETERIZATIONS", "PRECISIONS", "Optimizer", "Parameterization", "ROBUST_ANGLES",
    "ROBUST_SCALES", "adam", "affine_matrix", "ascend_in_calls", "ascent", "channel_mean", "class_score",
    "decorrelate_colors", "diversity", "fast_precisions", "fourier", "fourier_scale", "high_frequency_share",
    "in_precision", "neuron", "normalized_steps", "pixel", "pixel_start", "robust_transform",
]

#: Lucid's square root of ImageNet's RGB colour covariance (its SVD square root), the
#: matrix that maps decorrelated colour channels to RGB; normalized so the largest column
#: has norm 1, as Lucid does.
COLOR_CORRELATION_SVD_SQRT = np.asarray(
    [[0.26, 0.09, 0.02], [0.27, 0.00, -0.05], [0.27, -0.09, 0.03]], dtype="float32"
)
COLOR_CORRELATION = COLOR_CORRELATION_SVD_SQRT / np.max(np.linalg.norm(COLOR_CORRELATION_SVD_SQRT, axis=0))

#: Lucid's initial spread of the spectrum, and its scale of the image it gives.
FOURIER_INIT_SD = 0.01
FOURIER_IMAGE_SCALE = 1 / 4


#: Olah et al.'s transformation robustness (Lucid's ``standard_transforms``): scales and
#: angles (degrees) drawn per image and step; the shift's reach in pixels per 224 px of
#: image side (Lucid's ``jitter(8)`` and ``jitter(4)`` are random crops: ±4 and ±2 px).
ROBUST_SCALES = tuple(1 + (i - 5) / 50 for i in range(11))
ROBUST_ANGLES = tuple(range(-10, 11)) + (0,) * 5
JITTER_PER_224PX = 6


@dataclass(frozen=True)
class Parameterization:
    """How the optimized parameters of images of one size become the images.

    ``init(count, seed)``: the starting parameters, float32 with the batch first.
    ``to_pixels(params)``: TensorFlow ops, the images in 0-255 (batch, height, width,
    channels). ``display(pixels)``: uint8 pictures of the final pixels (NumPy).
    """

    name: str
    init: Callable[[int, int], np.ndarray]
    to_pixels: Callable
    display: Callable[[np.ndarray], np.ndarray]


def pixel_start(count: int, height: int, width: int, channels: int, seed: int) -> np.ndarray:
    """The chapter's start: gray plus noise, uniform [0, 1) × 20 + 128, in pixel space."""
    rng = np.random.default_rng(seed)
    return (rng.random((count, height, width, channels)) * 20 + 128).astype("float32")


def pixel(height: int, width: int, channels: int) -> Parameterization:
    """The chapter's parameterization: the pixels themselves (0-255) from its gray noise,
    shown after its contrast normalization (:func:`vizkit.kit.deprocess_pattern`)."""
    return Parameterization(
        "pixel",
        lambda count, seed: pixel_start(count, height, width, channels, seed),
        lambda params: params,
        lambda pixels: np.stack([kit.deprocess_pattern(x) for x in pixels]),
    )


def fourier_scale(height: int, width: int, decay_power: float = 1.0) -> np.ndarray:
    """Per-frequency scale of the spectrum, height × (width // 2 + 1): 1/|f|^decay_power
    (|f| in cycles per pixel, clamped below at 1/max side), × sqrt(height × width)."""
    fy = np.fft.fftfreq(height)[:, None]
    fx = np.fft.rfftfreq(width)[None, :]
    frequencies = np.sqrt(fx * fx + fy * fy)
    scale = 1.0 / np.maximum(frequencies, 1.0 / max(height, width)) ** decay_power
    return (scale * math.sqrt(height * width)).astype("float32")


def decorrelate_colors(image, channels: int):
    """RGB from decorrelated colour channels, by :data:`COLOR_CORRELATION` (the identity
    unless there are 3 channels: no colour statistics are known for others)."""
    import tensorflow as tf

    if channels != 3:
        return image
    return tf.tensordot(image, tf.constant(COLOR_CORRELATION.T), axes=1)


def fourier(height: int, width: int, channels: int, decay_power: float = 1.0) -> Parameterization:
    """Olah et al.'s parameterization: a spectrum (batch, 2 (real, imaginary), channels,
    height, width // 2 + 1) from N(0, 0.01²), scaled by :func:`fourier_scale`, inverse
    real FFT, ÷ 4, colours decorrelated, sigmoid, × 255. Shown as it is."""
    import tensorflow as tf

    scale = tf.constant(fourier_scale(height, width, decay_power))

    def init(count: int, seed: int) -> np.ndarray:
        shape = (count, 2, channels, height, width // 2 + 1)
        return (np.random.default_rng(seed).normal(size=shape) * FOURIER_INIT_SD).astype("float32")

    def to_pixels(params):
        spectrum = tf.complex(params[:, 0] * scale, params[:, 1] * scale)
        image = tf.signal.irfft2d(spectrum, fft_length=[height, width])  # batch, channels, height, width
        image = tf.transpose(image, (0, 2, 3, 1)) * FOURIER_IMAGE_SCALE
        return 255 * tf.sigmoid(decorrelate_colors(image, channels))

    return Parameterization("fourier", init, to_pixels, lambda pixels: np.clip(np.rint(pixels), 0, 255).astype("uint8"))


PARAMETERIZATIONS = {"pixel": pixel, "fourier": fourier}


def high_frequency_share(pixels: np.ndarray, cutoff: float = 0.25) -> np.ndarray:
    """Per image (N×H×W×C): the share of the power spectrum of its gray (the channels'
    mean, its own mean removed) above ``cutoff`` cycles per pixel (default: half the
    Nyquist frequency). White noise has about 0.80 there, the area of the frequency
    square outside that radius; natural photos a few percent."""
    gray = np.asarray(pixels, dtype="float64").mean(-1)
    gray = gray - gray.mean(axis=(1, 2), keepdims=True)
    power = np.abs(np.fft.fft2(gray)) ** 2
    radius = np.hypot(np.fft.fftfreq(gray.shape[1])[:, None], np.fft.fftfreq(gray.shape[2])[None, :])
    return power[:, radius > cutoff].sum(1) / np.maximum(power.sum((1, 2)), 1e-30)


# -- transformation robustness ---------------------------------------------------------------


def affine_matrix(scale, angle, shift, height: int, width: int):
    """Per image, the map (``keras.ops.image.affine_transform``'s 8 numbers, from output to
    input pixel) that scales by ``scale``, rotates by ``angle`` (radians) about the centre
    and then shifts by ``shift`` (x, y pixels): OpenCV's ``getRotationMatrix2D`` plus the
    shift, inverted."""
    import tensorflow as tf

    cx, cy = (width - 1) / 2, (height - 1) / 2
    cos, sin = tf.cos(angle) / scale, tf.sin(angle) / scale
    x, y = cx + shift[:, 0], cy + shift[:, 1]  # where the centre goes
    zero = tf.zeros_like(cos)
    return tf.stack([cos, -sin, cx - cos * x + sin * y, sin, cos, cy - sin * x - cos * y, zero, zero], axis=1)


def robust_transform(size: int, seed: int, count: int, jitter: int | None = None) -> Callable:
    """Olah et al.'s transformation robustness as one random affine map per image and step:
    a scale from :data:`ROBUST_SCALES`, a rotation from :data:`ROBUST_ANGLES` and a shift
    of up to ``jitter`` pixels each way (default: Lucid's ±6 per 224 px of ``size``), about the
    centre, with gray (127.5) where the map leaves the image, as Lucid's gray padding.

    Returns ``transform(pixels, ids, step)``: ``ids`` says which of the ``count`` images
    each batch element is, so an image's transforms do not depend on the batching.
    Stateless and seeded by (``seed``, step).
    """
    import keras
    import tensorflow as tf

    jitter = max(1, round(size * JITTER_PER_224PX / 224)) if jitter is None else jitter
    scales = tf.constant(ROBUST_SCALES, tf.float32)
    angles = tf.constant(np.radians(ROBUST_ANGLES), tf.float32)

    def transform(pixels, ids, step):
        draws = tf.random.stateless_uniform((count, 4), seed=tf.stack([tf.constant(seed, tf.int32), tf.cast(step, tf.int32)]))
        draws = tf.gather(draws, ids)
        scale = tf.gather(scales, tf.cast(draws[:, 0] * len(ROBUST_SCALES), tf.int32))
        angle = tf.gather(angles, tf.cast(draws[:, 1] * len(ROBUST_ANGLES), tf.int32))
        shift = tf.round((draws[:, 2:] * 2 - 1) * jitter)
        matrix = affine_matrix(scale, angle, shift, pixels.shape[1], pixels.shape[2])
        return keras.ops.image.affine_transform(pixels, matrix, interpolation="bilinear", fill_mode="constant", fill_value=127.5)

    return transform


# -- optimizers ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Optimizer:
    """``start(params)``: the optimizer's state (a tuple of arrays) at the first step;
    ``update(params, grads, state, step)``: (params, state) after a step up the gradient
    (TensorFlow ops; ``step`` counts from 0)."""

    name: str
    start: Callable
    update: Callable


def normalized_steps(step: float) -> Optimizer:
    """The chapter's ascent: ``x += step × grads / (RMS(grads) + 1e-5)``, RMS per image."""
    import tensorflow as tf

    def update(params, grads, state, _step):
        axes = list(range(1, len(params.shape)))
        norms = tf.sqrt(tf.reduce_mean(tf.square(grads), axis=axes, keepdims=True))
        return params + step * grads / (norms + 1e-5), state

    return Optimizer("normalized", lambda params: (), update)


def adam(lr: float, beta1: float = 0.9, beta2: float = 0.999, epsilon: float = 1e-8) -> Optimizer:
    """Adam (Kingma & Ba), ascending; Lucid's optimizer for feature visualization."""
    import tensorflow as tf

    def update(params, grads, state, step):
        m, v = state
        m = beta1 * m + (1 - beta1) * grads
        v = beta2 * v + (1 - beta2) * tf.square(grads)
        t = tf.cast(step, tf.float32) + 1
        corrected = lr * tf.sqrt(1 - beta2**t) / (1 - beta1**t)
        return params + corrected * m / (tf.sqrt(v) + epsilon), (m, v)

    return Optimizer("adam", lambda params: (np.zeros_like(params), np.zeros_like(params)), update)


OPTIMIZERS = {"normalized": normalized_steps, "adam": adam}


# -- objectives ------------------------------------------------------------------------------


def channel_mean(activations, onehot):
    """Per image: the mean over positions of its own channel (the chapter's objective)."""
    import tensorflow as tf

    return tf.reduce_sum(tf.reduce_mean(activations, axis=(1, 2)) * onehot, axis=-1)


def neuron(activations, onehot):
    """Per image: its own channel at the centre position of the layer's output."""
    import tensorflow as tf

    height, width = tf.shape(activations)[1], tf.shape(activations)[2]
    return tf.reduce_sum(activations[:, height // 2, width // 2, :] * onehot, axis=-1)


def class_score(scores, onehot):
    """Per image: its own class's score (a logit, for class visualization)."""
    import tensorflow as tf

    return tf.reduce_sum(scores * onehot, axis=-1)


def diversity(activations, variants: int):
    """Per image: Lucid's diversity penalty within its group of ``variants`` consecutive
    images (the patterns of one target): the summed cosine similarity of its activations'
    Gram matrix with each other member's. Summed over a group and subtracted (× a
    weight) from the summed objective, it is ``variants`` × Lucid's ``objective −
    weight × diversity`` (Lucid averages the objective over the batch and divides the
    pairs' sum by the batch size). It pushes the patterns of one channel apart in style."""
    import tensorflow as tf

    batch, channels = tf.shape(activations)[0], activations.shape[-1]
    flat = tf.reshape(activations, (batch, -1, channels))
    grams = tf.linalg.matmul(flat, flat, transpose_a=True)
    grams = tf.math.l2_normalize(tf.reshape(grams, (batch // variants, variants, -1)), axis=-1)
    similarity = tf.linalg.matmul(grams, grams, transpose_b=True)  # groups × variants × variants
    others = tf.reduce_sum(similarity, axis=-1) - tf.linalg.diag_part(similarity)
    return tf.reshape(others, (batch,))


# -- the ascent --------------------------------------------------------------------------------


def ascent(
    probe, objective: Callable, parameterization: Parameterization, optimizer: Optimizer,
    preprocess: Callable = lambda x: x, transform: Callable | None = None, loss_scale: float = 1.0,
):
    """A compiled ``ascend(params, state, onehot, ids, first, steps) -> (params, state)``.

    Runs ``steps`` (a scalar int32 tensor: one trace serves every call) optimizer steps
    from step number ``first``, each up ``objective(probe(preprocess(pixels)), onehot)``,
    a score per image; the pixels come from ``parameterization`` and, when a
    ``transform(pixels, ids, step)`` is given, are transformed before the model sees them.
    ``loss_scale`` multiplies the objective: float16 layers then pass gradients too small
    for float16 (a channel mean's: about 1e-8 to 1e-6) without flushing them to zero; both
    optimizers are (up to their epsilon) indifferent to the gradient's scale.
    """
    import tensorflow as tf

    @tf.function(reduce_retracing=True)
    def ascend(params, state, onehot, ids, first, steps):
        for i in tf.range(steps):
            step = first + i
            with tf.GradientTape(watch_accessed_variables=False) as tape:
                tape.watch(params)
                pixels = parameterization.to_pixels(params)
                if transform is not None:
                    pixels = transform(pixels, ids, step)
                outputs = tf.nest.map_structure(lambda t: tf.cast(t, tf.float32), probe(preprocess(pixels), training=False))
                total = tf.reduce_sum(objective(outputs, onehot)) * loss_scale
            params, state = optimizer.update(params, tape.gradient(total, params), state, step)
        return params, state

    return ascend


#: The ascent runs as compiled calls of about this many seconds each (the steps per call
#: adapt to it), so Ctrl-C, which Python sees between calls, stops it within a second or so.
SECONDS_PER_CALL = 0.25
#: Progress is reported at most this often during a long ascent.
PROGRESS_EVERY_S = 2.0


def ascend_in_calls(
    ascend, params, state, onehot, ids, steps: int, steps_per_call: int | None = None,
    progress: Callable[[int], None] = lambda done: None,
):
    """(params, state) after ``steps`` steps of an :func:`ascent`, run as several compiled
    calls: the same numbers as one call of all the steps, but Python (and so Ctrl-C) gets
    control between calls. ``steps_per_call`` None: start at 1 and adapt to about
    SECONDS_PER_CALL per call (at most 4 times more steps than the call before).
    ``progress(done)`` now and then."""
    import tensorflow as tf

    done, per_call, reported = 0, steps_per_call or 1, time.monotonic()
    while done < steps:
        take = min(per_call, steps - done)
        started = time.perf_counter()
        params, state = ascend(params, state, onehot, ids, tf.constant(done, tf.int32), tf.constant(take, tf.int32))
        elapsed = time.perf_counter() - started
        done += take
        if steps_per_call is None:  # the first call also traces: it only ever makes calls shorter
            per_call = max(1, min(4 * take, int(take * SECONDS_PER_CALL / max(elapsed, 1e-6))))
        if done < steps and time.monotonic() - reported >= PROGRESS_EVERY_S:
            progress(done)
            reported = time.monotonic()
    return params, state


# -- precision ---------------------------------------------------------------------------------

#: The precisions an ascent can compute in; the lower ones only where hardware makes them fast.
PRECISIONS = ("float32", "bfloat16", "float16")
#: The ``loss_scale`` of an ascent per precision: float16's range ends at 6e-8.
LOSS_SCALES = {"float32": 1.0, "bfloat16": 1.0, "float16": 2.0**12}


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("flags"):
                    return set(line.partition(":")[2].split())
    except OSError:
        pass
    return set()


def fast_precisions() -> dict[str, str]:
    """{precision: the hardware that computes it faster than float32} on this machine:
    a GPU of compute capability 7.0+ (float16) or 8.0+ (also bfloat16), where TensorFlow
    runs the model; without a GPU, a CPU with AVX-512 BF16 or AMX (bfloat16). Elsewhere a
    lower precision is emulated, slower than float32."""
    import tensorflow as tf

    found: dict[str, str] = {}
    gpus = tf.config.list_physical_devices("GPU")
    for gpu in gpus:
        major, minor = tf.config.experimental.get_device_details(gpu).get("compute_capability") or (0, 0)
        where = f"a GPU of compute capability {major}.{minor}"
        if (major, minor) >= (7, 0):
            found.setdefault("float16", where)
        if (major, minor) >= (8, 0):
            found.setdefault("bfloat16", where)
    units = sorted(_cpu_flags() & {"avx512_bf16", "amx_bf16"})
    if not gpus and units:
        found["bfloat16"] = f"a CPU with {' and '.join(units)}"
    return found


def in_precision(model, precision: str):
    """``model`` itself for float32, else a copy with the same weights whose layers
    compute in ``precision`` (Keras' ``mixed_`` policy: float32 weights, nested models
    too), from the weights it has now; such a copy is returned as it is. The ascent casts
    what the probe returns back to float32."""
    import keras

    if model.__dict__.get("_vizkit_precision", "float32") == precision:
        return model  # float32, or a copy this function made
    policy = keras.DTypePolicy(f"mixed_{precision}")

    def clone(layer):
        return layer.__class__.from_config(layer.get_config() | {"dtype": policy})

    copy = keras.models.clone_model(model, clone_function=clone, recursive=True)
    copy.set_weights(model.get_weights())
    copy.__dict__["_vizkit_precision"] = precision  # beside Keras' attribute tracking
    return copy
