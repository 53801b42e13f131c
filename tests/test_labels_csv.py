"""evaluate --labels: duplicate and conflicting rows, GTSRB's layouts, delimiters, label matching, empty cells."""

from __future__ import annotations

import csv
import json
import shutil
import unicodedata
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cvtool.cli import app
from cvtool.evaluate import AmbiguousLabel, label_index

runner = CliRunner()
NAMES = ["blue", "green", "red"]


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def write_rows(path: Path, header, rows, delimiter: str = ",") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, delimiter=delimiter)
        w.writerow(header)
        w.writerows(rows)
    return path


def flat_copy(colour_data: Path, folder: Path, per_class: int = 2) -> dict[str, str]:
    """``per_class`` validation images of each class copied into one flat folder; {file name: class}."""
    folder.mkdir(parents=True, exist_ok=True)
    truth = {}
    for name in NAMES:
        for src in sorted((colour_data / "validation" / name).iterdir())[:per_class]:
            shutil.copy(src, folder / src.name)
            truth[src.name] = name
    return truth


def evaluate(run, data, labels, out, *extra):
    return runner.invoke(
        app, ["evaluate", str(run), str(data), "--labels", str(labels), "--out", str(out), "-q", *extra]
    )


def test_duplicate_rows_count_once_and_conflicting_rows_are_refused(trained_run, colour_data, tmp_path):
    flat = tmp_path / "flat"
    truth = flat_copy(colour_data, flat)
    a, b, c, *rest = sorted(truth)
    rows = [
        [a, truth[a]],  # line 2
        [a, truth[a]],  # exact duplicate
        [f"./{a}", str(NAMES.index(truth[a]))],  # the same image and class, written differently
        [b, "green"],
        [b, "red"],  # conflicts with the row above
        [c, truth[c]],
        *([r, truth[r]] for r in rest),
    ]
    labels = write_rows(tmp_path / "labels.csv", ["path", "label"], rows)
    res = evaluate(trained_run, flat, labels, tmp_path / "eval")
    assert res.exit_code == 1, res.output
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["samples"] == len(truth) - 1  # each image once; b not at all
    predictions = read_csv(tmp_path / "eval" / "predictions.csv")
    assert sorted(p["path"] for p in predictions) == sorted([a, c, *rest])
    errors = read_csv(tmp_path / "eval" / "errors.csv")
    duplicates = [e for e in errors if "duplicate of line 2" in e["error"]]
    assert sorted(e["path"] for e in duplicates) == sorted([a, f"./{a}"])
    conflicts = [e for e in errors if "conflicting labels" in e["error"]]
    assert [e["path"] for e in conflicts] == [b, b]
    assert "'green' (line 5)" in conflicts[0]["error"] and "'red' (line 6)" in conflicts[0]["error"]
    assert len(errors) == 4


def gtsrb_run(trained_run: Path, tmp_path: Path) -> Path:
    """The trained run with GTSRB's zero-padded class folder names (00000, 00001, 00002) as its classes."""
    run = tmp_path / "gtsrb-run"
    shutil.copytree(trained_run, run)
    meta = json.loads((run / "cvtool.json").read_text())
    meta["class_names"] = [f"{i:05d}" for i in range(len(meta["class_names"]))]
    (run / "cvtool.json").write_text(json.dumps(meta))
    return run


@pytest.mark.parametrize("layout", ["kaggle", "original"])
def test_gtsrb_layouts_zero_padded_classes_and_semicolons(trained_run, colour_data, tmp_path, layout):
    run = gtsrb_run(trained_run, tmp_path)
    root = tmp_path / "gtsrb"
    test_dir = root / "Test"
    truth = flat_copy(colour_data, test_dir)
    ids = {name: str(NAMES.index(cls)) for name, cls in truth.items()}  # ClassId 0, 1, 2
    if layout == "kaggle":  # Test.csv beside Test/, paths relative to the dataset root, commas
        header = ["Width", "Height", "ClassId", "Path"]
        labels = write_rows(root / "Test.csv", header, [[40, 32, ids[n], f"Test/{n}"] for n in sorted(truth)])
        args = ["--path-column", "Path", "--label-column", "ClassId"]
    else:  # GT-final_test.csv inside Test/, semicolons
        header = ["Filename", "Width", "Height", "ClassId"]
        rows = [[n, 40, 32, ids[n]] for n in sorted(truth)]
        labels = write_rows(test_dir / "GT-final_test.csv", header, rows, delimiter=";")
        args = ["--path-column", "Filename", "--label-column", "ClassId"]
    res = evaluate(run, test_dir, labels, tmp_path / "eval", *args)
    assert res.exit_code == 0, res.output
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["samples"] == len(truth) and metrics["failed"] == 0
    predictions = read_csv(tmp_path / "eval" / "predictions.csv")
    padded = {name: f"{NAMES.index(cls):05d}" for name, cls in truth.items()}
    assert {p["path"].removeprefix("Test/"): p["true"] for p in predictions} == padded
    assert metrics["accuracy"] == sum(p["label"] == p["true"] for p in predictions) / len(truth)


