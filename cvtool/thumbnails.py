"""Small JPEG thumbnails for the HTML reports, decoded by the one image loader.

A report shows at most a few hundred pictures, each downscaled so that its
longer side is :data:`THUMB_SIDE` pixels and saved as a quality-80 JPEG of a
few kilobytes: a report stays small (about 3 KB a thumbnail) however large
the photos or the data set. Files are numbered (``t0001.jpg``), never named
after the input, so no file name of the user's ends up in a URL.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from cvtool.errors import ImageError
from cvtool.images import open_rgb
from cvtool.outputs import save_image

THUMB_SIDE = 128
EXPLAIN_SIDE = 192  # Grad-CAM overlays: a little larger, the heatmap needs it
JPEG_QUALITY = 80


def shrink(img: Image.Image, side: int = THUMB_SIDE) -> Image.Image:
    """``img`` downscaled (never enlarged) so that its longer side is at most ``side`` pixels."""
    img = img.copy()
    img.thumbnail((side, side), Image.Resampling.LANCZOS)
    return img


def write_thumbnail(source: str | Path, dest: str | Path, side: int = THUMB_SIDE) -> bool:
    """Write a JPEG thumbnail of the image file ``source`` to ``dest``; False when it cannot be decoded.

    Args:
        source: an image file (decoded by :func:`cvtool.images.open_rgb`: EXIF orientation, any colour mode).
        dest: the JPEG to write (atomically).
        side: the longer side of the thumbnail, in pixels.

    Example: ``write_thumbnail("photos/cat.jpg", "report_files/thumbs/t0001.jpg")``.
    """
    try:
        img = open_rgb(source, (side, side))  # lets libjpeg decode large photos at a reduced scale
    except ImageError:
        return False
    save_image(shrink(img, side), dest, quality=JPEG_QUALITY)
    return True


def write_array_thumbnail(image: np.ndarray, dest: str | Path, side: int = THUMB_SIDE) -> Path:
    """Write an RGB uint8 array as a JPEG thumbnail (a Grad-CAM overlay, say)."""
    return save_image(shrink(Image.fromarray(np.asarray(image, np.uint8), "RGB"), side), dest, quality=JPEG_QUALITY)


class ThumbnailFolder:
    """Numbered thumbnails in one folder: :meth:`add` returns the new file's name relative to the page.

    Example: ``thumbs = ThumbnailFolder(out / "report_files", "report_files"); thumbs.add(path)``.
    """

    def __init__(self, folder: Path, url_prefix: str, prefix: str = "t"):
        self.folder, self.url_prefix, self.prefix = Path(folder), url_prefix.rstrip("/"), prefix
        self.count = 0
        self._done: dict[str, str | None] = {}

    def _next_name(self) -> str:
        self.count += 1
        return f"{self.prefix}{self.count:04d}.jpg"

    def add(self, source: str | Path, side: int = THUMB_SIDE) -> str | None:
        """The page-relative URL of ``source``'s thumbnail (made once per file); None if it cannot be read."""
        key = str(source)
        if key not in self._done:
            name = self._next_name()
            ok = write_thumbnail(source, self.folder / name, side)
            self._done[key] = f"{self.url_prefix}/{name}" if ok else None
        return self._done[key]

    def add_array(self, image: np.ndarray, side: int = THUMB_SIDE) -> str:
        name = self._next_name()
        write_array_thumbnail(image, self.folder / name, side)
        return f"{self.url_prefix}/{name}"
