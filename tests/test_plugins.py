"""The plugin host end to end: installed (entry-point) plugins, -p files and modules,
broken plugins, model loaders, report hooks, config files and the pytest kit.

No mocks: an "installed" plugin is a real distribution (a module plus a ``*.dist-info``
folder with an ``entry_points.txt``) written into a temporary folder that is put on
``sys.path``, so ``importlib.metadata`` finds it exactly as it finds a pip-installed one.
Every CLI run uses the tiny Keras model and two small images, and the cheapest settings.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import json
import re
import sys
import textwrap
import uuid
from pathlib import Path

import pytest
from click.testing import CliRunner

from conftest import write_sample_folder
from vizkit import host, hookspecs
from vizkit.cli import main
from vizkit.runner import RunOptions, UsageError, run as run_report
from vizkit.testing import tiny_classifier

pytest_plugins = ["pytester"]

REPO = Path(__file__).resolve().parents[1]
BUILTINS = list(host.BUILTIN_PLUGINS)
CHEAP_ACTIVATIONS = ["-t", "activations", "-s", "activations.max_channels=4"]
CHEAP_FILTERS = ["-t", "filters", "-s", "filters.count=2", "-s", "filters.steps=1", "-s", "filters.size=16"]

# --------------------------------------------------------------------------- plugin sources

#: A technique that needs no TensorFlow: the mean of the colour channels, times ``gain``.
#: ``TECHNIQUE`` is set by :func:`technique_source`.
_TECHNIQUE_BODY = '''
import numpy as np
import vizkit
from vizkit.technique import Artifact, Option, Technique


def run(context):
    artifacts = []
    for image in context.images:
        gray = image.array.mean(axis=-1) * context.params["gain"]
        artifacts.append(Artifact(
            title=f"{image.id} {TECHNIQUE}",
            array=gray.astype("float32"),
            picture=np.clip(gray, 0, 255).astype("uint8"),
            image_id=image.id,
        ))
    return artifacts


@vizkit.hookimpl
def register_techniques(register):
    register(Technique(
        name=TECHNIQUE,
        run=run,
        description="Mean of the colour channels (test plugin).",
        options=(Option("gain", float, 1.0, "multiply the brightness", minimum=0),),
    ))
'''


def technique_source(technique: str, extra: str = "") -> str:
    return f"TECHNIQUE = {technique!r}\n" + _TECHNIQUE_BODY + textwrap.dedent(extra)


CSS_HOOK = '''
@vizkit.hookimpl
def report_css():
    return "/* css of the installed plugin */"
'''

BROKEN_ON_IMPORT = '''
raise RuntimeError("boom: this plugin cannot be imported")
'''

MISSPELLED_HOOK = '''
import vizkit
from vizkit.technique import Technique


@vizkit.hookimpl
def register_technique(register):  # the hook is register_techniques
    register(Technique("never", lambda context: [], "never registered"))
'''


def loader_source(scheme: str = "fake") -> str:
    return textwrap.dedent(f'''
        import vizkit
        from vizkit.extension import ModelLoader
        from vizkit.testing import tiny_classifier

        SCHEME = {scheme!r}


        def load(rest):
            if rest == "bad":
                raise ValueError("the fake zoo has no model called 'bad'")
            return tiny_classifier(name="fake_" + rest)


        @vizkit.hookimpl
        def register_model_loaders(register):
            register(ModelLoader(SCHEME, load, "models from a fake zoo"))
    ''')


def section_source(title: str, body: str) -> str:
    return textwrap.dedent(f'''
        import vizkit
        from vizkit.extension import ReportSection


        @vizkit.hookimpl
        def report_sections(report):
            return [ReportSection({title!r}, {body!r}, data={{"images": len(report.images)}})]
    ''')


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(autouse=True)
def _clean_environment(tmp_path, monkeypatch):
    """No plugin selection from the caller's shell; cwd without a pyproject.toml; no leaks."""
    monkeypatch.delenv("VIZKIT_LOAD_PLUGINS", raising=False)
    monkeypatch.delenv("VIZKIT_STRICT_PLUGINS", raising=False)
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    before = set(sys.modules)
    yield
    for name in set(sys.modules) - before:
        if name.startswith(("vkplug_", "vizkit_local_plugin_")):
            del sys.modules[name]


@pytest.fixture(scope="module")
def model_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("model") / "tiny.keras"
    tiny_classifier().save(path)
    return path


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    return write_sample_folder(tmp_path_factory.mktemp("pictures") / "images")


def builtin_techniques() -> list[str]:
    """The techniques of the built-in plugins, each module's TECHNIQUE(S) read directly."""
    names = []
    for module_name in host.BUILTIN_PLUGINS:
        module = importlib.import_module(module_name)
        techniques = getattr(module, "TECHNIQUES", None) or [getattr(module, "TECHNIQUE", None)]
        names += [t.name for t in techniques if t is not None]
    assert {"activations", "filters", "gradcam"} <= set(names)
    return sorted(names)


def unique(prefix: str = "vkplug") -> str:
    return f"{prefix}_{uuid.uuid4().hex[:10]}"


@pytest.fixture
def install(tmp_path, monkeypatch):
    """``install(source, plugin="myplug", dist=..., version="1.2.3")`` → the module name.

    Writes ``<module>.py`` and ``<dist>-<version>.dist-info/{METADATA,entry_points.txt}``
    into a site folder on sys.path: an installed distribution as importlib.metadata sees it.
    """
    site = tmp_path / "site"
    site.mkdir()
    monkeypatch.syspath_prepend(str(site))

    def install_(source: str, plugin: str = "myplug", dist: str = "vizkit-myplug", version: str = "1.2.3") -> str:
        module = unique()
        (site / f"{module}.py").write_text(source, encoding="utf-8")
        info = site / f"{dist.replace('-', '_')}-{version}.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(
            f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n", encoding="utf-8"
        )
        (info / "entry_points.txt").write_text(f"[vizkit]\n{plugin} = {module}\n", encoding="utf-8")
        importlib.invalidate_caches()
        return module

    return install_


