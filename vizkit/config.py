"""Technique options from a TOML file: ``--config vizkit.toml`` or ``[tool.vizkit]`` in pyproject.toml.

    [gradcam]            # in vizkit.toml;  [tool.vizkit.gradcam] in pyproject.toml
    alpha = 0.5
    layer = "block5_conv3"

Values keep their TOML types; ``-s TECHNIQUE.KEY=VALUE`` on the command line wins.
"""

from __future__ import annotations

import tomllib
from pathlib import Path


class ConfigError(ValueError):
    """The config file cannot be read or is not shaped as technique tables."""


def load_settings(path: Path | None, cwd: Path | None = None) -> dict[str, dict[str, object]]:
    """Settings by technique from ``path``, else from ./pyproject.toml's [tool.vizkit], else none."""
    if path is not None:
        table, where = _read(path), str(path)
    else:
        pyproject = (cwd or Path.cwd()) / "pyproject.toml"
        if not pyproject.is_file():
            return {}
        table, where = _read(pyproject).get("tool", {}).get("vizkit", {}), f"{pyproject} [tool.vizkit]"
    for technique, options in table.items():
        if not isinstance(options, dict):
            raise ConfigError(
                f"{where}: {technique!r} should be a table of options, e.g. [{technique}] "
                "(vizkit.toml) or [tool.vizkit.{technique}] (pyproject.toml)"
            )
    return table


def merge(*layers: dict[str, dict[str, object]]) -> dict[str, dict[str, object]]:
    """Settings merged option by option, later layers winning."""
    merged: dict[str, dict[str, object]] = {}
    for layer in layers:
        for technique, options in layer.items():
            merged.setdefault(technique, {}).update(options)
    return merged


def _read(path: Path) -> dict:
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as error:
        raise ConfigError(f"cannot read config {path}: {error}") from None
