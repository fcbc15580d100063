"""What a technique plugin registers and returns: plain data, no TensorFlow, no HTML."""

from __future__ import annotations

import difflib
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Sequence

import numpy as np

if TYPE_CHECKING:  # for the annotations only: importing the graph would load Keras
    from vizkit.graph import ModelGraph
    from vizkit.layers import LayerInfo
    from vizkit.images import LoadedImage


#: Images per batch for a ``run_batch`` technique without a ``batch`` option.
DEFAULT_BATCH = 8


class OptionError(ValueError):
    """A technique option has an unknown name or a value that cannot work."""


def suggest(name: str, valid: Sequence[str], limit: int | None = None) -> str:
    """``valid`` as a comma list, the closest matches to ``name`` first.

    Ties go to names with the same letters in another order (``vgg61`` → ``vgg16``).
    With ``limit``, only that many, then "… and N more".
    """

    def distance(candidate: str) -> tuple[float, bool]:
        ratio = difflib.SequenceMatcher(None, name, candidate).ratio()
        return -ratio, sorted(name) != sorted(candidate)

    ranked = sorted(valid, key=distance)
    if limit is not None and len(ranked) > limit:
        return ", ".join(ranked[:limit]) + f", … and {len(ranked) - limit} more"
    return ", ".join(ranked)


@dataclass(frozen=True)
class Option:
    """One typed technique option, set with ``-s TECHNIQUE.NAME=VALUE``.

    ``type`` is ``int``, ``float``, ``str``, ``bool`` or ``list`` (a comma list of strings).
    A default of ``None`` means "the technique decides" (for example from the model).
    ``check(value, context)`` runs once the model is loaded, before any work, for values
    that are not None: raise ``ValueError`` for a value this model cannot take (a layer
    it lacks, a patch larger than its input), and the run stops as a usage error (exit 2).
    """

    name: str
    type: type
    default: Any
    help: str
    choices: tuple[Any, ...] | None = None
    minimum: float | None = None
    maximum: float | None = None
    check: Callable[[Any, "RunContext"], None] | None = None

    def parse(self, technique: str, raw: Any) -> Any:
        where = f"{technique}.{self.name}"
        try:
            value = self._convert(raw)
        except ValueError:
            raise OptionError(
                f"{where}: {raw!r} is not a valid {self.type.__name__}"
            ) from None
        if self.choices is not None and value not in self.choices:
            allowed = ", ".join(map(str, self.choices))
            raise OptionError(f"{where}: {raw!r} is not one of {allowed}")
        if self.type is float and not math.isfinite(value):
            raise OptionError(f"{where}: {raw!r} is not a finite number")
        if self.minimum is not None and value < self.minimum:
            raise OptionError(f"{where}: {raw!r} is below the minimum {self.minimum:g}")
        if self.maximum is not None and value > self.maximum:
            raise OptionError(f"{where}: {raw!r} is above the maximum {self.maximum:g}")
        return value

    def _convert(self, raw: Any) -> Any:
        if not isinstance(raw, str):
            return self._convert_typed(raw)
        if self.type is list:
            return [item.strip() for item in raw.split(",") if item.strip()]
        if self.type is bool:
            lowered = raw.strip().lower()
            if lowered not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
                raise ValueError(raw)
            return lowered in ("1", "true", "yes", "on")
        return self.type(raw.strip())

    def _convert_typed(self, raw: Any) -> Any:
        """A value that already has a type (from a TOML file or Python): no silent coercion."""
        if self.type is list and isinstance(raw, (list, tuple)):
            return [str(item) for item in raw]
        if self.type is bool and isinstance(raw, bool):
            return raw
        if isinstance(raw, bool) or isinstance(raw, (list, tuple, dict)):
            raise ValueError(raw)
        if self.type is int and isinstance(raw, int):
            return raw
        if self.type is float and isinstance(raw, (int, float)):
            return float(raw)
        if self.type is str:
            return str(raw)
        raise ValueError(raw)


def caller_outside_vizkit_core(*also: str) -> str:
    """``file:line`` of the code that built an object, skipping this module, the files
    ``also`` names and dataclass machinery, so an error points at the plugin's line."""
    skipped = (__file__, "<string>", *also)
    frame = sys._getframe(1)
    while frame is not None and frame.f_code.co_filename in skipped:
        frame = frame.f_back
    return f"{Path(frame.f_code.co_filename).name}:{frame.f_lineno}" if frame else "?"


