"""Progress on stderr: a Click progress bar per step on a terminal, one line per step when
piped, nothing with -q; and the Python API's ``progress`` callback. Real tiny models,
real image files; the terminal is a stream that says it is one (Click draws its bar on
any stream whose ``isatty()`` is true)."""

from __future__ import annotations

import io
import json
import re

import numpy as np
import pytest
from click.testing import CliRunner

import vizkit
from conftest import PickyTechnique, build_tiny, write_image
import vizkit.progress as progress_module
from vizkit import ExitCode, RunOptions, Technique
from vizkit.cli import main
from vizkit.progress import Bar, Lines, Progress, Step, for_stderr, shorten

#: Keeps every technique to well under a second on the tiny model.
CHEAP = ["-s", "filters.count=4", "-s", "filters.steps=3", "-s", "filters.size=32"]
LINE = r"\d+(\.\d+)? s"  # a duration
RATE = r"\(\d+\.\d images/s\)"


class Terminal(io.StringIO):
    """A stream that is a terminal, as far as Click and vizkit can tell."""

    def isatty(self) -> bool:
        return True


def invoke(*args, obj=None):
    """``vizkit ARGS``, in process; color=True, so that Click writes its escape codes as
    on a terminal (CliRunner strips them otherwise)."""
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False, obj=obj, color=True)


def screen(drawn: str) -> list[str]:
    """What a terminal shows at the end: each line as its last ``\\r`` redraw left it,
    without Click's cursor codes."""
    drawn = re.sub(r"\x1b\[\?25[lh]", "", drawn).replace("\x1b[K", "")
    return [line.rsplit("\r", 1)[-1].rstrip() for line in drawn.split("\n") if line.rsplit("\r", 1)[-1].strip()]


@pytest.fixture(scope="module")
def pictures(workdir):
    """Three real image files."""
    folder = workdir / "pictures"
    folder.mkdir()
    for n, name in enumerate(["a.png", "b.jpg", "c.png"]):
        write_image(folder / name, seed=n + 1)
    return folder


@pytest.fixture
def terminal(monkeypatch):
    """stderr is a terminal (100 columns) for the progress display."""
    stream = Terminal()
    monkeypatch.setattr(progress_module, "stderr", lambda: stream)
    monkeypatch.setenv("COLUMNS", "100")
    return stream


PLUGINS = {"plugins": [("failing", PickyTechnique("b", boom=True))]}


# --------------------------------------------------------------------------- piped


def test_piped_run_prints_one_line_per_technique_and_metric(model_file, pictures, tmp_path):
    result = invoke("run", model_file, pictures, "-t", "activations", "-t", "gradcam", "-t", "filters",
                    "-m", "faithfulness", "-s", "faithfulness.steps=4", *CHEAP,
                    "-s", "activations.max_channels=8", "-o", tmp_path / "out")
    assert result.exit_code == ExitCode.OK, result.output
    lines = result.stderr.splitlines()
    assert "\r" not in result.stderr and "[#" not in result.stderr  # no bar when piped
    patterns = [
        rf"vizkit: reading images: 3 images in {LINE} {RATE}",
        rf"vizkit: activations: 3 images in {LINE} {RATE}",
        rf"vizkit: gradcam: 3 images in {LINE} {RATE}",
        rf"vizkit: filters: done in {LINE}",
        rf"vizkit: faithfulness: 1 technique in {LINE}",  # the one comparable technique
    ]
    assert len(lines) == len(patterns), result.stderr
    for line, pattern in zip(lines, patterns):
        assert re.fullmatch(pattern, line), (line, pattern)


def test_quiet_prints_nothing(model_file, pictures, tmp_path):
    result = invoke("run", model_file, pictures, "-t", "gradcam", "-t", "filters", *CHEAP, "--no-metrics", "-q",
                    "-o", tmp_path / "out")
    assert result.exit_code == ExitCode.OK, result.output
    assert result.stderr == ""
    assert result.stdout.strip() == str(tmp_path / "out" / "index.html")


