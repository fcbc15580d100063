"""What plugins register besides techniques: model loaders and report sections."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable


@dataclass(frozen=True)
class ModelLoader:
    """Turns model specs into models; vizkit's own files, names and factories are loaders too.

    A spec ``SCHEME:REST`` (for example ``hub:org/model``) goes to the loader of that
    ``scheme``, which gets ``REST``. ``match``, where given, lets the loader also claim
    whole specs without a prefix (``*.keras``, ``vgg16``, ``pkg.mod:func``); ``load`` then
    gets the whole spec. Of several loaders whose ``match`` is true, the one called first
    by the hook wins: later-registered plugins before earlier ones, so a plugin can take
    over a spec from a built-in (``tryfirst``/``trylast`` on the hook implementation
    change the order).

    ``load(spec)`` returns a ``keras.Model`` or a :class:`vizkit.models.LoadedModel` (to
    also set the model's name, preprocessing and labels); a
    :class:`vizkit.models.ModelLoadError` it raises is shown as it is, any other exception
    as a failure of this loader. It may also declare keyword parameters named ``weights``
    (``imagenet`` or ``none``, from ``--weights``) and ``size`` (from ``--size``, or None)
    to receive them; the others are not passed.

    ``names`` are specs ``match`` accepts by name (``vgg16``): an unknown spec's error
    lists them, closest first.
    """

    scheme: str
    load: Callable[..., Any]
    description: str = ""
    match: Callable[[str], bool] | None = None
    names: tuple[str, ...] = ()


@dataclass(frozen=True)
class ReportSection:
    """A section a plugin adds to the report, after the techniques.

    ``html`` is inserted as it is: escape anything that came from users
    (``markupsafe.escape``). ``data`` goes into ``report.json`` under ``sections``.
    """

    title: str
    html: str
    data: Any = None
