"""Comparing two run reports (``vizkit compare BASE NEW``): plain data, no TensorFlow.

BASE and NEW are report folders written by ``vizkit run`` (or their ``report.json``).
Images are matched by their sha256; for each image in both, the top-1 predictions
(flips) and the score of BASE's top-1 class; for each comparable technique (one
heatmap per image) and image in both, how similar the two maps are (Spearman's rank
correlation and SSIM of :func:`vizkit.kit.explanation_map`, both resized to the smaller
of the two shapes), which needs ``arrays.npz`` (``--save-arrays``) on both sides;
failures in one report and not the other; and what differs in model, preprocessing,
versions and options.

:func:`compare` returns a :class:`Comparison`: ``data`` is what ``compare.json``
holds (sorted, rounded, no time but ``SOURCE_DATE_EPOCH``'s), ``pictures`` the small
base | new | difference pictures of the pairs that moved most, for the page only.
``--fail-on`` conditions are parsed by :func:`parse_condition` and checked by
:func:`check`.
"""

from __future__ import annotations

import io
import json
import math
import os
import re
import zipfile
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import numpy as np

from vizkit import __version__, kit
from vizkit.safe_read import MIB, UnreadableFile, describe_os_error, display_path, read_regular

#: compare.json's format, its ``format`` key.
FORMAT = "vizkit-compare/1"
#: Largest report.json and arrays.npz read.
MAX_JSON_BYTES = 256 * MIB
MAX_ARRAYS_BYTES = 2048 * MIB
#: Pairs shown side by side per technique (lowest Spearman first).
MOVED_PER_TECHNIQUE = 3
#: Side of the base | new | difference pictures, in pixels (nearest-neighbour upscaled).
PICTURE_SIDE = 96
#: The fields whose differences are listed: (label, path in report.json).
COMPARED_FIELDS = (
    ("model name", ("model", "name")),
    ("model sha256", ("model", "sha256")),
    ("model input shape", ("model", "input_shape")),
    ("model output", ("model", "output")),
    ("model output kind", ("model", "output_kind")),
    ("preprocessing", ("model", "preprocess")),
    ("labels", ("model", "labels")),
    ("vizkit version", ("vizkit_version",)),
    ("TensorFlow version", ("environment", "tensorflow")),
    ("Keras version", ("environment", "keras")),
    ("NumPy version", ("environment", "numpy")),
    ("Python version", ("environment", "python")),
    ("arrays saved", ("_arrays",)),
)

CONDITION_HELP = (
    "flips>N, flips>=N (images whose top-1 class changed), failures>N (techniques, "
    "images or technique-image pairs that failed in NEW and not in BASE), similarity<X "
    "(some technique's mean Spearman over its images is below X), "
    "TECHNIQUE.similarity<X (that technique's), or NAME<X / TECHNIQUE.NAME<X for a comparison "
    "metric NAME (ssim, or a plugin's; NAME>X for one that is better lower), "
    "e.g. --fail-on flips>0 --fail-on gradcam.similarity<0.8"
)


class CompareError(ValueError):
    """An input that cannot be compared (a usage error: the CLI exits 2)."""


_METRIC_NAME = re.compile(r"^[a-z][a-z0-9_]*$")
#: Names ``--fail-on`` gives its own meaning; no comparison metric may take them.
RESERVED_NAMES = ("flips", "failures", "similarity")