@pytest.fixture
def plugin_file(tmp_path):
    """``plugin_file(stem, source)`` → the path of a plugin .py file for ``-p``."""
    folder = tmp_path / "local"
    folder.mkdir(exist_ok=True)

    def write(stem: str, source: str, subfolder: str = "") -> Path:
        where = folder / subfolder if subfolder else folder
        where.mkdir(exist_ok=True)
        path = where / f"{stem}.py"
        path.write_text(source, encoding="utf-8")
        return path

    return write


def invoke_catching(*args, env=None):
    """Like the vizkit_cli fixture, but an uncaught exception becomes result.exception."""
    return CliRunner().invoke(main, [str(a) for a in args], env=env, catch_exceptions=True)


def plugin_rows(result) -> dict[str, dict]:
    assert result.exit_code == 0, result.output
    rows = json.loads(result.output[result.output.index("[") :])
    names = [row["name"] for row in rows]
    assert names == sorted(names), "vizkit plugins --json is sorted by name"
    return {row["name"]: row for row in rows}


def report_json(outdir: Path) -> dict:
    return json.loads((outdir / "report.json").read_text(encoding="utf-8"))


def technique_names(result) -> list[str]:
    assert result.exit_code == 0, result.output
    return re.findall(r"^(\S+) \(", result.output, flags=re.MULTILINE)


def no_traceback(result) -> None:
    """The command ended on its own terms (exit status), not with an uncaught exception."""
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise AssertionError(
            f"uncaught {type(result.exception).__name__}: {result.exception}"
        ) from result.exception


# --------------------------------------------------------------------------- installed plugins


def test_fake_distribution_is_seen_by_importlib_metadata(install):
    module = install(technique_source("brightness"))
    found = [e for e in importlib.metadata.entry_points(group="vizkit") if e.name == "myplug"]
    assert len(found) == 1
    assert found[0].value == module
    assert found[0].dist.name == "vizkit-myplug"
    assert found[0].dist.version == "1.2.3"


def test_plugins_json_lists_the_entry_point_plugin(install, vizkit_cli):
    install(technique_source("brightness", CSS_HOOK))
    rows = plugin_rows(vizkit_cli("plugins", "--json"))  # default: every installed plugin
    assert set(BUILTINS) <= set(rows)
    row = rows["myplug"]
    assert row["version"] == "1.2.3"
    assert row["origin"] == "entry point"
    assert row["where"] == "vizkit-myplug"
    assert row["status"] == "ok" and row["error"] is None
    assert row["hooks"] == ["register_techniques", "report_css"]
    assert row["techniques"] == ["brightness"]
    assert rows["vizkit.plugins.filters"]["origin"] == "built-in"
    assert rows["vizkit.plugins.filters"]["techniques"] == ["filters"]

    text = vizkit_cli("plugins", env={"VIZKIT_LOAD_PLUGINS": "myplug"})
    assert text.exit_code == 0, text.output
    assert "myplug 1.2.3 (entry point: vizkit-myplug)" in text.output
    assert "techniques: brightness" in text.output
    assert "hooks: register_techniques, report_css" in text.output


def test_entry_point_technique_runs_in_a_report(install, vizkit_cli, model_file, images, tmp_path):
    install(technique_source("brightness"))
    out = tmp_path / "out"
    result = vizkit_cli(
        "run", model_file, images, "-t", "brightness", "-s", "brightness.gain=1.5", "-o", out,
        env={"VIZKIT_LOAD_PLUGINS": "myplug"},
    )
    assert result.exit_code == 0, result.output
    data = report_json(out)
    [technique] = data["techniques"]
    assert technique["name"] == "brightness"
    assert technique["plugin"] == "myplug"
    assert technique["status"] == "ok", technique["error"]
    assert technique["params"] == {"gain": 1.5}
    assert len(technique["artifacts"]) == 2  # one per image
    row = next(p for p in data["plugins"] if p["name"] == "myplug")
    assert (row["version"], row["origin"], row["status"]) == ("1.2.3", "entry point", "ok")
    assert 'id="technique-brightness"' in (out / "index.html").read_text(encoding="utf-8")


@pytest.mark.parametrize(
    ("load", "expected_extra"),
    [("other", set()), ("", set()), ("myplug", {"myplug"}), (" other , myplug ", {"myplug"})],
)
def test_vizkit_load_plugins_selects_installed_plugins(install, vizkit_cli, load, expected_extra):
    install(technique_source("brightness"))
    rows = plugin_rows(vizkit_cli("plugins", "--json", env={"VIZKIT_LOAD_PLUGINS": load}))
    assert set(rows) == set(BUILTINS) | expected_extra  # built-ins stay, whatever the setting
    pm = host.plugin_manager(environ={"VIZKIT_LOAD_PLUGINS": load})
    assert ("brightness" in host.techniques(pm)) == bool(expected_extra)


