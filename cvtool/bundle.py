"""The run directory (model bundle): the one place models are saved and loaded.

A run directory holds ``model.keras`` and ``cvtool.json`` (class names in
index order, input size, preprocessing, the training config, metrics and
versions). An ensemble run directory (``train --members K``) holds
``member-1..K/`` run directories and a ``cvtool.json`` whose ``ensemble`` entry
lists them. Every command that takes a MODEL calls :func:`load_models` (one
model or the members) or :func:`load_classifier` (exactly one model).

``cvtool export`` writes standalone artefacts into ``RUN/export/`` (``model.tflite``,
``model.onnx``, ``saved_model/``) with ``labels.txt`` and ``export.json`` beside them; the
same loading path takes them as MODEL and runs them in their runtime (:mod:`cvtool.runtimes`),
and picks a run's export for ``--runtime`` (:func:`choose_export`).
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import os
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cvtool import __version__
from cvtool.errors import UnusableError, UsageError, first_line
from cvtool.outputs import atomic_path, write_json

META_FILE = "cvtool.json"
MODEL_FILE = "model.keras"
CHECKPOINT_DIR = "checkpoints"
FORMAT_VERSION = 1
ENSEMBLE_KEY = "ensemble"
EXPORT_DIR = "export"  # RUN/export/: what `cvtool export` writes by default
EXPORT_META = "export.json"
LABELS_FILE = "labels.txt"
# Each runtime's artefact in an export folder, and the order `--runtime auto` tries them in (fastest on CPU first,
# see bench/README.md); int8 artefacts are never picked by auto, as their scores differ from the model's.
EXPORT_FILES = {"tflite": "model.tflite", "onnx": "model.onnx", "tf": "saved_model"}
AUTO_ORDER = ("tflite", "onnx")


@dataclass
class Classifier:
    """A loaded image classifier: Keras model plus what is needed to feed it."""

    model: Any
    class_names: list[str]
    image_size: tuple[int, int]  # (height, width)
    meta: dict = field(default_factory=dict)
    source: str = ""
    features: Any = None  # a frozen feature extractor (hub backbone) run before ``model``, or None
    runtime: str = "tf"  # what computes the scores (cvtool.runtimes); "tf" with a Keras ``model``
    runner: Any = None  # an exported artefact's runner (uint8 images -> probabilities); ``model`` is then None
    _forward: Any = field(default=None, repr=False)
    # (spec, unsafe, weights) that load_classifier was given: how another process (a Ray actor) loads it again
    load_args: tuple | None = None

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def predict(self, images: np.ndarray) -> np.ndarray:
        """Class probabilities (float32, [N, C]) for a batch of uint8 RGB images at ``image_size``."""
        if self.runner is not None:
            return self.runner(images)
        from cvtool.runtime import tf

        if self._forward is None:
            if self.features is None:
                forward = lambda x: self.model(x, training=False)  # noqa: E731
            else:
                forward = lambda x: self.model(self.features(x / 255.0), training=False)  # noqa: E731
            self._forward = tf.function(
                forward, input_signature=[tf.TensorSpec([None, *self.image_size, 3], tf.float32)]
            )
        return np.asarray(self._forward(tf.convert_to_tensor(images, tf.float32)), dtype=np.float32)

    def without_model(self) -> Classifier:
        """A light copy to send to other processes: class names, input size, meta and how to load the model
        (:meth:`reload`), but no model. A classifier built in Python rather than loaded from a path is refused
        (usage error): other processes could not load it. Example: ``pickle.dumps(classifier.without_model())``."""
        if self.load_args is None:
            self.reload()  # raises the usage error
        return dataclasses.replace(self, model=None, features=None, _forward=None, runner=None)

    def reload(self) -> Classifier:
        """The model loaded again, the way :func:`load_classifier` loaded it (in a Ray actor, once per actor).

        A classifier built in Python rather than loaded from a path has no way to be loaded again: usage error.
        Example: ``classifier.without_model().reload().predict(images)``.
        """
        if self.load_args is None:
            raise UsageError(
                "this model was not loaded from a path, so other processes cannot load it: give MODEL as a path"
            )
        spec, unsafe, weights, runtime = self.load_args
        return load_classifier(spec, unsafe, weights, runtime=runtime)


def versions() -> dict:
    from cvtool.runtime import keras, tf

    return {"cvtool": __version__, "tensorflow": tf.__version__, "keras": keras.__version__}


def save_model(model, path: str | os.PathLike, *, optimizer: bool = False) -> Path:
    """Save a Keras model atomically (a killed run never leaves a half-written model.keras).

    The file is the deployable model, architecture and weights: a compiled model's optimizer
    state (Adam's two moments per weight, twice the weights' size) is left out unless
    ``optimizer`` is set, as resume points need it.

    Example: ``save_model(model, run_dir / "model.keras")``
    """
    if not optimizer and getattr(model, "optimizer", None) is not None:
        model = deployable(model)
    with atomic_path(path, suffix=".keras") as tmp:  # Keras insists on the .keras extension
        model.save(tmp)
    return Path(path)


def deployable(model):
    """The same architecture with the same weights, not compiled: no optimizer to save.

    (``keras.models.clone_model`` would compile the copy again, with a fresh optimizer.)
    """
    import cvtool.layers  # noqa: F401 - registers cvtool's layers for from_config

    copy = model.__class__.from_config(model.get_config())
    copy.set_weights(model.get_weights())
    return copy


def link_model(saved: str | os.PathLike, path: str | os.PathLike) -> Path:
    """``path`` becomes a second name of the saved file ``saved`` (a hard link: no second copy on
    disk), atomically; where the filesystem has no hard links, a copy."""
    import shutil

    with atomic_path(path, suffix=".keras") as tmp:
        tmp.unlink()
        try:
            os.link(saved, tmp)
        except OSError:
            shutil.copyfile(saved, tmp)
    return Path(path)


def write_meta(run_dir: str | os.PathLike, meta: dict) -> Path:
    meta = {"format": FORMAT_VERSION, "saved": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), **meta}
    meta.setdefault("versions", versions())
    return write_json(Path(run_dir) / META_FILE, meta)


def read_meta(run_dir: str | os.PathLike) -> dict:
    path = Path(run_dir) / META_FILE
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UnusableError(
            f"{path} is not a readable cvtool.json ({exc.__class__.__name__}): re-run train or restore it"
        ) from None
    if not isinstance(meta, dict) or not isinstance(meta.get("class_names"), list):
        raise UnusableError(f"{path} is not a cvtool bundle file (no class_names list)")
    if not all(isinstance(c, str) for c in meta["class_names"]):
        raise UnusableError(f"{path}: class_names must be strings")
    size = meta.get("image_size")
    if not (isinstance(size, list) and len(size) == 2 and all(isinstance(s, int) and s > 0 for s in size)):
        raise UnusableError(f"{path}: image_size must be [height, width]")
    return meta


def fetch_model(spec):
    """A MODEL given as a URL (run directory, ``.keras`` file, SavedModel folder) as its local cached copy.

    Fetched once per content (ETag/size/mtime) into ``CVTOOL_CACHE_DIR/models`` and then loaded like a
    local model (with ``safe_mode``); local paths, ``imagenet:NAME`` and loaded models are returned as given.
    """
    from cvtool.storage import fetch

    if not isinstance(spec, str):
        return spec
    if spec in _FETCHED:  # a loaded model's source (the URL without secrets): its copy, without asking again
        return _FETCHED[spec]
    local = fetch(spec, "models")
    shown = _shown(spec)
    if shown is not None:
        _FETCHED[shown] = local
    return local


_FETCHED: dict[str, str] = {}  # MODEL URL as shown -> its local copy, fetched in this process


def _shown(spec) -> str | None:
    """A MODEL URL as messages and reports show it (without secrets); None for anything else."""
    from cvtool.storage import is_url, local_path, redact

    return redact(spec) if isinstance(spec, str) and is_url(local_path(spec)) else None


def resolve_model_path(spec: str | os.PathLike) -> tuple[Path, Path | None]:
    """(model file, run directory or None) for a run directory or a model file.

    A model file belongs to the run directory it lies in, or, in that run's
    ``checkpoints/`` (epoch checkpoints, resume points), to that run: its
    cvtool.json gives the class names and input size.
    """
    path = Path(spec)
    if not path.exists():
        raise UsageError(f"model not found: {path}")
    if path.is_dir():
        if (path / META_FILE).exists():
            meta_model = _meta_model_file(path)
            return path / meta_model, path
        if (path / MODEL_FILE).exists():
            _refuse_unfinished_run(path)
            return path / MODEL_FILE, None
        if (path / "saved_model.pb").exists():
            raise UnusableError(
                f"{path} is a TensorFlow SavedModel, which has no Keras model or class names to load; "
                f"give a run directory, a .keras file or an export from `cvtool export` ({LABELS_FILE} and "
                f"{EXPORT_META} beside it)"
            )
        raise UnusableError(f"{path} is not a run directory: it has no {META_FILE} or {MODEL_FILE}")
    owners = [path.parent, path.parent.parent] if path.parent.name == CHECKPOINT_DIR else [path.parent]
    run_dir = next((folder for folder in owners if (folder / META_FILE).exists()), None)
    if run_dir is None:
        _refuse_unfinished_run(owners[-1])
    return path, run_dir


def _refuse_unfinished_run(folder: Path) -> None:
    """A training run killed before its first cvtool.json has models but no class names: refuse it.

    Its ``model.keras`` would otherwise predict class numbers (``0``, ``1``...) with exit 0.
    """
    if (folder / CHECKPOINT_DIR).is_dir() or (folder / "history.csv").exists():
        raise UnusableError(
            f"{folder} is a training run that did not finish (it has no {META_FILE} with its class names yet); "
            f"continue it with `cvtool train DATA --out {folder} --resume`"
        )


def _meta_model_file(run_dir: Path) -> str:
    try:
        return json.loads((run_dir / META_FILE).read_text(encoding="utf-8")).get("model_file", MODEL_FILE)
    except Exception:  # noqa: BLE001 - read_meta reports the problem properly
        return MODEL_FILE


def load_keras_model(path: str | os.PathLike, unsafe: bool = False, compile: bool = False):
    """keras.models.load_model with safe_mode on, failures turned into one-line errors.

    ``compile`` restores the optimizer state too (``train --resume``)."""
    import cvtool.layers  # noqa: F401 - registers cvtool's layers for deserialisation
    from cvtool.runtime import keras

    path = Path(path)
    if not path.is_file():
        raise UnusableError(f"model file not found: {path}")
    if path.suffix == ".keras" and not zipfile.is_zipfile(path):
        raise UnusableError(f"{path} is not a Keras model file (a .keras file is a zip archive)")
    try:
        return keras.models.load_model(path, compile=compile, safe_mode=not unsafe)
    except ValueError as exc:
        text = str(exc)
        if "safe_mode" in text or "Lambda" in text:
            raise UnusableError(
                f"{path} contains a Lambda layer or other custom code, which safe loading refuses; "
                "pass --unsafe-load only if you trust where the file came from"
            ) from None
        raise UnusableError(f"cannot load model {path}: {first_line(text)}") from None
    except Exception as exc:  # noqa: BLE001 - corrupt zip, unknown class, bad h5...
        raise UnusableError(f"cannot load model {path}: {type(exc).__name__}: {first_line(str(exc))}") from None


HUB_DIR = "hub_model"


HUB_OFFLINE_HINT = "offline, pass a local SavedModel folder (hub:PATH) or set TFHUB_CACHE_DIR to a cache that holds it"


def load_hub_model(handle: str | os.PathLike, hint: str = HUB_OFFLINE_HINT):
    """A TF-Hub model (handle URL, or local SavedModel folder) loaded with ``hub.load``; ``hint`` says what to do
    when it cannot be had (the one hub loading path: finetune's hub: backbones and segment use it).

    Keep the returned object for as long as any of its functions or signatures is used: they hold
    its variables only weakly, and fail once the object is garbage collected.
    """
    from cvtool.runtime import tensorflow_hub

    hub = tensorflow_hub()
    try:
        return hub.load(str(handle))
    except Exception as exc:  # noqa: BLE001 - download errors, missing folder, not a SavedModel...
        reason = first_line(f"{type(exc).__name__}: {exc}")
        raise UnusableError(f"cannot load {handle} ({reason}); {hint}") from None


def hub_features(extractor, images: np.ndarray, batch_size: int = 32) -> np.ndarray:
    """Feature vectors [N, D] (float32) of uint8 RGB images [N, H, W, 3] through a hub feature extractor."""
    from cvtool.runtime import tf

    forward = tf.function(lambda x: extractor(x / 255.0))
    out = [
        np.asarray(forward(tf.convert_to_tensor(images[i : i + batch_size], tf.float32)), dtype=np.float32)
        for i in range(0, len(images), batch_size)
    ]
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


@dataclass
class ModelSet:
    """What a MODEL argument names: one classifier, or the members of an ensemble run and its rule."""

    members: list[Classifier]
    rule: str | None = None  # the ensemble manifest's rule; None for a single model
    weights: list[float] | None = None
    source: str = ""


def ensemble_manifest(spec: str | os.PathLike) -> dict | None:
    """The ``ensemble`` entry of ``spec/cvtool.json`` when ``spec`` is an ensemble run directory, else None."""
    path = Path(spec)
    meta_path = path / META_FILE
    if not (path.is_dir() and meta_path.is_file()):
        return None
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None  # read_meta reports it
    entry = meta.get(ENSEMBLE_KEY) if isinstance(meta, dict) else None
    if entry is None:
        return None
    members = entry.get("members") if isinstance(entry, dict) else None
    if not (isinstance(members, list) and members and all(isinstance(m, str) for m in members)):
        raise UnusableError(f"{meta_path}: 'ensemble' must hold a non-empty 'members' list of folders")
    return entry


def write_ensemble_manifest(
    run_dir: str | os.PathLike,
    members: list[str],
    class_names: list[str],
    rule: str = "mean",
    extra: dict | None = None,
) -> Path:
    """``run_dir/cvtool.json`` naming member run directories (relative to ``run_dir``) and the rule."""
    entry = {"members": list(members), "rule": rule, "weights": None}
    return write_meta(
        run_dir, {"task": "classification", "class_names": list(class_names), ENSEMBLE_KEY: entry, **(extra or {})}
    )


def load_models(
    spec: str | os.PathLike, unsafe: bool = False, weights: str | os.PathLike | None = None, *, runtime: str = "auto"
) -> ModelSet:
    """Load what a MODEL argument names: a run directory, a ``.keras`` file, ``imagenet:NAME``, an exported
    artefact, or an ensemble run.

    ``weights`` is a local weights file for an ``imagenet:NAME`` model; ``runtime`` what runs each model
    (see :func:`load_classifier`). A URL (``s3://...``) is fetched once into the local cache
    (:func:`cvtool.storage.fetch`) and loaded from there.
    """
    shown = _shown(spec)
    spec = fetch_model(spec)
    entry = ensemble_manifest(spec)
    if entry is None:
        classifier = load_classifier(spec, unsafe, weights, runtime=runtime)
        classifier.source = shown or classifier.source  # messages and reports name the URL, not the cache
        return ModelSet([classifier], source=shown or str(spec))
    members = []
    for name in entry["members"]:
        member_dir = Path(spec) / name
        if not member_dir.is_dir():
            raise UnusableError(f"ensemble {spec}: member folder {member_dir} is missing")
        if ensemble_manifest(member_dir) is not None:
            raise UnusableError(f"ensemble {spec}: member {name} is itself an ensemble; nesting is not supported")
        members.append(load_classifier(member_dir, unsafe, runtime=runtime))
    weights = entry.get("weights")
    return ModelSet(members, rule=entry.get("rule") or "mean", weights=weights, source=str(spec))


def load_classifier(
    spec: str | os.PathLike,
    unsafe: bool = False,
    weights: str | os.PathLike | None = None,
    *,
    runtime: str = "auto",
) -> Classifier:
    """Load a classifier from a run directory, a ``.keras`` file, ``imagenet:NAME`` or an exported artefact.

    Class names and input size come from ``cvtool.json``; a bare ``.keras``
    file without one gets class names ``"0".."C-1"`` and its input layer's size.
    ``imagenet:NAME`` is a ready-made keras.applications classifier (see
    :mod:`cvtool.imagenet`); ``weights`` is a local weights file for it.
    A run fine-tuned on a hub backbone holds the hub SavedModel (``hub_model/``)
    and a Keras head on its features; the classifier composes the two.
    ``runtime`` (``auto``, ``tf``, ``tflite``, ``onnx``) picks what runs it: an export of the run
    (:func:`choose_export`), or the artefact given itself (``model.tflite``, ``model.onnx``, a SavedModel
    folder or an export folder, with ``labels.txt`` and ``export.json`` beside it).
    """
    classifier = _load_classifier(spec, unsafe, weights, runtime)
    classifier.load_args = (absolute_spec(spec), unsafe, None if weights is None else absolute_spec(weights), runtime)
    return classifier


def absolute_spec(spec: str | os.PathLike) -> str:
    """A local path made absolute (other processes may run in another folder); names and URLs as they are.

    Example: ``absolute_spec("runs/clothes")`` is ``"/home/me/runs/clothes"``; ``absolute_spec("imagenet:vgg16")``
    is itself."""
    return os.path.abspath(spec) if os.path.exists(spec) else str(spec)


def _load_classifier(
    spec: str | os.PathLike, unsafe: bool, weights: str | os.PathLike | None, runtime: str
) -> Classifier:
    from cvtool import imagenet
    from cvtool.runtimes import check_runtime

    check_runtime(runtime)
    if imagenet.is_imagenet_spec(spec):
        if runtime not in ("auto", "tf"):
            raise UsageError(
                f"{spec} runs on TensorFlow; for --runtime {runtime}, export it first "
                f"(cvtool export {spec} --format {runtime} --out FILE) and give the file as MODEL"
            )
        return imagenet.load_imagenet(str(spec), weights)
    shown = _shown(spec)
    spec = fetch_model(spec)
    artefact = choose_export(spec, runtime)
    if artefact is not None:
        if weights is not None:
            raise UsageError(f"--weights is for {imagenet.PREFIX}NAME models; {shown or spec} carries its own weights")
        return load_exported(artefact, source=shown or str(spec))
    if weights is not None:
        raise UsageError(f"--weights is for {imagenet.PREFIX}NAME models; {shown or spec} carries its own weights")
    if ensemble_manifest(spec) is not None:
        raise UnusableError(
            f"{shown or spec} is an ensemble run directory; this command takes a single model (a member-N folder)"
        )
    model_path, run_dir = resolve_model_path(spec)
    meta = read_meta(run_dir) if run_dir is not None else {}
    model = load_keras_model(model_path, unsafe=unsafe)
    extractor = meta.get("feature_extractor") if meta else None
    if extractor:
        features = load_hub_model(run_dir / extractor.get("path", HUB_DIR))
        class_names = list(meta["class_names"])
        if tuple(model.outputs[0].shape)[-1] != len(class_names):
            raise UnusableError(f"{run_dir / META_FILE} lists {len(class_names)} classes but the head disagrees")
        size = (int(meta["image_size"][0]), int(meta["image_size"][1]))
        return Classifier(model, class_names, size, meta, shown or str(spec), features=features)
    try:
        out_shape = tuple(model.outputs[0].shape)
        in_shape = tuple(model.inputs[0].shape)
    except (AttributeError, IndexError, TypeError):
        raise UnusableError(f"{model_path} is not a single-input, single-output Keras model") from None
    if len(out_shape) != 2 or out_shape[-1] is None:
        raise UnusableError(f"{model_path} does not output class scores [batch, classes] (output shape {out_shape})")
    if len(in_shape) != 4 or in_shape[-1] != 3:
        raise UnusableError(f"{model_path} does not take RGB images [batch, height, width, 3] (input shape {in_shape})")
    num_classes = int(out_shape[-1])
    if meta:
        class_names = list(meta["class_names"])
        if len(class_names) != num_classes:
            raise UnusableError(
                f"{run_dir / META_FILE} lists {len(class_names)} classes but the model outputs {num_classes}"
            )
        image_size = (int(meta["image_size"][0]), int(meta["image_size"][1]))
    else:
        class_names = [str(i) for i in range(num_classes)]
        if in_shape[1] is None or in_shape[2] is None:
            raise UnusableError(f"{model_path} has no fixed input size and no {META_FILE} to say which to use")
        image_size = (int(in_shape[1]), int(in_shape[2]))
    source = shown or str(spec)
    return Classifier(model=model, class_names=class_names, image_size=image_size, meta=meta, source=source)


def is_export(path: Path) -> bool:
    """Is ``path`` something `cvtool export` wrote (an artefact, or the folder holding ``export.json``)?"""
    from cvtool.runtimes import runtime_of

    if path.is_file():
        return runtime_of(path) != "tf"
    if (path / EXPORT_META).is_file() and not (path / META_FILE).exists():
        return True  # an export folder
    return (path / "saved_model.pb").is_file() and (path.parent / EXPORT_META).is_file()


def read_export_meta(folder: str | os.PathLike) -> dict:
    """``folder/export.json`` (what `cvtool export` wrote there), checked; a missing or bad file is exit 3."""
    path = Path(folder) / EXPORT_META
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UnusableError(
            f"{path} is missing or unreadable ({exc.__class__.__name__}): an exported model needs the "
            f"{EXPORT_META} and {LABELS_FILE} that `cvtool export` writes beside it"
        ) from None
    size = meta.get("image_size") if isinstance(meta, dict) else None
    if not (isinstance(size, list) and len(size) == 2 and all(isinstance(v, int) and v > 0 for v in size)):
        raise UnusableError(f"{path}: image_size must be [height, width]")
    if not isinstance(meta.get("artefacts"), dict):
        raise UnusableError(f"{path} lists no artefacts")
    return meta


def read_labels(folder: str | os.PathLike) -> list[str]:
    """The class names of an export, one a line in output order (``labels.txt``)."""
    path = Path(folder) / LABELS_FILE
    try:
        names = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise UnusableError(
            f"{path} is missing or unreadable ({exc.__class__.__name__}): re-run cvtool export"
        ) from None
    if not names:
        raise UnusableError(f"{path} lists no classes")
    return names


def _fresh(folder: Path, name: str, run_dir: Path | None) -> bool:
    """Was ``folder/name`` exported from the run's model as it is now? (True for an export without its run.)"""
    from cvtool.jobs import model_fingerprint

    try:
        entry = read_export_meta(folder)["artefacts"].get(name) or {}
    except UnusableError:
        return False
    recorded = entry.get("source_fingerprint")
    return run_dir is None or recorded is None or recorded == model_fingerprint(run_dir)


def choose_export(spec: str | os.PathLike, runtime: str = "auto") -> Path | None:
    """The exported artefact that runs MODEL ``spec`` on ``runtime``, or None for the Keras model.

    - An artefact given as MODEL is itself (its runtime must be ``runtime`` or ``auto``).
    - An export folder, or a run directory with ``export/``: ``tflite``/``onnx``/``tf`` take that runtime's
      artefact (a missing one is a usage error that says how to export it); ``auto`` takes the first fresh
      float artefact in :data:`AUTO_ORDER` whose runtime is installed, else (a run) the Keras model.
    - A run without exports: the Keras model for ``auto`` and ``tf``.

    An export whose recorded model fingerprint differs from the run's ``model.keras`` (retrained since) is stale:
    ``auto`` passes over it, an explicit runtime refuses it (exit 3).

    Args:
        spec: the MODEL argument.
        runtime: ``auto``, ``tf``, ``tflite`` or ``onnx``.

    Example: ``choose_export("runs/clothes", "tflite")`` is ``runs/clothes/export/model.tflite``.
    """
    from cvtool.runtimes import available, runtime_of

    path = Path(spec)
    if not path.exists():
        return None  # resolve_model_path says so
    if path.is_file() or (path / "saved_model.pb").is_file():
        if not is_export(path):
            if runtime not in ("auto", "tf"):
                raise UsageError(
                    f"{path} is a Keras model, which runs on TensorFlow; for --runtime {runtime} give its run "
                    f"directory after `cvtool export RUN --format {runtime}`, or the exported file"
                )
            return None
        own = runtime_of(path)
        if runtime not in ("auto", own):
            raise UsageError(f"{path} is a {own} model: it runs with --runtime {own} (or auto), not {runtime}")
        return path
    run_dir = path if (path / META_FILE).is_file() else None
    folder = path / EXPORT_DIR if run_dir is not None else path
    if run_dir is None and not is_export(path):
        return None  # not a run directory: resolve_model_path says what it is
    if runtime == "auto":
        if not (folder / EXPORT_META).is_file():
            return None
        listed = read_export_meta(folder)["artefacts"]
        order = AUTO_ORDER if run_dir is not None else (*AUTO_ORDER, "tf")
        for name in order:
            entry = listed.get(EXPORT_FILES[name]) or {}
            candidate = folder / EXPORT_FILES[name]
            usable = candidate.exists() and not entry.get("int8") and available(name)
            if usable and _fresh(folder, candidate.name, run_dir):
                return candidate
        if run_dir is None:
            raise UnusableError(f"{folder} holds no float artefact listed in its {EXPORT_META}")
        return None
    if runtime == "tf" and run_dir is not None:
        return None  # the Keras model itself
    candidate = folder / EXPORT_FILES[runtime]
    if not candidate.exists():
        where = run_dir if run_dir is not None else folder
        raise UsageError(
            f"{where} has no {runtime} export ({candidate} not found): run `cvtool export {where} --format "
            f"{'saved_model' if runtime == 'tf' else runtime}` first, or use --runtime auto"
        )
    if not _fresh(folder, candidate.name, run_dir):
        raise UnusableError(
            f"{candidate} was exported from an earlier model of {run_dir}: re-run `cvtool export {run_dir} "
            f"--format {runtime} --overwrite`"
        )
    return candidate


def load_exported(path: str | os.PathLike, source: str = "") -> Classifier:
    """A classifier over an exported artefact, run in its runtime (no TensorFlow for tflite and onnx).

    Class names come from ``labels.txt`` and the input size from ``export.json`` beside the artefact.

    Args:
        path: ``model.tflite``, ``model.onnx`` or a ``saved_model/`` folder written by `cvtool export`.
        source: the MODEL argument, for messages and job fingerprints.

    Example: ``load_exported("runs/clothes/export/model.tflite").predict(images)``.
    """
    from cvtool.runtimes import RUNTIMES, runtime_of

    path = Path(path)
    folder = path.parent
    meta = read_export_meta(folder)
    entry = meta["artefacts"].get(path.name)
    if entry is None:
        raise UnusableError(f"{path} is not listed in {folder / EXPORT_META}: re-run cvtool export")
    class_names = read_labels(folder)
    runtime = runtime_of(path)
    run = RUNTIMES.get(runtime)(path)
    outputs = getattr(run, "output_shape", (-1, len(class_names)))
    if outputs[-1] not in (-1, len(class_names)):
        raise UnusableError(f"{folder / LABELS_FILE} lists {len(class_names)} classes but {path} outputs {outputs[-1]}")
    size = (int(meta["image_size"][0]), int(meta["image_size"][1]))
    info = {
        "class_names": class_names,
        "image_size": list(size),
        "artefact": str(path),
        "runtime": runtime,
        "export": entry,
        **({"wnids": meta["wnids"]} if isinstance(meta.get("wnids"), list) else {}),
    }
    return Classifier(None, class_names, size, info, source or str(path), runtime=runtime, runner=run)
