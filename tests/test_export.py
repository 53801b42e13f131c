"""cvtool export and the runtimes: standalone SavedModel / TFLite / ONNX artefacts, their parity with the
Keras model, and predict/tta/ensemble/evaluate on them (--runtime), without TensorFlow for tflite and onnx."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from cvtool.cli import app

REPO = Path(__file__).resolve().parents[1]
runner = CliRunner()


def read_probs(path: Path) -> dict[str, dict[str, float]]:
    """path -> {label: score} of a predictions CSV (every class when top-k covers them all)."""
    out = {}
    with open(path, newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            labels = [k for k in row if k == "label" or k.startswith("label_")]
            out[row["path"]] = {row[k]: float(row[k.replace("label", "score")]) for k in labels}
    return out


def cli_env(**extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "CVTOOL_LOG_INTERVAL": "0", **extra}


@pytest.fixture(scope="module")
def exported(trained_run, tmp_path_factory) -> Path:
    """A copy of the trained run with every export: saved_model/, model.tflite, model-int8.tflite, model.onnx."""
    from cvtool.export import export

    run = tmp_path_factory.mktemp("exported") / "run"
    shutil.copytree(trained_run, run)
    for fmt in ("saved_model", "tflite", "onnx"):
        export(run, format=fmt, quiet=True)
    export(run, format="tflite", int8=True, quiet=True)
    return run


def test_export_writes_each_format_with_labels_and_parity_figures(exported, colour_data):
    folder = exported / "export"
    meta = json.loads((folder / "export.json").read_text())
    classes = json.loads((exported / "cvtool.json").read_text())["class_names"]
    assert (folder / "labels.txt").read_text().splitlines() == classes
    assert meta["image_size"] == [32, 32] and meta["input"]["range"] == [0, 255]
    assert (folder / "saved_model" / "saved_model.pb").is_file()
    assert set(meta["artefacts"]) == {"saved_model", "model.tflite", "model-int8.tflite", "model.onnx"}
    validation = sum(1 for _ in (colour_data / "validation").rglob("*.png"))
    for name, entry in meta["artefacts"].items():
        parity = entry["parity"]
        assert parity["images"] == validation and parity["data"] == "validation images", name
        if not entry["int8"]:
            assert parity["top1_agreement"] >= 0.995 and parity["max_abs_diff"] <= 1e-3, name
    int8 = meta["artefacts"]["model-int8.tflite"]
    assert int8["input_dtype"] == "uint8" and int8["parity"]["accuracy_drop"] is not None
    assert int8["parity"]["max_abs_diff"] > 0  # quantized: not the float model's scores
    assert not list(folder.glob(".*"))  # no temporary files left behind


STANDALONE = textwrap.dedent(
    """
    import sys

    class NoCvtool:  # importing cvtool must be impossible here
        def find_spec(self, name, path=None, target=None):
            if name == "cvtool" or name.startswith("cvtool."):
                raise ImportError("cvtool is not available in this process")

    sys.meta_path.insert(0, NoCvtool())
    import numpy as np

    folder, pixels = sys.argv[1], np.load(sys.argv[2])
    out = {}
    import onnxruntime as ort
    session = ort.InferenceSession(folder + "/model.onnx", providers=["CPUExecutionProvider"])
    out["onnx"] = session.run(None, {session.get_inputs()[0].name: pixels})[0]
    from ai_edge_litert.interpreter import Interpreter
    interpreter = Interpreter(model_path=folder + "/model.tflite")
    inp = interpreter.get_input_details()[0]
    interpreter.resize_tensor_input(inp["index"], pixels.shape)
    interpreter.allocate_tensors()
    interpreter.set_tensor(inp["index"], pixels)
    interpreter.invoke()
    out["tflite"] = interpreter.get_tensor(interpreter.get_output_details()[0]["index"])
    import tensorflow as tf
    serve = tf.saved_model.load(folder + "/saved_model").signatures["serving_default"]
    (name,) = serve.structured_input_signature[1]
    (result,) = serve(**{name: tf.constant(pixels)}).values()
    out["saved_model"] = result.numpy()
    np.savez(sys.argv[3], **out)
    """
)


def test_artefacts_load_without_cvtool_and_match_predict(exported, colour_data, tmp_path):
    from cvtool.images import list_images, load_image

    folder = colour_data / "validation"
    items = list_images(folder)
    pixels = np.stack([load_image(item.path, (32, 32)) for item in items]).astype(np.float32)
    np.save(tmp_path / "pixels.npy", pixels)
    (tmp_path / "standalone.py").write_text(STANDALONE)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run(
        [sys.executable, "-I", "standalone.py", str(exported / "export"), "pixels.npy", "out.npz"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    result = runner.invoke(app, ["predict", str(exported), str(folder), "--out", str(tmp_path / "p.csv"), "-q"])
    assert result.exit_code == 0, result.output
    predicted = read_probs(tmp_path / "p.csv")
    names = (exported / "export" / "labels.txt").read_text().splitlines()
    expected = np.array([[predicted[item.rel][n] for n in names] for item in items])
    outputs = np.load(tmp_path / "out.npz")
    assert set(outputs.files) == {"onnx", "tflite", "saved_model"}
    for fmt in outputs.files:
        np.testing.assert_allclose(outputs[fmt], expected, atol=1e-3, err_msg=fmt)
        assert (outputs[fmt].argmax(1) == expected.argmax(1)).all(), fmt


def test_predict_with_runtime_tflite_and_onnx_equals_tf(exported, colour_data, tmp_path):
    folder = colour_data / "validation"
    scores = {}
    for runtime in ("tf", "tflite", "onnx"):
        out = tmp_path / f"{runtime}.csv"
        result = runner.invoke(app, ["predict", str(exported), str(folder), "--out", str(out), "--runtime", runtime])
        assert result.exit_code == 0, result.output
        scores[runtime] = read_probs(out)
    for runtime in ("tflite", "onnx"):
        assert scores[runtime].keys() == scores["tf"].keys()
        for path, row in scores["tf"].items():
            assert list(scores[runtime][path]) == list(row), (runtime, path)  # same labels in the same order
            assert all(abs(scores[runtime][path][k] - v) <= 1e-3 for k, v in row.items()), (runtime, path)


def test_tflite_and_onnx_predict_never_import_tensorflow(exported, colour_data, tmp_path):
    script = textwrap.dedent(
        f"""
        import sys
        from cvtool.cli import main

        codes = []
        for argv in (
            ["predict", {str(exported / "export" / "model.tflite")!r}, {str(colour_data)!r}, "--out", "a.csv"],
            ["predict", {str(exported)!r}, {str(colour_data)!r}, "--out", "b.csv", "--runtime", "onnx"],
            ["predict", {str(exported)!r}, {str(colour_data)!r}, "--out", "c.csv"],  # auto: the tflite export
        ):
            sys.argv = ["cvtool", *argv, "-q"]
            try:
                main()
            except SystemExit as exc:
                codes.append(exc.code)
        heavy = [m for m in ("tensorflow", "keras", "tf_keras") if m in sys.modules]
        print(codes, heavy)
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, env=cli_env(), capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[0, 0, 0] []", done.stdout + done.stderr[-2000:]
    assert read_probs(tmp_path / "a.csv") == read_probs(tmp_path / "c.csv")  # auto picked the tflite export
    assert len(read_probs(tmp_path / "b.csv")) == 72


