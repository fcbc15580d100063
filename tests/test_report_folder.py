"""The report folder is written all or nothing (issue 13): a full disk, Ctrl-C or a second
run never leaves a mix of two reports, and a folder vizkit did not write is never touched
without --overwrite. Real runs of the tiny model; only the lowest-level file write (or a
rename) is made to fail."""

from __future__ import annotations

import errno
import json
import os
import signal
import stat
import subprocess
import sys
import textwrap

import pytest

from vizkit import files, report_folder, runner
from vizkit.exitcodes import ExitCode

QUICK = ("-t", "activations", "-s", "activations.max_channels=4", "--no-metrics")


def snapshot(folder):
    """Every entry under ``folder``: relative name → bytes (None for a folder)."""
    return {
        path.relative_to(folder).as_posix(): None if path.is_dir() else path.read_bytes()
        for path in sorted(folder.rglob("*"))
    }


def images_of(outdir):
    return [image["path"] for image in json.loads((outdir / "report.json").read_text(encoding="utf-8"))["images"]]


@pytest.fixture
def reports(tmp_path):
    """A parent folder for the report, so leftovers beside it show."""
    folder = tmp_path / "reports"
    folder.mkdir()
    return folder


@pytest.fixture
def old_report(vizkit_cli, vizkit_model_file, vizkit_images, reports):
    """``reports/out``: a vizkit report of one photo, with arrays.npz."""
    out = reports / "out"
    first = sorted(vizkit_images.iterdir())[0]
    result = vizkit_cli("run", vizkit_model_file, first, *QUICK, "--save-arrays", "-o", out)
    assert result.exit_code == ExitCode.OK, result.output
    assert sorted(os.listdir(out)) == ["arrays.npz", "index.html", "report.json"]
    return out


def fail_nth_write(monkeypatch, nth, error):
    """The ``nth`` file vizkit writes (1: the first) raises ``error``; the others are written."""
    real, calls = files.write_new, []

    def write_new(path, data):
        calls.append(path.name)
        if len(calls) == nth:
            raise error
        real(path, data)

    monkeypatch.setattr(files, "write_new", write_new)
    return calls


def no_work(monkeypatch):
    """TensorFlow must not even start: the run is refused before any work."""
    def started():
        raise AssertionError("the run started working")

    monkeypatch.setattr("vizkit.runner.start_tensorflow", started)


# --------------------------------------------------------------------------- a whole new report


def test_a_new_report_replaces_the_old_one_completely(vizkit_cli, vizkit_model_file, vizkit_images, old_report, reports):
    os.chmod(old_report, 0o750)
    result = vizkit_cli("run", vizkit_model_file, vizkit_images, *QUICK, "-o", old_report)
    assert result.exit_code == ExitCode.OK, result.output
    assert sorted(os.listdir(old_report)) == ["index.html", "report.json"]  # no stale arrays.npz
    assert len(images_of(old_report)) == 3
    assert stat.S_IMODE(old_report.stat().st_mode) == 0o750  # the folder keeps its mode
    assert os.listdir(reports) == ["out"]  # no temporary folder, backup or lock file left
    assert not report_folder.is_claimed(old_report)


@pytest.mark.parametrize(
    "code, nth, message",
    [
        (errno.ENOSPC, 1, "no space left on {out}: nothing was written"),
        (errno.ENOSPC, 2, "no space left on {out}: nothing was written"),
        (errno.EDQUOT, 1, "disk quota exceeded on {out}: nothing was written"),
    ],
)
def test_a_full_disk_leaves_the_old_report_as_it_was(vizkit_cli, vizkit_model_file, vizkit_images, old_report, reports,
                                                     monkeypatch, code, nth, message):
    before = snapshot(old_report)
    calls = fail_nth_write(monkeypatch, nth, OSError(code, os.strerror(code)))
    result = vizkit_cli("run", vizkit_model_file, vizkit_images, *QUICK, "--save-arrays", "-o", old_report)
    assert result.exit_code == ExitCode.WRITE_ERROR == 4, result.output
    assert len(calls) == nth
    lines = [line for line in result.stderr.splitlines() if "nothing was written" in line]
    assert lines == [f"vizkit: {message.format(out=old_report)}; the report already there is unchanged; "
                     "the 3 images done are kept: rerun with --resume once there is room"]
    assert "Traceback" not in result.output and "internal error" not in result.output
    assert snapshot(old_report) == before  # byte for byte
    assert sorted(os.listdir(reports)) == [".out.vizkit-partial", "out"]  # the work done, for --resume


