"""randomization: does the map depend on what the model learned? (Adebayo et al. 2018)

"Sanity Checks for Saliency Maps" randomizes a trained model's weights in cascade, from
the top layer down, recomputes each explanation on the damaged model and compares it
with the original map. A map that reflects the model must change as the weights it was
computed from turn into noise; one that barely changes (guided backpropagation and
guided Grad-CAM in the paper) shows the image, its edges, more than the model: it would
look the same for a model that learned nothing. A low correlation is necessary, not
sufficient: a map can change with the weights and still explain them badly (the
deletion/insertion curves measure that).

How it is done here:

- **A copy, never the model.** The model is copied once per run with
  ``keras.models.clone_model`` (nested Functional and Sequential models included) and
  the copy's weights are assigned in place at each step, so the techniques' compiled
  functions, cached per model graph, are traced once on the copy and reused at every step
  (they hold the variables, not their values). Each technique's cascade starts from the
  original weights again. A model Keras cannot clone (a subclassed model, a custom layer
  without ``get_config``) is refused with the fix in the message.
- **The cascade.** The leaf layers with trainable weights, nested models opened, ordered
  from the output back to the input (batch norms count: their scale and shift are
  learned). Step 1 randomizes the top one (the logits, as in the paper), the last step
  all of them, the steps between are spread evenly (``steps``). Learned weights of a
  frozen base (``trainable = False``) count too: the check is about what was learned.
- **The random weights.** Each trainable tensor is redrawn i.i.d. from a normal with
  that tensor's own mean and standard deviation, not re-initialized (Glorot, He): a
  re-initialized kernel in a batch-norm-heavy net (EfficientNet) has another scale than
  the one the kept moving statistics normalize, so the activations blow up or die, the
  maps degenerate (constant, or one hot pixel) and every method "passes" for the wrong
  reason. Same scale, no structure: only what was learned is lost. A tensor with no
  spread (a zero bias, a gamma of ones in an untrained model) keeps its value, and the
  batch norms' moving statistics (not trainable) stay. The draw is seeded per layer
  (``seed`` and the layer's path), so every technique sees the very same random model.
- **The class is pinned.** A random model's top class is arbitrary; where the technique
  has a ``class`` option the randomized map explains the class the original one did. A
  technique without one explains the randomized model's own top class (a note says so).
- **The verdict.** A warning when the rank correlation with every weighted layer random,
  averaged over the images, is above ``threshold`` (0.5): a map made from a model that
  learned nothing should not rank the pixels as the original did. The table also shows
  the mean over the cascade's steps (the area under its curve). That mean is not the
  verdict: after step 1 (the head alone random) every CAM of the last feature map keeps
  the activations it weighs, so the methods that lean on them (Grad-CAM++, LayerCAM,
  Eigen-CAM) stay close there for a reason that is no fault (on EfficientNet-Lite0 and
  the demo photos Grad-CAM++ gives 0.53 over the cascade, 0.26 with all layers random).
- **The comparison.** Spearman's rank correlation and SSIM of ``kit.explanation_map`` of
  both maps at the artifact's own resolution (a CAM at its layer's, 7×7 say): upsampling
  first would add the smoothness of the interpolation to both maps and inflate both
  numbers. An attribution is compared by its largest |value| over the channels, as the
  paper's absolute-value rank correlation. Only the first ``images`` images are
  re-explained: each costs ``steps`` more runs of the technique.
"""

from __future__ import annotations

import zlib
from typing import TYPE_CHECKING, Iterator

import numpy as np

import vizkit
from vizkit import Column, Curve, Measurement, Metric, Option, hookimpl, kit

if TYPE_CHECKING:
    from vizkit import Artifact, Explanation, LoadedImage, RunContext


# -- the copy of the model -----------------------------------------------------------------


def _graph_model(model) -> bool:
    """Functional or Sequential: what clone_model can rebuild layer by layer."""
    import keras

    return isinstance(model, keras.Sequential) or (isinstance(model, keras.Model) and hasattr(model, "operations"))


def leaf_layers(model, prefix: str = "") -> Iterator[tuple[str, object]]:
    """(path, layer) of every layer that is not itself a model, nested models opened
    through their public ``.layers`` (``base/conv1``), input to output; a shared layer once,
    input layers left out (a clone renames them)."""
    import keras

    seen: set[int] = set()

    def walk(model, prefix: str):
        for layer in model.layers:
            if id(layer) in seen or isinstance(layer, keras.layers.InputLayer):
                continue
            seen.add(id(layer))
            if isinstance(layer, keras.Model):
                yield from walk(layer, f"{prefix}{layer.name}/")
            else:
                yield f"{prefix}{layer.name}", layer

    return walk(model, prefix)


