"""What a technique plugin registers and returns: plain data, no TensorFlow, no HTML."""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import numpy as np


class OptionError(ValueError):
    """A technique option has an unknown name or a value of the wrong kind."""


def suggest(name: str, valid: Sequence[str]) -> str:
    """``valid`` as a comma list, the closest matches to ``name`` first.

    Ties go to names with the same letters in another order (``vgg61`` → ``vgg16``).
    """

    def distance(candidate: str) -> tuple[float, bool]:
        ratio = difflib.SequenceMatcher(None, name, candidate).ratio()
        return -ratio, sorted(name) != sorted(candidate)

    return ", ".join(sorted(valid, key=distance))


@dataclass(frozen=True)
class Option:
    """One typed technique option, set with ``-s TECHNIQUE.NAME=VALUE``.

    ``type`` is ``int``, ``float``, ``str``, ``bool`` or ``list`` (a comma list of strings).
    A default of ``None`` means "the technique decides" (for example from the model).
    """

    name: str
    type: type
    default: Any
    help: str
    choices: tuple[Any, ...] | None = None
    minimum: float | None = None

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


@dataclass(frozen=True)
class Artifact:
    """One picture of a technique's result, with the raw numbers behind it.

    ``array`` holds what notebooks and CI diffs use (see each technique's docs);
    ``picture`` is the uint8 image (H×W or H×W×3, RGB) shown in the report.
    """

    title: str
    array: np.ndarray
    picture: np.ndarray
    image_id: str | None = None
    layer: str | None = None
    caption: str = ""

    def check(self) -> None:
        """TypeError naming the problem, for what the report could not show or save."""
        if not isinstance(self.array, np.ndarray):
            raise TypeError(f"artifact {self.title!r}: array is {type(self.array).__name__}, not a NumPy array")
        picture = self.picture
        if not (
            isinstance(picture, np.ndarray) and picture.dtype == np.uint8
            and (picture.ndim == 2 or (picture.ndim == 3 and picture.shape[-1] == 3))
        ):
            described = f"{picture.dtype} {picture.shape}" if isinstance(picture, np.ndarray) else type(picture).__name__
            raise TypeError(f"artifact {self.title!r}: picture must be uint8 H×W or H×W×3, not {described}")


@dataclass
class RunContext:
    """What a technique gets: the model, the decoded images, its validated options.

    ``model`` is a :class:`vizkit.graph.ModelGraph`; each of ``images`` is a
    :class:`vizkit.images.LoadedImage` that decoded fine, with ``predictions`` filled in
    for classifiers. ``preprocess`` maps 0-255 pixels to the model's input space.
    """

    model: Any
    images: list
    params: dict[str, Any]
    preprocess: Callable[[Any], Any] = lambda x: x
    labels: list[str] | None = None
    progress: Callable[[str], None] = lambda message: None
    notes: list[str] = field(default_factory=list)

    def note(self, message: str) -> None:
        """Tell the reader something about this run (shown in the technique's section)."""
        self.notes.append(message)

    def batches(self, size: int, preprocessed: bool = True) -> Iterator[tuple[list, np.ndarray]]:
        """(images, batch) for runs of up to ``size`` images of equal shape.

        The batch is preprocessed for the model, or 0-255 pixels with ``preprocessed=False``
        (for techniques that differentiate through ``preprocess`` themselves).
        """
        prepare = self.preprocess if preprocessed else (lambda x: x)
        group: list = []
        for image in self.images:
            if group and (len(group) == size or image.array.shape != group[0].array.shape):
                yield group, prepare(np.stack([g.array for g in group]))
                group = []
            group.append(image)
        if group:
            yield group, prepare(np.stack([g.array for g in group]))


@dataclass(frozen=True)
class Technique:
    """A visualization technique: a name, a ``run(context) -> list[Artifact]``, options."""

    name: str
    run: Callable[[RunContext], list[Artifact]]
    description: str
    options: tuple[Option, ...] = ()
    #: Which layers it can use, given a ``vizkit.graph.LayerInfo`` (shown by ``vizkit layers``).
    accepts: Callable[[Any], bool] | None = None

    def resolve_params(self, raw: dict[str, Any]) -> dict[str, Any]:
        """Defaults overlaid with ``raw`` (strings from the CLI or typed values), validated."""
        by_name = {option.name: option for option in self.options}
        unknown = [key for key in raw if key not in by_name]
        if unknown:
            valid = suggest(unknown[0], list(by_name)) or "(none)"
            raise OptionError(
                f"{self.name} has no option {unknown[0]!r}; its options are: {valid}"
            )
        params = {option.name: option.default for option in self.options}
        for key, value in raw.items():
            params[key] = by_name[key].parse(self.name, value)
        return params
