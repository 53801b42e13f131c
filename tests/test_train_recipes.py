"""cvtool train's recipes: label smoothing, checkpoints, early stopping, resume, custom loop, augmentation."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from typer.testing import CliRunner

from cvtool.cli import app
from tests.conftest import REPO

runner = CliRunner()


def read_history(run: Path) -> list[dict]:
    with open(run / "history.csv", newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def checkpoint_epochs(run: Path) -> list[int]:
    return sorted(int(p.name.split("-")[1]) for p in (run / "checkpoints").glob("epoch-*.keras"))


def test_label_smoothing_changes_the_loss_as_expected():
    from cvtool.trainer import make_loss

    y = np.array([[1.0, 0.0, 0.0]], np.float32)
    p = np.array([[0.7, 0.2, 0.1]], np.float32)
    plain = float(make_loss(0.0)(y, p))
    smooth = float(make_loss(0.1)(y, p))
    target = y * 0.9 + 0.1 / 3
    assert np.isclose(plain, -np.log(0.7), atol=1e-5)
    assert np.isclose(smooth, -(target * np.log(p)).sum(), atol=1e-5)
    assert smooth > plain  # a confident right answer is penalised for its confidence


def test_custom_loop_learns_with_label_smoothing_and_writes_logs(colour_data, tmp_path):
    run = tmp_path / "run"
    args = ["train", str(colour_data), "--out", str(run), "--loop", "custom", "--label-smoothing", "0.1"]
    args += ["--epochs", "2", "--image-size", "32", "--batch-size", "8", "--seed", "3", "--quiet"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    rows = read_history(run)
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    assert max(float(r["val_accuracy"]) for r in rows) >= 0.8  # chance is 1/3
    meta = json.loads((run / "cvtool.json").read_text())
    assert meta["config"]["label_smoothing"] == 0.1
    assert meta["config"]["loop"] == "custom"
    assert meta["training"]["epochs_run"] == 2
    for split in ("train", "validation"):
        assert list((run / "logs" / split).glob("events.out.tfevents.*")), split
    assert (run / "history.png").stat().st_size > 0
    assert len(checkpoint_epochs(run)) == 1  # --checkpoint best keeps the best epoch only


def test_early_stopping_stops_and_restores_the_best(colour_data, tmp_path):
    import keras

    from cvtool.config import TrainConfig
    from cvtool.train import train

    run = tmp_path / "run"
    # A min-delta nothing can beat: epoch 1 is the best, patience 1 stops after epoch 2.
    cfg = TrainConfig(
        epochs=6, image_size=32, batch_size=8, seed=5, patience=1, min_delta=100.0, checkpoint="every-epoch"
    )
    result = train(colour_data, run, cfg=cfg, quiet=True)
    assert [int(r["epoch"]) for r in read_history(run)] == [1, 2]
    meta = json.loads((run / "cvtool.json").read_text())
    assert meta["training"]["stopped_early_at"] == 2
    assert meta["metrics"]["best_epoch"] == 1
    first, second = (keras.models.load_model(p) for p in sorted((run / "checkpoints").glob("epoch-*.keras")))
    restored = result.model.get_weights()
    assert all(np.array_equal(a, b) for a, b in zip(restored, first.get_weights()))
    assert not all(np.array_equal(a, b) for a, b in zip(restored, second.get_weights()))
    saved = keras.models.load_model(run / "model.keras").get_weights()
    assert all(np.array_equal(a, b) for a, b in zip(saved, first.get_weights()))


def test_every_epoch_checkpoints_and_resume_after_kill_9(colour_data, tmp_path):
    from cvtool.config import TrainConfig
    from cvtool.train import train

    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "cvtool", "train", str(colour_data), "--out", str(run), "--epochs", "200"]
    cmd += ["--image-size", "32", "--batch-size", "8", "--seed", "7", "--checkpoint", "every-epoch", "--quiet"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    last = run / "checkpoints" / "last.json"
    deadline = time.monotonic() + 240
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if last.exists() and json.loads(last.read_text())["epoch"] >= 2:
                break
            time.sleep(0.2)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()
    reached = json.loads(last.read_text())["epoch"]
    assert reached >= 2
    before = read_history(run)[:reached]
    assert checkpoint_epochs(run)[:reached] == list(range(1, reached + 1))

    result = train(colour_data, run, cfg=TrainConfig(epochs=reached + 1), quiet=True, resume=True)
    rows = read_history(run)
    assert [int(r["epoch"]) for r in rows] == list(range(1, reached + 2))
    assert rows[:reached] == before  # earlier epochs kept as they were
    assert checkpoint_epochs(run) == list(range(1, reached + 2))  # one file per epoch
    steps_per_epoch = 5  # 36 images, batches of 8 (the stored config, not TrainConfig's defaults)
    assert int(result.model.optimizer.iterations) == steps_per_epoch * (reached + 1)  # optimizer state went on
    meta = json.loads((run / "cvtool.json").read_text())
    assert meta["config"]["batch_size"] == 8 and meta["config"]["epochs"] == reached + 1
    assert json.loads(last.read_text())["epoch"] == reached + 1
    assert len(list((run / "checkpoints").glob("last-epoch-*.keras"))) == 1


def test_resume_needs_an_interrupted_run(colour_data, tmp_path):
    result = runner.invoke(app, ["train", str(colour_data), "--out", str(tmp_path / "new"), "--resume"])
    assert result.exit_code == 2
    assert "nothing to resume" in result.output


def test_vertical_flip_shear_and_crop_switches():
    from cvtool.augment import build_augmenter
    from cvtool.config import AugmentConfig

    rng = np.random.default_rng(0)
    x = rng.uniform(0, 255, (32, 16, 16, 3)).astype(np.float32)

    vflip = np.asarray(build_augmenter(AugmentConfig(hflip=False, vflip=True), (16, 16), seed=1)(x, training=True))
    flipped = [np.allclose(v, xi[::-1]) for v, xi in zip(vflip, x)]
    kept = [np.allclose(v, xi) for v, xi in zip(vflip, x)]
    assert all(f or k for f, k in zip(flipped, kept))  # vertical flips only, never horizontal
    assert 0 < sum(flipped) < len(x)

    for cfg in (AugmentConfig(hflip=False, shear=0.3), AugmentConfig(hflip=False, crop=0.25)):
        out = np.asarray(build_augmenter(cfg, (16, 16), seed=1)(x, training=True))
        assert out.shape == x.shape
        assert sum(not np.allclose(o, xi) for o, xi in zip(out, x)) > len(x) // 2
        assert out.min() >= -1e-3 and out.max() <= 255.001


def test_balanced_class_weights_reach_the_batches():
    from cvtool.data import DecodedSet, training_dataset
    from cvtool.trainer import balanced_class_weights

    labels = np.array([0] * 6 + [1] * 2, np.int32)
    weights = balanced_class_weights(labels, 2)
    assert np.allclose(weights, [8 / 12, 8 / 4])
    images = np.zeros((8, 4, 4, 3), np.uint8)
    ds = training_dataset(DecodedSet(images, labels, [], []), 8, True, 0, None, 2, weights)
    x, y, w = next(iter(ds))
    assert np.allclose(np.asarray(w), weights[np.argmax(np.asarray(y), axis=1)])


def test_resume_of_a_finished_run_is_nothing_to_do_with_exit_0(run_copy, colour_data):
    """A retried cron/Kubernetes train job (--resume on a finished run) exited 2; it has nothing to do: exit 0."""
    from typer.testing import CliRunner

    from cvtool.cli import app

    model = (run_copy / "model.keras").read_bytes()
    result = CliRunner().invoke(app, ["train", str(colour_data), "--out", str(run_copy), "--resume"])
    assert result.exit_code == 0, result.output
    assert "nothing to do" in result.stderr
    assert (run_copy / "model.keras").read_bytes() == model