def copy_model(model):
    """A copy of ``model`` with its weights (the model itself untouched); ValueError, with
    the fix, where Keras cannot clone it."""
    import keras

    fix = (
        "build it as a Functional or Sequential model (keras.Input(...) → layers → keras.Model), "
        "and give custom layers a get_config() so that keras.models.clone_model can rebuild them"
    )
    if not _graph_model(model):
        raise ValueError(
            f"the randomization check randomizes a copy of the model, and {model.name} is a subclassed "
            f"model, whose layers keras.models.clone_model cannot rebuild one by one: {fix}"
        )
    try:
        copy = keras.models.clone_model(model)
        copy.set_weights(model.get_weights())
    except Exception as error:
        first = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise ValueError(
            f"the randomization check randomizes a copy of the model, and keras.models.clone_model "
            f"cannot copy {model.name} ({type(error).__name__}: {first}): {fix}"
        ) from error
    mine, theirs = list(leaf_layers(copy)), list(leaf_layers(model))
    if [(p, [tuple(w.shape) for w in l.weights]) for p, l in mine] != [
        (p, [tuple(w.shape) for w in l.weights]) for p, l in theirs
    ]:
        raise ValueError(f"keras.models.clone_model made a copy of {model.name} whose layers differ from it: {fix}")
    _unfreeze(copy)  # the copy only: learned weights of a frozen base are randomized too
    return copy


def _unfreeze(model) -> None:
    """Every layer of ``model``, nested models included, trainable: their learned weights
    are then its trainable variables (setting ``model.trainable`` does not always reach a
    nested model's layers); moving statistics stay non-trainable."""
    import keras

    model.trainable = True
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            _unfreeze(layer)
        else:
            layer.trainable = True


class RandomizedCopy:
    """The model's copy, its graph (traced once) and its weighted layers, output first.

    Holds no reference to the original model: it is cached on the original's graph, and
    a reference back would keep that graph alive for good.
    """

    def __init__(self, model):
        self.model = copy_model(model)
        self.graph = vizkit.ModelGraph.of(self.model)
        leaves = list(leaf_layers(self.model))
        self.paths = [path for path, _ in leaves]
        #: (path, layer) of the leaf layers with trainable weights, from the output back.
        self.layers = [(path, layer) for path, layer in reversed(leaves) if layer.trainable_variables]
        if not self.layers:
            raise ValueError(f"{model.name} has no layer with trainable weights to randomize")

    def reset(self, original) -> None:
        """Every layer back to the original model's current weights."""
        theirs = list(leaf_layers(original))
        if [path for path, _ in theirs] != self.paths:
            raise ValueError(f"{original.name} changed its layers since it was copied; load it again")
        for (_, mine), (_, layer) in zip(leaf_layers(self.model), theirs):
            if layer.weights:
                mine.set_weights(layer.get_weights())

    def randomize(self, index: int, seed: int) -> None:
        """Redraw the trainable tensors of the index-th weighted layer (from the top)."""
        path, layer = self.layers[index]
        for variable, values in zip(layer.trainable_variables, random_weights(path, layer, seed)):
            variable.assign(values)


def random_weights(path: str, layer, seed: int) -> list[np.ndarray]:
    """Each trainable tensor of ``layer`` redrawn i.i.d. from N(its mean, its std), seeded by
    ``seed`` and the layer's path (the same for every technique); no spread, no change."""
    import keras

    rng = np.random.default_rng([seed, zlib.crc32(path.encode("utf-8"))])
    drawn = []
    for variable in layer.trainable_variables:
        values = np.asarray(keras.ops.convert_to_numpy(variable))
        std = float(values.std(dtype="float64"))
        if std > 0 and np.isfinite(std):
            values = rng.normal(float(values.mean(dtype="float64")), std, values.shape).astype(values.dtype)
        drawn.append(values)
    return drawn


def cascade(layers: int, steps: int) -> list[int]:
    """How many layers, from the top, are random at each step: 1 first, all last (with more
    than one step), evenly spread between; fewer steps where there are fewer layers."""
    return [int(n) for n in kit.spread_evenly(list(range(1, layers + 1)), steps)]


# -- rerunning a technique on the randomized copy ------------------------------------------


def _has_class_option(explanation: "Explanation") -> bool:
    return any(option.name == "class" for option in explanation.technique.options)


