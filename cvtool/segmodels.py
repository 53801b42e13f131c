"""Loading segmentation models and calling them: TF-Hub handles, SavedModel folders, .keras files.

Hub handles and local SavedModel folders both go through ``hub.load`` (which
honours ``TFHUB_CACHE_DIR``); ``.keras`` files go through the one Keras loading
path, :func:`cvtool.bundle.load_keras_model`. A loaded model is called through
its ``predict`` method (as the HRNet module has), itself if it is callable, or
its ``serving_default`` signature, in that order.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

import cvtool.runtime  # noqa: F401 - quiet TensorFlow import
from cvtool.classmap import DEFAULT_MODEL
from cvtool.errors import UnusableError, UsageError, first_line

KERAS_SUFFIXES = (".keras", ".h5", ".hdf5")


@dataclass
class SegmentationModel:
    """A loaded model: ``run(float batch [B,H,W,3])`` returns its raw output as a NumPy array."""

    call: Callable[[Any], Any]
    source: str
    how: str  # "predict", "__call__", "serving_default" or "keras"
    input_size: tuple[int, int] | None = None  # fixed (height, width) the model demands, if any
    input_dtype: str = "float32"
    # The loaded object behind ``call``. A restored SavedModel's functions and signatures hold its
    # variables only weakly; the object owns them, so it lives as long as ``call`` is used.
    owner: Any = field(default=None, repr=False)

    def run(self, batch: np.ndarray) -> np.ndarray:
        from cvtool.runtime import tf

        try:
            out = self.call(tf.convert_to_tensor(batch, dtype=self.input_dtype))
        except (tf.errors.ResourceExhaustedError, MemoryError):
            raise UnusableError(
                f"out of memory running {self.source} on a batch of shape {list(batch.shape)}; "
                "lower --batch-size or --max-side"
            ) from None
        except (tf.errors.OpError, TypeError, ValueError) as exc:
            raise UnusableError(
                f"model {self.source} failed on a batch of shape {list(batch.shape)}: {first_line(exc)}"
                " (if it needs a fixed input size, pass --input-size HxW)"
            ) from None
        return _to_array(out, self.source)


def load_segmentation_model(spec: str | os.PathLike = DEFAULT_MODEL, unsafe: bool = False) -> SegmentationModel:
    """Load a hub handle, a local SavedModel folder or a Keras file."""
    from cvtool.storage import READ_ONLY_SCHEMES, fetch, local_path, scheme

    spec = str(local_path(str(spec)))
    if "://" in spec and scheme(spec) not in READ_ONLY_SCHEMES:
        spec = fetch(spec, "models")  # s3://, gs://, az://: a SavedModel folder or .keras file, cached locally
    if "://" in spec:
        return _from_hub_object(_hub_load(spec, remote=True), spec)
    path = Path(spec)
    if not path.exists():
        raise UsageError(f"model not found: {path} (give a TF-Hub handle, a SavedModel folder or a .keras file)")
    if path.is_file():
        if path.suffix.lower() not in KERAS_SUFFIXES:
            raise UnusableError(f"{path} is not a .keras model file nor a SavedModel folder")
        return _from_keras(path, unsafe)
    if not (path / "saved_model.pb").exists() and not (path / "saved_model.pbtxt").exists():
        raise UnusableError(f"{path} is not a SavedModel folder (no saved_model.pb); if it is an archive, extract it")
    return _from_hub_object(_hub_load(str(path), remote=False), str(path))


def _hub_load(handle: str, remote: bool):
    from cvtool.bundle import load_hub_model

    if remote:
        return load_hub_model(handle, REMOTE_HINT)
    return load_hub_model(handle, "is it a SavedModel folder (with saved_model.pb)?")


REMOTE_HINT = (
    "without network, download the model archive on another machine (the handle URL plus "
    "?tf-hub-format=compressed, or from Kaggle Models), extract it and pass the folder with --model, "
    "or point TFHUB_CACHE_DIR at a cache that holds it"
)


def _from_hub_object(obj, source: str) -> SegmentationModel:
    predict = getattr(obj, "predict", None)
    if callable(predict):
        model = _from_function(predict, source, "predict")
    elif callable(obj):
        model = _from_function(obj, source, "__call__")
    elif "serving_default" in (getattr(obj, "signatures", None) or {}):
        model = _from_signature(obj.signatures["serving_default"], source)
    else:
        raise UnusableError(
            f"{source} has nothing to call: no predict method, no __call__ and no serving_default signature"
        )
    model.owner = obj
    return model


def _from_function(fn, source: str, how: str) -> SegmentationModel:
    traced = fn if how == "predict" else getattr(fn, "__call__", None)  # noqa: B004 - its traced signatures
    specs = []
    for concrete in getattr(traced, "concrete_functions", None) or []:
        args = concrete.structured_input_signature[0]
        if args and hasattr(args[0], "shape"):
            specs.append(args[0])
    size, dtype = _size_and_dtype(specs[0]) if len(specs) == 1 else (None, "float32")
    return SegmentationModel(fn, source, how, size, dtype)


def _from_signature(signature, source: str) -> SegmentationModel:
    inputs = signature.structured_input_signature[1]
    if len(inputs) != 1:
        raise UnusableError(
            f"{source}: serving_default takes {len(inputs)} inputs ({', '.join(inputs)}); one image batch is needed"
        )
    ((name, spec),) = inputs.items()
    size, dtype = _size_and_dtype(spec)
    return SegmentationModel(lambda x: signature(**{name: x}), source, "serving_default", size, dtype)


def _from_keras(path: Path, unsafe: bool) -> SegmentationModel:
    from cvtool.bundle import load_keras_model
    from cvtool.runtime import tf

    model = load_keras_model(path, unsafe=unsafe)
    try:
        in_shape = tuple(model.inputs[0].shape)
    except (AttributeError, IndexError, TypeError):
        raise UnusableError(f"{path} is not a single-input Keras model") from None
    if len(in_shape) != 4 or in_shape[-1] != 3:
        raise UnusableError(f"{path} does not take RGB images [batch, height, width, 3] (input shape {in_shape})")
    size = (int(in_shape[1]), int(in_shape[2])) if in_shape[1] and in_shape[2] else None
    forward = tf.function(lambda x: model(x, training=False), reduce_retracing=True)
    return SegmentationModel(forward, str(path), "keras", size)


def _size_and_dtype(spec) -> tuple[tuple[int, int] | None, str]:
    shape = list(spec.shape) if spec.shape.rank is not None else []
    size = (int(shape[1]), int(shape[2])) if len(shape) == 4 and shape[1] and shape[2] else None
    return size, spec.dtype.name


def _to_array(out, source: str) -> np.ndarray:
    """The model's output tensor: a dict or list with one image-shaped output is unwrapped."""
    if isinstance(out, dict):
        candidates = [v for v in out.values() if len(getattr(v, "shape", ())) in (3, 4)]
        if len(candidates) != 1:
            raise UnusableError(
                f"{source} returns {len(out)} outputs ({', '.join(out)}); cannot tell which is the mask"
            )
        out = candidates[0]
    elif isinstance(out, (list, tuple)):
        if not out:
            raise UnusableError(f"{source} returned nothing")
        out = out[0]
    return np.asarray(out)
