"""Reading user files safely, and showing their names safely.

A path named by a user can be anything the OS allows: a FIFO (opening it for reading
blocks until a writer comes), ``/dev/zero`` (endless), a file of many GiB, or a name that
is not UTF-8 or holds terminal escape sequences. Images, ``--labels`` and ``--config``
(or pyproject.toml) are read with :func:`read_regular`, and the paths vizkit prints or
puts in a report go through :func:`display_path`.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import stat
from pathlib import Path

MIB = 1024 * 1024

#: What :func:`file_kind` calls each kind of file that is not a regular file.
_KINDS = (
    (stat.S_ISDIR, "a folder"),
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISLNK, "a symbolic link"),
)

#: Characters that can move a terminal's cursor, change its colours or reorder the text
#: around them (bidirectional controls, as in "Trojan Source"), beside the C0/C1 controls.
_BIDI_CONTROLS = frozenset("\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")
_LINE_SEPARATORS = frozenset("\u2028\u2029\x85")

#: Flags for opening a user's file: never wait on a FIFO that slipped past the stat
#: check, never become a terminal's controlling process, never leak into a child.
_OPEN_FLAGS = (
    os.O_RDONLY
    | getattr(os, "O_NONBLOCK", 0)
    | getattr(os, "O_NOCTTY", 0)
    | getattr(os, "O_CLOEXEC", 0)
    | getattr(os, "O_BINARY", 0)
)


class UnreadableFile(OSError):
    """A file vizkit will not or cannot read; ``str()`` is the reason, without the path
    (callers put the path in front, shown with :func:`display_path`)."""


def file_kind(mode: int) -> str:
    """``a FIFO (named pipe)``, ``a folder``, …: what a ``st_mode`` is, for messages."""
    return next((name for test, name in _KINDS if test(mode)), "not a regular file")


def not_regular_reason(mode: int) -> str | None:
    """None for a regular file, else ``not a regular file (a FIFO (named pipe))`` and so on:
    the one wording every skipped or refused input uses."""
    return None if stat.S_ISREG(mode) else f"not a regular file ({file_kind(mode)})"


def describe_os_error(error: OSError) -> str:
    """The reason of an OSError without its file name (shown apart, escaped), e.g.
    ``Permission denied``: ``str(error)`` would repeat the raw name."""
    if isinstance(error, UnreadableFile):
        return str(error)
    return error.strerror or type(error).__name__


def size_text(size: int) -> str:
    """``3.5 MiB``, ``120 bytes``: sizes for people."""
    return f"{size / MIB:.1f} MiB" if size >= MIB else f"{size} bytes"


def read_regular(path: str | os.PathLike, limit: int) -> bytes:
    """The bytes of ``path`` if it is a regular file of at most ``limit`` bytes.

    Anything else raises :class:`UnreadableFile` (an OSError) before a byte is read: a
    FIFO, socket or device is refused after ``os.stat`` without being opened (opening a
    FIFO blocks), and checked again with ``fstat`` on the open descriptor (opened
    non-blocking) in case the path was swapped in between. The size is checked before
    reading and while reading, so a file that grows cannot exceed ``limit`` either.
    OSError from the system (permission denied, missing file) passes through.
    """
    reason = not_regular_reason(os.stat(path).st_mode)
    if reason:
        raise UnreadableFile(reason)
    descriptor = os.open(path, _OPEN_FLAGS)
    try:
        info = os.fstat(descriptor)
        reason = not_regular_reason(info.st_mode)
        if reason:
            raise UnreadableFile(reason)
        if info.st_size > limit:
            raise UnreadableFile(_too_large(info.st_size, limit))
        return _read_at_most(descriptor, limit)
    finally:
        os.close(descriptor)


def _read_at_most(descriptor: int, limit: int) -> bytes:
    """Read to the end, refusing to hold more than ``limit`` bytes (a file still growing)."""
    chunks, total = [], 0
    while True:
        chunk = os.read(descriptor, min(MIB, limit + 1 - total))
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)
        total += len(chunk)
        if total > limit:
            raise UnreadableFile(_too_large(total, limit, growing=True))


def _too_large(size: int, limit: int, growing: bool = False) -> str:
    what = "more than " if growing else ""
    return f"too large: {what}{size_text(size)}, over vizkit's limit of {size_text(limit)}"


def display_path(path: str | bytes | os.PathLike) -> str:
    """A path as text that is safe to print to a terminal and to encode as UTF-8.

    Bytes that are not UTF-8 (names Python holds as surrogate escapes) become ``\\xe9``;
    control characters (ESC, newline, DEL, C1), line separators and bidirectional
    controls become ``\\x1b``, ``\\n``, ``\\u202e``. Other text, any script, is kept. The
    one function for every path vizkit prints or puts in a report (:func:`report_path`
    for the inputs a report lists), so a name cannot crash the rendering
    (UnicodeEncodeError) or take over the terminal. Lossy only for such names:
    :func:`path_bytes` keeps their exact bytes.
    """
    return printable(os.fsdecode(path) if isinstance(path, bytes) else os.fspath(path))


def report_path(path: str | bytes | os.PathLike) -> str:
    """:func:`display_path`, but a file inside the installed vizkit package (a sample
    photo) as ``vizkit/data/samples/chelsea.jpg``, relative to the package's parent, so
    a report shows neither the install location nor the user's home folder."""
    text = os.fsdecode(path) if isinstance(path, bytes) else os.fspath(path)
    try:
        full = os.path.abspath(text)
    except OSError:  # a relative name, and the working folder is gone
        return display_path(text)
    for folder, shown in _package_folders():
        if full.startswith(folder + os.sep):
            text = shown + "/" + full[len(folder) + 1:].replace(os.sep, "/")
            break
    return display_path(text)


