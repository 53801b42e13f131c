"""cvtool finetune: local backbone weights, frozen layers, the two phases, hub feature extractors."""

from __future__ import annotations

import csv
import gc
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from cvtool.cli import app

runner = CliRunner()
BACKBONE, SIZE, UNFREEZE = "mobilenet_v3_small", 32, 12


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def n_params(weights) -> int:
    return int(sum(np.prod(w.shape) for w in weights))


@pytest.fixture(scope="module")
def backbone_weights(tmp_path_factory) -> Path:
    """A weights file of the backbone without top, as an offline machine would have (random, seeded)."""
    import keras

    from cvtool.backbones import BACKBONES

    keras.utils.set_random_seed(123)
    path = tmp_path_factory.mktemp("weights") / f"{BACKBONE}.weights.h5"
    BACKBONES[BACKBONE].build((SIZE, SIZE), weights=None).save_weights(path)
    return path


def reference_backbone(weights: Path):
    from cvtool.backbones import BACKBONES

    net = BACKBONES[BACKBONE].build((SIZE, SIZE), weights=None)
    net.load_weights(weights)
    return net


def test_finetune_loads_local_weights_keeps_frozen_layers_identical(colour_data, backbone_weights, tmp_path):
    import keras

    from cvtool.bundle import load_keras_model

    run = tmp_path / "run"
    args = ["finetune", str(colour_data), "--out", str(run), "--backbone", BACKBONE, "--weights", str(backbone_weights)]
    args += ["--image-size", str(SIZE), "--head-epochs", "1", "--epochs", "1", "--unfreeze", str(UNFREEZE)]
    args += ["--batch-size", "8", "--quiet"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output

    ref = reference_backbone(backbone_weights)
    ref_layers = [layer for layer in ref.layers if not isinstance(layer, keras.layers.InputLayer)]
    tuned = load_keras_model(run / "model.keras").get_layer("backbone")
    tuned_layers = [layer for layer in tuned.layers if not isinstance(layer, keras.layers.InputLayer)]
    top = {layer.name for layer in ref_layers[-UNFREEZE:] if not isinstance(layer, keras.layers.BatchNormalization)}
    assert top and len(tuned_layers) == len(ref_layers)

    # Frozen layers (everything below the top, and every BatchNormalization) are the file's, bit for bit,
    # though both phases trained: nothing leaks into them (BN statistics included).
    for mine, theirs in zip(tuned_layers, ref_layers):
        if mine.name not in top:
            assert all(np.array_equal(a, b) for a, b in zip(mine.get_weights(), theirs.get_weights())), mine.name
    # (Were the file not loaded, the frozen layers would hold a fresh random initialisation instead.)

    # Trainable parameters per phase: the head alone, then the head plus the top non-BN layers.
    rows = read_csv(run / "history.csv")
    assert [r["phase"] for r in rows] == ["head", "fine-tune"]
    features = ref.output.shape[-1]
    head = features * 3 + 3
    unfrozen = n_params(w for layer in ref_layers if layer.name in top for w in layer.trainable_weights)
    assert int(rows[0]["trainable_params"]) == head
    assert int(rows[1]["trainable_params"]) == head + unfrozen

    meta = json.loads((run / "cvtool.json").read_text())
    assert meta["backbone"] == BACKBONE and meta["weights"] == str(backbone_weights)
    assert meta["phases"] == {
        "head_epochs": 1,
        "fine_tune_epochs": 1,
        "unfrozen_layers": UNFREEZE,
        "head_on_cached_features": False,  # --hflip is on by default: the head phase is augmented
    }

    preds = tmp_path / "preds.csv"
    result = runner.invoke(app, ["predict", str(run), str(colour_data / "validation"), "--out", str(preds), "-q"])
    assert result.exit_code == 0, result.output
    assert len(read_csv(preds)) == 36


def test_unusable_weights_are_one_line_exit_3(colour_data, tmp_path):
    base = ["finetune", str(colour_data), "--backbone", BACKBONE, "--image-size", str(SIZE), "-q"]
    result = runner.invoke(app, [*base, "--out", str(tmp_path / "a"), "--weights", str(tmp_path / "missing.h5")])
    assert result.exit_code == 3
    assert "missing.h5" in result.output and "Traceback" not in result.output
    wrong = tmp_path / "wrong.weights.h5"
    wrong.write_bytes(b"not hdf5")
    result = runner.invoke(app, [*base, "--out", str(tmp_path / "b"), "--weights", str(wrong)])
    assert result.exit_code == 3
    assert "cannot load --weights" in result.output
    page = (tmp_path / "b" / "report.html").read_text(encoding="utf-8")  # written when the data was read
    assert 'http-equiv="refresh"' not in page, "a failed run's page must not reload forever as if running"
    assert "stopped after 0 of" in page and "cannot load --weights" in page


def make_hub_model(path: Path) -> Path:
    """A tiny TF2 SavedModel with an image feature-vector signature: [N, H, W, 3] in [0, 1] -> [N, 8]."""
    import tensorflow as tf

    class Features(tf.Module):
        def __init__(self):
            super().__init__()
            self.w = tf.Variable(tf.random.stateless_normal([3, 8], seed=[1, 2]))

        @tf.function(input_signature=[tf.TensorSpec([None, None, None, 3], tf.float32)])
        def __call__(self, images):
            return tf.nn.relu(tf.reduce_mean(images, axis=[1, 2]) @ self.w * 4.0)

    tf.saved_model.save(Features(), str(path))
    return path


def test_finetune_hub_feature_extractor_predicts_from_the_run_alone(colour_data, tmp_path):
    hub_dir = make_hub_model(tmp_path / "hub_src")
    run = tmp_path / "run"
    args = ["finetune", str(colour_data), "--out", str(run), "--backbone", f"hub:{hub_dir}", "--image-size", "32"]
    args += ["--head-epochs", "12", "--lr", "0.05", "--batch-size", "8", "--quiet"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    meta = json.loads((run / "cvtool.json").read_text())
    assert meta["feature_extractor"]["type"] == "hub" and meta["feature_extractor"]["dim"] == 8
    assert {r["phase"] for r in read_csv(run / "history.csv")} == {"head"}

    shutil.rmtree(hub_dir)  # the run directory must carry the hub model itself
    moved = tmp_path / "moved"
    shutil.move(run, moved)
    preds = tmp_path / "preds.csv"
    result = runner.invoke(app, ["predict", str(moved), str(colour_data / "validation"), "--out", str(preds), "-q"])
    assert result.exit_code == 0, result.output
    rows = read_csv(preds)
    correct = sum(r["path"].split("/")[0] == r["label"] for r in rows)
    assert correct / len(rows) >= 0.8  # colours separate cleanly on mean-colour features

    # Loaded again and used after a garbage collection: the classifier keeps the hub model, which owns
    # the variables its function reads, alive. Its scores are predict's.
    from cvtool.bundle import load_classifier
    from cvtool.images import load_image

    classifier = load_classifier(moved)
    gc.collect()
    images = np.stack([load_image(colour_data / "validation" / r["path"], (32, 32)) for r in rows[:4]])
    scores = classifier.predict(images).max(axis=1)
    np.testing.assert_allclose(scores, [float(r["score"]) for r in rows[:4]], atol=1e-5)

    # Grad-CAM has no image layers to explain in a head on feature vectors: exit 3, one line, no traceback
    cam = runner.invoke(app, ["gradcam", str(moved), str(colour_data / "validation"), "--out", str(tmp_path / "cam")])
    assert cam.exit_code == 3 and "needs a Keras image model" in cam.output
    assert cam.output.count("\n") == 1 and "Traceback" not in cam.output


def test_hub_feature_extractor_runs_after_garbage_collection(tmp_path):
    from cvtool.bundle import hub_features, load_hub_model

    extractor = load_hub_model(make_hub_model(tmp_path / "hub"))
    gc.collect()  # the loaded object owns the variables; the caller holds it, so they live
    images = np.random.default_rng(0).integers(0, 256, (3, 8, 8, 3), dtype=np.uint8)
    want = np.maximum(images.mean(axis=(1, 2)) / 255.0 @ extractor.w.numpy() * 4.0, 0.0)
    np.testing.assert_allclose(hub_features(extractor, images, batch_size=2), want, rtol=1e-4, atol=1e-5)


def test_finetune_without_pretrained_weights_trains_batchnorm_and_tells_images_apart(colour_data, tmp_path):
    from cvtool.bundle import load_keras_model
    from cvtool.images import list_images, load_image

    run = tmp_path / "run"
    args = ["finetune", str(colour_data), "--out", str(run), "--backbone", BACKBONE, "--weights", "none"]
    args += ["--image-size", str(SIZE), "--head-epochs", "1", "--epochs", "1", "--unfreeze", str(UNFREEZE)]
    args += ["--batch-size", "8", "--quiet"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    model = load_keras_model(run / "model.keras")
    images = np.stack([load_image(item.path, (SIZE, SIZE)) for item in list_images(colour_data / "validation")])
    probs = np.asarray(model.predict(images.astype(np.float32), verbose=0))
    # A random backbone normalised by its initial statistics answers one constant for every image
    # (0.333 each, spread ~1e-7); with BatchNorm statistics learnt from the images, they differ.
    assert probs.std(axis=0).max() > 1e-3, probs.std(axis=0)
    assert len({tuple(np.round(p, 4)) for p in probs}) > 1
