"""Runs in chunks of images: the same report whatever the chunk size, a folder layout
whose every picture is a file, and --resume after an interrupted run (issue 11)."""

from __future__ import annotations

import io
import json
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from conftest import write_image
from vizkit import runner
from vizkit.exitcodes import ExitCode
from vizkit.pictures import Picture
from vizkit.runner import RunOptions, UsageError, run

REAL_EXPLAIN = runner.explain_chunk
#: `vizkit` in a child process that takes SIGINT as Ctrl-C (a child of pytest may ignore it).
INTERRUPTIBLE = (
    "import signal; signal.signal(signal.SIGINT, signal.default_int_handler); "
    "from vizkit.cli import main; main(prog_name='vizkit')"
)

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


def interrupt_at(monkeypatch, stop: int | None) -> list[int]:
    """explain_chunk raises Ctrl-C at chunk ``stop``; returns the chunks it explains."""
    real, explained = REAL_EXPLAIN, []

    def explain(job, index, *args, **kwargs):
        if index == stop:
            raise KeyboardInterrupt
        explained.append(index)
        return real(job, index, *args, **kwargs)

    monkeypatch.setattr(runner, "explain_chunk", explain)
    return explained


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
    assert len(pictures) == 7 + 7 * 2 + 7 * 3  # inputs, gradcam and saliency, activations of 3 layers
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
    # the pictures are the one-page report's: decoded from its bytes and from the files
    singles = {a.key: a for t in whole[0].techniques for a in t.artifacts}
    for technique in data["techniques"]:
        for artifact in technique["artifacts"]:
            picture = Picture(artifact["picture"], tuple(artifact["shape"]))
            np.testing.assert_array_equal(picture.pixels(out), singles[artifact["array"]].picture.pixels())
    # report.json streamed from the chunk files is laid out as json.dumps lays it out
    text = (out / "report.json").read_text()
    assert text == json.dumps(data, indent=2, ensure_ascii=False) + "\n"
    # nothing per image is held in memory: pictures are file names, arrays and per-image results on disk
    images_of = {"gradcam": 7, "activations": 21, "saliency": 7}  # activations: 3 layers
    for technique in report.techniques:
        assert technique.artifacts == [] and technique.per_image_artifacts == images_of[technique.name]
        assert technique.evidence == []  # faithfulness measures per image only
        assert technique.measured_images == (7 if technique.comparable else 0)
    assert all(isinstance(image.picture, Picture) and image.picture.png is None for image in report.images)
    assert report.summary() == single["summary"]


def _without_pictures(value):
    if isinstance(value, dict):
        return {k: _without_pictures(v) for k, v in value.items() if k != "picture"}
    if isinstance(value, list):
        return [_without_pictures(v) for v in value]
    return value


def test_an_interrupted_run_resumes_where_it_stopped(model_file, images, tmp_path, whole, monkeypatch):
    before = interrupt_at(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt) as stopped:
        run(model_file, [images], options(chunk=2), tmp_path / "out")
    assert before == [0, 1] and stopped.value.vizkit_partial == (tmp_path / "out", 4, 7)
    assert not (tmp_path / "out").exists() and (tmp_path / ".out.vizkit-partial").is_dir()

    after = interrupt_at(monkeypatch, None)
    run(model_file, [images], options(chunk=2, resume=True), tmp_path / "out")
    assert after == [2, 3]  # only the chunks not done
    assert_same_report(tmp_path / "out", whole[1])
    assert not (tmp_path / ".out.vizkit-partial").exists()


def test_resume_refuses_partial_results_of_other_options(model_file, images, tmp_path, monkeypatch):
    interrupt_at(monkeypatch, 1)
    with pytest.raises(KeyboardInterrupt):
        run(model_file, [images], options(chunk=3), tmp_path / "out")
    interrupt_at(monkeypatch, None)
    changed = options(chunk=3, resume=True)
    changed.settings = {**SETTINGS, "activations": {"max_channels": 3}}
    with pytest.raises(UsageError, match=r"other inputs or options; changed since: techniques and metrics: run without"):
        run(model_file, [images], changed, tmp_path / "out")
    assert (tmp_path / ".out.vizkit-partial").is_dir()  # still there to resume with the right options
    with pytest.raises(UsageError, match="give that folder with -o"):
        run(model_file, [images], options(resume=True))


