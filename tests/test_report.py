"""The report as written: plugin failures, determinism, escaping, atomic replacement, out folders."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import vizkit
from conftest import build_tiny, write_image
from vizkit import host, runner
from vizkit.cli import main
from vizkit.technique import Technique

CHEAP = [
    "-s", "filters.count=4",
    "-s", "filters.steps=3",
    "-s", "filters.size=32",
    "-s", "activations.max_channels=8",
]
CHEAP_SETTINGS = {
    "filters": {"count": "4", "steps": "3", "size": "32"},
    "activations": {"max_channels": "8"},
}
EPOCH = 1_600_000_000  # 2020-09-13T12:26:40Z


def invoke(*args, env=None):
    return CliRunner().invoke(main, [str(a) for a in args], env=env, catch_exceptions=False)


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("model") / "tiny.keras"
    build_tiny().save(path)
    return path


@pytest.fixture(scope="module")
def pictures(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pictures")
    write_image(folder / "a.png", seed=1)
    write_image(folder / "b.jpg", seed=2)
    return folder


@pytest.fixture
def no_epoch(monkeypatch):
    monkeypatch.delenv("SOURCE_DATE_EPOCH", raising=False)


def read_json(outdir: Path) -> dict:
    return json.loads((outdir / "report.json").read_text(encoding="utf-8"))


def snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(folder.iterdir())}


# -- a failing third-party technique ------------------------------------------


def _explode(context):
    raise RuntimeError("boom <i>from the plugin</i>")


class BrokenPlugin:
    @vizkit.hookimpl
    def register_techniques(self, register):
        register(Technique(name="broken", run=_explode, description="Always fails."))


def test_failing_plugin_technique_keeps_the_rest_of_the_report(tmp_path, model_file, pictures, no_epoch):
    pm = host.plugin_manager()
    pm.register(BrokenPlugin(), name="broken-plugin")
    outdir = tmp_path / "out"
    options = runner.RunOptions(settings=CHEAP_SETTINGS)

    report, index = runner.run(str(model_file), [pictures], options, outdir, pm=pm)

    assert index == outdir / "index.html" and index.is_file()
    assert report.failed is True
    data = read_json(outdir)
    statuses = {t["name"]: t["status"] for t in data["techniques"]}
    assert statuses == {"activations": "ok", "broken": "error", "filters": "ok", "gradcam": "ok"}
    (broken,) = [t for t in data["techniques"] if t["name"] == "broken"]
    assert broken["plugin"] == "broken-plugin"
    assert "RuntimeError" in broken["error"] and "boom <i>from the plugin</i>" in broken["error"]
    # where it was raised, with file names only (no folders: reports stay comparable)
    assert "test_report.py" in broken["traceback"] and "in _explode" in broken["traceback"]
    assert str(Path(__file__).parent) not in broken["traceback"]
    assert "_explode" in broken["traceback"]
    assert broken["artifacts"] == []
    assert all(t["artifacts"] for t in data["techniques"] if t["name"] != "broken")
    assert all(image["status"] == "ok" for image in data["images"])

    html = index.read_text(encoding="utf-8")
    assert 'id="technique-broken"' in html
    assert "boom &lt;i&gt;from the plugin&lt;/i&gt;" in html
    assert "<i>from the plugin</i>" not in html
    assert "_explode" in html  # the traceback is shown too


# -- determinism ----------------------------------------------------------------


def test_source_date_epoch_gives_byte_identical_reports(tmp_path, model_file, pictures, monkeypatch):
    monkeypatch.setenv("SOURCE_DATE_EPOCH", str(EPOCH))
    first, second = tmp_path / "first", tmp_path / "second"
    for outdir in (first, second):
        result = invoke("run", model_file, pictures, "-o", outdir, "--save-arrays", *CHEAP)
        assert result.exit_code == 0, result.output

    for name in ("index.html", "report.json", "arrays.npz"):
        assert (first / name).read_bytes() == (second / name).read_bytes(), name

    data = read_json(first)
    assert data["created"] == datetime.fromtimestamp(EPOCH, tz=timezone.utc).isoformat()
    assert data["created"].startswith("2020-09-13T12:26:40")
    assert data["techniques"] and all(t["duration_s"] is None for t in data["techniques"])
    assert data["created"] in (first / "index.html").read_text(encoding="utf-8")


def test_durations_are_numbers_without_source_date_epoch(tmp_path, model_file, pictures, no_epoch):
    outdir = tmp_path / "out"
    result = invoke("run", model_file, pictures, "-o", outdir, "-t", "gradcam", "-t", "activations")
    assert result.exit_code == 0, result.output
    data = read_json(outdir)
    for record in data["techniques"]:
        assert isinstance(record["duration_s"], (int, float)) and not isinstance(record["duration_s"], bool)
        assert record["duration_s"] >= 0
    created = datetime.fromisoformat(data["created"])
    assert abs((datetime.now(tz=timezone.utc) - created).total_seconds()) < 600


# -- escaping -------------------------------------------------------------------


SCRIPT = "<script>alert(1)</script>"
ESCAPED_SCRIPT = "&lt;script&gt;alert(1)&lt;/script&gt;"


def test_file_names_and_labels_are_escaped_in_html_not_in_json(tmp_path, model_file, no_epoch):
    # "/" cannot be part of a Linux file name, so the path carries the markup:
    # a folder named `<b>x<` holding `b>&"q.png` is the path …/<b>x</b>&"q.png.
    folder = tmp_path / "<b>x<"
    folder.mkdir()
    image = write_image(folder / 'b>&"q.png', seed=3)
    raw_name = '<b>x</b>&"q.png'
    assert str(image).endswith(raw_name)
    labels = tmp_path / "labels.txt"
    labels.write_text(f"cat\n{SCRIPT}\ndog & \"friends\"\nbird\n", encoding="utf-8")
    outdir = tmp_path / "out"

    result = invoke(
        "run", model_file, image, "-o", outdir, "--labels", labels,
        "-t", "gradcam", "-s", "gradcam.class=1",
    )
    assert result.exit_code == 0, result.output

    html = (outdir / "index.html").read_text(encoding="utf-8")
    assert raw_name not in html
    assert "<b>" not in html
    assert "&lt;b&gt;x&lt;/b&gt;&amp;" in html
    assert "&lt;b&gt;x&lt;/b&gt;&amp;&#34;q.png" in html or "&lt;b&gt;x&lt;/b&gt;&amp;&quot;q.png" in html
    assert SCRIPT not in html
    assert "<script" not in html.lower()
    assert ESCAPED_SCRIPT in html
    assert 'dog & "friends"' not in html

    text = (outdir / "report.json").read_text(encoding="utf-8")
    assert SCRIPT in text
    data = json.loads(text)
    (record,) = data["images"]
    assert record["path"] == str(image)
    assert record["id"] and "<" not in record["id"] and '"' not in record["id"]
    assert {p["label"] for p in record["predictions"]} == {"cat", SCRIPT, 'dog & "friends"', "bird"}
    (gradcam,) = data["techniques"]
    assert SCRIPT in gradcam["artifacts"][0]["title"]


# -- atomic writes; never lose a report --------------------------------------------


def test_rerun_into_same_outdir_replaces_the_files(tmp_path, model_file, pictures, no_epoch):
    outdir = tmp_path / "out"
    result = invoke("run", model_file, pictures, "-o", outdir, "-t", "activations", "-t", "gradcam")
    assert result.exit_code == 0, result.output
    first_html = (outdir / "index.html").read_text(encoding="utf-8")
    assert 'id="technique-activations"' in first_html

    result = invoke("run", model_file, pictures / "a.png", "-o", outdir, "-t", "gradcam")
    assert result.exit_code == 0, result.output

    assert sorted(p.name for p in outdir.iterdir()) == ["index.html", "report.json"]
    assert not list(outdir.glob(".*.tmp-*"))
    data = read_json(outdir)
    assert [t["name"] for t in data["techniques"]] == ["gradcam"]
    assert [image["id"] for image in data["images"]] == ["a"]
    html = (outdir / "index.html").read_text(encoding="utf-8")
    assert 'id="technique-activations"' not in html
    assert 'id="image-b"' not in html
    assert html.rstrip().endswith("</html>") and html.count("<html") == 1


def test_rerun_without_save_arrays_leaves_no_stale_arrays(tmp_path, model_file, pictures, no_epoch):
    """Without --save-arrays there is no arrays.npz: not even an old one from an earlier run."""
    outdir = tmp_path / "out"
    result = invoke("run", model_file, pictures, "-o", outdir, "-t", "gradcam", "--save-arrays")
    assert result.exit_code == 0, result.output
    assert (outdir / "arrays.npz").is_file()

    result = invoke("run", model_file, pictures / "a.png", "-o", outdir, "-t", "gradcam")
    assert result.exit_code == 0, result.output
    data = read_json(outdir)
    assert all(a["array"] is None for t in data["techniques"] for a in t["artifacts"])
    assert not (outdir / "arrays.npz").exists(), (
        "arrays.npz of the previous run is left beside a report that saved no arrays: "
        f"it still holds {sorted(np.load(outdir / 'arrays.npz').files)}"
    )


@pytest.mark.parametrize(
    "bad_args",
    [
        ["-t", "nope"],
        ["-s", "gradcam.nope=1"],
        ["-s", "filters.count=abc"],
        ["-s", "nope.x=1"],
        ["--preprocess", "bogus"],
        ["MISSING_MODEL"],
    ],
    ids=["technique", "option", "value", "setting-technique", "preprocess", "model"],
)
def test_usage_error_leaves_an_earlier_report_untouched(tmp_path, model_file, pictures, bad_args, no_epoch):
    outdir = tmp_path / "out"
    result = invoke("run", model_file, pictures, "-o", outdir, "-t", "gradcam", "--save-arrays")
    assert result.exit_code == 0, result.output
    before = snapshot(outdir)

    if bad_args == ["MISSING_MODEL"]:
        args = ["run", tmp_path / "missing.keras", pictures, "-o", outdir]
    else:
        args = ["run", model_file, pictures, "-o", outdir, *bad_args]
    result = invoke(*args)

    assert result.exit_code == 2, result.output
    assert result.stderr.strip()
    assert snapshot(outdir) == before


def test_malformed_labels_file_is_a_usage_error(tmp_path, model_file, pictures, no_epoch):
    """A --labels file that is not valid JSON is a bad argument: exit 2, not a traceback."""
    labels = tmp_path / "labels.json"
    labels.write_text('["cat", "dog",', encoding="utf-8")
    outdir = tmp_path / "out"
    result = CliRunner().invoke(main, ["run", str(model_file), str(pictures), "-o", str(outdir),
                                       "-t", "gradcam", "--labels", str(labels)])
    assert result.exit_code == 2, (result.exit_code, repr(result.exception))
    assert "labels.json" in result.stderr
    assert not outdir.exists()


def test_not_a_list_labels_file_is_a_usage_error(tmp_path, model_file, pictures, no_epoch):
    labels = tmp_path / "labels.json"
    labels.write_text('{"0": "cat"}', encoding="utf-8")
    outdir = tmp_path / "out"
    result = invoke("run", model_file, pictures, "-o", outdir, "-t", "gradcam", "--labels", labels)
    assert result.exit_code == 2
    assert "labels.json" in result.stderr
    assert not outdir.exists()


def test_labels_file_with_the_wrong_number_of_classes_is_a_usage_error(tmp_path, model_file, pictures, no_epoch):
    labels = tmp_path / "labels.txt"
    labels.write_text("cat\ndog\n", encoding="utf-8")  # the tiny model has 4 classes
    outdir = tmp_path / "out"
    result = invoke("run", model_file, pictures, "-o", outdir, "-t", "gradcam", "--labels", labels)
    assert result.exit_code == 2
    assert "2 class names" in result.stderr and "4 classes" in result.stderr
    assert not outdir.exists()


def test_default_outdir_is_new_under_reports(tmp_path, model_file, pictures, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SOURCE_DATE_EPOCH", str(EPOCH))  # same time stamp: the names would collide

    indexes = []
    for inputs in ([pictures / "a.png"], [pictures / "b.jpg"]):
        result = invoke("run", model_file, *inputs, "-t", "gradcam")
        assert result.exit_code == 0, result.output
        indexes.append((tmp_path / result.stdout.strip()).resolve())
        if len(indexes) == 1:
            first_snapshot = snapshot(indexes[0].parent)

    first, second = (index.parent for index in indexes)
    assert first != second
    for folder in (first, second):
        assert folder.parent == (tmp_path / "reports").resolve()
        assert (folder / "index.html").is_file() and (folder / "report.json").is_file()
    assert snapshot(first) == first_snapshot
    assert [image["id"] for image in read_json(first)["images"]] == ["a"]
    assert [image["id"] for image in read_json(second)["images"]] == ["b"]

    monkeypatch.delenv("SOURCE_DATE_EPOCH")
    result = invoke("run", model_file, pictures / "a.png", "-t", "gradcam")
    assert result.exit_code == 0, result.output
    third = (tmp_path / result.stdout.strip()).resolve().parent
    assert third.parent == (tmp_path / "reports").resolve()
    assert third not in (first, second)
    assert len(list((tmp_path / "reports").iterdir())) == 3
