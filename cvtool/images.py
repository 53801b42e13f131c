"""Finding image files and decoding them: the one image loader of cvtool.

Every command reads pixels through :func:`open_rgb` / :func:`load_image`
(gradcam and segment, which also draw on the original, through
:func:`load_with_original`), so EXIF orientation, colour-mode conversion
(grayscale, RGBA, palette, CMYK, 16-bit, float), the DCT-scaled JPEG decode,
the resize, the pixel limit and the error messages are the same everywhere:
every command's model sees the same pixels for the same image.
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, ImageOps

from cvtool.errors import ImageError, UsageError, env_int
from cvtool.storage import is_url, local_path, read_bytes

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".pbm"}
)
DEFAULT_MAX_PIXELS = 178_956_970  # Pillow's own decompression-bomb error threshold
_EXIF_ORIENTATION = 0x0112
_SWAPS_AXES = {5, 6, 7, 8}
_FLOAT_SLACK = 1e-3  # float pixels this far outside 0-1 are rounding, not another scale

# A model input size (height, width), or a function of the image's upright full size that gives one.
TargetSize = tuple[int, int] | Callable[[tuple[int, int]], tuple[int, int]]

# cvtool enforces its own pixel limit (max_pixels) with a readable message.
Image.MAX_IMAGE_PIXELS = None
# Files are decoded in parallel by a thread pool (cvtool.batches); OpenCV's own threads would oversubscribe.
cv2.setNumThreads(1)


@dataclass(frozen=True)
class InputItem:
    """One input file: where it is, and how it is named in output files."""

    path: Path | str  # a local path, or an object's URL (a string; see cvtool.storage)
    rel: str  # path relative to the INPUT folder, with forward slashes


def is_image_name(name: str) -> bool:
    return Path(name).suffix.lower() in IMAGE_EXTENSIONS


# Files that make a folder a model (cvtool.bundle's META_FILE, MODEL_FILE), never an INPUT of images.
RUN_MARKERS = ("cvtool.json", "model.keras")


def list_images(root: str | os.PathLike, exclude: str | os.PathLike | None = None) -> list[InputItem]:
    """All image files under ``root`` (recursive, sorted by relative path).

    ``root`` may also be a single file. Hidden files and folders (names that
    start with '.') are skipped. Symbolic links are listed as they are, so a
    dangling link is reported as a bad input rather than silently dropped;
    linked folders are followed, each real folder once (no symlink loops).
    ``exclude`` is a folder to leave out: a command's own output folder when
    the user points ``--out`` inside INPUT, so results are never read as inputs.

    ``root`` may be a URL (``s3://bucket/photos``, see :mod:`cvtool.storage`): a prefix is listed
    exactly as a folder (same relative paths, same order), its items' ``path`` are the objects' URLs.
    """
    root = local_path(root)
    if is_url(root):
        return _list_remote(root, exclude)
    root = Path(root)
    if root.is_file() or (root.is_symlink() and not root.exists()):
        return [InputItem(root, root.name)]
    if not root.is_dir():
        raise UsageError(f"input not found: {root}")
    if any((root / name).is_file() for name in RUN_MARKERS):
        # e.g. `ensemble run-a run-b --out x.csv` with INPUT forgotten: the last MODEL taken for INPUT
        # would be "classified" (its history.png) with exit 0.
        raise UsageError(f"INPUT {root} is a run directory (a model), not images; give the images last")
    items, seen = [], set()
    if exclude is not None and Path(exclude).is_dir():
        st = os.stat(exclude)
        seen.add((st.st_dev, st.st_ino))
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        st = os.stat(dirpath)
        if (st.st_dev, st.st_ino) in seen:  # a folder reached again through a symlink (or a loop)
            dirnames[:] = []
            continue
        seen.add((st.st_dev, st.st_ino))
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in filenames:
            if name.startswith(".") or not is_image_name(name):
                continue
            path = Path(dirpath) / name
            items.append(InputItem(path, path.relative_to(root).as_posix()))
    items.sort(key=lambda item: item.rel)
    return items


def _list_remote(root: str, exclude: str | os.PathLike | None) -> list[InputItem]:
    """:func:`list_images` for a URL: the same filters (hidden names, image suffixes, run folders) and order."""
    from cvtool.storage import remote_of, walk

    is_prefix, objects = walk(root)
    exclude = remote_of(exclude) if exclude is not None else None  # a staged --out: the URL it stands for
    if not is_prefix:
        return [InputItem(url, rel) for rel, url in objects]
    if any(rel in RUN_MARKERS for rel, _ in objects):
        raise UsageError(f"INPUT {root} is a run directory (a model), not images; give the images last")
    skip = str(exclude).rstrip("/") + "/" if isinstance(exclude, str) and is_url(exclude) else None
    items = [
        InputItem(url, rel)
        for rel, url in objects
        if is_image_name(rel)
        and not any(part.startswith(".") for part in rel.split("/"))
        and not (skip and url.startswith(skip))
    ]
    items.sort(key=lambda item: item.rel)
    return items


def max_pixels() -> int:
    """The largest image (in pixels) cvtool decodes; ``CVTOOL_MAX_PIXELS`` overrides."""
    return env_int("CVTOOL_MAX_PIXELS", DEFAULT_MAX_PIXELS, minimum=1)


def jpeg_draft_enabled() -> bool:
    """DCT-scaled JPEG decoding is on unless ``CVTOOL_JPEG_DRAFT=0``."""
    return os.environ.get("CVTOOL_JPEG_DRAFT", "1") != "0"


def open_rgb(path: str | os.PathLike, target_size: TargetSize | None = None) -> Image.Image:
    """Decode ``path`` to an upright RGB Pillow image.

    ``target_size`` (height, width) is the size the caller will resize to: for
    JPEGs it lets libjpeg decode at a reduced scale (DCT scaling) that is still
    at least that large, which makes large photos several times cheaper. It may
    also be a function of the upright full size (height, width), for callers
    whose input size depends on the image (segment). Raises :class:`ImageError`
    with a readable one-line reason.
    """
    return _decode(path, target_size)[0]


def _decode(path: str | os.PathLike, target_size: TargetSize | None) -> tuple[Image.Image, tuple[int, int]]:
    """(upright RGB image, possibly DCT-scaled; the upright full size (height, width))."""
    limit = max_pixels()  # read before the per-file try: a bad setting is a usage error, not 100,000 bad files
    remote = is_url(path)
    path = path if remote else Path(path)
    try:
        if remote:
            source = io.BytesIO(read_bytes(path))  # in the decode thread: objects are fetched in parallel
            if not source.getbuffer().nbytes:
                raise ImageError("empty file (0 bytes)")
        elif path.is_symlink() and not path.exists():
            raise ImageError("broken symbolic link")
        elif path.is_dir():
            raise ImageError("is a folder, not an image file")
        elif path.stat().st_size == 0:
            raise ImageError("empty file (0 bytes)")
        with Image.open(source if remote else path) as img:
            width, height = img.size
            if width * height > limit:
                raise ImageError(
                    f"image too large: {width}x{height} pixels is over the limit of {limit} "
                    "(set CVTOOL_MAX_PIXELS to raise it)"
                )
            # Reading EXIF may load the pixels (PNG, WebP) and a failed load leaves a blank image that
            # loads "fine" the second time: so only JPEGs (whose EXIF sits in the header) read it first.
            is_jpeg = img.format == "JPEG"
            orientation = _orientation(img) if is_jpeg else None
            if target_size is not None and is_jpeg and jpeg_draft_enabled():
                swapped = orientation in _SWAPS_AXES
                upright = (width, height) if swapped else (height, width)
                h, w = target_size(upright) if callable(target_size) else target_size
                img.draft("RGB", (h, w) if swapped else (w, h))
            img.load()
            if not is_jpeg:
                orientation = _orientation(img)
            img = ImageOps.exif_transpose(img) if orientation not in (None, 1) else img
            full = (width, height) if orientation in _SWAPS_AXES else (height, width)
            return _to_rgb(img), full
    except ImageError:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageError(f"image too large: {exc}") from None
    except Image.UnidentifiedImageError:
        raise ImageError("not an image, or a format Pillow cannot read") from None
    except PermissionError:
        raise ImageError("permission denied") from None
    except FileNotFoundError:
        raise ImageError("file not found") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ImageError(f"cannot decode: {_one_line(exc)}") from None
    except Exception as exc:  # noqa: BLE001 - a bad file must never stop a batch
        raise ImageError(f"cannot decode: {type(exc).__name__}: {_one_line(exc)}") from None


def open_rgb_sizes(path: str | os.PathLike, sizes: Iterable[tuple[int, int]]) -> dict[tuple[int, int], Image.Image]:
    """``{size: open_rgb(path, size)}`` for several model sizes (an ensemble), decoding as few times as possible.

    Each size gets its own JPEG draft scale, so each model sees exactly the
    pixels that :func:`load_image` gives it alone; a file decoded at full size
    (not a JPEG, a small one, drafts off) is decoded once and shared.
    """
    out: dict[tuple[int, int], Image.Image] = {}
    for size in dict.fromkeys(sizes):
        if size in out:
            continue
        img, full = _decode(path, size)
        if (img.height, img.width) == full:
            return {s: img for s in dict.fromkeys(sizes)}
        out[size] = img
    return out


def resize(img: Image.Image | np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize to (height, width); uint8 array HxWx3.

    Bilinear (as Keras' own loaders) while shrinking less than 2x, which is the
    usual case after DCT-scaled JPEG decoding; pixel-area averaging beyond, so
    that large reductions do not alias. OpenCV does this about 4x faster than
    Pillow's bilinear filter, which matters: decoding shares the CPU with the model.
    """
    h, w = size
    arr = np.asarray(img, dtype=np.uint8)
    if arr.shape[:2] == (h, w):
        return arr
    shrink = max(arr.shape[0] / h, arr.shape[1] / w)
    return cv2.resize(arr, (w, h), interpolation=cv2.INTER_AREA if shrink >= 2 else cv2.INTER_LINEAR)


def load_image(path: str | os.PathLike, size: tuple[int, int] | None = None) -> np.ndarray:
    """Decode ``path`` to a uint8 RGB array, resized to ``size`` (height, width) if given.

    This is the model input of every command: predict, tta, ensemble, evaluate
    and training read it here, gradcam and segment through :func:`load_with_original`.
    """
    img = open_rgb(path, size)
    return resize(img, size) if size is not None else np.asarray(img, dtype=np.uint8)


def load_with_original(path: str | os.PathLike, size: TargetSize) -> tuple[np.ndarray, np.ndarray]:
    """(the upright image at its full size, the model input): for commands that draw on the original.

    The model input is exactly what :func:`load_image` gives for the same size
    (the same DCT-scaled JPEG decode and resize), so a Grad-CAM or a mask is
    computed on the very pixels predict classifies. ``size`` may be a function
    of the full size (height, width). A JPEG decoded at a reduced scale is
    decoded a second time at full size for the original; other files once.

    Example: ``original, x = load_with_original("photo.jpg", (224, 224))``
    """
    img, full = _decode(path, size)
    decoded = np.asarray(img, dtype=np.uint8)
    model_input = resize(decoded, size(full) if callable(size) else size)
    if decoded.shape[:2] == full:
        return decoded, model_input  # one array when the model takes the image at its own size
    return np.asarray(_decode(path, None)[0], dtype=np.uint8), model_input


def _orientation(img: Image.Image) -> int | None:
    try:
        return img.getexif().get(_EXIF_ORIENTATION)
    except Exception:  # noqa: BLE001 - broken EXIF: decode the image as stored
        return None


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        # Deep grayscale is scaled by its type's range, never by its content (a dark 16-bit image stays dark).
        return Image.fromarray(_deep_to_8bit(img), "L").convert("RGB")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    return img.convert("RGB")


def _deep_to_8bit(img: Image.Image) -> np.ndarray:
    """16-bit, 32-bit integer (mode I) and float (mode F) grayscale as uint8.

    Integers are 16-bit data: 0-65535 maps to 0-255 (16-bit PNG, TIFF and PGM
    files; 16-bit RGB files are scaled the same way by Pillow itself). Floats
    are 0-1 (the convention of float image files), mapped to 0-255. Values
    outside those ranges (32-bit integers above 65535, floats on a 0-255 scale,
    NaN) are refused rather than guessed at: cvtool never rescales by content.
    """
    arr = np.asarray(img)
    if img.mode == "F":
        arr = arr.astype(np.float64)
        if not np.isfinite(arr).all():
            raise ImageError("float image with pixels that are not a number (NaN or infinity)")
        low, high = float(arr.min(initial=0.0)), float(arr.max(initial=0.0))
        if low < -_FLOAT_SLACK or high > 1.0 + _FLOAT_SLACK:
            raise ImageError(
                f"float image with values from {low:.4g} to {high:.4g}, outside 0-1: cvtool reads float images "
                "as 0-1 (scale it to 0-1, or save it as an 8- or 16-bit image)"
            )
        return np.round(np.clip(arr, 0.0, 1.0) * 255.0).astype(np.uint8)
    arr = arr.astype(np.int64)
    low, high = int(arr.min(initial=0)), int(arr.max(initial=0))
    if low < 0 or high > 65535:
        raise ImageError(
            f"32-bit integer image with values from {low} to {high}: cvtool reads integer images as "
            "8- or 16-bit (0-65535)"
        )
    return ((arr * 255 + 32767) // 65535).astype(np.uint8)  # round(x * 255 / 65535)


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text or type(exc).__name__