@pytest.mark.parametrize("nth", [1, 2])  # 2: report.json was written into the partial folder
def test_resume_after_a_full_disk_writes_the_report_without_redoing_the_work(
        vizkit_cli, vizkit_model_file, vizkit_images, old_report, reports, monkeypatch, nth):
    with pytest.MonkeyPatch.context() as full:
        fail_nth_write(full, nth, OSError(errno.ENOSPC, "No space left on device"))
        assert vizkit_cli("run", vizkit_model_file, vizkit_images, *QUICK, "-o", old_report).exit_code == ExitCode.WRITE_ERROR
    explained = []
    real = runner.explain_chunk
    monkeypatch.setattr(runner, "explain_chunk", lambda *args, **kwargs: explained.append(args[1]) or real(*args, **kwargs))
    result = vizkit_cli("run", vizkit_model_file, vizkit_images, *QUICK, "-o", old_report, "--resume")
    assert result.exit_code == ExitCode.OK, result.output
    assert explained == [] and "resuming: 3 of 3 images were done" in result.stderr
    assert len(images_of(old_report)) == 3
    assert os.listdir(reports) == ["out"]


def test_a_full_disk_on_a_new_folder_writes_nothing(vizkit_cli, vizkit_model_file, vizkit_images, tmp_path, monkeypatch):
    out = tmp_path / "new" / "deeper" / "out"
    fail_nth_write(monkeypatch, 2, OSError(errno.ENOSPC, "No space left on device"))
    result = vizkit_cli("run", vizkit_model_file, vizkit_images, *QUICK, "-o", out)
    assert result.exit_code == ExitCode.WRITE_ERROR, result.output
    assert f"vizkit: no space left on {out}: nothing was written; the 3 images done are kept" in result.stderr
    assert os.listdir(out.parent) == [".out.vizkit-partial"]  # nothing else: no report, no lock


def test_ctrl_c_while_writing_leaves_the_old_report(vizkit_cli, vizkit_model_file, vizkit_images, old_report, reports,
                                                    monkeypatch):
    before = snapshot(old_report)
    fail_nth_write(monkeypatch, 2, KeyboardInterrupt())
    result = vizkit_cli("run", vizkit_model_file, vizkit_images, *QUICK, "--save-arrays", "-o", old_report)
    assert result.exit_code == ExitCode.INTERRUPTED, result.output
    assert "interrupted; no report was written" in result.output
    assert snapshot(old_report) == before
    assert sorted(os.listdir(reports)) == [".out.vizkit-partial", "out"]
    assert not report_folder.is_claimed(old_report)


def test_a_failed_swap_puts_the_old_report_back(vizkit_cli, vizkit_model_file, vizkit_images, old_report, reports, monkeypatch):
    """The rename of the new folder over the old one fails after the old one was moved aside."""
    before, real_rename, renames = snapshot(old_report), os.rename, []

    def rename(source, target, *args, **kwargs):
        renames.append((os.path.basename(source), os.path.basename(target)))
        if os.path.basename(source) == ".out.vizkit-partial":
            raise OSError(errno.EIO, "Input/output error")
        return real_rename(source, target, *args, **kwargs)

    monkeypatch.setattr(os, "rename", rename)
    result = vizkit_cli("run", vizkit_model_file, vizkit_images, *QUICK, "-o", old_report)
    assert result.exit_code == ExitCode.WRITE_ERROR, result.output
    assert f"could not write {old_report}: Input/output error: nothing was written" in result.stderr
    (aside, backup), (new, _), (back, _) = [pair for pair in renames if "out" in pair]
    assert aside == "out" and backup.startswith(".out.vizkit-old-")  # moved aside,
    assert new == ".out.vizkit-partial"  # the new one failed to take its place,
    assert back == backup  # and the old one was put back
    assert snapshot(old_report) == before
    assert sorted(os.listdir(reports)) == [".out.vizkit-partial", "out"]


def test_a_report_moved_aside_by_a_killed_run_is_put_back(old_report, reports):
    """A run killed between its two renames left the old report as a hidden backup, and
    its temporary folder: the next claim puts the one back and deletes the other."""
    before = snapshot(old_report)
    os.rename(old_report, reports / ".out.vizkit-old-1234abcd")
    (reports / ".out.vizkit-new-xyz").mkdir()
    (reports / ".out.vizkit-new-xyz" / "report.json").write_text("{}")
    with report_folder.claim(old_report) as folder:
        assert folder.real == old_report.resolve()
        assert snapshot(old_report) == before
        assert sorted(os.listdir(reports)) == [".out.vizkit-lock", "out"]
    assert os.listdir(reports) == ["out"]


