"""Collect a run's chunk results into its report folder as they come, and resume a run.

Each :class:`vizkit.chunk.ChunkResult` is written at once into the run's partial
folder (``report_folder.ReportFolder.partial``): its pictures as PNG files under
``pictures/``, its arrays (with ``--save-arrays``) as ``.npy`` files, and its records as
``.vizkit-run/chunks/NNNNN.json``, written last and atomically, so a chunk counts as done
only once all of it is on disk. What stays in memory: for a one-page report, every
record, with its arrays and PNG bytes (the page inlines them, the Python API returns
them); for a folder report, the images' records and what the summary needs of the
per-image results (:class:`vizkit.report.Spilled`): :meth:`ReportWriter.page` and
:meth:`ReportWriter.write_report_json` read the rest back from the chunk files.

``--resume``: ``.vizkit-run/run.json`` holds the run's fingerprint (the model, the
inputs, the techniques, metrics and options, the chunk size); a run that finds the same
fingerprint reads the chunks done and explains only the others. A different fingerprint
is a usage error that says what changed.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

from vizkit import files as file_io
from vizkit.chunk import ChunkResult
from vizkit.metric import Column, Curve
from vizkit.npz import npy_bytes, write_npz
from vizkit.pictures import Picture
from vizkit.report import ArtifactRecord, ImageRecord, MeasurementRecord, MetricRecord, Spilled, TechniqueRecord

#: The partial folder's own entries, removed before it is published.
INTERNAL = ".vizkit-run"
#: Version of the chunk files' format: a partial folder of another format is not resumed.
FORMAT = 1


class ResumeMismatch(ValueError):
    """The partial results were made with other inputs or options: ``changed`` names them."""

    def __init__(self, changed: list[str]):
        self.changed = changed
        super().__init__(", ".join(changed))


class ReportWriter:
    """Writes chunk results into ``root`` (the partial folder) and keeps their records."""

    def __init__(self, root: Path, save_arrays: bool, in_memory: bool):
        self.root = Path(root)
        self.save_arrays = save_arrays
        self.in_memory = in_memory  # a one-page report's records keep arrays and PNG bytes
        self.chunks: dict[int, ChunkResult] = {}
        self.chunk_of: dict[str, int] = {}  # image id → its chunk
        self._loaded: dict[int, ChunkResult] = {}  # the chunk files last read back whole

    @property
    def internal(self) -> Path:
        return self.root / INTERNAL

    def open(self, fingerprint: dict, resume: bool) -> tuple[set[int], str]:
        """Make the partial folder ready; returns (chunks already done, what happened:
        ``new``, ``resumed``, ``nothing to resume`` or ``discarded``: an earlier run's
        chunks deleted, since ``resume`` was not asked). With ``resume`` the chunks an
        interrupted run with the same fingerprint finished are read back (ResumeMismatch
        if it differs); a chunk whose files are not all there, as written, is redone."""
        stored = self.internal / "run.json"
        state = "nothing to resume" if resume else "new"
        if os.path.isdir(self.root):
            if resume and stored.is_file():
                earlier = json.loads(stored.read_text(encoding="utf-8"))
                changed = sorted(key for key in {*earlier, *fingerprint} if earlier.get(key) != fingerprint.get(key))
                if changed:
                    raise ResumeMismatch(changed)
                for path in sorted((self.internal / "chunks").glob("[0-9]*.json")):
                    data = json.loads(path.read_text(encoding="utf-8"))
                    if self._complete(data):
                        self._keep(_chunk_from_json(data))
                for name in ("index.html", "report.json", "pages"):  # of a publish that failed: made again
                    path = self.root / name
                    shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
                return set(self.chunks), "resumed"
            if not resume and any((self.internal / "chunks").glob("[0-9]*.json")):
                state = "discarded"
            shutil.rmtree(self.root)
        (self.internal / "chunks").mkdir(parents=True)
        (self.internal / "arrays").mkdir()
        with file_io.atomic_path(stored) as path:
            path.write_bytes(_json_bytes(fingerprint))
        return set(), state

    def _complete(self, data: dict) -> bool:
        """Every file of a chunk is there with the size it was written with (a crash of
        the machine can lose files written just before the chunk's record)."""
        for name, size in data.get("files", {}).items():
            try:
                if (self.root / name).stat().st_size != size:
                    return False
            except OSError:
                return False
        return data.get("format") == FORMAT

    def add(self, result: ChunkResult) -> None:
        """Write one chunk's pictures, arrays and records; keep its records (no pixels)."""
        files = {}
        for picture, owner in _pictures(result):
            path = self.root / picture.path
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(picture.png)  # not flushed one by one: the record below names their sizes
            files[picture.path] = len(picture.png)
            if not self.in_memory:
                owner.picture = picture.written()
        arrays = {}
        for position, technique in enumerate(result.techniques):
            for number, artifact in enumerate(technique.artifacts):
                if self.save_arrays and artifact.array is not None:
                    name = f"{result.index:05d}-{position}-{number}.npy"
                    buffer = npy_bytes(artifact.array)
                    (self.internal / "arrays" / name).write_bytes(buffer)
                    arrays[artifact.key] = name
                    files[f"{INTERNAL}/arrays/{name}"] = len(buffer)
                if not self.in_memory:
                    artifact.array = None
        data = {**_chunk_json(result, arrays), "files": files}
        with file_io.atomic_path(self.internal / "chunks" / f"{result.index:05d}.json") as path:
            path.write_bytes(_json_bytes(data))
        self._keep(result)

    def _keep(self, result: ChunkResult) -> None:
        """Keep a chunk's records: whole for a one-page report; else its images and what
        the summary needs of its per-image results (:class:`Spilled`), which
        :meth:`page` and :meth:`write_report_json` read back from the chunk's file."""
        if not self.in_memory:
            for record in result.techniques:
                record.spilled = _spill(record)
        self.chunks[result.index] = result
        self.chunk_of.update((image.id, result.index) for image in result.images)

    def _chunk(self, index: int) -> ChunkResult:
        """Chunk ``index`` whole: from memory, or read back from its file."""
        if self.in_memory:
            return self.chunks[index]
        if index not in self._loaded:
            if len(self._loaded) > 2:  # a page spans two chunks at most, with the default sizes
                self._loaded.pop(next(iter(self._loaded)))
            path = self.internal / "chunks" / f"{index:05d}.json"
            self._loaded[index] = _chunk_from_json(json.loads(path.read_text(encoding="utf-8")))
        return self._loaded[index]

    def page(self, report, images: list[ImageRecord]):
        """``report`` restricted to ``images``, with every per-image result of theirs,
        read back from the chunk files (``report_pages.subset``'s job for a folder run)."""
        import dataclasses

        ids = {image.id for image in images}
        chunks = sorted({self.chunk_of[image.id] for image in images})
        whole: dict[str, list[TechniqueRecord]] = {}
        for index in chunks:
            for record in self._chunk(index).techniques:
                whole.setdefault(record.name, []).append(record)
        techniques = [
            dataclasses.replace(
                t, spilled=None,
                artifacts=[a for r in whole.get(t.name, []) for a in r.artifacts if a.image_id in ids],
                evidence=[m for r in whole.get(t.name, []) for m in r.evidence if m.image_id in ids],
                image_errors=[e for e in t.image_errors if e["image_id"] in ids],
            )
            for t in report.techniques
        ]
        return dataclasses.replace(report, images=list(images), techniques=techniques, sections=[])

    def write_report_json(self, report) -> None:
        """``report.json`` into the partial folder, as ``json.dumps(report.to_json(),
        indent=2)`` would write it were every record in memory: the per-image lists
        streamed from the chunk files, one chunk at a time."""
        files = report.layout == "folder"
        skeleton = report.to_json()
        skeleton["images"] = _PLACEHOLDER.format("images")
        streams = {"images": (image.to_json(files) for index in sorted(self.chunks) for image in self._chunk(index).images)}
        for number, technique in enumerate(report.techniques):
            for part in ("artifacts", "evidence"):
                name = f"{number}-{part}"
                skeleton["techniques"][number][part] = _PLACEHOLDER.format(name)
                streams[name] = self._stream(technique.name, part, report.arrays_saved, files)
        text = json.dumps(skeleton, indent=2, ensure_ascii=False, allow_nan=False)
        with file_io.atomic_path(self.root / "report.json") as path, open(path, "w", encoding="utf-8") as out:
            start = 0
            for found in _PLACED.finditer(text):
                out.write(text[start:found.start()])
                line = text[text.rfind("\n", 0, found.start()) + 1:found.start()]
                _write_list(out, streams[found.group(1)], len(line) - len(line.lstrip(" ")))
                start = found.end()
            out.write(text[start:] + "\n")

    def _stream(self, technique: str, part: str, arrays_saved: bool, files: bool):
        """A technique's ``artifacts`` or ``evidence`` as report.json has them, chunk by chunk."""
        for index in sorted(self.chunks):
            for record in self._chunk(index).techniques:
                if record.name == technique:
                    for item in getattr(record, part):
                        yield item.to_json(arrays_saved, files) if part == "artifacts" else item.to_json(files)

    # ------------------------------------------------------------------ the whole run

    def ordered(self) -> list[ChunkResult]:
        return [self.chunks[index] for index in sorted(self.chunks)]

    def images(self) -> list[ImageRecord]:
        return [image for chunk in self.ordered() for image in chunk.images]

    def techniques(self) -> list[TechniqueRecord]:
        """Each technique's records of every chunk as one, in the order they ran."""
        merged: dict[str, TechniqueRecord] = {}
        parts: dict[str, list[TechniqueRecord]] = {}
        for chunk in self.ordered():
            for record in chunk.techniques:
                parts.setdefault(record.name, []).append(record)
        for name, records in parts.items():
            merged[name] = _merge_techniques(records)
        return list(merged.values())

    def metrics(self) -> list[MetricRecord]:
        parts: dict[str, list[MetricRecord]] = {}
        for chunk in self.ordered():
            for record in chunk.metrics:
                parts.setdefault(record.name, []).append(record)
        merged = []
        for records in parts.values():
            first = records[0]
            merged.append(MetricRecord(
                first.name, first.plugin, first.description, first.params, first.columns,
                notes=_unique(note for r in records for note in r.notes),
                errors=_unique(error for r in records for error in r.errors),  # failing on every chunk: once
                duration_s=_total(r.duration_s for r in records),
            ))
        return merged

    def assemble_arrays(self, techniques: list[TechniqueRecord]) -> None:
        """``arrays.npz`` from the chunks' ``.npy`` files, in the report's order: by
        technique, then chunk (each chunk's record read once)."""
        files: dict[str, list[tuple[str, Path]]] = {}
        for index in sorted(self.chunks):
            data = json.loads((self.internal / "chunks" / f"{index:05d}.json").read_text(encoding="utf-8"))
            for technique in data["techniques"]:
                files.setdefault(technique["name"], []).extend(
                    (a["key"], self.internal / "arrays" / a["array_file"]) for a in technique["artifacts"] if a.get("array_file")
                )
        write_npz(self.root / "arrays.npz", [entry for t in techniques for entry in files.get(t.name, [])])

def _pictures(result: ChunkResult):
    """(picture, the record holding it) for every picture of the chunk not yet written."""
    for image in result.images:
        if isinstance(image.picture, Picture) and image.picture.png is not None:
            yield image.picture, image
    for technique in result.techniques:
        for record in (*technique.artifacts, *technique.evidence):
            if isinstance(record.picture, Picture) and record.picture.png is not None:
                yield record.picture, record


def _merge_techniques(records: list[TechniqueRecord]) -> TechniqueRecord:
    """One technique's chunk records as one: the run's status from theirs."""
    first = records[0]
    ran = [r for r in records if r.status != "skipped"] or records
    merged = TechniqueRecord(
        first.name, first.plugin, first.description, "ok", first.params, comparable=first.comparable,
        image_errors=[e for r in records for e in r.image_errors],
        duration_s=_total(r.duration_s for r in records),
        notes=_unique(note for r in records for note in r.notes),
        artifacts=[a for r in records for a in r.artifacts],
        evidence=[m for r in records for m in r.evidence],
    )
    for record in records:
        if record.spilled is not None:
            merged.spilled = merged.spilled or Spilled()
            merged.spilled.add(record.spilled)
    failed = [r for r in ran if r.status in ("error", "partial")]
    if len(records) == 1 or all(r.status == "skipped" for r in records):
        merged.status, merged.error, merged.traceback = first.status, first.error, first.traceback
    elif failed:
        merged.status = "partial" if merged.artifacts or merged.per_image_artifacts else "error"
        whole = next((r for r in failed if r.traceback), None)
        merged.error = whole.error if whole else f"{len(merged.image_errors)} image(s) failed"
        merged.traceback = whole.traceback if whole else None
    return merged


def _unique(items) -> list:
    seen: list = []
    for item in items:
        if item not in seen:
            seen.append(item)
    return seen


def _total(values) -> float | None:
    values = [v for v in values if v is not None]
    return round(sum(values), 3) if values else None


#: A list of report.json to stream: a string no record can hold (JSON escapes NUL).
_PLACEHOLDER = "\0{}\0"
_PLACED = re.compile(r'"\\u0000([^"\\]*)\\u0000"')


def _write_list(out, items, indent: int) -> None:
    """A JSON list as ``json.dumps(..., indent=2)`` writes it at ``indent``, item by item."""
    inner = " " * (indent + 2)
    first = True
    for item in items:
        text = json.dumps(item, indent=2, ensure_ascii=False, allow_nan=False).replace("\n", "\n" + inner)
        out.write(("[\n" if first else ",\n") + inner + text)
        first = False
    out.write("[]" if first else "\n" + " " * indent + "]")


def _spill(record: TechniqueRecord) -> Spilled:
    """What the summary needs of a chunk's per-image results; ``record`` keeps only its
    technique-wide artifacts and measurements."""
    spilled = Spilled(artifacts=sum(a.image_id is not None for a in record.artifacts))
    measured = set()
    for m in record.evidence:
        if m.image_id is None:
            continue
        measured.add(m.image_id)
        for key, value in m.values.items():
            spilled.values.setdefault(m.metric, {}).setdefault(key, []).append(value)
        if m.curves:
            spilled.curves.setdefault(m.metric, m.curves)
    spilled.measured = len(measured)
    record.artifacts = [a for a in record.artifacts if a.image_id is None]
    record.evidence = [m for m in record.evidence if m.image_id is None]
    return spilled


def _json_bytes(data) -> bytes:
    return (json.dumps(data, ensure_ascii=False, allow_nan=False) + "\n").encode("utf-8")


# ---------------------------------------------------------------- chunk files


def _picture_json(picture) -> dict | None:
    return {"path": picture.path, "shape": list(picture.shape)} if isinstance(picture, Picture) else None


def _picture(data: dict | None) -> Picture | None:
    return None if data is None else Picture(data["path"], tuple(data["shape"]))


def _chunk_json(result: ChunkResult, arrays: dict[str, str]) -> dict:
    techniques = []
    for t in result.techniques:
        data = t.to_json(arrays_saved=True)
        data.update(description=t.description)
        for artifact, record in zip(data["artifacts"], t.artifacts):
            artifact.update(key=record.key, picture=_picture_json(record.picture), array_file=arrays.get(record.key))
        for measurement, record in zip(data["evidence"], t.evidence):
            measurement.update(picture=_picture_json(record.picture))
        techniques.append(data)
    metrics = [m.to_json() for m in result.metrics]
    images = [{**image.to_json(), "picture": _picture_json(image.picture)} for image in result.images]
    return {"format": FORMAT, "index": result.index, "images": images, "techniques": techniques, "metrics": metrics}


def _chunk_from_json(data: dict) -> ChunkResult:
    images = [
        ImageRecord(
            id=i["id"], path=i["path"], sha256=i["sha256"], status=i["status"], error=i["error"],
            warnings=i["warnings"], predictions=i["predictions"], picture=_picture(i["picture"]), path_bytes=i["path_bytes"],
        )
        for i in data["images"]
    ]
    techniques = [
        TechniqueRecord(
            t["name"], t["plugin"], t["description"], t["status"], t["params"], error=t["error"], traceback=t["traceback"],
            image_errors=t["image_errors"], comparable=t["comparable"], duration_s=t["duration_s"], notes=t["notes"],
            artifacts=[
                ArtifactRecord(a["title"], _picture(a["picture"]), None, a["image_id"], a["layer"], a["caption"], a["key"],
                               tuple(a["shape"]), a["dtype"])
                for a in t["artifacts"]
            ],
            evidence=[
                MeasurementRecord(
                    m["metric"], m["values"], m["image_id"], m["caption"],
                    [Curve(c["label"], c["values"], c["color"], c["dashed"]) for c in m["curves"]],
                    _picture(m["picture"]), m["warning"],
                )
                for m in t["evidence"]
            ],
        )
        for t in data["techniques"]
    ]
    metrics = [
        MetricRecord(m["name"], m["plugin"], m["description"], m["params"],
                     [Column(c["key"], c["label"], c["better"]) for c in m["columns"]],
                     notes=m["notes"], errors=m["errors"], duration_s=m["duration_s"])
        for m in data["metrics"]
    ]
    return ChunkResult(data["index"], images, techniques, metrics)
