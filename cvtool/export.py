"""`cvtool export`: a trained model as a standalone SavedModel, TFLite (LiteRT) or ONNX artefact.

Each artefact takes RGB pixels 0-255 ``[batch, height, width, 3]`` and returns class probabilities
(preprocessing is inside the model), so it runs in TF Serving, a LiteRT interpreter or onnxruntime with
nothing of cvtool. Keras' own ``model.export`` writes it (formats ``tf_saved_model``, ``litert``,
``onnx``; ``--int8`` passes TFLite's converter a representative dataset for full-integer quantization).
``labels.txt`` (class names in output order) and ``export.json`` (input, versions, parity) go beside it.

Parity is measured at export: the Keras model and the artefact (run by its runtime,
:mod:`cvtool.runtimes`) score the same images (the run's validation images, else ``--calibration DIR``,
else random images); a float artefact must agree on top-1 for at least 99.5% of them with
max |dp| <= 1e-3, else the export is refused (exit 3). An int8 artefact reports its agreement and, on
labelled images, its accuracy drop.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cvtool import __version__
from cvtool.bundle import (
    EXPORT_DIR,
    EXPORT_FILES,
    EXPORT_META,
    LABELS_FILE,
    Classifier,
    load_classifier,
    resolve_model_path,
)
from cvtool.errors import UnusableError, UsageError, first_line
from cvtool.images import InputItem, list_images, load_image
from cvtool.outputs import temp_path, write_bytes_atomic, write_json
from cvtool.progress import info, warn
from cvtool.registry import Registry

FP32_MIN_AGREEMENT = 0.995  # top-1 agreement a float artefact must reach with the Keras model
FP32_MAX_DIFF = 1e-3  # largest |probability difference| allowed for a float artefact
DEFAULT_SAMPLES = 200  # images scored by both for parity (evenly spread over what is available)
CALIBRATION_IMAGES = 100  # images the int8 quantizer calibrates on
RANDOM_IMAGES = 32  # images made up when there is no data at all

FORMATS = Registry("--format")


@dataclass
class ExportResult:
    """What an export wrote and how close the artefact is to the Keras model."""

    path: Path
    format: str
    int8: bool
    parity: dict
    export_json: Path

    def summary(self) -> str:
        """One line for the console: the artefact and its parity figures."""
        p = self.parity
        kind = "int8" if self.int8 else "fp32"
        line = (
            f"wrote {self.path} ({self.format} {kind}): top-1 agreement {p['top1_agreement']:.2%} with the Keras "
            f"model on {p['images']} {p['data']}, max |dp| {p['max_abs_diff']:.2g}"
        )
        if p.get("accuracy_drop") is not None:
            line += (
                f"; accuracy {p['artefact_accuracy']:.2%} vs {p['keras_accuracy']:.2%} "
                f"(drop {100 * p['accuracy_drop']:.2f} points)"
            )
        return line


@FORMATS.register("saved_model", help="SavedModel folder for TF Serving", runtime="tf")
def _saved_model(model, path: Path, representative: Callable | None) -> None:
    model.export(str(path), format="tf_saved_model", verbose=False)


@FORMATS.register("tflite", help="LiteRT flatbuffer, XNNPACK on CPU", runtime="tflite")
def _tflite(model, path: Path, representative: Callable | None) -> None:
    if representative is None:
        model.export(str(path), format="litert", verbose=False)
        return
    from cvtool.runtime import tf

    # Full-integer quantization: int8 weights and activations calibrated on the representative images; the
    # input is uint8 pixels (scale 1, exact), the output float probabilities (one dequantize at the end).
    model.export(
        str(path),
        format="litert",
        verbose=False,
        optimizations=[tf.lite.Optimize.DEFAULT],
        representative_dataset=representative,
        inference_input_type=tf.uint8,
        target_spec={"supported_ops": [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]},
    )


@FORMATS.register("onnx", help="for onnxruntime", runtime="onnx")
def _onnx(model, path: Path, representative: Callable | None) -> None:
    model.export(str(path), format="onnx", verbose=False)


def default_name(format: str, int8: bool = False) -> str:
    """The artefact's name in ``RUN/export/``: ``saved_model``, ``model[-int8].tflite``, ``model.onnx``."""
    name = EXPORT_FILES[FORMATS.entry(format).info["runtime"]]
    return name.replace(".tflite", "-int8.tflite") if int8 else name


def _labelled(folder: Path, class_names: list[str]) -> tuple[list[InputItem], list[int] | None]:
    """Images under ``folder`` with their labels when its sub-folders are the model's classes, else unlabelled."""
    from cvtool.data import class_name, read_class_folders, split_dirs

    splits = split_dirs(folder)
    folder = splits.get("validation") or splits.get("test") or folder
    subdirs = [d for d in folder.iterdir() if d.is_dir() and not d.name.startswith(".")]
    wanted = {class_name(n) for n in class_names}
    if subdirs and all(class_name(d.name) in wanted for d in subdirs):
        _, labelled = read_class_folders(folder, class_names)
        return labelled.items, labelled.labels
    return list_images(folder), None


def _run_images(run_dir: Path, meta: dict, split: str) -> tuple[list[InputItem], list[int]]:
    """The ``split`` (train or validation) images of the data the run was trained on, as training split them."""
    from cvtool.data import discover

    cfg = meta.get("config") or {}
    splits = discover(
        meta["data"]["root"],
        cfg.get("val_split", 0.2),
        cfg.get("seed", 0),
        layout=cfg.get("layout", "auto"),
        exclude=run_dir,
    )
    chosen = splits.validation if split == "validation" else splits.train
    return chosen.items, chosen.labels


def _spread(n: int, k: int) -> np.ndarray:
    """At most ``k`` indices evenly spread over ``range(n)`` (every class of a sorted folder gets some)."""
    return np.unique(np.linspace(0, n - 1, min(n, k)).round().astype(int)) if n else np.zeros(0, int)


def _decode(items: list[InputItem], labels: list[int] | None, size, k: int):
    """Up to ``k`` images (uint8 [N, H, W, 3]) and their labels; unreadable files are skipped."""
    pixels, kept = [], []
    for i in _spread(len(items), k):
        try:
            pixels.append(load_image(items[i].path, size))
        except Exception:  # noqa: BLE001 - a bad file is left out of the parity set, as a batch would
            continue
        kept.append(i)
    if not pixels:
        return None, None
    return np.stack(pixels), (None if labels is None else np.array([labels[i] for i in kept]))


