"""Publishing a report folder whole: readers see the earlier report or the new one, never a mix.

A run **claims** its folder before any work (:func:`claim`, called by
``runner.check_outdir``). The folder must be new, empty or a vizkit report (a folder
holding only ``index.html``, ``report.json``, ``arrays.npz`` and the folders
``pages`` and ``pictures``, whose ``report.json`` starts with vizkit's ``vizkit_version`` key); a folder holding anything else is refused
(:class:`NotAReportFolder`) unless the caller passes ``overwrite``. The claim takes a
lock (``flock``) on a hidden file beside the folder, ``.NAME.vizkit-lock``, so a second
run on the same folder fails at once (:class:`FolderBusy`) instead of racing the first.
The lock is held until the report is in place, or until the run ends however it ends
(:func:`releasing_claims`); the lock file goes with the lock. A process that dies
holding it loses the lock (the OS drops it), and the file it leaves blocks nothing:
only the lock counts.

:meth:`ReportFolder.publish` writes every file into a hidden sibling folder (same
parent, so the rename below is atomic): the run's :meth:`ReportFolder.partial` folder,
``.NAME.vizkit-partial``, which already holds what the run wrote as it went (its
pictures), or a new ``.NAME.vizkit-new-*``; each file flushed to the disk, so a full
disk fails here, before anything a reader sees changed. Then it swaps:

- no folder yet: one rename, new → NAME;
- an earlier report, or an empty folder: NAME → ``.NAME.vizkit-old-*`` (the backup),
  new → NAME, and the backup is deleted. If the second rename fails, the first is
  undone. A process killed between the two renames leaves the earlier report in the
  backup: the next claim of NAME puts it back, and deletes leftover temporary folders.

NAME is missing for an instant between the two renames, but never holds a mix. On
Linux, ``renameat2(RENAME_EXCHANGE)`` could close that instant; plain renames work on
every POSIX system and from Python's standard library. A folder that cannot be renamed
(a mount point, or one whose parent vizkit may not write) and, with ``overwrite``, a
folder holding other files, are filled instead: the files are written into a hidden
``.vizkit-new-*`` folder inside it, then renamed into place one by one, the page last;
there, only a crash in the instant between those renames can leave a mix.

Any ``OSError`` while publishing (ENOSPC, EDQUOT, EIO, EROFS, …) becomes
:class:`ReportNotWritten`, whose message is one line: ``no space left on out: nothing
was written``. The CLI exits with ``ExitCode.WRITE_ERROR`` (4) for it.
"""

from __future__ import annotations

import errno
import functools
import hashlib
import os
import re
import secrets
import shutil
import stat
import sys
import tempfile
import time
from contextvars import ContextVar
from pathlib import Path
from typing import Callable

from vizkit import files as file_io
from vizkit.safe_read import describe_os_error, display_path

try:
    import fcntl
except ImportError:  # Windows: no flock; runs on one folder are not serialized there
    fcntl = None

#: The files of a report folder, in the order they are put in place: the page last.
REPORT_FILES = ("arrays.npz", "report.json", "index.html")
#: The folders of a report in the folder layout: its pictures and its pages of images.
REPORT_FOLDERS = ("pictures", "pages")
#: The kind of hidden folder (``.NAME.vizkit-partial``, or ``.vizkit-partial`` inside the
#: folder) where a run writes as it goes; it stays after an interrupted run, for --resume.
PARTIAL = "partial"
#: The start of the names vizkit gives its own temporary entries inside a folder.
INNER_PREFIX = ".vizkit-"
#: ``report.json`` as vizkit writes it: a JSON object whose first key is vizkit_version.
_MARKER = re.compile(rb'\A\s*\{\s*"vizkit_version"\s*:')
_FOLDER_LAYOUT = re.compile(rb'\n  "layout": "folder",\n')
#: Longest folder name (in bytes) used as it is in its siblings' names; longer ones are hashed.
_NAME_IN_SIBLINGS = 160
_OPEN_FLAGS = os.O_RDONLY | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOFOLLOW", 0)


class FolderRefused(ValueError):
    """A folder vizkit will not write into: a usage error, raised before any work."""

    def __init__(self, folder: Path, message: str):
        super().__init__(message)
        self.folder = folder


class NotAReportFolder(FolderRefused):
    """The folder holds files vizkit did not write (``foreign``: their names)."""

    def __init__(self, folder: Path, foreign: list[str]):
        shown = ", ".join(display_path(name) for name in foreign[:3]) + (", …" if len(foreign) > 3 else "")
        super().__init__(folder, f"{display_path(folder)} holds files vizkit did not write ({shown})")
        self.foreign = foreign


