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
from typing import Any

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
    "(some technique's mean Spearman over its images is below X) or "
    "TECHNIQUE.similarity<X (that technique's), e.g. --fail-on flips>0 --fail-on gradcam.similarity<0.8"
)


class CompareError(ValueError):
    """An input that cannot be compared (a usage error: the CLI exits 2)."""


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


def _similarity(base: LoadedReport, new: LoadedReport, base_images: dict, new_images: dict,
                shared: list[str], comparison: Comparison) -> tuple[list[dict], list[str]]:
    notes = []
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
                rho, structural = kit.spearman(mb, mn), kit.ssim(mb, mn)
            except (ValueError, OSError, zipfile.BadZipFile) as error:  # a damaged or odd array
                problems.append(f"{path}: {error}")
                continue
            pair = {"path": path, "sha256": sha, "layer": None if layer == "None" else layer, "shape": [h, w],
                    "spearman": _round(rho), "ssim": _round(structural)}
            pairs.append(pair)
            comparison.pictures[f"{name}/{sha}/{layer}"] = {
                "base": _enlarge(kit.colorize(_unit(mb))),
                "new": _enlarge(kit.colorize(_unit(mn))),
                "difference": _enlarge(_diverging(_unit(mn) - _unit(mb))),
            }
        pairs.sort(key=lambda p: (p["spearman"] if p["spearman"] is not None else -2.0, str(p["path"]), p["layer"] or ""))
        rhos = [p["spearman"] for p in pairs if p["spearman"] is not None]
        ssims = [p["ssim"] for p in pairs if p["ssim"] is not None]
        rows.append({
            "technique": name,
            "pairs_in_both": len(set(ab) & set(an)),
            "compared": len(pairs),
            "mean_spearman": _round(float(np.mean(rhos))) if rhos else None,
            "min_spearman": _round(min(rhos)) if rhos else None,
            "mean_ssim": _round(float(np.mean(ssims))) if ssims else None,
            "problems": problems,
            "pairs": pairs,
            "moved": [f"{name}/{p['sha256']}/{p['layer']}" for p in pairs[:MOVED_PER_TECHNIQUE]],
        })
    # Pictures of pairs not shown are not kept.
    shown = {key for row in rows for key in row["moved"]}
    comparison.pictures = {k: v for k, v in comparison.pictures.items() if k in shown}
    return rows, notes


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


def compare(base: LoadedReport, new: LoadedReport, created: datetime | None = None) -> Comparison:
    """Compare two loaded reports; ``created`` dates the comparison (default: now)."""
    created = created or datetime.now(tz=timezone.utc).replace(microsecond=0)
    comparison = Comparison(data={})
    base_images, new_images = _by_sha(base.data["images"]), _by_sha(new.data["images"])
    shared = sorted(set(base_images) & set(new_images))
    techniques, notes = _similarity(base, new, base_images, new_images, shared, comparison)
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
        "similarity": techniques,
        "failures": _failures(base.data, new.data, base_images, new_images, shared),
    }
    return comparison


# --------------------------------------------------------------------------- --fail-on

_CONDITION = re.compile(
    r"^\s*(?:(?P<technique>[^\s.<>=]+)\.)?(?P<name>flips|failures|similarity)\s*(?P<op>>=|>|<)\s*(?P<value>[0-9]*\.?[0-9]+)\s*$"
)


@dataclass(frozen=True)
class Condition:
    text: str
    name: str  # flips | failures | similarity
    op: str  # > >= <
    value: float
    technique: str | None = None


def parse_condition(text: str) -> Condition:
    """One ``--fail-on`` expression; CompareError naming the grammar if it is not one."""
    match = _CONDITION.match(text)
    fix = f"write one of {CONDITION_HELP}"
    if not match:
        raise CompareError(f"--fail-on {text!r} is not a condition: {fix}")
    name, op, technique = match["name"], match["op"], match["technique"]
    value = float(match["value"])
    if name == "similarity" and op != "<":
        raise CompareError(f"--fail-on {text!r}: similarity takes <, as in similarity<0.8: {fix}")
    if name != "similarity" and (op == "<" or technique is not None):
        raise CompareError(f"--fail-on {text!r}: {name} takes > or >= and no technique, as in {name}>0: {fix}")
    if name != "similarity" and not value.is_integer():
        raise CompareError(f"--fail-on {text!r}: {name} counts, so N is a whole number: {fix}")
    return Condition(text.strip(), name, op, value, technique)


def check(comparison: dict, conditions: list[Condition]) -> list[str]:
    """The conditions that hold, each as a line saying why (empty: within thresholds).
    A similarity condition with no map to compare holds: a threshold CI relies on must
    not pass silently because ``--save-arrays`` was forgotten."""
    held = []
    for condition in conditions:
        if condition.name in ("flips", "failures"):
            count = comparison["predictions"]["flips"] if condition.name == "flips" else len(comparison["failures"]["new"])
            holds = count > condition.value if condition.op == ">" else count >= condition.value
            if holds:
                what = "top-1 flip(s)" if condition.name == "flips" else "new failure(s)"
                held.append(f"{condition.text}: {count} {what}")
            continue
        rows = [r for r in comparison["similarity"] if condition.technique in (None, r["technique"])]
        measured = [r for r in rows if r["mean_spearman"] is not None]
        if not measured:
            why = "; ".join(comparison["notes"]) or (
                f"{condition.technique} was not compared in both reports" if condition.technique else "no technique's maps were compared")
            held.append(f"{condition.text}: no maps to compare ({why})")
            continue
        low = [r for r in measured if r["mean_spearman"] < condition.value]
        if low:
            held.append(f"{condition.text}: " + ", ".join(f"{r['technique']} mean Spearman {r['mean_spearman']:.3f}" for r in low))
    return held


def summary_lines(comparison: dict) -> list[str]:
    """A few lines for the terminal."""
    p = comparison["predictions"]
    lines = [f"flips: {p['flips']} of {p['compared']} image(s) in both reports"]
    for row in comparison["similarity"]:
        if row["mean_spearman"] is None:
            lines.append(f"{row['technique']}: maps not compared")
        else:
            lines.append(f"{row['technique']}: mean Spearman {row['mean_spearman']:.3f}, mean SSIM {row['mean_ssim']:.3f} over {row['compared']} image(s)")
    lines.append(f"new failures: {len(comparison['failures']['new'])}")
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
