"""Apply techniques to a model and images, and write the report: the Python API behind the CLI.

    from vizkit.runner import RunOptions, run
    report, index = run("model.keras", ["photos/"], RunOptions(techniques=["gradcam"]))
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import platform
import sys
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import numpy as np

from vizkit import __version__, host, images as image_io, preprocess as preprocessing, render, report_folder
from vizkit.chunk import Job, explain_chunk, traceback_text
from vizkit.config import merge
from vizkit.extension import ReportSection
from vizkit.labels import LabelsError, read_labels
from vizkit.progress import Progress, as_progress, step
from vizkit.report import Report
from vizkit.report_pages import PAGE_SIZE
from vizkit.report_writer import INTERNAL, ReportWriter, ResumeMismatch
from vizkit.safe_read import display_path, path_entry
from vizkit.technique import OptionError, suggest
from vizkit.tensorflow_setup import start_tensorflow

#: Entries of the partial folder that are not the report's: the run's own records.
DROPPED = (INTERNAL,)

#: Images explained together: what is in memory at once, and what --resume redoes at most.
CHUNK = 32
#: Report layouts: ``auto`` is ``single`` up to ``report_pages.PAGE_SIZE`` images, else ``folder``.
LAYOUTS = ("auto", "single", "folder")
#: Where chunks are explained (``ray``: ``pip install 'vizkit[ray]'``).
EXECUTORS = ("in-process", "ray")
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
    #: its index.html, report.json, arrays.npz, pages/ and pictures/ are replaced, its other files kept.
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
    #: ``single`` (one self-contained page), ``folder`` (summary + pages + PNG files) or
    #: ``auto``: single up to 50 images (``report_pages.PAGE_SIZE``), folder past that.
    layout: str = "auto"
    #: Images per chunk: decoded, explained, written, then let go (memory stays flat).
    chunk: int = CHUNK
    #: Continue the interrupted run in ``outdir`` (same inputs and options), redoing only
    #: the chunks it had not finished.
    resume: bool = False
    #: ``in-process`` or ``ray`` (chunks mapped over a Ray cluster; ``address`` the
    #: cluster's, None: a local one started for the run, ``workers`` model replicas).
    executor: str = "in-process"
    address: str | None = None
    workers: int | None = None

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
            "(its index.html, report.json, arrays.npz, pages/ and pictures/ are replaced, its other files kept)"
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
    per step how much is done: reading the images, each technique, each metric, for a
    run of one chunk; the images explained, for a run of several.

    Images go in chunks of ``options.chunk`` (:mod:`vizkit.chunk`), each written out as
    it is done (:mod:`vizkit.report_writer`), so memory stays flat; the report returned
    holds the arrays only in the ``single`` layout. Raises UsageError (nothing written)
    for bad arguments or a model that cannot load, and ``report_folder.ReportNotWritten``
    (an OSError) when the report cannot be written (a full disk): the folder then stays
    as it was. On Ctrl-C the chunks done stay in the folder's partial results, for
    ``options.resume``. A failing image or technique is recorded in the report instead
    (``report.failed``).
    """
    options = options or RunOptions()
    tracker = as_progress(progress)
    if pm is not None and (options.plugins or options.disabled_plugins):
        raise UsageError("give plugins either in RunOptions or as a plugin host (pm), not both")
    planned = plan(options, pm)
    _check_run_options(options, outdir, model, pm)
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
    layout = options.layout if options.layout != "auto" else ("single" if len(files) <= PAGE_SIZE else "folder")

    # The model loads only now, after the arguments were checked.
    reproducible = options.is_reproducible
    created = created_at(reproducible)
    tracker.message(f"loading model {display_path(str(getattr(model, 'name', model)))}")
    loaded, graph, job, described = build_job(model, options, planned, labels)

    folder = folder or report_folder.claim_new(lambda: default_outdir(loaded.name, created))
    writer = ReportWriter(folder.partial(), options.save_arrays, in_memory=layout == "single")
    numbered = list(zip(image_io.unique_ids(files), files))
    chunks = [numbered[start:start + options.chunk] for start in range(0, len(numbered), options.chunk)]
    try:
        stamp = fingerprint(loaded, graph, labels, options, planned, files)
        done, state = writer.open(stamp, options.resume)
    except OSError as error:
        raise _not_written(error, folder) from error
    except ResumeMismatch as error:
        raise UsageError(
            f"--resume: the partial results in {display_path(folder.path)} were made with other inputs or "
            f"options; changed since: {', '.join(error.changed)}: run without --resume to start over"
        ) from None
    if state == "discarded":
        print(f"vizkit: discarded the partial results of an interrupted run in {display_path(folder.path)} "
              "(--resume continues one instead)", file=sys.stderr)
    elif state == "nothing to resume":
        print(f"vizkit: --resume: no partial results in {display_path(folder.path)}: starting from the first image",
              file=sys.stderr)
    elif state == "resumed":
        print(f"vizkit: resuming: {sum(len(chunks[i]) for i in done)} of {len(files)} images were done", file=sys.stderr)
    pending = [index for index in range(len(chunks)) if index not in done]

    def images_done() -> int:
        return sum(len(chunks[i]) for i in writer.chunks)

    try:
        _explain(job, chunks, pending, writer, tracker, options, model, stamp["model weights"])
        techniques = writer.techniques()
        if options.save_arrays:
            try:
                writer.assemble_arrays(techniques)
            except OSError as error:
                raise _ChunkNotWritten(error) from error
    except KeyboardInterrupt as interrupt:
        interrupt.vizkit_partial = (folder.path, images_done(), len(files))
        raise
    except _ChunkNotWritten as error:  # a full disk, say
        raise _not_written(error.cause, folder, images_done()) from error.cause
    report = Report(
        vizkit_version=__version__,
        created=created.isoformat(),
        model=described,
        images=writer.images(),
        techniques=techniques,
        skipped_files=[path_entry(entry.path, entry.reason) for entry in skipped],
        environment=environment(),
        plugins=host.describe_plugins(planned.pm),
        arrays_saved=options.save_arrays,
        metrics=writer.metrics(),
        layout=layout,
        executor=options.executor,
    )
    outdir = folder.path
    tracker.message(f"writing {display_path(outdir)}")
    max_bytes = None if options.max_report_mb is None else int(options.max_report_mb * render.MB)
    try:
        index = _write(report, folder, _apply_report_hooks(planned.pm, report), max_bytes, writer)
    except render.ReportTooLarge as error:
        folder.release()  # nothing written; a folder this run created goes again
        raise UsageError(f"{error} (the work done is kept: add --resume to write it without redoing it)") from None
    except report_folder.ReportNotWritten as error:
        error.message += _kept(len(files), error.errno)
        raise
    except KeyboardInterrupt as interrupt:
        if not getattr(interrupt, "vizkit_written", None):
            interrupt.vizkit_partial = (folder.path, len(files), len(files))
        raise
    _, errors = planned.pm.call("report_written", report=report, outdir=outdir, index=index)
    for error in errors:
        print(f"vizkit: {error}", file=sys.stderr)
    report.plugin_errors += errors
    return report, index


class _ChunkNotWritten(Exception):
    """Writing a chunk's results failed (``cause``, an OSError): not an error of the
    executor's, such as Ray's ConnectionError, which is an OSError too."""

    def __init__(self, cause: OSError):
        super().__init__(str(cause))
        self.cause = cause


def _not_written(error: OSError, folder: report_folder.ReportFolder, done: int = 0) -> report_folder.ReportNotWritten:
    """ReportNotWritten for a failure to write the run's partial results."""
    kept = report_folder.classify(folder.real)[0] == "report"
    failure = report_folder.ReportNotWritten.of(error, folder.path, kept)
    if done:
        failure.message += _kept(done, error.errno)
    return failure


def _kept(done: int, code: int | None) -> str:
    room = " once there is room" if code in (errno.ENOSPC, getattr(errno, "EDQUOT", None)) else ""
    return f"; the {done} images done are kept: rerun with --resume{room}"


def _check_run_options(options: RunOptions, outdir: Path | None, model, pm) -> None:
    """UsageError, before any work, for options that cannot go together."""
    if options.max_report_mb is not None and not options.max_report_mb > 0:
        raise UsageError(f"--max-report-mb {options.max_report_mb}: give a size in MB above 0")
    if options.layout not in LAYOUTS:
        raise UsageError(f"--layout {options.layout}: one of {', '.join(LAYOUTS)}")
    if options.chunk < 1:
        raise UsageError(f"--chunk {options.chunk}: give a number of images of at least 1")
    if options.resume and outdir is None:
        raise UsageError("--resume continues the run that was writing a report folder: give that folder with -o")
    if options.executor not in EXECUTORS:
        raise UsageError(f"--executor {options.executor}: one of {', '.join(EXECUTORS)}")
    if options.executor == "ray":
        from vizkit import executors

        executors.check_ray(options, model, pm)
    elif options.address or options.workers:
        raise UsageError("--address and --workers are for --executor ray")


