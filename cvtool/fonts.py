"""Fonts for text in pictures: class names in any script, in plots and in Grad-CAM banners.

DejaVu Sans (matplotlib's own font) covers Latin, Greek and Cyrillic. For the
characters it lacks (CJK class names, say), the system's fonts that have them
(Noto Sans CJK, Source Han Sans, WenQuanYi, ...) are found by their character
maps and used as fallbacks. Characters that no installed font has are drawn as
boxes, silently: no "Glyph missing" warnings on stderr::

    with text_fonts(class_names):
        fig = ...  # create and save the figure inside the block
"""

from __future__ import annotations

import contextlib
import functools
import warnings
from collections.abc import Iterable, Iterator

BASE_FAMILY = "DejaVu Sans"
# Families looked at first (any other installed font is looked at after them).
_LIKELY = ("cjk", "han", "hei", "gothic", "mincho", "ming", "song", "kai", "nanum", "wenquanyi", "droid", "unicode")


@functools.cache
def _charmap(path: str) -> frozenset[int]:
    from matplotlib import ft2font

    try:
        return frozenset(ft2font.FT2Font(path).get_charmap())
    except Exception:  # noqa: BLE001 - an unreadable font file is no fallback
        return frozenset()


@functools.cache
def base_font_file() -> str:
    """The path of DejaVu Sans (shipped with matplotlib)."""
    from matplotlib import font_manager

    return font_manager.findfont(font_manager.FontProperties(family=BASE_FAMILY), fallback_to_default=True)


def _candidates() -> list[tuple[str, str]]:
    """(family, file) of every installed font, likely CJK fonts first."""
    from matplotlib import font_manager

    fonts = {(f.name, f.fname) for f in font_manager.fontManager.ttflist}
    return sorted(fonts, key=lambda f: (not any(k in f[0].lower() for k in _LIKELY), f[0], f[1]))


def _missing(texts: Iterable[str]) -> set[int]:
    chars = {ord(c) for text in texts for c in text if c.isprintable() and not c.isspace()}
    return chars - _charmap(base_font_file())


def fallback_fonts(texts: Iterable[str]) -> list[tuple[str, str]]:
    """(family, file) of installed fonts that have the characters of ``texts`` that DejaVu Sans lacks.

    Empty when DejaVu Sans has them all (no font is searched then) or when no installed font helps.
    """
    missing = _missing(texts)
    found = []
    for family, path in _candidates() if missing else []:
        covered = _charmap(path) & missing
        if covered:
            found.append((family, path))
            missing -= covered
            if not missing:
                break
    return found


@contextlib.contextmanager
def text_fonts(texts: Iterable[str]) -> Iterator[None]:
    """Matplotlib settings in which ``texts`` render with real glyphs where any installed font has them.

    Create and save the figure inside the block: a text's fonts are fixed when it is created, and
    missing glyphs are looked up when it is drawn.
    """
    import matplotlib

    families = [BASE_FAMILY, *dict.fromkeys(family for family, _ in fallback_fonts(texts))]
    with matplotlib.rc_context({"font.family": families}), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"Glyph \d+ .*missing from font")
        yield


def font_file_for(text: str) -> str:
    """One font file to draw ``text`` with (Pillow has no fallback): DejaVu Sans, or the installed font
    that has the most of the characters DejaVu Sans lacks (then the most of the others)."""
    missing = _missing([text])
    if not missing:
        return base_font_file()
    return _best_file(frozenset(missing), frozenset(ord(c) for c in text))


@functools.cache
def _best_file(missing: frozenset[int], chars: frozenset[int]) -> str:
    ranked = [(len(_charmap(path) & missing), len(_charmap(path) & chars), path) for _, path in _candidates()]
    best = max(ranked, default=(0, 0, ""), key=lambda r: r[:2])
    return best[2] if best[0] else base_font_file()


__all__ = ["text_fonts", "fallback_fonts", "font_file_for", "base_font_file", "BASE_FAMILY"]
