"""The report's data model, shared by ``report.json`` and the HTML page. No TensorFlow here."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from vizkit.pictures import Picture


@dataclass
class ImageRecord:
    id: str
    path: str  # as text, undecodable bytes and control characters escaped
    sha256: str
    status: str  # ok | error
    error: str | None = None
    warnings: list[str] = field(default_factory=list)
    predictions: list[dict] = field(default_factory=list)
    picture: Picture | np.ndarray | None = None  # the input as shown
    path_bytes: str | None = None  # the exact name in hex, where ``path`` had to escape it

    def to_json(self, files: bool = False) -> dict:
        return {
            "id": self.id,
            "path": self.path,
            "path_bytes": self.path_bytes,
            "sha256": self.sha256,
            "status": self.status,
            "error": self.error,
            "warnings": self.warnings,
            "predictions": self.predictions,
            "picture": picture_file(self.picture, files),
        }

    @property
    def top(self) -> dict | None:
        """The top prediction (index, label, score), or None."""
        return self.predictions[0] if self.predictions else None


def picture_file(picture, files: bool) -> str | None:
    """A picture's path in report.json: where the report keeps pictures as files."""
    return picture.path if files and isinstance(picture, Picture) else None


@dataclass
class ArtifactRecord:
    title: str
    picture: Picture | np.ndarray
    #: The numbers; None once a chunk's arrays were written (or dropped, without --save-arrays).
    array: np.ndarray | None
    image_id: str | None
    layer: str | None
    caption: str
    key: str  # its name in arrays.npz
    shape: tuple[int, ...] = ()  # the array's; from ``array`` when not given
    dtype: str = ""

    def __post_init__(self) -> None:
        if self.array is not None and not self.dtype:
            self.shape, self.dtype = tuple(int(n) for n in self.array.shape), str(self.array.dtype)

    def to_json(self, arrays_saved: bool, files: bool = False) -> dict:
        return {
            "title": self.title,
            "image_id": self.image_id,
            "layer": self.layer,
            "caption": self.caption,
            "array": self.key if arrays_saved else None,
            "shape": list(self.shape),
            "dtype": self.dtype,
            "picture": picture_file(self.picture, files),
        }


@dataclass
class MeasurementRecord:
    """A metric's measurement of one technique's explanation of one image (``image_id``),
    or of the technique as a whole (``image_id`` None)."""

    metric: str
    values: dict[str, float]
    image_id: str | None = None
    caption: str = ""
    curves: list = field(default_factory=list)  # vizkit.Curve
    picture: Picture | np.ndarray | None = None
    warning: str | None = None

    def to_json(self, files: bool = False) -> dict:
        return {
            "metric": self.metric,
            "image_id": self.image_id,
            "values": self.values,
            "caption": self.caption,
            "curves": [
                {"label": c.label, "values": list(c.values), "color": c.color, "dashed": c.dashed} for c in self.curves
            ],
            "warning": self.warning,
            "picture": picture_file(self.picture, files),
        }


@dataclass
class MetricRecord:
    """One metric of the run: what it is, its options, its notes and where it failed."""

    name: str
    plugin: str
    description: str
    params: dict[str, Any]
    columns: list = field(default_factory=list)  # vizkit.Column
    notes: list[str] = field(default_factory=list)
    errors: list[dict] = field(default_factory=list)  # technique, error, traceback
    duration_s: float | None = None

    def to_json(self) -> dict:
        return {
            "name": self.name,
            "plugin": self.plugin,
            "description": self.description,
            "params": self.params,
            "columns": [{"key": c.key, "label": c.label, "better": c.better} for c in self.columns],
            "notes": self.notes,
            "errors": self.errors,
            "duration_s": self.duration_s,
        }


@dataclass
class Spilled:
    """A technique's per-image results once written to disk and let go (a folder-layout
    run): what the summary needs of them. ``values``: metric → column key → the per-image
    values, in image order; ``curves``: metric → the first image's curves (for a legend)."""

    artifacts: int = 0  # per-image artifacts
    measured: int = 0  # images with measurements
    values: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    curves: dict[str, list] = field(default_factory=dict)

    def add(self, other: Spilled) -> None:
        self.artifacts += other.artifacts
        self.measured += other.measured
        for metric, columns in other.values.items():
            for key, values in columns.items():
                self.values.setdefault(metric, {}).setdefault(key, []).extend(values)
        for metric, curves in other.curves.items():
            self.curves.setdefault(metric, curves)