class FolderBusy(FolderRefused):
    """Another vizkit run holds the folder's lock."""

    def __init__(self, folder: Path):
        super().__init__(folder, f"another vizkit run is writing {display_path(folder)}")


class ReportNotWritten(OSError):
    """The report could not be put in its folder (no space left, a quota, a read-only or
    failing disk): nothing was written, and an earlier report there is unchanged.
    ``str()`` is a one-line message; ``errno`` is the system's, ``folder`` the folder."""

    def __init__(self, code: int | None, message: str, folder: Path):
        super().__init__(code, message)
        self.message = message
        self.folder = folder

    def __str__(self) -> str:
        return self.message

    @classmethod
    def of(cls, error: OSError, folder: Path, kept: bool) -> ReportNotWritten:
        where = display_path(folder)
        if error.errno == errno.ENOSPC:
            text = f"no space left on {where}: nothing was written"
        elif error.errno == getattr(errno, "EDQUOT", None):
            text = f"disk quota exceeded on {where}: nothing was written"
        else:
            text = f"could not write {where}: {describe_os_error(error)}: nothing was written"
        return cls(error.errno, text + ("; the report already there is unchanged" if kept else ""), folder)


def _inner_temporary(name: str) -> bool:
    """One of the names vizkit itself makes inside a folder (its lock, a ``new-*`` folder
    of files being written): a user's own ``.vizkit-notes`` is not one."""
    return name in (f"{INNER_PREFIX}lock", f"{INNER_PREFIX}{PARTIAL}") or re.fullmatch(re.escape(INNER_PREFIX) + r"new-[A-Za-z0-9_]+", name) is not None


def classify(folder: Path) -> tuple[str, list[str]]:
    """``(kind, foreign)``: kind is ``missing``, ``empty``, ``report`` (a vizkit report)
    or ``foreign``, with the names of the entries vizkit did not write. vizkit's own
    temporary entries (``.vizkit-*``) do not count."""
    try:
        names = sorted(entry.name for entry in os.scandir(folder) if not _inner_temporary(entry.name))
    except FileNotFoundError:
        return "missing", []
    if not names:
        return "empty", []
    foreign = [
        name for name in names
        if not (name in REPORT_FILES and _is_regular(folder / name))
        and not (name in REPORT_FOLDERS and os.path.isdir(folder / name) and not os.path.islink(folder / name))
    ]
    if foreign:
        return "foreign", foreign
    folders = [name for name in names if name in REPORT_FOLDERS]
    if "report.json" in names and _is_vizkit_json(folder / "report.json", folder_layout=bool(folders)):
        return "report", []
    return "foreign", names  # an index.html or report.json of someone else's


def _is_regular(path: Path) -> bool:
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except OSError:
        return False


def _is_vizkit_json(path: Path, folder_layout: bool = False) -> bool:
    """``report.json`` as vizkit writes it (with ``folder_layout``: of a report in the
    folder layout, whose pictures/ and pages/ vizkit wrote)."""
    try:
        descriptor = os.open(path, _OPEN_FLAGS | getattr(os, "O_NONBLOCK", 0))
    except OSError:
        return False
    try:
        start = os.read(descriptor, 4096)
        return bool(_MARKER.match(start)) and (not folder_layout or _FOLDER_LAYOUT.search(start) is not None)
    except OSError:
        return False
    finally:
        os.close(descriptor)


# --------------------------------------------------------------------------- claims

#: The folders claimed inside the innermost :func:`releasing_claims` call, to release.
_scope: ContextVar[list | None] = ContextVar("vizkit_claimed_folders", default=None)


def releasing_claims(function):
    """Decorator: every folder claimed while ``function`` runs is released when it
    returns or raises, Ctrl-C included (``vizkit.run`` is decorated so)."""

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        claimed: list[ReportFolder] = []
        token = _scope.set(claimed)
        try:
            return function(*args, **kwargs)
        finally:
            _scope.reset(token)
            for folder in reversed(claimed):
                folder.release()

    return wrapper


