"""Pictures as a report stores them: PNG bytes under a path of the report folder.

A run encodes each picture once, where it is made (in a worker, with ``--executor
ray``), and writes it into the report folder as it comes; the report's records keep
only a :class:`Picture` (its path and shape), so pixels do not stay in memory past
their chunk of images. A one-page report inlines the files as data URIs when it is
rendered; a folder report links to them. Pillow and NumPy only.
"""

from __future__ import annotations

import hashlib
import io
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

#: The folder of a report that holds its pictures.
FOLDER = "pictures"


def png_bytes(picture: np.ndarray) -> bytes:
    """PNG bytes; Pillow writes no time or text chunks, so equal pixels give equal bytes."""
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(picture)).save(buffer, format="PNG", compress_level=6)
    return buffer.getvalue()


@dataclass(frozen=True)
class Picture:
    """A picture of the report: ``path`` inside the report folder ('/'-separated),
    ``shape`` of its pixels (H, W[, C]), and its PNG bytes until they are written."""

    path: str
    shape: tuple[int, ...]
    png: bytes | None = field(default=None, repr=False, compare=False)

    @classmethod
    def of(cls, pixels: np.ndarray, *parts: str | None) -> Picture:
        """``pixels`` encoded, named ``pictures/PART/…/PART.png`` (:func:`path_of`)."""
        return cls(path_of(*parts), tuple(int(n) for n in pixels.shape), png_bytes(pixels))

    def written(self) -> Picture:
        """The same picture without its bytes: what a record keeps once the file is written."""
        return Picture(self.path, self.shape)

    def pixels(self, root: str | None = None) -> np.ndarray:
        """The picture as a uint8 array: from its bytes, or its file under ``root`` (the
        report folder) once written."""
        data = self.png if self.png is not None else (Path(root) / self.path).read_bytes() if root else None
        if data is None:
            raise ValueError(f"{self.path}: its bytes were written to the report folder: give its path (root)")
        return np.asarray(Image.open(io.BytesIO(data)))


def path_of(*parts: str | None) -> str:
    """``pictures/a/b.png`` from parts that may hold any text (a layer ``inner/conv``, a
    technique named by a plugin): each made of ``[A-Za-z0-9_.-]`` only, a part that had
    to change suffixed with a hash of the original, so different parts stay different."""
    names = []
    for part in (p for p in parts if p is not None):
        safe = re.sub(r"[^A-Za-z0-9_.-]+", "-", part).strip("-.") or "_"
        if safe != part:
            safe += "-" + hashlib.sha256(part.encode("utf-8", "surrogatepass")).hexdigest()[:8]
        names.append(safe)
    return "/".join([FOLDER, *names]) + ".png"
