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
from vizkit.compare import ComparisonMetric
from vizkit.extension import ModelLoader
from vizkit.metric import Metric
from vizkit.technique import Technique, suggest

ENTRY_POINT_GROUP = "vizkit"
BUILTIN_PLUGINS = (
    "vizkit.plugins.activations",
    "vizkit.plugins.filters",
    "vizkit.plugins.gradcam",
    "vizkit.plugins.attributions",
    "vizkit.plugins.perturbation",
    "vizkit.plugins.perturbation_cams",
    "vizkit.plugins.cam_family",
    "vizkit.plugins.faithfulness",
    "vizkit.plugins.randomization",
    "vizkit.plugins.comparisons",
    "vizkit.plugins.keras_models",
    "vizkit.plugins.efficientnet_lite",
)


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
    """A pluggy manager that also knows where each plugin came from and which ones broke.

    Every hook is called through pluggy (``tryfirst``, ``trylast`` and wrappers work as
    pluggy documents); :meth:`call` adds isolation, so one plugin that raises costs only
    its own contribution. What the register hooks register is computed once per host.
    """

    def __init__(self) -> None:
        super().__init__("vizkit")
        self.add_hookspecs(hookspecs)
        self.origins: dict[str, Origin] = {}
        self.broken: list[BrokenPlugin] = []
        self._registries: dict[str, dict] = {}

    def register(self, plugin: Any, name: str | None = None) -> str | None:
        self._registries.clear()
        return super().register(plugin, name)

    def unregister(self, plugin: Any = None, name: str | None = None) -> Any:
        self._registries.clear()
        return super().unregister(plugin, name)

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

    def call(self, hook_name: str, **kwargs) -> tuple[list[Any], list[str]]:
        """``pm.hook.<hook_name>(**kwargs)``, isolated: (results, error summaries).

        A raising hookimpl stops a pluggy call; the plugin at fault is found from the
        traceback, and the hook is called again without it (``subset_hook_caller``), so
        the others still count. Where the fault cannot be pinned on one plugin (hook
        functions that share code, a wrapper that returns no list), each plugin is called
        on its own instead. Results are in pluggy's call order, Nones left out.
        """
        excluded: list[Any] = []
        errors: list[str] = []
        while True:
            try:
                results = self.subset_hook_caller(hook_name, remove_plugins=excluded)(**kwargs)
            except KeyboardInterrupt:
                raise
            except BaseException as error:  # someone else's plugin: report it, keep going
                name = self.plugin_at_fault(hook_name, error, excluded)
                if name is None:
                    return self._call_one_by_one(hook_name, kwargs, excluded, errors)
                errors.append(f"plugin {name}, hook {hook_name}: {_summary(error)}")
                excluded.append(self.get_plugin(name))
                continue
            if isinstance(results, list):
                return results, errors
            return self._call_one_by_one(hook_name, kwargs, excluded, errors)

    def _call_one_by_one(self, hook_name: str, kwargs: dict, excluded: list, errors: list[str]) -> tuple[list[Any], list[str]]:
        """Each plugin's implementations of ``hook_name`` called on their own, in call order."""
        results: list[Any] = []
        plugins = [self.get_plugin(impl.plugin_name) for impl in reversed(getattr(self.hook, hook_name).get_hookimpls())]
        for plugin in dict.fromkeys(p for p in plugins if p not in excluded):
            others = [p for p in plugins if p is not plugin]
            name = self.get_name(plugin)
            try:
                returned = self.subset_hook_caller(hook_name, remove_plugins=others)(**kwargs)
            except KeyboardInterrupt:
                raise
            except BaseException as error:
                errors.append(f"plugin {name}, hook {hook_name}: {_summary(error)}")
                continue
            if not isinstance(returned, list):
                errors.append(f"plugin {name}, hook {hook_name}: a wrapper returned {type(returned).__name__}, not the list of results")
                continue
            results += returned
        return results, errors

    def plugin_at_fault(self, hook_name: str, error: BaseException, excluded: Iterable[Any] = ()) -> str | None:
        """The plugin whose hookimpl (of ``hook_name``) is deepest in ``error``'s traceback,
        among those not ``excluded``; None where no single plugin can be named."""
        left_out = {self.get_name(plugin) for plugin in excluded}
        impls = [i for i in getattr(self.hook, hook_name).get_hookimpls() if i.plugin_name not in left_out]
        for frame, _ in reversed(list(traceback.walk_tb(error.__traceback__))):
            plugins = _plugins_of_frame(frame, impls)
            if plugins:
                return plugins[0] if len(plugins) == 1 else None
        return None


