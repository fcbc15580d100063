"""Finding input images and decoding them into model-ready arrays (Pillow and NumPy only)."""

from __future__ import annotations

import hashlib
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

#: Longest side of the copy of an image kept for the report's pictures.
DISPLAY_MAX_SIDE = 512


def image_extensions() -> frozenset[str]:
    """Extensions of formats Pillow can open (it also registers write-only ones: .pdf, .h5)."""
    def opens(fmt: str) -> bool:
        factory = Image.OPEN.get(fmt, (None,))[0]
        return factory is not None and not (
            isinstance(factory, type) and issubclass(factory, ImageFile.StubImageFile)
        )

    return frozenset(ext for ext, fmt in Image.registered_extensions().items() if opens(fmt))


def collect(inputs: list[Path]) -> tuple[list[Path], list[Path]]:
    """(images, skipped): files as given, folders recursed in sorted order.

    Inside folders, files whose extension Pillow does not know are skipped (and listed);
    a file named directly is always tried, so a bad one is reported, not ignored.
    """
    extensions = image_extensions()
    found: list[Path] = []
    skipped: list[Path] = []
    for path in inputs:
        if path.is_dir():
            for child in sorted(p for p in path.rglob("*") if p.is_file()):
                if child.name.startswith("."):
                    continue
                (found if child.suffix.lower() in extensions else skipped).append(child)
        else:
            found.append(path)
    return list(dict.fromkeys(found)), skipped


@dataclass
class LoadedImage:
    """One input image: ``array`` is float32 H×W×C in 0-255 at the model's input size."""

    id: str
    path: Path
    sha256: str = ""
    error: str | None = None
    warnings: list[str] = field(default_factory=list)
    display: np.ndarray | None = None  # uint8, the oriented image, longest side ≤ 512
    array: np.ndarray | None = None
    predictions: list[dict] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.error is None


def unique_ids(paths: list[Path]) -> list[str]:
    """Short, stable ids from file names (``cat``, ``cat-2``), safe in HTML ids and npz keys."""
    ids: list[str] = []
    for path in paths:
        base = re.sub(r"[^A-Za-z0-9_.-]+", "-", path.stem).strip("-.") or "image"
        candidate, n = base, 1
        while candidate in ids:
            n += 1
            candidate = f"{base}-{n}"
        ids.append(candidate)
    return ids


def load(
    path: Path, image_id: str, channels: int, size: tuple[int, int] | None, max_side: int | None = None
) -> LoadedImage:
    """Decode ``path``; failures are recorded on the result, never raised.

    ``size`` is (height, width); None keeps the image's own size, scaled down to
    ``max_side`` on its longest side if given.
    """
    result = LoadedImage(id=image_id, path=path)
    try:
        data = path.read_bytes()
        result.sha256 = hashlib.sha256(data).hexdigest()
        image = _decode(path, result.warnings)
    except (OSError, ValueError, UnidentifiedImageError, Image.DecompressionBombError) as error:
        result.error = _describe(error)
        return result
    image = image.convert("RGB" if channels == 3 else "L")
    display = image.copy()
    display.thumbnail((DISPLAY_MAX_SIDE, DISPLAY_MAX_SIDE), Image.Resampling.LANCZOS)
    result.display = np.asarray(display)
    if size is None and max_side and max(image.size) > max_side:
        scale = max_side / max(image.size)
        size = (max(1, round(image.height * scale)), max(1, round(image.width * scale)))
        result.warnings.append(f"scaled from {image.width}×{image.height} to {size[1]}×{size[0]} (--size sets the size)")
    if size is not None and image.size != (size[1], size[0]):
        image = image.resize((size[1], size[0]), Image.Resampling.BILINEAR)
    array = np.asarray(image, dtype="float32")
    result.array = array[..., None] if array.ndim == 2 else array
    return result


def load_all(
    paths: list[Path], channels: int, size: tuple[int, int] | None,
    progress=lambda message: None, max_side: int | None = None,
) -> list[LoadedImage]:
    """:func:`load` for each path, with ids from :func:`unique_ids`."""
    loaded = []
    for image_id, path in zip(unique_ids(paths), paths):
        progress(f"reading {path}")
        loaded.append(load(path, image_id, channels, size, max_side))
    return loaded


def _decode(path: Path, notes: list[str]) -> Image.Image:
    with warnings.catch_warnings():
        # Pillow only warns between its limit and twice that; refuse both the same way.
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            with Image.open(path) as opened:
                frames = getattr(opened, "n_frames", 1)
                opened.load()
                image = ImageOps.exif_transpose(opened)
        except Image.DecompressionBombWarning as warning:
            raise Image.DecompressionBombError(str(warning)) from None
    if frames > 1:
        notes.append(f"has {frames} frames; the first one is used")
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        # Pillow's own conversion clips 16-bit values at 255: scale instead.
        wide = np.asarray(image, dtype="float64")
        image = Image.fromarray(np.clip(wide / 257.0, 0, 255).round().astype("uint8"), "L")
        notes.append("16-bit image scaled to 8 bits")
    elif image.mode == "F":
        image = Image.fromarray(np.clip(np.asarray(image), 0, 255).astype("uint8"), "L")
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("RGBA", "LA", "PA"):
        notes.append("transparent pixels composited on white")
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, image.convert("RGBA"))
    return image


def _describe(error: Exception) -> str:
    if isinstance(error, Image.DecompressionBombError):
        return (
            f"image too large to decode safely ({error}); downscale it before passing it "
            "to vizkit"
        )
    if isinstance(error, UnidentifiedImageError):
        return "not an image Pillow can decode (empty, truncated or another kind of file)"
    return f"cannot decode image: {error}"