def test_quiet_still_prints_failures(model_file, pictures, tmp_path):
    result = invoke("run", model_file, pictures, "-t", "picky", "-q", "-o", tmp_path / "out", obj=PLUGINS)
    assert result.exit_code == ExitCode.FAILURES, result.output
    assert result.stderr.splitlines() == ["vizkit: technique picky failed on " f"{pictures / 'b.jpg'}: ValueError: b is not welcome"]


def test_piped_failing_techniques_end_their_lines_and_say_so(model_file, pictures, tmp_path):
    result = invoke("run", model_file, pictures, "-t", "boom", "-t", "picky", "-t", "gradcam", "--no-metrics",
                    "-o", tmp_path / "out", obj=PLUGINS)
    assert result.exit_code == ExitCode.FAILURES, result.output
    lines = result.stderr.splitlines()
    assert lines[0].startswith("vizkit: reading images: 3 images in ")
    assert lines[1] == "vizkit: technique boom failed: RuntimeError: the plugin broke"
    assert re.fullmatch(rf"vizkit: boom: failed after {LINE}", lines[2]), lines[2]
    assert lines[3] == f"vizkit: technique picky failed on {pictures / 'b.jpg'}: ValueError: b is not welcome"
    assert re.fullmatch(rf"vizkit: picky: 3 images in {LINE} {RATE}; 1 image\(s\) failed", lines[4]), lines[4]
    assert re.fullmatch(rf"vizkit: gradcam: 3 images in {LINE} {RATE}", lines[5]), lines[5]  # the run went on
    assert len(lines) == 6, result.stderr
    statuses = {t["name"]: t["status"] for t in json.loads((tmp_path / "out" / "report.json").read_text())["techniques"]}
    assert statuses == {"boom": "error", "picky": "partial", "gradcam": "ok"}


class Interrupting:
    """A technique that is Ctrl-C'ed on its second batch."""

    @staticmethod
    def run_batch(context, batch):
        if batch.images[0].id != "a":
            raise KeyboardInterrupt
        return []

    @vizkit.hookimpl
    def register_techniques(self, register):
        register(Technique("slow", run_batch=Interrupting.run_batch, description="interrupted",
                           options=(vizkit.Option("batch", int, 1, "images per batch"),)))


def test_ctrl_c_ends_the_line_before_saying_interrupted(model_file, pictures, tmp_path):
    result = invoke("run", model_file, pictures, "-t", "slow", "-o", tmp_path / "out",
                    obj={"plugins": [("slow", Interrupting())]})
    assert result.exit_code == ExitCode.INTERRUPTED, result.output
    lines = result.stderr.splitlines()
    assert re.fullmatch(rf"vizkit: slow: interrupted after 1 of 3 images in {LINE}", lines[-2]), lines
    assert lines[-1] == "vizkit: interrupted; no report was written"


# --------------------------------------------------------------------------- terminal


def test_terminal_run_draws_a_bar_per_step_that_reaches_the_total(model_file, pictures, tmp_path, terminal):
    result = invoke("run", model_file, pictures, "-t", "gradcam", "-t", "filters", *CHEAP, "--no-metrics",
                    "-o", tmp_path / "out")
    assert result.exit_code == ExitCode.OK, result.output
    drawn = terminal.getvalue()
    assert "\x1b[?25l" in drawn and drawn.endswith("\n")  # Click drew bars, and gave the cursor back
    shown = screen(drawn)
    assert shown[0].startswith("vizkit: loading model ") and shown[0].endswith("tiny.keras")
    assert re.fullmatch(rf"reading images  \[#{{20}}\]  3/3  done in {LINE} {RATE}", shown[1]), shown[1]
    assert re.fullmatch(rf"gradcam         \[#{{20}}\]  3/3  done in {LINE} {RATE}", shown[2]), shown[2]
    assert re.fullmatch(rf"filters         done in {LINE}", shown[3]), shown[3]  # no count, no bar
    assert shown[4] == f"vizkit: writing {tmp_path / 'out'}"
    assert len(shown) == 5, shown
    assert all(len(line) < 100 for line in shown)
    # on the way: the counts went up one batch at a time, with the rate and the technique's messages
    assert re.search(r"gradcam         \[-{20}\]  0/3\r", drawn)
    assert re.search(rf"gradcam         \[#{{20}}\]  3/3  \d+\.\d images/s  3 image\(s\)", drawn)
    assert re.search(r"filters         \d+ s  conv1: filters 0-3 of 4", drawn)
    assert result.stderr == ""  # everything went to the terminal


