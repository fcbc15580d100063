"""Apply techniques to a model and images, and write the report: the Python API behind the CLI.

    from vizkit.runner import RunOptions, run
    report, index = run("model.keras", ["photos/"], RunOptions(techniques=["gradcam"]))
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
import traceback
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import numpy as np

from vizkit import __version__, host, images as image_io, preprocess as preprocessing, render, report_folder
from vizkit.config import merge
from vizkit.extension import ReportSection
from vizkit.labels import LabelsError, read_labels
from vizkit.metric import Explanation
from vizkit.progress import Progress, as_progress, counted, step
from vizkit.report import ArtifactRecord, ImageRecord, MeasurementRecord, MetricRecord, Report, TechniqueRecord
from vizkit.safe_read import display_path, path_bytes, path_entry, report_path
from vizkit.technique import Artifact, OptionError, RunContext, suggest
from vizkit.tensorflow_setup import start_tensorflow

#: Predictions kept per image in the report.
TOP_PREDICTIONS = 5
#: Longest side of images fed to a model with a free input size, unless --size says otherwise.
FREE_SIZE_MAX_SIDE = 512
#: Smallest --size (the CLI's bound; the largest is ``images.MAX_SIZE``).
MIN_SIZE = 8


class UsageError(ValueError):
    """Bad arguments: nothing was run and no report was written."""


@dataclass
class RunOptions:
    """Everything a run needs besides the model and the images; the CLI fills it from flags."""

    techniques: list[str] = field(default_factory=list)
    #: Metrics to measure the explanations with (-m); None: the default ones, [] none.
    metrics: list[str] | None = None
    settings: dict[str, dict[str, object]] = field(default_factory=dict)  # -s: technique or metric → key → value
    # From a config file: like settings, but options of techniques not selected are allowed.
    config: dict[str, dict[str, object]] = field(default_factory=dict)
    plugins: list[str] = field(default_factory=list)  # -p: plugin files or modules
    disabled_plugins: list[str] = field(default_factory=list)
    preprocess: str | None = None
    weights: str = "imagenet"
    size: int | None = None
    labels: Path | None = None
    save_arrays: bool = False
    #: Write into ``outdir`` even when it holds files vizkit did not write (--overwrite):
    #: its index.html, report.json and arrays.npz are replaced, its other files kept.
    overwrite: bool = False
    #: Byte-identical output for identical inputs; None: when ``SOURCE_DATE_EPOCH`` is set.
    #: It dates the report from ``SOURCE_DATE_EPOCH`` (else 1970), leaves durations out,
    #: seeds random weights and turns on TensorFlow's op determinism, which TensorFlow
    #: cannot turn off again: it stays on for the rest of the process.
    reproducible: bool | None = None
    #: The output to explain (--output): its name or index, for a model with several
    #: outputs; None: the only one (several are then a UsageError that lists them).
    output: str | int | None = None
    #: The largest the report may be, index.html, report.json and arrays.npz together,
    #: in MB (10**6 bytes; --max-report-mb); None: no limit. A larger report is not
    #: written: UsageError (exit 2) naming its size and the fix, after the work was done.
    max_report_mb: float | None = None

    @property
    def is_reproducible(self) -> bool:
        return "SOURCE_DATE_EPOCH" in os.environ if self.reproducible is None else self.reproducible


def created_at(reproducible: bool) -> datetime:
    """The report's time: from ``SOURCE_DATE_EPOCH`` (else 1970) when reproducible, so
    equal inputs give equal bytes; else now, to the second."""
    if reproducible:
        return source_date() or datetime.fromtimestamp(0, tz=timezone.utc)
    return datetime.now(tz=timezone.utc).replace(microsecond=0)


def source_date() -> datetime | None:
    """The time ``SOURCE_DATE_EPOCH`` gives (None when unset); UsageError, before any
    work, for a value that is not ASCII digits (``str.isdigit`` takes ``²``) or lies
    beyond what a date can hold (year 9999)."""
    value = os.environ.get("SOURCE_DATE_EPOCH")
    if value is None:
        return None
    fix = "set it to whole seconds since 1970, e.g. SOURCE_DATE_EPOCH=$(git log -1 --format=%ct), or unset it"
    text = value.strip()
    if not (text.isascii() and text.isdigit()):
        raise UsageError(f"SOURCE_DATE_EPOCH must be seconds since 1970 in digits 0-9, not {value!r}: {fix}")
    try:
        return datetime.fromtimestamp(int(text), tz=timezone.utc)
    except (OverflowError, OSError, ValueError):
        raise UsageError(f"SOURCE_DATE_EPOCH={text} is past the year 9999: {fix}") from None


def default_outdir(model_name: str, created: datetime, base: Path = Path("reports")) -> Path:
    """``reports/<model>-<time>``, never an existing folder (nor one another run is
    writing), so no report is overwritten."""
    stem = f"{model_name}-{created.strftime('%Y%m%d-%H%M%S')}"
    candidate, n = base / stem, 1
    while candidate.exists() or report_folder.is_claimed(candidate):
        n += 1
        candidate = base / f"{stem}-{n}"
    return candidate


def check_outdir(outdir: Path | None, overwrite: bool = False) -> report_folder.ReportFolder | None:
    """UsageError now, not after all the work, for a folder that cannot be written, that
    holds files vizkit did not write (unless ``overwrite``), or that another run is
    writing; else the folder, claimed (locked) until the report is in it or the run ends."""
    if outdir is None:
        return None
    existing = next(p for p in [outdir, *outdir.absolute().parents] if p.exists())
    if not existing.is_dir():
        raise UsageError(f"-o {display_path(outdir)}: {display_path(existing)} is a file, not a folder")
    if not os.access(existing, os.W_OK):
        raise UsageError(f"-o {display_path(outdir)}: {display_path(existing)} is not writable")
    try:
        return report_folder.claim(outdir, overwrite=overwrite)
    except report_folder.NotAReportFolder as error:
        raise UsageError(
            f"-o {error}: pick an empty or new folder, or add --overwrite to write the report into it anyway "
            "(its index.html, report.json and arrays.npz are replaced, its other files kept)"
        ) from None
    except report_folder.FolderBusy as error:
        raise UsageError(f"{error}: wait for it to finish, or pick another folder with -o") from None
    except report_folder.FolderRefused as error:
        raise UsageError(f"-o {error}") from None


@dataclass
class Plan:
    """What a run will do, resolved and checked before anything heavy loads."""

    pm: host.PluginHost
    techniques: list[host.RegisteredTechnique]
    metrics: list[host.RegisteredMetric]
    params: dict[str, dict[str, object]]  # technique or metric name → its options
    preprocess: Callable | None


def plan(options: RunOptions, pm=None) -> Plan:
    """Resolve techniques, metrics and their options before anything heavy loads; UsageError if bad."""
    source_date()
    if options.size is not None and not MIN_SIZE <= options.size <= image_io.MAX_SIZE:
        raise UsageError(f"size {options.size} is outside {MIN_SIZE}-{image_io.MAX_SIZE}")
    try:
        pm = pm or host.plugin_manager(options.plugins, options.disabled_plugins)
        available = host.techniques(pm)
        measures = host.metrics(pm)
    except host.PluginError as error:
        raise UsageError(str(error)) from None
    try:
        selected = host.select(available, options.techniques)
        chosen_metrics = host.select_metrics(measures, options.metrics)
    except KeyError as error:
        raise UsageError(str(error.args[0])) from None
    owners = {**{n: r.technique for n, r in available.items()}, **{n: r.metric for n, r in measures.items()}}
    chosen = [r.technique.name for r in selected] + [r.metric.name for r in chosen_metrics]
    if not any(r.technique.comparable for r in selected):  # nothing to measure: options still checked
        if options.metrics:
            print("vizkit: no CAM or attribution technique is selected, so no metric runs "
                  "(add one with -t, or -t explain for all)", file=sys.stderr)
        chosen_metrics = []
    for name in options.config:
        if name not in owners:
            raise UsageError(f"config: no technique or metric {name!r} is installed; installed: {suggest(name, list(owners))}")
    for name in options.settings:
        if name not in chosen:
            where = "installed" if name not in owners else "selected"
            raise UsageError(
                f"-s {name}.…: no technique or metric {name!r} is {where}; "
                f"{where}: {suggest(name, sorted(chosen if name in owners else owners))}"
            )
    try:
        for name, values in options.config.items():  # checked even where not selected: typos show
            owners[name].resolve_params(values)
        merged = merge(options.config, options.settings)
        params = {name: owners[name].resolve_params(merged.get(name, {})) for name in chosen}
    except OptionError as error:
        raise UsageError(str(error)) from None
    try:
        preprocess = preprocessing.resolve(options.preprocess) if options.preprocess else None
    except ValueError as error:
        raise UsageError(str(error)) from None
    return Plan(pm, selected, chosen_metrics, params, preprocess)


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
    for group in context.groups(16):
        try:
            scores = graph.class_scores(context.batch_of(group).inputs)
        except Exception:  # find which image it was: one at a time
            for image in group:
                add_predictions_one(graph, image, preprocess, labels)
            continue
        for image, row in zip(group, scores):
            image.predictions = top_predictions(row, labels)


def add_predictions_one(graph, image, preprocess, labels) -> None:
    try:
        image.predictions = top_predictions(graph.class_scores(preprocess(image.array[None]))[0], labels)
    except Exception as error:  # TensorFlow raises many kinds for a bad input
        image.error = f"the model cannot take this image: {type(error).__name__}: {str(error).splitlines()[0]}"
        print(f"vizkit: {display_path(image.path)}: {image.error}", file=sys.stderr)


@report_folder.releasing_claims  # the folder claimed by check_outdir is let go however the run ends
def run(
    model,
    inputs: list[str | Path],
    options: RunOptions | None = None,
    outdir: Path | None = None,
    progress: Progress | Callable[[str], None] = lambda message: None,
    pm=None,
) -> tuple[Report, Path]:
    """Run the selected techniques and write the report; returns (report, path of index.html).

    ``model`` is a model spec as on the command line, or a ``keras.Model``. ``pm`` is a
    plugin host to use instead of one built from ``options.plugins`` and
    ``options.disabled_plugins`` (give one or the other). ``progress`` is a
    ``progress(message)`` callable or a :class:`vizkit.progress.Progress`, which learns
    per step (reading the images, each technique, each metric) how much is done.

    Raises UsageError (nothing written) for bad arguments or a model that cannot load,
    and ``report_folder.ReportNotWritten`` (an OSError) when the report cannot be written
    (a full disk): the folder then stays as it was.
    A failing image or technique is recorded in the report instead (``report.failed``).
    """
    options = options or RunOptions()
    tracker = as_progress(progress)
    if pm is not None and (options.plugins or options.disabled_plugins):
        raise UsageError("give plugins either in RunOptions or as a plugin host (pm), not both")
    planned = plan(options, pm)
    pm, selected, params, preprocess = planned.pm, planned.techniques, planned.params, planned.preprocess
    if options.max_report_mb is not None and not options.max_report_mb > 0:
        raise UsageError(f"--max-report-mb {options.max_report_mb}: give a size in MB above 0")
    folder = check_outdir(outdir, options.overwrite)
    try:
        labels = read_labels(options.labels) if options.labels else None
    except LabelsError as error:
        raise UsageError(str(error)) from None
    files, skipped = image_io.scan([Path(p) for p in inputs])
    reasons = [f"{display_path(entry.path)}: {entry.reason}" for entry in skipped]
    if not files:
        listed = "; ".join(reasons[:3]) + ("; …" if len(reasons) > 3 else "")
        raise UsageError("no images found in the inputs given" + (f" (skipped {listed})" if skipped else ""))
    for entry, reason in zip(skipped, reasons):
        if entry.reason != image_io.NOT_AN_IMAGE:  # the unexpected ones by name, the rest counted
            print(f"vizkit: skipped {reason}", file=sys.stderr)
    if skipped:
        print(f"vizkit: skipped {len(skipped)} input(s) that are not images or cannot be read (listed in the report)", file=sys.stderr)

    # The model loads only now, after the arguments were checked.
    reproducible = options.is_reproducible
    created = created_at(reproducible)
    start_tensorflow()
    from vizkit.graph import ModelGraph
    from vizkit.models import ModelLoadError, load_model

    if reproducible:
        import keras
        import tensorflow as tf

        tf.config.experimental.enable_op_determinism()
        keras.utils.set_random_seed(0)  # random weights (--weights none, factories) too
    tracker.message(f"loading model {display_path(str(getattr(model, 'name', model)))}")
    try:
        loaded = load_model(model, weights=options.weights, size=options.size, loaders=host.model_loaders(pm))
        whole = ModelGraph.of(loaded.model)
        graph = whole.select_output(options.output)  # the output explained; several need options.output
    except (ModelLoadError, ValueError) as error:
        raise UsageError(str(error)) from None
    if preprocess is None:
        preprocess_name, preprocess_reason = loaded.preprocess, loaded.preprocess_reason
        try:
            preprocess = preprocessing.resolve(loaded.preprocess)
        except ValueError as error:
            raise UsageError(f"the model's preprocessing: {error}") from None
    else:
        preprocess_name, preprocess_reason = options.preprocess, "chosen with --preprocess"
    if graph.channels == 1 and preprocess_name in ("caffe", "torch"):
        raise UsageError(
            f"--preprocess {preprocess_name} is for RGB images, but {loaded.name} takes one "
            "channel; use unit, none or package.module:function"
        )
    if labels and graph.is_classifier and len(labels) != graph.num_classes:
        raise UsageError(
            f"--labels {display_path(options.labels)} has {len(labels)} class names, but the model has "
            f"{graph.num_classes} classes"
        )
    labels = labels or loaded.labels
    owners = [r.technique for r in selected] + [r.metric for r in planned.metrics]
    contexts = {
        owner.name: RunContext(graph, [], params[owner.name], preprocess, labels, reproducible=reproducible)
        for owner in owners
    }
    try:
        for owner in owners:  # values this model cannot take: a usage error, before any work
            owner.check_params(contexts[owner.name])
    except OptionError as error:
        raise UsageError(str(error)) from None

    size = graph.fixed_size or ((options.size, options.size) if options.size else None)
    images = _read_images(files, graph.channels, size, tracker)
    for image in images:
        if image.error:
            print(f"vizkit: {display_path(image.path)}: {image.error}", file=sys.stderr)
    add_predictions(graph, [image for image in images if image.ok], preprocess, labels)
    good = [image for image in images if image.ok]

    records, explanations = [], []
    for registered in selected:
        context = contexts[registered.technique.name]
        context.images = good
        record, artifacts = _run_technique(registered, context, tracker)
        records.append(record)
        if registered.technique.comparable and artifacts:
            explanations.append((record, Explanation(registered.technique, record.params, artifacts)))
    metric_records = []
    for registered in planned.metrics if explanations else []:
        context = contexts[registered.metric.name]
        context.images = good
        metric_records.append(_run_metric(registered, context, explanations, tracker))
    report = Report(
        vizkit_version=__version__,
        created=created.isoformat(),
        model={
            "name": loaded.name,
            "source": display_path(loaded.source),  # a model file's name can be any bytes
            "sha256": loaded.sha256,
            "input_shape": list(graph.input_shape),
            "output_shape": list(graph.output_shape),
            "outputs": whole.output_names,
            "output": graph.output_name,
            "output_kind": graph.output_kind,
            "layers": len(graph.layers),
            "preprocess": preprocess_name,
            "preprocess_reason": preprocess_reason,
            "labels": f"{len(labels)} class names" if labels else None,
        },
        images=[_image_record(image) for image in images],
        techniques=records,
        skipped_files=[path_entry(entry.path, entry.reason) for entry in skipped],
        environment=environment(),
        plugins=host.describe_plugins(pm),
        arrays_saved=options.save_arrays,
        metrics=metric_records,
    )
    folder = folder or report_folder.claim_new(lambda: default_outdir(loaded.name, created))
    outdir = folder.path
    tracker.message(f"writing {display_path(outdir)}")
    max_bytes = None if options.max_report_mb is None else int(options.max_report_mb * render.MB)
    try:
        index = _write(report, folder, _apply_report_hooks(pm, report), max_bytes)
    except render.ReportTooLarge as error:
        folder.release()  # nothing written; a folder this run created goes again
        raise UsageError(str(error)) from None
    _, errors = pm.call("report_written", report=report, outdir=outdir, index=index)
    for error in errors:
        print(f"vizkit: {error}", file=sys.stderr)
    report.plugin_errors += errors
    return report, index


def _write(report: Report, folder: report_folder.ReportFolder, theme: render.Theme, max_bytes: int | None = None) -> Path:
    """Render and write the report, whole; the plugins' templates and CSS are dropped if
    they break it. ReportNotWritten (a full disk) and Ctrl-C pass through, the folder as
    it was; an error of vizkit's own carries ``vizkit_outdir``, for the CLI to name.
    """
    try:
        try:
            return render.write(report, folder, theme, max_bytes)
        except (KeyboardInterrupt, report_folder.ReportNotWritten, render.ReportTooLarge):
            raise
        except BaseException as error:  # a plugin's template or CSS: write the page without them
            if theme == render.Theme():
                raise
            report.plugin_errors.append(f"the report could not be rendered with the plugins' templates: {_traceback(error, 1)}")
            print(f"vizkit: {report.plugin_errors[-1]}", file=sys.stderr)
            return render.write(report, folder, max_bytes=max_bytes)
    except (report_folder.ReportNotWritten, render.ReportTooLarge):
        raise
    except Exception as error:
        error.vizkit_outdir = folder.path
        raise


def _apply_report_hooks(pm, report: Report) -> render.Theme:
    """Plugin sections go into the report; their CSS and templates into the theme."""
    sections, errors = pm.call("report_sections", report=report)
    for items in sections:
        for item in items if isinstance(items, (list, tuple)) else [items]:
            try:
                if not isinstance(item, ReportSection):
                    raise TypeError(f"returned a {type(item).__name__}, not a vizkit ReportSection")
                json.dumps(item.data, allow_nan=False)  # it goes into report.json
            except (TypeError, ValueError) as error:
                errors.append(f"hook report_sections: {error}")
                continue
            report.sections.append({"title": item.title, "html": item.html, "data": item.data})
    css, css_errors = pm.call("report_css")
    folders, folder_errors = pm.call("report_templates")
    errors += css_errors + folder_errors
    errors += [f"hook report_css: returned a {type(text).__name__}, not CSS text" for text in css if not isinstance(text, str)]
    usable_folders = []
    for folder in folders:
        if isinstance(folder, (str, Path)) and Path(folder).is_dir():
            usable_folders.append(Path(folder))
        else:
            errors.append(f"hook report_templates: {folder!r} is not a folder of templates")
    report.plugin_errors += errors
    for error in report.plugin_errors:
        print(f"vizkit: {error}", file=sys.stderr)
    return render.Theme([text for text in css if isinstance(text, str)], usable_folders)


def _traceback(error: BaseException, limit: int = 8) -> str:
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
        picture=image.display,
    )


def _read_images(files: list[Path], channels: int, size, tracker: Progress) -> list[image_io.LoadedImage]:
    """Decode each file (``images.load_all``, one file at a time: a progress step)."""
    images = []
    with step(tracker, "reading images", len(files)) as reading:
        for image_id, path in zip(image_io.unique_ids(files), files):
            tracker.message(display_path(path))
            images.append(image_io.load(path, image_id, channels, size, FREE_SIZE_MAX_SIDE))
            reading.advance()
        failed = sum(not image.ok for image in images)
        if failed:
            reading.finish("partial", f"{failed} could not be decoded")
    return images


def _run_technique(registered, context: RunContext, tracker: Progress) -> tuple[TechniqueRecord, list[Artifact]]:
    """Run one technique, as a progress step (of its images, for a ``run_batch`` one);
    whatever it raises is recorded, never passed on."""
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
            record.traceback = _traceback(error)
            tracker.error(f"technique {technique.name} failed: {record.error}")
        if record.image_errors and record.status == "ok":
            record.status = "partial" if artifacts else "error"
            record.error = record.error or f"{len(record.image_errors)} image(s) failed"
        running.finish(record.status, record.error)
    if not context.reproducible:
        record.duration_s = round(time.perf_counter() - started, 3)
    record.notes = context.notes
    record.artifacts = _artifact_records(technique.name, artifacts)
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
                record.errors.append({"technique": measured.name, "error": message, "traceback": _traceback(error)})
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
    record.image_errors.append({"image_id": image.id, "error": message, "traceback": _traceback(error)})
    tracker.error(f"technique {technique.name} failed on {display_path(image.path)}: {message}")


def _artifact_records(technique: str, artifacts) -> list[ArtifactRecord]:
    records, keys = [], set()
    for artifact in artifacts:
        key = "/".join(part for part in (technique, artifact.image_id, artifact.layer) if part)
        unique, n = key, 1
        while unique in keys:
            n += 1
            unique = f"{key}#{n}"
        keys.add(unique)
        records.append(
            ArtifactRecord(
                artifact.title, artifact.picture, artifact.array, artifact.image_id,
                artifact.layer, artifact.caption, unique,
            )
        )
    return records


def environment() -> dict[str, str]:
    """Versions that change the numbers; no host names or paths, so reports stay comparable."""
    import keras
    import tensorflow as tf

    return {
        "python": platform.python_version(),
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "numpy": np.__version__,
        "platform": f"{platform.system()} {platform.machine()}",
    }
