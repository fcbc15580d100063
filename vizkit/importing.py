"""Loading ``package.module:attribute`` specs given on the command line."""

from __future__ import annotations

import importlib


def import_object(spec: str, what: str):
    """The callable named by ``package.module:attribute``; errors say which ``what`` failed."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ValueError(f"{what} {spec!r} is not of the form package.module:function")
    try:
        found = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as error:
        raise ValueError(f"cannot load {what} {spec!r}: {error}") from error
    if not callable(found):
        raise ValueError(f"{what} {spec!r} is not callable")
    return found