def test_disable_plugin_blocks_an_entry_point_plugin(install, vizkit_cli, model_file, images, tmp_path):
    install(technique_source("brightness"))
    env = {"VIZKIT_LOAD_PLUGINS": "myplug"}
    assert "myplug" in plugin_rows(vizkit_cli("plugins", "--json", env=env))
    rows = plugin_rows(vizkit_cli("plugins", "--json", "--disable-plugin", "myplug", env=env))
    assert "myplug" not in rows
    assert "brightness" not in technique_names(vizkit_cli("techniques", "--disable-plugin", "myplug", env=env))
    result = vizkit_cli(
        "run", model_file, images, "-t", "brightness", "-o", tmp_path / "out", "--disable-plugin", "myplug", env=env
    )
    assert result.exit_code == 2
    assert "no technique 'brightness'" in result.output
    assert not (tmp_path / "out").exists()


def test_disable_plugin_removes_a_builtin(vizkit_cli, model_file, images, tmp_path):
    env = {"VIZKIT_LOAD_PLUGINS": ""}
    assert technique_names(vizkit_cli("techniques", env=env)) == builtin_techniques()
    names = technique_names(vizkit_cli("techniques", "--disable-plugin", "vizkit.plugins.filters", env=env))
    assert names == [name for name in builtin_techniques() if name != "filters"]
    rows = plugin_rows(vizkit_cli("plugins", "--json", "--disable-plugin", "vizkit.plugins.filters", env=env))
    assert "vizkit.plugins.filters" not in rows
    result = vizkit_cli(
        "run", model_file, images, *CHEAP_FILTERS, "-o", tmp_path / "out",
        "--disable-plugin", "vizkit.plugins.filters", env=env,
    )
    assert result.exit_code == 2
    assert "no technique 'filters'" in result.output
    # the Python API takes the same list
    with pytest.raises(UsageError, match="no technique 'filters'"):
        run_report(str(model_file), [images], RunOptions(techniques=["filters"], disabled_plugins=["vizkit.plugins.filters"]))


# --------------------------------------------------------------------------- broken plugins


def test_plugin_that_raises_on_import_is_broken_with_a_warning(install):
    module = install(BROKEN_ON_IMPORT, plugin="kaputt", dist="vizkit-kaputt", version="0.3")
    with pytest.warns(host.BrokenPluginWarning, match=r"plugin kaputt \(vizkit-kaputt\) is broken.*boom"):
        pm = host.plugin_manager(environ={"VIZKIT_LOAD_PLUGINS": "kaputt"})
    [broken] = pm.broken
    assert broken.name == "kaputt"
    assert broken.origin == host.Origin("entry point", "vizkit-kaputt", "0.3")
    assert "RuntimeError: boom: this plugin cannot be imported" in broken.error
    assert f"{module}.py" in broken.error  # where it was raised
    assert not pm.has_plugin("kaputt")
    assert list(host.techniques(pm)) == builtin_techniques()  # the rest still loads
    [row] = [r for r in host.describe_plugins(pm) if r["name"] == "kaputt"]
    assert row["status"] == "broken" and "boom" in row["error"]
    assert row["hooks"] == [] and row["techniques"] == []


def test_vizkit_plugins_shows_a_broken_plugin(install, vizkit_cli):
    install(BROKEN_ON_IMPORT, plugin="kaputt", dist="vizkit-kaputt", version="0.3")
    env = {"VIZKIT_LOAD_PLUGINS": "kaputt"}
    with pytest.warns(host.BrokenPluginWarning):
        text = vizkit_cli("plugins", env=env)
    assert text.exit_code == 0, text.output
    assert re.search(r"^kaputt 0\.3 \(entry point: vizkit-kaputt\): BROKEN: RuntimeError: boom", text.output, re.M)
    with pytest.warns(host.BrokenPluginWarning):
        rows = plugin_rows(vizkit_cli("plugins", "--json", env=env))
    assert rows["kaputt"]["status"] == "broken"
    assert "RuntimeError: boom: this plugin cannot be imported" in rows["kaputt"]["error"]


def test_run_goes_on_without_a_broken_plugin(install, vizkit_cli, model_file, images, tmp_path):
    install(BROKEN_ON_IMPORT, plugin="kaputt", dist="vizkit-kaputt", version="0.3")
    out = tmp_path / "out"
    with pytest.warns(host.BrokenPluginWarning):
        result = vizkit_cli(
            "run", model_file, images, *CHEAP_ACTIVATIONS, "-o", out, env={"VIZKIT_LOAD_PLUGINS": "kaputt"}
        )
    assert result.exit_code == 0, result.output
    data = report_json(out)
    assert [t["status"] for t in data["techniques"]] == ["ok"]
    [row] = [p for p in data["plugins"] if p["name"] == "kaputt"]
    assert row["status"] == "broken"
    assert row["version"] == "0.3" and row["origin"] == "entry point"
    assert "boom" in row["error"]
    assert "boom" in (out / "index.html").read_text(encoding="utf-8")  # the plugins table says why


def test_strict_mode_makes_a_broken_plugin_an_error(install, vizkit_cli, model_file, images, tmp_path):
    install(BROKEN_ON_IMPORT, plugin="kaputt", dist="vizkit-kaputt", version="0.3")
    env = {"VIZKIT_LOAD_PLUGINS": "kaputt", "VIZKIT_STRICT_PLUGINS": "1"}
    with pytest.raises(host.PluginError, match=r"plugin kaputt \(vizkit-kaputt\) is broken: RuntimeError: boom"):
        host.plugin_manager(environ=env)
    result = vizkit_cli("plugins", env=env)
    assert result.exit_code == 2
    assert "kaputt" in result.output and "boom" in result.output
    out = tmp_path / "out"
    result = vizkit_cli("run", model_file, images, *CHEAP_ACTIVATIONS, "-o", out, env=env)
    assert result.exit_code == 2
    assert "boom" in result.output
    assert not out.exists()
    # "0" means not strict
    with pytest.warns(host.BrokenPluginWarning):
        host.plugin_manager(environ={"VIZKIT_LOAD_PLUGINS": "kaputt", "VIZKIT_STRICT_PLUGINS": "0"})


