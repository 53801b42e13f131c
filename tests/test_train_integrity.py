"""train/finetune integrity: recorded figures are the saved model's, a run is never lost, DATA is read as meant."""

from __future__ import annotations

import csv
import json
import shutil
import unicodedata
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from cvtool.cli import app
from tests.conftest import COLOURS, colour_image, make_colour_dataset

runner = CliRunner()
TINY = ["--image-size", "32", "--batch-size", "8", "--quiet"]


def cli(*args):
    return runner.invoke(app, [str(a) for a in args])


def read_history(run: Path) -> list[dict]:
    with open(run / "history.csv", newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def files_of(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def classes_folder(root: Path, names, per_class: int = 3) -> Path:
    """DATA/<class>/*.png with one colour per class."""
    colours = list(COLOURS.values())
    for c, name in enumerate(names):
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            colour_image(colours[c % len(colours)], seed=100 * c + i).save(folder / f"img_{i}.png")
    return root


# Issue 12 item 2 ---------------------------------------------------------------------------------


@pytest.mark.parametrize("loop", ["fit", "custom"])
def test_recorded_val_loss_and_accuracy_are_the_saved_models_on_the_validation_images(colour_data, tmp_path, loop):
    from cvtool.config import TrainConfig
    from cvtool.train import train

    run = tmp_path / "run"
    # Label smoothing and class weights change the training loss only: val_loss is the saved model's
    # plain cross-entropy on the validation images, which is what evaluate measures.
    cfg = TrainConfig(
        epochs=4, image_size=32, batch_size=8, seed=2, loop=loop, label_smoothing=0.1, class_weight="balanced"
    )
    train(colour_data, run, cfg=cfg, quiet=True)
    recorded = json.loads((run / "cvtool.json").read_text())["metrics"]
    result = cli("evaluate", run, colour_data, "--split", "validation", "--out", tmp_path / "eval", "-q")
    assert result.exit_code == 0, result.output
    measured = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert measured["samples"] == 36
    assert abs(recorded["val_loss"] - measured["loss"]) < 1e-3, (recorded, measured["loss"])
    assert abs(recorded["val_accuracy"] - measured["accuracy"]) < 1e-6
    best = read_history(run)[recorded["best_epoch"] - 1]  # history.csv and the checkpoint choice agree
    assert abs(float(best["val_loss"]) - measured["loss"]) < 1e-3


def test_recorded_val_loss_counts_confidently_wrong_images_as_evaluate_does(tmp_path):
    from cvtool.config import TrainConfig
    from cvtool.train import train

    # Validation images whose folder names the wrong colour: the model is confidently wrong on them
    # (probabilities far below 1e-7), where a loss taken from the logits and evaluate's loss part ways.
    data = make_colour_dataset(tmp_path / "data", per_class=8, splits=("train",))
    names = list(COLOURS)
    for c, name in enumerate(names):
        folder = data / "validation" / names[(c + 1) % len(names)]
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(4):
            colour_image(COLOURS[name], seed=5000 + 10 * c + i).save(folder / f"{name}_{i}.png")
    run = tmp_path / "run"
    train(data, run, cfg=TrainConfig(epochs=4, image_size=32, batch_size=8, seed=3, lr=3e-3), quiet=True)
    recorded = json.loads((run / "cvtool.json").read_text())["metrics"]
    result = cli("evaluate", run, data, "--split", "validation", "--out", tmp_path / "eval", "-q")
    assert result.exit_code == 0, result.output
    measured = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert measured["accuracy"] < 0.5 and measured["loss"] > 5  # confidently wrong, as meant
    assert abs(recorded["val_loss"] - measured["loss"]) < 1e-3, (recorded, measured["loss"])
    assert abs(recorded["val_accuracy"] - measured["accuracy"]) < 1e-6


# Issue 19 item 11 --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "option,value,allowed",
    [
        ("--zoom", "5", "[0, 1)"),
        ("--contrast", "-2", "[0, 1]"),
        ("--brightness", "3", "[0, 1]"),
        ("--shift", "3", "[0, 1]"),
        ("--crop", "1.0", "[0, 0.5]"),
        ("--shear", "1.5", "[0, 1]"),
        ("--rotation", "-0.1", "[0, 0.5]"),
        ("--zoom", "nan", "[0, 1)"),
    ],
)
def test_out_of_range_augmentation_is_a_one_line_usage_error_before_decoding(option, value, allowed, tmp_path):
    data = classes_folder(tmp_path / "data", ["a", "b"])
    run = tmp_path / "run"
    result = cli("train", data, "--out", run, option, value, *TINY)
    assert result.exit_code == 2, result.output
    assert result.output.count("\n") == 1 and option in result.output and allowed in result.output
    assert not run.exists()  # refused before anything was decoded or written


def test_finetune_validates_augmentation_too(tmp_path):
    data = classes_folder(tmp_path / "data", ["a", "b"])
    result = cli("finetune", data, "--out", tmp_path / "run", "--weights", "none", "--zoom", "5", *TINY)
    assert result.exit_code == 2 and "--zoom" in result.output


def test_every_augmentation_at_its_largest_allowed_value_runs():
    from cvtool.augment import AUGMENT_RANGES, build_augmenter, validate_augment
    from cvtool.config import AugmentConfig

    largest = {name: (hi - 1e-6 if not closed else hi) for name, (_, hi, closed) in AUGMENT_RANGES.items()}
    cfg = AugmentConfig(hflip=False, **largest)
    validate_augment(cfg)
    x = np.random.default_rng(0).uniform(0, 255, (4, 16, 16, 3)).astype(np.float32)
    out = np.asarray(build_augmenter(cfg, (16, 16), seed=1)(x, training=True))
    assert out.shape == x.shape and np.isfinite(out).all()


# Issue 19 item 15: the backbone's minimum input size ---------------------------------------------


def test_image_size_below_the_networks_minimum_is_a_usage_error_up_front(tmp_path):
    data = classes_folder(tmp_path / "data", ["a", "b"])
    args = ["--out", tmp_path / "run", "--image-size", "16", "-q"]
    result = cli("finetune", data, "--backbone", "mobilenet_v3_small", "--weights", "none", *args)
    assert result.exit_code == 2, result.output
    assert "--image-size 16" in result.output and "at least 32" in result.output
    result = cli("train", data, "--arch", "mobilenet_v2", *args)
    assert result.exit_code == 2 and "at least 32" in result.output
    assert not (tmp_path / "run").exists()


# Issue 19 item 15: messages and class names ------------------------------------------------------


def test_a_validation_class_missing_from_train_is_reported_without_mentioning_a_model(tmp_path):
    from cvtool.data import discover
    from cvtool.errors import UnusableError

    data = make_colour_dataset(tmp_path / "data", per_class=2)
    (data / "validation" / "purple").mkdir()
    colour_image((128, 0, 128)).save(data / "validation" / "purple" / "p.png")
    with pytest.raises(UnusableError) as err:
        discover(data)
    message = str(err.value)
    assert "model" not in message and "purple" in message and "train" in message


def test_class_folders_in_nfd_and_nfc_are_one_class_named_in_nfc(tmp_path):
    from cvtool.data import discover, read_class_folders

    name = "café"
    nfd, nfc = unicodedata.normalize("NFD", name), unicodedata.normalize("NFC", name)
    assert nfd != nfc
    data = tmp_path / "data"
    classes_folder(data / "train", [nfd, "tea"])  # made on macOS
    classes_folder(data / "validation", [nfc, "tea"], per_class=2)  # made on Linux
    splits = discover(data)
    assert splits.class_names == [nfc, "tea"]
    assert sorted(splits.validation.labels) == [0, 0, 1, 1]
    assert all(item.path.exists() for item in splits.train.items)
    # A model's NFC class name matches an NFD folder (evaluate on macOS-made folders).
    names, labelled = read_class_folders(data / "train", [nfc, "tea"])
    assert labelled.labels.count(0) == 3


def test_a_class_whose_files_are_all_unreadable_is_dropped_with_a_warning(tmp_path, capsys):
    from cvtool.config import TrainConfig
    from cvtool.trainer import load_data

    data = classes_folder(tmp_path / "data", ["a", "b", "c"], per_class=5)
    for path in (data / "b").iterdir():
        path.write_bytes(b"not an image")
    run = tmp_path / "run"
    run.mkdir()
    tdata = load_data(data, TrainConfig(val_split=0.2), run_dir=run, side=16, quiet=True)
    assert tdata.splits.class_names == ["a", "c"]
    assert tdata.num_classes == 2
    assert sorted(set(tdata.train_set.labels.tolist())) == [0, 1]
    assert sorted(set(tdata.val_set.labels.tolist())) == [0, 1]
    assert len(tdata.failures) == 5
    err = capsys.readouterr().err
    assert "class b" in err and "dropped" in err


# Issue 19 item 14 --------------------------------------------------------------------------------


def test_a_class_named_train_is_a_class_not_a_split(tmp_path):
    from cvtool.data import discover
    from cvtool.evaluate import labelled_from_folder

    data = classes_folder(tmp_path / "cifar", ["apple", "test", "train", "zebra"])  # CIFAR-100 has "train"
    splits = discover(data, val_split=0.0)
    assert splits.layout == "classes" and splits.class_names == ["apple", "test", "train", "zebra"]
    assert len(splits.train) == 12
    labelled, source = labelled_from_folder(data, ["apple", "test", "train", "zebra"], "auto")
    assert len(labelled) == 12 and source == str(data)


def test_split_folders_beside_other_folders_need_an_explicit_layout(tmp_path):
    from cvtool.data import discover
    from cvtool.errors import UsageError

    data = make_colour_dataset(tmp_path / "data", per_class=2)
    classes_folder(data / "old-runs", ["x", "y"])  # class-like sub-folders: neither layout is certain
    with pytest.raises(UsageError) as err:
        discover(data)
    assert "--layout" in str(err.value)
    splits = discover(data, layout="splits")
    assert splits.layout == "splits" and splits.class_names == ["blue", "green", "red"]
    assert len(splits.train) == 6 and len(splits.validation) == 6
    splits = discover(data, layout="classes", val_split=0.0)
    assert splits.class_names == ["old-runs", "train", "validation"]


def test_layout_option_on_the_command_line(tmp_path):
    data = make_colour_dataset(tmp_path / "data", per_class=2)
    result = cli("train", data, "--out", tmp_path / "run", "--layout", "folders", *TINY)
    assert result.exit_code == 2 and "--layout" in result.output
    for command in ("train", "finetune", "evaluate"):
        assert "--layout" in cli(command, "--help").output


# Issue 19 items 4 and 5 --------------------------------------------------------------------------


def test_a_failed_overwrite_leaves_the_old_run_intact(run_copy, tmp_path):
    bad = classes_folder(tmp_path / "bad", ["a", "b"])
    for path in bad.rglob("*.png"):
        path.write_bytes(b"not an image")  # fails after decoding, when the old run used to be gone already
    before = files_of(run_copy)
    result = cli("train", bad, "--out", run_copy, "--overwrite", "--epochs", "1", *TINY)
    assert result.exit_code == 3, result.output
    assert files_of(run_copy) == before
    assert sorted(p.name for p in run_copy.parent.iterdir()) == sorted(["run", "bad"])  # nothing staged is left


def test_a_run_inside_data_is_not_a_class_and_overwrite_replaces_it(run_copy, tmp_path):
    data = tmp_path / "data"
    classes_folder(data, ["blue", "green", "red"], per_class=4)
    run = data / "model"
    shutil.copytree(run_copy, run)  # a finished 4-epoch run, history.png and all, inside DATA
    (run / "notes.txt").write_text("mine")
    result = cli("train", data, "--out", run, "--overwrite", "--epochs", "1", "--val-split", "0.25", *TINY)
    assert result.exit_code == 0, result.output
    meta = json.loads((run / "cvtool.json").read_text())
    assert meta["class_names"] == ["blue", "green", "red"]
    assert meta["data"]["train"] + meta["data"]["validation"] == 12
    assert [r["epoch"] for r in read_history(run)] == ["1"]
    assert sorted(p.name for p in (run / "checkpoints").glob("*.keras")) == sorted(
        [next((run / "checkpoints").glob("epoch-001-*.keras")).name, "last-epoch-001.keras"]
    )
    assert (run / "notes.txt").read_text() == "mine"  # not the run's: kept
    assert not [p for p in data.iterdir() if p.name.startswith(".")]  # the staging folder is gone


def test_data_discovery_leaves_out_the_given_folder(tmp_path):
    from cvtool.data import discover

    data = classes_folder(tmp_path / "data", ["a", "b"])
    ensemble = data / "ensemble"
    (ensemble / "member-1").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(ensemble / "member-1" / "history.png")
    assert discover(data, val_split=0.0, exclude=ensemble).class_names == ["a", "b"]
    assert discover(data, val_split=0.0).class_names == ["a", "b", "ensemble"]


def test_train_arch_outside_the_from_scratch_networks_is_a_usage_error_naming_them(colour_data, tmp_path):
    """train --arch nope listed finetune's backbones (without small-cnn) as the choices."""
    from typer.testing import CliRunner

    from cvtool.cli import app

    result = CliRunner().invoke(app, ["train", str(colour_data), "--out", str(tmp_path / "r"), "--arch", "vgg16"])
    assert result.exit_code == 2, result.output
    assert "small-cnn" in result.stderr and "cvtool finetune" in result.stderr, result.stderr
    assert not (tmp_path / "r").exists()


def test_errors_of_split_folders_name_the_split(colour_data, tmp_path):
    """A bad file of one name in train/ and validation/ is two rows that say which split each is in."""
    data = tmp_path / "data"
    shutil.copytree(colour_data, data)
    for split in ("train", "validation"):
        (data / split / "red" / "broken.png").write_bytes(b"not a png")
    from cvtool.config import TrainConfig
    from cvtool.train import train

    run = tmp_path / "run"
    train(data, run, cfg=TrainConfig(epochs=1, image_size=16, batch_size=8), quiet=True)
    with open(run / "errors.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert sorted(r["path"] for r in rows) == ["train/red/broken.png", "validation/red/broken.png"]
