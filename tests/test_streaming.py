"""Runs in chunks of images: the same report whatever the chunk size, a folder layout
whose every picture is a file, and --resume after an interrupted run (issue 11)."""

from __future__ import annotations

import io
import json
import re

import numpy as np
import pytest

from conftest import write_image
from vizkit import runner
from vizkit.exitcodes import ExitCode
from vizkit.pictures import Picture
from vizkit.runner import RunOptions, UsageError, run

TECHNIQUES = ["gradcam", "activations", "saliency"]
SETTINGS = {"activations": {"max_channels": 2}, "faithfulness": {"steps": 4}}


@pytest.fixture(scope="module")
def images(workdir):
    folder = workdir / "images"
    folder.mkdir()
    for n in range(7):
        write_image(folder / f"img{n}.png", size=(32 + 4 * (n % 2), 32), seed=n)  # two shapes: groups split
    return folder


@pytest.fixture(autouse=True)
def reproducible(monkeypatch):
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "0")


def options(**changes) -> RunOptions:
    return RunOptions(techniques=list(TECHNIQUES), metrics=["faithfulness"], settings=SETTINGS, save_arrays=True, **changes)


def files_of(folder) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def assert_same_report(folder, whole) -> None:
    """The pages and report.json byte for byte; the arrays to float32 rounding: an image
    batched with others in one chunk and alone in another is convolved in another order."""
    made = files_of(folder)
    assert {k: v for k, v in made.items() if k != "arrays.npz"} == {k: v for k, v in whole.items() if k != "arrays.npz"}
    assert_same_arrays(folder / "arrays.npz", whole["arrays.npz"])


def assert_same_arrays(path, expected: bytes) -> None:
    made, wanted = np.load(path), np.load(io.BytesIO(expected))
    assert made.files == wanted.files
    for key in made.files:
        np.testing.assert_allclose(made[key], wanted[key], rtol=0, atol=1e-6, err_msg=key)


