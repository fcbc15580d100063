"""What plugins register besides techniques: model loaders and report sections."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable


@dataclass(frozen=True)
class ModelLoader:
    """Loads model specs of the form ``SCHEME:REST`` (for example ``hub:org/model``).

    ``load(rest)`` returns a ``keras.Model`` or a :class:`vizkit.models.LoadedModel`
    (to also set the model's name, preprocessing and labels).
    """

    scheme: str
    load: Callable[[str], Any]
    description: str = ""


@dataclass(frozen=True)
class ReportSection:
    """A section a plugin adds to the report, after the techniques.

    ``html`` is inserted as it is: escape anything that came from users
    (``markupsafe.escape``). ``data`` goes into ``report.json`` under ``sections``.
    """

    title: str
    html: str
    data: Any = None