def claim(path: Path, overwrite: bool = False) -> ReportFolder:
    """Lock ``path`` for this run and check it can take a report; FolderRefused if not
    (ReportNotWritten if even the lock file cannot be made: a full disk).

    Missing parent folders are created (and removed again if nothing is published).
    Inside :func:`releasing_claims` the claim is released when that call ends; else
    release it yourself (``with claim(path) as folder:``).
    """
    folder = ReportFolder(path, overwrite)
    try:
        try:
            folder._acquire()
        except FolderRefused:
            raise
        except OSError as error:  # the lock file cannot be made: a full disk, say
            raise ReportNotWritten.of(error, folder.path, kept=False) from error
        folder._recover()
        try:
            kind, foreign = classify(folder.real)
        except OSError as error:
            raise FolderRefused(folder.path, f"{display_path(folder.path)} cannot be read: {describe_os_error(error)}") from None
        if kind == "foreign" and not overwrite:
            raise NotAReportFolder(folder.path, foreign)
        mine = [name for name in REPORT_FOLDERS if os.path.lexists(folder.real / name)]
        if kind == "foreign" and mine:  # --overwrite keeps other files, but these it would replace
            raise FolderRefused(
                folder.path, f"{display_path(folder.path)} holds a folder {mine[0]}/ that vizkit did not write, and a "
                f"report in the folder layout replaces it: move it, or pick another folder",
            )
    except BaseException:
        folder.release()
        raise
    scope = _scope.get()
    if scope is not None:
        scope.append(folder)
    return folder


def claim_new(make: Callable[[], Path]) -> ReportFolder:
    """Claim a new folder, the one ``make()`` names (``runner.default_outdir``); ``make``
    is asked again while another run takes that name first."""
    for _ in range(200):
        path = make()
        try:
            folder = claim(path)
        except FolderBusy:
            time.sleep(0.01)
            continue
        except NotAReportFolder:
            continue
        if classify(folder.real)[0] == "missing":
            return folder
        folder.release()
    raise FolderBusy(path)


def is_claimed(path: Path) -> bool:
    """Whether a vizkit run holds ``path``'s lock now. The probe holds a shared lock for
    an instant: a claim made in that instant fails as if the folder were busy."""
    if fcntl is None:
        return False
    try:
        descriptor = os.open(ReportFolder(path)._lock_location(), _OPEN_FLAGS)
    except OSError:
        return False
    try:
        fcntl.flock(descriptor, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        return True
    finally:
        os.close(descriptor)  # drops the probe's lock with it
    return False


class ReportFolder:
    """A report folder claimed by this run (:func:`claim`): locked, checked, and written
    whole by :meth:`publish`. ``path`` is the folder as given, ``real`` with links resolved."""

    def __init__(self, path: Path, overwrite: bool = False):
        self.path = Path(path)
        self.real = Path(os.path.realpath(self.path))
        self.overwrite = overwrite
        self.published = False
        self._claimed = False
        self._lock_descriptor: int | None = None
        self._lock_path: Path | None = None
        self._made: list[Path] = []  # parent folders this claim created

    def __enter__(self) -> ReportFolder:
        return self

    def __exit__(self, *exc_info) -> None:
        self.release()

    def __repr__(self) -> str:
        return f"ReportFolder({str(self.path)!r}, claimed={self._claimed}, published={self.published})"

    # ------------------------------------------------------------------- naming

    def _sibling(self, kind: str) -> str:
        """``.NAME.vizkit-KIND``: a hidden name beside the folder."""
        name = self.real.name
        if len(os.fsencode(name)) > _NAME_IN_SIBLINGS:  # keep within the 255-byte limit
            name = hashlib.sha256(os.fsencode(name)).hexdigest()[:32]
        return f".{name}.vizkit-{kind}"

    def _renamable(self) -> bool:
        """Whether the folder itself may be renamed: its parent writable, not a mount
        point, and not this process's working folder or one above it (a shell in it
        would be left in the deleted backup)."""
        try:
            cwd = os.getcwd()
        except OSError:  # this process's working folder was deleted: it is inside nothing
            cwd = ""
        inside = cwd == str(self.real) or cwd.startswith(str(self.real).rstrip(os.sep) + os.sep)
        return os.access(self.real.parent, os.W_OK) and not os.path.ismount(self.real) and not inside

    def _lock_location(self) -> Path:
        if os.path.isdir(self.real) and not os.access(self.real.parent, os.W_OK):
            return self.real / f"{INNER_PREFIX}lock"
        return self.real.parent / self._sibling("lock")

    # ------------------------------------------------------------------- locking

    def _acquire(self) -> None:
        missing = []
        for parent in self.real.parents:
            if os.path.isdir(parent):
                break
            missing.append(parent)
        for parent in reversed(missing):
            try:
                os.mkdir(parent)
                self._made.append(parent)
            except FileExistsError:
                pass
        self._claimed = True
        if fcntl is None:
            return
        location = self._lock_location()
        for _ in range(100):
            descriptor = os.open(location, _OPEN_FLAGS | os.O_CREAT, 0o666)
            try:
                fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(descriptor)
                raise FolderBusy(self.path) from None
            except BaseException:
                os.close(descriptor)
                raise
            # The run before us may have removed the file as it let go: lock the file
            # that is there now, or two runs would each hold a lock of their own.
            mine = os.fstat(descriptor)
            try:
                there = os.stat(location, follow_symlinks=False)
            except FileNotFoundError:
                there = None
            if there is not None and (there.st_dev, there.st_ino) == (mine.st_dev, mine.st_ino):
                self._lock_descriptor, self._lock_path = descriptor, location
                return
            os.close(descriptor)
        raise FolderBusy(self.path)

    def release(self) -> None:
        """Let the folder go (idempotent): the lock and its file; and the parent folders
        the claim created, if no report was published into them."""
        self._claimed = False
        descriptor, self._lock_descriptor = self._lock_descriptor, None
        if descriptor is not None:
            try:
                os.unlink(self._lock_path)  # while still locked: see _acquire
            except OSError:
                pass
            os.close(descriptor)
        made, self._made = self._made, []
        if not self.published:
            for parent in reversed(made):
                try:
                    os.rmdir(parent)
                except OSError:
                    pass

    def _recover(self) -> None:
        """Under the lock: put back an earlier report that a killed run had moved aside,
        and delete the temporary folders killed runs left."""
        backups = []
        for folder, prefix in ((self.real.parent, self._sibling("")), (self.real, INNER_PREFIX)):
            try:
                entries = [entry for entry in os.scandir(folder) if entry.name.startswith(prefix)]
            except OSError:
                continue
            for entry in entries:
                kind = entry.name[len(prefix):]
                if kind.startswith("new-") and entry.is_dir(follow_symlinks=False):
                    shutil.rmtree(entry.path, ignore_errors=True)
                elif folder == self.real.parent and kind.startswith("old-") and entry.is_dir(follow_symlinks=False):
                    backups.append(Path(entry.path))
        if backups and not os.path.lexists(self.real):
            latest = max(backups, key=lambda backup: backup.stat().st_mtime)
            try:
                os.rename(latest, self.real)
                backups.remove(latest)
                print(f"vizkit: put back the report in {display_path(self.path)} that an interrupted run had moved aside",
                      file=sys.stderr)
            except OSError:
                pass
        for backup in backups:
            shutil.rmtree(backup, ignore_errors=True)

    # ------------------------------------------------------------------- publishing

    def partial(self) -> Path:
        """The hidden folder where this run writes as it goes (pictures, and what
        ``--resume`` reads): beside the folder, or inside it where the folder cannot be
        renamed. Published by :meth:`publish` (``staged``); kept when the run stops short."""
        beside, inside = self.real.parent / self._sibling(PARTIAL), self.real / f"{INNER_PREFIX}{PARTIAL}"
        for found in (beside, inside):  # where an earlier run wrote, from another working folder say
            if os.path.isdir(found):
                return found
        return beside if self._renamable() else inside

    def publish(self, files: dict[str, bytes], staged: Path | None = None, drop: tuple[str, ...] = ()) -> Path:
        """Put ``files`` (name → bytes) in the folder as a whole, replacing what vizkit
        wrote there before (a stale ``arrays.npz`` included); returns the page's path.
        ``staged``: the :meth:`partial` folder, holding what the run already wrote (its
        pictures), published with the files but for its entries named in ``drop`` (the
        run's own records; deleted); it stays as it was if publishing fails.

        ReportNotWritten for any OSError on the way: the folder is then as it was. The
        claim is released once the report is in place.
        """
        if not self._claimed:
            raise RuntimeError(f"{self!r}: publish() needs a claimed folder (vizkit.report_folder.claim)")
        kind, backup = "missing", None
        try:
            kind, foreign = classify(self.real) if os.path.isdir(self.real) else ("missing", [])
            if kind == "foreign" and not self.overwrite:  # files were added during the run
                raise ReportNotWritten(
                    errno.EEXIST, f"{display_path(self.path)} now holds files vizkit did not write "
                    f"({', '.join(map(display_path, foreign[:3]))}): nothing was written", self.path,
                )
            if kind == "missing" or (kind in ("empty", "report") and self._renamable()):
                backup = self._swap(files, replace=kind != "missing", staged=staged, drop=drop)
            else:
                self._fill(files, staged, drop)
        except ReportNotWritten:
            raise
        except OSError as error:
            raise ReportNotWritten.of(error, self.path, kept=kind == "report") from error
        self.published = True
        try:
            self.release()
            if backup is not None:
                shutil.rmtree(backup, ignore_errors=True)  # else the next claim deletes it
        except KeyboardInterrupt as interrupt:
            interrupt.vizkit_written = self.path  # the CLI says the report is in place
            raise
        return self.path / "index.html"

    def _write_all(self, folder: Path, files: dict[str, bytes], drop: tuple[str, ...] = ()) -> list[str]:
        """Write ``files`` (names may have folders: ``pages/images-1.html``) into
        ``folder``; returns the top-level entries of the report but ``drop``, in
        publishing order."""
        for name in files:
            if "/" in name:
                (folder / name).parent.mkdir(parents=True, exist_ok=True)
            file_io.write_new(folder / name, files[name])
        entries = sorted(entry.name for entry in os.scandir(folder) if entry.name not in drop)
        first = [name for name in entries if name not in REPORT_FILES]  # folders before the page
        return first + [name for name in REPORT_FILES if name in entries]

    def _swap(self, files: dict[str, bytes], replace: bool, staged: Path | None = None, drop: tuple[str, ...] = ()) -> Path | None:
        """Write a new folder beside this one (or complete ``staged``, its ``drop``
        entries moved aside first, and back if this fails) and rename it over this one;
        returns the backup of the earlier folder (to delete), if there was one."""
        parent = self.real.parent
        mode = stat.S_IMODE(os.stat(self.real).st_mode) if replace else file_io.default_mode(folder=True)
        new = staged or Path(tempfile.mkdtemp(dir=parent, prefix=self._sibling("new-")))
        backup = parent / f"{self._sibling('old-')}{secrets.token_hex(4)}" if replace else None
        aside = Path(tempfile.mkdtemp(dir=parent, prefix=self._sibling("new-drop-"))) if staged and drop else None
        try:
            self._write_all(new, files)
            for name in drop if aside else ():
                if os.path.lexists(new / name):
                    os.rename(new / name, aside / name)
            os.chmod(new, mode)  # mkdtemp makes it private
            file_io.fsync_folder(new)
            if backup is not None:
                os.rename(self.real, backup)
            os.rename(new, self.real)
        except BaseException:
            if backup is not None and os.path.lexists(backup) and not os.path.lexists(self.real):
                try:
                    os.rename(backup, self.real)  # undo: the earlier report is back
                except OSError:
                    pass  # the next claim puts it back
            for name in os.listdir(aside) if aside and os.path.isdir(new) else ():
                os.rename(aside / name, new / name)  # the partial folder as it was, for --resume
            raise
        finally:
            if staged is None:
                shutil.rmtree(new, ignore_errors=True)  # gone already when the rename worked
            if aside is not None:
                shutil.rmtree(aside, ignore_errors=True)
        file_io.fsync_folder(parent)
        return backup

    def _fill(self, files: dict[str, bytes], staged: Path | None = None, drop: tuple[str, ...] = ()) -> None:
        """Write the files into a hidden folder inside this one (or complete ``staged``),
        then rename them into it; an earlier report's entries the new one lacks go."""
        new = staged or Path(tempfile.mkdtemp(dir=self.real, prefix=f"{INNER_PREFIX}new-"))
        trash = Path(tempfile.mkdtemp(dir=self.real, prefix=f"{INNER_PREFIX}new-old-"))
        try:
            entries = self._write_all(new, files, drop)
            # the earlier report's folders, and its files the new one lacks, go aside by
            # a rename each (a folder cannot be replaced by one), then the new entries in
            for name in (*REPORT_FOLDERS, *REPORT_FILES):
                if os.path.lexists(self.real / name) and (name in REPORT_FOLDERS or name not in entries):
                    os.rename(self.real / name, trash / name)
            for name in entries:
                os.replace(new / name, self.real / name)
        except BaseException:
            if staged is None:
                shutil.rmtree(new, ignore_errors=True)
            raise
        finally:
            shutil.rmtree(trash, ignore_errors=True)
        shutil.rmtree(new, ignore_errors=True)  # what is left: the dropped entries
        file_io.fsync_folder(self.real)
