"""The plugin host calls every hook through pluggy, as pluggy documents, with isolation on top.

The plugin-author view (``pytester``): a plugin's ``tryfirst``, ``trylast`` and
``wrapper=True`` hookimpls, through the test kit's fixtures, in a pytest run of its own.
"""

from __future__ import annotations

import functools
import json

import pytest

import vizkit
from vizkit import ReportSection, Technique, host

pytest_plugins = ["pytester"]


def _technique(name: str) -> Technique:
    return Technique(name, run=lambda context: [], description=f"the {name} technique")


def Sections(title: str, **marks):
    """A report_sections plugin returning one section titled ``title``."""

    @vizkit.hookimpl(**marks)
    def report_sections(report):
        return [ReportSection(title, f"<p>{title}</p>")]

    return type("Sections", (), {"report_sections": staticmethod(report_sections)})()


def _host(*plugins):
    return host.plugin_manager(environ={"VIZKIT_LOAD_PLUGINS": ""}, extra=[(f"p{i}", p) for i, p in enumerate(plugins)])


def _titles(results) -> list[str]:
    return [section.title for sections in results for section in sections]


def test_results_follow_pluggy_order_with_tryfirst_and_trylast():
    pm = _host(Sections("last", trylast=True), Sections("first", tryfirst=True), Sections("a"), Sections("b"))
    results, errors = pm.call("report_sections", report=None)
    assert errors == []
    # pluggy: tryfirst, then the most recently registered, ..., trylast
    assert _titles(results) == ["first", "b", "a", "last"]


class Wrapper:
    """A wrapper=True hookimpl that sees every other plugin's result and extends it."""

    @vizkit.hookimpl(wrapper=True)
    def report_sections(self, report):
        results = yield
        return results + [[ReportSection(f"wrapped {len(results)}", "")]]


def test_a_wrapper_wraps_the_whole_call():
    pm = _host(Sections("a"), Wrapper(), Sections("b"))
    results, errors = pm.call("report_sections", report=None)
    assert errors == []
    assert _titles(results) == ["b", "a", "wrapped 2"]


class Raising:
    @vizkit.hookimpl
    def report_sections(self, report):
        raise RuntimeError("section exploded")


def test_a_raising_hookimpl_costs_only_its_own_result():
    pm = _host(Sections("a"), Raising(), Sections("b"), Wrapper())
    results, errors = pm.call("report_sections", report=None)
    assert _titles(results) == ["b", "a", "wrapped 2"]
    [error] = errors
    assert error.startswith("plugin p1, hook report_sections: RuntimeError: section exploded")


class Counting:
    calls = 0

    @vizkit.hookimpl
    def register_techniques(self, register):
        type(self).calls += 1
        register(_technique("counted"))


def test_register_hooks_run_once_per_host(vizkit_cli, vizkit_plugin, vizkit_model_file, vizkit_images, tmp_path):
    Counting.calls = 0
    vizkit_plugin(Counting(), name="counting")
    result = vizkit_cli("run", vizkit_model_file, vizkit_images, "-t", "counted", "-o", tmp_path / "out",
                        env={"VIZKIT_LOAD_PLUGINS": ""})
    assert result.exit_code == 0, result.output
    assert Counting.calls == 1


class Registrar:
    """Registers through a helper: the technique still belongs to this plugin."""

    @staticmethod
    def _helper(register):
        register(_technique("helped"))

    @vizkit.hookimpl(tryfirst=True)
    def register_techniques(self, register):
        self._helper(register)


class RegisterWrapper:
    @vizkit.hookimpl(wrapper=True)
    def register_techniques(self, register):
        register(_technique("from_wrapper"))
        return (yield)


def test_registrations_are_attributed_to_their_plugin_through_wrappers_and_helpers():
    pm = _host(Registrar(), RegisterWrapper())
    found = host.techniques(pm)
    assert found["helped"].plugin == "p0"
    assert found["from_wrapper"].plugin == "p1"
    assert found["activations"].plugin == "vizkit.plugins.activations"