@dataclass(frozen=True)
class ComparisonMetric:
    """A number saying how the map of one technique for one image differs between BASE
    and NEW, registered by a plugin's ``register_comparisons`` hook.

    ``compare(base_map, new_map)`` gets the two maps as 2-D float arrays of the same
    shape (:func:`vizkit.kit.explanation_map` of the saved arrays, both at the smaller
    of the two resolutions) and returns a float. It runs on every comparable technique
    and image in both reports (``--save-arrays`` on both sides); the comparison shows
    its mean and lowest value per technique, and ``--fail-on NAME<X`` (``better="higher"``)
    or ``--fail-on NAME>X`` (``better="lower"``), optionally ``TECHNIQUE.NAME…``, tests
    the mean. A non-finite result counts as no value; an exception costs only this
    metric's numbers (recorded in ``compare.json``'s ``errors``). vizkit's own
    ``spearman`` and ``ssim`` are registered this way.
    """

    #: Lowercase letters, digits and ``_``; not flips, failures nor similarity.
    name: str
    #: One line, shown in the comparison.
    description: str
    #: ``compare(base_map, new_map) -> float``.
    compare: Callable[[np.ndarray, np.ndarray], float]
    #: ``"higher"`` (1 for identical maps, as a similarity) or ``"lower"`` (0, as a distance).
    better: str = "higher"

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _METRIC_NAME.match(self.name) or self.name in RESERVED_NAMES:
            raise ValueError(f"comparison metric name {self.name!r}: lowercase letters, digits and _, "
                             f"not {', '.join(RESERVED_NAMES)}")
        if self.better not in ("higher", "lower"):
            raise ValueError(f"comparison metric {self.name}: better is 'higher' or 'lower', not {self.better!r}")
        if not callable(self.compare):
            raise TypeError(f"comparison metric {self.name}: compare must be callable")


def default_comparison_metrics() -> dict[str, tuple[ComparisonMetric, str]]:
    """vizkit's own comparison metrics, as :func:`vizkit.host.comparison_metrics` lists
    them, for :func:`compare` called without a plugin host."""
    from vizkit.plugins import comparisons

    found: dict[str, tuple[ComparisonMetric, str]] = {}
    comparisons.register_comparisons(lambda m: found.setdefault(m.name, (m, "vizkit.plugins.comparisons")))
    return found


# --------------------------------------------------------------------------- reading


@dataclass
class LoadedReport:
    """A run report read back: ``data`` its report.json, ``arrays`` its arrays.npz
    (None when it has none), ``shown`` the folder as given, for messages."""

    shown: str
    data: dict
    arrays: Any | None  # np.lib.npyio.NpzFile
    arrays_problem: str | None = None  # why there are no arrays

    def array(self, key: str | None) -> np.ndarray | None:
        if key is None or self.arrays is None or key not in self.arrays.files:
            return None
        return self.arrays[key]


def load_report(path: Path) -> LoadedReport:
    """A report folder (or its report.json), read; CompareError naming the fix if it
    is not one."""
    path = Path(path)
    shown = display_path(path)
    fix = "give a folder written by `vizkit run` (its -o), or its report.json"
    if path.is_dir():
        folder, json_path = path, path / "report.json"
    elif path.name.endswith(".json"):
        folder, json_path = path.parent, path
    elif path.exists():
        raise CompareError(f"{shown} is not a report folder nor a report.json: {fix}")
    else:
        raise CompareError(f"{shown} does not exist: {fix}")
    try:
        raw = read_regular(json_path, MAX_JSON_BYTES)
    except FileNotFoundError:
        raise CompareError(f"{shown} has no report.json: {fix}") from None
    except OSError as error:
        raise CompareError(f"{display_path(json_path)} cannot be read: {describe_os_error(error)}: {fix}") from None
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as error:
        raise CompareError(f"{display_path(json_path)} is not JSON ({error}): {fix}") from None
    if not (isinstance(data, dict) and "vizkit_version" in data
            and isinstance(data.get("images"), list) and isinstance(data.get("techniques"), list)
            and all(isinstance(item, dict) for item in data["images"] + data["techniques"])):
        raise CompareError(f"{display_path(json_path)} is not a vizkit report.json: {fix}")
    arrays, problem = None, None
    arrays_path = folder / "arrays.npz"
    try:
        arrays = np.load(io.BytesIO(read_regular(arrays_path, MAX_ARRAYS_BYTES)), allow_pickle=False)
    except FileNotFoundError:
        problem = f"{shown} has no arrays.npz (run `vizkit run` with --save-arrays)"
    except (OSError, UnreadableFile) as error:
        problem = f"{display_path(arrays_path)} cannot be read: {describe_os_error(error)}"
    except ValueError as error:  # not a zip of .npy files
        problem = f"{display_path(arrays_path)} is not a NumPy archive: {error}"
    return LoadedReport(shown, data, arrays, problem)