def test_misspelled_hook_of_an_entry_point_plugin_is_broken(install, vizkit_cli):
    install(MISSPELLED_HOOK, plugin="typo", dist="vizkit-typo", version="2.0")
    env = {"VIZKIT_LOAD_PLUGINS": "typo"}
    with pytest.warns(host.BrokenPluginWarning, match="register_technique"):
        rows = plugin_rows(vizkit_cli("plugins", "--json", env=env))
    assert rows["typo"]["status"] == "broken"
    assert "register_technique" in rows["typo"]["error"]
    with pytest.warns(host.BrokenPluginWarning):
        pm = host.plugin_manager(environ=env)
    assert not pm.has_plugin("typo")
    assert "never" not in host.techniques(pm)
    pm.check_pending()  # nothing of it is left behind
    with pytest.raises(host.PluginError, match="register_technique"):
        host.plugin_manager(environ={**env, "VIZKIT_STRICT_PLUGINS": "1"})


RAISING_REGISTER = """
import vizkit


@vizkit.hookimpl
def register_techniques(register):
    register("not a Technique")
"""


def test_an_entry_point_whose_register_hook_fails_is_broken(install, vizkit_cli, model_file, images, tmp_path):
    install(RAISING_REGISTER, plugin="badreg", dist="vizkit-badreg")
    env = {"VIZKIT_LOAD_PLUGINS": "badreg"}
    with pytest.warns(host.BrokenPluginWarning, match="not a str"):
        rows = plugin_rows(vizkit_cli("plugins", "--json", env=env))
    assert rows["badreg"]["status"] == "broken" and "Technique" in rows["badreg"]["error"]
    with pytest.warns(host.BrokenPluginWarning):
        result = vizkit_cli("run", model_file, images, "-t", "gradcam", "-o", tmp_path / "out", env=env)
    assert result.exit_code == 0, result.output
    with pytest.raises(host.PluginError, match="badreg"):
        host.plugin_manager(environ={**env, "VIZKIT_STRICT_PLUGINS": "1"})


def test_misspelled_hook_of_a_p_plugin_is_a_usage_error(plugin_file, vizkit_cli, model_file, images, tmp_path):
    path = plugin_file("typo_local", MISSPELLED_HOOK)
    env = {"VIZKIT_LOAD_PLUGINS": ""}
    for args in (["plugins"], ["techniques"], ["run", model_file, images, *CHEAP_ACTIVATIONS, "-o", tmp_path / "out"]):
        result = vizkit_cli(*args, "-p", path, env=env)
        assert result.exit_code == 2, (args, result.output)
        assert "register_technique" in result.output
        assert "typo_local" in result.output
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- -p files and modules


@pytest.fixture(params=["path", "module"])
def local_plugin(request, plugin_file, tmp_path, monkeypatch):
    """(the -p argument, the plugin's name, its origin) for a .py file or an importable module."""
    source = technique_source("local_brightness")
    if request.param == "path":
        path = plugin_file("bright_file", source)
        return str(path), "bright_file", "path"
    folder = tmp_path / "modules"
    folder.mkdir()
    module = unique()
    (folder / f"{module}.py").write_text(source, encoding="utf-8")
    monkeypatch.syspath_prepend(str(folder))
    return module, module, "module"


def test_p_plugin_technique_is_listed_and_runs(local_plugin, vizkit_cli, model_file, images, tmp_path):
    spec, name, origin = local_plugin
    env = {"VIZKIT_LOAD_PLUGINS": ""}
    result = vizkit_cli("techniques", "-p", spec, env=env)
    assert technique_names(result) == sorted([*builtin_techniques(), "local_brightness"])
    assert f"local_brightness ({name}): Mean of the colour channels" in result.output
    options = vizkit_cli("techniques", "local_brightness", "-p", spec, env=env)
    assert options.exit_code == 0, options.output
    assert "-s local_brightness.gain=<float>" in options.output
    rows = plugin_rows(vizkit_cli("plugins", "--json", "-p", spec, env=env))
    assert rows[name]["origin"] == origin
    assert rows[name]["version"] == "local"
    assert rows[name]["techniques"] == ["local_brightness"]

    out = tmp_path / "out"
    result = vizkit_cli("run", model_file, images, "-p", spec, "-t", "local_brightness", "-o", out, env=env)
    assert result.exit_code == 0, result.output
    [technique] = report_json(out)["techniques"]
    assert (technique["name"], technique["plugin"], technique["status"]) == ("local_brightness", name, "ok")
    assert len(technique["artifacts"]) == 2


def test_run_options_plugins_in_the_python_api(plugin_file, model_file, images, tmp_path, monkeypatch):
    monkeypatch.setenv("VIZKIT_LOAD_PLUGINS", "")
    path = plugin_file("api_bright", technique_source("api_brightness"))
    options = RunOptions(techniques=["api_brightness"], settings={"api_brightness": {"gain": 2}}, plugins=[str(path)])
    report, index = run_report(str(model_file), [images], options, tmp_path / "out")
    assert index.is_file()
    [technique] = report.techniques
    assert (technique.plugin, technique.status, technique.params) == ("api_bright", "ok", {"gain": 2.0})