@dataclass(frozen=True)
class Artifact:
    """One picture of a technique's result, with the raw numbers behind it.

    ``array`` holds what notebooks and CI diffs use (see each technique's docs);
    ``picture`` is the uint8 image (H×W or H×W×3, RGB) shown in the report. Both are
    checked when the artifact is made, so a wrong one fails at the plugin's own line.
    """

    title: str
    array: np.ndarray
    picture: np.ndarray
    image_id: str | None = None
    layer: str | None = None
    caption: str = ""
    #: The class the map explains (an index), or None where it explains no class (Eigen-CAM
    #: is class-agnostic): metrics score the image's top-1 class then.
    target: int | None = None

    def __post_init__(self) -> None:
        problem = self._problem()
        if problem:
            raise TypeError(f"artifact {self.title!r} (made at {caller_outside_vizkit_core()}): {problem}")

    def _problem(self) -> str | None:
        if not isinstance(self.array, np.ndarray):
            return f"array is {type(self.array).__name__}, not a NumPy array"
        if self.target is not None and (isinstance(self.target, bool) or not isinstance(self.target, (int, np.integer))):
            return f"target is {self.target!r}, not a class index"
        return picture_problem(self.picture)


def picture_problem(picture: Any) -> str | None:
    """What is wrong with a picture for the report (uint8 H×W or H×W×3), or None."""
    if (
        isinstance(picture, np.ndarray) and picture.dtype == np.uint8
        and (picture.ndim == 2 or (picture.ndim == 3 and picture.shape[-1] == 3))
        and picture.size > 0
    ):
        return None
    described = f"{picture.dtype} {picture.shape}" if isinstance(picture, np.ndarray) else type(picture).__name__
    return f"picture must be uint8 H×W or H×W×3, not {described}"


@dataclass
class Batch:
    """Up to ``batch`` images of one shape: as 0-255 pixels and as the model's input."""

    images: list["LoadedImage"]
    pixels: np.ndarray  # N×H×W×C float32, 0-255
    inputs: np.ndarray  # the same, preprocessed for the model

    def __len__(self) -> int:
        return len(self.images)


@dataclass
class RunContext:
    """What a technique gets: the model, the decoded images, its validated options.

    ``model`` is a :class:`vizkit.ModelGraph`; each of ``images`` is a
    :class:`vizkit.images.LoadedImage` that decoded fine, with ``predictions`` filled in
    for classifiers. ``preprocess`` maps 0-255 pixels to the model's input space.
    ``reproducible`` is true when the run must be byte-identical (``SOURCE_DATE_EPOCH``):
    keep timings and other run-to-run noise out of notes and artifacts then.
    """

    model: "ModelGraph"
    images: list
    params: dict[str, Any]
    preprocess: Callable[[Any], Any] = lambda x: x
    labels: list[str] | None = None
    progress: Callable[[str], None] = lambda message: None
    notes: list[str] = field(default_factory=list)
    reproducible: bool = False

    def note(self, message: str) -> None:
        """Tell the reader something about this run (shown in the technique's section);
        a message already noted is not repeated."""
        if message not in self.notes:
            self.notes.append(message)

    def groups(self, size: int) -> Iterator[list]:
        """Runs of up to ``size`` consecutive images of equal shape, in input order."""
        group: list = []
        for image in self.images:
            if group and (len(group) == size or image.array.shape != group[0].array.shape):
                yield group
                group = []
            group.append(image)
        if group:
            yield group

    def batches(self, size: int) -> Iterator[Batch]:
        """:meth:`groups` as batches: pixels stacked and preprocessed."""
        return map(self.batch_of, self.groups(size))

    def batch_of(self, images: list) -> Batch:
        pixels = np.stack([image.array for image in images]).astype("float32", copy=False)
        return Batch(list(images), pixels, np.asarray(self.preprocess(pixels), dtype="float32"))


