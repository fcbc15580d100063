"""Explain one chunk of images: decode, predict, run each technique and metric, encode.

:func:`explain_chunk` is the whole per-chunk work and depends on nothing but its
:class:`Job` and the chunk, so the in-process loop and a Ray worker
(:mod:`vizkit.executors`) give the same :class:`ChunkResult` for the same chunk; the
report writer (:mod:`vizkit.report_writer`) puts results together in chunk order,
whatever order they arrive in. Pictures leave as PNG bytes (:class:`vizkit.pictures.Picture`).

Techniques with ``run_batch`` explain every chunk; a technique with ``run(context)``
(``filters``: one grid for the model, not per image) and a metric that is not
``per_image`` (``randomization``: a sample of the first images) run on the first chunk only.
"""

from __future__ import annotations

import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from vizkit import images as image_io
from vizkit.metric import Explanation
from vizkit.pictures import Picture
from vizkit.progress import Progress, counted, step
from vizkit.report import ArtifactRecord, ImageRecord, MeasurementRecord, MetricRecord, TechniqueRecord
from vizkit.safe_read import display_path, path_bytes, report_path
from vizkit.technique import Artifact, RunContext

#: Predictions kept per image in the report.
TOP_PREDICTIONS = 5
#: Images per forward pass of the predictions: a pass's activations (hundreds of MB for
#: 16 images at 224 px) set the run's peak memory, and more buys little on a CPU.
PREDICTION_BATCH = 8
#: Longest side of images fed to a model with a free input size, unless --size says otherwise.
FREE_SIZE_MAX_SIDE = 512


@dataclass
class Job:
    """What every chunk of a run needs: the model's graph, the techniques and metrics with
    their options, and how images are read (``size`` (H, W) or None, ``channels``)."""

    graph: object  # ModelGraph
    techniques: list  # host.RegisteredTechnique
    metrics: list  # host.RegisteredMetric
    params: dict[str, dict[str, object]]
    preprocess: Callable
    labels: list[str] | None
    reproducible: bool
    size: tuple[int, int] | None
    channels: int

    def context(self, name: str, images: list) -> RunContext:
        return RunContext(self.graph, images, self.params[name], self.preprocess, self.labels, reproducible=self.reproducible)


@dataclass
class ChunkResult:
    """One chunk's records, pictures still as bytes: ``techniques`` and ``metrics`` by
    name, each holding only this chunk's artifacts, evidence, errors and notes."""

    index: int
    images: list[ImageRecord]
    techniques: list[TechniqueRecord]
    metrics: list[MetricRecord] = field(default_factory=list)


def explain_chunk(job: Job, index: int, files: list[tuple[str, Path]], tracker: Progress | None = None) -> ChunkResult:
    """Chunk ``index`` of a run: ``files`` as (image id, path), the ids unique in the run.
    ``tracker`` hears of each step (reading, each technique, each metric)."""
    tracker = tracker or Progress()
    images = _read_images(files, job, tracker)
    for image in images:
        if image.error:
            print(f"vizkit: {display_path(image.path)}: {image.error}", file=sys.stderr)
    add_predictions(job.graph, [image for image in images if image.ok], job.preprocess, job.labels)
    good = [image for image in images if image.ok]  # an image the model cannot take failed there
    records, explanations = [], []
    for registered in job.techniques:
        technique = registered.technique
        if technique.run_batch is None and index > 0:
            continue  # runs once, in the first chunk: its record is that chunk's
        record, artifacts = _run_technique(registered, job.context(technique.name, good), tracker)
        records.append(record)
        if technique.comparable and artifacts:
            explanations.append((record, Explanation(technique, record.params, artifacts)))
    metric_records = []
    for registered in job.metrics if explanations else []:
        if index > 0 and not registered.metric.per_image:
            continue
        metric_records.append(_run_metric(registered, job.context(registered.metric.name, good), explanations, tracker))
    for record in records:
        record.artifacts = _artifact_records(record.name, record.artifacts, index)
        named: set[str] = set()
        for measurement in record.evidence:
            if measurement.picture is not None:
                name = measurement.image_id or ("all" if index == 0 else f"all-chunk{index + 1}")
                unique, n = name, 1
                while unique in named:
                    n += 1
                    unique = f"{name}-{n}"
                named.add(unique)
                measurement.picture = Picture.of(measurement.picture, measurement.metric, record.name, unique)
    return ChunkResult(index, [_image_record(image) for image in images], records, metric_records)