def test_running_inside_the_report_folder_keeps_it(vizkit_cli, vizkit_model_file, vizkit_images, old_report, monkeypatch):
    """``-o .`` from inside the report: a shell there must not be left in a deleted folder."""
    monkeypatch.chdir(old_report)
    inode = old_report.stat().st_ino
    result = vizkit_cli("run", vizkit_model_file, vizkit_images, *QUICK, "-o", ".")
    assert result.exit_code == ExitCode.OK, result.output
    assert old_report.stat().st_ino == inode and os.getcwd() == str(old_report)
    assert sorted(os.listdir(old_report)) == ["index.html", "report.json"]
    assert len(images_of(old_report)) == 3


# --------------------------------------------------------------------------- folders vizkit did not write


@pytest.mark.parametrize(
    "contents",
    [
        {"notes.txt": b"my notes"},
        {"index.html": b"<p>my page</p>", "report.json": b'{"results": [1, 2]}', "arrays.npz": b"mine"},
        {"index.html": b"<p>my page</p>", "data/values.csv": b"1,2"},
        {".vizkit-notes/precious.txt": b"mine, though named like vizkit's"},
    ],
    ids=["other-file", "same-names", "subfolder", "vizkit-like-name"],
)
def test_a_folder_vizkit_did_not_write_is_refused_untouched(vizkit_cli, vizkit_model_file, vizkit_images, reports,
                                                            monkeypatch, contents):
    out = reports / "mine"
    for name, data in contents.items():
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_bytes(data)
    before = snapshot(out)
    no_work(monkeypatch)
    result = vizkit_cli("run", vizkit_model_file, vizkit_images, *QUICK, "-o", out)
    assert result.exit_code == ExitCode.USAGE_ERROR, result.output
    assert f"{out} holds files vizkit did not write" in result.output
    assert "pick an empty or new folder, or add --overwrite" in result.output
    assert snapshot(out) == before
    assert os.listdir(reports) == ["mine"]


def test_overwrite_writes_into_a_folder_and_keeps_its_other_files(vizkit_cli, vizkit_model_file, vizkit_images, reports):
    out = reports / "mine"
    out.mkdir()
    (out / "notes.txt").write_bytes(b"my notes")
    (out / "index.html").write_bytes(b"<p>my page</p>")
    (out / "arrays.npz").write_bytes(b"stale")
    result = vizkit_cli("run", vizkit_model_file, vizkit_images, *QUICK, "--overwrite", "-o", out)
    assert result.exit_code == ExitCode.OK, result.output
    assert sorted(os.listdir(out)) == ["index.html", "notes.txt", "report.json"]
    assert (out / "notes.txt").read_bytes() == b"my notes"
    assert len(images_of(out)) == 3 and b"my page" not in (out / "index.html").read_bytes()
    assert os.listdir(reports) == ["mine"]


def test_an_empty_folder_is_taken(vizkit_cli, vizkit_model_file, vizkit_images, reports):
    out = reports / "empty"
    out.mkdir()
    result = vizkit_cli("run", vizkit_model_file, vizkit_images, *QUICK, "-o", out)
    assert result.exit_code == ExitCode.OK, result.output
    assert sorted(os.listdir(out)) == ["index.html", "report.json"]


# --------------------------------------------------------------------------- two runs at once


def test_a_second_run_on_a_folder_being_written_fails_fast(vizkit_cli, vizkit_model_file, vizkit_images, old_report,
                                                           reports, monkeypatch):
    before = snapshot(old_report)
    with report_folder.claim(old_report):  # as a first run does, from its start to its end
        with monkeypatch.context() as patched:
            no_work(patched)
            result = vizkit_cli("run", vizkit_model_file, vizkit_images, *QUICK, "-o", old_report)
        assert result.exit_code == ExitCode.USAGE_ERROR, result.output
        assert f"another vizkit run is writing {old_report}" in result.output
        assert snapshot(old_report) == before
    assert os.listdir(reports) == ["out"]  # the lock file goes with the lock
    result = vizkit_cli("run", vizkit_model_file, vizkit_images, *QUICK, "-o", old_report)
    assert result.exit_code == ExitCode.OK, result.output