def _random_images(size, n: int, seed: int = 0) -> np.ndarray:
    """Smooth random images (colour blobs, not pixel noise): a stand-in when there is no data."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (n, 4, 4, 3), dtype=np.uint8)
    return np.stack([np.asarray(Image.fromarray(s).resize((size[1], size[0]), Image.BILINEAR)) for s in small])


def parity_images(classifier: Classifier, run_dir: Path | None, calibration: Path | None, samples: int):
    """(pixels, labels or None, description) of the images parity is measured on.

    The run's validation images when its data is still where cvtool.json says; else the ``calibration``
    folder (labelled when its sub-folders are the model's classes); else random images (with a warning).
    """
    size = classifier.image_size
    meta = classifier.meta or {}
    if run_dir is not None and (meta.get("data") or {}).get("root"):
        try:
            items, labels = _run_images(run_dir, meta, "validation")
            pixels, labels = _decode(items, labels, size, samples)
            if pixels is not None:
                return pixels, labels, "validation images"
        except (UsageError, UnusableError, OSError) as exc:
            warn(f"the run's data is not usable for parity ({first_line(str(exc))})")
    if calibration is not None:
        items, labels = _labelled(calibration, classifier.class_names)
        pixels, labels = _decode(items, labels, size, samples)
        if pixels is not None:
            return pixels, labels, f"images of {calibration}"
        raise UsageError(f"--calibration {calibration}: no readable images")
    warn(f"no data to measure parity on: using {RANDOM_IMAGES} random images; pass --calibration DIR for real ones")
    return _random_images(size, RANDOM_IMAGES), None, "random images"


def calibration_images(classifier: Classifier, run_dir: Path | None, calibration: Path | None) -> np.ndarray:
    """What the int8 quantizer calibrates on: ``calibration``, else the run's training images, else random."""
    size = classifier.image_size
    if calibration is not None:
        items, _ = _labelled(calibration, classifier.class_names)
        pixels, _ = _decode(items, None, size, CALIBRATION_IMAGES)
        if pixels is None:
            raise UsageError(f"--calibration {calibration}: no readable images")
        return pixels
    meta = classifier.meta or {}
    if run_dir is not None and (meta.get("data") or {}).get("root"):
        try:
            items, _ = _run_images(run_dir, meta, "train")
            pixels, _ = _decode(items, None, size, CALIBRATION_IMAGES)
            if pixels is not None:
                return pixels
        except (UsageError, UnusableError, OSError):
            pass
    warn("no images to calibrate int8 on: using random images; pass --calibration DIR (a few hundred real ones)")
    return _random_images(size, RANDOM_IMAGES, seed=1)


def _predict(run: Callable[[np.ndarray], np.ndarray], pixels: np.ndarray, batch: int = 32) -> np.ndarray:
    return np.concatenate([run(pixels[i : i + batch]) for i in range(0, len(pixels), batch)])


def parity(keras_probs: np.ndarray, probs: np.ndarray, labels: np.ndarray | None, data: str) -> dict:
    """Top-1 agreement, max |dp| and (with labels) both accuracies and the drop, as ``export.json`` keeps them."""
    top_keras, top = keras_probs.argmax(1), probs.argmax(1)
    figures = {
        "images": int(len(probs)),
        "data": data,
        "top1_agreement": float(np.mean(top_keras == top)),
        "max_abs_diff": float(np.max(np.abs(keras_probs - probs))),
        "keras_accuracy": None,
        "artefact_accuracy": None,
        "accuracy_drop": None,
    }
    if labels is not None:
        figures["keras_accuracy"] = float(np.mean(top_keras == labels))
        figures["artefact_accuracy"] = float(np.mean(top == labels))
        figures["accuracy_drop"] = figures["keras_accuracy"] - figures["artefact_accuracy"]
    return figures


def _source(model: str | os.PathLike) -> tuple[Path | None, Path | None]:
    """(run directory or None, model file or None) of the MODEL argument."""
    from cvtool.imagenet import is_imagenet_spec

    if is_imagenet_spec(model):
        return None, None
    model_file, run_dir = resolve_model_path(model)
    return run_dir, model_file


def _same_source(a: str, b: str) -> bool:
    return a == b or (os.path.exists(a) and os.path.exists(b) and os.path.samefile(a, b))


def _check_folder_holds_this_model(folder: Path, classifier: Classifier, source: str, overwrite: bool) -> None:
    """An export folder holds one model's artefacts (one ``labels.txt``, one ``export.json``): exporting another
    model there would orphan them, so it is refused (exit 2); ``--overwrite`` removes them first."""
    try:
        old = json.loads((folder / EXPORT_META).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return
    listed = old.get("artefacts") if isinstance(old, dict) and isinstance(old.get("artefacts"), dict) else {}
    present = sorted(name for name in listed if "/" not in name and (folder / name).exists())
    if not present or _same_source(str(old.get("source", "")), source):
        return
    if not overwrite:
        raise UsageError(
            f"{folder} holds {', '.join(present)} exported from {old.get('source')}: export {source} into another "
            "folder (--out), or pass --overwrite to replace them"
        )
    for name in present:
        path = folder / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    (folder / EXPORT_META).unlink()


def _export_meta(folder: Path, classifier: Classifier, source: str) -> dict:
    """``export.json`` as it will be: the one beside, kept when it describes the same classes and size."""
    meta_path = folder / EXPORT_META
    common = {
        "cvtool": __version__,
        "source": source,
        "labels": LABELS_FILE,
        "num_classes": classifier.num_classes,
        "image_size": list(classifier.image_size),
        "input": {"layout": "NHWC", "color": "RGB", "range": [0, 255], "resize": "bilinear, as cvtool predict"},
        "output": "class probabilities, in labels.txt order",
    }
    if classifier.meta.get("wnids"):
        common["wnids"] = list(classifier.meta["wnids"])
    try:
        old = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        old = {}
    try:
        same_labels = (folder / LABELS_FILE).read_text(encoding="utf-8").splitlines() == classifier.class_names
    except (OSError, UnicodeDecodeError):
        same_labels = False
    # Artefacts of another model (other classes or input size) no longer match labels.txt: they are dropped.
    same = isinstance(old, dict) and old.get("image_size") == common["image_size"] and same_labels
    artefacts = old.get("artefacts") if same and isinstance(old.get("artefacts"), dict) else {}
    return {**common, "artefacts": dict(artefacts)}


def export(
    model: str | os.PathLike,
    *,
    format: str,
    out: str | os.PathLike | None = None,
    int8: bool = False,
    calibration: str | os.PathLike | None = None,
    samples: int = DEFAULT_SAMPLES,
    overwrite: bool = False,
    quiet: bool = False,
    unsafe_load: bool = False,
    weights: str | os.PathLike | None = None,
) -> ExportResult:
    """Export MODEL as a standalone artefact, with ``labels.txt`` and ``export.json`` beside it.

    Args:
        model: a run directory, its ``.keras`` file, or ``imagenet:NAME`` (then ``out`` is required).
        format: ``saved_model``, ``tflite`` or ``onnx``.
        out: the artefact to write (default ``RUN/export/`` + ``saved_model``, ``model.tflite``,
            ``model-int8.tflite`` or ``model.onnx``).
        int8: full-integer quantization (tflite only), calibrated on ``calibration`` (else the run's
            training images).
        calibration: a folder of images (class sub-folders give labels): the int8 calibration set, and the
            parity set when the run's own validation images are not available.
        samples: at most this many images for parity.
        overwrite: replace an existing artefact.
        quiet: no progress lines.
        unsafe_load: allow models with Lambda layers or custom code.
        weights: a local weights file for an ``imagenet:NAME`` model.

    Example: ``export("runs/clothes", format="tflite").parity["top1_agreement"]``.
    """
    from cvtool.progress import quiet_stderr
    from cvtool.runtimes import EXTRA_HINT, RUNTIMES

    entry = FORMATS.entry(format)
    if int8 and format != "tflite":
        raise UsageError("--int8 is for --format tflite (full-integer quantization)")
    if samples < 1:
        raise UsageError("--samples must be at least 1")
    calibration = Path(calibration) if calibration is not None else None
    if calibration is not None and not calibration.is_dir():
        raise UsageError(f"--calibration folder not found: {calibration}")
    run_dir, _ = _source(model)
    if out is None:
        if run_dir is None:
            raise UsageError(f"{model} has no run directory to export into: pass --out PATH")
        out = run_dir / EXPORT_DIR / default_name(format, int8)
    out = Path(out)
    suffix = {"tflite": ".tflite", "onnx": ".onnx"}.get(format, "")
    if suffix and out.suffix != suffix:
        raise UsageError(f"--format {format} writes a {suffix} file; --out {out} has another suffix")
    if out.exists() and not overwrite:
        raise UsageError(f"{out} exists; pass --overwrite to replace it")
    classifier = load_classifier(model, unsafe=unsafe_load, weights=weights, runtime="tf")
    if classifier.features is not None:
        raise UnusableError(f"{model} is fine-tuned on a TF-Hub backbone, which cvtool cannot export (Keras 3)")
    if any("\n" in name or "\r" in name for name in classifier.class_names):
        raise UnusableError(f"{model}: a class name holds a line break, which {LABELS_FILE} cannot hold")
    _check_folder_holds_this_model(out.parent, classifier, str(model), overwrite)
    info(f"exporting {model} as {format}{' int8' if int8 else ''}", quiet)
    pixels, labels, data = parity_images(classifier, run_dir, calibration, samples)
    keras_probs = _predict(classifier.predict, pixels)
    representative = None
    if int8:
        calib = calibration_images(classifier, run_dir, calibration)

        def representative():
            for image in calib:
                yield [image[None].astype(np.float32)]

    folder = out.parent
    folder.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(out, suffix or ".export")
    try:
        if not suffix:
            tmp.unlink()  # a SavedModel is a folder: the exporter creates it
        with quiet_stderr():  # the converters print statistics and warnings on descriptor 2
            try:
                entry.func(classifier.model, tmp, representative)
            except ImportError as exc:  # tf2onnx, onnx: the export extra
                raise UsageError(f"--format {format} needs the {exc.name} package: {EXTRA_HINT}") from None
            except Exception as exc:  # noqa: BLE001 - an op the format has no kernel for, a converter error
                reason = f"{type(exc).__name__}: {first_line(str(exc))[:300]}"
                raise UnusableError(f"cannot export {model} as {format}: {reason}") from None
        run = RUNTIMES.get(entry.info["runtime"])(tmp)
        figures = parity(keras_probs, _predict(run, pixels), labels, data)
        if not int8 and (figures["top1_agreement"] < FP32_MIN_AGREEMENT or figures["max_abs_diff"] > FP32_MAX_DIFF):
            raise UnusableError(
                f"the {format} export does not match the Keras model: top-1 agreement {figures['top1_agreement']:.2%} "
                f"(needs >= {FP32_MIN_AGREEMENT:.1%}), max |dp| {figures['max_abs_diff']:.2g} (needs <= "
                f"{FP32_MAX_DIFF:g}) on {figures['images']} {data}; nothing was written"
            )
        del run
        _replace(tmp, out)
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
    from cvtool.bundle import versions
    from cvtool.jobs import model_fingerprint

    meta = _export_meta(folder, classifier, str(model))
    meta["artefacts"][out.name] = {
        "format": format,
        "runtime": entry.info["runtime"],
        "int8": int8,
        "input_dtype": "uint8" if int8 else "float32",
        "exported": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        # the model file exported (a checkpoint's differs from the run's): `--runtime auto` checks it is still the run's
        "source_fingerprint": model_fingerprint(model) if run_dir is not None else None,
        "versions": versions(),
        "parity": {
            **figures,
            "min_agreement": None if int8 else FP32_MIN_AGREEMENT,
            "max_diff": None if int8 else FP32_MAX_DIFF,
        },
    }
    write_bytes_atomic(folder / LABELS_FILE, "".join(f"{n}\n" for n in classifier.class_names).encode("utf-8"))
    meta_path = write_json(folder / EXPORT_META, meta)
    return ExportResult(out, format, int8, meta["artefacts"][out.name]["parity"], meta_path)


def _replace(tmp: Path, out: Path) -> None:
    """Move the finished artefact (a file, or a SavedModel folder) to ``out``, replacing an older one."""
    if tmp.is_dir():
        if out.exists():
            old = temp_path(out, ".old")
            os.replace(out, old)
            shutil.rmtree(old, ignore_errors=True)
        os.replace(tmp, out)
    else:
        os.replace(tmp, out)