def top_predictions(scores: np.ndarray, labels: list[str] | None, k: int = TOP_PREDICTIONS) -> list[dict]:
    order = np.argsort(-scores, kind="stable")[:k]
    return [
        {
            "index": int(i),
            "label": labels[i] if labels and i < len(labels) else None,
            "score": round(float(scores[i]), 6),
        }
        for i in order
    ]


def add_predictions(graph, images: list, preprocess, labels: list[str] | None) -> None:
    """Fill in each image's top predictions, when the model is a classifier.

    An image the model cannot take (too small for its layers, say) gets an error
    instead of stopping the run.
    """
    if not graph.is_classifier:
        return
    context = RunContext(graph, images, {}, preprocess)
    for group in context.groups(PREDICTION_BATCH):
        try:
            scores = graph.class_scores(context.batch_of(group).inputs)
        except Exception:  # find which image it was: one at a time
            for image in group:
                _add_predictions_one(graph, image, preprocess, labels)
            continue
        for image, row in zip(group, scores):
            image.predictions = top_predictions(row, labels)


def _add_predictions_one(graph, image, preprocess, labels) -> None:
    try:
        image.predictions = top_predictions(graph.class_scores(preprocess(image.array[None]))[0], labels)
    except Exception as error:  # TensorFlow raises many kinds for a bad input
        image.error = f"the model cannot take this image: {type(error).__name__}: {str(error).splitlines()[0]}"
        print(f"vizkit: {display_path(image.path)}: {image.error}", file=sys.stderr)


def traceback_text(error: BaseException, limit: int = 8) -> str:
    """The last frames, with file names but not their folders: reports stay comparable."""
    frames = traceback.extract_tb(error.__traceback__)[-limit:]
    lines = [f"{Path(f.filename).name}:{f.lineno} in {f.name}: {(f.line or '').strip()}" for f in frames]
    return "\n".join([*lines, f"{type(error).__name__}: {error}"])


def _image_record(image: image_io.LoadedImage) -> ImageRecord:
    return ImageRecord(
        id=image.id,
        path=report_path(image.path),
        path_bytes=path_bytes(image.path),
        sha256=image.sha256,
        status="ok" if image.ok else "error",
        error=image.error,
        warnings=image.warnings,
        predictions=image.predictions,
        picture=None if image.display is None else Picture.of(image.display, "inputs", image.id),
    )


def _read_images(files: list[tuple[str, Path]], job: Job, tracker: Progress) -> list[image_io.LoadedImage]:
    """Decode each file (one at a time: a progress step)."""
    images = []
    with step(tracker, "reading images", len(files)) as reading:
        for image_id, path in files:
            tracker.message(display_path(path))
            images.append(image_io.load(path, image_id, job.channels, job.size, FREE_SIZE_MAX_SIDE))
            reading.advance()
        failed = sum(not image.ok for image in images)
        if failed:
            reading.finish("partial", f"{failed} could not be decoded")
    return images


def _run_technique(registered, context: RunContext, tracker: Progress) -> tuple[TechniqueRecord, list[Artifact]]:
    """Run one technique, as a progress step (of its images, for a ``run_batch`` one);
    whatever it raises is recorded, never passed on. The record's ``artifacts`` are the
    technique's own :class:`Artifact` objects until :func:`_artifact_records`."""
    technique = registered.technique
    record = TechniqueRecord(
        technique.name, registered.plugin, technique.description, "ok", context.params, comparable=technique.comparable
    )
    total = len(context.images) if technique.run_batch is not None else None
    with step(tracker, technique.name, total) as running:
        if not context.images:
            record.status, record.error = "skipped", "no image could be read"
            running.finish(record.status, record.error)
            return record, []
        context.progress = tracker.message
        started = time.perf_counter()
        artifacts: list[Artifact] = []
        try:
            if technique.run_batch is None:
                artifacts = technique.checked(technique.run(context))
            else:
                if technique.prepare is not None:
                    technique.prepare(context)
                artifacts = _run_batches(technique, context, record, tracker)
        except KeyboardInterrupt:
            raise
        except BaseException as error:  # a plugin's failure must not cost the rest of the report
            record.status = "error"
            record.error = f"{type(error).__name__}: {error}"
            record.traceback = traceback_text(error)
            tracker.error(f"technique {technique.name} failed: {record.error}")
        if record.image_errors and record.status == "ok":
            record.status = "partial" if artifacts else "error"
            record.error = record.error or f"{len(record.image_errors)} image(s) failed"
        running.finish(record.status, record.error)
    if not context.reproducible:
        record.duration_s = round(time.perf_counter() - started, 3)
    record.notes = context.notes
    record.artifacts = artifacts
    return record, artifacts