@pytest.mark.parametrize("command", ["plugins", "techniques", "run"])
def test_p_with_a_missing_file_is_a_usage_error(command, vizkit_cli, model_file, images, tmp_path):
    args = [command] if command != "run" else ["run", model_file, images, *CHEAP_ACTIVATIONS, "-o", tmp_path / "out"]
    result = vizkit_cli(*args, "-p", "no_such_plugin.py")
    assert result.exit_code == 2
    assert "-p no_such_plugin.py: no such file" in result.output


def test_p_with_a_missing_module_is_a_usage_error(vizkit_cli):
    result = vizkit_cli("plugins", "-p", "no_such_vizkit_plugin_module")
    assert result.exit_code == 2
    assert "-p no_such_vizkit_plugin_module: cannot load this plugin" in result.output
    assert "ModuleNotFoundError" in result.output


def test_p_with_a_file_that_raises_is_a_usage_error(plugin_file, vizkit_cli):
    path = plugin_file("raising", BROKEN_ON_IMPORT)
    result = vizkit_cli("plugins", "-p", path)
    assert result.exit_code == 2
    assert f"-p {path}: cannot load this plugin: RuntimeError: boom" in result.output


def test_two_plugins_with_the_same_technique_name_stop_a_run(plugin_file, vizkit_cli, model_file, images, tmp_path):
    first = plugin_file("first_clash", technique_source("twin"))
    second = plugin_file("second_clash", technique_source("twin"))
    result = vizkit_cli("run", model_file, images, "-p", first, "-p", second, "-t", "twin", "-o", tmp_path / "out")
    assert result.exit_code == 2
    assert "technique 'twin' is registered by two plugins, second_clash and first_clash" in result.output
    assert "--disable-plugin" in result.output
    assert not (tmp_path / "out").exists()


def test_technique_name_clash_with_a_builtin_names_both(plugin_file, vizkit_cli, model_file, images, tmp_path):
    path = plugin_file("my_filters", technique_source("filters"))
    result = vizkit_cli("run", model_file, images, "-p", path, *CHEAP_FILTERS, "-o", tmp_path / "out")
    assert result.exit_code == 2
    assert "technique 'filters' is registered by two plugins, my_filters and vizkit.plugins.filters" in result.output


@pytest.mark.parametrize("command", ["techniques", "plugins"])
def test_technique_name_clash_is_a_usage_error_in_listing_commands(command, plugin_file):
    """Not only `run`: the listing commands also stop with exit 2 and both plugin names."""
    first = plugin_file("first_clash", technique_source("twin"))
    second = plugin_file("second_clash", technique_source("twin"))
    result = invoke_catching(command, "-p", first, "-p", second)
    no_traceback(result)
    assert result.exit_code == 2
    assert "first_clash" in result.output and "second_clash" in result.output


@pytest.mark.parametrize("case", ["same file stem in two folders", "a built-in again"])
def test_p_naming_an_already_registered_plugin_is_no_crash(case, plugin_file):
    """BUG: a second plugin of the same name raises pluggy's ValueError, uncaught."""
    if case == "a built-in again":
        args = ["-p", "vizkit.plugins.filters"]
    else:
        one = plugin_file("plugin", technique_source("team_one"), subfolder="team1")
        two = plugin_file("plugin", technique_source("team_two"), subfolder="team2")
        args = ["-p", one, "-p", two]
    result = invoke_catching("techniques", *args, env={"VIZKIT_LOAD_PLUGINS": ""})
    no_traceback(result)
    assert result.exit_code in (0, 2), result.output


# --------------------------------------------------------------------------- model loaders


def test_plugin_model_loader_runs_a_report(plugin_file, vizkit_cli, images, tmp_path):
    path = plugin_file("fake_zoo", loader_source())
    out = tmp_path / "out"
    result = vizkit_cli("run", "fake:anything", images, "-p", path, *CHEAP_ACTIVATIONS, "-o", out)
    assert result.exit_code == 0, result.output
    data = report_json(out)
    assert data["model"]["source"] == "fake:anything"
    assert data["model"]["name"] == "fake_anything"  # the loader got the rest of the spec
    assert data["model"]["sha256"] is None
    assert [t["status"] for t in data["techniques"]] == ["ok"]
    row = next(p for p in data["plugins"] if p["name"] == "fake_zoo")
    assert row["hooks"] == ["register_model_loaders"]


def test_plugin_model_loader_from_an_installed_plugin(install, vizkit_cli):
    install(loader_source("zoo"), plugin="zooplug", dist="vizkit-zoo")
    result = vizkit_cli("layers", "zoo:x", "--json", env={"VIZKIT_LOAD_PLUGINS": "zooplug"})
    assert result.exit_code == 0, result.output
    paths = [row["path"] for row in json.loads(result.output)]
    assert paths == ["conv1", "pool1", "conv2", "gap", "predictions"]


def test_vizkit_layers_with_a_plugin_scheme(plugin_file, vizkit_cli):
    path = plugin_file("fake_zoo", loader_source())
    result = vizkit_cli("layers", "fake:x", "-p", path)
    assert result.exit_code == 0, result.output
    assert re.search(r"^conv1\s+Conv2D", result.output, re.M)
    assert re.search(r"^conv2\s+Conv2D", result.output, re.M)


def test_a_failing_model_loader_is_a_usage_error(plugin_file, vizkit_cli, images, tmp_path):
    path = plugin_file("fake_zoo", loader_source())
    out = tmp_path / "out"
    result = vizkit_cli("run", "fake:bad", images, "-p", path, *CHEAP_ACTIVATIONS, "-o", out)
    assert result.exit_code == 2
    assert "the fake zoo has no model called 'bad'" in result.output
    assert "fake:" in result.output
    assert not out.exists()
    result = vizkit_cli("layers", "fake:bad", "-p", path)
    assert result.exit_code == 2
    assert "the fake zoo has no model called 'bad'" in result.output


