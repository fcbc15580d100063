"""What a metric plugin registers and returns: evidence about each explanation, as plain data.

A :class:`Metric` is asked about every comparable technique of a run (the CAM and
attribution methods: one heatmap per image) once that technique has run, and answers
with :class:`Measurement` objects: numbers per image (shown under that image's heatmap)
or per technique (shown in the report's summary table), small curves, a warning. No
TensorFlow and no HTML here: the report draws the curves.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterable, Sequence

import numpy as np

from vizkit.technique import (
    Artifact, Option, RunContext, Technique, caller_outside_vizkit_core, check_options, picture_problem,
    resolve_options,
)

if TYPE_CHECKING:
    from vizkit.images import LoadedImage

#: Colours a :class:`Curve` may name (the report's palette); "" picks by position.
CURVE_COLORS = ("red", "blue", "green", "orange", "purple", "gray")
#: The largest |value| a Curve may hold (so that its chart's scale stays finite).
MAX_CURVE_VALUE = 1e100
#: How a summary column ranks methods: by lower values first, higher first, or not at all.
BETTER = ("lower", "higher", "")


@dataclass(frozen=True)
class Curve:
    """A small line chart's line: ``values`` at evenly spaced x from 0 to 1."""

    label: str
    values: tuple[float, ...]
    color: str = ""
    dashed: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.label, str):
            raise TypeError(f"curve label {self.label!r} is not a str")
        object.__setattr__(self, "values", tuple(float(v) for v in self.values))
        if len(self.values) < 2 or not all(math.isfinite(v) and abs(v) <= MAX_CURVE_VALUE for v in self.values):
            raise ValueError(f"curve {self.label!r}: give at least two finite values, each within ±{MAX_CURVE_VALUE:g}")
        if self.color not in CURVE_COLORS + ("",):
            raise ValueError(f"curve {self.label!r}: color {self.color!r} is not one of {', '.join(CURVE_COLORS)}")


@dataclass(frozen=True)
class Measurement:
    """What a metric found about one explanation (``image_id``) or a technique as a whole
    (``image_id`` None).

    ``values`` go into report.json and the summary table (finite numbers only);
    ``caption`` is the line shown under the heatmap or in the table; ``curves`` are drawn
    as one small chart; ``picture`` (uint8, as an artifact's) is shown beside it; a
    ``warning`` is shown prominently: the explanation failed this check.
    """

    values: dict[str, float]
    image_id: str | None = None
    caption: str = ""
    curves: tuple[Curve, ...] = ()
    picture: np.ndarray | None = None
    warning: str | None = None

    def __post_init__(self) -> None:
        where = f"measurement (made at {caller_outside_vizkit_core(__file__)})"
        values = {}
        for key, value in dict(self.values).items():
            if not isinstance(key, str) or isinstance(value, bool) or not isinstance(value, (int, float, np.number)):
                raise TypeError(f"{where}: values must map names to numbers, not {key!r}: {value!r}")
            if not math.isfinite(float(value)):
                raise ValueError(f"{where}: value {key!r} is {value}, not a finite number")
            values[key] = float(value)
        object.__setattr__(self, "values", values)
        for name in ("caption", "warning", "image_id"):
            text = getattr(self, name)
            if not (isinstance(text, str) or (text is None and name != "caption")):
                raise TypeError(f"{where}: {name} must be a str{'' if name == 'caption' else ' or None'}, not {type(text).__name__}")
        object.__setattr__(self, "curves", tuple(self.curves))
        if not all(isinstance(curve, Curve) for curve in self.curves):
            raise TypeError(f"{where}: curves must be vizkit Curve objects")
        if self.picture is not None and picture_problem(self.picture):
            raise TypeError(f"{where}: {picture_problem(self.picture)}")


@dataclass(frozen=True)
class Column:
    """One column of the report's summary table: the mean of ``values[key]`` over the
    images (or the technique-level value, where the metric gives one)."""

    key: str
    label: str
    better: str = ""

    def __post_init__(self) -> None:
        if self.better not in BETTER:
            raise ValueError(f"column {self.key!r}: better must be 'lower', 'higher' or ''")


@dataclass
class Explanation:
    """One comparable technique's results, as a metric gets them: the technique (to run
    it again, on another model say), the options it ran with, and its artifacts (one
    heatmap per image, each with ``image_id`` and ``target``)."""

    technique: Technique
    params: dict[str, Any]
    artifacts: list[Artifact]

    def pairs(self, images: Sequence["LoadedImage"]) -> list[tuple["LoadedImage", Artifact]]:
        """(image, its artifact) for each of ``images`` that has one, in their order."""
        by_id = {artifact.image_id: artifact for artifact in self.artifacts if artifact.image_id is not None}
        return [(image, by_id[image.id]) for image in images if image.id in by_id]

    def rerun(self, context: RunContext, model: Any, images: Sequence["LoadedImage"], **changes: Any) -> list[Artifact]:
        """The technique's artifacts for ``images`` on ``model`` (a ``keras.Model`` or
        ``ModelGraph``), with its options, ``changes`` overriding them; errors raised."""
        from vizkit.graph import ModelGraph

        graph = model if isinstance(model, ModelGraph) else ModelGraph.of(model)
        rerun = RunContext(
            graph, list(images), {**self.params, **changes}, context.preprocess, context.labels,
            reproducible=context.reproducible,
        )
        return self.technique.apply(rerun)


@dataclass(frozen=True)
class Metric:
    """Evidence about explanations: ``evaluate(context, explanation) -> Iterable[Measurement]``.

    Called once per comparable technique that produced heatmaps, after it ran; ``context``
    is a :class:`RunContext` with the metric's own options in ``params`` and the run's
    images, model and preprocessing (``context.note`` writes under the summary table).
    ``columns`` are what the summary table shows of the values; methods are sorted by
    the first column with a ``better`` direction.
    """

    name: str
    description: str
    evaluate: Callable[[RunContext, Explanation], Iterable[Measurement]]
    columns: tuple[Column, ...] = ()
    options: tuple[Option, ...] = ()
    #: Runs whenever comparable techniques run (unless switched off); False: only when named.
    by_default: bool = True
    #: Its measurements are per image and need only that image's explanations: a run
    #: in chunks of images measures every chunk. False (a sample, as ``randomization``'s
    #: first images, or numbers over all images at once): only the first chunk is measured.
    per_image: bool = True

    def __post_init__(self) -> None:
        if not self.name or "." in self.name or "=" in self.name:
            raise TypeError(f"metric name {self.name!r}: give a name without '.' or '=' (-s NAME.KEY=VALUE)")
        if not self.description:
            raise TypeError(f"metric {self.name!r}: a description is required")
        names = [option.name for option in self.options]
        if len(names) != len(set(names)):
            raise TypeError(f"metric {self.name!r}: option names repeat: {names}")

    def resolve_params(self, raw: dict[str, Any]) -> dict[str, Any]:
        """Defaults overlaid with ``raw`` (strings from the CLI or typed values), validated."""
        return resolve_options(self.name, self.options, raw)

    def check_params(self, context: RunContext) -> None:
        """Each option's ``check`` against the loaded model; OptionError names the option."""
        check_options(self.name, self.options, context)

    def measure(self, context: RunContext, explanation: Explanation) -> list[Measurement]:
        """``evaluate`` as a list; TypeError for anything that is not a Measurement."""
        measurements = list(self.evaluate(context, explanation))
        for item in measurements:
            if not isinstance(item, Measurement):
                raise TypeError(f"metric {self.name} returned a {type(item).__name__}, not a vizkit Measurement")
        return measurements

