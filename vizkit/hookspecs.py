"""The hooks a vizkit plugin can implement.

Built-in techniques use exactly these hooks; see ``plugins/`` for examples.
"""

from __future__ import annotations

from typing import Callable

import pluggy

from vizkit.technique import Technique

hookspec = pluggy.HookspecMarker("vizkit")


@hookspec
def register_techniques(register: Callable[[Technique], None]) -> None:
    """Register visualization techniques by calling ``register(Technique(...))``.

    A callback rather than a return value, so one plugin can register several
    techniques, or none, depending on what is installed (the pattern of llm's hooks).
    """