def test_terminal_failing_technique_ends_its_bar_and_says_it_failed(model_file, pictures, tmp_path, terminal):
    result = invoke("run", model_file, pictures, "-t", "picky", "-t", "boom", "-o", tmp_path / "out", obj=PLUGINS)
    assert result.exit_code == ExitCode.FAILURES, result.output
    shown = screen(terminal.getvalue())
    assert shown[2] == f"vizkit: technique picky failed on {pictures / 'b.jpg'}: ValueError: b is not welcome"
    assert re.fullmatch(rf"picky           \[#{{20}}\]  3/3  1 image\(s\) failed; done in {LINE} {RATE}", shown[3]), shown[3]
    assert shown[4] == "vizkit: technique boom failed: RuntimeError: the plugin broke"
    assert re.fullmatch(rf"boom            failed after {LINE}", shown[5]), shown[5]
    assert shown[6].startswith("vizkit: writing ")


def test_terminal_quiet_draws_nothing(model_file, pictures, tmp_path, terminal):
    result = invoke("run", model_file, pictures, "-t", "gradcam", "--no-metrics", "-q", "-o", tmp_path / "out")
    assert result.exit_code == ExitCode.OK, result.output
    assert terminal.getvalue() == "" and result.stderr == ""


# --------------------------------------------------------------------------- Python API


class Recorder(Progress):
    """Every call, in order."""

    def __init__(self):
        self.calls = []

    def message(self, text):
        self.calls.append(("message", text))

    def start(self, name, total, unit="images"):
        self.calls.append(("start", name, total, unit))

    def advance(self, count=1):
        self.calls.append(("advance", count))

    def finish(self, status="ok", detail=None):
        self.calls.append(("finish", status, detail))


def test_api_progress_callable_still_gets_messages(pictures, tmp_path):
    messages = []
    options = RunOptions(techniques=["gradcam", "filters"], metrics=[], settings={"filters": {"count": 2, "steps": 2, "size": 32}})
    report, _ = vizkit.run(build_tiny(), [pictures], options, tmp_path / "out", progress=messages.append)
    assert not report.failed
    assert messages[0] == "loading model tiny"
    assert messages[1:5] == ["reading images: running (3 images)", f"reading images: {pictures / 'a.png'}",
                             f"reading images: {pictures / 'b.jpg'}", f"reading images: {pictures / 'c.png'}"]
    assert re.fullmatch(rf"reading images: 3 images in {LINE} {RATE}", messages[5])
    assert messages[6:8] == ["gradcam: running (3 images)", "gradcam: 3 image(s)"]
    assert re.fullmatch(rf"gradcam: 3 images in {LINE} {RATE}", messages[8])
    assert messages[9] == "filters: running"
    assert "filters: conv1: filters 0-1 of 2" in messages
    assert re.fullmatch(rf"filters: done in {LINE}", messages[-2])
    assert messages[-1] == f"writing {tmp_path / 'out'}"


