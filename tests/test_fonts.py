"""Class names in any script in the pictures: CJK fonts when installed, silent boxes when not."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest

TEST_FAMILY = "Cvtool Test CJK"
HAT_PANTS = "帽子裤"  # in the test font
SHOES = "鞋"  # in no font of a test machine (DejaVu only)


def make_font(path: Path, chars: str) -> Path:
    """A real TrueType font whose every glyph is a filled box: enough to tell it is the one used."""
    from fontTools.fontBuilder import FontBuilder
    from fontTools.pens.ttGlyphPen import TTGlyphPen

    names = [".notdef", *(f"uni{ord(c):04X}" for c in chars)]
    fb = FontBuilder(1000, isTTF=True)
    fb.setupGlyphOrder(names)
    fb.setupCharacterMap({ord(c): f"uni{ord(c):04X}" for c in chars})
    glyphs = {}
    for name in names:
        pen = TTGlyphPen(None)
        pen.moveTo((100, 0))
        pen.lineTo((100, 700))
        pen.lineTo((900, 700))
        pen.lineTo((900, 0))
        pen.closePath()
        glyphs[name] = pen.glyph()
    fb.setupGlyf(glyphs)
    fb.setupHorizontalMetrics({name: (1000, 100) for name in names})
    fb.setupHorizontalHeader(ascent=800, descent=-200)
    fb.setupNameTable({"familyName": TEST_FAMILY, "styleName": "Regular"})
    fb.setupOS2(sTypoAscender=800, sTypoDescender=-200, usWinAscent=800, usWinDescent=200)
    fb.setupPost()
    fb.save(str(path))
    return path


@pytest.fixture(scope="module")
def cjk_font(tmp_path_factory) -> Path:
    """The test font, installed into matplotlib's font list as a system font would be."""
    from matplotlib import font_manager

    path = make_font(tmp_path_factory.mktemp("fonts") / "testcjk.ttf", HAT_PANTS + "0123456789:.% ")
    font_manager.fontManager.addfont(str(path))
    return path


def glyph_warnings(record) -> list[str]:
    return [str(w.message) for w in record if "Glyph" in str(w.message)]


def test_confusion_matrix_with_class_names_no_font_has_gives_no_glyph_warnings(tmp_path):
    from cvtool.evaluate import plot_confusion

    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        plot_confusion(np.eye(2, dtype=int), [SHOES, "hat"], tmp_path / "cm.png", normalise=False)
    assert glyph_warnings(record) == []
    assert (tmp_path / "cm.png").stat().st_size > 0


def test_installed_cjk_font_is_the_fallback_for_plots_and_banners(cjk_font, tmp_path):
    import matplotlib

    from cvtool.evaluate import plot_confusion
    from cvtool.fonts import fallback_fonts, font_file_for, text_fonts
    from cvtool.heatmaps import draw_label

    assert fallback_fonts(["hat", "café"]) == []  # DejaVu Sans has these: no search
    assert fallback_fonts(["帽子", "裤"]) == [(TEST_FAMILY, str(cjk_font))]
    with text_fonts(["帽子"]):
        assert matplotlib.rcParams["font.family"] == ["DejaVu Sans", TEST_FAMILY]
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        plot_confusion(np.eye(2, dtype=int), ["帽子", "裤子"], tmp_path / "cm.png", normalise=True)
    assert glyph_warnings(record) == []
    # Grad-CAM banners: drawn with the font that has the characters (the test font's glyphs are filled boxes).
    assert font_file_for("帽子: 85.03%") == str(cjk_font)
    image = np.full((200, 300, 3), 90, np.uint8)
    banner = draw_label(image, "帽子: 85.03%")
    assert banner.shape == image.shape and banner.dtype == np.uint8
    top = banner[:30]
    assert (top == 255).all(axis=2).sum() > 150  # white glyph boxes on the black banner
    np.testing.assert_array_equal(banner[60:], image[60:])  # the rest of the picture untouched


def test_banner_with_accents_keeps_them_instead_of_question_marks():
    from cvtool.heatmaps import draw_label

    image = np.full((120, 200, 3), 90, np.uint8)
    accented, plain = draw_label(image, "café: 85.03%"), draw_label(image, "caf?: 85.03%")
    assert not np.array_equal(accented, plain)