def test_without_resume_a_new_run_starts_over(model_file, images, tmp_path, whole, monkeypatch, capsys):
    interrupt_at(monkeypatch, 1)
    with pytest.raises(KeyboardInterrupt):
        run(model_file, [images], options(chunk=3), tmp_path / "out")
    interrupt_at(monkeypatch, None)
    run(model_file, [images], options(chunk=3), tmp_path / "out")
    assert "discarded the partial results of an interrupted run" in capsys.readouterr().err
    assert_same_report(tmp_path / "out", whole[1])


def test_ctrl_c_on_the_command_line_says_how_to_resume(vizkit_cli, model_file, images, tmp_path, monkeypatch):
    interrupt_at(monkeypatch, 2)
    result = vizkit_cli("run", model_file, images, "-t", "gradcam", "--no-metrics", "--chunk", "3", "-o", tmp_path / "out")
    assert result.exit_code == ExitCode.INTERRUPTED
    assert re.search(r"interrupted; no report was written; the 6 of 7 images done are kept: run the same command "
                     r"with --resume \(and -o .*out\) to continue", result.stderr)


def test_a_chunked_run_reports_one_step_of_images(model_file, images, tmp_path):
    lines = []
    run(model_file, [images], options(chunk=3), tmp_path / "out", progress=lines.append)
    ended = [line for line in lines if " images in " in line]
    assert len(ended) == 1 and ended[0].startswith("explaining: 7 images in "), lines  # one step, not one per technique
    assert any(line.startswith("explaining: chunk 3/3: gradcam") for line in lines), lines


def test_a_technique_that_is_not_per_image_runs_once(model_file, images, tmp_path):
    report, _ = run(model_file, [images], RunOptions(techniques=["filters"], settings={"filters": {"count": 2, "steps": 2}},
                                                     chunk=3), tmp_path / "out")
    (filters,) = report.techniques
    assert filters.status == "ok" and len(filters.artifacts) == len({a.layer for a in filters.artifacts})
    assert all(a.image_id is None for a in filters.artifacts)
    assert np.all([a.array is not None for a in filters.artifacts])


SLOW_PLUGIN = '''
import time

import numpy as np

from vizkit import Artifact, Technique, hookimpl


def run_batch(context, batch):
    time.sleep(0.4)  # time to interrupt the run between two chunks
    return [Artifact("slow", np.full((4, 4), n, "float32"), np.full((4, 4), n, "uint8"), image_id=image.id)
            for n, image in enumerate(batch.images)]


@hookimpl
def register_techniques(register):
    register(Technique("slow", description="Sleeps, then makes a small flat picture.", run_batch=run_batch))
'''