def test_without_the_plugin_the_scheme_is_unknown(vizkit_cli, images, tmp_path):
    result = vizkit_cli("run", "fake:anything", images, *CHEAP_ACTIVATIONS, "-o", tmp_path / "out")
    assert result.exit_code == 2


@pytest.mark.parametrize("command", ["run", "layers"])
def test_two_loaders_for_one_scheme_are_a_usage_error(command, plugin_file, images, tmp_path):
    """BUG: a model-scheme clash escapes as an uncaught PluginError (run and layers)."""
    one = plugin_file("zoo_one", loader_source())
    two = plugin_file("zoo_two", loader_source())
    args = ["run", "fake:x", images, *CHEAP_ACTIVATIONS, "-o", tmp_path / "out"] if command == "run" else ["layers", "fake:x"]
    result = invoke_catching(*args, "-p", one, "-p", two)
    no_traceback(result)
    assert result.exit_code == 2
    assert "model scheme 'fake' is registered by two plugins, zoo_two and zoo_one" in result.output


# --------------------------------------------------------------------------- report hooks

DECORATIONS = '''
import json
from pathlib import Path

import vizkit
from vizkit.extension import ReportSection


@vizkit.hookimpl
def report_sections(report):
    return [ReportSection(
        "Deco summary",
        "<p class='deco'>DECO-HTML for %d images</p>" % len(report.images),
        data={"images": len(report.images), "techniques": [t.name for t in report.techniques]},
    )]


@vizkit.hookimpl
def report_css():
    return ".deco { color: rebeccapurple; } /* DECO-CSS */"


@vizkit.hookimpl
def report_templates():
    return TEMPLATES


@vizkit.hookimpl
def report_written(report, outdir, index):
    with open(LOG, "a", encoding="utf-8") as stream:
        stream.write(json.dumps({
            "index": str(index),
            "outdir": str(outdir),
            "index_exists": Path(index).is_file(),
            "json_exists": (Path(outdir) / "report.json").is_file(),
            "techniques": [t.name for t in report.techniques],
        }) + "\\n")
'''


def test_report_hooks_add_section_css_template_and_get_called(plugin_file, vizkit_cli, model_file, images, tmp_path):
    templates = tmp_path / "templates"
    templates.mkdir()
    (templates / "report.html").write_text(
        '{% extends "vizkit/report.html" %}{% block footer %}<footer>CUSTOM-FOOTER</footer>{% endblock %}',
        encoding="utf-8",
    )
    log = tmp_path / "written.log"
    path = plugin_file("deco", f"TEMPLATES = {str(templates)!r}\nLOG = {str(log)!r}\n" + DECORATIONS)
    out = tmp_path / "out"
    result = vizkit_cli("run", model_file, images, "-p", path, *CHEAP_ACTIVATIONS, "-o", out,
                        env={"VIZKIT_LOAD_PLUGINS": ""})
    assert result.exit_code == 0, result.output
    html = (out / "index.html").read_text(encoding="utf-8")

    # the section: after the techniques, before the environment, its html as it is
    assert "<h2>Deco summary</h2>" in html
    assert "<p class='deco'>DECO-HTML for 2 images</p>" in html
    assert html.index('id="technique-activations"') < html.index("Deco summary") < html.index('id="environment"')
    # the CSS: inside <style>, after vizkit's own
    style = html[html.index("<style>") + len("<style>") : html.index("</style>")]
    assert style.rstrip().endswith(".deco { color: rebeccapurple; } /* DECO-CSS */")
    assert len(style) > 200  # vizkit's stylesheet is still there
    # the template: only the footer changed
    assert "<footer>CUSTOM-FOOTER</footer>" in html
    assert html.count("<footer") == 1
    assert 'id="model"' in html and 'id="images"' in html and 'id="environment"' in html
    assert "<code>tiny</code>" in html  # the header block

    data = report_json(out)
    assert data["sections"] == [
        {"title": "Deco summary", "data": {"images": 2, "techniques": ["activations"]}}
    ]
    assert data["plugin_errors"] == []
    row = next(p for p in data["plugins"] if p["name"] == "deco")
    assert row["hooks"] == ["report_css", "report_sections", "report_templates", "report_written"]

    calls = [json.loads(line) for line in log.read_text(encoding="utf-8").splitlines()]
    assert len(calls) == 1
    [call] = calls
    assert Path(call["index"]) == out / "index.html"
    assert Path(call["outdir"]) == out
    assert call["index_exists"] and call["json_exists"]
    assert call["techniques"] == ["activations"]


def test_a_raising_report_sections_hook_does_not_stop_the_others(plugin_file, vizkit_cli, model_file, images, tmp_path):
    bad = plugin_file("bad_sections", textwrap.dedent('''
        import vizkit

        @vizkit.hookimpl
        def report_sections(report):
            raise RuntimeError("section exploded")
    '''))
    good = plugin_file("good_sections", section_source("Good section", "<p>GOOD-HTML</p>"))
    out = tmp_path / "out"
    result = vizkit_cli("run", model_file, images, "-p", bad, "-p", good, *CHEAP_ACTIVATIONS, "-o", out,
                        env={"VIZKIT_LOAD_PLUGINS": ""})
    assert result.exit_code == 1, result.output
    assert "section exploded" in result.output  # printed on stderr
    html = (out / "index.html").read_text(encoding="utf-8")
    assert "<h2>Good section</h2>" in html and "<p>GOOD-HTML</p>" in html
    assert 'id="plugin-errors"' in html
    assert "section exploded" in html
    data = report_json(out)
    assert [s["title"] for s in data["sections"]] == ["Good section"]
    [error] = data["plugin_errors"]
    assert "bad_sections" in error and "report_sections" in error
    assert "RuntimeError: section exploded" in error
    assert [t["status"] for t in data["techniques"]] == ["ok"]


