"""Technique options from a TOML file: ``--config vizkit.toml`` or ``[tool.vizkit]`` in pyproject.toml.

    [gradcam]            # in vizkit.toml;  [tool.vizkit.gradcam] in pyproject.toml
    alpha = 0.5
    layer = "block5_conv3"

Values keep their TOML types; ``-s TECHNIQUE.KEY=VALUE`` on the command line wins.
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path

from vizkit.safe_read import MIB, describe_os_error, display_path, printable, read_regular

#: Largest config file (or pyproject.toml) read.
MAX_CONFIG_BYTES = 4 * MIB


class ConfigError(ValueError):
    """The config file cannot be read or is not shaped as technique tables."""


def load_settings(path: Path | None, cwd: Path | None = None) -> dict[str, dict[str, object]]:
    """Settings by technique from ``path``, else from ./pyproject.toml's [tool.vizkit], else none."""
    if path is not None:
        table, where = _read(path), display_path(path)
    else:
        pyproject = (cwd or Path.cwd()) / "pyproject.toml"
        if not os.path.exists(pyproject):
            return {}
        table, where = _tool_vizkit(_read(pyproject), pyproject), f"{display_path(pyproject)} [tool.vizkit]"
    for technique, options in table.items():
        if not isinstance(options, dict):
            name = printable(technique)
            raise ConfigError(
                f"{where}: {technique!r} should be a table of options, e.g. [{name}] "
                f"(vizkit.toml) or [tool.vizkit.{name}] (pyproject.toml)"
            )
    return table


def merge(*layers: dict[str, dict[str, object]]) -> dict[str, dict[str, object]]:
    """Settings merged option by option, later layers winning."""
    merged: dict[str, dict[str, object]] = {}
    for layer in layers:
        for technique, options in layer.items():
            merged.setdefault(technique, {}).update(options)
    return merged


def _tool_vizkit(document: dict, pyproject: Path) -> dict:
    """``[tool.vizkit]`` of a pyproject.toml, ConfigError (not AttributeError) where
    ``tool`` or ``tool.vizkit`` is a value instead of a table."""
    for keys in (("tool",), ("tool", "vizkit")):
        found = document
        for key in keys:
            found = found.get(key, {})
        if not isinstance(found, dict):
            name = ".".join(keys)
            raise ConfigError(
                f"{display_path(pyproject)}: {name} is a {type(found).__name__}, not a table: vizkit reads "
                f"its options from [tool.vizkit.TECHNIQUE] tables there; fix {name}, or give "
                "another file with --config"
            )
    return document.get("tool", {}).get("vizkit", {})


def _read(path: Path) -> dict:
    """The TOML document at ``path``: a regular file of at most ``MAX_CONFIG_BYTES`` only
    (a FIFO would block, ``/dev/zero`` never ends); every failure is a ConfigError."""
    try:
        return tomllib.loads(read_regular(path, MAX_CONFIG_BYTES).decode("utf-8"))
    except OSError as error:
        raise ConfigError(f"cannot read config {display_path(path)}: {describe_os_error(error)}") from None
    except (ValueError, RecursionError) as error:  # not UTF-8, not TOML, nested too deep
        reason = "nested too deeply" if isinstance(error, RecursionError) else error
        raise ConfigError(f"cannot read config {display_path(path)}: {reason}") from None