def build_job(model, options: RunOptions, planned: Plan, labels: list[str] | None):
    """Load the model and resolve what every chunk needs: (loaded model, graph explained,
    :class:`vizkit.chunk.Job`, the report's model section). UsageError if the model or
    the options do not fit it. A Ray worker calls it too, with the run's arguments."""
    reproducible = options.is_reproducible
    start_tensorflow()
    from vizkit.graph import ModelGraph
    from vizkit.models import ModelLoadError, load_model

    if reproducible:
        import keras
        import tensorflow as tf

        tf.config.experimental.enable_op_determinism()
        keras.utils.set_random_seed(0)  # random weights (--weights none, factories) too
    try:
        loaded = load_model(model, weights=options.weights, size=options.size, loaders=host.model_loaders(planned.pm))
        whole = ModelGraph.of(loaded.model)
        graph = whole.select_output(options.output)  # the output explained; several need options.output
    except (ModelLoadError, ValueError) as error:
        raise UsageError(str(error)) from None
    preprocess = planned.preprocess
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
    size = graph.fixed_size or ((options.size, options.size) if options.size else None)
    job = Job(graph, planned.techniques, planned.metrics, planned.params, preprocess, labels, reproducible, size, graph.channels)
    try:
        for owner in [r.technique for r in planned.techniques] + [r.metric for r in planned.metrics]:
            owner.check_params(job.context(owner.name, []))  # values this model cannot take: before any work
    except OptionError as error:
        raise UsageError(str(error)) from None
    described = {
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
    }
    return loaded, graph, job, described


def fingerprint(loaded, graph, labels: list[str] | None, options: RunOptions, planned: Plan, files: list[Path]) -> dict:
    """What a resumed run must share with the run it continues (keys name what changed):
    the model's weights themselves, not only its file (a model trained in a notebook, or
    random weights drawn again), the inputs, the techniques and metrics in their order
    with their options, the plugins, the labels, the chunk size."""
    def stat(path: Path) -> list:
        try:
            info = path.stat()
            return [info.st_size, info.st_mtime_ns]
        except OSError:
            return []

    return {
        "vizkit version": __version__,
        "model": [loaded.name, loaded.sha256, options.weights, options.output, options.size],
        "model weights": weights_sha256(graph.model),
        "inputs": [[os.fsencode(path).decode("utf-8", "backslashreplace"), *stat(path)] for path in files],
        "techniques and metrics": [
            [name, json.loads(json.dumps(planned.params[name], sort_keys=True, default=str))] for name in planned.params
        ],
        "plugins": sorted(f"{p['name']} {p['version']}" for p in host.describe_plugins(planned.pm)),
        "preprocessing and labels": [options.preprocess, hashlib.sha256(json.dumps(labels).encode()).hexdigest()],
        "images per chunk": options.chunk,
        "arrays (--save-arrays)": options.save_arrays,
        "reproducibility (SOURCE_DATE_EPOCH)": options.is_reproducible,
    }


