"""Finding input images and decoding them into model-ready arrays (Pillow and NumPy only)."""

from __future__ import annotations

import hashlib
import io
import os
import re
import stat
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from vizkit.safe_read import MIB, describe_os_error, display_path, not_regular_reason, read_regular

#: Longest side of the copy of an image kept for the report's pictures.
DISPLAY_MAX_SIDE = 512
#: Largest encoded image file read (the decoded pixels have Pillow's own limit,
#: ``Image.MAX_IMAGE_PIXELS``): generous for any photo, and stops ``/dev/zero``-like input.
MAX_FILE_BYTES = 256 * MIB
#: Largest ``--size``: 4096² pixels is far below Pillow's decompression-bomb limit
#: (about 89 M pixels) and still a 200 MB float32 array per image.
MAX_SIZE = 4096


def image_extensions() -> frozenset[str]:
    """Extensions of formats Pillow can open (it also registers write-only ones: .pdf, .h5)."""
    def opens(fmt: str) -> bool:
        factory = Image.OPEN.get(fmt, (None,))[0]
        return factory is not None and not (
            isinstance(factory, type) and issubclass(factory, ImageFile.StubImageFile)
        )

    return frozenset(ext for ext, fmt in Image.registered_extensions().items() if opens(fmt))


@dataclass(frozen=True)
class Skipped:
    """An input that is not read, and why (listed in the report, never dropped silently)."""

    path: Path
    reason: str


#: Why a regular file inside a folder is skipped.
NOT_AN_IMAGE = "not an image extension Pillow can read"


def collect(inputs: list[Path]) -> tuple[list[Path], list[Path]]:
    """(images, skipped paths): :func:`scan` without the reasons, for callers that only
    need the files."""
    found, skipped = scan(inputs)
    return found, [entry.path for entry in skipped]


def scan(inputs: list[Path]) -> tuple[list[Path], list[Skipped]]:
    """(images, skipped): files as given, folders recursed in sorted order.

    Inside folders, files whose extension Pillow does not know are skipped; a regular
    file named directly is always tried, so a bad one is reported, not ignored. Only
    regular files are ever read: a FIFO, socket or device (named or inside a folder) is
    skipped, as are folders that cannot be listed, each with its reason. A named path
    that cannot even be examined is kept, so reading it reports why.
    """
    extensions = image_extensions()
    found: list[Path] = []
    skipped: list[Skipped] = []
    for path in inputs:
        mode = _mode(path)
        if mode is not None and stat.S_ISDIR(mode):
            files, passed = _walk(path, extensions)
            found += files
            skipped += passed
        elif mode is not None and not stat.S_ISREG(mode):
            skipped.append(Skipped(path, not_regular_reason(mode)))
        else:
            found.append(path)
    return list(dict.fromkeys(found)), list({entry.path: entry for entry in skipped}.values())  # inputs may overlap


def _mode(path: Path) -> int | None:
    """``st_mode`` of what ``path`` points to, None if it cannot be examined."""
    try:
        return os.stat(path).st_mode
    except (OSError, ValueError):
        return None


def _walk(root: Path, extensions: frozenset[str]) -> tuple[list[Path], list[Skipped]]:
    """Image files under ``root`` and the entries skipped, each list sorted by path.

    Unlike ``Path.rglob``, which drops what it cannot list without a word, every folder
    that cannot be listed and every entry that is not a regular file is reported.
    Links to folders are not followed (a link loop would never end). Hidden files are
    left out silently, as before.
    """
    found: list[Path] = []
    skipped: list[Skipped] = []
    pending = [root]
    while pending:
        folder = pending.pop()
        try:
            with os.scandir(folder) as listing:
                entries = list(listing)
        except OSError as error:
            skipped.append(Skipped(folder, f"cannot list this folder: {describe_os_error(error)}"))
            continue
        for entry in entries:
            child = folder / entry.name
            if _is_folder(entry):
                pending.append(child)
            elif not entry.name.startswith("."):
                reason = _skip_reason(child, extensions)
                if reason:
                    skipped.append(Skipped(child, reason))
                else:
                    found.append(child)
    return sorted(found), sorted(skipped, key=lambda entry: entry.path)


def _is_folder(entry: os.DirEntry) -> bool:
    """A real folder (not a link to one); False where the entry cannot be examined."""
    try:
        return entry.is_dir(follow_symlinks=False)
    except OSError:
        return False


