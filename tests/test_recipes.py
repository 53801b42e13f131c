"""Issue 18's recipes: tune (Keras Tuner), RandAugment/MixUp/CutMix, learning-rate schedules, diverse members."""

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


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def test_tune_runs_trials_as_cvtool_runs_and_a_killed_search_resumes_without_redoing_them(colour_data, tmp_path):
    from cvtool.config import TrainConfig
    from cvtool.tune import tune

    out = tmp_path / "search"
    cmd = [sys.executable, "-m", "cvtool", "tune", str(colour_data), "--out", str(out), "--max-trials", "3"]
    cmd += ["--epochs", "1", "--image-sizes", "16,24", "--seed", "5", "--quiet"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    trials_csv = out / "trials.csv"
    deadline = time.monotonic() + 900  # a busy machine: the first trial includes importing TensorFlow
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if trials_csv.exists() and len(read_csv(trials_csv)) >= 1:
                break
            time.sleep(0.1)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()
    finished = {r["trial"]: r for r in read_csv(trials_csv)}
    assert 1 <= len(finished) < 3
    stamps = {t: (out / "trials" / t / "history.csv").stat().st_mtime_ns for t in finished}

    refused = runner.invoke(app, ["tune", str(colour_data), "--out", str(out), "--max-trials", "3"])
    assert refused.exit_code == 2 and "--resume" in refused.output  # never silently mixed or replaced

    base = TrainConfig(seed=5)
    result = tune(colour_data, out, max_trials=3, epochs=1, image_sizes=(16, 24), base=base, resume=True, quiet=True)
    rows = read_csv(trials_csv)
    assert len(rows) == 3 and result.trials == 3
    for t, stamp in stamps.items():  # finished trials were not run again
        assert (out / "trials" / t / "history.csv").stat().st_mtime_ns == stamp
        assert {k: v for k, v in rows[int(t)].items() if k != "seconds"} == {
            k: v for k, v in finished[t].items() if k != "seconds"
        }
    for row in rows:  # each trial's own hyper-parameters, run by cvtool's trainer (its cvtool.json says so)
        meta = json.loads((out / "trials" / row["trial"] / "cvtool.json").read_text())
        assert meta["config"]["lr"] == float(row["lr"]) or np.isclose(meta["config"]["lr"], float(row["lr"]))
        assert meta["config"]["image_size"] == int(row["image_size"]) and meta["config"]["epochs"] == 1
        assert float(row["objective"]) == meta["metrics"]["val_accuracy"] == float(row["val_accuracy"])
        assert int(row["best_epoch"]) == 1 and float(row["seconds"]) > 0
    best = json.loads((out / "best.json").read_text())
    assert best["value"] == max(float(r["objective"]) for r in rows)
    assert json.loads((out / "best" / "cvtool.json").read_text())["config"]["lr"] == best["hyperparameters"]["lr"]

    preds = tmp_path / "preds.csv"
    answer = runner.invoke(app, ["predict", str(out / "best"), str(colour_data / "validation"), "--out", str(preds)])
    assert answer.exit_code == 0, answer.output
    assert len(read_csv(preds)) == 36


def test_tune_without_keras_tuner_names_the_extra(colour_data, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "keras_tuner", None)  # import keras_tuner raises ImportError
    result = runner.invoke(app, ["tune", str(colour_data), "--out", str(tmp_path / "s"), "--image-sizes", "16"])
    assert result.exit_code == 2
    assert 'pip install "cvtool[tune]"' in result.output


def test_hyperband_with_one_epoch_is_refused_rather_than_training_two(colour_data, tmp_path):
    args = ["tune", str(colour_data), "--out", str(tmp_path / "h"), "--tuner", "hyperband", "--epochs", "1"]
    result = runner.invoke(app, args)
    assert result.exit_code == 2 and "--epochs 2 or more" in result.output
    assert not (tmp_path / "h").exists()


def test_mixup_and_cutmix_give_soft_labels_and_randaugment_changes_pixels():
    from cvtool.augment import build_augmenter, build_mixer
    from cvtool.config import AugmentConfig
    from cvtool.data import DecodedSet, training_dataset

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (16, 24, 24, 3), dtype=np.uint8)
    labels = np.arange(16, dtype=np.int32) % 4
    decoded = DecodedSet(images, labels, [], [])
    cfg = AugmentConfig(hflip=False, randaugment=0.5, mixup=0.4, cutmix=1.0)
    augment, mix = build_augmenter(cfg, (24, 24), seed=1), build_mixer(cfg, seed=1)
    x, y = next(iter(training_dataset(decoded, 16, False, 1, augment, 4, None, mix)))
    y = y.numpy()
    assert np.allclose(y.sum(axis=1), 1.0, atol=1e-5)
    assert ((y > 1e-3) & (y < 1 - 1e-3)).any()  # some targets are mixtures of two classes
    assert not np.allclose(x.numpy(), images.astype(np.float32))
    assert build_mixer(AugmentConfig(), seed=1) is None  # off by default: hard labels


