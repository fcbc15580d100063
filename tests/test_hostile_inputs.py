"""Hostile inputs (issue 13): files that are not files, names that are not text, values that
are not numbers. Each class gets a clear usage error before any work, or a report that
lists what was skipped; never a hang, a MemoryError or a crash after all the work.

POSIX only where the attack needs it (FIFOs, sockets, non-UTF-8 names); a watchdog turns
a hang into a failure instead of a stuck test session.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
from pathlib import Path

import pytest
from PIL import Image

from conftest import write_image
from vizkit import images as image_io
from vizkit.config import ConfigError, load_settings
from vizkit.labels import LabelsError, read_labels
from vizkit.runner import RunOptions, UsageError, plan
from vizkit.safe_read import UnreadableFile, display_path, path_bytes, read_regular

posix_only = pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs (POSIX)")
#: One technique, no metrics: a whole run on the tiny model in a few seconds.
QUICK = ["-t", "gradcam", "--no-metrics"]


@pytest.fixture(autouse=True)
def watchdog():
    """Fail (SIGALRM raises in the main thread, even in a blocking open) instead of hanging."""
    if not hasattr(signal, "SIGALRM"):
        yield
        return

    def hung(signum, frame):
        raise TimeoutError("hung: a blocking read of a FIFO or device?")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(180)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def _fifo(path: Path) -> Path:
    os.mkfifo(path)
    return path


def _socket(path: Path) -> socket.socket:
    """A listening Unix socket at ``path`` (closed by the caller); skips where impossible."""
    server = socket.socket(socket.AF_UNIX)
    try:
        server.bind(str(path))
    except OSError as error:
        server.close()
        pytest.skip(f"cannot make a Unix socket here: {error}")
    return server


def _odd_name(folder: Path, raw: bytes) -> Path:
    """A file in ``folder`` whose name is the bytes ``raw``; skips where the filesystem
    refuses such names (macOS APFS takes only UTF-8)."""
    path = Path(os.fsdecode(os.fsencode(folder) + b"/" + raw))
    try:
        write_image(path, seed=3)
    except (OSError, UnicodeEncodeError) as error:
        pytest.skip(f"this filesystem refuses the name {raw!r}: {error}")
    return path


def _report(outdir: Path) -> dict:
    data = (outdir / "report.json").read_bytes()
    return json.loads(data.decode("utf-8"))  # strict UTF-8, as every JSON reader expects


# -- 1. inputs that are not regular files -------------------------------------


@posix_only
def test_read_regular_refuses_fifos_devices_and_big_files_without_blocking(tmp_path):
    fifo = _fifo(tmp_path / "pipe")
    with pytest.raises(UnreadableFile, match=r"not a regular file \(a FIFO"):
        read_regular(fifo, 1024)
    if os.path.exists("/dev/zero"):
        with pytest.raises(UnreadableFile, match=r"not a regular file \(a character device\)"):
            read_regular("/dev/zero", 1024)
    big = tmp_path / "big.bin"
    big.write_bytes(b"x" * 2048)
    with pytest.raises(UnreadableFile, match="too large: 2048 bytes, over vizkit's limit of 1024 bytes"):
        read_regular(big, 1024)
    assert read_regular(big, 2048) == b"x" * 2048


@posix_only
def test_read_regular_never_blocks_on_a_fifo_swapped_in_after_the_stat(tmp_path, monkeypatch):
    """The race: the path passed os.stat as a regular file, then became a FIFO. The
    open is non-blocking and fstat checks the descriptor itself."""
    fifo = _fifo(tmp_path / "pipe")
    regular = os.stat(__file__)
    monkeypatch.setattr(os, "stat", lambda path, *args, **kwargs: regular)
    with pytest.raises(UnreadableFile, match="not a regular file"):
        read_regular(fifo, 1024)


@posix_only
def test_image_file_size_is_capped(tmp_path, monkeypatch):
    path = write_image(tmp_path / "a.png", seed=1)
    monkeypatch.setattr(image_io, "MAX_FILE_BYTES", 100)
    result = image_io.load(path, "a", 3, (32, 32))
    assert result.error and "too large" in result.error and "over vizkit's limit of 100 bytes" in result.error
    assert result.array is None


@posix_only
def test_fifos_sockets_and_devices_are_skipped_with_the_reason(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    write_image(folder / "a.png", seed=1)
    fifo = _fifo(folder / "pipe.png")
    server = _socket(folder / "sock.png")
    try:
        found, skipped = image_io.scan([folder, _fifo(tmp_path / "named.png"), Path("/dev/zero")])
    finally:
        server.close()
    assert found == [folder / "a.png"]
    reasons = {entry.path: entry.reason for entry in skipped}
    assert reasons[fifo] == "not a regular file (a FIFO (named pipe))"
    assert reasons[folder / "sock.png"] == "not a regular file (a socket)"
    assert reasons[tmp_path / "named.png"].startswith("not a regular file (a FIFO")
    assert reasons[Path("/dev/zero")] == "not a regular file (a character device)"


@posix_only
@pytest.mark.parametrize("flag", ["--labels", "--config"])
@pytest.mark.parametrize("target", ["fifo", "/dev/zero"])
def test_labels_or_config_that_are_not_regular_files_are_usage_errors(vizkit_cli, vizkit_model_file, image_dir, tmp_path, flag, target):
    source = _fifo(tmp_path / "pipe.txt") if target == "fifo" else Path(target)
    if not source.exists():
        pytest.skip(f"no {target} here")
    result = vizkit_cli("run", vizkit_model_file, image_dir, *QUICK, flag, source, "-o", tmp_path / "out")
    assert result.exit_code == 2, result.output
    assert "not a regular file" in result.output
    assert not (tmp_path / "out").exists()


def test_labels_and_config_files_are_capped(tmp_path, monkeypatch):
    import vizkit.config
    import vizkit.labels

    text = tmp_path / "labels.txt"
    text.write_text("cat\ndog\n" * 100)
    monkeypatch.setattr(vizkit.labels, "MAX_LABELS_BYTES", 64)
    with pytest.raises(LabelsError, match="too large"):
        read_labels(text)
    config = tmp_path / "vizkit.toml"
    config.write_text("[gradcam]\nalpha = 0.5\n" + "# padding\n" * 100)
    monkeypatch.setattr(vizkit.config, "MAX_CONFIG_BYTES", 64)
    with pytest.raises(ConfigError, match="too large"):
        load_settings(config)


def test_deeply_nested_labels_json_is_a_labels_error(tmp_path):
    path = tmp_path / "labels.json"
    path.write_text("[" * 100_000)
    with pytest.raises(LabelsError, match="--labels"):
        read_labels(path)


@posix_only
def test_run_with_fifos_named_and_in_folders_reports_them_skipped(vizkit_cli, vizkit_model_file, image_dir, tmp_path):
    _fifo(image_dir / "stream.png")
    named = _fifo(tmp_path / "named.jpg")
    outdir = tmp_path / "out"
    result = vizkit_cli("run", vizkit_model_file, image_dir, named, *QUICK, "-o", outdir)
    assert result.exit_code == 0, result.output
    data = _report(outdir)
    assert [image["status"] for image in data["images"]] == ["ok", "ok"]
    skipped = {entry["path"]: entry for entry in data["skipped_files"]}
    assert skipped[str(image_dir / "stream.png")]["reason"] == "not a regular file (a FIFO (named pipe))"
    assert skipped[str(named)]["path_bytes"] is None
    assert f"skipped {named}: not a regular file" in result.stderr
    page = (outdir / "index.html").read_text(encoding="utf-8")
    assert "stream.png</code>: not a regular file (a FIFO (named pipe))" in page


@posix_only
def test_only_non_regular_inputs_is_a_usage_error_that_says_why(vizkit_cli, vizkit_model_file, tmp_path):
    result = vizkit_cli("run", vizkit_model_file, _fifo(tmp_path / "p.png"), *QUICK, "-o", tmp_path / "out")
    assert result.exit_code == 2, result.output
    assert "no images found" in result.output and "not a regular file (a FIFO" in result.output


# -- 2. file names that are not UTF-8 -----------------------------------------


def test_display_path_escapes_and_path_bytes_round_trips():
    name = os.fsdecode(b"caf\xe9.png")
    assert display_path(name) == "caf\\xe9.png"
    assert os.fsdecode(bytes.fromhex(path_bytes(name))) == name
    assert display_path("café.png") == "café.png" and path_bytes("café.png") is None
    assert display_path(b"caf\xe9.png") == "caf\\xe9.png"


@posix_only
def test_run_on_a_folder_with_a_non_utf8_name_writes_the_report(vizkit_cli, vizkit_model_file, image_dir, tmp_path):
    odd = _odd_name(image_dir, b"caf\xe9.png")
    (image_dir / os.fsdecode(b"notes-\xff.txt")).write_text("not an image")
    model = vizkit_model_file.rename(vizkit_model_file.with_name(os.fsdecode(b"t\xe9ny.keras")))
    outdir = tmp_path / os.fsdecode(b"out-\xe9")
    result = vizkit_cli("run", model, image_dir, *QUICK, "-o", outdir)
    assert result.exit_code == 0, result.output
    assert result.stdout.strip().endswith("out-\\xe9/index.html")
    data = _report(outdir)
    assert data["model"]["source"].endswith("t\\xe9ny.keras")
    paths = {image["path"]: image for image in data["images"]}
    shown = display_path(odd)
    assert shown.endswith("caf\\xe9.png") and paths[shown]["status"] == "ok"
    assert os.fsdecode(bytes.fromhex(paths[shown]["path_bytes"])) == str(odd)  # the exact name, kept
    skipped = data["skipped_files"][0]
    assert skipped["path"].endswith("notes-\\xff.txt")
    assert os.fsdecode(bytes.fromhex(skipped["path_bytes"])) == str(image_dir / os.fsdecode(b"notes-\xff.txt"))
    page = (outdir / "index.html").read_bytes().decode("utf-8")
    assert "caf\\xe9.png" in page
    assert (outdir / "report.json").read_bytes().decode("utf-8")


# -- 3. control characters in names -------------------------------------------


@posix_only
def test_escape_characters_in_names_never_reach_the_terminal(vizkit_cli, vizkit_model_file, image_dir, tmp_path):
    red = write_image(image_dir / "red\x1b[31m.png", seed=4)
    broken = image_dir / "bad\x1b]0;owned\x07.png"
    broken.write_bytes(b"not an image")
    _fifo(image_dir / "clear\x1b[2J.png")
    outdir = tmp_path / "out"
    result = vizkit_cli("run", vizkit_model_file, image_dir, *QUICK, "-o", outdir)
    assert result.exit_code == 1, result.output  # the broken image
    assert "\x1b" not in result.output and "\x07" not in result.output
    assert "bad\\x1b]0;owned\\x07.png" in result.stderr
    assert "clear\\x1b[2J.png: not a regular file" in result.stderr
    page = (outdir / "index.html").read_text(encoding="utf-8")
    assert "\x1b" not in page and "red\\x1b[31m.png" in page
    assert display_path(red) in {image["path"] for image in _report(outdir)["images"]}


def test_usage_errors_quoting_a_path_show_its_escapes_escaped(vizkit_cli, image_dir, tmp_path):
    """Messages vizkit does not word itself (a model loader's) go through one filter too."""
    result = vizkit_cli("run", tmp_path / "model\x1b[2J.keras", image_dir, *QUICK, "-o", tmp_path / "out")
    assert result.exit_code == 2, result.output
    assert "\x1b" not in result.output and "model\\x1b[2J.keras" in result.output


def test_display_path_escapes_controls_and_bidi_overrides():
    assert display_path("a\x1b[2Jb\nc\x7f\x9b.png") == "a\\x1b[2Jb\\nc\\x7f\\x9b.png"
    assert display_path("invoice\u202egnp.exe") == "invoice\\u202egnp.exe"
    assert display_path("日本語 photo.png") == "日本語 photo.png"


# -- 4. folders that cannot be listed, links that lead nowhere ----------------


def test_a_folder_that_cannot_be_listed_is_skipped_with_the_reason(tmp_path, monkeypatch):
    """Simulated (root reads everything): os.scandir fails on one folder, as chmod 000 would."""
    root = tmp_path / "photos"
    (root / "locked").mkdir(parents=True)
    write_image(root / "locked" / "hidden-from-us.png", seed=1)
    write_image(root / "a.png", seed=2)
    real_scandir = os.scandir

    def scandir(path):
        if Path(path) == root / "locked":
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    found, skipped = image_io.scan([root])
    assert found == [root / "a.png"]
    assert [(entry.path, entry.reason) for entry in skipped] == [
        (root / "locked", "cannot list this folder: Permission denied")
    ]


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root reads any folder")
def test_a_chmod_000_folder_is_skipped_with_the_reason(tmp_path):
    root = tmp_path / "photos"
    locked = root / "locked"
    locked.mkdir(parents=True)
    write_image(root / "a.png", seed=2)
    locked.chmod(0)
    try:
        found, skipped = image_io.scan([root])
    finally:
        locked.chmod(stat.S_IRWXU)
    assert found == [root / "a.png"]
    assert skipped[0].path == locked and "Permission denied" in skipped[0].reason


@posix_only
def test_broken_links_and_links_to_folders_are_listed(tmp_path):
    root = tmp_path / "photos"
    root.mkdir()
    write_image(root / "a.png", seed=2)
    (root / "gone.png").symlink_to(tmp_path / "nowhere.png")
    (root / "loop").symlink_to(root)
    found, skipped = image_io.scan([root])
    assert found == [root / "a.png"]
    assert {entry.path.name: entry.reason for entry in skipped} == {
        "gone.png": "a broken symbolic link",
        "loop": "a link to a folder (not followed)",
    }


def test_unreadable_named_file_is_an_image_error_not_a_crash(tmp_path, monkeypatch):
    path = write_image(tmp_path / "a.png", seed=2)
    real_open = os.open

    def deny(target, *args, **kwargs):
        if Path(target) == path:
            raise PermissionError(13, "Permission denied", str(target))
        return real_open(target, *args, **kwargs)

    monkeypatch.setattr(os, "open", deny)
    result = image_io.load(path, "a", 3, (32, 32))
    assert result.error == "cannot read the file: Permission denied"


# -- 5. SOURCE_DATE_EPOCH and pyproject.toml validated up front ----------------


@pytest.mark.parametrize("value", ["²", "٣", "99999999999999999999", "253402300800", "-1", "1.5"])
def test_bad_source_date_epoch_is_a_usage_error_before_any_work(vizkit_cli, vizkit_model_file, image_dir, tmp_path, value):
    result = vizkit_cli("run", vizkit_model_file, image_dir, *QUICK, "-o", tmp_path / "out", env={"SOURCE_DATE_EPOCH": value})
    assert result.exit_code == 2, result.output
    assert "SOURCE_DATE_EPOCH" in result.output and "seconds since 1970" in result.output
    assert not (tmp_path / "out").exists()


def test_source_date_epoch_at_the_end_of_year_9999_still_works(monkeypatch):
    from vizkit.runner import created_at

    monkeypatch.setenv("SOURCE_DATE_EPOCH", "253402300799")
    assert created_at(True).isoformat() == "9999-12-31T23:59:59+00:00"


@pytest.mark.parametrize(
    "text, name",
    [("tool = 1\n", "tool"), ("[tool]\nvizkit = 'gradcam'\n", "tool.vizkit"), ("tool = [1, 2]\n", "tool")],
)
def test_pyproject_whose_tool_is_not_a_table_is_a_usage_error(vizkit_cli, vizkit_model_file, image_dir, tmp_path, monkeypatch, text, name):
    project = tmp_path / "project"
    project.mkdir()
    (project / "pyproject.toml").write_text(text)
    monkeypatch.chdir(project)
    result = vizkit_cli("run", vizkit_model_file, image_dir, *QUICK, "-o", tmp_path / "out")
    assert result.exit_code == 2, result.output
    assert f"{name} is a" in result.output and "not a table" in result.output and "--config" in result.output
    assert "Traceback" not in result.output


@posix_only
def test_pyproject_that_is_a_fifo_is_a_usage_error_not_a_hang(tmp_path):
    _fifo(tmp_path / "pyproject.toml")
    with pytest.raises(ConfigError, match="not a regular file"):
        load_settings(None, cwd=tmp_path)


# -- 6. --size bounded, upscaling bounded ---------------------------------------


@pytest.mark.parametrize("command", ["run", "layers"])
def test_size_beyond_the_cap_is_a_usage_error(vizkit_cli, vizkit_model_file, image_dir, tmp_path, command):
    extra = [image_dir, *QUICK, "-o", tmp_path / "out"] if command == "run" else []
    result = vizkit_cli(command, vizkit_model_file, *extra, "--size", "40000")
    assert result.exit_code == 2, result.output
    assert "40000" in result.output and str(image_io.MAX_SIZE) in result.output
    assert not (tmp_path / "out").exists()


def test_size_beyond_the_cap_is_a_usage_error_in_python_too():
    with pytest.raises(UsageError, match="size 40000 is outside 8-4096"):
        plan(RunOptions(size=40000))


def test_upscaling_past_the_pixel_limit_is_an_image_error_not_a_memory_error(tmp_path, monkeypatch):
    path = tmp_path / "dot.png"
    Image.new("RGB", (1, 1), (9, 9, 9)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    result = image_io.load(path, "dot", 3, (40, 40))
    assert result.array is None
    assert "cannot resize the image to 40×40" in result.error and "MAX_IMAGE_PIXELS" in result.error
    ok = image_io.load(path, "dot", 3, (20, 20))  # 400 pixels: within the limit
    assert ok.error is None and ok.array.shape == (20, 20, 3)


def test_a_model_that_is_a_fifo_or_a_device_is_refused(vizkit_cli, vizkit_images, tmp_path):
    fifo = tmp_path / "model.keras"
    os.mkfifo(fifo)
    for model in (fifo, "/dev/zero.keras"):
        result = vizkit_cli("run", model, vizkit_images, "-o", tmp_path / "out")
        assert result.exit_code == 2, result.output
    assert "is not a regular file" in vizkit_cli("run", fifo, vizkit_images, "-o", tmp_path / "out").output
    assert not (tmp_path / "out").exists()


def test_overlapping_inputs_list_each_skipped_file_once(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "notes.txt").write_text("not an image")
    write_image(tmp_path / "sub" / "cat.png")
    files, skipped = image_io.scan([tmp_path, tmp_path / "sub", tmp_path])
    assert [path.name for path in files] == ["cat.png"]
    assert [entry.path.name for entry in skipped] == ["notes.txt"]
