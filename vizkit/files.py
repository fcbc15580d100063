"""Writing files so that readers never see a partial one."""

from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

#: Flags for a file vizkit creates: never one that exists, never inherited by a child.
_CREATE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)


def write_new(path: Path, data: bytes) -> None:
    """Create ``path`` (it must not exist) holding ``data``, flushed to the disk.

    A full disk or a quota raises ``OSError`` (ENOSPC, EDQUOT) here, not later: some file
    systems (NFS, those that allocate late) report it only on ``fsync`` or ``close``, and
    both are checked. The mode is 0o666 less the umask, as ``open`` gives.
    """
    descriptor = os.open(path, _CREATE_FLAGS, 0o666)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(descriptor, view):]
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def fsync_folder(folder: Path) -> None:
    """Flush a folder's entries (new names, renames) to the disk, where the system
    allows it; best effort: a system that cannot is no error."""
    try:
        descriptor = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


def default_mode(folder: bool = False) -> int:
    """The mode ``open`` (0o666) or ``mkdir`` (0o777) gives under the current umask."""
    umask = os.umask(0)
    os.umask(umask)
    return (0o777 if folder else 0o666) & ~umask


@contextmanager
def atomic_path(final: Path) -> Iterator[Path]:
    """A temporary path beside ``final`` to write to; renamed over ``final`` on success.

    The temporary name ends like ``final`` (Keras insists on ``.keras``) and starts with
    a dot, so an interrupted run leaves at most a hidden ``.NAME.tmp-*`` file behind.
    The file is flushed to the disk before the rename, so a full disk shows as an
    ``OSError`` here and a crash cannot leave an empty ``final``.
    """
    handle, temp = tempfile.mkstemp(dir=final.parent, prefix=f".{final.name}.tmp-", suffix=final.suffix)
    os.close(handle)
    try:
        yield Path(temp)
        os.chmod(temp, default_mode())  # mkstemp makes it private; the result should not be
        descriptor = os.open(temp, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)
        os.replace(temp, final)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise
