"""The one image loader: formats, colour modes, EXIF orientation, bad files."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from PIL import Image

from cvtool.errors import ImageError
from cvtool.images import list_images, load_image, load_with_original


def _upright_marker(w=30, h=20) -> Image.Image:
    """Red top-left corner on white: its position reveals the orientation."""
    arr = np.full((h, w, 3), 255, np.uint8)
    arr[: h // 2, : w // 2] = (255, 0, 0)
    return Image.fromarray(arr)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_is_applied(tmp_path, orientation):
    upright = _upright_marker()
    # Store the pixels so that applying `orientation` gives the upright image back.
    inverse = {
        1: lambda im: im,
        2: lambda im: im.transpose(Image.FLIP_LEFT_RIGHT),
        3: lambda im: im.transpose(Image.ROTATE_180),
        4: lambda im: im.transpose(Image.FLIP_TOP_BOTTOM),
        5: lambda im: im.transpose(Image.TRANSPOSE),
        6: lambda im: im.transpose(Image.ROTATE_90),
        7: lambda im: im.transpose(Image.TRANSVERSE),
        8: lambda im: im.transpose(Image.ROTATE_270),
    }[orientation]
    stored = inverse(upright)
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / f"o{orientation}.jpg"
    stored.save(path, exif=exif, quality=95)
    arr = load_image(path)
    assert arr.shape == (20, 30, 3)
    assert arr[2, 2, 0] > 200 and arr[2, 2, 1] < 60, "top-left should be red"
    assert arr[-3, -3].min() > 200, "bottom-right should be white"


def test_exif_rotated_jpeg_resized_keeps_orientation(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6
    _upright_marker(60, 40).transpose(Image.ROTATE_90).save(tmp_path / "r.jpg", exif=exif)
    arr = load_image(tmp_path / "r.jpg", (20, 30))
    assert arr.shape == (20, 30, 3)
    assert arr[1, 1, 0] > 200 and arr[1, 1, 2] < 80


@pytest.mark.parametrize(
    "mode,ext",
    [
        ("L", "png"),
        ("RGBA", "png"),
        ("P", "png"),
        ("CMYK", "jpg"),
        ("LA", "png"),
        ("1", "bmp"),
        ("RGB", "webp"),
        ("RGB", "tiff"),
    ],
)
def test_colour_modes_become_rgb(tmp_path, mode, ext):
    img = Image.new("RGB", (16, 12), (120, 60, 30)).convert(mode)
    path = tmp_path / f"img.{ext}"
    img.save(path)
    arr = load_image(path, (8, 8))
    assert arr.dtype == np.uint8 and arr.shape == (8, 8, 3)


def test_sixteen_bit_png_is_scaled_not_clipped(tmp_path):
    arr16 = np.full((10, 10), 40000, np.uint16)
    Image.fromarray(arr16).save(tmp_path / "deep.png")
    arr = load_image(tmp_path / "deep.png")
    assert arr.shape == (10, 10, 3)
    assert abs(int(arr[0, 0, 0]) - round(40000 / 65535 * 255)) <= 1


def test_sixteen_bit_images_are_scaled_by_65535_whatever_their_content(tmp_path):
    # Two 16-bit PNGs that differ in one pixel: a dark one (max 200 of 65535) must stay dark.
    dark = np.full((10, 10), 200, np.uint16)
    bright_pixel = dark.copy()
    bright_pixel[0, 0] = 60000
    Image.fromarray(dark).save(tmp_path / "dark.png")
    Image.fromarray(bright_pixel).save(tmp_path / "one_bright.png")
    # Big-endian 16-bit TIFF (I;16B) and a 16-bit PGM (Pillow's mode I).
    Image.fromarray(bright_pixel.astype(">u2")).save(tmp_path / "be.tif")
    (tmp_path / "deep.pgm").write_bytes(b"P5 10 10 65535\n" + bright_pixel.astype(">u2").tobytes())
    with Image.open(tmp_path / "be.tif") as im, Image.open(tmp_path / "deep.pgm") as pgm:
        assert (im.mode, pgm.mode) == ("I;16B", "I")
    expected = round(200 * 255 / 65535)  # 1
    for name in ("dark.png", "one_bright.png", "be.tif", "deep.pgm"):
        arr = load_image(tmp_path / name)
        assert arr[5, 5].tolist() == [expected] * 3, name
    assert load_image(tmp_path / "one_bright.png")[0, 0, 0] == round(60000 * 255 / 65535)
    # 16-bit RGB (written by OpenCV): each channel scaled by 65535 too.
    rgb = np.zeros((6, 6, 3), np.uint16)
    rgb[..., 0], rgb[..., 1], rgb[..., 2] = 65535, 32768, 200
    cv2.imwrite(str(tmp_path / "rgb16.png"), rgb[..., ::-1])
    assert np.abs(load_image(tmp_path / "rgb16.png")[0, 0].astype(int) - [255, 128, 1]).max() <= 1


def test_float_images_are_read_as_0_to_1(tmp_path):
    ramp = np.linspace(0.0, 1.0, 100, dtype=np.float32).reshape(10, 10)
    Image.fromarray(ramp).save(tmp_path / "ramp.tif")
    with Image.open(tmp_path / "ramp.tif") as im:
        assert im.mode == "F"
    arr = load_image(tmp_path / "ramp.tif")
    np.testing.assert_array_equal(arr[..., 0], np.round(ramp * 255).astype(np.uint8))
    assert arr.mean() > 100  # not black


@pytest.mark.parametrize(
    "values, reason",
    [
        (np.linspace(0.0, 255.0, 100), "outside 0-1"),  # float pixels on a 0-255 scale
        (np.full(100, np.nan), "not a number"),
        (np.linspace(-1.0, 1.0, 100), "outside 0-1"),
    ],
)
def test_float_images_outside_0_to_1_are_refused(tmp_path, values, reason):
    Image.fromarray(values.astype(np.float32).reshape(10, 10)).save(tmp_path / "f.tif")
    with pytest.raises(ImageError, match=reason):
        load_image(tmp_path / "f.tif")


def test_32_bit_integer_images_above_16_bits_are_refused(tmp_path):
    Image.fromarray(np.full((10, 10), 70000, np.int32)).save(tmp_path / "i32.tif")
    with pytest.raises(ImageError, match="16-bit"):
        load_image(tmp_path / "i32.tif")


@pytest.mark.parametrize("orientation", [1, 6])
@pytest.mark.parametrize("size", [(48, 64), lambda full: (full[0] // 3, full[1] // 3)])
def test_model_input_beside_the_original_is_load_images_own(tmp_path, orientation, size):
    # A large JPEG, where the model input is decoded at a reduced DCT scale.
    rng = np.random.default_rng(0)
    small = rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(small).resize((1600, 1200), Image.BICUBIC).save(tmp_path / "big.jpg", exif=exif, quality=90)
    original, model_input = load_with_original(tmp_path / "big.jpg", size)
    np.testing.assert_array_equal(original, load_image(tmp_path / "big.jpg"))
    expected_size = size(original.shape[:2]) if callable(size) else size
    np.testing.assert_array_equal(model_input, load_image(tmp_path / "big.jpg", expected_size))
    assert original.shape[:2] == ((1600, 1200) if orientation == 6 else (1200, 1600))


@pytest.mark.parametrize(
    "content,reason",
    [(b"", "empty file"), (b"hello, not an image", "not an image"), (b"<html><body>404</body></html>", "not an image")],
)
def test_bad_files_raise_readable_errors(tmp_path, content, reason):
    path = tmp_path / "bad.jpg"
    path.write_bytes(content)
    with pytest.raises(ImageError, match=reason):
        load_image(path)


def test_truncated_jpeg_is_an_error(tmp_path):
    Image.new("RGB", (64, 64), (10, 200, 30)).save(tmp_path / "full.jpg")
    data = (tmp_path / "full.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError):
        load_image(tmp_path / "cut.jpg")


def test_pixel_limit(tmp_path, monkeypatch):
    Image.new("RGB", (100, 100)).save(tmp_path / "big.png")
    monkeypatch.setenv("CVTOOL_MAX_PIXELS", "5000")
    with pytest.raises(ImageError, match="too large"):
        load_image(tmp_path / "big.png")


def test_list_images_is_recursive_sorted_and_case_insensitive(tmp_path):
    for rel in ["b/2.JPG", "a/1.png", "a/sub/0.Jpeg", "c.txt", ".hidden.jpg", "z.webp"]:
        p = tmp_path / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"x")
    (tmp_path / "folder.jpg").mkdir()
    rels = [item.rel for item in list_images(tmp_path)]
    assert rels == ["a/1.png", "a/sub/0.Jpeg", "b/2.JPG", "z.webp"]


def test_list_images_single_file(tmp_path):
    Image.new("RGB", (4, 4)).save(tmp_path / "one.png")
    assert [i.rel for i in list_images(tmp_path / "one.png")] == ["one.png"]