def test_a_register_hook_that_raises_names_its_plugin():
    class Broken:
        @vizkit.hookimpl
        def register_techniques(self, register):
            register("not a technique")

    with pytest.raises(host.PluginError, match=r"plugin p0, hook register_techniques: TypeError: register\(\) takes a Technique"):
        _host(Broken())


KIT_PLUGIN = '''
import vizkit
from vizkit import ReportSection


@vizkit.hookimpl(tryfirst=True)
def report_sections(report):
    return [ReportSection("early", "<p>early</p>")]


@vizkit.hookimpl(trylast=True)
def report_css():
    return "/* late */"


class Css:
    @vizkit.hookimpl
    def report_css(self):
        return "/* normal */"


class Wrap:
    @vizkit.hookimpl(wrapper=True)
    def report_sections(self, report):
        sections = yield
        return [[ReportSection(f"{len(sections)} inner", "")]] + sections
'''

KIT_TEST = '''
import json
import myplugin


def test_hooks_as_pluggy_documents(vizkit_plugin, vizkit_cli, vizkit_model_file, vizkit_images, tmp_path):
    vizkit_plugin(myplugin.Css(), name="css")
    vizkit_plugin(myplugin, name="myplugin")
    vizkit_plugin(myplugin.Wrap(), name="wrap")
    out = tmp_path / "out"
    result = vizkit_cli("run", vizkit_model_file, vizkit_images, "-t", "activations", "-o", out,
                        "-s", "activations.layers=conv1")
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert [s["title"] for s in report["sections"]] == ["1 inner", "early"]
    html = (out / "index.html").read_text()
    assert html.index("/* normal */") < html.index("/* late */")  # trylast: called last, though registered last


def test_the_host_fixture_sees_the_plugins(vizkit_plugin, vizkit_host):
    vizkit_plugin(myplugin, name="myplugin")
    pm = vizkit_host()
    assert pm.get_plugin("myplugin") is myplugin
'''


def test_plugin_authors_see_pluggy_semantics_through_the_kit(pytester, monkeypatch):
    monkeypatch.setenv("VIZKIT_LOAD_PLUGINS", "")
    pytester.makepyfile(myplugin=KIT_PLUGIN, test_it=KIT_TEST)
    result = pytester.runpytest("-p", "no:cacheprovider", "-p", "no:randomly")
    result.assert_outcomes(passed=2)


# --------------------------------------------------------------------------- -p forms


PACKAGE_INIT = '''
import vizkit
from .techniques import TECHNIQUE


@vizkit.hookimpl
def register_techniques(register):
    register(TECHNIQUE)
'''

PACKAGE_TECHNIQUES = '''
from vizkit import Technique

TECHNIQUE = Technique("packaged", run=lambda context: [], description="from a package folder")
'''


@pytest.mark.parametrize("form", ["folder", "init file"])
def test_p_with_a_package_loads_it_as_a_package_named_after_its_folder(form, tmp_path):
    package = tmp_path / "mypkg"
    package.mkdir()
    (package / "__init__.py").write_text(PACKAGE_INIT, encoding="utf-8")
    (package / "techniques.py").write_text(PACKAGE_TECHNIQUES, encoding="utf-8")  # a relative import
    spec = str(package if form == "folder" else package / "__init__.py")
    pm = host.plugin_manager([spec], environ={"VIZKIT_LOAD_PLUGINS": ""})
    assert host.techniques(pm)["packaged"].plugin == "mypkg"
    assert pm.origins["mypkg"].where == spec


def test_p_with_a_folder_that_is_no_package_says_so(tmp_path):
    with pytest.raises(host.PluginError, match="has no __init__.py"):
        host.plugin_manager([str(tmp_path)], environ={"VIZKIT_LOAD_PLUGINS": ""})