@functools.cache
def _package_folders() -> tuple[tuple[str, str], ...]:
    """(folder, its name in a report) of the vizkit package and of its built-in plugins,
    which a source checkout keeps in a folder of their own (``plugins/``)."""
    folders = [(os.path.dirname(os.path.abspath(__file__)), "vizkit")]
    spec = importlib.util.find_spec("vizkit.plugins")
    for location in (spec.submodule_search_locations or []) if spec else []:
        folders.append((os.path.abspath(location), "vizkit/plugins"))
    return tuple(folders)


def printable(text: str, keep: str = "") -> str:
    """``text`` with control characters and undecodable bytes escaped (``\\x1b``, ``\\n``,
    ``\\u202e``, ``\\xe9``), for any user-given string that goes to the terminal or into
    the report; the characters in ``keep`` (a message's newlines) stay as they are."""
    if text.isprintable():
        return text
    return "".join(char if char in keep else _escape(char) for char in text)


def _escape(char: str) -> str:
    """One character, escaped as Python writes it if it is a control character; an
    undecodable byte (a surrogate escape, U+DC80-U+DCFF) as the byte it stands for."""
    code = ord(char)
    if 0xDC80 <= code <= 0xDCFF:
        return f"\\x{code - 0xDC00:02x}"
    if (
        char in _BIDI_CONTROLS or char in _LINE_SEPARATORS or code < 0x20 or 0x7F <= code < 0xA0
        or 0xD800 <= code <= 0xDFFF
    ):
        return char.encode("unicode_escape").decode("ascii")
    return char


def path_bytes(path: str | bytes | os.PathLike) -> str | None:
    """The exact bytes of a name, in hex, where :func:`display_path` had to escape it
    (else None): ``os.fsdecode(bytes.fromhex(value))`` is the path again."""
    try:
        raw = path if isinstance(path, bytes) else os.fsencode(os.fspath(path))
    except UnicodeEncodeError:  # a lone surrogate no file system gave: no bytes to keep
        return None
    return None if display_path(raw) == os.fsdecode(raw) else raw.hex()


def path_entry(path: Path, reason: str) -> dict[str, str | None]:
    """``{"path", "path_bytes", "reason"}``: one skipped input as report.json lists it."""
    return {"path": report_path(path), "path_bytes": path_bytes(path), "reason": reason}