def weights_sha256(model) -> str:
    """The SHA-256 of a model's weights, in order."""
    digest = hashlib.sha256()
    for weight in model.get_weights():
        digest.update(np.ascontiguousarray(weight).tobytes())
    return digest.hexdigest()


class _ChunkSteps(Progress):
    """A chunk's steps as the run's one step of images sees them: their names and
    messages as its message, failures printed."""

    def __init__(self, run: Progress, index: int, count: int):
        self.run, self.prefix = run, f"chunk {index + 1}/{count}"

    def start(self, name: str, total: int | None, unit: str = "images") -> None:
        self.run.message(f"{self.prefix}: {name}")

    def message(self, text: str) -> None:
        self.run.message(f"{self.prefix}: {text}")

    def error(self, text: str) -> None:
        self.run.error(text)


def _add(writer: ReportWriter, result) -> None:
    try:
        writer.add(result)
    except OSError as error:
        raise _ChunkNotWritten(error) from error


def _explain(job: Job, chunks: list, pending: list[int], writer: ReportWriter, tracker: Progress,
             options: RunOptions, model, weights: str) -> None:
    """Explain the ``pending`` chunks and hand each result to ``writer`` as it comes.
    One chunk: its steps are the run's (reading, each technique, each metric); several:
    one step of images, advanced per chunk. ``weights``: the model's weights' SHA-256
    (the fingerprint's), which Ray workers check theirs against."""
    if len(chunks) == 1 and pending and options.executor == "in-process":
        _add(writer, explain_chunk(job, 0, chunks[0], tracker))
        return
    total = sum(len(chunk) for chunk in chunks)
    with step(tracker, "explaining", total) as explaining:
        explaining.advance(total - sum(len(chunks[i]) for i in pending))
        if options.executor == "ray":
            from vizkit import executors

            results = executors.ray_results(model, options, chunks, pending, weights)
        else:
            results = (explain_chunk(job, i, chunks[i], _ChunkSteps(tracker, i, len(chunks))) for i in pending)
        with contextlib.closing(results):  # a Ray instance the run started stops at once, on Ctrl-C too
            for result in results:
                _add(writer, result)
                explaining.advance(len(chunks[result.index]))
        failed = sum(image.status == "error" for image in writer.images())
        if failed:
            explaining.finish("partial", f"{failed} image(s) could not be read or predicted")


def _write(report: Report, folder: report_folder.ReportFolder, theme: render.Theme, max_bytes: int | None,
           writer: ReportWriter) -> Path:
    """Render and write the report, whole; the plugins' templates and CSS are dropped if
    they break it. ReportNotWritten (a full disk) and Ctrl-C pass through, the folder as
    it was; an error of vizkit's own carries ``vizkit_outdir``, for the CLI to name.
    A folder-layout run's report.json and pages come from the chunk files (the writer).
    """
    def attempt(theme: render.Theme) -> Path:
        if not writer.in_memory:
            try:
                writer.write_report_json(report)
            except OSError as error:
                kept = report_folder.classify(folder.real)[0] == "report"
                raise report_folder.ReportNotWritten.of(error, folder.path, kept) from error
        return render.write(report, folder, theme, max_bytes, writer.root, DROPPED, None if writer.in_memory else writer.page)

    try:
        try:
            return attempt(theme)
        except (KeyboardInterrupt, report_folder.ReportNotWritten, render.ReportTooLarge):
            raise
        except BaseException as error:  # a plugin's template or CSS: write the page without them
            if theme == render.Theme():
                raise
            report.plugin_errors.append(f"the report could not be rendered with the plugins' templates: {traceback_text(error, 1)}")
            print(f"vizkit: {report.plugin_errors[-1]}", file=sys.stderr)
            return attempt(render.Theme())
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