def test_api_progress_object_gets_the_steps(pictures, tmp_path):
    recorder = Recorder()
    options = RunOptions(techniques=["activations", "gradcam"], metrics=["faithfulness"],
                         settings={"activations": {"batch": 2}, "faithfulness": {"steps": 4}})
    vizkit.run(build_tiny(), [pictures], options, tmp_path / "out", progress=recorder)
    steps = [call for call in recorder.calls if call[0] != "message"]
    assert steps == [
        ("start", "reading images", 3, "images"), ("advance", 1), ("advance", 1), ("advance", 1), ("finish", "ok", None),
        ("start", "activations", 3, "images"), ("advance", 2), ("advance", 1), ("finish", "ok", None),
        ("start", "gradcam", 3, "images"), ("advance", 3), ("finish", "ok", None),
        ("start", "faithfulness", 1, "techniques"), ("advance", 1), ("finish", "ok", None),
    ]
    faithfulness = recorder.calls.index(("start", "faithfulness", 1, "techniques"))
    assert recorder.calls[faithfulness + 1] == ("message", "gradcam: measuring")
    assert ("message", "gradcam: image 3/3") in recorder.calls[faithfulness:]


# --------------------------------------------------------------------------- the displays alone


def test_lines_say_how_each_step_ended():
    written = []
    lines = Lines(written.append)
    lines.message("not shown")
    lines.start("gradcam", 3)
    lines.advance(2)
    lines.finish("error", "ValueError: x")
    lines.start("filters", None)
    lines.finish("skipped", "no image could be read")
    lines.start("randomization", 2, "techniques")
    lines.advance(2)
    lines.finish("partial", "failed on 1 of 2 techniques")
    assert [re.sub(LINE, "T", line) for line in written] == [
        "gradcam: failed after 2 of 3 images in T",
        "filters: skipped: no image could be read",
        "randomization: 2 techniques in T; failed on 1 of 2 techniques",  # no rate of techniques
    ]


def test_bar_keeps_to_the_terminal_width_and_redraws_after_a_failure(monkeypatch):
    monkeypatch.setenv("COLUMNS", "70")
    stream = Terminal()
    bar = Bar(stream)
    bar.start("filters", None)
    bar.message("conv2: filters 0-63 of 64, step 120 of 40000, and a long tail of words")
    bar.error("technique filters failed on x.png: ValueError: y")
    bar.finish("ok")
    drawn = stream.getvalue()
    assert all(len(line.rsplit("\r", 1)[-1]) < 70 for line in re.sub(r"\x1b\[[?\d]*[lhK]", "", drawn).split("\n"))
    # the seconds so far, and the message without its middle: its start names the layer, its end changes
    assert re.search(r"filters         0 s  conv2: filters [^\r]*\.\.\.[^\r]*tail of words\r", drawn)
    assert "\r\x1b[Kvizkit: technique filters failed on x.png: ValueError: y\n\rfilters" in drawn
    assert screen(drawn)[-1].startswith("filters         done in ")


def test_a_message_too_long_loses_its_middle_but_keeps_its_last_part():
    message = "block10_project_conv: filters 0-63 of 64, step 112595 of 1000000000"
    assert shorten(message, len(message)) == message
    assert shorten(message, 40) == "block10_pr..., step 112595 of 1000000000"
    assert shorten("/data/photos/2024/summer/beach.jpg", 24) == "/data/p...mmer/beach.jpg"
    assert shorten(message, 12) == ""


def test_for_stderr_picks_by_terminal_and_quiet(monkeypatch):
    monkeypatch.setattr(progress_module, "stderr", lambda: Terminal())
    assert isinstance(for_stderr(False), Bar)
    assert type(for_stderr(True)) is Progress
    monkeypatch.setattr(progress_module, "stderr", lambda: io.StringIO())
    assert isinstance(for_stderr(False), Lines)


def test_step_counts_in_words():
    step = Step("gradcam", 3, "images", done=1)
    assert step.amount() == "1 of 3 images"
    step.done = 3
    assert step.amount() == "3 images"
    assert Step("m", 1, "techniques", done=1).amount() == "1 technique"
    assert np.isclose(Step("x", 1, "images").seconds, 0, atol=1)
