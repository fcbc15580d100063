"""Metrics on EfficientNet-Lite0: what the faithfulness and randomization metrics cost beside the explanation they check.

Run by hand, never in CI (about a minute on 2 cores):

    python benchmarks/bench_metrics.py                       # steps 32, Grad-CAM's maps
    python benchmarks/bench_metrics.py --steps 64 -t gradcam,layercam --repeat 5

On the three shipped photos at 224 px (loaded as a run loads them, ``tf`` preprocessing),
each after one warm-up call (tracing excluded), best of ``--repeat``:

* each technique's own ``Technique.apply(context)`` (heatmap pictures included): the cost
  of the explanation;
* the faithfulness metric on its artifacts with the random baselines already cached (what
  every technique of a run pays: 2(k+1) masked copies per image), and with the cache
  cleared first (what the first technique pays: the baseline's 2(k+1) more);
* the forward passes alone: each image's 2(k+1) masked copies, built beforehand,
  through ``kit.class_scores``, ``per_pass`` rows at a time: the bound for the metric (the
  rest is building the copies);
* the randomization metric (``--randomization-steps`` steps, all three photos), after its
  warm-up (the model's copy made and the technique traced on it once per run): its bound
  is ``steps`` reruns of the technique, so it is compared with ``steps`` × the technique.

The four are timed in turns (one of each, then again), so that each ratio compares
numbers from the same minutes: on a shared machine the load moves. Compare ratios from
one run, not seconds between runs.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np

from bench_explainers import load_average  # this folder is on sys.path when run as a script


def in_turns(calls: dict, repeat: int) -> dict:
    """Seconds of each of ``calls`` (name → function), after one warm-up call of each, the
    calls taking turns ``repeat`` times: best and median of each."""
    for call in calls.values():
        call()
    times: dict = {name: [] for name in calls}
    for _ in range(repeat):
        for name, call in calls.items():
            began = time.perf_counter()
            call()
            times[name].append(time.perf_counter() - began)
    return {name: {"best": min(t), "median": statistics.median(t)} for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("-t", "--techniques", default="gradcam", help="comma list of comparable techniques")
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--substrate", default="blur")
    parser.add_argument("--per-pass", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--randomization-steps", type=int, default=3)
    args = parser.parse_args()

    import tensorflow as tf

    from vizkit import Explanation, ModelGraph, RunContext, host, kit
    from vizkit import images as image_io
    from vizkit.models import load_model
    from vizkit.plugins import faithfulness, randomization
    from vizkit.chunk import add_predictions

    load_before = load_average()
    loaded = load_model("efficientnet-lite0")
    graph = ModelGraph.of(loaded.model)
    preprocess = kit.preprocessor(loaded.preprocess)
    files, _ = image_io.collect(kit.sample_photos())
    images = image_io.load_all(files, graph.channels, graph.fixed_size)
    add_predictions(graph, images, preprocess, loaded.labels)
    count = len(images)

    available = host.techniques(host.plugin_manager())
    metric = faithfulness.METRIC
    raw = {"steps": args.steps, "substrate": args.substrate, "per_pass": args.per_pass}
    metric_context = RunContext(graph, images, metric.resolve_params(raw), preprocess, loaded.labels)
    cache = kit.per_model(graph, faithfulness.BASELINE_CACHE, dict)
    sanity = randomization.METRIC
    sanity_context = RunContext(
        graph, images, sanity.resolve_params({"steps": args.randomization_steps, "images": len(images)}), preprocess, loaded.labels
    )
    rows = 2 * (args.steps + 1)

    # the forward passes alone: each image's 2(k+1) copies (its random baseline's, built
    # beforehand as the metric builds them), per_pass rows at a time
    copies = []
    for image in images:
        canvas = faithfulness.substrate_image(image.array, args.substrate)
        ranks = faithfulness.pixel_ranks(faithfulness.random_map(*image.array.shape[:2], 7, 0, image.sha256))
        hidden = (ranks[None] < np.tile(faithfulness.step_counts(ranks.size, args.steps), 2)[:, None, None])
        hidden ^= np.repeat([False, True], args.steps + 1)[:, None, None]
        copies.append(np.asarray(preprocess(np.where(hidden[..., None], canvas[None], image.array[None])), "float32"))

    def forward():
        for inputs in copies:
            kit.class_scores(graph, inputs, "probability", batch=args.per_pass)

    results = {}
    for name in [n.strip() for n in args.techniques.split(",") if n.strip()]:
        technique = available[name].technique
        context = RunContext(graph, images, technique.resolve_params({}), preprocess, loaded.labels)
        technique.check_params(context)
        artifacts = technique.apply(context)
        explanation = Explanation(technique, context.params, list(artifacts))
        measurements = []

        def measure():
            measurements[:] = metric.measure(metric_context, explanation)

        def measure_cold():
            cache.clear()
            measure()

        print(f"{name} …", file=sys.stderr, flush=True)
        results[name] = in_turns(
            {"explain": lambda: technique.apply(context), "metric": measure, "metric + baseline": measure_cold,
             "forward": forward, "randomization": lambda: sanity.measure(sanity_context, explanation)},
            args.repeat,
        )
        results[name]["auc"] = {key: float(np.mean([m.values[key] for m in measurements])) for key in measurements[0].values}

    ms = lambda seconds: f"{seconds * 1000:.0f}"  # noqa: E731
    print(f"{datetime.date.today().isoformat()}, {os.cpu_count()}-core {platform.machine()} CPU, "
          f"TF {tf.__version__}, load {load_before} → {load_average()}")
    print(f"{loaded.name}, {count} photos at {graph.fixed_size[0]} px, faithfulness steps {args.steps} "
          f"({rows} copies per image per curve pair), substrate {args.substrate}, per_pass {args.per_pass}, "
          f"best of {args.repeat} after one warm-up\n")
    print("| technique | technique ms/img | faithfulness ms/img (baselines cached) | × technique "
          f"| × {rows} forward passes | first technique of a run (+ baseline) ms/img | deletion AUC (random) "
          f"| insertion AUC (random) | randomization ms/img ({args.randomization_steps} steps) "
          f"| × {args.randomization_steps} × technique |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, row in results.items():
        explain_ms, metric_ms = row["explain"]["best"] / count, row["metric"]["best"] / count
        forward_ms = row["forward"]["best"] / count
        auc = row["auc"]
        print(f"| {name} | {ms(explain_ms)} | {ms(metric_ms)} | {metric_ms / explain_ms:.2g}× "
              f"| {metric_ms / forward_ms:.2f} ({ms(forward_ms)} ms) "
              f"| {ms(row['metric + baseline']['best'] / count)} "
              f"| {auc['deletion_auc']:.3f} ({auc['random_deletion_auc']:.3f}) "
              f"| {auc['insertion_auc']:.3f} ({auc['random_insertion_auc']:.3f}) "
              f"| {ms(row['randomization']['best'] / count)} "
              f"| {row['randomization']['best'] / (args.randomization_steps * row['explain']['best']):.2f} |")


if __name__ == "__main__":
    main()
