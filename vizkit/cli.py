"""The ``vizkit`` command: a thin Click layer over :mod:`vizkit.runner`."""

from __future__ import annotations

import json
import os
import sys
import tempfile
import traceback
from datetime import datetime, timezone
from pathlib import Path

import click

from vizkit import __version__, host
from vizkit.config import ConfigError, load_settings
from vizkit.exitcodes import ExitCode
from vizkit.images import MAX_SIZE
from vizkit.report_folder import ReportNotWritten
from vizkit.report_pages import PAGE_SIZE
from vizkit.runner import CHUNK, EXECUTORS, LAYOUTS, MIN_SIZE, RunOptions, UsageError
from vizkit.safe_read import display_path, printable
from vizkit.tensorflow_setup import start_tensorflow

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


class VizkitGroup(click.Group):
    """Click's group, plus exit status 3 for a crash of vizkit itself (see ExitCode)."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except click.ClickException as error:  # it may quote a user's path or value
            error.message = printable(error.message, keep="\n")
            raise
        except (click.exceptions.Exit, click.Abort, SystemExit):
            raise
        except KeyboardInterrupt as interrupt:
            written = getattr(interrupt, "vizkit_written", None)  # Ctrl-C just after the report was in place
            outcome = f"the report in {display_path(written)} was written" if written else "no report was written"
            partial = getattr(interrupt, "vizkit_partial", None)  # (folder, images done, images)
            if partial and partial[1]:
                folder, done, total = partial
                outcome += (f"; the {done} of {total} images done are kept: run the same command with --resume "
                            f"(and -o {display_path(folder)}) to continue")
            click.echo(f"vizkit: interrupted; {outcome}", err=True)
            ctx.exit(ExitCode.INTERRUPTED)
        except ReportNotWritten as error:  # a full disk: its message is one line and names the folder
            click.echo(f"vizkit: {printable(str(error))}", err=True)
            ctx.exit(ExitCode.WRITE_ERROR)
        except BrokenPipeError:  # `vizkit techniques | head`: the reader has what it wanted
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            ctx.exit(ExitCode.OK)
        except Exception as error:
            where = _save_traceback(error)
            written = getattr(error, "vizkit_outdir", None)
            outcome = f"nothing was written to {display_path(written)}" if written else "no report was written"
            detail = printable(str(error), keep="\n")  # it may quote a user's path
            click.echo(
                f"vizkit: internal error: {type(error).__name__}: {detail}\n"
                f"vizkit: {outcome}; the traceback is in {where} (please include it in a bug report)",
                err=True,
            )
            ctx.exit(ExitCode.INTERNAL_ERROR)


def _save_traceback(error: BaseException) -> str:
    handle, path = tempfile.mkstemp(prefix="vizkit-traceback-", suffix=".txt")
    with os.fdopen(handle, "w", encoding="utf-8") as file:
        file.write("".join(traceback.format_exception(error)))
    return path


def _progress(quiet: bool):
    """Progress on stderr: a bar per step on a terminal, a line per step when piped,
    nothing with --quiet (failures are printed either way)."""
    from vizkit.progress import for_stderr

    return for_stderr(quiet)


def _parse_settings(values: tuple[str, ...]) -> dict[str, dict[str, str]]:
    settings: dict[str, dict[str, str]] = {}
    for value in values:
        key, sep, setting = value.partition("=")
        technique, dot, option = key.partition(".")
        if not (sep and dot and technique and option):
            raise click.BadParameter(f"{value!r} is not TECHNIQUE.KEY=VALUE", param_hint="-s")
        settings.setdefault(technique, {})[option] = setting
    return settings


def plugin_options(command):
    """-p and --disable-plugin, on every command that loads plugins."""
    command = click.option(
        "--disable-plugin", "disabled", multiple=True, metavar="NAME",
        help="Do not load this plugin (repeatable; names as `vizkit plugins` shows them).",
    )(command)
    return click.option(
        "-p", "--plugin", "plugins", multiple=True, metavar="PATH_OR_MODULE",
        help="Also load this plugin: a .py file, a package folder or an importable module (repeatable).",
    )(command)


def _host(plugins, disabled) -> host.PluginHost:
    """The plugin host; ``ctx.obj["plugins"]`` adds (name, plugin) pairs (the test kit's)."""
    extra = (click.get_current_context().obj or {}).get("plugins", ())
    try:
        return host.plugin_manager(plugins, disabled, extra=extra)
    except host.PluginError as error:
        raise click.UsageError(str(error)) from None


OUTPUT_HELP = "The output to explain, for a model with several: its name (as `vizkit layers` lists them) or index."

EXIT_STATUS = """Exit status: 0 all fine; 1 the report was written, but an image, a technique
or a report hook failed; 2 bad arguments (nothing written); 3 internal error; 4 the
report could not be written (disk full; the folder is as it was); 130 interrupted
(Ctrl-C)."""

OVERWRITE_HELP = ("Write into -o even if it holds files vizkit did not write: its index.html, report.json, "
                  "arrays.npz, pages/ and pictures/ are replaced, its other files kept (a pages/ or pictures/ "
                  "folder vizkit did not write is refused). Not needed to replace a vizkit report.")


@click.group(cls=VizkitGroup, epilog=EXIT_STATUS)
@click.version_option(__version__, prog_name="vizkit")
def main():
    """See what a convolutional network learned: one static HTML report per run.

    TensorFlow loads only in the commands that load a model (run, layers, demo).
    """


@main.command()
@click.argument("model")
@click.argument("inputs", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
@click.option("-t", "--technique", "techniques", multiple=True, help="Technique to run (repeatable); default: all.")
@click.option("-o", "--outdir", type=click.Path(file_okay=False, path_type=Path), help="Report folder; default: a new one under reports/.")
@click.option("--overwrite", is_flag=True, help=OVERWRITE_HELP)
@click.option("--preprocess", help="caffe, tf, torch, unit, none or package.module:function; default: the model's.")
@click.option("-m", "--metric", "metrics", multiple=True, help="Metric to measure the explanations with (repeatable); default: all, when a CAM or attribution technique runs. See `vizkit metrics`.")
@click.option("--no-metrics", is_flag=True, help="Measure no explanation (faster).")
@click.option("-s", "--set", "settings", multiple=True, metavar="NAME.KEY=VALUE", help="A technique's or metric's option (repeatable); see `vizkit techniques`, `vizkit metrics`.")
@click.option("--weights", type=click.Choice(["imagenet", "none"]), default="imagenet", show_default=True, help="Weights of keras.applications models.")
@click.option("--size", type=click.IntRange(min=MIN_SIZE, max=MAX_SIZE), help=f"Input size for models with a free (or unknown) input size ({MIN_SIZE}-{MAX_SIZE}).")
@click.option("--labels", type=click.Path(exists=True, dir_okay=False, path_type=Path), help="Class names: a JSON list, or a text file with one per line.")
@click.option("--output", "output", metavar="NAME", help=OUTPUT_HELP)
@click.option("--save-arrays", is_flag=True, help="Also write arrays.npz with the raw numbers of every picture.")
@click.option("--config", type=click.Path(exists=True, dir_okay=False, path_type=Path), help="Technique options from a TOML file; default: [tool.vizkit] in ./pyproject.toml.")
@click.option("--max-report-mb", "max_report_mb", type=click.FloatRange(min=0, min_open=True), metavar="N",
              help="Fail (exit 2, nothing written) when the report would be larger than N MB (10**6 bytes), all its files together.")
@click.option("--layout", type=click.Choice(LAYOUTS), default="auto", show_default=True,
              help=f"single: one self-contained index.html; folder: a summary index.html, pages of images and PNG files beside them; auto: single up to {PAGE_SIZE} images.")
@click.option("--chunk", type=click.IntRange(min=1), default=CHUNK, show_default=True, metavar="N",
              help="Images explained together, then written out: what is in memory at once, and the most --resume redoes.")
@click.option("--resume", is_flag=True, help="Continue the interrupted run in -o FOLDER (same inputs and options), without redoing the images it finished.")
@click.option("--executor", type=click.Choice(EXECUTORS), default="in-process", show_default=True,
              help="Where the chunks are explained: in this process, or mapped over a Ray cluster (pip install 'vizkit[ray]').")
@click.option("--address", metavar="ADDRESS", help="With --executor ray: the cluster's address (ray://host:10001, or auto); default: a local Ray started for the run.")
@click.option("--workers", type=click.IntRange(min=1), metavar="N", help="With --executor ray: model replicas (Ray actors).")
@click.option("-q", "--quiet", is_flag=True, help="No progress on stderr (a bar per technique on a terminal, else a line per technique); failures are still printed.")
@plugin_options
def run(model, inputs, techniques, metrics, no_metrics, outdir, preprocess, settings, weights, size, labels, output, save_arrays, config, max_report_mb,
        layout, chunk, resume, executor, address, workers, quiet, plugins, disabled, overwrite):
    """Apply techniques to MODEL for the images INPUTS (files or folders) and write a report.

    MODEL is a .keras or .h5 file, a keras.applications name (vgg16, resnet50,
    mobilenet_v2, …) or package.module:function returning a model.

    \b
    Exit status: 0 all fine; 1 the report was written, but an image, a technique
    or a report hook failed; 2 bad arguments (nothing written; also a report over
    --max-report-mb, found after the work); 3 internal error;
    4 the report could not be written (disk full; the folder is as it was);
    130 interrupted (Ctrl-C).
    """
    from vizkit.runner import run as run_report

    if metrics and no_metrics:
        raise click.UsageError("-m and --no-metrics contradict each other: give one")
    pm = _host(plugins, disabled)  # plugin errors now, as usage errors
    try:
        configured = load_settings(config)
    except ConfigError as error:
        raise click.UsageError(str(error)) from None
    options = RunOptions(
        techniques=list(techniques),
        metrics=[] if no_metrics else (list(metrics) or None),
        settings=_parse_settings(settings),
        config=configured,
        preprocess=preprocess,
        weights=weights,
        size=size,
        labels=labels,
        save_arrays=save_arrays,
        overwrite=overwrite,
        output=output,
        max_report_mb=max_report_mb,
        layout=layout,
        chunk=chunk,
        resume=resume,
        executor=executor,
        address=address,
        workers=workers,
    )
    if executor == "ray" and not (click.get_current_context().obj or {}).get("plugins"):
        # Ray workers build their own host from the names
        options.plugins, options.disabled_plugins, pm = list(plugins), list(disabled), None
    try:
        report, index = run_report(model, list(inputs), options, outdir, progress=_progress(quiet), pm=pm)
    except UsageError as error:
        raise click.UsageError(str(error)) from None
    click.echo(display_path(index))  # a name that is not UTF-8 cannot crash stdout
    sys.exit(ExitCode.FAILURES if report.failed else ExitCode.OK)


@main.command()
@click.argument("model")
@click.option("--weights", type=click.Choice(["imagenet", "none"]), default="imagenet", show_default=True)
@click.option("--size", type=click.IntRange(min=MIN_SIZE, max=MAX_SIZE), help=f"Input size to build a model that was never built ({MIN_SIZE}-{MAX_SIZE}).")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per layer.")
@click.option("--output", "output", metavar="NAME", help="Only the layers this output uses, for a model with several: its name or index.")
@plugin_options
def layers(model, weights, size, as_json, output, plugins, disabled):
    """List every layer of MODEL (nested ones by path), with what each technique can use.

    A model with several outputs lists them first (on stderr); the techniques column is
    for the first, or for --output.
    """
    pm = _host(plugins, disabled)
    start_tensorflow()
    from vizkit.graph import ModelGraph
    from vizkit.models import ModelLoadError, load_model

    try:
        graph = ModelGraph.of(load_model(model, weights=weights, size=size, loaders=host.model_loaders(pm)).model)
        if output is not None:
            graph = graph.select_output(output)
        elif len(graph.output_names) > 1:
            names = ", ".join(f"{i}: {name}" for i, name in enumerate(graph.output_names))
            click.echo(printable(f"vizkit: {graph.name} has {len(graph.output_names)} outputs ({names}); "
                                 f"the techniques column is for {graph.output_name}: pick one with --output"), err=True)
    except (ModelLoadError, ValueError) as error:
        raise click.UsageError(str(error)) from None
    checks = {name: r.technique.accepts for name, r in host.techniques(pm).items() if r.technique.accepts}
    rows = [
        {
            "path": info.path,
            "kind": info.kind,
            "shape": list(info.shape),
            "techniques": _usable_by(checks, info),
        }
        for info in graph.layers
    ]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    width = max(len(row["path"]) for row in rows)
    for row in rows:
        shape = "×".join("?" if d is None else str(d) for d in row["shape"])
        click.echo(f"{row['path']:<{width}}  {row['kind']:<22} {shape:<14} {' '.join(row['techniques'])}")


def _usable_by(checks: dict, info) -> list[str]:
    """The techniques whose ``accepts`` takes this layer; one that raises takes none, with
    a warning (once per technique)."""
    usable = []
    for name, accepts in checks.items():
        try:
            if accepts(info):
                usable.append(name)
        except Exception as error:
            click.echo(f"vizkit: {name}'s accepts() failed on {info.path}: {type(error).__name__}: {error}", err=True)
            checks[name] = lambda info: False
    return usable


@main.command()
@click.option("--json", "as_json", is_flag=True)
@plugin_options
def plugins(as_json, plugins, disabled):
    """List plugins: name, version, origin, hooks and techniques (broken ones too)."""
    rows = host.describe_plugins(_host(plugins, disabled))
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    for row in rows:
        if row["status"] == "broken":
            click.echo(f"{row['name']} {row['version']} ({row['origin']}: {row['where']}): BROKEN: {row['error']}")
            continue
        hooks = ", ".join(row["hooks"]) or "-"
        click.echo(
            f"{row['name']} {row['version']} ({row['origin']}: {row['where']})\n"
            f"    techniques: {', '.join(row['techniques']) or '-'}\n"
            f"    model loaders: {', '.join(row['model_loaders']) or '-'}\n    hooks: {hooks}"
        )


@main.command()
@click.argument("name", required=False)
@plugin_options
def techniques(name, plugins, disabled):
    """List techniques, or show the options of technique NAME.

    A run without -t uses those not marked [with -t only]; -t explain runs every CAM and
    attribution technique side by side.
    """
    available = host.techniques(_host(plugins, disabled))
    try:
        selected = host.select(available, [name]) if name else list(available.values())
    except KeyError as error:
        raise click.UsageError(str(error.args[0])) from None
    for registered in selected:
        _describe(registered.technique, registered.plugin, "-t", bool(name))


@main.command()
@click.argument("name", required=False)
@plugin_options
def metrics(name, plugins, disabled):
    """List metrics, or show the options of metric NAME.

    Metrics measure every heatmap of the CAM and attribution techniques in a run (those
    not marked [with -m only] run by default); the report shows their numbers beside
    each heatmap and in a summary table.
    """
    try:
        available = host.metrics(_host(plugins, disabled))
        selected = host.select_metrics(available, [name] if name else list(available))
    except (KeyError, host.PluginError) as error:
        raise click.UsageError(str(error.args[0])) from None
    for registered in selected:
        _describe(registered.metric, registered.plugin, "-m", bool(name))


def _describe(item, plugin: str, flag: str, with_options: bool) -> None:
    """A technique's or metric's line, and its options under it if asked."""
    opt_in = "" if item.by_default else f" [with {flag} only]"
    click.echo(f"{item.name} ({plugin}){opt_in}: {item.description}")
    for option in item.options if with_options else ():
        facts = [f"default: {option.default if option.default not in (None, []) else '(automatic)'}"]
        if option.choices is not None:
            facts.append("one of: " + ", ".join(map(str, option.choices)))
        if option.minimum is not None:
            facts.append(f"at least {option.minimum:g}")
        if option.maximum is not None:
            facts.append(f"at most {option.maximum:g}")
        click.echo(f"  -s {item.name}.{option.name}=<{option.type.__name__}>  {option.help} [{'; '.join(facts)}]")


@main.command()
@click.option("-o", "--outdir", type=click.Path(file_okay=False, path_type=Path), help="Report folder; default: a new one under reports/.")
@click.option("--overwrite", is_flag=True, help=OVERWRITE_HELP)
@click.option("-q", "--quiet", is_flag=True, help="No progress on stderr; failures are still printed.")
def demo(outdir, overwrite, quiet):
    """Write a report on vizkit's own demo model and sample images (works offline)."""
    from vizkit.demo import run_demo
    try:
        report, index = run_demo(outdir, progress=_progress(quiet), overwrite=overwrite)
    except UsageError as error:
        raise click.UsageError(str(error)) from None
    click.echo(display_path(index))  # a name that is not UTF-8 cannot crash stdout
    sys.exit(ExitCode.FAILURES if report.failed else ExitCode.OK)


COMPARE_HELP = """Compare two reports of `vizkit run`, BASE and NEW (folders or their
report.json), and write a comparison (index.html, compare.json) into OUTDIR.

Images are matched by sha256. It lists the images whose top-1 class flipped (first),
the score change of BASE's top-1 class, how similar each technique's maps are
(Spearman and SSIM; needs --save-arrays on both runs, else it says so), the pairs that
moved most side by side, failures in one report and not the other, and differences in
model, preprocessing, versions and options. TensorFlow is not loaded.

\b
--fail-on EXPR (repeatable): exit 1 when any of these holds:
  flips>N, flips>=N       images whose top-1 class changed
  failures>N              failures in NEW that BASE did not have
  similarity<X            some technique's mean Spearman is below X
  TECHNIQUE.similarity<X  that technique's (e.g. gradcam.similarity<0.8)
  NAME<X, TECHNIQUE.NAME<X  a comparison metric's mean (ssim, or a plugin's;
                          NAME>X for one that is better lower)
A metric condition with nothing to test (no arrays.npz; the metric raised) holds.
A comparison metric of a plugin that raises costs only its own numbers (listed
under errors); the exit status changes only through a --fail-on on it.

\b
Exit status: 0 within thresholds; 1 a --fail-on condition holds (each is
listed); 2 bad arguments (unreadable report, bad --fail-on); 3 internal error;
4 the comparison could not be written.
"""


@main.command(help=COMPARE_HELP)
@click.argument("base", type=click.Path(path_type=Path))
@click.argument("new", type=click.Path(path_type=Path))
@click.option("-o", "--outdir", type=click.Path(file_okay=False, path_type=Path), help="Comparison folder; default: a new reports/compare-<time>.")
@click.option("--fail-on", "fail_on", multiple=True, metavar="EXPR", help="Exit 1 when this holds: flips>N, flips>=N, failures>N, similarity<X, TECHNIQUE.similarity<X, [TECHNIQUE.]NAME<X for a comparison metric (repeatable).")
@click.option("--overwrite", is_flag=True, help="Write into -o even if it holds files vizkit did not write.")
@click.option("-q", "--quiet", is_flag=True, help="No summary on stdout, only the page's path.")
@plugin_options
def compare(base, new, outdir, fail_on, overwrite, quiet, plugins, disabled):
    from vizkit import compare as comparing
    from vizkit import compare_render, report_folder
    from vizkit.runner import check_outdir, default_outdir, source_date

    pm = _host(plugins, disabled)
    try:
        metrics = {name: (r.metric, r.plugin) for name, r in host.comparison_metrics(pm).items()}
    except host.PluginError as error:
        raise click.UsageError(str(error)) from None
    try:
        conditions = [comparing.parse_condition(text, metrics) for text in fail_on]
        loaded_base, loaded_new = comparing.load_report(base), comparing.load_report(new)
        created = source_date()
        if outdir is not None:
            folder = check_outdir(outdir, overwrite=overwrite or comparing.is_comparison_folder(outdir))
        else:
            stamp = created or datetime.now(tz=timezone.utc).replace(microsecond=0)
            folder = report_folder.claim_new(lambda: default_outdir("compare", stamp))
    except (comparing.CompareError, UsageError) as error:
        raise click.UsageError(str(error)) from None
    with folder:
        result = comparing.compare(loaded_base, loaded_new, created, metrics)
        held = comparing.check(result.data, conditions)
        index = compare_render.write(result, folder, held)
    if not quiet:
        for line in comparing.summary_lines(result.data):
            click.echo(printable(line))
    for line in result.data["errors"]:
        click.echo(printable(f"vizkit: {line}"), err=True)
    for line in held:
        click.echo(printable(f"vizkit: --fail-on {line}"), err=True)
    click.echo(display_path(index))
    sys.exit(ExitCode.FAILURES if held else ExitCode.OK)


if __name__ == "__main__":  # python -m vizkit.cli, as the benchmarks run it
    main()
