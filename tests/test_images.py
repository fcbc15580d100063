"""vizkit.images: finding image files and decoding them, on real files written with Pillow."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
from PIL import Image

from vizkit.images import DISPLAY_MAX_SIDE, collect, load, unique_ids

from conftest import write_image


def _load(path, channels=3, size=None):
    return load(Path(path), "img", channels, size)


def _assert_ok(result):
    assert result.error is None, result.error
    assert result.ok
    assert result.array.dtype == np.float32
    assert result.array.ndim == 3
    assert result.display.dtype == np.uint8


def _assert_refused(result):
    """A failure recorded on the result: a readable one-line message and no pixels."""
    assert not result.ok
    assert isinstance(result.error, str) and result.error.strip()
    assert "Traceback" not in result.error
    assert result.array is None
    assert result.display is None


def _quadrants(width: int, height: int) -> np.ndarray:
    """Four flat colour blocks: easy to tell apart after rotation and JPEG compression."""
    pixels = np.zeros((height, width, 3), np.uint8)
    h, w = height // 2, width // 2
    pixels[:h, :w] = (255, 0, 0)
    pixels[:h, w:] = (0, 255, 0)
    pixels[h:, :w] = (0, 0, 255)
    pixels[h:, w:] = (255, 255, 0)
    return pixels


# -- modes -------------------------------------------------------------------


def test_grayscale_image_gives_three_equal_channels(tmp_path):
    path = write_image(tmp_path / "gray.png", size=(40, 30), mode="L", seed=3)
    original = np.asarray(Image.open(path))

    result = _load(path)

    _assert_ok(result)
    assert result.array.shape == (30, 40, 3)
    for channel in range(3):
        np.testing.assert_array_equal(result.array[..., channel], original)
    assert result.warnings == []


def test_rgba_transparent_pixels_become_white_with_a_warning(tmp_path):
    pixels = np.zeros((10, 12, 4), np.uint8)
    pixels[..., 0] = 200  # red everywhere, even under the transparent half
    pixels[:, :6, 3] = 0
    pixels[:, 6:, 3] = 255
    path = tmp_path / "rgba.png"
    Image.fromarray(pixels, "RGBA").save(path)

    result = _load(path)

    _assert_ok(result)
    assert result.array.shape == (10, 12, 3)
    np.testing.assert_array_equal(result.array[:, :6], 255.0)
    np.testing.assert_array_equal(result.array[:, 6:], np.broadcast_to([200.0, 0.0, 0.0], (10, 6, 3)))
    np.testing.assert_array_equal(result.display[:, :6], 255)
    assert any("transparent" in note for note in result.warnings)


def _red_blue_palette_file(path, **save_args):
    """A 10×10 palette PNG: left half index 0 (red), right half index 1 (blue)."""
    indexes = np.zeros((10, 10), np.uint8)
    indexes[:, 5:] = 1
    image = Image.fromarray(indexes, "P")
    image.putpalette([255, 0, 0, 0, 0, 255] + [0] * (256 * 3 - 6))
    image.save(path, **save_args)
    return path


def test_palette_image_is_decoded_through_its_palette(tmp_path):
    path = _red_blue_palette_file(tmp_path / "palette.png")
    assert Image.open(path).mode == "P"

    result = _load(path)

    _assert_ok(result)
    np.testing.assert_array_equal(result.array[:, :5], np.broadcast_to([255.0, 0, 0], (10, 5, 3)))
    np.testing.assert_array_equal(result.array[:, 5:], np.broadcast_to([0, 0, 255.0], (10, 5, 3)))
    assert result.warnings == []


def test_palette_image_with_transparency_is_composited_on_white(tmp_path):
    # index 0 (red) is transparent
    path = _red_blue_palette_file(tmp_path / "palette_transparent.png", transparency=0)

    result = _load(path)

    _assert_ok(result)
    np.testing.assert_array_equal(result.array[:, :5], 255.0)
    np.testing.assert_array_equal(result.array[:, 5:], np.broadcast_to([0, 0, 255.0], (10, 5, 3)))
    assert any("transparent" in note for note in result.warnings)


def test_cmyk_jpeg_is_converted_to_rgb(tmp_path):
    path = tmp_path / "cmyk.jpg"
    Image.fromarray(_quadrants(40, 20)).convert("CMYK").save(path, quality=95)
    assert Image.open(path).mode == "CMYK"

    result = _load(path)

    _assert_ok(result)
    assert result.array.shape == (20, 40, 3)
    # block centres, away from JPEG ringing at the edges
    np.testing.assert_allclose(result.array[5, 10], [255, 0, 0], atol=12)
    np.testing.assert_allclose(result.array[5, 30], [0, 255, 0], atol=12)
    np.testing.assert_allclose(result.array[15, 10], [0, 0, 255], atol=12)
    np.testing.assert_allclose(result.array[15, 30], [255, 255, 0], atol=12)


def test_16_bit_png_is_scaled_not_clipped(tmp_path):
    values = np.full((8, 10), 32768, np.uint16)
    values[0, 0] = 65535
    values[0, 1] = 0
    values[0, 2] = 1000
    values[0, 3] = 16384
    path = tmp_path / "deep.png"
    Image.fromarray(values).save(path)
    assert Image.open(path).mode.startswith("I")

    result = _load(path)

    _assert_ok(result)
    array = result.array
    assert array.shape == (8, 10, 3)
    assert abs(array[4, 4, 0] - 128) <= 1  # 32768 / 65535 of the range, not clipped to 255
    assert array[0, 0, 0] == 255
    assert array[0, 1, 0] == 0
    assert abs(array[0, 2, 0] - 1000 / 257) <= 1
    assert abs(array[0, 3, 0] - 64) <= 1
    np.testing.assert_array_equal(array[..., 0], array[..., 1])
    assert any("16-bit" in note for note in result.warnings)


def test_animated_gif_uses_the_first_frame_with_a_warning(tmp_path):
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255)]
    frames = [Image.new("RGB", (16, 12), colour) for colour in colours]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100, loop=0)
    assert Image.open(path).n_frames == 3

    result = _load(path)

    _assert_ok(result)
    assert result.array.shape == (12, 16, 3)
    np.testing.assert_array_equal(result.array, np.broadcast_to([255.0, 0, 0], (12, 16, 3)))
    assert any("3 frames" in note for note in result.warnings)


@pytest.mark.parametrize(("orientation", "turns"), [(6, -1), (8, 1), (1, 0)])
def test_exif_orientation_is_applied(tmp_path, orientation, turns):
    """6: the camera was turned clockwise (show rotated 90° cw); 8: counter-clockwise."""
    pixels = _quadrants(64, 32)  # wider than high
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / f"rotated{orientation}.jpg"
    Image.fromarray(pixels).save(path, exif=exif.tobytes(), quality=95)

    result = _load(path)

    _assert_ok(result)
    expected = np.rot90(pixels, k=turns)
    assert result.display.shape == expected.shape
    assert result.array.shape == expected.shape
    if turns:
        assert result.display.shape[:2] == (64, 32)  # width and height swapped
    difference = np.abs(result.display.astype(int) - expected.astype(int)).mean()
    assert difference < 8, difference


def test_one_channel_for_a_gray_model_from_an_rgb_file(tmp_path):
    pixels = np.zeros((6, 9, 3), np.uint8)
    pixels[:, :3] = (255, 0, 0)
    pixels[:, 3:6] = (0, 255, 0)
    pixels[:, 6:] = (0, 0, 255)
    path = tmp_path / "colour.png"
    Image.fromarray(pixels).save(path)

    result = _load(path, channels=1)

    _assert_ok(result)
    assert result.array.shape == (6, 9, 1)
    # ITU-R 601 luma: 0.299 R + 0.587 G + 0.114 B
    np.testing.assert_allclose(result.array[0, [0, 4, 8], 0], [76, 150, 29], atol=1)


# -- sizes -------------------------------------------------------------------


def test_resized_to_height_width_for_the_model(tmp_path):
    path = write_image(tmp_path / "photo.png", size=(48, 40), seed=4)  # 48 wide, 40 high

    result = _load(path, size=(20, 30))

    _assert_ok(result)
    assert result.array.shape == (20, 30, 3)
    assert result.array.min() >= 0 and result.array.max() <= 255
    assert result.array.max() > 1  # 0-255, not 0-1
    # the display copy is the whole image, not the model-size one
    assert result.display.shape == (40, 48, 3)


def test_flat_colour_keeps_its_value_when_resized(tmp_path):
    path = tmp_path / "flat.png"
    Image.new("RGB", (50, 30), (200, 100, 50)).save(path)

    result = _load(path, size=(64, 16))

    _assert_ok(result)
    assert result.array.shape == (64, 16, 3)
    np.testing.assert_allclose(result.array, np.broadcast_to([200.0, 100.0, 50.0], (64, 16, 3)), atol=0.5)


def test_display_longest_side_is_capped(tmp_path):
    path = tmp_path / "large.png"
    Image.fromarray(_quadrants(1200, 700)).save(path)

    result = _load(path)

    _assert_ok(result)
    assert result.array.shape == (700, 1200, 3)  # no size: the model sees the full image
    height, width = result.display.shape[:2]
    assert max(height, width) <= DISPLAY_MAX_SIDE
    assert width == DISPLAY_MAX_SIDE
    assert abs(height - 700 * DISPLAY_MAX_SIDE / 1200) <= 1  # aspect ratio kept


def test_small_image_display_is_not_enlarged(tmp_path):
    path = write_image(tmp_path / "small.png", size=(20, 10), seed=5)

    result = _load(path, size=(224, 224))

    _assert_ok(result)
    assert result.display.shape == (10, 20, 3)
    assert result.array.shape == (224, 224, 3)


# -- refused files -----------------------------------------------------------


@pytest.mark.parametrize("limit", [9999, 4999], ids=["just-over-limit", "over-twice-limit"])
def test_decompression_bomb_is_refused_without_raising(tmp_path, monkeypatch, limit):
    path = tmp_path / "bomb.png"
    Image.new("RGB", (100, 100), (10, 20, 30)).save(path)  # 10 000 pixels
    monkeypatch.setattr(PIL.Image, "MAX_IMAGE_PIXELS", limit)

    result = _load(path)

    _assert_refused(result)
    assert "too large" in result.error


def test_image_at_the_pixel_limit_still_loads(tmp_path, monkeypatch):
    path = tmp_path / "limit.png"
    Image.new("RGB", (100, 100), (10, 20, 30)).save(path)
    monkeypatch.setattr(PIL.Image, "MAX_IMAGE_PIXELS", 10_000)

    result = _load(path)

    _assert_ok(result)
    assert result.array.shape == (100, 100, 3)


def test_empty_file_is_an_error_not_an_exception(tmp_path):
    path = tmp_path / "empty.jpg"
    path.write_bytes(b"")

    result = _load(path)

    _assert_refused(result)
    assert "decode" in result.error


def test_text_file_named_png_is_an_error_not_an_exception(tmp_path):
    path = tmp_path / "notes.png"
    path.write_text("these are not pixels\n" * 20)

    result = _load(path)

    _assert_refused(result)
    assert "decode" in result.error


def test_missing_file_is_an_error_not_an_exception(tmp_path):
    result = _load(tmp_path / "gone.png")

    _assert_refused(result)


@pytest.mark.parametrize("fraction", [0.02, 0.3, 0.6, 0.9])
@pytest.mark.parametrize("suffix", [".png", ".jpg"])
def test_truncated_file_is_an_error_not_an_exception(tmp_path, suffix, fraction):
    whole = write_image(tmp_path / f"whole{suffix}", size=(80, 60), seed=6)
    data = whole.read_bytes()
    path = tmp_path / f"cut{suffix}"
    path.write_bytes(data[: int(len(data) * fraction)])

    result = _load(path)

    _assert_refused(result)
    assert re.search(r"truncated|decode", result.error), result.error


# -- collect -----------------------------------------------------------------


def test_collect_recurses_folders_in_sorted_order_and_lists_skipped(tmp_path):
    root = tmp_path / "photos"
    (root / "sub").mkdir(parents=True)
    # created out of order, so a missing sort would show
    write_image(root / "sub" / "c.PNG", seed=1)
    (root / "sub" / "notes.txt").write_text("not an image")
    write_image(root / "b.png", seed=2)
    (root / "data.json").write_text("{}")
    write_image(root / "a.jpg", seed=3)
    write_image(root / ".hidden.png", seed=4)

    found, skipped = collect([root])

    assert found == [root / "a.jpg", root / "b.png", root / "sub" / "c.PNG"]
    assert skipped == [root / "data.json", root / "sub" / "notes.txt"]


@pytest.mark.parametrize("name", ["model.h5", "paper.pdf"])
def test_collect_skips_files_pillow_cannot_read_in_folders(tmp_path, name):
    """Pillow registers .h5 (a stub) and .pdf (write-only), but cannot decode either."""
    root = tmp_path / "project"
    root.mkdir()
    write_image(root / "cat.png", seed=1)
    (root / name).write_bytes(b"\x89HDF\r\n\x1a\n" if name.endswith(".h5") else b"%PDF-1.4\n")

    found, skipped = collect([root])

    assert found == [root / "cat.png"]
    assert skipped == [root / name]


def test_collect_keeps_files_named_directly_whatever_their_extension(tmp_path):
    odd = write_image(tmp_path / "photo.weird", seed=1, format="PNG")
    text = tmp_path / "notes.txt"
    text.write_text("hello")

    found, skipped = collect([odd, text])

    assert found == [odd, text]
    assert skipped == []
    # and the oddly named real image decodes
    _assert_ok(_load(odd))


def test_collect_removes_duplicates_and_keeps_input_order(tmp_path, image_dir):
    single = image_dir / "b.jpg"

    found, skipped = collect([single, image_dir, image_dir / "a.png", single])

    assert found == [single, image_dir / "a.png"]
    assert skipped == []


# -- unique_ids --------------------------------------------------------------


def test_unique_ids_number_repeated_names():
    paths = [Path("x/cat.png"), Path("y/cat.png"), Path("z/cat.jpg"), Path("dog.png")]

    assert unique_ids(paths) == ["cat", "cat-2", "cat-3", "dog"]


def test_unique_ids_stay_unique_next_to_a_file_already_named_like_a_number():
    paths = [Path("a/cat.png"), Path("b/cat.png"), Path("cat-2.png")]

    ids = unique_ids(paths)

    assert ids[:2] == ["cat", "cat-2"]
    assert len(set(ids)) == 3


def test_unique_ids_strip_characters_unsafe_in_html_ids():
    paths = [
        Path("my cat <1>.png"),
        Path('"quoted" & #hash.jpg'),
        Path("chat_été.png"),
        Path("???.png"),
    ]

    ids = unique_ids(paths)

    assert ids[0] == "my-cat-1"
    assert ids[1] == "quoted-hash"
    assert ids[2] == "chat_-t"
    assert ids[3] == "image"
    for image_id in ids:
        assert re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]*", image_id), image_id
    assert len(set(ids)) == len(ids)


def test_unique_ids_ignore_case():
    """Ids name picture files: Cat.png and cat.png are one file on macOS and Windows."""
    assert unique_ids([Path("a/Cat.jpg"), Path("b/cat.png"), Path("c/CAT.gif")]) == ["Cat", "cat-2", "CAT-3"]
