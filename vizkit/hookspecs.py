"""The hooks a vizkit plugin can implement; ``docs/plugins.md`` explains each one.

Built-in techniques use exactly these hooks; see ``plugins/`` for examples. A plugin
implements any subset, as module-level functions (or methods) decorated with
``@vizkit.hookimpl`` and named like the hooks below.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import pluggy

from vizkit.compare import ComparisonMetric
from vizkit.extension import ModelLoader, ReportSection
from vizkit.metric import Metric
from vizkit.report import Report
from vizkit.technique import Technique

hookspec = pluggy.HookspecMarker("vizkit")


@hookspec
def register_techniques(register: Callable[[Technique], None]) -> None:
    """Register visualization techniques by calling ``register(Technique(...))``.

    A callback rather than a return value, so one plugin can register several
    techniques, or none, depending on what is installed (the pattern of llm's hooks).
    """


@hookspec
def register_metrics(register: Callable[[Metric], None]) -> None:
    """Register metrics, evidence about each explanation: ``register(Metric(...))``.

    vizkit's deletion/insertion curves and its model randomization check are registered
    this way; each metric runs on every comparable technique of a run.
    """


@hookspec
def register_comparisons(register: Callable[[ComparisonMetric], None]) -> None:
    """Register comparison metrics for ``vizkit compare``: ``register(ComparisonMetric(...))``.

    Each one runs on every comparable technique and image in both reports, on the two
    maps at a common resolution; vizkit's Spearman and SSIM are registered this way.
    """


@hookspec
def register_model_loaders(register: Callable[[ModelLoader], None]) -> None:
    """Register model loaders: ``register(ModelLoader(...))``.

    ``vizkit run SCHEME:REST …`` calls the loader of that scheme with ``REST``; a loader's
    ``match`` can also claim whole specs (a file suffix, a name). vizkit's own loaders
    (Keras files, ``keras.applications`` names, ``efficientnet-lite0``, factories) are
    registered the same way, and a plugin's loader is asked before them.
    """


@hookspec
def report_sections(report: Report) -> list[ReportSection] | None:
    """Sections to add to the report, after the techniques (return a list, or None)."""


@hookspec
def report_css() -> str | None:
    """CSS to add to the report's stylesheet, after vizkit's own."""


@hookspec
def report_templates() -> str | Path | None:
    """A folder of Jinja2 templates searched before vizkit's own.

    A ``report.html`` there replaces the whole page; ``{% extends "vizkit/report.html" %}``
    reaches the original to override only some of its blocks.
    """


@hookspec
def report_written(report: Report, outdir: Path, index: Path) -> None:
    """Called after the report was written, for example to publish or upload it.

    An exception here is reported and makes the exit status 1; the report stays.
    """