def test_a_raising_report_written_hook_keeps_the_report(plugin_file, vizkit_cli, model_file, images, tmp_path):
    path = plugin_file("bad_upload", textwrap.dedent('''
        import vizkit

        @vizkit.hookimpl
        def report_written(report, outdir, index):
            raise ConnectionError("upload server unreachable")
    '''))
    out = tmp_path / "out"
    result = vizkit_cli("run", model_file, images, "-p", path, *CHEAP_ACTIVATIONS, "-o", out,
                        env={"VIZKIT_LOAD_PLUGINS": ""})
    assert result.exit_code == 1, result.output
    assert "upload server unreachable" in result.output
    assert "bad_upload" in result.output
    assert (out / "index.html").is_file() and (out / "report.json").is_file()


# --------------------------------------------------------------------------- config files

FILTERS_TOML = "[filters]\ncount = 2\nsteps = 1\nsize = 16\n"


def test_config_file_sets_technique_options(vizkit_cli, model_file, images, tmp_path):
    Path("vizkit.toml").write_text(FILTERS_TOML, encoding="utf-8")
    out = tmp_path / "out"
    result = vizkit_cli("run", model_file, images, "-t", "filters", "--config", "vizkit.toml", "-o", out)
    assert result.exit_code == 0, result.output
    [technique] = report_json(out)["techniques"]
    assert (technique["params"]["count"], technique["params"]["steps"], technique["params"]["size"]) == (2, 1, 16)

    out = tmp_path / "out2"
    result = vizkit_cli("run", model_file, images, "-t", "filters", "--config", "vizkit.toml",
                        "-s", "filters.count=3", "-o", out)
    assert result.exit_code == 0, result.output
    [technique] = report_json(out)["techniques"]
    assert (technique["params"]["count"], technique["params"]["steps"], technique["params"]["size"]) == (3, 1, 16)


def test_pyproject_tool_vizkit_in_the_current_directory(vizkit_cli, model_file, images, tmp_path):
    Path("pyproject.toml").write_text(
        '[project]\nname = "somebody"\n\n[tool.vizkit.gradcam]\nalpha = 0.7\n', encoding="utf-8"
    )
    out = tmp_path / "out"
    result = vizkit_cli("run", model_file, images, "-t", "gradcam", "-o", out)
    assert result.exit_code == 0, result.output
    [technique] = report_json(out)["techniques"]
    assert technique["params"]["alpha"] == 0.7
    assert technique["status"] == "ok"


def test_pyproject_settings_of_a_technique_not_selected_do_not_stop_a_run(vizkit_cli, model_file, images, tmp_path):
    """BUG: options configured for gradcam make every run without -t gradcam fail."""
    Path("pyproject.toml").write_text("[tool.vizkit.gradcam]\nalpha = 0.7\n", encoding="utf-8")
    out = tmp_path / "out"
    result = vizkit_cli("run", model_file, images, *CHEAP_ACTIVATIONS, "-o", out)
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize("value", ['"many"', "1.5", "true"])
def test_config_value_of_the_wrong_type(value, vizkit_cli, model_file, images, tmp_path):
    Path("vizkit.toml").write_text(f"[filters]\ncount = {value}\n", encoding="utf-8")
    out = tmp_path / "out"
    result = vizkit_cli("run", model_file, images, "-t", "filters", "--config", "vizkit.toml", "-o", out)
    assert result.exit_code == 2
    assert "filters.count" in result.output
    assert "not a valid int" in result.output
    assert not out.exists()


def test_config_with_an_unknown_technique(vizkit_cli, model_file, images, tmp_path):
    Path("vizkit.toml").write_text("[gradkam]\nalpha = 0.5\n", encoding="utf-8")
    result = vizkit_cli("run", model_file, images, "--config", "vizkit.toml", "-o", tmp_path / "out",
                        env={"VIZKIT_LOAD_PLUGINS": ""})
    assert result.exit_code == 2
    assert "'gradkam'" in result.output
    for name in ("activations", "filters", "gradcam"):
        assert name in result.output
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("filename", "text"),
    [
        ("vizkit.toml", "[filters\ncount = 2\n"),
        ("vizkit.toml", "filters = 3\n"),
        ("pyproject.toml", "[tool.vizkit]\nfilters = = 3\n"),
    ],
)
def test_malformed_config_is_a_usage_error(filename, text, vizkit_cli, model_file, images, tmp_path):
    Path(filename).write_text(text, encoding="utf-8")
    config = ["--config", filename] if filename == "vizkit.toml" else []
    result = vizkit_cli("run", model_file, images, *CHEAP_FILTERS, *config, "-o", tmp_path / "out")
    assert result.exit_code == 2
    assert filename in result.output
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- docs


def test_every_hookspec_is_documented_in_docs_plugins_md():
    specs = sorted(
        name for name, value in vars(hookspecs).items() if callable(value) and hasattr(value, "vizkit_spec")
    )
    assert {"register_techniques", "register_model_loaders", "report_sections", "report_css",
            "report_templates", "report_written"} <= set(specs)
    docs = REPO / "docs" / "plugins.md"
    assert docs.is_file(), f"{docs} is missing"
    headings = set(re.findall(r"^## (\S+)\s*$", docs.read_text(encoding="utf-8"), flags=re.MULTILINE))
    missing = [name for name in specs if name not in headings]
    assert not missing, f"hooks without a '## <name>' section in docs/plugins.md: {missing}"