def test_a_missing_runtime_package_is_one_line_exit_2_naming_the_extra(exported, colour_data, tmp_path):
    script = textwrap.dedent(
        f"""
        import sys

        class NoLiteRT:  # as if ai-edge-litert were not installed
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] == "ai_edge_litert":
                    raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)

        sys.meta_path.insert(0, NoLiteRT())
        from cvtool.bundle import choose_export
        from cvtool.cli import main

        print(choose_export({str(exported)!r}, "auto").name)  # auto: the next export whose runtime is there
        sys.argv = ["cvtool", "predict", {str(exported)!r}, {str(colour_data)!r}, "--out", "p.csv"]
        sys.argv += ["--runtime", "tflite"]
        main()
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, env=cli_env(), capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 2 and done.stdout.strip() == "model.onnx", done.stdout + done.stderr
    assert (
        done.stderr.strip() == 'error: --runtime tflite needs the ai-edge-litert package: pip install "cvtool[export]"'
    )


def test_exported_files_as_model_for_evaluate_tta_and_ensemble(exported, colour_data, tmp_path):
    onnx, tflite = exported / "export" / "model.onnx", exported / "export" / "model.tflite"
    metrics = {}
    for name, model in (("keras", exported / "model.keras"), ("onnx", onnx)):
        result = runner.invoke(app, ["evaluate", str(model), str(colour_data), "--out", str(tmp_path / name), "-q"])
        assert result.exit_code == 0, result.output
        metrics[name] = json.loads((tmp_path / name / "metrics.json").read_text())
    assert metrics["onnx"]["accuracy"] == metrics["keras"]["accuracy"]
    assert metrics["onnx"]["per_class"] == metrics["keras"]["per_class"]
    assert abs(metrics["onnx"]["loss"] - metrics["keras"]["loss"]) < 1e-3
    result = runner.invoke(app, ["tta", str(tflite), str(colour_data / "validation"), "--out", str(tmp_path / "t.csv")])
    assert result.exit_code == 0, result.output
    args = ["ensemble", str(tflite), str(exported), str(colour_data / "validation"), "--out", str(tmp_path / "e.csv")]
    result = runner.invoke(app, [*args, "--runtime", "auto"])
    assert result.exit_code == 0, result.output
    assert len(read_probs(tmp_path / "e.csv")) == len(read_probs(tmp_path / "t.csv")) == 36


def test_auto_takes_a_fresh_float_export_and_passes_over_a_stale_one(exported, tmp_path):
    from cvtool.bundle import choose_export
    from cvtool.errors import UnusableError, UsageError

    assert choose_export(exported, "auto") == exported / "export" / "model.tflite"
    assert choose_export(exported, "tf") is None  # the Keras model
    assert choose_export(exported / "export", "tf") == exported / "export" / "saved_model"
    retrained = tmp_path / "run"
    shutil.copytree(exported, retrained)
    with open(retrained / "model.keras", "ab") as f:  # another model file: the exports describe the old one
        f.write(b"\0")
    assert choose_export(retrained, "auto") is None
    with pytest.raises(UnusableError, match="exported from an earlier model"):
        choose_export(retrained, "onnx")
    shutil.rmtree(retrained / "export")
    with pytest.raises(UsageError, match="cvtool export"):
        choose_export(retrained, "tflite")


@pytest.mark.parametrize("name", ["model.tflite", "model.onnx"])
def test_corrupt_artefact_is_one_line_exit_3(exported, colour_data, tmp_path, name):
    folder = tmp_path / "export"
    shutil.copytree(exported / "export", folder, ignore=shutil.ignore_patterns("saved_model"))
    (folder / name).write_bytes((folder / name).read_bytes()[:1500])  # truncated
    done = subprocess.run(
        [sys.executable, "-m", "cvtool", "predict", str(folder / name), str(colour_data), "--out", "p.csv"],
        cwd=tmp_path,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 3, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: cannot load") and name in lines[0], done.stderr


def test_gradcam_with_a_non_tf_runtime_is_one_line_exit_2(exported, colour_data, tmp_path):
    for args in (
        [str(exported), "--runtime", "tflite"],
        [str(exported / "export" / "model.onnx")],
    ):
        result = runner.invoke(app, ["gradcam", args[0], str(colour_data), "--out", str(tmp_path / "cam"), *args[1:]])
        assert result.exit_code == 2, result.output
        assert result.output.count("\n") == 1 and "Grad-CAM needs gradients" in result.output


def test_export_refusals_are_usage_errors(exported, tmp_path):
    other = tmp_path / "other-run"  # another model's export must not orphan the artefacts already in a folder
    shutil.copytree(exported, other, ignore=shutil.ignore_patterns("export"))
    cases = [
        (["export", str(other), "--format", "onnx", "--out", str(exported / "export" / "o.onnx")], "exported from"),
        (["export", str(exported), "--format", "onnx", "--int8"], "--int8 is for --format tflite"),
        (["export", str(exported), "--format", "onnx"], "exists; pass --overwrite"),
        (["export", str(exported), "--format", "tflite", "--out", str(tmp_path / "m.onnx")], "another suffix"),
        (["export", str(exported), "--format", "pmml"], "unknown --format 'pmml'"),
        (["predict", str(exported), str(tmp_path), "--out", str(tmp_path / "p.csv"), "--runtime", "x"], "--runtime"),
    ]
    for args, message in cases:
        result = runner.invoke(app, args)
        assert result.exit_code == 2 and message in result.output, (args, result.output)


def test_imagenet_model_exports_from_a_local_weights_file(tmp_path):
    """imagenet:mobilenet_v3_small (the smallest) from a weights file, to ONNX: standalone, labels, wnids."""
    from tests.conftest import colour_image
    from tests.test_imagenet import saved_application

    weights = tmp_path / "mnv3.weights.h5"
    saved_application("MobileNetV3Small", "mobilenet_v3", weights, seed=3)
    photos = tmp_path / "photos"
    photos.mkdir()
    for i, rgb in enumerate([(200, 40, 40), (40, 180, 60), (40, 60, 200), (220, 220, 30)]):
        colour_image(rgb, size=(96, 64), seed=i).save(photos / f"img{i}.png")
    out = tmp_path / "mnv3" / "model.onnx"
    args = ["export", "imagenet:mobilenet_v3_small", "--weights", str(weights), "--format", "onnx"]
    result = runner.invoke(app, [*args, "--out", str(out), "--calibration", str(photos)])
    assert result.exit_code == 0, result.output
    assert "top-1 agreement 100.00%" in result.output and f"4 images of {photos}" in result.output
    labels = (out.parent / "labels.txt").read_text().splitlines()
    assert len(labels) == 1000 and labels[207] == "golden_retriever"
    for model in ("imagenet:mobilenet_v3_small", str(out)):
        extra = ["--weights", str(weights)] if model.startswith("imagenet:") else []
        csv_out = tmp_path / f"{Path(model).suffix or 'keras'}.csv"
        result = runner.invoke(
            app, ["predict", model, str(photos), "--out", str(csv_out), "--label-format", "wnid", "-k", "5", *extra]
        )
        assert result.exit_code == 0, result.output
    keras_rows, onnx_rows = read_probs(tmp_path / "keras.csv"), read_probs(tmp_path / ".onnx.csv")
    for path, row in keras_rows.items():
        assert list(onnx_rows[path])[0] == list(row)[0] and list(row)[0].startswith("n")
        assert abs(onnx_rows[path][list(row)[0]] - list(row.values())[0]) <= 1e-3


def test_plain_keras_loads_model_keras_after_importing_cvtool_layers(trained_run, tmp_path):
    script = textwrap.dedent(
        f"""
        import keras, numpy as np
        path = {str(trained_run / "model.keras")!r}
        try:
            keras.models.load_model(path)
            print("loaded without cvtool.layers")
        except Exception as exc:
            print("refused:", type(exc).__name__)
        import cvtool.layers
        model = keras.models.load_model(path)  # safe_mode on, as by default
        print(model.predict(np.zeros((1, 32, 32, 3), "float32"), verbose=0).shape)
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, env=cli_env(), capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    first, second = done.stdout.strip().splitlines()
    assert first.startswith("refused") and second == "(1, 3)"
