"""Explainers on EfficientNet-Lite0: vizkit's techniques beside compiled bounds and peers.

Run by hand, never in CI (about 15 minutes on 2 cores; peers installed outside the project):

    python benchmarks/bench_explainers.py                      # every comparable technique installed
    python benchmarks/bench_explainers.py -t gradcam,layercam  # some of them
    python benchmarks/bench_explainers.py --peers none         # vizkit and the bounds only
    python benchmarks/bench_explainers.py --model ResNet50 -t gradcam --peers none   # XLA without depthwise convs

Every technique runs through its own ``Technique.apply(context)`` (what a notebook or the
CLI pays, heatmap pictures included) on the same 32 images, batch 32 (perturbation methods:
their own batch), after one warm-up call on the same batch, so tracing is excluded. Methods
with many passes per image (perturbation, SmoothGrad, Integrated Gradients) run once on
``--slow-images`` images. Beside them, in the same process:

* the bounds: a compiled forward pass of the whole model, and a compiled forward + backward
  pass to the Grad-CAM layer (features and the gradient of each image's class logit with
  respect to them): the practical limit for gradient CAMs; each also under XLA
  (``jit_compile=True``). The forward + backward bound is timed again alternately with
  every method, and each method is divided by the bound of its own window: on a shared
  machine the load moves within seconds;
* vizkit's Grad-CAM path with ``jit_compile=True``: a local copy of ``kit.layer_gradients``
  (this script may not change vizkit), to see what XLA would gain there, and single layers
  of the model under XLA, to see why.

Peers run in their own virtual environments, in a subprocess each, after vizkit's part (so
they never share the CPU with it), and time the same bound alternately with each method:

    python -m venv --system-site-packages /tmp/bench-tfkv && /tmp/bench-tfkv/bin/pip install tf-keras-vis
    python -m venv /tmp/bench-xplique && /tmp/bench-xplique/bin/pip install xplique   # its own TensorFlow

Neither is a dependency of vizkit. On a shared machine compare ratios from one run, not
seconds between runs.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np

#: The gradient CAMs: the issue's target is each within 1.2× of the forward + backward bound.
GRADIENT_CAMS = ("gradcam", "gradcampp", "xgradcam", "layercam", "hirescam")
#: Techniques that score many perturbed copies per image: they keep their own image batch
#: (their passes are batched by masks, not by images).
PERTURBATION = ("scorecam", "ablationcam", "occlusion", "rise")
#: Techniques with many passes per image (perturbed or noisy copies, path steps): timed once,
#: on ``--slow-images`` images (minutes each on 32 images on 2 cores).
MANY_PASSES = (*PERTURBATION, "smoothgrad", "vargrad", "integrated_gradients")
#: vizkit technique → the tf-keras-vis class that computes the same thing.
TFKV_PEERS = {
    "gradcam": "Gradcam",
    "gradcampp": "GradcamPlusPlus",
    "layercam": "Layercam",
    "scorecam": "Scorecam",
    "saliency": "Saliency",
    "smoothgrad": "SmoothGrad",
}
TARGET_BOUND_RATIO = 1.2


# -- timing ---------------------------------------------------------------------------------


def timed(call, repeat: int) -> dict:
    """Seconds of ``call()`` after one warm-up call (tracing excluded): best and median."""
    call()
    times = []
    for _ in range(repeat):
        began = time.perf_counter()
        call()
        times.append(time.perf_counter() - began)
    return {"best": min(times), "median": statistics.median(times), "runs": len(times)}


# -- the bound: plain TensorFlow, so each environment measures the same thing ----------------


def logits_head(model):
    """The final Dense layer, whose kernel and bias give the logits (before its softmax)."""
    last = model.layers[-1]
    if type(last).__name__ != "Dense":
        raise SystemExit(f"the bound expects a final Dense layer, not {type(last).__name__}")
    return last


def bound_functions(model, layer: str, xla: bool):
    """(forward, forward + backward to ``layer``) as compiled functions of a preprocessed batch.

    The backward pass starts at each image's class logit (the Dense before the softmax) and
    stops at the layer: what every gradient CAM needs, computed once.
    """
    import keras
    import tensorflow as tf

    head = logits_head(model)
    probe = keras.Model(model.inputs, [model.get_layer(layer).output, head.input])

    @tf.function(jit_compile=xla)
    def forward(x):
        return model(x, training=False)

    @tf.function(jit_compile=xla)
    def forward_backward(x, targets):
        with tf.GradientTape() as tape:
            features, pooled = probe(x, training=False)
            logits = tf.matmul(pooled, head.kernel) + head.bias
            selected = tf.gather(logits, targets, axis=1, batch_dims=1)
        return features, tape.gradient(selected, features)

    return forward, forward_backward


class Bound:
    """The forward + backward bound on one batch, compiled once and timed beside each method,
    alternating with it: on a shared machine the load moves within seconds, so each method is
    divided by the bound measured in the same window."""

    def __init__(self, model, inputs: np.ndarray, classes: np.ndarray, layer: str):
        import tensorflow as tf

        self.x, self.targets = tf.constant(inputs), tf.constant(classes, dtype=tf.int32)
        self.count = len(inputs)
        _, self.function = bound_functions(model, layer, xla=False)
        self.history: list[float] = []

    def _once(self) -> float:
        began = time.perf_counter()
        [t.numpy() for t in self.function(self.x, self.targets)]
        return (time.perf_counter() - began) * 1000 / self.count

    def beside(self, call, count: int, repeat: int) -> dict:
        """ms per image of ``call`` (on ``count`` images): bound, call, bound, …, bound, after
        one warm-up of each; best and median of the calls, and the best bound as ``bound``."""
        self._once()
        call()
        times, bounds = [], [self._once()]
        for _ in range(repeat):
            began = time.perf_counter()
            call()
            times.append((time.perf_counter() - began) * 1000 / count)
            bounds.append(self._once())
        self.history.append(min(bounds))
        return {"best": min(times), "median": statistics.median(times), "runs": repeat, "images": count,
                "bound": min(bounds)}


def measure_bounds(model, inputs: np.ndarray, classes: np.ndarray, layer: str, repeat: int, xla: bool = True) -> dict:
    """ms per image of the forward and forward + backward bounds, without and (``xla``) with
    XLA; XLA timed once after its warm-up (compilation) call, as it is far off on CPU."""
    import tensorflow as tf

    x = tf.constant(inputs)
    targets = tf.constant(classes, dtype=tf.int32)
    results = {}
    for jit in (False, True) if xla else (False,):
        forward, forward_backward = bound_functions(model, layer, jit)
        suffix, times = (" (XLA)", 1) if jit else ("", repeat)
        results["forward" + suffix] = per_image(timed(lambda f=forward: f(x).numpy(), times), len(inputs))
        results["forward+backward" + suffix] = per_image(
            timed(lambda f=forward_backward: [t.numpy() for t in f(x, targets)], times), len(inputs)
        )
    return results


def xla_by_layer_kind(model, batch: int = 8) -> dict:
    """ms per image of single layers of the model, plain vs XLA: where XLA's CPU backend wins
    and where it loses (its depthwise convolution)."""
    import tensorflow as tf

    kinds = {"DepthwiseConv2D": None, "Conv2D": None}
    for layer in model.layers:
        kind = type(layer).__name__
        if kind in kinds and kinds[kind] is None and layer.output.shape[1] <= 56:
            kinds[kind] = layer
    results = {}
    for kind, layer in kinds.items():
        if layer is None:
            continue
        x = tf.constant(np.random.default_rng(0).standard_normal((batch, *layer.input.shape[1:])).astype("float32"))
        for jit in (False, True):
            function = tf.function(layer.__call__, jit_compile=jit)
            key = f"{kind} {layer.name} {tuple(layer.input.shape[1:])}{' (XLA)' if jit else ''}"
            results[key] = per_image(timed(lambda f=function, x=x: f(x).numpy(), 3), batch)
    return results


def per_image(timing: dict, count: int) -> dict:
    return {key: (value * 1000 / count if key != "runs" else value) for key, value in timing.items()} | {"images": count}


# -- peers (run in their own venvs; no vizkit import) ----------------------------------------


def linear_copy(model):
    """The model with its final softmax replaced by linear, as tf-keras-vis's ReplaceToLinear
    does (clone, copy the weights, set the activation): logits for xplique."""
    import keras

    copy = keras.models.clone_model(model)
    copy.set_weights(model.get_weights())
    copy.layers[-1].activation = keras.activations.linear
    return copy


def tfkv_worker(model, inputs, classes, args, bound: Bound) -> dict:
    """tf-keras-vis 0.8 on the same batch: ReplaceToLinear (the CAMs and saliency differentiate
    the logit, as vizkit's score=logit); CAMs at the layer's resolution (``expand_cam=False``,
    as vizkit's arrays) on ``top_relu`` (``seek_penultimate_conv_layer=False``: it is a ReLU)."""
    import tf_keras_vis
    from tf_keras_vis.gradcam import Gradcam
    from tf_keras_vis.gradcam_plus_plus import GradcamPlusPlus
    from tf_keras_vis.layercam import Layercam
    from tf_keras_vis.saliency import Saliency
    from tf_keras_vis.scorecam import Scorecam
    from tf_keras_vis.utils.model_modifiers import ReplaceToLinear
    from tf_keras_vis.utils.scores import CategoricalScore

    cam_args = {"penultimate_layer": args.layer, "seek_penultimate_conv_layer": False, "expand_cam": False}
    score = CategoricalScore(list(map(int, classes)))
    results = {"version": tf_keras_vis.__version__}

    slow = min(args.slow_images, len(inputs))

    def method(cls, call, name, count=None):
        explainer = cls(model, model_modifier=ReplaceToLinear(), clone=True)
        repeat = 1 if name in MANY_PASSES else args.repeat
        results[name] = bound.beside(lambda: call(explainer), count or len(inputs), repeat)

    if "gradcam" in args.peer_methods:
        method(Gradcam, lambda e: e(score, inputs, **cam_args), "gradcam")
    if "gradcampp" in args.peer_methods:
        method(GradcamPlusPlus, lambda e: e(score, inputs, **cam_args), "gradcampp")
    if "layercam" in args.peer_methods:
        method(Layercam, lambda e: e(score, inputs, **cam_args), "layercam")
    if "saliency" in args.peer_methods:
        method(Saliency, lambda e: e(score, inputs), "saliency")
    if "smoothgrad" in args.peer_methods:
        noisy = {"smooth_samples": args.smooth_samples, "smooth_noise": args.smooth_noise}
        few = CategoricalScore(list(map(int, classes[:slow])))
        method(Saliency, lambda e: e(few, inputs[:slow], **noisy), "smoothgrad", slow)
    if "scorecam" in args.peer_methods:
        # One image per call: tf-keras-vis unions the top-N channels of all images and tiles
        # every masked copy in memory (channels × images × 224² × 3 floats: >20 GB for 32).
        def scorecam(explainer):
            for i in range(slow):
                explainer(CategoricalScore([int(classes[i])]), inputs[i : i + 1], max_N=args.scorecam_channels or None,
                          batch_size=64, **cam_args)

        method(Scorecam, scorecam, "scorecam", slow)
    return results


def xplique_worker(model, inputs, classes, args, bound: Bound) -> dict:
    """xplique's GradCAM on the logits (its documented use: a model without the softmax),
    one-hot targets, the whole batch in one call."""
    import tensorflow as tf
    import xplique
    from xplique.attributions import GradCAM

    logits = linear_copy(model)
    targets = tf.one_hot(classes, logits.output_shape[-1])
    explainer = GradCAM(logits, conv_layer=args.layer, batch_size=len(inputs))
    results = {"version": xplique.__version__}
    results["gradcam"] = bound.beside(lambda: np.asarray(explainer.explain(inputs, targets)), len(inputs), args.repeat)
    return results


def peer_main(args) -> None:
    """Entry point of ``--peer-worker``: load the shared model and batch, measure, write JSON."""
    import keras
    import tensorflow as tf

    data = np.load(args.data)
    inputs, classes = data["inputs"], data["classes"]
    model = keras.models.load_model(args.model, compile=False)
    results = {
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "bounds": measure_bounds(model, inputs, classes, args.layer, args.repeat, xla=args.peer_worker == "xplique"),
    }
    worker = {"tfkv": tfkv_worker, "xplique": xplique_worker}[args.peer_worker]
    bound = Bound(model, inputs, classes, args.layer)
    results["methods"] = worker(model, inputs, classes, args, bound)
    results["bound_history"] = bound.history
    Path(args.out).write_text(json.dumps(results, indent=1))


def run_peer(kind: str, python: str, model_path: Path, data_path: Path, args, methods: list[str]) -> dict:
    """Run this script as ``--peer-worker`` with another environment's python; its results,
    or ``{"error": why}``."""
    if not Path(python).exists():
        return {"error": f"{python} does not exist (make the venv: see benchmarks/README.md)"}
    out = data_path.with_name(f"{kind}.json")
    command = [
        python, __file__, "--peer-worker", kind, "--model", str(model_path), "--data", str(data_path),
        "--out", str(out), "--repeat", str(args.repeat), "--layer", args.layer,
        "--slow-images", str(args.slow_images), "--scorecam-channels", str(args.scorecam_channels),
        "--smooth-samples", str(args.smooth_samples), "--smooth-noise", str(args.smooth_noise),
        "--peer-methods", ",".join(methods),
    ]
    print(f"[{kind}] {' '.join(command[:4])} …", file=sys.stderr, flush=True)
    done = subprocess.run(command, check=False, capture_output=True, text=True, timeout=args.peer_timeout)
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        return {"error": f"exit {done.returncode}: " + " | ".join(tail)}
    return json.loads(out.read_text())


# -- vizkit ------------------------------------------------------------------------------------


def load_model(name: str):
    """EfficientNet-Lite0 through the built-in plugin's loader function (what ``vizkit run
    efficientnet-lite0`` calls). vizkit has no public "load a model spec" function apart from
    ``vizkit.run``, so this uses the plugin module's own ``load`` (in its ``__all__``).

    Any other name is a ``keras.applications`` constructor with random weights (``ResNet50``,
    ``VGG16``), caffe preprocessing: to compare the bounds and XLA on models without
    depthwise convolutions (the timings do not depend on the weights)."""
    from vizkit.plugins import efficientnet_lite

    from vizkit import LoadedModel, kit

    if efficientnet_lite.matches(name):
        return efficientnet_lite.load(name)
    import keras

    model = getattr(keras.applications, name)(weights=None)
    return LoadedModel(model, name, f"keras.applications.{name}", None, "caffe", "random weights", kit.imagenet_labels())


def make_images(count: int, size: int, seed: int):
    """``count`` LoadedImage objects from the shipped photos: seeded random square crops
    (half to all of the shorter side), half of them mirrored, resized to ``size``."""
    from PIL import Image

    from vizkit import LoadedImage, kit

    rng = np.random.default_rng(seed)
    photos = [Image.open(path).convert("RGB") for path in kit.sample_photos()]
    images = []
    for n in range(count):
        photo = photos[n % len(photos)]
        side = int(min(photo.size) * rng.uniform(0.5, 1.0))
        left, top = int(rng.integers(0, photo.width - side + 1)), int(rng.integers(0, photo.height - side + 1))
        crop = photo.crop((left, top, left + side, top + side))
        if rng.random() < 0.5:
            crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        display = crop.copy()
        display.thumbnail((512, 512), Image.Resampling.LANCZOS)  # as vizkit shows photos
        array = np.asarray(crop.resize((size, size), Image.Resampling.BILINEAR), dtype="float32")
        images.append(LoadedImage(id=f"crop-{n}", path=Path(f"crop-{n}.png"), display=np.asarray(display), array=array))
    return images


def add_predictions(graph, images, inputs, labels) -> np.ndarray:
    """Fill each image's top-5 predictions (captions use them); each image's top-1 class."""
    probabilities = graph.class_scores(inputs, score="probability")
    for image, row in zip(images, probabilities):
        top = np.argsort(row)[::-1][:5]
        image.predictions = [{"index": int(i), "label": labels[i], "score": float(row[i])} for i in top]
    return probabilities.argmax(axis=1).astype("int32")


def comparable_techniques() -> dict:
    """Every installed technique marked comparable, by name. ``vizkit.host`` is not public API
    (docs/api.md): the only public listing is the ``vizkit techniques`` command, which does not
    say which are comparable."""
    from vizkit import host

    return {name: entry.technique for name, entry in host.techniques(host.plugin_manager()).items()
            if entry.technique.comparable}


def parse_settings(pairs: list[str]) -> dict:
    settings: dict = {}
    for pair in pairs:
        key, _, value = pair.partition("=")
        technique, _, option = key.partition(".")
        if not (technique and option and _):
            raise SystemExit(f"--set takes TECHNIQUE.OPTION=VALUE, not {pair!r}")
        settings.setdefault(technique, {})[option] = value
    return settings


def technique_context(technique, images, graph, preprocess, labels, raw: dict):
    """A RunContext as a run makes it: options parsed, batch 32 (or the technique's own)."""
    from vizkit import RunContext

    params = technique.resolve_params(raw)
    context = RunContext(graph, images, params, preprocess, labels)
    technique.check_params(context)
    return context


def measure_technique(technique, images, graph, preprocess, labels, raw, repeat, bound: Bound) -> dict:
    context = technique_context(technique, images, graph, preprocess, labels, raw)
    artifacts = []

    def call():
        artifacts[:] = technique.apply(context)

    result = bound.beside(call, len(images), repeat)
    if len({a.image_id for a in artifacts}) != len(images):
        raise SystemExit(f"{technique.name}: artifacts for {len({a.image_id for a in artifacts})} of {len(images)} images")
    result["batch"] = context.params.get("batch")
    result["notes"] = context.notes[:2]
    return result


def gradcam_variants(graph, inputs, classes, layer, repeat, bound: Bound) -> dict:
    """vizkit's Grad-CAM computation (the notebook function) and local copies of it: as
    ``kit.layer_gradients`` compiles it, the same under XLA, and fully fused under XLA
    (the heatmap computed inside the compiled function: only N×h×w comes back)."""
    import tensorflow as tf
    from vizkit.plugins.gradcam import gradcam

    from vizkit import kit

    probe = graph.probe([layer], with_output=True, score="logit")

    def gradients(xla: bool, fused: bool):
        @tf.function(jit_compile=xla, reduce_retracing=True, autograph=False)  # plain Python ifs
        def run(x, targets):
            with tf.GradientTape() as tape:
                features, scores = probe(x, training=False)
                selected = tf.gather(scores, targets, axis=1, batch_dims=1)
            grads = tape.gradient(selected, features)
            if not fused:
                return features, grads
            cam = tf.nn.relu(tf.reduce_mean(features * tf.reduce_mean(grads, axis=(1, 2), keepdims=True), axis=-1))
            peak = tf.reduce_max(cam, axis=(1, 2), keepdims=True)
            return tf.math.divide_no_nan(cam, peak)

        return run

    def notebook_copy(run):
        def call():
            features, grads = (t.numpy() for t in run(tf.constant(inputs), tf.constant(classes)))
            weights = grads.mean(axis=(1, 2), keepdims=True)
            return kit.normalize_heatmap((features * weights).mean(axis=-1))

        return call

    reference = gradcam(graph, inputs, layer, classes, "logit")[0]
    results = {"vizkit.plugins.gradcam.gradcam (notebook function)":
               bound.beside(lambda: gradcam(graph, inputs, layer, classes, "logit"), len(inputs), repeat)}
    fused = gradients(True, True)
    variants = {
        "local copy, jit_compile=False": notebook_copy(gradients(False, False)),
        "local copy, jit_compile=True": notebook_copy(gradients(True, False)),
        "fused heatmap, jit_compile=True": lambda: fused(tf.constant(inputs), tf.constant(classes)).numpy(),
    }
    for name, call in variants.items():
        error = float(np.abs(call() - reference).max())  # same maps? (XLA reorders sums)
        times = 1 if "jit_compile=True" in name else repeat  # XLA: minutes per call on CPU
        results[name] = bound.beside(call, len(inputs), times) | {"max_abs_diff": error}
    return results


# -- the report ----------------------------------------------------------------------------------


def fmt(value, digits=1):
    return "—" if value is None else f"{value:.{digits}f}"


def ratio(a, b):
    return None if a is None or b is None or not b else a / b


def bound_ratio(row: dict) -> float | None:
    """A method's time over the bound timed alternately with it, in the same process."""
    return ratio(row.get("best"), row.get("bound"))


def print_table(report: dict) -> None:
    bounds = report["bounds"]
    bound = bounds["forward+backward"]["best"]
    tfkv = report["peers"].get("tfkv", {})
    xpl = report["peers"].get("xplique", {})
    tfkv_methods = tfkv.get("methods", {})
    history = report["bound_history"]
    print(f"\n{report['date']} · {report['machine']} · load average {report['load_before']} → {report['load_after']}")
    print(f"{report['model']}, {report['size']} px, {report['images']} images (many-pass methods: "
          f"{report['slow_images']}, timed once), best of {report['repeat']} after one warm-up, layer {report['layer']}")
    print(f"fwd+bwd bound re-measured beside each method: {min(history):.1f}-{max(history):.1f} ms/img "
          f"(the load moved it {max(history) / min(history):.2f}×); each ratio uses the bound timed alternately with the method")
    print(f"command: {report['command']}\n")
    print("| technique | vizkit ms/img | ratio to fwd+bwd bound | tf-keras-vis ms/img | its ratio to its bound "
          "| vizkit/tf-keras-vis (by ratio) |")
    print("|---|---|---|---|---|---|")
    for name, row in bounds.items():
        peer = tfkv.get("bounds", {}).get(name, {}).get("best")
        print(f"| *bound: {name}* | {fmt(row['best'])} | {fmt(ratio(row['best'], bound), 2)} | {fmt(peer)} | "
              f"{fmt(ratio(peer, tfkv.get('bounds', {}).get('forward+backward', {}).get('best')), 2)} | |")
    for name, row in report["techniques"].items():
        if "error" in row:
            print(f"| {name} | failed: {row['error']} | | | | |")
            continue
        peer = tfkv_methods.get(name)
        peer = peer if isinstance(peer, dict) else {}
        ours, theirs = bound_ratio(row), bound_ratio(peer)
        print(f"| {name} | {fmt(row['best'])} | {fmt(ours, 2)} | {fmt(peer.get('best'))} | {fmt(theirs, 2)} | "
              f"{fmt(ratio(ours, theirs), 2)} |")
    if "xla_by_layer_kind" in report:
        print("\nXLA on this CPU, single layers of the model (batch 8):")
        for name, row in report["xla_by_layer_kind"].items():
            print(f"  {name}: {fmt(row['best'], 2)} ms/img")
    if "gradcam_variants" in report:
        print("\nGrad-CAM computation without pictures (ratio: to the bound timed beside it):")
        for name, row in report["gradcam_variants"].items():
            diff = f", max |Δ| vs vizkit {row['max_abs_diff']:.1e}" if "max_abs_diff" in row else ""
            print(f"  {name}: {fmt(row['best'])} ms/img, bound {fmt(row['bound'])}, ratio {fmt(bound_ratio(row), 2)}{diff}")
    if tfkv:
        print("\ntf-keras-vis: " + (tfkv["error"] if "error" in tfkv else
              f"{tfkv_methods.get('version')}, TF {tfkv['tensorflow']}, Keras {tfkv['keras']}"))
        for name, row in tfkv_methods.items():
            if isinstance(row, dict):
                print(f"  {name}: {fmt(row['best'])} ms/img on {row['images']} images, bound beside it {fmt(row['bound'])}")
    if xpl:
        if "error" in xpl:
            print(f"\nxplique: {xpl['error']}")
        else:
            row = xpl["methods"]["gradcam"]
            print(f"\nxplique {xpl['methods']['version']} (TF {xpl['tensorflow']}, Keras {xpl['keras']}): GradCAM "
                  f"{fmt(row['best'])} ms/img, bound beside it {fmt(row['bound'])} ms/img, ratio {fmt(bound_ratio(row), 2)}; "
                  f"its bounds: forward {fmt(xpl['bounds']['forward']['best'])}, "
                  f"XLA fwd+bwd {fmt(xpl['bounds'].get('forward+backward (XLA)', {}).get('best'))} ms/img")
    print("\ntargets:")
    for line in targets(report):
        print(f"  {line}")


def targets(report: dict) -> list[str]:
    """The issue's targets, each met / not met / not measured."""
    techniques = report["techniques"]
    lines = []
    for name in GRADIENT_CAMS:
        row = techniques.get(name)
        if row is None or "error" in row:
            lines.append(f"{name} within {TARGET_BOUND_RATIO}× of the fwd+bwd bound: not measured")
            continue
        r = bound_ratio(row)
        lines.append(f"{name} within {TARGET_BOUND_RATIO}× of the fwd+bwd bound: {r:.2f}× — "
                     f"{'met' if r <= TARGET_BOUND_RATIO else 'not met'}")
    tfkv = report["peers"].get("tfkv", {}).get("methods", {})
    for name in TFKV_PEERS:
        row, peer = techniques.get(name), tfkv.get(name)
        if not row or "error" in row or not isinstance(peer, dict):
            lines.append(f"{name} at least as fast as tf-keras-vis: not measured")
            continue
        r = bound_ratio(row) / bound_ratio(peer)
        raw = row["best"] / peer["best"]
        lines.append(f"{name} at least as fast as tf-keras-vis: {r:.2f}× its time by ratio to the bound "
                     f"({raw:.2f}× in raw ms) — {'met' if r <= 1 else 'not met'}")
    xpl = report["peers"].get("xplique", {})
    row = techniques.get("gradcam")
    if "methods" in xpl and row and "error" not in row:
        ours, theirs = bound_ratio(row), bound_ratio(xpl["methods"]["gradcam"])
        lines.append(f"Grad-CAM at least as fast as xplique by ratio to the bound: {ours:.2f} vs {theirs:.2f} — "
                     f"{'met' if ours <= theirs else 'not met'}")
    else:
        lines.append(f"Grad-CAM at least as fast as xplique: not measured ({xpl.get('error', 'skipped')})")
    return lines


def load_average() -> str:
    try:
        return " ".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        return "?"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("-t", "--techniques", default="", help="comma list; default: every comparable technique installed")
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--slow-images", type=int, default=4, help="images for the methods with many passes per image (and the peers' Score-CAM, SmoothGrad)")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--repeat", type=int, default=3, help="timed calls after the warm-up; the best is reported")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model", default="efficientnet-lite0",
                        help="efficientnet-lite0, or a keras.applications name (random weights); "
                        "for a peer worker: the .keras file")
    parser.add_argument("--layer", help="the CAM layer; default: Grad-CAM's (kit.last_feature_map_layer)")
    parser.add_argument("--set", action="append", default=[], metavar="TECHNIQUE.OPTION=VALUE")
    parser.add_argument("--scorecam-channels", type=int, default=64,
                        help="Score-CAM channels (vizkit's channels, tf-keras-vis's max_N); 0: all")
    parser.add_argument("--smooth-samples", type=int, default=25)
    parser.add_argument("--smooth-noise", type=float, default=0.15)
    parser.add_argument("--peers", default="tfkv,xplique", help="comma list of tfkv, xplique; or none")
    parser.add_argument("--tfkv-python", default="/tmp/bench-tfkv/bin/python")
    parser.add_argument("--xplique-python", default="/tmp/bench-xplique/bin/python")
    parser.add_argument("--peer-timeout", type=int, default=1800)
    parser.add_argument("--no-xla", action="store_true", help="skip the XLA measurements (minutes on CPU)")
    parser.add_argument("--json", help="also write the results here")
    # internal: this script run by a peer's python
    parser.add_argument("--peer-worker", choices=("tfkv", "xplique"), help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--peer-methods", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.peer_worker:
        args.peer_methods = args.peer_methods.split(",")
        return peer_main(args)

    import tensorflow as tf

    import vizkit
    from vizkit import kit

    load_before = load_average()
    loaded = load_model(args.model)
    graph = vizkit.ModelGraph.of(loaded.model)
    args.layer = args.layer or kit.last_feature_map_layer(graph)[0]
    preprocess = kit.preprocessor(loaded.preprocess)
    images = make_images(args.images, args.size, args.seed)
    inputs = np.asarray(preprocess(np.stack([image.array for image in images])), dtype="float32")
    classes = add_predictions(graph, images, inputs, loaded.labels)

    available = comparable_techniques()
    names = [n.strip() for n in args.techniques.split(",") if n.strip()] or list(available)
    settings = parse_settings(args.set)
    settings.setdefault("scorecam", {}).setdefault("channels", str(args.scorecam_channels))
    settings.setdefault("smoothgrad", {}).setdefault("samples", str(args.smooth_samples))

    print("bounds …", file=sys.stderr, flush=True)
    report = {
        "date": datetime.date.today().isoformat(),
        "machine": f"{os.cpu_count()}-core {platform.machine()} CPU, TF {tf.__version__}",
        "command": " ".join(["python", "benchmarks/bench_explainers.py", *sys.argv[1:]]),
        "model": loaded.name, "load_before": load_before, "size": args.size, "images": args.images, "slow_images": args.slow_images,
        "repeat": args.repeat, "layer": args.layer, "settings": settings,
        "bounds": measure_bounds(loaded.model, inputs, classes, args.layer, args.repeat, xla=not args.no_xla),
        "techniques": {}, "peers": {},
    }
    bound = Bound(loaded.model, inputs, classes, args.layer)
    if not args.no_xla:
        print("XLA by layer kind, Grad-CAM variants …", file=sys.stderr, flush=True)
        report["xla_by_layer_kind"] = xla_by_layer_kind(loaded.model)
        report["gradcam_variants"] = gradcam_variants(graph, inputs, classes, args.layer, args.repeat, bound)
    for name in names:
        if name not in available:
            report["techniques"][name] = {"error": "not installed (or not comparable)"}
            continue
        technique = available[name]
        slow = name in MANY_PASSES
        subset = images[: args.slow_images] if slow else images
        raw = dict(settings.get(name, {}))
        if name not in PERTURBATION and any(option.name == "batch" for option in technique.options):
            raw.setdefault("batch", str(len(subset)))  # the whole batch at once
        raw = {key: value for key, value in raw.items() if any(o.name == key for o in technique.options)}
        print(f"{name} ({len(subset)} images, {raw}) …", file=sys.stderr, flush=True)
        try:
            report["techniques"][name] = measure_technique(
                technique, subset, graph, preprocess, loaded.labels, raw, 1 if slow else args.repeat, bound
            ) | {"settings": raw}
        except Exception as error:  # noqa: BLE001 - one broken technique must not lose the others' numbers
            report["techniques"][name] = {"error": f"{type(error).__name__}: {error}"[:200]}
    report["bound_history"] = bound.history  # how much the load moved during the run

    peers = [p for p in args.peers.split(",") if p and p != "none"]
    if peers:
        with tempfile.TemporaryDirectory(prefix="bench-explainers-") as folder:
            model_path, data_path = Path(folder) / "model.keras", Path(folder) / "batch.npz"
            loaded.model.save(model_path)
            np.savez(data_path, inputs=inputs, classes=classes)
            if "tfkv" in peers:
                methods = [n for n in TFKV_PEERS if n in names]
                report["peers"]["tfkv"] = run_peer("tfkv", args.tfkv_python, model_path, data_path, args, methods)
            if "xplique" in peers:
                report["peers"]["xplique"] = run_peer("xplique", args.xplique_python, model_path, data_path, args, ["gradcam"])
    report["load_after"] = load_average()
    print_table(report)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
