"""Class maps for segmentation: class ids, names and colours.

A class map says what each value in a mask means and how to draw it. The
CamVid table of the default HRNet model ships inside the package; users give
their own with ``--classes FILE`` (JSON list of ``{"id", "name", "color"}``
or CSV ``id,name,r,g,b``). Models without either get numbered classes with the
PASCAL VOC palette.
"""

from __future__ import annotations

import csv
import functools
import io
import json
import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np

from cvtool.errors import UsageError

DEFAULT_MODEL = "https://tfhub.dev/google/HRNet/camvid-hrnetv2-w48/1"  # the model the CamVid table describes
BACKGROUND_ID = 255  # mask value of the model's own background class (--keep-background)
BACKGROUND_NAME = "background"
BACKGROUND_COLOR = (0, 0, 0)


@dataclass(frozen=True)
class ClassMap:
    """Classes in model channel order: channel ``j`` (after any background channel) is class ``ids[j]``."""

    ids: tuple[int, ...]
    names: tuple[str, ...]
    colors: tuple[tuple[int, int, int], ...]
    source: str = ""

    def __len__(self) -> int:
        return len(self.ids)

    def with_background(self) -> ClassMap:
        """This map plus the model's background class (id 255, black), for --keep-background."""
        return ClassMap(
            (*self.ids, BACKGROUND_ID), (*self.names, BACKGROUND_NAME), (*self.colors, BACKGROUND_COLOR), self.source
        )

    @functools.cached_property
    def _table(self) -> np.ndarray:
        table = np.zeros((256, 3), dtype=np.uint8)
        for class_id, color in zip(self.ids, self.colors):
            table[class_id] = color
        table.setflags(write=False)
        return table

    def palette(self) -> list[int]:
        """A 256-entry PNG palette (768 ints): entry ``id`` is that class's colour, the rest black."""
        return self._table.reshape(-1).tolist()

    def color_table(self) -> np.ndarray:
        """uint8 [256, 3] lookup table (read-only): mask value -> RGB colour."""
        return self._table

    def name_of(self, class_id: int) -> str:
        """The class name of a mask value; the number itself for values the map does not list."""
        return self.names[self.ids.index(class_id)] if class_id in self.ids else str(class_id)


def camvid() -> ClassMap:
    """The 32 CamVid classes of the default HRNet model, from the table shipped in the package."""
    text = resources.files("cvtool").joinpath("resources/camvid_classes.csv").read_text(encoding="utf-8")
    return _from_csv_text(text, "built-in CamVid table")


def numbered(count: int) -> ClassMap:
    """Classes named "0".."count-1", coloured with the PASCAL VOC palette (class 0 black)."""
    if not 1 <= count <= 256:
        raise UsageError(f"cannot draw {count} classes in an 8-bit mask (at most 256)")
    return ClassMap(tuple(range(count)), tuple(str(i) for i in range(count)), tuple(voc_color(i) for i in range(count)))


def voc_color(index: int) -> tuple[int, int, int]:
    """The PASCAL VOC colour of ``index`` (bits of the index spread over R, G and B)."""
    r = g = b = 0
    for shift in range(7, -1, -1):
        r |= ((index >> 0) & 1) << shift
        g |= ((index >> 1) & 1) << shift
        b |= ((index >> 2) & 1) << shift
        index >>= 3
    return r, g, b


def read_class_file(path: str | os.PathLike) -> ClassMap:
    """Read ``--classes``: a JSON list of ``{"id", "name", "color"}`` or a CSV with ``id,name,r,g,b``.

    ``path`` may be a URL (``s3://...``): it is fetched to the local cache first (:func:`cvtool.storage.fetch`).
    """
    from cvtool.storage import fetch

    path = Path(fetch(path, "files"))
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"cannot read class file {path}: {exc.__class__.__name__}") from None
    if path.suffix.lower() == ".json" or text.lstrip().startswith(("[", "{")):
        return _from_json_text(text, str(path))
    return _from_csv_text(text, str(path))


def _from_json_text(text: str, source: str) -> ClassMap:
    try:
        entries = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UsageError(f"{source} is not valid JSON: {exc}") from None
    if not isinstance(entries, list):
        raise UsageError(f'{source}: expected a JSON list of {{"id", "name", "color"}} objects')
    rows = []
    for n, entry in enumerate(entries, 1):
        if not isinstance(entry, dict) or not {"id", "name", "color"} <= set(entry):
            raise UsageError(f'{source}: entry {n} needs "id", "name" and "color"')
        rows.append((entry["id"], entry["name"], _json_color(entry["color"], source, n)))
    return _build(rows, source)


def _json_color(value, source: str, n: int) -> tuple:
    if isinstance(value, str) and len(value) == 7 and value.startswith("#"):
        try:
            return tuple(int(value[i : i + 2], 16) for i in (1, 3, 5))
        except ValueError:
            pass
    if isinstance(value, list) and len(value) == 3:
        return tuple(value)
    raise UsageError(f'{source}: entry {n} "color" must be [r, g, b] or "#rrggbb", got {value!r}')


def _from_csv_text(text: str, source: str) -> ClassMap:
    reader = csv.DictReader(io.StringIO(text))
    fields = [f.strip().lower() for f in reader.fieldnames or []]
    if not {"id", "name", "r", "g", "b"} <= set(fields):
        raise UsageError(f"{source}: a class CSV needs the columns id,name,r,g,b (found: {','.join(fields)})")
    rows = []
    for n, raw in enumerate(reader, 2):
        row = {k.strip().lower(): (v or "").strip() for k, v in raw.items() if k is not None}
        try:
            rows.append((int(row["id"]), row["name"], (int(row["r"]), int(row["g"]), int(row["b"]))))
        except ValueError:
            raise UsageError(f"{source} line {n}: id, r, g and b must be integers") from None
    return _build(rows, source)


def _build(rows: list[tuple], source: str) -> ClassMap:
    if not rows:
        raise UsageError(f"{source} lists no classes")
    for class_id, name, color in rows:
        if isinstance(class_id, bool) or not isinstance(class_id, int) or not 0 <= class_id <= 255:
            raise UsageError(f"{source}: class id {class_id!r} is not an integer from 0 to 255 (8-bit masks)")
        if not isinstance(name, str) or not name.strip():
            raise UsageError(f"{source}: class {class_id} needs a name")
        if not all(isinstance(c, int) and not isinstance(c, bool) and 0 <= c <= 255 for c in color):
            raise UsageError(f"{source}: class {class_id} colour {list(color)} must be three integers from 0 to 255")
    rows.sort(key=lambda row: row[0])
    ids = tuple(row[0] for row in rows)
    names = tuple(row[1].strip() for row in rows)
    if len(set(ids)) != len(ids):
        raise UsageError(f"{source}: class ids must be unique")
    if len(set(names)) != len(names):
        raise UsageError(f"{source}: class names must be unique")
    return ClassMap(ids, names, tuple(tuple(int(c) for c in row[2]) for row in rows), source)