def _plugins_of_frame(frame, impls) -> list[str]:
    """The plugins whose hookimpl ``frame`` may be running: one, unless several share the
    same code (a shared decorator; one class registered twice, told apart by ``self``)."""
    matches = []
    for impl in impls:
        function = getattr(impl.function, "__func__", impl.function)  # bound methods
        if getattr(function, "__code__", None) is frame.f_code:
            matches.append(impl)
    owner = frame.f_locals.get("self", None)
    own = [impl for impl in matches if getattr(impl.function, "__self__", None) is owner is not None]
    return list(dict.fromkeys(impl.plugin_name for impl in (own or matches)))


def _calling_plugin(caller: pluggy.HookCaller) -> str | None:
    """The plugin whose hookimpl is running now (the nearest one up the stack), or None
    where that cannot be told (hook functions sharing code)."""
    impls = caller.get_hookimpls()
    frame = sys._getframe(2)
    while frame is not None:
        plugins = _plugins_of_frame(frame, impls)
        if plugins:
            return plugins[0] if len(plugins) == 1 else None
        frame = frame.f_back
    return None


def plugin_manager(
    plugins: Iterable[str] = (),
    disabled: Iterable[str] = (),
    environ: dict[str, str] | None = None,
    extra: Iterable[tuple[str, Any]] = (),
) -> PluginHost:
    """The host with the built-ins, installed plugins, ``plugins`` (paths or module names)
    and ``extra`` (name, plugin object) pairs, which the test kit hands in."""
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
        plugin, name, origin = _load_local(spec, host)
        if host.is_registered(plugin):  # a plugin loaded already: installed, built-in, or given twice
            continue
        if not host.is_blocked(name):
            host.add(plugin, name, origin)
    for name, plugin in extra:
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
            _loader_registry(host)
            comparison_metrics(host)
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
        except KeyboardInterrupt:
            raise
        except BaseException as error:  # an import error of someone else's package
            host.mark_broken(entry.name, origin, _summary(error), strict)


def _load_local(spec: str, host: PluginHost) -> tuple[Any, str, Origin]:
    """A plugin named with ``-p``: a .py file, a package folder (or its ``__init__.py``),
    or an importable module. Returns (module, plugin name, origin)."""
    path = Path(spec)
    try:
        if path.suffix == ".py" or path.exists():
            return _load_path(spec, path, host)
        return importlib.import_module(spec), spec, Origin("module", spec, "local")
    except PluginError:
        raise
    except KeyboardInterrupt:
        raise
    except BaseException as error:
        raise PluginError(f"-p {spec}: cannot load this plugin: {_summary(error)}") from error


def _load_path(spec: str, path: Path, host: PluginHost) -> tuple[Any, str, Origin]:
    if path.is_dir() or path.name == "__init__.py":
        folder = path if path.is_dir() else path.parent
        init = folder / "__init__.py"
        if not init.is_file():
            raise PluginError(f"-p {spec}: a plugin folder must be a package (it has no __init__.py)")
        name, file, search = folder.resolve().name, init, [str(folder)]
    elif path.is_file():
        name, file, search = path.stem, path, None
    else:
        raise PluginError(f"-p {spec}: no such file")
    loaded = host.get_plugin(name)
    if loaded is not None:  # the same file again (as another spelling), or a namesake
        if Path(getattr(loaded, "__file__", "") or "").resolve() == file.resolve():
            return loaded, name, host.origins[name]
        where = host.origins[name].where if name in host.origins else name
        raise PluginError(f"-p {spec}: a plugin named {name} is loaded already ({where}); rename one of them")
    module_name = f"vizkit_local_plugin_{name}"
    loader_spec = importlib.util.spec_from_file_location(module_name, file, submodule_search_locations=search)
    module = importlib.util.module_from_spec(loader_spec)
    sys.modules[module_name] = module  # so dataclasses, pickling and relative imports work
    try:
        loader_spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[module_name]
        raise
    return module, name, Origin("path", spec, "local")  # as given: reports stay comparable


def _summary(error: BaseException) -> str:
    """The exception and where it was raised, in one line."""
    frames = traceback.extract_tb(error.__traceback__)
    where = f" ({Path(frames[-1].filename).name}:{frames[-1].lineno})" if frames else ""
    return f"{type(error).__name__}: {error}{where}"


@dataclass(frozen=True)
class RegisteredTechnique:
    technique: Technique
    plugin: str


def _collect(host: PluginHost, hook_name: str, cls: type, key, kind: str) -> dict[str, tuple[Any, str]]:
    """What the plugins register through the register-callback ``hook_name``, by ``key``,
    in pluggy's call order; computed once per host (until plugins change).

    One pluggy call, each registration credited to the plugin whose hookimpl is on the
    stack; where that is ambiguous (hook functions sharing code), one call per plugin.
    """
    if hook_name in host._registries:
        return host._registries[hook_name]
    caller = getattr(host.hook, hook_name)
    found: dict[str, tuple[Any, str]] = {}

    def registrar(plugin: str | None):
        def register(item) -> None:
            owner = plugin or _calling_plugin(caller)
            if owner is None:
                raise _Ambiguous()
            if not isinstance(item, cls):
                raise TypeError(f"register() takes a {cls.__name__}, not a {type(item).__name__}")
            name = key(item)
            if name in found:
                raise PluginError(
                    f"{kind} {name!r} is registered by two plugins, {found[name][1]} and {owner}; "
                    "leave one out with --disable-plugin NAME"
                )
            found[name] = (item, owner)

        return register

    try:
        try:
            caller(register=registrar(None))
        except _Ambiguous:
            found.clear()
            plugins = [host.get_plugin(impl.plugin_name) for impl in reversed(caller.get_hookimpls())]
            for plugin in dict.fromkeys(plugins):
                name, others = host.get_name(plugin), [p for p in plugins if p is not plugin]
                try:
                    host.subset_hook_caller(hook_name, remove_plugins=others)(register=registrar(name))
                except PluginError:
                    raise
                except KeyboardInterrupt:
                    raise
                except BaseException as error:
                    raise PluginError(f"plugin {name}, hook {hook_name}: {_summary(error)}", name) from None
    except PluginError:
        raise
    except KeyboardInterrupt:
        raise
    except BaseException as error:
        plugin = host.plugin_at_fault(hook_name, error)
        raise PluginError(f"plugin {plugin or '?'}, hook {hook_name}: {_summary(error)}", plugin) from None
    host._registries[hook_name] = found
    return found


class _Ambiguous(Exception):
    """A registration whose plugin the stack cannot tell: register plugin by plugin."""


def techniques(host: PluginHost) -> dict[str, RegisteredTechnique]:
    """Every registered technique by name (sorted), each with the plugin that registered it."""
    found = _collect(host, "register_techniques", Technique, lambda t: t.name, "technique")
    return {name: RegisteredTechnique(t, plugin) for name, (t, plugin) in sorted(found.items())}


@dataclass(frozen=True)
class RegisteredMetric:
    metric: Metric
    plugin: str


def metrics(host: PluginHost) -> dict[str, RegisteredMetric]:
    """Every registered metric by name (sorted), each with the plugin that registered it.

    Metric and technique names share ``-s NAME.KEY=VALUE``, so a metric may not take a
    technique's name."""
    found = _collect(host, "register_metrics", Metric, lambda m: m.name, "metric")
    clash = sorted(set(found) & set(techniques(host)))
    if clash:
        raise PluginError(
            f"{clash[0]!r} is both a technique and a metric (plugin {found[clash[0]][1]}); "
            "-s cannot tell them apart: rename one, or leave a plugin out with --disable-plugin NAME"
        )
    return {name: RegisteredMetric(m, plugin) for name, (m, plugin) in sorted(found.items())}


def select_metrics(available: dict[str, RegisteredMetric], names: list[str] | None) -> list[RegisteredMetric]:
    """The metrics named, in the order given; None: those that run by default."""
    if names is None:
        return [r for r in available.values() if r.metric.by_default]
    for name in names:
        if name not in available:
            raise KeyError(f"no metric {name!r}; installed: {suggest(name, list(available)) or '(none)'}")
    return [available[name] for name in dict.fromkeys(names)]


@dataclass(frozen=True)
class RegisteredComparison:
    metric: ComparisonMetric
    plugin: str


def comparison_metrics(host: PluginHost) -> dict[str, RegisteredComparison]:
    """Every registered comparison metric by name (sorted), with the plugin that registered it."""
    found = _collect(host, "register_comparisons", ComparisonMetric, lambda m: m.name, "comparison metric")
    return {name: RegisteredComparison(m, plugin) for name, (m, plugin) in sorted(found.items())}


def _loader_registry(host: PluginHost) -> dict[str, tuple[ModelLoader, str]]:
    return _collect(host, "register_model_loaders", ModelLoader, lambda m: m.scheme, "model scheme")


def model_loaders(host: PluginHost) -> dict[str, ModelLoader]:
    """Model loaders by scheme, in pluggy's call order (the order they are tried in)."""
    return {scheme: loader for scheme, (loader, _) in _loader_registry(host).items()}


#: ``-t explain``: every comparable technique (CAM and attribution methods), side by side.
EXPLAIN = "explain"


def select(
    available: dict[str, RegisteredTechnique], names: list[str] | tuple[str, ...]
) -> list[RegisteredTechnique]:
    """The techniques named, in the order given; those that run by default when none are.

    ``explain`` (unless a technique has that name) stands for every comparable technique.
    """
    if not names:
        return [r for r in available.values() if r.technique.by_default]
    expanded: list[str] = []
    for name in names:
        if name == EXPLAIN and name not in available:
            expanded += [n for n, r in available.items() if r.technique.comparable]
        elif name in available:
            expanded.append(name)
        else:
            raise KeyError(f"no technique {name!r}; installed: {suggest(name, [*available, EXPLAIN])}")
    return [available[name] for name in dict.fromkeys(expanded)]


def describe_plugins(host: PluginHost) -> list[dict]:
    """Name, version, origin, hooks, techniques, metrics, comparison metrics and model
    schemes of each plugin, broken ones too, by name."""
    def by_plugin(registry: dict) -> dict[str, list[str]]:
        found: dict[str, list[str]] = {}
        for name, registered in registry.items():
            found.setdefault(registered.plugin, []).append(name)
        return found

    registered = {
        "techniques": by_plugin(techniques(host)),
        "metrics": by_plugin(metrics(host)),
        "comparisons": by_plugin(comparison_metrics(host)),
    }
    schemes: dict[str, list[str]] = {}
    for scheme, (_, plugin) in _loader_registry(host).items():
        schemes.setdefault(plugin, []).append(scheme)
    unknown = Origin("registered", "", "unknown")  # added with plain pm.register()
    rows = [
        {
            "name": name,
            "version": host.origins.get(name, unknown).version,
            "origin": host.origins.get(name, unknown).kind,
            "where": host.origins.get(name, unknown).where or name,
            "status": "ok",
            "error": None,
            "hooks": sorted(caller.name for caller in host.get_hookcallers(plugin)),
            **{kind: names.get(name, []) for kind, names in registered.items()},
            "model_loaders": sorted(schemes.get(name, [])),
        }
        for name, plugin in host.list_name_plugin()
        if plugin is not None
    ]
    rows += [
        {
            "name": b.name, "version": b.origin.version, "origin": b.origin.kind, "where": b.origin.where,
            "status": "broken", "error": b.error, "hooks": [], **{kind: [] for kind in registered}, "model_loaders": [],
        }
        for b in host.broken
    ]
    return sorted(rows, key=lambda row: row["name"])