def _rerun(
    context: "RunContext", explanation: "Explanation", graph, pairs: list[tuple["LoadedImage", "Artifact"]]
) -> dict[str, "Artifact"]:
    """The technique's artifacts on ``graph`` by image id, each image's class pinned to the
    one its original map explains (one rerun per class) where the technique takes a class."""
    pin = _has_class_option(explanation)
    groups: dict[int | None, list] = {}
    for image, artifact in pairs:
        groups.setdefault(artifact.target if pin else None, []).append(image)
    found: dict[str, Artifact] = {}
    for target, images in groups.items():
        changes = {} if target is None else {"class": str(int(target))}
        for artifact in explanation.rerun(context, graph, images, **changes):
            if artifact.image_id is not None:
                found[artifact.image_id] = artifact
    missing = [image.id for image, _ in pairs if image.id not in found]
    if missing:
        raise ValueError(f"{explanation.technique.name} made no map of {missing[0]} on the randomized model")
    return found


# -- the metric ----------------------------------------------------------------------------


def _describe_steps(copy: RandomizedCopy, counts: list[int]) -> str:
    """"step 1: predictions (1 of 5 weighted layers), step 2: down to conv2 (3), ..."""
    total = len(copy.layers)
    parts = []
    for step, count in enumerate(counts, 1):
        lowest = copy.layers[count - 1][0]
        if count == 1:
            parts.append(f"step {step}: {lowest} (1 of {total} weighted layers)")
        else:
            parts.append(f"step {step}: down to {lowest} ({'all ' if count == total else ''}{count})")
    return ", ".join(parts)


def _random_phrase(count: int, total: int) -> str:
    if count == total:
        return f"with all {total} weighted layers random" if total > 1 else "with its weighted layer random"
    return f"with the top {count} of {total} weighted layers random"


def _curves(spearman: list[float], ssim: list[float]) -> tuple[Curve, ...]:
    """Over the steps, step 0 the original model (1.0)."""
    return (
        Curve("rank corr.", (1.0, *spearman), "red"),
        Curve("SSIM", (1.0, *ssim), "blue"),
    )


def _values(spearman: list[float], ssim: list[float]) -> dict[str, float]:
    """With every weighted layer random (what the verdict uses), the means over the
    cascade's steps (``_cascade``), and each step's."""
    values = {
        "spearman": spearman[-1], "ssim": ssim[-1],
        "spearman_cascade": float(np.mean(spearman)), "ssim_cascade": float(np.mean(ssim)),
    }
    for step, (rho, similarity) in enumerate(zip(spearman, ssim), 1):
        values[f"spearman_step{step}"] = rho
        values[f"ssim_step{step}"] = similarity
    return values


def _run_cascade(
    context: "RunContext", explanation: "Explanation", copy: RandomizedCopy, counts: list[int],
    pairs: list[tuple["LoadedImage", "Artifact"]],
) -> tuple[dict[str, list[float]], dict[str, list[float]], set[str], list[np.ndarray]]:
    """(rank correlations, SSIMs) per image id and step, the ids whose map came out flat at
    the last step, and the first image's pictures (the original, then each step)."""
    original, seed = context.model.model, context.params["seed"]
    before = {image.id: kit.explanation_map(artifact.array) for image, artifact in pairs}
    rhos: dict[str, list[float]] = {image.id: [] for image, _ in pairs}
    similarities: dict[str, list[float]] = {image.id: [] for image, _ in pairs}
    pictures, flat, done = [pairs[0][1].picture], set(), 0
    copy.reset(original)
    try:
        for step, count in enumerate(counts, 1):
            context.progress(f"{explanation.technique.name}: randomization step {step}/{len(counts)}")
            for index in range(done, count):
                copy.randomize(index, seed)
            done = count
            randomized = _rerun(context, explanation, copy.graph, pairs)
            flat = set()
            for image, _ in pairs:
                after = kit.explanation_map(randomized[image.id].array, *before[image.id].shape)
                rhos[image.id].append(kit.spearman(before[image.id], after))
                similarities[image.id].append(kit.ssim(before[image.id], after))
                if np.ptp(after) == 0:
                    flat.add(image.id)
            pictures.append(randomized[pairs[0][0].id].picture)
    finally:
        copy.reset(original)  # the copy clean for the next technique, whatever happened
    return rhos, similarities, flat, pictures


