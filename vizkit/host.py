"""The plugin host: one pluggy manager holding the built-in, installed and local plugins.

Where plugins come from, in order: the built-ins; packages installed with an entry point
in the group ``vizkit`` (``VIZKIT_LOAD_PLUGINS=a,b`` limits which, empty for none); and
files or modules named with ``-p``. ``--disable-plugin NAME`` blocks any of them. An
installed plugin that fails to load is reported as broken and left out, unless
``VIZKIT_STRICT_PLUGINS=1`` makes that an error.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import traceback
import warnings
from dataclasses import dataclass
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, Iterable

import pluggy

from vizkit import __version__, hookspecs
from vizkit.extension import ModelLoader
from vizkit.technique import Technique, suggest

ENTRY_POINT_GROUP = "vizkit"
BUILTIN_PLUGINS = (
    "vizkit.plugins.activations",
    "vizkit.plugins.filters",
    "vizkit.plugins.gradcam",
)

#: Plugin objects registered for one test by ``vizkit.testing`` (name → object).
TEST_PLUGINS: dict[str, Any] = {}


class PluginError(RuntimeError):
    """A plugin could not be loaded where that is fatal (``-p``, strict mode, a name clash).

    ``plugin`` names the plugin at fault where one plugin alone is.
    """

    def __init__(self, message: str, plugin: str | None = None):
        super().__init__(message)
        self.plugin = plugin


class BrokenPluginWarning(UserWarning):
    """An installed plugin failed to load and was left out."""


@dataclass(frozen=True)
class Origin:
    kind: str  # built-in | entry point | path | module | test
    where: str  # module, distribution or file
    version: str


@dataclass(frozen=True)
class BrokenPlugin:
    name: str
    origin: Origin
    error: str


class PluginHost(pluggy.PluginManager):
    """A pluggy manager that also knows where each plugin came from and which ones broke."""

    def __init__(self) -> None:
        super().__init__("vizkit")
        self.add_hookspecs(hookspecs)
        self.origins: dict[str, Origin] = {}
        self.broken: list[BrokenPlugin] = []

    def add(self, plugin: Any, name: str, origin: Origin) -> None:
        """Register ``plugin``; a hook that does not exist or does not fit is an error."""
        try:
            self.register(plugin, name=name)
            self.check_pending()  # a misspelled hook name fails here, not silently later
        except (pluggy.PluginValidationError, ValueError) as error:  # ValueError: a name taken twice
            if self.is_registered(plugin) and self.get_name(plugin) == name:
                self.unregister(plugin)
            raise PluginError(f"plugin {name} ({origin.where}): {error}") from None
        self.origins[name] = origin

    def mark_broken(self, name: str, origin: Origin, error: str, strict: bool) -> None:
        if strict:
            raise PluginError(f"plugin {name} ({origin.where}) is broken: {error}")
        self.broken.append(BrokenPlugin(name, origin, error))
        warnings.warn(
            f"plugin {name} ({origin.where}) is broken and was left out: {error}",
            BrokenPluginWarning,
            stacklevel=2,
        )


def plugin_manager(
    plugins: Iterable[str] = (),
    disabled: Iterable[str] = (),
    environ: dict[str, str] | None = None,
) -> PluginHost:
    """The host with the built-ins, installed plugins and ``plugins`` (paths or module names)."""
    environ = os.environ if environ is None else environ
    strict = environ.get("VIZKIT_STRICT_PLUGINS", "") not in ("", "0")
    host = PluginHost()
    for name in disabled:
        host.set_blocked(name)
    for name in BUILTIN_PLUGINS:
        if not host.is_blocked(name):
            host.add(importlib.import_module(name), name, Origin("built-in", name, __version__))
    _load_entry_points(host, environ.get("VIZKIT_LOAD_PLUGINS"), strict)
    for spec in plugins:
        plugin, origin = _load_local(spec)
        name = origin.where if origin.kind == "module" else Path(spec).stem
        if not host.is_blocked(name):
            host.add(plugin, name, origin)
    for name, plugin in TEST_PLUGINS.items():
        if not host.is_registered(plugin):  # an installed plugin under test is loaded already
            host.add(plugin, name, Origin("test", name, "0"))
    _check_registrations(host, strict)
    return host


def _check_registrations(host: PluginHost, strict: bool) -> None:
    """Run the register hooks once now: an installed plugin whose hook raises is left out
    as broken; a name registered twice fails here, naming both plugins."""
    while True:
        try:
            techniques(host)
            model_loaders(host)
            return
        except PluginError as error:
            origin = host.origins.get(error.plugin or "")
            if strict or origin is None or origin.kind != "entry point":
                raise
            host.unregister(name=error.plugin)
            host.mark_broken(error.plugin, origin, str(error), strict)


def _load_entry_points(host: PluginHost, allowed: str | None, strict: bool) -> None:
    only = None if allowed is None else {n.strip() for n in allowed.split(",") if n.strip()}
    for entry in sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
        if (only is not None and entry.name not in only) or host.is_blocked(entry.name):
            continue
        dist = entry.dist
        origin = Origin("entry point", dist.name if dist else entry.value, dist.version if dist else "?")
        try:
            host.add(entry.load(), entry.name, origin)
        except PluginError as error:
            host.mark_broken(entry.name, origin, str(error), strict)
        except Exception as error:  # an import error of someone else's package
            host.mark_broken(entry.name, origin, _summary(error), strict)


def _load_local(spec: str) -> tuple[Any, Origin]:
    """A plugin named with ``-p``: a .py file, or an importable module."""
    path = Path(spec)
    try:
        if path.suffix == ".py" or path.exists():
            if not path.is_file():
                raise PluginError(f"-p {spec}: no such file")
            module_name = f"vizkit_local_plugin_{path.stem}"
            loader_spec = importlib.util.spec_from_file_location(module_name, path)
            module = importlib.util.module_from_spec(loader_spec)
            sys.modules[module_name] = module  # so dataclasses and pickling inside it work
            loader_spec.loader.exec_module(module)
            return module, Origin("path", str(path), "local")  # as given: reports stay comparable
        return importlib.import_module(spec), Origin("module", spec, "local")
    except PluginError:
        raise
    except Exception as error:
        raise PluginError(f"-p {spec}: cannot load this plugin: {_summary(error)}") from error


def _summary(error: BaseException) -> str:
    """The exception and where it was raised, in one line."""
    frames = traceback.extract_tb(error.__traceback__)
    where = f" ({Path(frames[-1].filename).name}:{frames[-1].lineno})" if frames else ""
    return f"{type(error).__name__}: {error}{where}"


@dataclass(frozen=True)
class RegisteredTechnique:
    technique: Technique
    plugin: str


def _collect(pm: pluggy.PluginManager, hook_name: str, cls: type, key, kind: str) -> dict[str, tuple[Any, str]]:
    """What each plugin registers through the register-callback ``hook_name``, by ``key``."""
    found: dict[str, tuple[Any, str]] = {}
    for impl in getattr(pm.hook, hook_name).get_hookimpls():

        def register(item, plugin: str = impl.plugin_name) -> None:
            if not isinstance(item, cls):
                raise TypeError(f"register() takes a {cls.__name__}, not a {type(item).__name__}")
            name = key(item)
            if name in found:
                raise PluginError(f"{kind} {name!r} of plugin {plugin} is already registered by {found[name][1]}")
            found[name] = (item, plugin)

        try:
            impl.function(register=register)
        except PluginError:
            raise
        except Exception as error:
            raise PluginError(f"plugin {impl.plugin_name}, hook {hook_name}: {_summary(error)}", impl.plugin_name) from None
    return dict(sorted(found.items()))


def techniques(pm: pluggy.PluginManager) -> dict[str, RegisteredTechnique]:
    """Every registered technique by name, each with the plugin that registered it."""
    found = _collect(pm, "register_techniques", Technique, lambda t: t.name, "technique")
    return {name: RegisteredTechnique(t, plugin) for name, (t, plugin) in found.items()}


def model_loaders(pm: pluggy.PluginManager) -> dict[str, ModelLoader]:
    """Model loaders by scheme."""
    return {scheme: loader for scheme, (loader, _) in _collect(pm, "register_model_loaders", ModelLoader, lambda m: m.scheme, "model scheme").items()}


def select(
    available: dict[str, RegisteredTechnique], names: list[str] | tuple[str, ...]
) -> list[RegisteredTechnique]:
    """The techniques named, in the order given; all of them when none are named."""
    if not names:
        return list(available.values())
    for name in names:
        if name not in available:
            raise KeyError(f"no technique {name!r}; installed: {suggest(name, list(available))}")
    return [available[name] for name in dict.fromkeys(names)]


def describe_plugins(host: PluginHost) -> list[dict]:
    """Name, version, origin, hooks and techniques of each plugin, broken ones too, by name."""
    by_plugin: dict[str, list[str]] = {}
    for name, registered in techniques(host).items():
        by_plugin.setdefault(registered.plugin, []).append(name)
    origins = getattr(host, "origins", {})
    unknown = Origin("registered", "", "unknown")  # added with plain pm.register()
    rows = [
        {
            "name": name,
            "version": origins.get(name, unknown).version,
            "origin": origins.get(name, unknown).kind,
            "where": origins.get(name, unknown).where or name,
            "status": "ok",
            "error": None,
            "hooks": sorted(caller.name for caller in host.get_hookcallers(plugin)),
            "techniques": by_plugin.get(name, []),
        }
        for name, plugin in host.list_name_plugin()
        if plugin is not None
    ]
    rows += [
        {
            "name": b.name, "version": b.origin.version, "origin": b.origin.kind, "where": b.origin.where,
            "status": "broken", "error": b.error, "hooks": [], "techniques": [],
        }
        for b in getattr(host, "broken", [])
    ]
    return sorted(rows, key=lambda row: row["name"])


def call_each(pm: pluggy.PluginManager, hook_name: str, **kwargs) -> tuple[list[tuple[str, Any]], list[str]]:
    """Call each plugin's ``hook_name`` on its own, in registration order.

    Unlike a plain hook call, one plugin that raises does not hide the others' results:
    returns ([(plugin, result) for results that are not None], [error summaries]).
    """
    results, errors = [], []
    for impl in getattr(pm.hook, hook_name).get_hookimpls():
        try:
            result = impl.function(**{name: kwargs[name] for name in impl.argnames})
        except Exception as error:  # someone else's plugin: report it, keep going
            errors.append(f"plugin {impl.plugin_name}, hook {hook_name}: {_summary(error)}")
            continue
        if result is not None:
            results.append((impl.plugin_name, result))
    return results, errors
