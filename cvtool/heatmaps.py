"""Rendering heatmaps: colour maps, overlays, label banners, panels, image encoding.

NumPy/OpenCV on RGB uint8 arrays (OpenCV's BGR order stays inside this
module; Pillow draws banners in non-ASCII text); no TensorFlow. The heatmap
is resized to the image's own size, so every picture written has the input
image's size (a panel: three of them side by side).
"""

from __future__ import annotations

import cv2
import numpy as np

from cvtool.errors import UsageError

LAYOUTS = ("overlay", "panel")
FORMATS = ("jpg", "png")
JPEG_QUALITY = 95


def colormap_names() -> list[str]:
    """OpenCV colour map names, lower case (jet, viridis, inferno, turbo, ...)."""
    return sorted(name[len("COLORMAP_") :].lower() for name in dir(cv2) if name.startswith("COLORMAP_"))


def colormap(name: str) -> int:
    """The OpenCV constant for a colour map name (case-insensitive)."""
    value = getattr(cv2, f"COLORMAP_{name.upper()}", None)
    if not isinstance(value, int):
        raise UsageError(f"unknown --colormap {name!r}; choose from {', '.join(colormap_names())}")
    return value


def resize_map(cam: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A [h, w] map in [0, 1] resized bilinearly to (height, width), float32."""
    h, w = size
    cam = np.asarray(cam, np.float32)
    if cam.shape != (h, w):
        cam = cv2.resize(cam, (w, h), interpolation=cv2.INTER_LINEAR)
    return np.clip(cam, 0.0, 1.0)


def to_gray(heat: np.ndarray) -> np.ndarray:
    """A map in [0, 1] as 8-bit grayscale (0 = nothing, 255 = the peak)."""
    return np.round(np.clip(heat, 0.0, 1.0) * 255.0).astype(np.uint8)


def colorize(heat: np.ndarray, cmap: int) -> np.ndarray:
    """A map in [0, 1] in colour (RGB uint8)."""
    return cv2.cvtColor(cv2.applyColorMap(to_gray(heat), cmap), cv2.COLOR_BGR2RGB)


def blend(image: np.ndarray, coloured: np.ndarray, alpha: float) -> np.ndarray:
    """``alpha`` x heatmap + (1 - alpha) x image."""
    return cv2.addWeighted(coloured, float(alpha), image, 1.0 - float(alpha), 0.0)


def draw_label(image: np.ndarray, text: str) -> np.ndarray:
    """White text on a black banner in the top-left corner, scaled to the image (a copy).

    ASCII text is drawn with OpenCV's Hershey font; other text (``帽子: 85.03%``)
    with Pillow and a TrueType font that has its characters (see :mod:`cvtool.fonts`).
    """
    out = np.ascontiguousarray(image).copy()
    h, w = out.shape[:2]
    scale = max(0.3, min(h, w) / 500.0)
    if not text.isascii():
        return _draw_label_truetype(out, text, scale)
    font = cv2.FONT_HERSHEY_SIMPLEX
    thickness = max(1, round(scale * 2))
    pad = max(2, round(6 * scale))
    (tw, th), base = cv2.getTextSize(text, font, scale, thickness)
    if tw + 2 * pad > w:  # shrink to fit the width
        scale *= (w - 2 * pad) / max(tw, 1)
        thickness = max(1, round(scale * 2))
        (tw, th), base = cv2.getTextSize(text, font, scale, thickness)
    cv2.rectangle(out, (0, 0), (min(w - 1, tw + 2 * pad), th + base + 2 * pad), (0, 0, 0), -1)
    cv2.putText(out, text, (pad, pad + th), font, scale, (255, 255, 255), thickness, cv2.LINE_AA)
    return out


def _draw_label_truetype(out: np.ndarray, text: str, scale: float) -> np.ndarray:
    from PIL import Image, ImageDraw, ImageFont

    from cvtool.fonts import font_file_for

    h, w = out.shape[:2]
    pad = max(2, round(6 * scale))
    path = font_file_for(text)
    size = max(6, round(24 * scale))  # about the Hershey banner's height at the same scale
    font = ImageFont.truetype(path, size)
    left, top, right, bottom = font.getbbox(text)
    if right - left + 2 * pad > w:  # shrink to fit the width
        size = max(6, int(size * (w - 2 * pad) / max(right - left, 1)))
        font = ImageFont.truetype(path, size)
        left, top, right, bottom = font.getbbox(text)
    picture = Image.fromarray(out)
    draw = ImageDraw.Draw(picture)
    draw.rectangle((0, 0, min(w - 1, right - left + 2 * pad), bottom - top + 2 * pad), fill=(0, 0, 0))
    draw.text((pad - left, pad - top), text, font=font, fill=(255, 255, 255))
    return np.asarray(picture)


def label_text(class_name: str, score: float) -> str:
    """``pug: 85.03%``."""
    return f"{class_name}: {100.0 * float(score):.2f}%"


def render(
    image: np.ndarray,
    heat: np.ndarray,
    label: str | None = None,
    cmap: int = cv2.COLORMAP_JET,
    alpha: float = 0.5,
    layout: str = "overlay",
) -> np.ndarray:
    """The picture for one map: the overlay (with banner), or original | heatmap | overlay side by side.

    ``heat`` must already have the image's size (see :func:`resize_map`).
    """
    coloured = colorize(heat, cmap)
    over = blend(image, coloured, alpha)
    if label:
        over = draw_label(over, label)
    if layout == "panel":
        return np.hstack([image, coloured, over])
    return over


def encode(image: np.ndarray, fmt: str) -> bytes:
    """RGB uint8 -> JPEG (quality 95) or PNG bytes."""
    bgr = cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
    params = [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY] if fmt == "jpg" else []
    ok, buf = cv2.imencode(f".{fmt}", bgr, params)
    if not ok:
        raise OSError(f"OpenCV could not encode a {fmt} image")
    return buf.tobytes()


def encode_gray_png(gray: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".png", gray)
    if not ok:
        raise OSError("OpenCV could not encode a PNG image")
    return buf.tobytes()


def check_options(colormap_name: str, alpha: float, layout: str, fmt: str) -> int:
    """Validate rendering options (exit 2 on a bad one); returns the colour map constant."""
    if layout not in LAYOUTS:
        raise UsageError(f"--layout must be {' or '.join(LAYOUTS)}, got {layout!r}")
    if fmt not in FORMATS:
        raise UsageError(f"--format must be {' or '.join(FORMATS)}, got {fmt!r}")
    if not 0.0 <= alpha <= 1.0:
        raise UsageError(f"--alpha must be between 0 and 1, got {alpha}")
    return colormap(colormap_name)