def test_p_naming_a_loaded_plugin_module_is_a_no_op():
    pm = host.plugin_manager(["vizkit.plugins.gradcam"], environ={"VIZKIT_LOAD_PLUGINS": ""})
    assert host.techniques(pm)["gradcam"].plugin == "vizkit.plugins.gradcam"
    assert pm.origins["vizkit.plugins.gradcam"].kind == "built-in"


def test_describe_plugins_lists_hooks_techniques_and_loaders():
    rows = {row["name"]: row for row in host.describe_plugins(_host(Registrar()))}
    assert (rows["p0"]["techniques"], rows["p0"]["origin"], rows["p0"]["hooks"]) == (["helped"], "test", ["register_techniques"])
    loaders = {scheme for row in rows.values() for scheme in row["model_loaders"]}
    assert {"keras-file", "keras-application", "keras-factory", "efficientnet-lite"} <= loaders
    assert json.loads(json.dumps(rows)) == rows  # what vizkit plugins --json prints


# --------------------------------------------------------------------------- hook functions sharing code


def logged(function):
    """A decorator several plugins share: their hook functions then share its code."""

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        return function(*args, **kwargs)

    return wrapper


def _decorated_plugin(title: str, fail: bool = False):
    def report_sections(report):
        if fail:
            raise RuntimeError(f"{title} exploded")
        return [ReportSection(title, "")]

    def register_techniques(register):
        register(_technique(f"t_{title}"))

    return type("Decorated", (), {
        "report_sections": staticmethod(vizkit.hookimpl(logged(report_sections))),
        "register_techniques": staticmethod(vizkit.hookimpl(logged(register_techniques))),
    })()


def test_hook_functions_sharing_code_are_still_isolated_and_attributed():
    pm = _host(_decorated_plugin("a"), _decorated_plugin("bad", fail=True), _decorated_plugin("b"))
    results, errors = pm.call("report_sections", report=None)  # used to loop for ever
    assert _titles(results) == ["b", "a"]
    [error] = errors
    assert error.startswith("plugin p1, hook report_sections: RuntimeError: bad exploded")
    found = host.techniques(pm)
    assert {name: found[name].plugin for name in ("t_a", "t_bad", "t_b")} == {"t_a": "p0", "t_bad": "p1", "t_b": "p2"}


class ForgetfulWrapper:
    @vizkit.hookimpl(wrapper=True)
    def report_sections(self, report):
        yield  # and returns None instead of the results


def test_a_wrapper_that_returns_no_list_costs_only_itself():
    pm = _host(Sections("a"), ForgetfulWrapper(), Sections("b"))
    results, errors = pm.call("report_sections", report=None)
    assert _titles(results) == ["b", "a"]
    assert errors == ["plugin p1, hook report_sections: a wrapper returned NoneType, not the list of results"]


def test_p_with_one_file_in_two_spellings_loads_it_once(tmp_path, monkeypatch):
    plugin = tmp_path / "twice.py"
    plugin.write_text(PACKAGE_TECHNIQUES + "\nimport vizkit\n\n@vizkit.hookimpl\ndef register_techniques(register):\n    register(TECHNIQUE)\n")
    monkeypatch.chdir(tmp_path)
    pm = host.plugin_manager(["twice.py", "./twice.py", str(plugin)], environ={"VIZKIT_LOAD_PLUGINS": ""})
    assert host.techniques(pm)["packaged"].plugin == "twice"


def test_p_with_two_files_of_one_name_says_so(tmp_path):
    for folder in ("one", "two"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "same.py").write_text("")
    with pytest.raises(host.PluginError, match=r"-p .*two/same.py: a plugin named same is loaded already \(.*one/same.py\); rename one"):
        host.plugin_manager([str(tmp_path / "one" / "same.py"), str(tmp_path / "two" / "same.py")], environ={"VIZKIT_LOAD_PLUGINS": ""})
