"""The public API: cheap imports, exit codes, option checks, per-image failures, reproducibility."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

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


def test_exit_codes_are_the_documented_four():
    assert [int(code) for code in ExitCode] == [0, 1, 2, 3]
    from vizkit.cli import main
    from click.testing import CliRunner

    help_text = CliRunner().invoke(main, ["run", "--help"]).output
    assert all(f"{int(code)} " in help_text for code in ExitCode)


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
    assert f"the report in {out} may be incomplete" in result.output
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


class FailsOnOneImage:
    """run_batch that fails whenever the image ``coffee`` is in the batch."""

    @staticmethod
    def run_batch(context, batch):
        if any(image.id == "coffee" for image in batch.images):
            raise ValueError("coffee is too strong")
        return [Artifact(image.id, image.array[..., 0], image.display, image_id=image.id) for image in batch.images]

    @vizkit.hookimpl
    def register_techniques(self, register):
        register(Technique("picky", run_batch=FailsOnOneImage.run_batch, description="fails on coffee"))


def test_an_image_that_fails_costs_only_its_own_artifacts(vizkit_plugin, vizkit_cli, vizkit_model_file, vizkit_images, tmp_path):
    vizkit_plugin(FailsOnOneImage(), name="picky")
    out = tmp_path / "out"
    result = vizkit_cli("run", vizkit_model_file, vizkit_images, "-t", "picky", "-o", out, env={"VIZKIT_LOAD_PLUGINS": ""})
    assert result.exit_code == ExitCode.FAILURES, result.output
    [record] = json.loads((out / "report.json").read_text())["techniques"]
    assert record["status"] == "partial"
    assert [a["image_id"] for a in record["artifacts"]] == ["chelsea", "rocket"]
    [failure] = record["image_errors"]
    assert failure["image_id"] == "coffee" and failure["error"] == "ValueError: coffee is too strong"
    html = (out / "index.html").read_text()
    assert "This technique failed on some images" in html and "coffee is too strong" in html


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
