"""Every command over folders nobody checked: bad files, odd files, exit codes, no overwriting.

To cover a new command, add one entry to COMMANDS: its argv (placeholders
{model}, {input} (a flat folder), {data} (class folders), {out}, and the
extra models of the `tools` fixture (conftest): {segmodel}, {hub}), where it writes its rows
and errors, whether it reads {data}, whether an input has several rows, and
which placeholder to point at a folder that is not a model for the exit-3 case.
"""

from __future__ import annotations

import csv
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from cvtool.cli import app
from tests.hostile import Corpus, make_clean, make_corpus

runner = CliRunner()


@dataclass(frozen=True)
class Case:
    argv: tuple[str, ...]
    errors: str  # errors CSV, relative to {out}
    rows: str | None = None  # one row per good input (path first), relative to {out}
    labelled: bool = False  # reads {data} (class folders) instead of {input}
    grouped: bool = False  # several rows per input (contiguous), e.g. pixel counts per class
    unusable: str = "model"  # placeholder given a folder that is not a model; "data": a data set of one class


COMMANDS = {
    "predict": Case(("predict", "{model}", "{input}", "--out", "{out}/preds.csv"), "preds.errors.csv", "preds.csv"),
    "tta": Case(("tta", "{model}", "{input}", "--out", "{out}/tta.csv"), "tta.errors.csv", "tta.csv"),
    "ensemble": Case(
        ("ensemble", "{model}", "{model}", "{input}", "--out", "{out}/ens.csv"), "ens.errors.csv", "ens.csv"
    ),
    "gradcam": Case(("gradcam", "{model}", "{input}", "--out", "{out}/cam"), "cam/errors.csv", "cam/gradcam.csv"),
    "segment": Case(
        ("segment", "{input}", "--out", "{out}/seg", "--model", "{segmodel}"),
        "seg/errors.csv",
        "seg/pixels.csv",
        grouped=True,
        unusable="segmodel",
    ),
    "evaluate": Case(
        ("evaluate", "{model}", "{data}", "--out", "{out}/rep"), "rep/errors.csv", "rep/predictions.csv", True
    ),
    "train": Case(
        ("train", "{data}", "--out", "{out}/run", "--epochs", "1", "--image-size", "32"),
        "run/errors.csv",
        None,
        True,
        unusable="data",
    ),
    # finetune decodes its data with train's own load_data (one code path for both, covered by "train"
    # above); its hub: backbone then goes its own way (features, head), so that is the one run here.
    "finetune": Case(
        (
            "finetune",
            "{data}",
            "--out",
            "{out}/ft",
            "--backbone",
            "hub:{hub}",
            "--image-size",
            "32",
            "--head-epochs",
            "1",
        ),
        "ft/errors.csv",
        None,
        True,
        unusable="data",
    ),
}


@dataclass
class Inputs:
    flat: Corpus  # {input}
    labelled: Corpus  # expectations for {data}: the flat corpus under red/, plus green/ and blue/ images
    data: Path


def make_inputs(root: Path, make) -> Inputs:
    flat = make(root / "flat")
    data = root / "labelled"
    red = make(data / "red").prefixed("red/")
    for name in ("green", "blue"):
        extra = make_clean(data / name, 4)
        red.good |= {f"{name}/{p}" for p in extra.good}
    return Inputs(flat, red, data)


@pytest.fixture(scope="session")
def hostile(tmp_path_factory) -> Inputs:
    return make_inputs(tmp_path_factory.mktemp("hostile"), make_corpus)


@pytest.fixture(scope="session")
def clean(tmp_path_factory) -> Inputs:
    return make_inputs(tmp_path_factory.mktemp("clean"), make_clean)


def argv(case: Case, model: Path, inputs: Inputs, out: Path, *extra: str, tools: dict | None = None) -> list[str]:
    fields = {"model": str(model), "input": str(inputs.flat.root), "data": str(inputs.data), "out": str(out)}
    fields.update({key: str(value) for key, value in (tools or {}).items()})
    return [a.format(**fields) for a in case.argv] + ["--quiet", *extra]


def first_cells(rows: list[list[str]], grouped: bool) -> list[str]:
    """The input of each row; for grouped rows, each input once (its rows must be contiguous)."""
    paths = [row[0] for row in rows]
    if not grouped:
        return paths
    runs = [p for i, p in enumerate(paths) if i == 0 or paths[i - 1] != p]
    assert len(runs) == len(set(runs)), "an input's rows are not contiguous"
    return runs


def invoke(args: list[str]):
    result = runner.invoke(app, args)
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert "Traceback" not in result.output + result.stderr
    return result


def read_rows(path: Path) -> list[list[str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.reader(f))[1:]


def snapshot(root: Path) -> dict:
    """Names, sizes and modification times of everything under ``root`` (links not followed)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            st = os.lstat(Path(dirpath) / name)
            out[str(Path(dirpath, name).relative_to(root))] = (st.st_size, st.st_mtime_ns)
    return out


@pytest.mark.parametrize("name", COMMANDS)
def test_hostile_corpus_one_error_row_per_bad_file_each_good_file_once(name, hostile, trained_run, tools, tmp_path):
    case = COMMANDS[name]
    expected = hostile.labelled if case.labelled else hostile.flat
    before = snapshot(hostile.flat.root.parent)
    result = invoke(argv(case, trained_run, hostile, tmp_path, tools=tools))
    assert result.exit_code == 1, result.stderr
    errors = read_rows(tmp_path / case.errors)
    paths = [row[0] for row in errors]
    assert sorted(paths) == sorted(expected.bad), "each bad file exactly one errors row"
    for path, reason in errors:
        assert expected.bad[path] in reason and "\n" not in reason and "Traceback" not in reason, (path, reason)
        assert f"{path}: {reason}" in result.stderr or path in result.stderr
    if case.rows:
        rows = first_cells(read_rows(tmp_path / case.rows), case.grouped)
        assert len(rows) == len(set(rows)), "a good file was processed twice"
        assert set(rows) == expected.good, "each good file exactly once, no row for a bad one"
        assert rows == sorted(rows) or case.labelled, "rows in input order"
    assert snapshot(hostile.flat.root.parent) == before, "nothing written or changed inside the input"


@pytest.mark.parametrize("name", COMMANDS)
def test_clean_input_exits_0_and_results_are_not_overwritten(name, clean, trained_run, tools, tmp_path):
    case = COMMANDS[name]
    args = argv(case, trained_run, clean, tmp_path, tools=tools)
    first = invoke(args)
    assert first.exit_code == 0, first.stderr
    assert read_rows(tmp_path / case.errors) == []
    if case.rows:
        expected = clean.labelled if case.labelled else clean.flat
        assert {row[0] for row in read_rows(tmp_path / case.rows)} == expected.good
    written = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    again = invoke(args)
    assert again.exit_code == 2 and "--overwrite" in again.stderr
    assert again.stderr.count("\n") == 1 and again.stderr.startswith("error: ")
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == written


@pytest.mark.parametrize("name", COMMANDS)
def test_usage_and_unusable_errors_are_one_line_with_exit_2_and_3(name, trained_run, clean, tools, tmp_path):
    case = COMMANDS[name]
    missing = Inputs(Corpus(tmp_path / "nope"), clean.labelled, tmp_path / "nope")
    result = invoke(argv(case, trained_run, missing, tmp_path / "o1", tools=tools))
    assert result.exit_code == 2 and result.stderr.startswith("error: ") and result.stderr.count("\n") == 1
    (tmp_path / "notamodel").mkdir()
    if case.unusable == "model":
        result = invoke(argv(case, tmp_path / "notamodel", clean, tmp_path / "o2", tools=tools))
    elif case.unusable != "data":
        result = invoke(
            argv(case, trained_run, clean, tmp_path / "o2", tools={**tools, case.unusable: tmp_path / "notamodel"})
        )
    else:  # a data set that cannot be used: one class only
        (tmp_path / "one" / "only").mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(tmp_path / "one" / "only" / "a.png")
        one = Inputs(clean.flat, clean.labelled, tmp_path / "one")
        result = invoke(argv(case, trained_run, one, tmp_path / "o2", tools=tools))
    assert result.exit_code == 3, result.stderr
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1


def test_empty_folder_predicts_nothing_and_exits_0(trained_run, tmp_path):
    (tmp_path / "empty").mkdir()
    result = invoke(["predict", str(trained_run), str(tmp_path / "empty"), "--out", str(tmp_path / "p.csv")])
    assert result.exit_code == 0 and "no images found" in result.stderr
    assert read_rows(tmp_path / "p.csv") == [] and read_rows(tmp_path / "p.errors.csv") == []


def test_real_cli_prints_no_traceback_on_the_hostile_corpus(hostile, trained_run, tmp_path):
    out = tmp_path / "preds.csv"
    proc = subprocess.run(
        [sys.executable, "-m", "cvtool", "predict", str(trained_run), str(hostile.flat.root), "--out", str(out), "-q"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 1
    lines = proc.stderr.splitlines()
    assert all(line.startswith("warning: ") for line in lines[:-1]), proc.stderr
    assert len(lines) == len(hostile.flat.bad) + 1 and "failed" in lines[-1]


def test_output_pointed_inside_the_input_is_never_read_as_input(trained_run, colour_data, tmp_path):
    for i, inner in enumerate(("report", "red/report")):
        data = tmp_path / f"data{i}"
        shutil.copytree(colour_data / "validation", data)
        report = data / inner
        for _ in range(2):  # the second run sees the first one's PNGs inside DATA
            result = invoke(["evaluate", str(trained_run), str(data), "--out", str(report), "--overwrite", "-q"])
            assert result.exit_code == 0, result.stderr
            assert len(read_rows(report / "predictions.csv")) == 36
