"""train -> predict -> evaluate through the CLI, on real (tiny) models and files."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image
from typer.testing import CliRunner

from cvtool.cli import app
from tests.conftest import SAMPLES, colour_image

runner = CliRunner()


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def test_help_does_not_import_tensorflow():
    code = (
        "import sys\n"
        "from cvtool.cli import main\n"
        "commands = ['--help', 'train --help', 'predict --help', 'evaluate --help', '--version']\n"
        "for argv in (['cvtool', *c.split()] for c in commands):\n"
        "    sys.argv = argv\n"
        "    try:\n"
        "        main()\n"
        "    except SystemExit as e:\n"
        "        assert e.code == 0, e.code\n"
        "print('TF_LOADED' if 'tensorflow' in sys.modules else 'TF_NOT_LOADED')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "TF_NOT_LOADED" in out.stdout


def test_train_writes_the_run_directory(trained_run):
    for name in ("model.keras", "cvtool.json", "history.csv", "history.png", "errors.csv"):
        assert (trained_run / name).exists(), name
    meta = json.loads((trained_run / "cvtool.json").read_text())
    assert meta["class_names"] == ["blue", "green", "red"]
    assert meta["image_size"] == [32, 32]
    assert meta["config"]["arch"] == "small-cnn"
    assert meta["versions"]["tensorflow"]
    history = read_csv(trained_run / "history.csv")
    assert len(history) == 4 and {"loss", "val_loss", "val_accuracy"} <= set(history[0])
    # Validation accuracy (inference-mode BatchNorm) must be well above chance on this easy task.
    assert meta["metrics"]["val_accuracy"] >= 0.8


def test_predict_rows_in_input_order_and_topk(trained_run, colour_data, tmp_path):
    out = tmp_path / "preds.csv"
    result = runner.invoke(
        app, ["predict", str(trained_run), str(colour_data / "validation"), "--out", str(out), "--top-k", "2", "-q"]
    )
    assert result.exit_code == 0, result.output
    rows = read_csv(out)
    assert list(rows[0]) == ["path", "label", "score", "label_2", "score_2"]
    paths = [r["path"] for r in rows]
    assert paths == sorted(paths) and len(paths) == 36
    correct = sum(r["label"] == r["path"].split("/")[0] for r in rows)
    assert correct / len(rows) >= 0.8
    for r in rows:
        assert float(r["score"]) >= float(r["score_2"])
    assert read_csv(tmp_path / "preds.errors.csv") == []


def test_bad_files_exit_1_with_one_error_row_each(trained_run, tmp_path):
    folder = tmp_path / "in"
    (folder / "sub").mkdir(parents=True)
    for i in range(3):
        colour_image((200, 40, 40), seed=i).save(folder / f"good{i}.png")
    colour_image((40, 60, 200), seed=9).save(folder / "sub" / "good.jpg")
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "notes.jpg").write_text("this is text, not a JPEG")
    out = tmp_path / "out" / "p.csv"
    result = runner.invoke(app, ["predict", str(trained_run), str(folder), "--out", str(out)])
    assert result.exit_code == 1, result.output
    assert [r["path"] for r in read_csv(out)] == ["good0.png", "good1.png", "good2.png", "sub/good.jpg"]
    errors = read_csv(tmp_path / "out" / "p.errors.csv")
    assert sorted(e["path"] for e in errors) == ["empty.jpg", "notes.jpg"]
    assert all(e["error"] for e in errors)


def test_copied_run_directory_still_predicts(trained_run, colour_data, tmp_path):
    moved = tmp_path / "elsewhere" / "model-bundle"
    shutil.copytree(trained_run, moved)
    out = tmp_path / "p.csv"
    result = runner.invoke(
        app, ["predict", str(moved / "model.keras"), str(colour_data / "validation" / "red"), "--out", str(out), "-q"]
    )
    assert result.exit_code == 0, result.output
    assert {r["label"] for r in read_csv(out)} <= {"red", "green", "blue"}
    assert len(read_csv(out)) == 12


def test_existing_output_is_not_overwritten(trained_run, colour_data, tmp_path):
    out = tmp_path / "p.csv"
    out.write_text("precious\n")
    result = runner.invoke(app, ["predict", str(trained_run), str(colour_data / "validation"), "--out", str(out)])
    assert result.exit_code == 2
    assert out.read_text() == "precious\n"
    result = runner.invoke(
        app, ["predict", str(trained_run), str(colour_data / "validation"), "--out", str(out), "--overwrite", "-q"]
    )
    assert result.exit_code == 0


def test_evaluate_matches_metrics_computed_from_predictions(trained_run, colour_data, tmp_path):
    preds = tmp_path / "all.csv"
    runner.invoke(
        app, ["predict", str(trained_run), str(colour_data / "validation"), "--out", str(preds), "--top-k", "3", "-q"]
    )
    rows = read_csv(preds)
    truth = [r["path"].split("/")[0] for r in rows]
    ranked = [[r["label"], r["label_2"], r["label_3"]] for r in rows]
    expected_acc = np.mean([t == rk[0] for t, rk in zip(truth, ranked)])
    expected_top2 = np.mean([t in rk[:2] for t, rk in zip(truth, ranked)])

    out = tmp_path / "eval"
    result = runner.invoke(app, ["evaluate", str(trained_run), str(colour_data), "--out", str(out), "--rank", "1,2,3"])
    assert result.exit_code == 0, result.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["samples"] == 36
    assert abs(metrics["accuracy"] - expected_acc) < 1e-9
    assert abs(metrics["top_k_accuracy"]["1"] - expected_acc) < 1e-9
    assert abs(metrics["top_k_accuracy"]["2"] - expected_top2) < 1e-9
    assert metrics["top_k_accuracy"]["3"] == 1.0
    cm = np.array([[int(v) for v in list(r.values())[1:]] for r in read_csv(out / "confusion_matrix.csv")])
    assert cm.sum() == 36 and np.trace(cm) / 36 == metrics["accuracy"]
    for name in ("confusion_matrix.png", "confusion_matrix_normalized.png", "predictions.csv", "misclassified.csv"):
        assert (out / name).exists()
    assert len(read_csv(out / "misclassified.csv")) == 36 - np.trace(cm)
    assert "accuracy" in result.output


def test_evaluate_flat_folder_with_numeric_labels_csv(trained_run, colour_data, tmp_path):
    # GTSRB-style: flat folder, labels as class ids in the model's class order.
    flat = tmp_path / "flat"
    flat.mkdir()
    names = ["blue", "green", "red"]
    with open(tmp_path / "labels.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["Filename", "ClassId"])
        for name in names:
            for src in sorted((colour_data / "validation" / name).iterdir())[:4]:
                shutil.copy(src, flat / src.name)
                w.writerow([src.name, names.index(name)])
        w.writerow(["../escape.png", 0])
        w.writerow([src.name, 7])
    out = tmp_path / "eval"
    result = runner.invoke(
        app,
        [
            "evaluate",
            str(trained_run),
            str(flat),
            "--out",
            str(out),
            "--labels",
            str(tmp_path / "labels.csv"),
            "--path-column",
            "Filename",
            "--label-column",
            "ClassId",
            "-q",
        ],
    )
    assert result.exit_code == 1, result.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["samples"] == 12
    errors = read_csv(out / "errors.csv")
    assert len(errors) == 2 and any("outside" in e["error"] for e in errors)


def test_cli_subprocess_exit_codes(trained_run, tmp_path):
    env = {**os.environ, "CVTOOL_QUIET": "1"}
    missing = subprocess.run(
        [
            sys.executable,
            "-m",
            "cvtool",
            "predict",
            str(trained_run),
            str(tmp_path / "nope"),
            "--out",
            str(tmp_path / "p.csv"),
        ],
        capture_output=True,
        text=True,
        env=env,
    )
    assert missing.returncode == 2 and "input not found" in missing.stderr and "Traceback" not in missing.stderr
    (tmp_path / "notamodel").mkdir()
    bad_model = subprocess.run(
        [
            sys.executable,
            "-m",
            "cvtool",
            "predict",
            str(tmp_path / "notamodel"),
            str(tmp_path),
            "--out",
            str(tmp_path / "p.csv"),
        ],
        capture_output=True,
        text=True,
        env=env,
    )
    assert bad_model.returncode == 3 and "not a run directory" in bad_model.stderr


def test_corrupt_bundle_metadata_is_exit_3(run_copy, colour_data, tmp_path):
    (run_copy / "cvtool.json").write_text("{not json")
    result = runner.invoke(
        app, ["predict", str(run_copy), str(colour_data / "validation"), "--out", str(tmp_path / "p.csv")]
    )
    assert result.exit_code == 3


def test_train_on_samples_skips_bad_files(tmp_path):
    data = tmp_path / "data"
    shutil.copytree(SAMPLES, data)
    (data / "train" / "hat" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    result = runner.invoke(
        app, ["train", str(data), "--out", str(tmp_path / "run"), "--epochs", "1", "--image-size", "32", "-q"]
    )
    assert result.exit_code == 1, result.output
    assert "broken.jpg" in (tmp_path / "run" / "errors.csv").read_text()
    assert (tmp_path / "run" / "model.keras").exists()


def test_train_needs_two_classes(tmp_path):
    (tmp_path / "d" / "only").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(tmp_path / "d" / "only" / "a.png")
    result = runner.invoke(app, ["train", str(tmp_path / "d"), "--out", str(tmp_path / "run")])
    assert result.exit_code == 3
    assert "at least two class" in result.output
