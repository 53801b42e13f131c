"""finetune --cache-features: the head phase on features computed once (fast feature extraction)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from cvtool.cli import app

runner = CliRunner()
BACKBONE, SIZE = "mobilenet_v3_small", 32


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def calibrated_weights(colour_data, tmp_path_factory) -> Path:
    """A backbone weights file (random convolutions) whose BatchNorm statistics come from the training images.

    With Keras' initial statistics (mean 0, variance 1) a random backbone gives nearly the same
    features for every image and both runs would sit at chance: no test of "the same accuracy".
    """
    import keras

    from cvtool.backbones import BACKBONES
    from cvtool.images import list_images, load_image
    from cvtool.layers import Preprocess

    keras.utils.set_random_seed(7)
    backbone = BACKBONES[BACKBONE]
    net = backbone.build((SIZE, SIZE), weights=None)
    bns = [layer for layer in net.layers if isinstance(layer, keras.layers.BatchNormalization)]
    for layer in bns:
        layer.momentum = 0.0  # one training-mode call leaves that batch's statistics in the moving averages
    images = np.stack([load_image(i.path, (SIZE, SIZE)) for i in list_images(colour_data / "train")])
    net(Preprocess(backbone.preprocess)(images.astype(np.float32)), training=True)
    path = tmp_path_factory.mktemp("weights") / f"{BACKBONE}.weights.h5"
    net.save_weights(path)
    return path


def run_finetune(data: Path, run: Path, weights: Path, cache: str):
    from cvtool.config import AugmentConfig, FinetuneConfig
    from cvtool.finetune import finetune

    cfg = FinetuneConfig(
        arch=BACKBONE,
        weights=str(weights),
        image_size=SIZE,
        head_epochs=2,
        epochs=0,
        batch_size=8,
        lr=0.01,
        seed=3,
        augment=AugmentConfig(hflip=False),
        cache_features=cache,
    )
    return finetune(data, run, cfg=cfg, quiet=True)


def test_cached_head_epochs_match_recomputed_ones_and_save_the_full_model(colour_data, calibrated_weights, tmp_path):
    from cvtool.bundle import load_keras_model
    from cvtool.images import list_images, load_image
    from cvtool.metrics import mean_cross_entropy

    cached = run_finetune(colour_data, tmp_path / "cached", calibrated_weights, "auto")  # auto: no augmentation
    run_finetune(colour_data, tmp_path / "recomputed", calibrated_weights, "off")

    meta = json.loads((tmp_path / "cached" / "cvtool.json").read_text())
    assert meta["phases"]["head_on_cached_features"] is True and meta["config"]["cache_features"] == "auto"
    other = json.loads((tmp_path / "recomputed" / "cvtool.json").read_text())
    assert other["phases"]["head_on_cached_features"] is False

    # The same epochs: same trainable parameters, and the same accuracy and loss trend epoch by epoch
    # (the head sees the very same features; only float summation order differs).
    rows_c, rows_r = read_csv(tmp_path / "cached" / "history.csv"), read_csv(tmp_path / "recomputed" / "history.csv")
    assert [r["phase"] for r in rows_c] == ["head"] * 2
    assert [r["trainable_params"] for r in rows_c] == [r["trainable_params"] for r in rows_r]
    for key in ("accuracy", "val_accuracy"):
        got, want = [float(r[key]) for r in rows_c], [float(r[key]) for r in rows_r]
        assert np.allclose(got, want, atol=0.06), (key, got, want)
    assert np.allclose([float(r["val_loss"]) for r in rows_c], [float(r["val_loss"]) for r in rows_r], rtol=0.05)
    assert float(rows_c[-1]["val_accuracy"]) > 0.5  # three colours: the features do tell them apart

    # model.keras is the whole classifier (images in, probabilities out) at its best epoch: on the
    # validation images it scores exactly the val_loss that the head scored on their cached features.
    saved = load_keras_model(tmp_path / "cached" / "model.keras")
    assert saved.get_layer("backbone") is not None and tuple(saved.input_shape[1:]) == (SIZE, SIZE, 3)
    items = list_images(colour_data / "validation")
    x = np.stack([load_image(i.path, (SIZE, SIZE)) for i in items]).astype(np.float32)
    truth = np.array([meta["class_names"].index(Path(i.rel).parent.name) for i in items])
    probs = saved.predict(x, verbose=0)
    assert mean_cross_entropy(probs[np.arange(len(truth)), truth]) == pytest.approx(meta["metrics"]["val_loss"], 1e-4)
    # The resume point (last epoch, with the optimizer's state) is the classifier the run holds in memory.
    resume = load_keras_model(next((tmp_path / "cached" / "checkpoints").glob("last-epoch-*.keras")), compile=True)
    assert resume.optimizer.iterations.numpy() > 0
    assert np.allclose(resume.predict(x, verbose=0), cached.model.predict(x, verbose=0), atol=1e-5)


def test_cache_features_on_is_refused_where_features_change(colour_data, tmp_path):
    base = ["finetune", str(colour_data), "--backbone", BACKBONE, "--image-size", str(SIZE), "--quiet"]
    result = runner.invoke(app, [*base, "--out", str(tmp_path / "a"), "--weights", "none", "--cache-features", "on"])
    assert result.exit_code == 2, result.output
    assert "--cache-features on" in result.output and "--hflip" in result.output
    assert len(result.output.strip().splitlines()) == 1
    args = [*base, "--out", str(tmp_path / "b"), "--no-hflip", "--weights", "none", "--cache-features", "on"]
    result = runner.invoke(app, args)
    assert result.exit_code == 2 and "--weights none" in result.output, result.output
    result = runner.invoke(app, [*base, "--out", str(tmp_path / "c"), "--cache-features", "maybe"])
    assert result.exit_code == 2 and "auto, on, off" in result.output, result.output
