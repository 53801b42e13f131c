"""Inference runtimes for exported models: TensorFlow (SavedModel), LiteRT (TFLite) and onnxruntime.

Each runtime is one entry of :data:`RUNTIMES` (``--runtime``): a loader that opens an exported
artefact and returns a :class:`Runner`, a callable from uint8 RGB images ``[N, H, W, 3]`` to
float32 probabilities ``[N, C]``. The LiteRT and onnxruntime loaders import neither TensorFlow nor
anything of Keras, so a predict on a ``.tflite`` or ``.onnx`` model starts in a fraction of the time
TensorFlow's import takes. This module imports no runtime itself (``--help`` reads the table).

Example::

    run = RUNTIMES.get("tflite")("runs/clothes/export/model.tflite")
    probs = run(images)  # [N, C] float32
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np

from cvtool.errors import UnusableError, UsageError, first_line
from cvtool.progress import quiet_stderr
from cvtool.registry import Registry

AUTO = "auto"
RUNTIME_ENV = "CVTOOL_RUNTIME"
EXTRA_HINT = 'pip install "cvtool[export]"'

RUNTIMES = Registry("--runtime")

# A runner maps uint8 RGB images [N, H, W, 3] to float32 probabilities [N, C].
Runner = Callable[[np.ndarray], np.ndarray]


def runtime_choices() -> tuple[str, ...]:
    """``auto`` and every registered runtime, as ``--runtime`` accepts them."""
    return (AUTO, *RUNTIMES.names())


def check_runtime(name: str) -> str:
    """``name`` if it is ``auto`` or a registered runtime, else a usage error (exit 2) listing the choices.

    Args:
        name: the ``--runtime`` given.

    Example: ``check_runtime("onnx")``.
    """
    if name != AUTO:
        RUNTIMES.entry(name)
    return name


def available(name: str) -> bool:
    """Is the Python package of runtime ``name`` installed? (Looked up, not imported: no start-up cost.)"""
    try:
        return importlib.util.find_spec(RUNTIMES.entry(name).info["package"]) is not None
    except (ImportError, ValueError):
        return False


def runtime_of(path: str | os.PathLike) -> str:
    """The runtime that runs the exported artefact ``path``: by suffix, or ``tf`` for a SavedModel folder."""
    path = Path(path)
    for name in RUNTIMES:
        suffix = RUNTIMES.entry(name).info["suffix"]
        if suffix and path.name.endswith(suffix):
            return name
    return "tf"


def _import(module: str, runtime: str):
    try:
        return importlib.import_module(module)
    except ImportError:
        dist = RUNTIMES.entry(runtime).info["dist"]
        raise UsageError(f"--runtime {runtime} needs the {dist} package: {EXTRA_HINT}") from None


def _threads() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _unusable(path: Path, runtime: str, exc: BaseException) -> UnusableError:
    return UnusableError(f"cannot load {path} with {runtime}: {type(exc).__name__}: {first_line(str(exc))[:200]}")


def _as_input(images: np.ndarray, dtype, quantization: tuple[float, int]) -> np.ndarray:
    """Pixels in the artefact's input type: float32 as they are, uint8/int8 through its scale and zero point."""
    if np.issubdtype(dtype, np.floating):
        return images.astype(dtype, copy=False)
    scale, zero = quantization
    x = images.astype(np.float32)
    if scale:
        x = np.round(x / scale + zero)
    info = np.iinfo(dtype)
    return np.clip(x, info.min, info.max).astype(dtype)


def _as_probs(y: np.ndarray, quantization: tuple[float, int]) -> np.ndarray:
    scale, zero = quantization
    if np.issubdtype(y.dtype, np.integer) and scale:
        return ((y.astype(np.float32) - zero) * scale).astype(np.float32)
    return np.asarray(y, dtype=np.float32)


@RUNTIMES.register(
    "tf",
    help="TensorFlow: the Keras model, or an exported SavedModel",
    suffix="",
    package="tensorflow",
    dist="tensorflow",
)
def load_saved_model(path: str | os.PathLike) -> Runner:
    """A SavedModel folder's ``serving_default`` signature (as TF Serving calls it).

    Args:
        path: the SavedModel folder.

    Example: ``load_saved_model("runs/clothes/export/saved_model")(images)``.
    """
    from cvtool.runtime import tf

    path = Path(path)
    try:
        loaded = tf.saved_model.load(str(path))
        serve = loaded.signatures["serving_default"]
        name = next(iter(serve.structured_input_signature[1]))
    except Exception as exc:  # noqa: BLE001 - not a SavedModel, no serving signature...
        raise _unusable(path, "tf", exc) from None

    def run(images: np.ndarray) -> np.ndarray:
        out = serve(**{name: tf.convert_to_tensor(images, tf.float32)})
        return np.asarray(next(iter(out.values())), dtype=np.float32)

    run.keep = loaded  # the signature holds the variables only weakly
    return run


@RUNTIMES.register(
    "tflite",
    help="LiteRT interpreter with XNNPACK (ai-edge-litert)",
    suffix=".tflite",
    package="ai_edge_litert",
    dist="ai-edge-litert",
)
def load_tflite(path: str | os.PathLike) -> Runner:
    """A ``.tflite`` file in the standalone LiteRT interpreter (no TensorFlow import), all CPU cores.

    Float inputs get the pixels as float32; a full-integer (``--int8``) model gets them through its
    input's scale and zero point, and its quantized output is turned back into probabilities.

    Args:
        path: the ``.tflite`` file.

    Example: ``load_tflite("runs/clothes/export/model.tflite")(images)``.
    """
    path = Path(path)
    interpreter_module = _import("ai_edge_litert.interpreter", "tflite")
    try:
        with quiet_stderr():
            interpreter = interpreter_module.Interpreter(model_path=str(path), num_threads=_threads())
        inp, out = interpreter.get_input_details()[0], interpreter.get_output_details()[0]
    except Exception as exc:  # noqa: BLE001 - not a flatbuffer, truncated file...
        raise _unusable(path, "tflite", exc) from None
    state = {"batch": None}

    def run(images: np.ndarray) -> np.ndarray:
        n = len(images)
        if state["batch"] != n:  # the batch size is the one dynamic dimension: resize once per size
            interpreter.resize_tensor_input(inp["index"], [n, *images.shape[1:]])
            with quiet_stderr():
                interpreter.allocate_tensors()
            state["batch"] = n
        interpreter.set_tensor(inp["index"], _as_input(images, inp["dtype"], inp["quantization"]))
        interpreter.invoke()
        return _as_probs(interpreter.get_tensor(out["index"]), out["quantization"])

    run.input_shape = tuple(int(d) for d in inp["shape_signature"])
    run.output_shape = tuple(int(d) for d in out["shape_signature"])
    return run


@RUNTIMES.register("onnx", help="onnxruntime on the CPU", suffix=".onnx", package="onnxruntime", dist="onnxruntime")
def load_onnx(path: str | os.PathLike) -> Runner:
    """An ``.onnx`` file in onnxruntime (CPU execution provider; no TensorFlow import).

    Args:
        path: the ``.onnx`` file.

    Example: ``load_onnx("runs/clothes/export/model.onnx")(images)``.
    """
    path = Path(path)
    ort = _import("onnxruntime", "onnx")
    try:
        options = ort.SessionOptions()
        options.log_severity_level = 3  # errors only
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        inp, out = session.get_inputs()[0], session.get_outputs()[0]
    except Exception as exc:  # noqa: BLE001 - protobuf parse errors, invalid graphs...
        raise _unusable(path, "onnx", exc) from None
    dtype = np.uint8 if inp.type == "tensor(uint8)" else np.float32

    def run(images: np.ndarray) -> np.ndarray:
        return np.asarray(session.run([out.name], {inp.name: images.astype(dtype, copy=False)})[0], np.float32)

    run.input_shape = tuple(d if isinstance(d, int) else -1 for d in inp.shape)
    run.output_shape = tuple(d if isinstance(d, int) else -1 for d in out.shape)
    return run