@pytest.fixture(scope="module")
def whole(model_file, images, workdir):
    """The report made in one chunk: the yardstick."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SOURCE_DATE_EPOCH", "0")
        report, _ = run(model_file, [images], options(chunk=32), workdir / "whole")
    return report, files_of(workdir / "whole")


def test_chunks_give_the_same_report_as_one_chunk(model_file, images, tmp_path, whole):
    report, _ = run(model_file, [images], options(chunk=3), tmp_path / "out")
    assert_same_report(tmp_path / "out", whole[1])
    assert sorted(files_of(tmp_path / "out")) == ["arrays.npz", "index.html", "report.json"]
    gradcam = next(t for t in report.techniques if t.name == "gradcam")
    assert len(gradcam.artifacts) == 7 and all(a.array is not None for a in gradcam.artifacts)  # one page: kept


def test_the_folder_layout_writes_every_picture_as_a_file(model_file, images, tmp_path, whole):
    report, index = run(model_file, [images], options(chunk=3, layout="folder"), tmp_path / "out")
    out = tmp_path / "out"
    data = json.loads((out / "report.json").read_text())
    assert data["layout"] == "folder" and data["executor"] == "in-process"
    pictures = [i["picture"] for i in data["images"]] + [
        a["picture"] for t in data["techniques"] for a in t["artifacts"]]
    assert len(pictures) == 7 + 7 * 2 + 7 * 2 + 7  # inputs, gradcam+saliency, activations of 2 layers
    for path in pictures:
        assert (out / path).is_file() and (out / path).read_bytes().startswith(b"\x89PNG")
    # the same numbers as the one-page report: only where the pictures are differs
    single = json.loads(whole[1]["report.json"])
    for key in ("images", "techniques", "metrics", "summary"):
        assert _without_pictures(data[key]) == _without_pictures(single[key])
    assert_same_arrays(out / "arrays.npz", whole[1]["arrays.npz"])
    pages = [p for p in files_of(out) if p.endswith(".html")]
    assert "index.html" in pages and "pages/images-0001.html" in pages
    for page in pages:
        assert "data:image" not in (out / page).read_text()
    # nothing per image is held in memory: pictures are file names, arrays on disk
    for technique in report.techniques:
        for artifact in technique.artifacts:
            assert artifact.array is None and isinstance(artifact.picture, Picture) and artifact.picture.png is None


def _without_pictures(value):
    if isinstance(value, dict):
        return {k: _without_pictures(v) for k, v in value.items() if k != "picture"}
    if isinstance(value, list):
        return [_without_pictures(v) for v in value]
    return value


def test_an_interrupted_run_resumes_where_it_stopped(model_file, images, tmp_path, whole, monkeypatch):
    real, explained = runner.explain_chunk, []

    def interrupted_at_2(job, index, *args, **kwargs):
        if index == 2:
            raise KeyboardInterrupt
        explained.append(index)
        return real(job, index, *args, **kwargs)

    monkeypatch.setattr(runner, "explain_chunk", interrupted_at_2)
    with pytest.raises(KeyboardInterrupt) as stopped:
        run(model_file, [images], options(chunk=2), tmp_path / "out")
    assert stopped.value.vizkit_partial == (tmp_path / "out", 4, 7)
    assert not (tmp_path / "out").exists() and (tmp_path / ".out.vizkit-partial").is_dir()

    monkeypatch.setattr(runner, "explain_chunk", lambda job, index, *a, **k: explained.append(index) or real(job, index, *a, **k))
    run(model_file, [images], options(chunk=2, resume=True), tmp_path / "out")
    assert explained == [0, 1, 2, 3]  # chunks 0 and 1 once, before the interruption; then 2 and 3
    assert_same_report(tmp_path / "out", whole[1])
    assert not (tmp_path / ".out.vizkit-partial").exists()


def test_resume_refuses_partial_results_of_other_options(model_file, images, tmp_path, monkeypatch):
    real = runner.explain_chunk
    monkeypatch.setattr(runner, "explain_chunk", lambda job, index, *a, **k: (_ for _ in ()).throw(KeyboardInterrupt)
                        if index == 1 else real(job, index, *a, **k))
    with pytest.raises(KeyboardInterrupt):
        run(model_file, [images], options(chunk=3), tmp_path / "out")
    monkeypatch.setattr(runner, "explain_chunk", real)
    changed = options(chunk=3, resume=True)
    changed.settings = {**SETTINGS, "activations": {"max_channels": 3}}
    with pytest.raises(UsageError, match=r"other techniques and metrics: run without --resume to start over"):
        run(model_file, [images], changed, tmp_path / "out")
    assert (tmp_path / ".out.vizkit-partial").is_dir()  # still there to resume with the right options
    with pytest.raises(UsageError, match="give that folder with -o"):
        run(model_file, [images], options(resume=True))


def test_without_resume_a_new_run_starts_over(model_file, images, tmp_path, whole, monkeypatch, capsys):
    real = runner.explain_chunk
    monkeypatch.setattr(runner, "explain_chunk", lambda job, index, *a, **k: (_ for _ in ()).throw(KeyboardInterrupt)
                        if index == 1 else real(job, index, *a, **k))
    with pytest.raises(KeyboardInterrupt):
        run(model_file, [images], options(chunk=3), tmp_path / "out")
    monkeypatch.setattr(runner, "explain_chunk", real)
    run(model_file, [images], options(chunk=3), tmp_path / "out")
    assert "discarded the partial results of an earlier run" in capsys.readouterr().err
    assert_same_report(tmp_path / "out", whole[1])


def test_ctrl_c_on_the_command_line_says_how_to_resume(vizkit_cli, model_file, images, tmp_path, monkeypatch):
    real = runner.explain_chunk
    monkeypatch.setattr(runner, "explain_chunk", lambda job, index, *a, **k: (_ for _ in ()).throw(KeyboardInterrupt)
                        if index == 2 else real(job, index, *a, **k))
    result = vizkit_cli("run", model_file, images, "-t", "gradcam", "--no-metrics", "--chunk", "3", "-o", tmp_path / "out")
    assert result.exit_code == ExitCode.INTERRUPTED
    assert re.search(r"interrupted; no report was written; the 6 of 7 images done are kept: run the same command "
                     r"with --resume \(and -o .*out\) to continue", result.stderr)


def test_a_chunked_run_reports_one_step_of_images(model_file, images, tmp_path):
    lines = []
    run(model_file, [images], options(chunk=3), tmp_path / "out", progress=lines.append)
    steps = [line for line in lines if re.match(r"\w+: \d+ images", line)]
    assert steps == ["explaining: 7 images"] or steps[0].startswith("explaining: 7 images"), lines


def test_a_technique_that_is_not_per_image_runs_once(model_file, images, tmp_path):
    report, _ = run(model_file, [images], RunOptions(techniques=["filters"], settings={"filters": {"count": 2, "steps": 2}},
                                                     chunk=3), tmp_path / "out")
    (filters,) = report.techniques
    assert filters.status == "ok" and len(filters.artifacts) == len({a.layer for a in filters.artifacts})
    assert all(a.image_id is None for a in filters.artifacts)
    assert np.all([a.array is not None for a in filters.artifacts])
