"""The report's data model, shared by ``report.json`` and the HTML page. No TensorFlow here."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class ImageRecord:
    id: str
    path: str
    sha256: str
    status: str  # ok | error
    error: str | None = None
    warnings: list[str] = field(default_factory=list)
    predictions: list[dict] = field(default_factory=list)
    picture: np.ndarray | None = None  # the input as shown; not in the JSON

    def to_json(self) -> dict:
        return {
            "id": self.id,
            "path": self.path,
            "sha256": self.sha256,
            "status": self.status,
            "error": self.error,
            "warnings": self.warnings,
            "predictions": self.predictions,
        }


@dataclass
class ArtifactRecord:
    title: str
    picture: np.ndarray
    array: np.ndarray
    image_id: str | None
    layer: str | None
    caption: str
    key: str  # its name in arrays.npz

    def to_json(self, arrays_saved: bool) -> dict:
        return {
            "title": self.title,
            "image_id": self.image_id,
            "layer": self.layer,
            "caption": self.caption,
            "array": self.key if arrays_saved else None,
            "shape": list(self.array.shape),
            "dtype": str(self.array.dtype),
        }


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

    @property
    def one_per_image(self) -> bool:
        """Each image has at most one artifact (then the report lays them out side by side)."""
        ids = [a.image_id for a in self.artifacts]
        return len(ids) == len(set(ids))

    def to_json(self, arrays_saved: bool) -> dict:
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
            "artifacts": [a.to_json(arrays_saved) for a in self.artifacts],
        }


@dataclass
class Report:
    vizkit_version: str
    created: str
    model: dict[str, Any]  # name, source, sha256, input_shape, preprocess, ...
    images: list[ImageRecord]
    techniques: list[TechniqueRecord]
    skipped_files: list[str] = field(default_factory=list)
    environment: dict[str, str] = field(default_factory=dict)
    plugins: list[dict] = field(default_factory=list)
    arrays_saved: bool = False
    sections: list[dict] = field(default_factory=list)  # title, html, data
    plugin_errors: list[str] = field(default_factory=list)  # report hooks that raised

    def comparison(self) -> list[tuple[ImageRecord, list[tuple[str, ArtifactRecord]]]]:
        """For each image, the heatmaps of the comparable techniques that explain it, in
        the order the techniques ran: the rows of the report's comparison view."""
        rows = []
        for image in self.images:
            found = [
                (technique.name, artifact)
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
        )

    def to_json(self) -> dict:
        return {
            "vizkit_version": self.vizkit_version,
            "created": self.created,
            "model": self.model,
            "images": [image.to_json() for image in self.images],
            "skipped_files": self.skipped_files,
            "techniques": [t.to_json(self.arrays_saved) for t in self.techniques],
            "sections": [
                {"title": s["title"], "data": s["data"]} for s in self.sections
            ],
            "plugin_errors": self.plugin_errors,
            "plugins": self.plugins,
            "environment": self.environment,
        }

    def arrays(self) -> dict[str, np.ndarray]:
        return {a.key: a.array for t in self.techniques for a in t.artifacts}