@pytest.mark.skipif(sys.platform == "win32", reason="needs SIGINT")
def test_sigint_stops_a_real_run_and_resume_finishes_it(model_file, images, tmp_path, monkeypatch):
    """A `vizkit run` process stopped by SIGINT once two chunks are on disk: exit 130,
    no report, the chunks kept; `--resume` explains only the others, and its report is
    the one an uninterrupted run writes."""
    plugin = tmp_path / "slow.py"
    plugin.write_text(SLOW_PLUGIN)
    args = ["run", str(model_file), str(images), "-p", str(plugin), "-t", "slow", "-t", "gradcam", "--no-metrics",
            "--chunk", "1", "-q", "-o"]
    chunks = tmp_path / ".out.vizkit-partial" / ".vizkit-run" / "chunks"
    process = subprocess.Popen([sys.executable, "-c", INTERRUPTIBLE, *args, str(tmp_path / "out")],
                               stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and process.poll() is None and len(list(chunks.glob("[0-9]*.json"))) < 2:
            time.sleep(0.05)
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == ExitCode.INTERRUPTED, stderr
    done = len(list(chunks.glob("[0-9]*.json")))
    assert 2 <= done < 7 and f"the {done} of 7 images done are kept" in stderr
    assert not (tmp_path / "out").exists()

    resumed = subprocess.run([sys.executable, "-c", INTERRUPTIBLE, *args, str(tmp_path / "out"), "--resume"],
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming: {done} of 7 images were done" in resumed.stderr
    whole = subprocess.run([sys.executable, "-c", INTERRUPTIBLE, *args, str(tmp_path / "whole")],
                           capture_output=True, text=True, timeout=300)
    assert whole.returncode == 0, whole.stderr
    assert files_of(tmp_path / "out") == files_of(tmp_path / "whole")


BATCH_SUMMARY_PLUGIN = '''
import numpy as np

from vizkit import Artifact, Technique, hookimpl


def run_batch(context, batch):
    mean = batch.pixels.mean(axis=0)
    return [Artifact("batch mean", mean, mean.astype("uint8"))]  # of no image: one per batch


@hookimpl
def register_techniques(register):
    register(Technique("batchmean", description="The mean picture of each batch.", run_batch=run_batch))
'''


def test_pictures_of_no_image_made_in_several_chunks_keep_apart(model_file, images, tmp_path):
    plugin = tmp_path / "batchmean.py"
    plugin.write_text(BATCH_SUMMARY_PLUGIN)
    report, _ = run(model_file, [images], RunOptions(techniques=["batchmean"], plugins=[str(plugin)], chunk=3,
                                                     layout="folder", save_arrays=True), tmp_path / "out")
    (technique,) = report.techniques
    keys = [a.key for a in technique.artifacts]
    paths = [a.picture.path for a in technique.artifacts]
    assert len(keys) == len(set(keys)) == len(set(paths)) >= 3  # a batch per chunk at least, none overwritten
    arrays = np.load(tmp_path / "out" / "arrays.npz")
    assert sorted(arrays.files) == sorted(keys)
    for artifact in technique.artifacts:  # each file holds its own batch's mean
        picture = np.asarray(Image.open(tmp_path / "out" / artifact.picture.path))
        np.testing.assert_array_equal(picture, arrays[artifact.key].astype("uint8"))


def test_compare_reads_a_folder_report_as_a_one_page_one(vizkit_cli, model_file, images, tmp_path, whole, workdir):
    """report.json and arrays.npz have one schema in both layouts: `vizkit compare` of the
    one-page report against the same run as a folder finds nothing moved."""
    run(model_file, [images], options(chunk=3, layout="folder"), tmp_path / "folder")
    result = vizkit_cli("compare", workdir / "whole", tmp_path / "folder", "-o", tmp_path / "compared",
                        "--fail-on", "flips>0", "--fail-on", "similarity<0.999")
    assert result.exit_code == ExitCode.OK, result.output
    compared = json.loads((tmp_path / "compared" / "compare.json").read_text())
    assert compared["predictions"]["compared"] == 7 and compared["predictions"]["flips"] == 0
    assert compared["failures"]["new"] == [] and compared["errors"] == []


def test_a_folder_report_is_byte_identical_on_a_rerun(model_file, images, tmp_path):
    """SOURCE_DATE_EPOCH (set for every test here): every page, picture and report.json again."""
    for name in ("first", "second"):
        run(model_file, [images], options(chunk=3, layout="folder"), tmp_path / name)
    first, second = files_of(tmp_path / "first"), files_of(tmp_path / "second")
    assert first == second and sum(name.startswith("pictures/") for name in first) == 7 + 7 * 5


def test_resume_redoes_a_chunk_whose_files_went_missing(model_file, images, tmp_path, whole, monkeypatch, capsys):
    interrupt_at(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        run(model_file, [images], options(chunk=3), tmp_path / "out")
    partial = tmp_path / ".out.vizkit-partial"
    (partial / "pictures" / "inputs" / "img4.png").unlink()  # chunk 1's: as if lost in a crash
    explained = interrupt_at(monkeypatch, None)
    run(model_file, [images], options(chunk=3, resume=True), tmp_path / "out")
    assert explained == [1, 2] and "resuming: 3 of 7 images were done" in capsys.readouterr().err
    assert_same_report(tmp_path / "out", whole[1])


def test_resume_refuses_a_model_whose_weights_changed(images, tmp_path, monkeypatch, capsys):
    from conftest import build_tiny

    model = build_tiny()
    model.save(tmp_path / "model.keras")
    interrupt_at(monkeypatch, 1)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "model.keras", [images], options(chunk=3), tmp_path / "out")
    model.layers[-1].bias.assign(model.layers[-1].bias + 1.0)  # trained a little more, same file name
    model.save(tmp_path / "model.keras")
    with pytest.raises(UsageError, match="changed since: model, model weights"):
        run(tmp_path / "model.keras", [images], options(chunk=3, resume=True), tmp_path / "out")

