"""A corpus of bad and odd input files, for running every command over folders nobody checked.

:func:`make_corpus` writes it and returns what a command must make of it:
``good`` (relative paths that must be processed exactly once) and ``bad``
(relative path -> a fragment of the readable reason its errors row must give).
Files that are not inputs at all (hidden files, other extensions, empty
folders) are in neither and must appear nowhere.
"""

from __future__ import annotations

import io
import os
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

EXIF_ORIENTATION = 0x0112


@dataclass
class Corpus:
    root: Path
    good: set[str] = field(default_factory=set)
    bad: dict[str, str] = field(default_factory=dict)

    def prefixed(self, prefix: str) -> Corpus:
        """The same expectations for the corpus placed in a sub-folder (e.g. a class folder ``red/``)."""
        return Corpus(self.root, {prefix + p for p in self.good}, {prefix + p: r for p, r in self.bad.items()})


def _noise(size: tuple[int, int], seed: int = 0, mode: str = "RGB") -> Image.Image:
    rng = np.random.default_rng(seed)
    w, h = size
    img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")
    return img if mode == "RGB" else img.convert(mode)


def _jpeg_bytes(img: Image.Image, **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90, **kwargs)
    return buf.getvalue()


def _png_chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)


def bomb_png(side: int = 15000) -> bytes:
    """A valid 1-bit PNG of side x side pixels (225 megapixels by default) in a few tens of kilobytes."""
    row = b"\x00" + bytes((side + 7) // 8)
    compressor = zlib.compressobj(9)
    idat = b"".join(compressor.compress(row) for _ in range(side)) + compressor.flush()
    ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")


def make_corpus(root: Path) -> Corpus:
    """Write the hostile corpus under ``root`` (created) and return its expectations."""
    root.mkdir(parents=True, exist_ok=True)
    c = Corpus(root)

    def good(rel: str, img: Image.Image, **save) -> None:
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        img.save(path, **save)
        c.good.add(rel)

    def bad(rel: str, data: bytes, reason: str) -> None:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
        c.bad[rel] = reason

    # Decodable images in every mode, format and shape the loader must handle.
    good("plain.jpg", _noise((48, 40), 1))
    good("cmyk.jpg", _noise((40, 40), 2, "CMYK"))
    good("gray.png", _noise((40, 40), 3, "L"))
    good("rgba.png", _noise((40, 40), 4, "RGBA"))
    good("palette.png", _noise((40, 40), 5, "P"), transparency=0)
    good("gray16.png", Image.fromarray(np.arange(1600, dtype=np.uint16).reshape(40, 40) * 40))
    frames = [_noise((32, 32), 10 + i, "P") for i in range(3)]
    good("animated.gif", frames[0], save_all=True, append_images=frames[1:], duration=100, loop=0)
    good("one_pixel.png", _noise((1, 1), 6))
    good("tall_1x3000.png", _noise((1, 3000), 7))
    good("wide_3000x1.png", _noise((3000, 1), 8))
    good("bitmap.bmp", _noise((40, 40), 9))
    good("photo.webp", _noise((40, 40), 11))
    good("scan.tiff", _noise((40, 40), 12))
    good("UPPER.JPG", _noise((40, 40), 13))
    good("Mixed.PnG", _noise((40, 40), 14))
    good("with space.png", _noise((40, 40), 15))
    good("a,comma.png", _noise((40, 40), 16))
    good('double"quote.png', _noise((40, 40), 17))
    good("it's.jpg", _noise((40, 40), 18))
    good("ünïcödé 日本.png", _noise((40, 40), 19))
    for o in range(1, 9):
        exif = Image.Exif()
        exif[EXIF_ORIENTATION] = o
        good(f"exif/orientation_{o}.jpg", _noise((48, 32), 20 + o), exif=exif)
    # A folder named like an image is a folder: walked into, not an input itself.
    good("x.jpg/inside.png", _noise((40, 40), 30))
    os.symlink("plain.jpg", root / "valid_link.jpg")
    c.good.add("valid_link.jpg")

    # Inputs that must each give one errors row with a readable reason.
    bad("zero_bytes.jpg", b"", "empty file")
    bad("text.jpg", b"just some notes, not a picture\n" * 20, "not an image")
    bad("page.png", b"<!DOCTYPE html><html><body>404 Not Found</body></html>\n", "not an image")
    jpeg = _jpeg_bytes(_noise((96, 96), 40))
    bad("truncated.jpg", jpeg[: len(jpeg) // 2], "truncated")
    png = io.BytesIO()
    _noise((40, 40), 41).save(png, "PNG")
    png = bytearray(png.getvalue())
    bad_crc = bytearray(png)
    bad_crc[29] ^= 0xFF  # the IHDR checksum
    bad("broken_header_crc.png", bytes(bad_crc), "not an image")
    idat = png.index(b"IDAT") + 4
    broken = bytes(png[:idat]) + b"\x00garbage" * 8 + bytes(png[idat + 64 :])
    bad("broken_idat.png", broken, "cannot decode")
    bad("bomb.png", bomb_png(), "too large")
    os.symlink("no_such_file.jpg", root / "dangling_link.jpg")
    c.bad["dangling_link.jpg"] = "broken symbolic link"
    os.symlink("self_link.jpg", root / "self_link.jpg")  # a file link to itself: resolving it loops
    c.bad["self_link.jpg"] = "broken symbolic link"

    # Not inputs at all.
    (root / "empty_folder").mkdir()
    (root / "notes.txt").write_text("not an image extension")
    _noise((8, 8), 50).save(root / ".hidden.jpg")
    (root / "._plain.jpg").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    os.symlink(".", root / "loop")  # a symlink loop must not list files again
    return c


def make_clean(root: Path, n: int = 3) -> Corpus:
    """A few ordinary images: running over them must exit 0."""
    root.mkdir(parents=True, exist_ok=True)
    c = Corpus(root)
    for i in range(n):
        _noise((40, 40), 100 + i).save(root / f"clean_{i}.png")
        c.good.add(f"clean_{i}.png")
    return c
