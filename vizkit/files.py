"""Writing files so that readers never see a partial one."""

from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


@contextmanager
def atomic_path(final: Path) -> Iterator[Path]:
    """A temporary path beside ``final`` to write to; renamed over ``final`` on success.

    The temporary name ends like ``final`` (Keras insists on ``.keras``) and starts with
    a dot, so an interrupted run leaves at most a hidden ``.NAME.tmp-*`` file behind.
    """
    handle, temp = tempfile.mkstemp(dir=final.parent, prefix=f".{final.name}.tmp-", suffix=final.suffix)
    os.close(handle)
    try:
        yield Path(temp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temp, 0o666 & ~umask)  # mkstemp makes it private; the result should not be
        os.replace(temp, final)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise
