"""What cvtool leaves on disk: file modes under the umask, model sizes, checkpoints that are usable as MODEL."""

from __future__ import annotations

import csv
import json
import os
import stat
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from cvtool.cli import app

runner = CliRunner()
BYTES_PER_WEIGHT = 4  # float32
STEPS_PER_EPOCH = 5  # 36 training images in batches of 8


@contextmanager
def umask(mask: int):
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def invoke(*args) -> None:
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def files_under(*roots: Path) -> list[Path]:
    return [p for root in roots for p in ([root] if root.is_file() else root.rglob("*")) if p.is_file()]


def n_weights(path: Path) -> int:
    from cvtool.bundle import load_keras_model

    return int(sum(np.prod(w.shape) for w in load_keras_model(path).weights))


@pytest.fixture(scope="module")
def trained(colour_data, tmp_path_factory):
    """A 2-epoch small-cnn run with every-epoch checkpoints, trained under umask 022; (run dir, final model)."""
    from cvtool.config import TrainConfig
    from cvtool.train import train

    run = tmp_path_factory.mktemp("run_files") / "run"
    cfg = TrainConfig(epochs=2, image_size=32, batch_size=8, seed=3, checkpoint="every-epoch")
    with umask(0o022):
        result = train(colour_data, run, cfg=cfg, quiet=True)
    return run, result.model


@pytest.mark.parametrize("mask", [0o022, 0o027, 0o077], ids=oct)
def test_written_files_get_the_mode_open_would_give(tmp_path, mask):
    from cvtool.outputs import CsvWriter, save_image, write_json

    with umask(mask):
        with open(tmp_path / "reference", "w"):
            pass
        written = [
            write_json(tmp_path / "a.json", {"x": 1}),
            save_image(Image.new("RGB", (2, 2)), tmp_path / "b.png"),
        ]
        with CsvWriter(tmp_path / "c.csv", ["path"]) as writer:
            writer.write(["x"])
        written.append(tmp_path / "c.csv")
    want = stat.S_IMODE((tmp_path / "reference").stat().st_mode)
    assert want == 0o666 & ~mask
    assert {p.name: stat.S_IMODE(p.stat().st_mode) for p in written} == {p.name: want for p in written}


def test_every_file_the_commands_write_is_readable_by_others_under_umask_022(trained, colour_data, tools, tmp_path):
    run, _ = trained
    out = tmp_path / "out"
    data = colour_data / "validation"
    with umask(0o022):
        invoke("predict", run, data, "--out", out / "preds.csv", "-q")
        invoke("evaluate", run, data, "--out", out / "evaluation", "-q")
        invoke("gradcam", run, data / "red", "--out", out / "cam", "-q")
        invoke("segment", data / "red", "--out", out / "seg", "--model", tools["segmodel"], "-q")
    written = files_under(run, out)
    names = {p.name for p in written}
    assert {"model.keras", "cvtool.json", "history.csv", "history.png", "last.json", "metrics.json"} <= names
    assert {"preds.csv", "preds.job.json", "pixels.csv"} <= names
    assert any(n.endswith(".mask.png") for n in names) and files_under(out / "cam")
    modes = {str(p): stat.S_IMODE(p.stat().st_mode) for p in written}
    assert {p: oct(m) for p, m in modes.items() if m & 0o044 != 0o044 or m & 0o022} == {}  # rw-r--r--


def test_model_keras_is_the_deployable_model_without_optimizer_state(trained):
    from cvtool.runtime import keras

    run, _ = trained
    model_file = run / "model.keras"
    weights = n_weights(model_file)
    assert model_file.stat().st_size <= 1.5 * BYTES_PER_WEIGHT * weights
    loaded = keras.models.load_model(model_file)  # Keras' own loader, compile=True: nothing to compile
    assert not loaded.compiled and getattr(loaded, "optimizer", None) is None
    for checkpoint in (run / "checkpoints").glob("epoch-*.keras"):  # every-epoch files: deployable too
        assert checkpoint.stat().st_size <= 1.5 * BYTES_PER_WEIGHT * weights, checkpoint.name


def test_resume_point_keeps_the_exact_optimizer_state(trained):
    from cvtool.bundle import load_keras_model

    run, model = trained
    state = json.loads((run / "checkpoints" / "last.json").read_text())
    resumed = load_keras_model(run / "checkpoints" / state["model"], compile=True)
    assert int(resumed.optimizer.iterations) == 2 * STEPS_PER_EPOCH
    mine = {v.path: v.numpy() for v in model.optimizer.variables}
    theirs = {v.path: v.numpy() for v in resumed.optimizer.variables}
    assert mine.keys() == theirs.keys() and len(mine) > 2  # Adam's moments, not only the counters
    assert all(np.array_equal(mine[k], theirs[k]) for k in mine)


def test_best_checkpoint_is_model_keras_itself_not_a_second_copy(trained):
    run, _ = trained
    best = json.loads((run / "cvtool.json").read_text())["metrics"]["best_epoch"]
    (best_file,) = (run / "checkpoints").glob(f"epoch-{best:03d}-*.keras")
    assert best_file.samefile(run / "model.keras")
    others = [p for p in (run / "checkpoints").glob("epoch-*.keras") if p != best_file]
    assert len(others) == 1 and not others[0].samefile(run / "model.keras")


def test_checkpoint_file_as_model_predicts_class_names_and_evaluates(trained, colour_data, tmp_path):
    run, _ = trained
    data = colour_data / "validation"
    for checkpoint in sorted((run / "checkpoints").glob("*.keras")):  # epoch files and the resume point
        preds = tmp_path / f"{checkpoint.stem}.csv"
        invoke("predict", checkpoint, data, "--out", preds, "-q")
        assert {r["label"] for r in read_csv(preds)} <= {"blue", "green", "red"}
        report = tmp_path / checkpoint.stem
        invoke("evaluate", checkpoint, data, "--out", report, "-q")
        assert json.loads((report / "metrics.json").read_text())["samples"] == 36