@dataclass
class TechniqueRecord:
    name: str
    plugin: str
    description: str
    status: str  # ok | partial (some images failed) | error | skipped
    params: dict[str, Any]
    error: str | None = None
    traceback: str | None = None
    image_errors: list[dict] = field(default_factory=list)  # image_id, error, traceback
    comparable: bool = False  # one heatmap per image: shown in the comparison view
    duration_s: float | None = None
    notes: list[str] = field(default_factory=list)
    artifacts: list[ArtifactRecord] = field(default_factory=list)
    evidence: list[MeasurementRecord] = field(default_factory=list)  # what the metrics found
    #: Set where the per-image artifacts and measurements were written to disk and let go:
    #: ``artifacts`` and ``evidence`` then hold only the technique-wide ones.
    spilled: Spilled | None = None

    def evidence_for(self, image_id: str | None) -> list[MeasurementRecord]:
        """The measurements of this technique's map of ``image_id`` (None: of the technique)."""
        return [m for m in self.evidence if m.image_id == image_id]

    @property
    def per_image_artifacts(self) -> int:
        """How many of its artifacts are of an image, in memory or spilled."""
        return self.spilled.artifacts if self.spilled else sum(a.image_id is not None for a in self.artifacts)

    @property
    def measured_images(self) -> int:
        """How many images the metrics measured its maps of."""
        return self.spilled.measured if self.spilled else len({m.image_id for m in self.evidence if m.image_id is not None})

    def sample_curves(self, metric: str) -> list:
        """The curves ``metric`` drew under its first image's map ([] if none)."""
        if self.spilled:
            return self.spilled.curves.get(metric, [])
        return next((m.curves for m in self.evidence if m.metric == metric and m.image_id is not None and m.curves), [])

    @property
    def one_per_image(self) -> bool:
        """Each image has at most one artifact (then the report lays them out side by side)."""
        ids = [a.image_id for a in self.artifacts]
        return len(ids) == len(set(ids))

    def to_json(self, arrays_saved: bool, files: bool = False) -> dict:
        return {
            "name": self.name,
            "plugin": self.plugin,
            "status": self.status,
            "error": self.error,
            "traceback": self.traceback,
            "image_errors": self.image_errors,
            "comparable": self.comparable,
            "duration_s": self.duration_s,
            "params": self.params,
            "notes": self.notes,
            "artifacts": [a.to_json(arrays_saved, files) for a in self.artifacts],
            "evidence": [m.to_json(files) for m in self.evidence],
        }


@dataclass
class Report:
    vizkit_version: str
    created: str
    model: dict[str, Any]  # name, source, sha256, input_shape, preprocess, ...
    images: list[ImageRecord]
    techniques: list[TechniqueRecord]
    skipped_files: list[dict] = field(default_factory=list)  # path, path_bytes, reason
    environment: dict[str, str] = field(default_factory=dict)
    plugins: list[dict] = field(default_factory=list)
    arrays_saved: bool = False
    sections: list[dict] = field(default_factory=list)  # title, html, data
    plugin_errors: list[str] = field(default_factory=list)  # report hooks that raised
    metrics: list[MetricRecord] = field(default_factory=list)
    #: ``single``: one page, pictures inlined; ``folder``: a summary page, pages of
    #: images, pictures as PNG files beside them (paths in report.json).
    layout: str = "single"
    #: Where the chunks of images were explained: ``in-process`` or ``ray``.
    executor: str = "in-process"

    def summary(self) -> list[dict]:
        """The summary table's rows: for each technique the metrics measured, the mean of
        each column over its images (or the metric's value for the whole technique), the
        number of images and the warnings; sorted by the first column that has a better
        direction (methods without that value last), then by name."""
        rows = []
        for technique in self.techniques:
            if not technique.evidence and not technique.measured_images:
                continue
            values: dict[str, dict[str, float]] = {}
            for metric in self.metrics:
                found = [m for m in technique.evidence if m.metric == metric.name]
                whole = next((m.values for m in found if m.image_id is None), {})
                for column in metric.columns:
                    if technique.spilled:
                        per_image = technique.spilled.values.get(metric.name, {}).get(column.key, [])
                    else:
                        per_image = [m.values[column.key] for m in found if m.image_id is not None and column.key in m.values]
                    if column.key in whole:
                        values.setdefault(metric.name, {})[column.key] = whole[column.key]
                    elif per_image:
                        values.setdefault(metric.name, {})[column.key] = round(float(np.mean(per_image)), 6)
            rows.append({
                "technique": technique.name,
                "images": technique.measured_images,
                "values": values,
                "warnings": [m.warning for m in technique.evidence if m.warning and m.image_id is None],
                "checked": any(m.image_id is None for m in technique.evidence),
            })
        ranked = next(((m.name, c) for m in self.metrics for c in m.columns if c.better), None)
        if ranked is None:
            return rows

        def key(row: dict) -> tuple:
            value = row["values"].get(ranked[0], {}).get(ranked[1].key)
            if value is None:
                return (1, 0.0, row["technique"])
            return (0, value if ranked[1].better == "lower" else -value, row["technique"])

        return sorted(rows, key=key)

    def comparison(self) -> list[tuple[ImageRecord, list[tuple[TechniqueRecord, ArtifactRecord]]]]:
        """For each image, the heatmaps of the comparable techniques that explain it, in
        the order the techniques ran: the rows of the report's comparison view."""
        rows = []
        for image in self.images:
            found = [
                (technique, artifact)
                for technique in self.techniques if technique.comparable
                for artifact in technique.artifacts if artifact.image_id == image.id
            ]
            if found:
                rows.append((image, found))
        return rows

    @property
    def failed(self) -> bool:
        """Some image, technique or report hook failed (the report is still written)."""
        return (
            any(i.status == "error" for i in self.images)
            or any(t.status in ("error", "partial") for t in self.techniques)
            or bool(self.plugin_errors)
            or any(m.errors for m in self.metrics)
        )

    def to_json(self) -> dict:
        files = self.layout == "folder"
        return {
            "vizkit_version": self.vizkit_version,
            "created": self.created,
            "layout": self.layout,
            "executor": self.executor,
            "model": self.model,
            "images": [image.to_json(files) for image in self.images],
            "skipped_files": self.skipped_files,
            "techniques": [t.to_json(self.arrays_saved, files) for t in self.techniques],
            "metrics": [m.to_json() for m in self.metrics],
            "summary": self.summary(),
            "sections": [
                {"title": s["title"], "data": s["data"]} for s in self.sections
            ],
            "plugin_errors": self.plugin_errors,
            "plugins": self.plugins,
            "environment": self.environment,
        }

    def arrays(self) -> dict[str, np.ndarray]:
        """The arrays still in memory, by key (a streamed run's are in files)."""
        return {a.key: a.array for t in self.techniques for a in t.artifacts if a.array is not None}
