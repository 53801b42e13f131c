"""HTML report pages: one self-contained ``report.html`` with its pictures in a folder beside it.

Pages are built from a few pieces (headline figures, tables, plots, captioned
thumbnail galleries) by :class:`Page`. Every text that comes from outside
(file names, class names, model names, error messages) is escaped with
:func:`html.escape`; only markup built here is trusted (:class:`Markup`).
The page has no script and loads nothing from the network: its style is
inline and its pictures are relative links into ``report_files/``, so it
opens from a file, a mail attachment with its folder, or any static server.

Example::

    page = Page("evaluate: runs/a")
    page.section("Headline", "headline")
    page.cards([("accuracy", "0.9310")])
    with files_folder(out) as files:
        ...  # write plots and thumbnails into files
    page.write(out / PAGE_FILE)
"""

from __future__ import annotations

import html
import shutil
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from cvtool.outputs import write_bytes_atomic

PAGE_FILE = "report.html"
FILES_DIR = "report_files"

STYLE = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif;margin:0;color:#1d2330;
background:#f6f7f9;line-height:1.4}
header{background:#1d2330;color:#fff;padding:14px 28px}
header h1{margin:0;font-size:20px;font-weight:600;overflow-wrap:anywhere}
header p{margin:4px 0 0;color:#c7ccd6;font-size:13px;overflow-wrap:anywhere}
nav{padding:8px 28px;background:#e9ecf1;font-size:13px}
nav a{margin-right:14px;color:#2857b8;text-decoration:none}
main{padding:8px 28px 40px;max-width:1400px}
h2{font-size:17px;margin:26px 0 10px;padding-bottom:4px;border-bottom:1px solid #d5d9e0}
h3{font-size:14px;margin:16px 0 6px;overflow-wrap:anywhere}
.cards{display:flex;flex-wrap:wrap;gap:10px}
.card{background:#fff;border:1px solid #d5d9e0;border-radius:6px;padding:8px 14px;min-width:110px}
.card .v{font-size:22px;font-weight:600}
.card .k{font-size:12px;color:#5b6473}
table{border-collapse:collapse;background:#fff;font-size:13px;margin:6px 0}
th,td{border:1px solid #d5d9e0;padding:3px 8px;text-align:left;vertical-align:top;overflow-wrap:anywhere}
th{background:#eef0f4}
td.n{text-align:right;font-variant-numeric:tabular-nums}
.plots{display:flex;flex-wrap:wrap;gap:14px;align-items:flex-start}
.plot{background:#fff;border:1px solid #d5d9e0;border-radius:6px;padding:6px;margin:0}
.plot img{max-width:100%;height:auto;display:block}
.plot figcaption{font-size:12px;color:#5b6473;margin-top:4px}
.gallery{display:flex;flex-wrap:wrap;gap:8px}
.thumb{width:164px;margin:0;background:#fff;border:1px solid #d5d9e0;border-radius:6px;padding:5px;
font-size:11.5px;box-sizing:border-box}
.thumb.wide{width:214px}
.thumb img{display:block;margin:0 auto 4px;width:128px;height:128px;object-fit:contain;background:#eef0f4}
.thumb.wide img{width:192px;height:192px}
.thumb .p{font-family:ui-monospace,"DejaVu Sans Mono",monospace;font-size:11px;overflow-wrap:anywhere;color:#1d2330}
.wrong{border-left:4px solid #c62828}.wrong .pred{color:#c62828;font-weight:600}
.right{border-left:4px solid #2e7d32}.right .pred{color:#2e7d32;font-weight:600}
.note{font-size:13px;color:#5b6473}
.warn{background:#fff4e5;border:1px solid #f0b35a;border-radius:6px;padding:6px 10px;font-size:13px}
.empty{font-size:13px;color:#5b6473;font-style:italic}
"""


class Markup(str):
    """Markup built by this module: inserted as it is (every other string is escaped)."""


def esc(value: object) -> str:
    """``value`` as HTML text: ``<``, ``>``, ``&`` and both quotes escaped; Markup kept as it is."""
    return value if isinstance(value, Markup) else html.escape(str(value), quote=True)


def link(href: str, text: object) -> Markup:
    """A relative link (``href`` is a path cvtool chose, escaped all the same)."""
    return Markup(f'<a href="{esc(href)}">{esc(text)}</a>')


@dataclass
class Thumb:
    """One captioned picture of a gallery: ``lines`` of caption, ``pred`` the coloured one, ``kind`` right/wrong."""

    src: str | None
    path: str
    lines: Sequence[str] = ()
    pred: str = ""
    kind: str = ""
    wide: bool = False


@dataclass
class Page:
    """An HTML page built section by section; :meth:`write` renders it atomically.

    Args:
        title: the page's heading (escaped).
        subtitle: a line under it (escaped).
        refresh: reload the page every this many seconds (a training run being watched); 0: never.
    """

    title: str
    subtitle: str = ""
    refresh: int = 0
    parts: list[str] = field(default_factory=list)
    toc: list[tuple[str, str]] = field(default_factory=list)

    def section(self, title: str, anchor: str, nav: str = "") -> None:
        """A heading with an ``anchor``, listed in the page's navigation bar as ``nav`` (default: the title)."""
        self.toc.append((anchor, nav or title))
        self.parts.append(f'<h2 id="{esc(anchor)}">{esc(title)}</h2>')

    def heading(self, text: str) -> None:
        self.parts.append(f"<h3>{esc(text)}</h3>")

    def para(self, text: object, cls: str = "note") -> None:
        self.parts.append(f'<p class="{cls}">{esc(text)}</p>')

    def warning(self, text: object) -> None:
        self.parts.append(f'<p class="warn">{esc(text)}</p>')

    def cards(self, items: Iterable[tuple[str, object]]) -> None:
        cells = "".join(
            f'<div class="card"><div class="v">{esc(v)}</div><div class="k">{esc(k)}</div></div>' for k, v in items
        )
        self.parts.append(f'<div class="cards">{cells}</div>')

    def table(self, header: Sequence[object], rows: Iterable[Sequence[object]], numeric: Sequence[int] = ()) -> None:
        """A table; columns whose index is in ``numeric`` are right-aligned."""
        head = "".join(f"<th>{esc(h)}</th>" for h in header)
        body = "".join(
            "<tr>"
            + "".join(f"<td{' class=n' if i in numeric else ''}>{esc(c)}</td>" for i, c in enumerate(r))
            + "</tr>"
            for r in rows
        )
        self.parts.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")

    def plots(self, figures: Iterable[tuple[str, str]]) -> None:
        """Plots side by side: (page-relative src, caption)."""
        items = "".join(
            f'<figure class="plot"><img src="{esc(src)}" alt="{esc(caption)}"><figcaption>{esc(caption)}'
            "</figcaption></figure>"
            for src, caption in figures
        )
        self.parts.append(f'<div class="plots">{items}</div>')

    def gallery(self, thumbs: Sequence[Thumb], empty: str = "none", name: str = "") -> None:
        """Captioned thumbnails: the relative path, then the caption lines, the ``pred`` line coloured.

        ``name`` becomes the gallery's ``data-gallery`` attribute (scripts and tests find it by it).
        """
        if not thumbs:
            self.parts.append(f'<p class="empty">{esc(empty)}</p>')
            return
        out = []
        for t in thumbs:
            picture = f'<img src="{esc(t.src)}" alt="{esc(t.path)}">' if t.src else '<p class="empty">unreadable</p>'
            lines = "".join(f"<br>{esc(line)}" for line in t.lines)
            pred = f'<br><span class="pred">{esc(t.pred)}</span>' if t.pred else ""
            cls = " ".join(c for c in ("thumb", t.kind, "wide" if t.wide else "") if c)
            out.append(
                f'<figure class="{cls}">{picture}<figcaption><span class="p">{esc(t.path)}</span>{lines}{pred}'
                "</figcaption></figure>"
            )
        self.parts.append(f'<div class="gallery" data-gallery="{esc(name)}">{"".join(out)}</div>')

    def render(self) -> str:
        refresh = f'<meta http-equiv="refresh" content="{int(self.refresh)}">' if self.refresh else ""
        nav = "".join(f'<a href="#{esc(a)}">{esc(t)}</a>' for a, t in self.toc)
        sub = f"<p>{esc(self.subtitle)}</p>" if self.subtitle else ""
        return (
            '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            '<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"{refresh}<title>{esc(self.title)}</title><style>{STYLE}</style></head><body>"
            f"<header><h1>{esc(self.title)}</h1>{sub}</header><nav>{nav}</nav><main>{''.join(self.parts)}</main>"
            "</body></html>\n"
        )

    def write(self, path: str | Path) -> Path:
        return write_bytes_atomic(path, self.render().encode("utf-8"))


@contextmanager
def files_folder(out_dir: str | Path) -> Iterator[Path]:
    """A fresh folder to write a report's pictures in; it replaces ``out_dir/report_files`` when the block succeeds.

    Pictures of an earlier report (an ``--overwrite``, a resumed run) never linger beside the new page.
    """
    out_dir = Path(out_dir)
    final, new, old = out_dir / FILES_DIR, out_dir / f".{FILES_DIR}.new", out_dir / f".{FILES_DIR}.old"
    shutil.rmtree(new, ignore_errors=True)
    new.mkdir(parents=True)
    try:
        yield new
    except BaseException:
        shutil.rmtree(new, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        final.rename(old)
    new.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def fmt(value: float, digits: int = 4) -> str:
    return f"{float(value):.{digits}f}"


def percent(value: float) -> str:
    """A probability as ``87.31%`` (the form of Grad-CAM banners)."""
    return f"{100.0 * float(value):.2f}%"
