"""pyproject.toml declares what cvtool uses, and nothing it does not use."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")

REPO = Path(__file__).resolve().parents[1]
# distributions whose import name is not their project name
IMPORT_NAMES = {
    "pillow": "PIL",
    "opencv-python-headless": "cv2",
    "opencv-python": "cv2",
    "tensorflow-hub": "tensorflow_hub",
}


def _imported_modules() -> set[str]:
    names = set()
    for path in (REPO / "cvtool").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.add(node.module.split(".")[0])
    return names


def test_every_declared_dependency_is_imported_by_cvtool():
    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    imported = _imported_modules()
    unused = []
    for requirement in project["dependencies"]:
        dist = re.match(r"[A-Za-z0-9._-]+", requirement).group(0).lower()
        if IMPORT_NAMES.get(dist, dist.replace("-", "_")) not in imported:
            unused.append(dist)
    assert not unused, f"declared in pyproject.toml but never imported by cvtool: {unused}"
