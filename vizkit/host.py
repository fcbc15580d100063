"""The plugin host: one pluggy manager holding the built-in and installed plugins."""

from __future__ import annotations

import importlib
from dataclasses import dataclass
import pluggy

from vizkit import __version__, hookspecs
from vizkit.technique import Technique, suggest

ENTRY_POINT_GROUP = "vizkit"
BUILTIN_PLUGINS = (
    "vizkit.plugins.activations",
    "vizkit.plugins.filters",
    "vizkit.plugins.gradcam",
)


def plugin_manager() -> pluggy.PluginManager:
    """A manager with the built-ins and every plugin installed under the ``vizkit`` entry point."""
    pm = pluggy.PluginManager("vizkit")
    pm.add_hookspecs(hookspecs)
    for name in BUILTIN_PLUGINS:
        pm.register(importlib.import_module(name), name=name)
    pm.load_setuptools_entrypoints(ENTRY_POINT_GROUP)
    pm.check_pending()  # a misspelled hook name fails here, not silently later
    return pm


@dataclass(frozen=True)
class RegisteredTechnique:
    technique: Technique
    plugin: str


def techniques(pm: pluggy.PluginManager) -> dict[str, RegisteredTechnique]:
    """Every registered technique by name, each with the plugin that registered it."""
    found: dict[str, RegisteredTechnique] = {}
    for impl in pm.hook.register_techniques.get_hookimpls():
        plugin = impl.plugin_name

        def register(technique: Technique, plugin: str = plugin) -> None:
            if technique.name in found:
                raise ValueError(
                    f"technique {technique.name!r} of plugin {plugin} is already "
                    f"registered by {found[technique.name].plugin}"
                )
            found[technique.name] = RegisteredTechnique(technique, plugin)

        impl.function(register=register)
    return dict(sorted(found.items()))


def select(
    available: dict[str, RegisteredTechnique], names: list[str] | tuple[str, ...]
) -> list[RegisteredTechnique]:
    """The techniques named, in the order given; all of them when none are named."""
    if not names:
        return list(available.values())
    for name in names:
        if name not in available:
            raise KeyError(
                f"no technique {name!r}; installed: {suggest(name, list(available))}"
            )
    return [available[name] for name in dict.fromkeys(names)]


def describe_plugins(pm: pluggy.PluginManager) -> list[dict]:
    """Name, version, origin, hooks and techniques of each plugin, sorted by name."""
    by_plugin: dict[str, list[str]] = {}
    for name, registered in techniques(pm).items():
        by_plugin.setdefault(registered.plugin, []).append(name)
    dists = {id(plugin): dist for plugin, dist in pm.list_plugin_distinfo()}
    rows = []
    for name, plugin in pm.list_name_plugin():
        dist = dists.get(id(plugin))
        if dist is not None:
            origin, plugin_version = "entry point", dist.version
        else:
            origin, plugin_version = "built-in", __version__
        rows.append(
            {
                "name": name,
                "version": plugin_version,
                "origin": origin,
                "hooks": sorted(caller.name for caller in pm.get_hookcallers(plugin)),
                "techniques": by_plugin.get(name, []),
            }
        )
    return sorted(rows, key=lambda row: row["name"])