def test_explicit_delimiter_and_bad_delimiter(trained_run, colour_data, tmp_path):
    flat = tmp_path / "flat"
    truth = flat_copy(colour_data, flat, per_class=1)
    labels = write_rows(tmp_path / "labels.tsv", ["path", "label"], sorted(truth.items()), delimiter="\t")
    res = evaluate(trained_run, flat, labels, tmp_path / "eval", "--delimiter", "tab")
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["samples"] == 3
    bad = evaluate(trained_run, flat, labels, tmp_path / "eval2", "--delimiter", "ab")
    assert bad.exit_code == 2 and "--delimiter" in bad.output
    wrong = evaluate(trained_run, flat, labels, tmp_path / "eval3", "--delimiter", ";")
    assert wrong.exit_code == 2 and "no column" in wrong.output


def test_no_usable_rows_is_refused_with_exit_3_and_no_report(trained_run, colour_data, tmp_path):
    flat = tmp_path / "flat"
    truth = flat_copy(colour_data, flat, per_class=1)
    labels = write_rows(tmp_path / "labels.csv", ["path", "label"], [[n, "purple"] for n in sorted(truth)])
    out = tmp_path / "eval"
    res = evaluate(trained_run, flat, labels, out)
    assert res.exit_code == 3, res.output
    assert "no usable rows" in res.output and "'purple'" in res.output
    assert len(res.output.strip().splitlines()) == 1
    assert not (out / "metrics.json").exists() and not (out / "confusion_matrix.png").exists()
    assert len(read_csv(out / "errors.csv")) == 3


def test_no_readable_image_is_refused_with_exit_3(trained_run, tmp_path):
    flat = tmp_path / "flat"
    flat.mkdir()
    for name in ("a.png", "b.png"):
        (flat / name).write_text("not an image")
    labels = write_rows(tmp_path / "labels.csv", ["path", "label"], [["a.png", "red"], ["b.png", "blue"]])
    res = evaluate(trained_run, flat, labels, tmp_path / "eval")
    assert res.exit_code == 3 and "could be read" in res.output, res.output
    assert not (tmp_path / "eval" / "metrics.json").exists()
    assert len(read_csv(tmp_path / "eval" / "errors.csv")) == 2


def test_empty_path_cell_is_reported_as_empty_not_outside(trained_run, colour_data, tmp_path):
    flat = tmp_path / "flat"
    truth = flat_copy(colour_data, flat, per_class=1)
    rows = [*sorted(truth.items()), ["", "red"], ["  ", "blue"]]
    labels = write_rows(tmp_path / "labels.csv", ["path", "label"], rows)
    res = evaluate(trained_run, flat, labels, tmp_path / "eval")
    assert res.exit_code == 1, res.output
    errors = read_csv(tmp_path / "eval" / "errors.csv")
    assert [e["error"] for e in errors] == ["line 5: the path cell is empty", "line 6: the path cell is empty"]


def test_labels_match_class_names_in_either_unicode_normal_form(trained_run, colour_data, tmp_path):
    nfc, nfd = unicodedata.normalize("NFC", "café"), unicodedata.normalize("NFD", "café")
    assert nfc != nfd
    assert label_index(nfd, [nfc, "thé"]) == 0
    assert label_index(nfc, ["thé", nfd]) == 1
    # The same through evaluate: a run whose class is "café" (NFC), a CSV typed on macOS (NFD).
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    meta = json.loads((run / "cvtool.json").read_text())
    meta["class_names"] = [nfc, "green", "red"]
    (run / "cvtool.json").write_text(json.dumps(meta))
    flat = tmp_path / "flat"
    truth = flat_copy(colour_data, flat, per_class=1)
    rows = [[n, nfd if c == "blue" else c] for n, c in sorted(truth.items())]
    res = evaluate(run, flat, write_rows(tmp_path / "labels.csv", ["path", "label"], rows), tmp_path / "eval")
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["per_class"][nfc]["support"] == 1


def test_integer_labels_match_zero_padded_numeric_class_names():
    padded = [f"{i:05d}" for i in range(43)]
    assert label_index("0", padded) == 0
    assert label_index("42", padded) == 42
    assert label_index("43", padded) is None
    assert label_index("00007", [str(i) for i in range(12)]) == 7  # and the other way round
    unsorted = sorted(str(i) for i in range(12))  # "0", "1", "10", "11", "2", ...: names win over positions
    assert label_index("2", unsorted) == unsorted.index("2")
    assert label_index("1", ["cat", "dog"]) == 1  # no numeric names: an index into the class order
    assert label_index("7", ["7", "007"]) == 0  # an exact name wins
    with pytest.raises(AmbiguousLabel):
        label_index("07", ["7", "007"])