@dataclass(frozen=True)
class Technique:
    """A visualization technique: a name, a description, options, and one of two runners.

    ``run_batch(context, batch) -> Iterable[Artifact]`` explains one :class:`Batch` of
    images (the host batches them by the technique's ``batch`` option, default 8, and an
    image that fails costs only that image's artifacts; ``prepare(context)`` runs before
    each chunk of images, ``RunOptions.chunk``, with the chunk's images). ``run(context) ->
    Iterable[Artifact]`` is for results that are not per image (filter patterns): it runs
    once, with the first chunk's images.
    """

    name: str
    run: Callable[[RunContext], Iterable[Artifact]] | None = None
    description: str = ""
    options: tuple[Option, ...] = ()
    #: Which layers it can use, given a ``vizkit.graph.LayerInfo`` (shown by ``vizkit layers``).
    accepts: Callable[["LayerInfo"], bool] | None = None
    run_batch: Callable[[RunContext, Batch], Iterable[Artifact]] | None = None
    #: Called before the batches of a ``run_batch`` technique, once per chunk of images:
    #: note the choices made for the whole run (the layer and why: a note said again is
    #: kept once); raising fails the technique on that chunk's images.
    prepare: Callable[[RunContext], None] | None = None
    #: One heatmap per image that explains a class (CAM and attribution methods): the
    #: report shows it beside the other such techniques in its comparison view, and
    #: ``-t explain`` selects it.
    comparable: bool = False
    #: Runs when no ``-t`` is given. Expensive or specialised techniques say False and run
    #: when named (or with ``-t explain``).
    by_default: bool = True

    def __post_init__(self) -> None:
        if not self.name or "." in self.name or "=" in self.name:
            raise TypeError(f"technique name {self.name!r}: give a name without '.' or '=' (-s NAME.KEY=VALUE)")
        if (self.run is None) == (self.run_batch is None):
            raise TypeError(f"technique {self.name!r}: give exactly one of run= and run_batch=")
        if not self.description:
            raise TypeError(f"technique {self.name!r}: a description is required (vizkit techniques shows it)")
        names = [option.name for option in self.options]
        if len(names) != len(set(names)):
            raise TypeError(f"technique {self.name!r}: option names repeat: {names}")

    def resolve_params(self, raw: dict[str, Any]) -> dict[str, Any]:
        """Defaults overlaid with ``raw`` (strings from the CLI or typed values), validated."""
        return resolve_options(self.name, self.options, raw)

    @property
    def batch_size(self) -> int:
        """Images per batch for ``run_batch``: the ``batch`` option's default, else 8."""
        return next((o.default for o in self.options if o.name == "batch"), None) or DEFAULT_BATCH

    def checked(self, artifacts: Iterable[Artifact]) -> list[Artifact]:
        """``artifacts`` as a list; TypeError for anything that is not an Artifact."""
        artifacts = list(artifacts)
        for artifact in artifacts:
            if not isinstance(artifact, Artifact):
                raise TypeError(f"{self.name} returned a {type(artifact).__name__}, not a vizkit Artifact")
        return artifacts

    def apply(self, context: RunContext) -> list[Artifact]:
        """Every artifact for ``context.images`` as a run makes them (options checked against
        the model, ``prepare``, batches), but with errors raised: for notebooks and tests."""
        self.check_params(context)
        if self.run_batch is None:
            return self.checked(self.run(context))
        if self.prepare is not None:
            self.prepare(context)
        size = context.params.get("batch") or self.batch_size
        return [artifact for batch in context.batches(size) for artifact in self.checked(self.run_batch(context, batch))]

    def check_params(self, context: RunContext) -> None:
        """Run each option's ``check`` against the loaded model; OptionError names the option."""
        check_options(self.name, self.options, context)


def resolve_options(owner: str, options: Sequence[Option], raw: dict[str, Any]) -> dict[str, Any]:
    """The options' defaults overlaid with ``raw``, each value parsed; OptionError if bad.
    ``owner`` is the technique or metric they belong to (``-s OWNER.NAME=VALUE``)."""
    by_name = {option.name: option for option in options}
    unknown = [key for key in raw if key not in by_name]
    if unknown:
        valid = suggest(unknown[0], list(by_name)) or "(none)"
        raise OptionError(f"{owner} has no option {unknown[0]!r}; its options are: {valid}")
    params = {option.name: option.default for option in options}
    for key, value in raw.items():
        params[key] = by_name[key].parse(owner, value)
    return params


def check_options(owner: str, options: Sequence[Option], context: RunContext) -> None:
    """Each option's ``check`` against the loaded model; OptionError names the option."""
    for option in options:
        value = context.params.get(option.name)
        if option.check is None or value is None:
            continue
        try:
            option.check(value, context)
        except (ValueError, KeyError) as error:
            message = error.args[0] if error.args else type(error).__name__
            raise OptionError(f"{owner}.{option.name}: {message}") from None
        except Exception as error:  # a bug in the check itself: still no run without it
            raise OptionError(f"{owner}.{option.name}: the option's check failed: {type(error).__name__}: {error}") from None