# --------------------------------------------------------------------------- comparing


@dataclass
class Comparison:
    data: dict  # compare.json
    pictures: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)  # pair id → base/new/difference


def _round(value: float | None) -> float | None:
    if value is None or not math.isfinite(value):
        return None
    return round(float(value), 6)


def _field(data: dict, path: tuple[str, ...], loaded: LoadedReport) -> Any:
    if path == ("_arrays",):
        return loaded.arrays is not None
    value: Any = data
    for key in path:
        value = value.get(key) if isinstance(value, dict) else None
    return value


def _by_sha(images: list[dict]) -> dict[str, dict]:
    """Images by sha256 (the first of several identical files)."""
    found: dict[str, dict] = {}
    for image in images:
        sha = image.get("sha256")
        if isinstance(sha, str) and sha not in found:
            found[sha] = image
    return found


def _top(image: dict) -> dict | None:
    predictions = image.get("predictions") or []
    return predictions[0] if predictions else None


def _score_of(image: dict, index: int) -> float | None:
    return next((p.get("score") for p in image.get("predictions") or [] if p.get("index") == index), None)


def _entry(image: dict) -> dict:
    return {"path": image.get("path"), "sha256": image.get("sha256")}


def _predictions(base_images: dict, new_images: dict, shared: list[str]) -> dict:
    rows = []
    for sha in shared:
        b, n = base_images[sha], new_images[sha]
        tb, tn = _top(b), _top(n)
        if b.get("status") != "ok" or n.get("status") != "ok" or tb is None or tn is None:
            continue
        new_score = _score_of(n, tb.get("index"))
        change = None if new_score is None or tb.get("score") is None else _round(new_score - tb["score"])
        rows.append({
            "path": n.get("path"),
            "sha256": sha,
            "base_top1": {"index": tb.get("index"), "label": tb.get("label"), "score": tb.get("score")},
            "new_top1": {"index": tn.get("index"), "label": tn.get("label"), "score": tn.get("score")},
            "flipped": tb.get("index") != tn.get("index"),
            "base_class_score_in_new": new_score,
            "score_change": change,
        })
    rows.sort(key=lambda r: (not r["flipped"], -abs(r["score_change"] or 0.0), str(r["path"]), r["sha256"]))
    return {"compared": len(rows), "flips": sum(r["flipped"] for r in rows), "images": rows}


def _failures(base: dict, new: dict, base_images: dict, new_images: dict, shared: list[str]) -> dict:
    """What failed in one report and not the other, each as one line (sorted)."""

    shared_set = set(shared)

    def failed(data: dict, images: dict) -> set[str]:
        by_id = {i.get("id"): i for i in data["images"]}
        lines = set()
        for sha in shared:
            if images[sha].get("status") == "error":
                lines.add(f"image {images[sha].get('path')} could not be read")
        for technique in data["techniques"]:
            name = technique.get("name")
            if technique.get("status") == "error":
                lines.add(f"technique {name} failed")
            for entry in technique.get("image_errors") or []:
                image = by_id.get(entry.get("image_id"))
                if image is not None and image.get("sha256") in shared_set:
                    lines.add(f"technique {name} failed on image {images[image['sha256']].get('path')}")
        return lines

    # The same image may have other paths in the two reports: name it by NEW's path on both sides.
    in_base, in_new = failed(base, new_images), failed(new, new_images)
    return {"new": sorted(in_new - in_base), "fixed": sorted(in_base - in_new), "still": sorted(in_base & in_new)}