def _skip_reason(path: Path, extensions: frozenset[str]) -> str | None:
    """Why a file found in a folder is not read, or None for an image to read."""
    try:
        mode = os.stat(path).st_mode
    except OSError as error:
        return "a broken symbolic link" if _is_link(path) else f"cannot examine it: {describe_os_error(error)}"
    if stat.S_ISDIR(mode):
        return "a link to a folder (not followed)"
    if not stat.S_ISREG(mode):
        return not_regular_reason(mode)
    return None if path.suffix.lower() in extensions else NOT_AN_IMAGE


def _is_link(path: Path) -> bool:
    """``path`` itself is a symbolic link (``Path.is_symlink`` raises on EACCES in 3.11)."""
    try:
        return stat.S_ISLNK(os.lstat(path).st_mode)
    except OSError:
        return False


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
    """Short, stable ids from file names (``cat``, ``cat-2``, ``Cat-2``), safe in HTML ids,
    npz keys and file names, and unique ignoring case."""
    ids: list[str] = []
    taken: set[str] = set()  # case-folded: the ids name picture files, and Cat.png is cat.png on macOS
    for path in paths:
        base = re.sub(r"[^A-Za-z0-9_.-]+", "-", path.stem).strip("-.") or "image"
        candidate, n = base, 1
        while candidate.lower() in taken:
            n += 1
            candidate = f"{base}-{n}"
        ids.append(candidate)
        taken.add(candidate.lower())
    return ids


def load(
    path: Path, image_id: str, channels: int, size: tuple[int, int] | None, max_side: int | None = None
) -> LoadedImage:
    """Decode ``path``; failures are recorded on the result, never raised.

    ``size`` is (height, width); None keeps the image's own size, scaled down to
    ``max_side`` on its longest side if given. The file is read once, through
    :func:`vizkit.safe_read.read_regular` (regular files of at most ``MAX_FILE_BYTES``
    only), and decoded from memory, so what is hashed is what is decoded.
    """
    result = LoadedImage(id=image_id, path=path)
    try:
        data = read_regular(path, MAX_FILE_BYTES)
    except (OSError, ValueError) as error:
        result.error = f"cannot read the file: {describe_os_error(error) if isinstance(error, OSError) else error}"
        return result
    result.sha256 = hashlib.sha256(data).hexdigest()
    try:
        if size is not None:
            check_pixels(size)
        image = _decode(data, result.warnings)
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


class TooManyPixels(ValueError):
    """Resizing to the model's input would make more pixels than Pillow decodes."""


def check_pixels(size: tuple[int, int]) -> None:
    """TooManyPixels if resizing to ``size`` (height, width) would make more pixels than
    Pillow agrees to decode (``Image.MAX_IMAGE_PIXELS``; None: no limit).

    Scaling a 1×1 image up to a huge ``--size`` or fixed model input costs as much
    memory as decoding a huge file, so it gets the same limit.
    """
    limit = Image.MAX_IMAGE_PIXELS
    if limit is not None and size[0] * size[1] > limit:
        raise TooManyPixels(
            f"cannot resize the image to {size[1]}×{size[0]}: that is {size[0] * size[1]} pixels, "
            f"more than Pillow's limit of {limit} (Image.MAX_IMAGE_PIXELS); use a smaller "
            f"--size (at most {MAX_SIZE}) or a model with a smaller input"
        )


def load_all(
    paths: list[Path], channels: int, size: tuple[int, int] | None,
    progress=lambda message: None, max_side: int | None = None,
) -> list[LoadedImage]:
    """:func:`load` for each path, with ids from :func:`unique_ids`."""
    loaded = []
    for image_id, path in zip(unique_ids(paths), paths):
        progress(f"reading {display_path(path)}")
        loaded.append(load(path, image_id, channels, size, max_side))
    return loaded


def _decode(data: bytes, notes: list[str]) -> Image.Image:
    """The first frame of the encoded ``data``, upright, in a mode vizkit converts from."""
    with warnings.catch_warnings():
        # Pillow only warns between its limit and twice that; refuse both the same way.
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            with Image.open(io.BytesIO(data)) as opened:
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
    """The report's words for a file that was read but not turned into pixels."""
    if isinstance(error, TooManyPixels):
        return str(error)
    if isinstance(error, Image.DecompressionBombError):
        return (
            f"image too large to decode safely ({error}); downscale it before passing it "
            "to vizkit"
        )
    if isinstance(error, UnidentifiedImageError):
        return "not an image Pillow can decode (empty, truncated or another kind of file)"
    return f"cannot decode image: {error}"
