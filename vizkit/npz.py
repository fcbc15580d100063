"""``arrays.npz`` written entry by entry with fixed timestamps: equal arrays, equal bytes.

``np.savez_compressed`` stamps each entry with the time and holds the whole archive's
arrays at once; a run writes its arrays as ``.npy`` files while it goes and packs them
at the end, one at a time, so memory stays flat.
"""

from __future__ import annotations

import io
import shutil
import zipfile
from pathlib import Path
from typing import BinaryIO, Iterable

import numpy as np


def npy_bytes(array: np.ndarray) -> bytes:
    """One array as the bytes of a ``.npy`` file (no pickles)."""
    buffer = io.BytesIO()
    np.lib.format.write_array(buffer, np.asarray(array), allow_pickle=False)
    return buffer.getvalue()


def write_npz(target: Path | BinaryIO, entries: Iterable[tuple[str, bytes | Path]]) -> None:
    """An npz archive of ``entries``: (key, the ``.npy`` bytes or a ``.npy`` file), in order."""
    with zipfile.ZipFile(target, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for key, source in entries:
            entry = zipfile.ZipInfo(f"{key}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            entry.compress_type = zipfile.ZIP_DEFLATED
            with archive.open(entry, "w", force_zip64=True) as writer:
                if isinstance(source, bytes):
                    writer.write(source)
                else:
                    with open(source, "rb") as reader:
                        shutil.copyfileobj(reader, writer, 1 << 20)