def _differences(base: LoadedReport, new: LoadedReport) -> list[dict]:
    rows = []
    for label, path in COMPARED_FIELDS:
        b, n = _field(base.data, path, base), _field(new.data, path, new)
        if b != n:
            rows.append({"what": label, "base": b, "new": n})
    base_t = {t.get("name"): t for t in base.data["techniques"]}
    new_t = {t.get("name"): t for t in new.data["techniques"]}
    for name in sorted(set(base_t) | set(new_t), key=str):
        if name not in new_t or name not in base_t:
            rows.append({"what": f"technique {name}", "base": "ran" if name in base_t else "not run",
                         "new": "ran" if name in new_t else "not run"})
            continue
        pb, pn = base_t[name].get("params") or {}, new_t[name].get("params") or {}
        for key in sorted(set(pb) | set(pn)):
            if pb.get(key) != pn.get(key):
                rows.append({"what": f"option {name}.{key}", "base": pb.get(key), "new": pn.get(key)})
    return rows


def _unit(values: np.ndarray) -> np.ndarray:
    span = float(values.max() - values.min()) if values.size else 0.0
    return (values - values.min()) / span if span > 0 else np.zeros_like(values)


def _diverging(difference: np.ndarray) -> np.ndarray:
    """A map in [-1, 1] as RGB: blue (lower in NEW), white (equal), red (higher in NEW)."""
    d = np.clip(difference, -1, 1)[..., None]
    white = np.ones(d.shape[:2] + (3,))
    red, blue = np.array([0.84, 0.15, 0.16]), np.array([0.12, 0.47, 0.71])
    picture = np.where(d >= 0, white + d * (red - white), white - d * (blue - white))
    return np.uint8(np.round(255 * picture))


def _enlarge(picture: np.ndarray) -> np.ndarray:
    factor = max(1, PICTURE_SIDE // max(picture.shape[:2]))
    return np.repeat(np.repeat(picture, factor, axis=0), factor, axis=1)


def _measure(metrics: dict, mb: np.ndarray, mn: np.ndarray, technique: str, errors: dict) -> dict:
    """Each comparison metric on one pair; a raising one costs only its own value."""
    values: dict[str, float | None] = {}
    for name, (metric, plugin) in metrics.items():
        try:
            values[name] = _round(float(metric.compare(mb.copy(), mn.copy())))
        except KeyboardInterrupt:
            raise
        except BaseException as error:  # someone else's plugin: record it, keep going
            values[name] = None
            line = f"plugin {plugin}, comparison {name}: {type(error).__name__}: {error}".strip()
            errors.setdefault((technique, name), line)
    return values


def _sort_key(metrics: dict):
    """Pairs that moved most first: by Spearman if registered, else the first metric."""
    if not metrics:
        return lambda p: (str(p["path"]), p["layer"] or "")
    name = "spearman" if "spearman" in metrics else next(iter(metrics))
    sign = 1.0 if metrics[name][0].better == "higher" else -1.0

    def key(p):
        value = p["metrics"].get(name)
        return (0, sign * value) if value is not None else (1, 0.0), str(p["path"]), p["layer"] or ""

    return key


def _similarity(base: LoadedReport, new: LoadedReport, base_images: dict, new_images: dict,
                shared: list[str], comparison: Comparison, metrics: dict) -> tuple[list[dict], list[str], list[str]]:
    notes = []
    errors: dict[tuple[str, str], str] = {}
    shared_set = set(shared)
    missing = [r.arrays_problem for r in (base, new) if r.arrays is None]
    if missing:
        notes.append("maps not compared: " + "; ".join(missing) + ": the map comparison needs --save-arrays on both sides")
    base_t = {t.get("name"): t for t in base.data["techniques"]}
    rows = []
    for technique in sorted(new.data["techniques"], key=lambda t: str(t.get("name"))):
        name = technique.get("name")
        other = base_t.get(name)
        if other is None or not (technique.get("comparable") and other.get("comparable")):
            continue
        base_ids = {i.get("id"): i.get("sha256") for i in base.data["images"]}
        new_ids = {i.get("id"): i.get("sha256") for i in new.data["images"]}

        def artifacts(t: dict, ids: dict) -> dict:
            found: dict = {}
            for a in t.get("artifacts") or []:
                sha = ids.get(a.get("image_id"))
                if sha in shared_set:
                    found.setdefault((sha, str(a.get("layer"))), a)
            return found

        ab, an = artifacts(other, base_ids), artifacts(technique, new_ids)
        pairs, problems = [], []
        for sha, layer in sorted(set(ab) & set(an)):
            path = new_images[sha].get("path")
            if missing:
                continue
            try:
                xb, xn = base.array(ab[(sha, layer)].get("array")), new.array(an[(sha, layer)].get("array"))
                if xb is None or xn is None:
                    problems.append(f"{path}: no saved array in {'BASE' if xb is None else 'NEW'}")
                    continue
                mb, mn = kit.explanation_map(xb), kit.explanation_map(xn)
                h, w = min(mb.shape[0], mn.shape[0]), min(mb.shape[1], mn.shape[1])
                mb, mn = kit.explanation_map(mb, h, w), kit.explanation_map(mn, h, w)
            except (ValueError, OSError, zipfile.BadZipFile) as error:  # a damaged or odd array
                problems.append(f"{path}: {error}")
                continue
            values = _measure(metrics, mb, mn, str(name), errors)
            pair = {"path": path, "sha256": sha, "layer": None if layer == "None" else layer, "shape": [h, w],
                    "spearman": values.get("spearman"), "ssim": values.get("ssim"), "metrics": values}
            pairs.append(pair)
            comparison.pictures[f"{name}/{sha}/{layer}"] = {
                "base": _enlarge(kit.colorize(_unit(mb))),
                "new": _enlarge(kit.colorize(_unit(mn))),
                "difference": _enlarge(_diverging(_unit(mn) - _unit(mb))),
            }
        pairs.sort(key=_sort_key(metrics))
        summaries = {}
        for metric_name, (metric, _plugin) in metrics.items():
            values = [p["metrics"][metric_name] for p in pairs if p["metrics"].get(metric_name) is not None]
            worst = (min if metric.better == "higher" else max)(values) if values else None
            summaries[metric_name] = {"mean": _round(float(np.mean(values))) if values else None,
                                      "worst": _round(worst), "compared": len(values)}
        rows.append({
            "technique": name,
            "pairs_in_both": len(set(ab) & set(an)),
            "compared": len(pairs),
            "mean_spearman": summaries.get("spearman", {}).get("mean"),
            "min_spearman": summaries.get("spearman", {}).get("worst"),
            "mean_ssim": summaries.get("ssim", {}).get("mean"),
            "metrics": summaries,
            "problems": problems,
            "pairs": pairs,
            "moved": [f"{name}/{p['sha256']}/{p['layer']}" for p in pairs[:MOVED_PER_TECHNIQUE]],
        })
    # Pictures of pairs not shown are not kept.
    shown = {key for row in rows for key in row["moved"]}
    comparison.pictures = {k: v for k, v in comparison.pictures.items() if k in shown}
    return rows, notes, [errors[key] for key in sorted(errors)]


def _side(loaded: LoadedReport) -> dict:
    model = loaded.data.get("model") or {}
    return {
        "report": loaded.shown,
        "vizkit_version": loaded.data.get("vizkit_version"),
        "created": loaded.data.get("created"),
        "model": model.get("name"),
        "model_sha256": model.get("sha256"),
        "images": len(loaded.data["images"]),
        "arrays": loaded.arrays is not None,
    }


def compare(base: LoadedReport, new: LoadedReport, created: datetime | None = None,
            metrics: dict[str, tuple[ComparisonMetric, str]] | None = None) -> Comparison:
    """Compare two loaded reports; ``created`` dates the comparison (default: now).

    ``metrics``: name → (:class:`ComparisonMetric`, plugin) to compare the maps with, as
    the plugin host registers them (``{n: (r.metric, r.plugin) for n, r in
    host.comparison_metrics(pm).items()}``); None: vizkit's own (Spearman, SSIM).
    """
    created = created or datetime.now(tz=timezone.utc).replace(microsecond=0)
    metrics = dict(sorted((default_comparison_metrics() if metrics is None else metrics).items()))
    comparison = Comparison(data={})
    base_images, new_images = _by_sha(base.data["images"]), _by_sha(new.data["images"])
    shared = sorted(set(base_images) & set(new_images))
    techniques, notes, errors = _similarity(base, new, base_images, new_images, shared, comparison, metrics)
    comparison.data = {
        "format": FORMAT,
        "vizkit_version": __version__,
        "created": created.isoformat(),
        "base": _side(base),
        "new": _side(new),
        "notes": notes,
        "differences": _differences(base, new),
        "images": {
            "in_both": len(shared),
            "only_in_base": sorted((_entry(base_images[s]) for s in set(base_images) - set(new_images)), key=lambda e: (str(e["path"]), e["sha256"])),
            "only_in_new": sorted((_entry(new_images[s]) for s in set(new_images) - set(base_images)), key=lambda e: (str(e["path"]), e["sha256"])),
        },
        "predictions": _predictions(base_images, new_images, shared),
        "comparisons": [{"name": n, "description": m.description, "better": m.better, "plugin": p}
                        for n, (m, p) in metrics.items()],
        "errors": errors,
        "similarity": techniques,
        "failures": _failures(base.data, new.data, base_images, new_images, shared),
    }
    return comparison


# --------------------------------------------------------------------------- --fail-on

_CONDITION = re.compile(
    r"^\s*(?:(?P<technique>[^\s.<>=]+)\.)?(?P<name>[a-z][a-z0-9_]*)\s*(?P<op>>=|>|<)\s*(?P<value>-?[0-9]*\.?[0-9]+)\s*$"
)


@dataclass(frozen=True)
class Condition:
    text: str
    name: str  # flips | failures | a comparison metric's name (similarity: spearman)
    op: str  # > >= <
    value: float
    technique: str | None = None


def parse_condition(text: str, metrics: dict | None = None) -> Condition:
    """One ``--fail-on`` expression; CompareError naming the grammar if it is not one.

    ``metrics``: the comparison metrics by name, as :func:`compare` takes them (None:
    vizkit's own). ``similarity`` stands for ``spearman``. A metric whose ``better`` is
    ``"higher"`` takes ``<`` (NAME<X: its mean fell below X), one whose ``better`` is
    ``"lower"`` takes ``>``.
    """
    metrics = default_comparison_metrics() if metrics is None else metrics
    match = _CONDITION.match(text)
    names = ", ".join(f"{n}{'<' if m.better == 'higher' else '>'}X" for n, (m, _) in sorted(metrics.items()))
    fix = f"write one of {CONDITION_HELP}" + (f"; comparison metrics: {names}" if names else "")
    if not match:
        raise CompareError(f"--fail-on {text!r} is not a condition: {fix}")
    name, op, technique = match["name"], match["op"], match["technique"]
    value = float(match["value"])
    if name in ("flips", "failures"):
        if op == "<" or technique is not None:
            raise CompareError(f"--fail-on {text!r}: {name} takes > or >= and no technique, as in {name}>0: {fix}")
        if not value.is_integer() or value < 0:
            raise CompareError(f"--fail-on {text!r}: {name} counts, so N is a whole number: {fix}")
        return Condition(text.strip(), name, op, value, technique)
    metric_name = "spearman" if name == "similarity" else name
    if metric_name not in metrics:
        raise CompareError(f"--fail-on {text!r}: no comparison metric {name!r}: {fix}")
    better = metrics[metric_name][0].better
    wanted = "<" if better == "higher" else ">"
    if op != wanted:
        raise CompareError(f"--fail-on {text!r}: {name} is better {better}, so it takes {wanted}, "
                           f"as in {name}{wanted}{0.8 if wanted == '<' else 0.2}: {fix}")
    return Condition(text.strip(), metric_name, op, value, technique)


def check(comparison: dict, conditions: list[Condition]) -> list[str]:
    """The conditions that hold, each as a line saying why (empty: within thresholds).
    A metric condition with no value to test holds (no maps: ``--save-arrays`` was
    forgotten; the metric raised): a threshold CI relies on must not pass silently."""
    held = []
    for condition in conditions:
        if condition.name in ("flips", "failures"):
            count = comparison["predictions"]["flips"] if condition.name == "flips" else len(comparison["failures"]["new"])
            holds = count > condition.value if condition.op == ">" else count >= condition.value
            if holds:
                what = "top-1 flip(s)" if condition.name == "flips" else "new failure(s)"
                held.append(f"{condition.text}: {count} {what}")
            continue
        name = condition.name

        def mean(row: dict, name: str = name) -> float | None:
            summary = (row.get("metrics") or {}).get(name)
            return summary.get("mean") if summary else row.get(f"mean_{name}")

        rows = [r for r in comparison["similarity"] if condition.technique in (None, r["technique"])]
        measured = [(r, mean(r)) for r in rows if mean(r) is not None]
        if not measured:
            raised = [e for e in comparison.get("errors", []) if f", comparison {name}:" in e]
            why = "; ".join(comparison["notes"] + raised) or (
                f"{condition.technique} was not compared in both reports" if condition.technique else "no technique's maps were compared")
            held.append(f"{condition.text}: " + (f"no {name} to test" if raised else "no maps to compare") + f" ({why})")
            continue
        label = {"spearman": "Spearman", "ssim": "SSIM"}.get(name, name)
        if condition.op == "<":
            bad = [(r, v) for r, v in measured if v < condition.value]
        else:
            bad = [(r, v) for r, v in measured if (v > condition.value if condition.op == ">" else v >= condition.value)]
        if bad:
            held.append(f"{condition.text}: " + ", ".join(f"{r['technique']} mean {label} {v:.3f}" for r, v in bad))
    return held


def summary_lines(comparison: dict) -> list[str]:
    """A few lines for the terminal."""
    p = comparison["predictions"]
    lines = [f"flips: {p['flips']} of {p['compared']} image(s) in both reports"]
    for row in comparison["similarity"]:
        if not any(m["mean"] is not None for m in row["metrics"].values()):
            lines.append(f"{row['technique']}: maps not compared")
        else:
            means = [f"mean {'Spearman' if n == 'spearman' else 'SSIM' if n == 'ssim' else n} {m['mean']:.3f}"
                     for n, m in row["metrics"].items() if m["mean"] is not None]
            lines.append(f"{row['technique']}: {', '.join(means)} over {row['compared']} image(s)")
    lines.append(f"new failures: {len(comparison['failures']['new'])}")
    lines.extend(f"error: {error}" for error in comparison.get("errors", []))
    lines.extend(f"note: {note}" for note in comparison["notes"])
    return lines


def to_json_bytes(comparison: dict) -> bytes:
    return (json.dumps(comparison, indent=2, sort_keys=True, ensure_ascii=False, allow_nan=False) + "\n").encode("utf-8")


def is_comparison_folder(folder: Path) -> bool:
    """A folder holding exactly a comparison vizkit wrote (index.html, compare.json)."""
    try:
        names = sorted(entry.name for entry in os.scandir(folder) if not entry.name.startswith(".vizkit-"))
        if names != ["compare.json", "index.html"]:
            return False
        data = json.loads(read_regular(Path(folder) / "compare.json", MAX_JSON_BYTES))
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and data.get("format") == FORMAT
