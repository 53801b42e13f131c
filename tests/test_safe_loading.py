"""Nothing loaded is trusted: Lambda layers, foreign bundles, bad models, labels CSVs escaping the data root."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cvtool.cli import app
from tests.conftest import colour_image
from tests.test_hostile import read_rows

runner = CliRunner()


def cli(*args):
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert "Traceback" not in result.output + result.stderr
    return result


def one_line_error(result, code: int, fragment: str) -> None:
    assert result.exit_code == code, result.stderr
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr
    assert fragment in result.stderr, result.stderr


@pytest.fixture(scope="module")
def lambda_run(trained_run, tmp_path_factory) -> Path:
    """A run directory whose model.keras holds a Lambda layer (arbitrary Python code)."""
    from cvtool.runtime import keras

    inputs = keras.Input((32, 32, 3))
    x = keras.layers.Lambda(lambda t: t / 255.0)(inputs)
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(3, activation="softmax")(x)
    run = tmp_path_factory.mktemp("lambda") / "run"
    run.mkdir()
    keras.Model(inputs, outputs).save(run / "model.keras")
    shutil.copy(trained_run / "cvtool.json", run / "cvtool.json")
    return run


def test_lambda_model_is_refused_unless_unsafe_load(lambda_run, colour_data, tmp_path):
    images = colour_data / "validation" / "red"
    refused = cli("predict", lambda_run, images, "--out", tmp_path / "p.csv")
    one_line_error(refused, 3, "Lambda")
    assert "--unsafe-load" in refused.stderr and not (tmp_path / "p.csv").exists()
    one_line_error(cli("evaluate", lambda_run, colour_data, "--out", tmp_path / "rep"), 3, "--unsafe-load")
    allowed = cli("predict", lambda_run, images, "--out", tmp_path / "p.csv", "--unsafe-load", "-q")
    assert allowed.exit_code == 0 and len(read_rows(tmp_path / "p.csv")) == len(list(images.iterdir()))


@pytest.mark.parametrize(
    "content,fragment",
    [
        (b"{not json", "not a readable cvtool.json"),
        (b"\xff\xfe\x00\x01binary", "not a readable cvtool.json"),
        (b"[1, 2, 3]", "not a cvtool bundle"),
        (b'{"name": "some-other-tool", "version": 2}', "not a cvtool bundle"),
        (b'{"class_names": [1, 2, 3], "image_size": [32, 32]}', "must be strings"),
        (b'{"class_names": ["a", "b", "c"], "image_size": "big"}', "image_size"),
        (b'{"class_names": ["a", "b"], "image_size": [32, 32]}', "lists 2 classes but the model outputs 3"),
    ],
)
def test_corrupt_or_foreign_bundle_is_exit_3_in_one_line(content, fragment, run_copy, colour_data, tmp_path):
    (run_copy / "cvtool.json").write_bytes(content)
    one_line_error(cli("predict", run_copy, colour_data / "validation", "--out", tmp_path / "p.csv"), 3, fragment)


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty"])
def test_damaged_model_file_is_exit_3_in_one_line(damage, run_copy, colour_data, tmp_path):
    model = run_copy / "model.keras"
    data = model.read_bytes()
    model.write_bytes(
        {"garbage": b"PK\x03\x04" + b"\x00" * 100, "truncated": data[: len(data) // 2], "empty": b""}[damage]
    )
    one_line_error(cli("predict", run_copy, colour_data / "validation", "--out", tmp_path / "p.csv"), 3, "model")


def test_saved_model_without_a_usable_signature_is_exit_3(colour_data, tmp_path):
    from cvtool.runtime import tf

    module = tf.Module()
    module.v = tf.Variable(1.0)  # real SavedModels hold variables
    tf.saved_model.save(module, str(tmp_path / "saved"))
    result = cli("predict", tmp_path / "saved", colour_data / "validation", "--out", tmp_path / "p.csv")
    one_line_error(result, 3, "SavedModel")


def test_labels_csv_paths_escaping_the_data_root_are_refused(trained_run, tmp_path):
    data, outside = tmp_path / "data", tmp_path / "outside"
    (data / "sub").mkdir(parents=True)
    outside.mkdir()
    for i in range(3):  # three different images: rows naming one image twice count it once
        colour_image((200, 40, 40), seed=1 + i).save(data / "sub" / f"ok{i}.png")
    colour_image((40, 60, 200), seed=5).save(outside / "secret.png")
    (data / "link_out.png").symlink_to(outside / "secret.png")
    (data / "dir_out").symlink_to(outside)
    (data / "link_in.png").symlink_to(data / "sub" / "ok2.png")
    escaping = [
        "../outside/secret.png",
        "sub/../../outside/secret.png",
        str(outside / "secret.png"),  # absolute, elsewhere
        "/etc/passwd",
        "link_out.png",  # a symlink inside DATA pointing out
        "dir_out/secret.png",  # through a symlinked folder pointing out
    ]
    allowed = ["sub/ok0.png", str(data / "sub" / "ok1.png"), "link_in.png"]
    with open(tmp_path / "labels.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "label"])
        writer.writerows([p, "red"] for p in escaping + allowed)
    result = cli("evaluate", trained_run, data, "--labels", tmp_path / "labels.csv", "--out", tmp_path / "rep", "-q")
    assert result.exit_code == 1
    errors = read_rows(tmp_path / "rep" / "errors.csv")
    assert sorted(p for p, _ in errors) == sorted(escaping)
    assert all("outside the data folder" in reason for _, reason in errors)
    assert sorted(r[0] for r in read_rows(tmp_path / "rep" / "predictions.csv")) == sorted(allowed)
    assert json.loads((tmp_path / "rep" / "metrics.json").read_text())["samples"] == len(allowed)


def test_a_training_run_killed_before_its_cvtool_json_is_refused_not_numbered(run_copy, colour_data, tmp_path):
    """A run with model.keras and checkpoints/ but no cvtool.json predicted classes '0', '1'... with exit 0."""
    (run_copy / "cvtool.json").unlink()
    for model in (run_copy, *sorted((run_copy / "checkpoints").glob("*.keras"))[:1]):
        result = cli("predict", model, colour_data / "validation", "--out", tmp_path / "p.csv", "-q")
        one_line_error(result, 3, "did not finish")
        assert not (tmp_path / "p.csv").exists()


def test_a_file_named_keras_that_is_not_a_model_says_so(colour_data, tmp_path):
    fake = tmp_path / "fake.keras"
    fake.write_text("path,label\n")
    result = cli("predict", fake, colour_data / "validation", "--out", tmp_path / "p.csv")
    one_line_error(result, 3, "is not a Keras model file")


def test_a_run_directory_given_as_input_is_a_usage_error(trained_run, tmp_path):
    """`ensemble run-a run-b --out x.csv` (INPUT forgotten) classified run-b's history.png with exit 0."""
    from cvtool.bundle import META_FILE, MODEL_FILE
    from cvtool.images import RUN_MARKERS

    assert RUN_MARKERS == (META_FILE, MODEL_FILE)
    for args in (("predict", trained_run, trained_run), ("ensemble", trained_run, trained_run)):
        result = cli(*args, "--out", tmp_path / "x.csv", "-q")
        one_line_error(result, 2, "is a run directory")
        assert not (tmp_path / "x.csv").exists()


def test_ensemble_input_given_twice_is_a_usage_error(trained_run, colour_data, tmp_path):
    images = colour_data / "validation"
    result = cli("ensemble", trained_run, images, "--input", images, "--out", tmp_path / "x.csv", "-q")
    assert result.exit_code == 2 and "given twice" in result.stderr, result.stderr