# --------------------------------------------------------------------------- the pytest kit

KIT_TESTS = '''
import json

import numpy as np

import vizkit
from vizkit import host
from vizkit.technique import Artifact, Technique


class Brightness:
    @staticmethod
    def run(context):
        return [
            Artifact(image.id, image.array.mean(axis=-1), image.array.mean(axis=-1).astype(np.uint8), image_id=image.id)
            for image in context.images
        ]

    @vizkit.hookimpl
    def register_techniques(self, register):
        register(Technique("kit_brightness", self.run, "mean of the channels"))


def test_plugin_end_to_end(vizkit_plugin, vizkit_cli, vizkit_model_file, vizkit_images, tmp_path):
    vizkit_plugin(Brightness(), name="kit-brightness")
    result = vizkit_cli("run", vizkit_model_file, vizkit_images, "-t", "kit_brightness", "-o", tmp_path / "out")
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    [technique] = report["techniques"]
    assert (technique["plugin"], technique["status"]) == ("kit-brightness", "ok")
    assert len(technique["artifacts"]) == len(report["images"]) == 3
    row = next(p for p in report["plugins"] if p["name"] == "kit-brightness")
    assert row["origin"] == "test"


def test_the_plugin_is_gone_after_its_test(vizkit_cli):
    result = vizkit_cli("techniques")
    assert result.exit_code == 0, result.output
    assert "kit_brightness" not in result.output


def test_context_runs_a_technique_directly(vizkit_context):
    artifacts = Brightness.run(vizkit_context())
    assert len(artifacts) == 3
    assert artifacts[0].picture.shape == (32, 32)
'''


def test_the_pytest_kit_runs_a_plugin_end_to_end(pytester, monkeypatch):
    monkeypatch.setenv("VIZKIT_LOAD_PLUGINS", "")  # the built-ins and the test plugin only
    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "2")
    pytester.makepyfile(test_kit=KIT_TESTS)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-p", "no:randomly", timeout=240)
    result.assert_outcomes(passed=3)


# --------------------------------------------------------------------------- plugins that exit


EXITS_ON_IMPORT = '''
import sys
sys.exit(5)
'''

EXITS_IN_HOOKS = '''
import sys

import numpy as np
import vizkit
from vizkit import Artifact, Technique


class Quit(BaseException):
    """Not an Exception at all."""


def run(context):
    sys.exit(0)


def run_batch(context, batch):
    raise Quit("a BaseException of the plugin's own")


@vizkit.hookimpl
def register_techniques(register):
    register(Technique("quitter", run=run, description="Calls sys.exit(0)."))
    register(Technique("baseexc", run_batch=run_batch, description="Raises a BaseException subclass."))


@vizkit.hookimpl
def report_sections(report):
    raise SystemExit(3)
'''


def test_a_plugin_calling_sys_exit_on_import_is_broken_not_the_end(install, vizkit_cli, model_file, images, tmp_path):
    install(EXITS_ON_IMPORT, plugin="exiter", dist="vizkit-exiter")
    env = {"VIZKIT_LOAD_PLUGINS": "exiter"}
    with pytest.warns(host.BrokenPluginWarning, match="SystemExit: 5"):
        rows = plugin_rows(vizkit_cli("plugins", "--json", env=env))
    assert rows["exiter"]["status"] == "broken"
    with pytest.warns(host.BrokenPluginWarning):
        result = vizkit_cli("run", model_file, images, *CHEAP_ACTIVATIONS, "-o", tmp_path / "out", env=env)
    assert result.exit_code == 0, result.output
    assert (tmp_path / "out" / "index.html").is_file()


def test_sys_exit_and_base_exceptions_in_techniques_and_hooks_are_plugin_errors(plugin_file, vizkit_cli, model_file, images, tmp_path):
    path = plugin_file("exits", EXITS_IN_HOOKS)
    out = tmp_path / "out"
    result = vizkit_cli("run", model_file, images, "-p", path, "-t", "quitter", "-t", "baseexc", *CHEAP_ACTIVATIONS,
                        "-o", out, env={"VIZKIT_LOAD_PLUGINS": ""})
    assert result.exit_code == 1, result.output  # the report is written; parts failed
    report = report_json(out)
    status = {t["name"]: (t["status"], t["error"]) for t in report["techniques"]}
    assert status["quitter"] == ("error", "SystemExit: 0")
    baseexc = next(t for t in report["techniques"] if t["name"] == "baseexc")
    assert baseexc["status"] == "error" and len(baseexc["image_errors"]) == len(report["images"])
    assert all("Quit: a BaseException of the plugin's own" in e["error"] for e in baseexc["image_errors"])
    assert status["activations"][0] == "ok"
    assert any("SystemExit: 3" in error for error in report["plugin_errors"])


def test_plugin_css_cannot_close_the_style_element(plugin_file, vizkit_cli, model_file, images, tmp_path):
    path = plugin_file("sneaky_css", '''
import vizkit


@vizkit.hookimpl
def report_css():
    return "body { color: red } </STYLE ><script>alert(1)</script><style>"
''')
    out = tmp_path / "out"
    result = vizkit_cli("run", model_file, images, "-p", path, *CHEAP_ACTIVATIONS, "-o", out, env={"VIZKIT_LOAD_PLUGINS": ""})
    assert result.exit_code == 0, result.output
    html = (out / "index.html").read_text()
    style = html[html.index("<style>") : html.index("</style>")]
    assert "body { color: red }" in style and "alert(1)" in style  # still inside the stylesheet
    assert "<script>" not in html.replace(style, "")