def _run_metric(registered, context: RunContext, explanations: list, tracker: Progress) -> MetricRecord:
    """Measure each technique's explanations with one metric, as a progress step (of the
    techniques measured); its failures are recorded (per technique), never passed on."""
    metric = registered.metric
    record = MetricRecord(metric.name, registered.plugin, metric.description, context.params, list(metric.columns))
    started = time.perf_counter()
    with step(tracker, metric.name, len(explanations), "techniques") as measuring:
        for measured, explanation in explanations:
            context.progress = tracker.message  # the built-in metrics name the technique
            tracker.message(f"{measured.name}: measuring")
            try:
                measurements = metric.measure(context, explanation)
            except KeyboardInterrupt:
                raise
            except BaseException as error:  # a metric's failure costs only its own numbers
                message = f"{type(error).__name__}: {error}"
                record.errors.append({"technique": measured.name, "error": message, "traceback": traceback_text(error)})
                tracker.error(f"metric {metric.name} failed on {measured.name}: {message}")
                continue
            finally:
                measuring.advance()
            measured.evidence += [
                MeasurementRecord(metric.name, m.values, m.image_id, m.caption, list(m.curves), m.picture, m.warning)
                for m in measurements
            ]
        if record.errors:
            status = "error" if len(record.errors) == len(explanations) else "partial"
            measuring.finish(status, f"failed on {len(record.errors)} of {counted(len(explanations), 'techniques')}")
    if not context.reproducible:
        record.duration_s = round(time.perf_counter() - started, 3)
    record.notes = context.notes
    return record


def _run_batches(technique, context: RunContext, record: TechniqueRecord, tracker: Progress) -> list[Artifact]:
    """Each batch through ``run_batch``; a batch that fails is retried image by image, so
    one bad image costs only its own artifacts (recorded in ``record.image_errors``).
    ``tracker`` hears of each image done, failed ones included."""
    artifacts: list[Artifact] = []
    for group in context.groups(context.params.get("batch") or technique.batch_size):
        try:
            artifacts += technique.checked(technique.run_batch(context, context.batch_of(group)))
            tracker.advance(len(group))
            continue
        except KeyboardInterrupt:
            raise
        except BaseException as error:
            if len(group) == 1:
                _image_failed(technique, record, group[0], error, tracker)
                tracker.advance(1)
                continue
        for image in group:
            try:
                artifacts += technique.checked(technique.run_batch(context, context.batch_of([image])))
            except KeyboardInterrupt:
                raise
            except BaseException as error:
                _image_failed(technique, record, image, error, tracker)
            tracker.advance(1)
    return artifacts


def _image_failed(technique, record: TechniqueRecord, image, error: Exception, tracker: Progress) -> None:
    message = f"{type(error).__name__}: {error}"
    record.image_errors.append({"image_id": image.id, "error": message, "traceback": traceback_text(error)})
    tracker.error(f"technique {technique.name} failed on {display_path(image.path)}: {message}")


def _artifact_records(technique: str, artifacts: list[Artifact], index: int = 0) -> list[ArtifactRecord]:
    """Records with pictures encoded; keys ``technique/image/layer`` (``#2`` … where one
    repeats), unique in the run because image ids are (an artifact of no image made in
    chunk ``index`` > 0 gets ``@chunkN`` after its technique)."""
    records, keys = [], set()
    for artifact in artifacts:
        owner = technique if artifact.image_id is not None or index == 0 else f"{technique}@chunk{index + 1}"
        key = "/".join(part for part in (owner, artifact.image_id, artifact.layer) if part)
        unique, n = key, 1
        while unique in keys:
            n += 1
            unique = f"{key}#{n}"
        keys.add(unique)
        records.append(
            ArtifactRecord(
                artifact.title, Picture.of(artifact.picture, *unique.split("/") if "/" in unique else (technique, unique)),
                artifact.array, artifact.image_id, artifact.layer, artifact.caption, unique,
            )
        )
    return records