def evaluate(context: "RunContext", explanation: "Explanation") -> list[Measurement]:
    params = context.params
    pairs = explanation.pairs(context.images)[: params["images"]]
    if not pairs:
        return []
    original = context.model.model
    copy = kit.per_model(context.model, ("randomization", "copy"), lambda: RandomizedCopy(original))
    total = len(copy.layers)
    counts = cascade(total, params["steps"])
    fewer = f" (only {len(counts)}: there are no more weighted layers)" if len(counts) < params["steps"] else ""
    context.note(
        f"{total} weighted layer(s), randomized from the output down in {len(counts)} step(s)"
        f"{fewer}: {_describe_steps(copy, counts)}; each trainable tensor redrawn from a normal with its own "
        f"mean and standard deviation, seed {params['seed']}; the first {len(pairs)} image(s) re-explained, "
        "compared by Spearman's rank correlation and SSIM",
    )
    if not _has_class_option(explanation) and any(artifact.target is not None for _, artifact in pairs):
        context.note(
            f"{explanation.technique.name} has no class option, so on the randomized model "
            "it explains that model's own top class, not the class of the original map",
        )
    rhos, similarities, flat, pictures = _run_cascade(context, explanation, copy, counts, pairs)

    measurements = []
    for image, artifact in pairs:
        spearman, ssim = rhos[image.id], similarities[image.id]
        caption = (
            f"random weights: rank corr. {spearman[-1]:.2f}, SSIM {ssim[-1]:.2f} with all random "
            f"({np.mean(spearman):.2f}, {np.mean(ssim):.2f} over the cascade)"
        )
        if image.id in flat:
            caption += " (the randomized map is flat: nothing to rank, rank corr. 0)"
        flat_original = np.ptp(kit.explanation_map(artifact.array)) == 0
        measurements.append(Measurement(
            values=_values(spearman, ssim),
            image_id=image.id,
            caption=caption,
            curves=_curves(spearman, ssim),
            warning="the original map is flat: nothing to compare, rank corr. 0 at every step" if flat_original else None,
        ))
    mean_rho = [float(np.mean([values[step] for values in rhos.values()])) for step in range(len(counts))]
    mean_ssim = [float(np.mean([values[step] for values in similarities.values()])) for step in range(len(counts))]
    random = _random_phrase(counts[-1], total)
    warning = None
    if mean_rho[-1] > params["threshold"]:
        warning = (
            f"the map barely changes when the model's weights are randomized (rank corr. {mean_rho[-1]:.2f} "
            f"{random}): it may show the image more than the model"
        )
    measurements.append(Measurement(
        values={**_values(mean_rho, mean_ssim), **{f"layers_step{step}": float(n) for step, n in enumerate(counts, 1)}},
        caption=(
            f"rank corr. {mean_rho[-1]:.2f}, SSIM {mean_ssim[-1]:.2f} {random}, {np.mean(mean_rho):.2f} and "
            f"{np.mean(mean_ssim):.2f} over the cascade (the mean of {len(pairs)} image(s)); "
            f"randomized from the top, {_describe_steps(copy, counts)}; picture: {pairs[0][0].id}, the original "
            "map then each step's"
        ),
        curves=_curves(mean_rho, mean_ssim),
        picture=kit.side_by_side(pictures),
        warning=warning,
    ))
    return measurements


METRIC = Metric(
    name="randomization",
    description=(
        "Model randomization sanity check (Adebayo et al. 2018): the weights of a copy of the model "
        "randomized in cascade from the top layer down, each map recomputed and compared with the "
        "original (Spearman's rank correlation, SSIM); a map that barely changes does not depend on "
        "what the model learned."
    ),
    evaluate=evaluate,
    per_image=False,  # the first `images` images: the run's first chunk
    columns=(
        Column("spearman", "rank corr., all weights random", "lower"),
        Column("ssim", "SSIM, all weights random", "lower"),
        Column("spearman_cascade", "rank corr., mean over the cascade", "lower"),
    ),
    options=(
        Option(
            "steps", int, 3,
            "steps of the cascade: the first randomizes the top weighted layer (the logits), the last all "
            "of them, the others evenly between; steps=1: the top layer only",
            minimum=1,
        ),
        Option("images", int, 4, "re-explain at most this many images (the first ones): each costs `steps` more runs", minimum=1),
        Option("seed", int, 0, "seed of the random weights (per layer: every technique gets the same random model)", minimum=0),
        Option(
            "threshold", float, 0.5,
            "warn when the rank correlation with all weighted layers random, averaged over the images, is above this",
            minimum=-1, maximum=1,
        ),
    ),
)


@hookimpl
def register_metrics(register):
    register(METRIC)
