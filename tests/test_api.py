"""The public API: cheap imports, exit codes, option checks, per-image failures, reproducibility."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from conftest import PickyTechnique

import vizkit
from vizkit import Artifact, ExitCode, Option, OptionError, RunOptions, Technique, run


# --------------------------------------------------------------------------- start-up


NO_TENSORFLOW = textwrap.dedent('''
    import sys
    from vizkit.cli import main
    try:
        main(sys.argv[1:], prog_name="vizkit")
    except SystemExit as done:
        code = done.code
    heavy = sorted(m for m in ("tensorflow", "keras", "cv2") if m in sys.modules)
    print("HEAVY:" + ",".join(heavy), "EXIT:" + str(code), file=sys.stderr)
''')


@pytest.mark.parametrize(
    "args", [["--help"], ["run", "--help"], ["techniques"], ["techniques", "gradcam"], ["plugins", "--json"]]
)
def test_listing_commands_never_import_tensorflow(args):
    """These answer at once: no TensorFlow, Keras or OpenCV import (a new process each)."""
    done = subprocess.run([sys.executable, "-c", NO_TENSORFLOW, *args], capture_output=True, text=True, timeout=120)
    assert "HEAVY: EXIT:0" in done.stderr, done.stderr
    assert done.stdout.strip()


def test_the_public_names_import_without_tensorflow():
    code = (
        "import sys, vizkit; from vizkit import Technique, Option, Artifact, RunContext, ReportSection, "
        "ModelLoader, ExitCode, hookimpl, kit; import vizkit.plugins.gradcam, vizkit.plugins.filters, "
        "vizkit.plugins.activations; print(sorted(m for m in ('tensorflow', 'keras', 'cv2') if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.stdout.strip() == "[]", done.stderr


# --------------------------------------------------------------------------- exit codes


def test_exit_codes_are_documented_in_the_help():
    from click.testing import CliRunner

    from vizkit.cli import main

    assert [int(code) for code in ExitCode] == [0, 1, 2, 3, 4, 130]
    for args in (["--help"], ["run", "--help"]):
        text = " ".join(CliRunner().invoke(main, args).output.split())
        for meaning in ("0 all fine", "1 the report was written", "2 bad arguments", "3 internal error",
                        "4 the report could not be written", "130 interrupted"):
            assert meaning in text, (args, meaning)


def test_an_internal_error_exits_3_and_saves_the_traceback(vizkit_cli, vizkit_model_file, vizkit_images, tmp_path, monkeypatch):
    from vizkit import render

    def broken_write(*args, **kwargs):
        raise RuntimeError("renderer bug")

    monkeypatch.setattr(render, "write", broken_write)
    out = tmp_path / "out"
    result = vizkit_cli("run", vizkit_model_file, vizkit_images, "-t", "activations", "-o", out,
                        "-s", "activations.layers=conv1", env={"VIZKIT_LOAD_PLUGINS": ""})
    assert result.exit_code == ExitCode.INTERNAL_ERROR
    assert "internal error: RuntimeError: renderer bug" in result.output
    assert f"nothing was written to {out}" in result.output
    saved = Path(result.output.split("the traceback is in ")[1].split(" ")[0])
    assert "renderer bug" in saved.read_text() and "broken_write" in saved.read_text()
    saved.unlink()


# --------------------------------------------------------------------------- options


def test_option_maximum_is_enforced():
    option = Option("alpha", float, 0.4, "weight", minimum=0, maximum=1)
    assert option.parse("t", "1") == 1.0
    with pytest.raises(OptionError, match=r"t\.alpha: '1\.5' is above the maximum 1"):
        option.parse("t", "1.5")


@pytest.mark.parametrize(
    "setting, message",
    [
        ("gradcam.layer=nope", "gradcam.layer: tiny has no layer 'nope'"),
        ("gradcam.layer=gap", "gradcam.layer: layer 'gap' cannot be used for gradcam"),
        ("gradcam.class=99", "gradcam.class: class 99 is outside 0-3"),
        ("activations.layers=conv1,nope", "activations.layers: tiny has no layer 'nope'"),
    ],
)
def test_a_value_the_model_cannot_take_is_a_usage_error_before_any_work(
    setting, message, vizkit_cli, vizkit_model_file, vizkit_images, tmp_path
):
    out = tmp_path / "out"
    result = vizkit_cli("run", vizkit_model_file, vizkit_images, "-s", setting, "-o", out)
    assert result.exit_code == ExitCode.USAGE_ERROR, result.output
    assert message in result.output
    assert not out.exists()


# --------------------------------------------------------------------------- per-image results




def test_an_image_that_fails_costs_only_its_own_artifacts(vizkit_plugin, vizkit_cli, vizkit_model_file, vizkit_images, tmp_path):
    vizkit_plugin(PickyTechnique("coffee"), name="picky")
    out = tmp_path / "out"
    result = vizkit_cli("run", vizkit_model_file, vizkit_images, "-t", "picky", "-o", out, env={"VIZKIT_LOAD_PLUGINS": ""})
    assert result.exit_code == ExitCode.FAILURES, result.output
    [record] = json.loads((out / "report.json").read_text())["techniques"]
    assert record["status"] == "partial"
    assert [a["image_id"] for a in record["artifacts"]] == ["chelsea", "rocket"]
    [failure] = record["image_errors"]
    assert failure["image_id"] == "coffee" and failure["error"] == "ValueError: coffee is not welcome"
    html = (out / "index.html").read_text()
    assert "This technique failed on some images" in html and "coffee is not welcome" in html


def test_a_bad_picture_names_the_line_that_made_it():
    with pytest.raises(TypeError) as caught:
        Artifact("oops", np.zeros((2, 2)), np.zeros((2, 2), dtype=np.float32))  # this line
    assert f"test_api.py:{caught.tb.tb_lineno}" in str(caught.value)
    assert "picture must be uint8" in str(caught.value)


def test_a_technique_needs_one_runner_and_a_description():
    with pytest.raises(TypeError, match="exactly one of run= and run_batch="):
        Technique("t", description="d")
    with pytest.raises(TypeError, match="a description is required"):
        Technique("t", run=lambda context: [])


# --------------------------------------------------------------------------- reproducibility


def test_reproducible_runs_say_so_to_plugins_and_leave_timings_out(vizkit_model, vizkit_images, tmp_path, monkeypatch):
    monkeypatch.delenv("SOURCE_DATE_EPOCH", raising=False)
    seen = []

    class Watcher:
        @vizkit.hookimpl
        def register_techniques(self, register):
            register(Technique("watch", run=lambda context: seen.append(context.reproducible) or [], description="watches"))

    from vizkit import host

    pm = host.plugin_manager(environ={"VIZKIT_LOAD_PLUGINS": ""}, extra=[("watcher", Watcher())])
    report, _ = run(vizkit_model, [vizkit_images], RunOptions(techniques=["watch"], reproducible=True), tmp_path / "a", pm=pm)
    assert seen == [True]
    assert report.created.startswith("1970-01-01")
    assert report.techniques[0].duration_s is None
    report, _ = run(vizkit_model, [vizkit_images], RunOptions(techniques=["watch"]), tmp_path / "b", pm=pm)
    assert seen == [True, False] and report.techniques[0].duration_s is not None


# --------------------------------------------------------------------------- plugins that misbehave


class Misbehaving:
    """Report hooks that return the wrong things, an option check with a bug, an accepts that raises."""

    @vizkit.hookimpl
    def report_templates(self):
        return 5

    @vizkit.hookimpl
    def report_css(self):
        return ["not", "css"]

    @vizkit.hookimpl
    def report_sections(self, report):
        return "a string"

    @vizkit.hookimpl
    def register_techniques(self, register):
        def buggy_check(value, context):
            raise AttributeError("oops")

        register(Technique(
            "misbehaving", run=lambda context: [], description="misbehaves",
            options=(Option("level", int, None, "a level", check=buggy_check),),
            accepts=lambda info: info.shape[0] > 10,  # None > 10 on a free-size input: TypeError
        ))


def test_report_hooks_returning_the_wrong_things_cost_only_themselves(vizkit_plugin, vizkit_cli, vizkit_model_file, vizkit_images, tmp_path):
    vizkit_plugin(Misbehaving(), name="misbehaving")
    out = tmp_path / "out"
    result = vizkit_cli("run", vizkit_model_file, vizkit_images, "-t", "activations", "-s", "activations.layers=conv1",
                        "-o", out, env={"VIZKIT_LOAD_PLUGINS": ""})
    assert result.exit_code == ExitCode.FAILURES, result.output
    errors = json.loads((out / "report.json").read_text())["plugin_errors"]
    assert errors == [
        "hook report_sections: returned a str, not a vizkit ReportSection",
        "hook report_css: returned a list, not CSS text",
        "hook report_templates: 5 is not a folder of templates",
    ]
    assert 'id="technique-activations"' in (out / "index.html").read_text()


def test_an_option_check_with_a_bug_is_a_usage_error_naming_the_option(vizkit_plugin, vizkit_cli, vizkit_model_file, vizkit_images, tmp_path):
    vizkit_plugin(Misbehaving(), name="misbehaving")
    result = vizkit_cli("run", vizkit_model_file, vizkit_images, "-t", "misbehaving", "-s", "misbehaving.level=3",
                        "-o", tmp_path / "out", env={"VIZKIT_LOAD_PLUGINS": ""})
    assert result.exit_code == ExitCode.USAGE_ERROR
    assert "misbehaving.level: the option's check failed: AttributeError: oops" in result.output


def test_layers_survives_an_accepts_that_raises(vizkit_plugin, vizkit_cli, tmp_path):
    import keras

    inputs = keras.Input((None, None, 3))
    model = keras.Model(inputs, keras.layers.Conv2D(2, 3, name="conv")(inputs))
    model.save(tmp_path / "free.keras")
    vizkit_plugin(Misbehaving(), name="misbehaving")
    result = vizkit_cli("layers", tmp_path / "free.keras", env={"VIZKIT_LOAD_PLUGINS": ""})
    assert result.exit_code == ExitCode.OK, result.output
    assert result.output.count("misbehaving's accepts() failed") == 1
    assert "conv" in result.stdout


class Interrupting:
    @vizkit.hookimpl
    def register_techniques(self, register):
        def run_batch(context, batch):
            raise KeyboardInterrupt

        register(Technique("interrupting", run_batch=run_batch, description="the user presses Ctrl-C"))


def test_ctrl_c_is_not_an_image_failure_and_exits_130(vizkit_plugin, vizkit_cli, vizkit_model_file, vizkit_images, tmp_path):
    vizkit_plugin(Interrupting(), name="interrupting")
    out = tmp_path / "out"
    result = vizkit_cli("run", vizkit_model_file, vizkit_images, "-t", "interrupting", "-o", out, env={"VIZKIT_LOAD_PLUGINS": ""})
    assert result.exit_code == ExitCode.INTERRUPTED == 130
    assert "interrupted; no report was written" in result.output
    assert not out.exists()


def test_a_preprocessing_that_raises_fails_the_images_not_the_run(vizkit_cli, vizkit_model_file, vizkit_images, tmp_path, monkeypatch):
    module = tmp_path / "badprep.py"
    module.write_text("def prep(x):\n    raise ValueError('no such colour space')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    out = tmp_path / "out"
    result = vizkit_cli("run", vizkit_model_file, vizkit_images, "--preprocess", "badprep:prep", "-t", "gradcam", "-o", out)
    assert result.exit_code == ExitCode.FAILURES, result.output
    report = json.loads((out / "report.json").read_text())
    assert all("no such colour space" in image["error"] for image in report["images"])


def test_a_technique_name_must_work_with_dash_s():
    with pytest.raises(TypeError, match="without '.'"):
        Technique("my.technique", run=lambda context: [], description="d")


def test_gradcam_explains_the_output_of_a_model_without_logits_and_says_so(vizkit_cli, vizkit_images, tmp_path):
    import keras

    keras.utils.set_random_seed(3)
    inputs = keras.Input((32, 32, 3))
    x = keras.layers.GlobalAveragePooling2D()(keras.layers.Conv2D(4, 3, name="conv")(inputs))
    model = keras.Model(inputs, keras.layers.Activation("relu", name="relu_out")(keras.layers.Dense(3)(x)))
    model.save(tmp_path / "nologit.keras")
    out = tmp_path / "out"
    result = vizkit_cli("run", tmp_path / "nologit.keras", vizkit_images, "-t", "gradcam", "-o", out)
    assert result.exit_code == ExitCode.OK, result.output
    [record] = json.loads((out / "report.json").read_text())["techniques"]
    assert any(note.startswith("score: the model's output") for note in record["notes"])
    assert record["params"]["score"] == "logit"