def test_randaugment_mixup_cutmix_train_and_are_recorded(colour_data, tmp_path):
    run = tmp_path / "run"
    args = ["train", str(colour_data), "--out", str(run), "--epochs", "2", "--image-size", "24", "-b", "8"]
    args += ["--randaugment", "0.5", "--mixup", "0.2", "--cutmix", "1.0", "--loop", "custom", "--quiet"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    augment = json.loads((run / "cvtool.json").read_text())["config"]["augment"]
    assert (augment["randaugment"], augment["mixup"], augment["cutmix"]) == (0.5, 0.2, 1.0)
    rows = read_csv(run / "history.csv")
    assert len(rows) == 2 and all(np.isfinite(float(r["loss"])) for r in rows)
    bad = runner.invoke(app, ["train", str(colour_data), "--out", str(tmp_path / "b"), "--mixup", "2"])
    assert bad.exit_code == 2 and "--mixup must be in [0, 1]" in bad.output


def test_scheduled_lr_shapes():
    from cvtool.callbacks import scheduled_lr

    assert scheduled_lr(1e-3, "constant", 0.9) == 1e-3
    assert np.isclose(scheduled_lr(1e-3, "cosine", 0.5), 5e-4)
    assert scheduled_lr(1e-3, "cosine", 0.0) == 1e-3 and scheduled_lr(1e-3, "cosine", 1.0) < 1e-12
    assert [scheduled_lr(1.0, "step", p) for p in (0.1, 0.5, 0.8)] == [1.0, 0.1, 0.01]
    assert scheduled_lr(1.0, "constant", 0.0, warmup=2, elapsed=1) < 0.6  # half-way through warm-up


def test_lr_schedule_is_recorded_and_applied_epoch_by_epoch(colour_data, tmp_path):
    from cvtool.config import TrainConfig
    from cvtool.train import train

    run = tmp_path / "run"
    result = train(colour_data, run, cfg=TrainConfig(epochs=3, image_size=16, batch_size=8, lr_schedule="cosine"))
    lrs = [float(r["lr"]) for r in read_csv(run / "history.csv")]
    assert lrs[0] == 1e-3 and lrs[0] > lrs[1] > lrs[2] > 0  # the rate each epoch started with, decaying
    assert np.isclose(lrs[1], 1e-3 * 0.5 * (1 + np.cos(np.pi / 3)))
    assert float(result.model.optimizer.learning_rate) < lrs[2]  # still decaying within the last epoch
    assert json.loads((run / "cvtool.json").read_text())["config"]["lr_schedule"] == "cosine"


def test_members_differ_in_data_and_augmentation_as_recorded(colour_data, tmp_path):
    from cvtool.config import TrainConfig
    from cvtool.train import train_members

    out = tmp_path / "ens"
    cfg = TrainConfig(epochs=1, image_size=16, batch_size=8)
    train_members(colour_data, out, cfg=cfg, members=3, diversity="all", quiet=True)
    metas = [json.loads((out / f"member-{i}" / "cvtool.json").read_text()) for i in (1, 2, 3)]
    assert [m["config"]["seed"] for m in metas] == [42, 43, 44]
    assert all(m["config"]["bootstrap"] for m in metas)
    distinct = [m["data"]["distinct_train"] for m in metas]
    assert all(d < m["data"]["train"] for d, m in zip(distinct, metas))  # with replacement: repeats
    augments = [m["config"]["augment"] for m in metas]
    assert augments[0]["zoom"] == 0 and augments[1]["zoom"] == 0.1 and augments[2]["randaugment"] == 0.3
    assert json.loads((out / "cvtool.json").read_text())["diversity"] == "all"

    seed_only = tmp_path / "seed"
    train_members(colour_data, seed_only, cfg=cfg, members=2, quiet=True)  # default: seed only
    meta = json.loads((seed_only / "member-2" / "cvtool.json").read_text())
    assert not meta["config"]["bootstrap"] and meta["data"]["distinct_train"] == meta["data"]["train"]


def test_scale_members_see_their_own_input_size_and_score_together(colour_data, tmp_path):
    from cvtool.config import TrainConfig
    from cvtool.members import member_config
    from cvtool.train import train_members

    assert [member_config(TrainConfig(), i, "scale").image_size for i in range(6)] == [64, 48, 80, 56, 72, 64]
    sized = TrainConfig(arch="mobilenet_v2")  # a backbone's own side is the base
    assert [member_config(sized, i, "scale").image_size for i in range(3)] == [224, 168, 280]
    small = TrainConfig(arch="mobilenet_v2", image_size=32)  # never below what the network takes
    assert [member_config(small, i, "scale").image_size for i in range(3)] == [32, 32, 40]

    out = tmp_path / "ens"
    train_members(
        colour_data, out, cfg=TrainConfig(epochs=1, image_size=16, batch_size=8), members=3, diversity="scale"
    )
    metas = [json.loads((out / f"member-{i}" / "cvtool.json").read_text()) for i in (1, 2, 3)]
    assert [m["config"]["image_size"] for m in metas] == [16, 12, 20]
    assert [m["image_size"] for m in metas] == [[16, 16], [12, 12], [20, 20]]
    result = runner.invoke(app, ["evaluate", str(out), str(colour_data / "validation"), "--out", str(tmp_path / "e")])
    assert result.exit_code == 0, result.output
    assert len(read_csv(tmp_path / "e" / "predictions.csv")) == 36


def test_members_refuse_an_invalid_option_before_a_mode_can_change_it(colour_data, tmp_path):
    """--image-size 7 is below small-cnn's 8: refused up front, not raised to 8 by the scale mode."""
    out = tmp_path / "ens"
    args = ["train", str(colour_data), "--out", str(out), "--members", "2", "--diversity", "scale"]
    result = runner.invoke(app, [*args, "--image-size", "7", "--epochs", "1"])
    assert result.exit_code == 2 and "--image-size 7 is too small" in result.output
    assert not out.exists()