def test_a_run_in_another_process_holds_the_folder_until_it_dies(vizkit_cli, vizkit_model_file, vizkit_images, reports,
                                                                 monkeypatch):
    """Two processes: the second fails fast; once the first is killed (no clean-up at
    all), the lock file it leaves blocks nothing."""
    out = reports / "out"
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import sys, time
            from pathlib import Path
            from vizkit import report_folder
            report_folder.claim(Path({str(out)!r}))
            print("claimed", flush=True)
            time.sleep(600)
        """)],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "claimed"
        assert report_folder.is_claimed(out)
        with monkeypatch.context() as patched:
            no_work(patched)
            result = vizkit_cli("run", vizkit_model_file, vizkit_images, *QUICK, "-o", out)
        assert result.exit_code == ExitCode.USAGE_ERROR, result.output
        assert f"another vizkit run is writing {out}" in result.output
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
        holder.stdout.close()
    assert os.listdir(reports) == [".out.vizkit-lock"]  # a crash leaves the file, not the lock
    assert not report_folder.is_claimed(out)
    result = vizkit_cli("run", vizkit_model_file, vizkit_images, *QUICK, "-o", out)
    assert result.exit_code == ExitCode.OK, result.output
    assert os.listdir(reports) == ["out"]


def test_a_usage_error_after_the_claim_lets_the_folder_go(vizkit_cli, vizkit_model_file, tmp_path):
    empty = tmp_path / "no-images"
    empty.mkdir()
    out = tmp_path / "new" / "out"
    result = vizkit_cli("run", vizkit_model_file, empty, *QUICK, "-o", out)
    assert result.exit_code == ExitCode.USAGE_ERROR and "no images found" in result.output
    assert not (tmp_path / "new").exists()  # nothing written: not the lock, not the parents
    assert not report_folder.is_claimed(out)


def test_default_folders_of_simultaneous_runs_do_not_collide(vizkit_cli, vizkit_model_file, vizkit_images, tmp_path,
                                                             monkeypatch):
    """Two runs started in the same second (or with one SOURCE_DATE_EPOCH) pick the same
    default name; the one that claims it second takes the next name."""
    monkeypatch.chdir(tmp_path)
    taken = tmp_path / "reports" / "tiny-20231114-221320"
    with report_folder.claim(taken):
        result = vizkit_cli("run", vizkit_model_file, vizkit_images, *QUICK, env={"SOURCE_DATE_EPOCH": "1700000000"})
    assert result.exit_code == ExitCode.OK, result.output
    assert result.stdout.strip() == os.path.join("reports", "tiny-20231114-221320-2", "index.html")
    assert sorted(os.listdir(tmp_path / "reports")) == ["tiny-20231114-221320-2"]


def test_overwrite_never_replaces_a_pictures_folder_vizkit_did_not_write(vizkit_cli, vizkit_model_file, vizkit_images, tmp_path):
    """--overwrite keeps the user's files; a folder report's pictures/ would replace theirs: refused before any work."""
    out = tmp_path / "out"
    (out / "pictures").mkdir(parents=True)
    (out / "pictures" / "holiday.jpg").write_bytes(b"mine")
    (out / "notes.txt").write_text("mine too")
    result = vizkit_cli("run", vizkit_model_file, vizkit_images, *QUICK, "--overwrite", "-o", out)
    assert result.exit_code == ExitCode.USAGE_ERROR, result.output
    assert "holds a folder pictures/ that vizkit did not write" in result.output
    assert (out / "pictures" / "holiday.jpg").read_bytes() == b"mine"


def test_a_report_folder_holding_someone_elses_pictures_folder_is_not_a_report(vizkit_cli, vizkit_model_file, vizkit_images,
                                                                               old_report):
    """pictures/ and pages/ are vizkit's only in a report of the folder layout: in a
    one-page report's folder they are the user's, and the folder is refused as foreign."""
    (old_report / "pictures").mkdir()
    (old_report / "pictures" / "holiday.jpg").write_bytes(b"mine")
    assert report_folder.classify(old_report) == ("foreign", ["arrays.npz", "index.html", "pictures", "report.json"])
    result = vizkit_cli("run", vizkit_model_file, vizkit_images, *QUICK, "-o", old_report)
    assert result.exit_code == ExitCode.USAGE_ERROR and "holds files vizkit did not write" in result.output
    assert (old_report / "pictures" / "holiday.jpg").read_bytes() == b"mine"
