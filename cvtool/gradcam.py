"""`cvtool gradcam`: heatmap overlays that show where a classifier looked, for every image under INPUT.

Outputs mirror INPUT's relative paths under DIR: ``sub/img.jpg`` gives
``DIR/sub/img.gradcam.jpg`` (``img.top2.gradcam.jpg`` ... with ``top_k`` > 1),
optionally ``img.heatmap.png`` (8-bit grayscale at the input's size) and
``img.heatmap.npy`` (float32 in [0, 1]); ``DIR/gradcam.csv`` indexes them
(``path,class,score,output``) and ``DIR/errors.csv`` lists inputs that failed.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path

import numpy as np

from cvtool import heatmaps
from cvtool.batches import default_workers
from cvtool.bundle import Classifier, load_classifier
from cvtool.cam import DEFAULT_METHOD, CamModel, get_method
from cvtool.engines import EngineSettings, engine_batches
from cvtool.errors import UsageError
from cvtool.images import InputItem, list_images, load_with_original
from cvtool.jobs import BatchJob, RunResult, Shard, model_fingerprint, remove_stale_temps
from cvtool.locks import holds_output_lock
from cvtool.outputs import format_score, path_cell, write_bytes_atomic
from cvtool.progress import Progress, info, warn
from cvtool.runtimes import check_runtime, runtime_of
from cvtool.storage import stages_output

INDEX_FILE = "gradcam.csv"
ERRORS_FILE = "errors.csv"
INDEX_HEADER = ("path", "class", "score", "output")


@dataclass(frozen=True)
class Rendering:
    """How maps become files: colour map, heatmap weight, layout, format, extra raw outputs."""

    cmap: int
    alpha: float = 0.5
    layout: str = "overlay"
    fmt: str = "jpg"
    save_heatmap: bool = False
    npy: bool = False


def output_bases(items: Sequence[InputItem]) -> dict[str, str]:
    """Relative output name without suffixes per input: ``sub/img.jpg`` -> ``sub/img``.

    Inputs that would collide (``a.jpg`` and ``a.png`` in one folder) keep
    their full file name instead: ``sub/a.jpg``, ``sub/a.png``.
    """
    stems: dict[str, int] = {}
    for item in items:
        key = str(Path(item.rel).with_suffix(""))
        stems[key] = stems.get(key, 0) + 1
    bases = {}
    for item in items:
        key = str(Path(item.rel).with_suffix(""))
        bases[item.rel] = Path(key).as_posix() if stems[key] == 1 else item.rel
    return bases


def output_names(base: str, rank: int, k: int, opts: Rendering) -> dict[str, str]:
    """Relative names of the files written for one map (rank counts from 1)."""
    stem = f"{base}.top{rank}" if k > 1 else base
    names = {"image": f"{stem}.gradcam.{opts.fmt}"}
    if opts.save_heatmap:
        names["heatmap"] = f"{stem}.heatmap.png"
    if opts.npy:
        names["npy"] = f"{stem}.heatmap.npy"
    return names


def render_maps(image: np.ndarray, maps: np.ndarray, labels: Sequence[str], opts: Rendering) -> list[dict[str, bytes]]:
    """The encoded files of one image's K maps, per rank: ``{"image": ..., "heatmap": ..., "npy": ...}`` (as
    ``opts`` asks), each map resized to the image's own size."""
    size = image.shape[:2]
    pictures = []
    for cam, label in zip(maps, labels):
        heat = heatmaps.resize_map(cam, size)
        picture = heatmaps.render(image, heat, label, opts.cmap, opts.alpha, opts.layout)
        files = {"image": heatmaps.encode(picture, opts.fmt)}
        if opts.save_heatmap:
            files["heatmap"] = heatmaps.encode_gray_png(heatmaps.to_gray(heat))
        if opts.npy:
            buf = BytesIO()
            np.save(buf, heat.astype(np.float32))
            files["npy"] = buf.getvalue()
        pictures.append(files)
    return pictures


def write_maps(out_dir: Path, base: str, pictures: Sequence[dict[str, bytes]], opts: Rendering) -> list[str]:
    """Write one image's rendered maps (:func:`render_maps`) atomically; returns the overlay names (relative
    to ``out_dir``)."""
    written = []
    for rank, files in enumerate(pictures, start=1):
        names = output_names(base, rank, len(pictures), opts)
        for kind, data in files.items():
            write_bytes_atomic(out_dir / names[kind], data)
        written.append(names["image"])
    return written


@dataclass
class Explained:
    """One image's Grad-CAM: its K target classes and their scores, and per rank its files, rendered and
    encoded (:func:`render_maps`); or why they could not be (``error``: the input fails)."""

    classes: np.ndarray
    scores: np.ndarray
    pictures: list[dict[str, bytes]]
    error: str = ""
    empty: int = 0  # of its K maps, those with no positive evidence anywhere (all zero)


@dataclass
class GradcamWork:
    """Grad-CAM's per-batch work on every engine (:class:`cvtool.engines.Work`): one gradient tape over the
    batch (:class:`~cvtool.cam.CamModel`), then each image's pictures rendered and encoded (threads: OpenCV
    releases the GIL). Locally in this process; on Ray in the model replicas, which also spread the rendering.

    Example: ``GradcamWork(classifier, rendering, cams=CamModel(classifier)).run(payloads)``.
    """

    classifier: Classifier
    opts: Rendering
    layer: str | None = None
    method: str = DEFAULT_METHOD
    fixed: int | None = None  # the --class index; None: each image's top-k classes
    top_k: int = 1
    cams: CamModel | None = None

    key = None  # every image is resized to the model's size

    def decode(self, item: InputItem):
        # The overlay keeps the input's full size; the model sees exactly predict's pixels.
        return load_with_original(item.path, self.classifier.image_size)

    def run(self, payloads: Sequence) -> list[Explained]:
        inputs = np.stack([p[1] for p in payloads])
        classes = None if self.fixed is None else np.full((len(inputs), 1), self.fixed, np.int32)
        result = self.cams.compute(inputs, classes, top_k=self.top_k)
        names = self.classifier.class_names

        def render(i: int) -> Explained:
            empty = int((result.maps[i].reshape(len(result.maps[i]), -1).max(axis=1) <= 0).sum())
            explained = Explained(result.classes[i], result.scores[i], [], empty=empty)
            labels = [heatmaps.label_text(names[c], s) for c, s in zip(result.classes[i], result.scores[i])]
            try:
                explained.pictures = render_maps(payloads[i][0], result.maps[i], labels, self.opts)
            except Exception as exc:  # noqa: BLE001 - OpenCV, memory: one input fails
                explained.error = output_failure(exc)
            return explained

        with ThreadPoolExecutor(max_workers=default_workers(), thread_name_prefix="cvtool-render") as pool:
            return list(pool.map(render, range(len(payloads))))

    def join(self, results: list[Explained]) -> list[Explained]:
        return results

    def portable(self) -> GradcamWork:
        return dataclasses.replace(self, classifier=self.classifier.without_model(), cams=None)

    def loaded(self) -> GradcamWork:
        classifier = self.classifier.reload()
        return dataclasses.replace(self, classifier=classifier, cams=CamModel(classifier, self.layer, self.method))

    def decode_bytes(self) -> int:
        h, w = self.classifier.image_size
        return 3 * h * w + 3 * 4096 * 3072  # the model's input and an original of up to 12 megapixels


def output_failure(exc: BaseException) -> str:
    """The errors-file reason of an input whose pictures could not be rendered or written."""
    return f"cannot write output: {type(exc).__name__}: {' '.join(str(exc).split())[:200]}"


@stages_output("out", folder=True)
@holds_output_lock("out", folder=True)
def gradcam(
    model: str | Path | Classifier,
    input: str | Path,
    out: str | Path,
    *,
    layer: str | None = None,
    method: str = DEFAULT_METHOD,
    class_name: str | None = None,
    top_k: int = 1,
    colormap: str = "jet",
    alpha: float = 0.5,
    layout: str = "overlay",
    fmt: str = "jpg",
    save_heatmap: bool = False,
    npy: bool = False,
    batch_size: int = 32,
    overwrite: bool = False,
    quiet: bool = False,
    unsafe_load: bool = False,
    weights: str | Path | None = None,
    runtime: str = "auto",
    resume: bool = False,
    shard: str | Shard | None = None,
    engine: str | EngineSettings | None = None,
) -> RunResult:
    """Write a Grad-CAM picture per image (per target class) under ``out``, plus the index and errors CSVs.

    Target class: each image's top-1 class, its ``top_k`` classes, or the fixed
    ``class_name``. Pictures have the input image's own size. Each picture is
    written (atomically) before its index rows, so ``resume`` continues an
    interrupted run from the index; ``shard`` ("K/N") does only that share of INPUT.
    Grad-CAM needs gradients: only the TensorFlow runtime has them (``runtime`` ``auto`` or ``tf``;
    ``auto`` always means the Keras model here). ``engine`` (``local``, ``ray``; None: ``$CVTOOL_ENGINE``)
    says where the maps are computed and rendered (:mod:`cvtool.engines`); this process writes them.
    """
    check_runtime(runtime)
    kind = model.runtime if isinstance(model, Classifier) else runtime_of(model)  # a .tflite/.onnx file: theirs
    if runtime not in ("auto", "tf") or kind != "tf" or (isinstance(model, Classifier) and model.model is None):
        given = f"an exported {kind} model" if runtime in ("auto", "tf") else f"--runtime {runtime}"
        raise UsageError(
            "Grad-CAM needs gradients, which only the TensorFlow runtime computes: give the run directory or its "
            f".keras model with --runtime tf (or auto), not {given}"
        )
    opts = Rendering(heatmaps.check_options(colormap, alpha, layout, fmt), alpha, layout, fmt, save_heatmap, npy)
    get_method(method)
    if top_k < 1:
        raise UsageError("--top-k must be at least 1")
    if class_name is not None and top_k > 1:
        raise UsageError("--class and --top-k > 1 cannot be combined: --class gives one map per image")
    out_dir = Path(out)  # a file there is refused by the output lock, before anything else
    job = BatchJob(
        out_dir / INDEX_FILE, overwrite, resume, shard, errors=out_dir / ERRORS_FILE, grouped=True, lock=out_dir
    )  # refuses early
    items = list_images(input, exclude=out_dir)
    if not items:
        warn(f"no images found in {input}")
    classifier = (
        model
        if isinstance(model, Classifier)
        else load_classifier(model, unsafe=unsafe_load, weights=weights, runtime="tf")
    )
    names = classifier.class_names
    fixed = None
    if class_name is not None:
        if class_name not in names:
            raise UsageError(f"--class {class_name!r} is not one of the model's classes: {', '.join(names)}")
        fixed = names.index(class_name)
    cams = CamModel(classifier, layer, method)
    info(f"target layer {cams.layer_name}, method {cams.method_name}", quiet)
    k = 1 if fixed is not None else min(top_k, classifier.num_classes)
    bases = output_bases(items)
    identity = {
        "command": "gradcam",
        "model": model_fingerprint(classifier),
        "settings": {
            "layer": cams.layer_name,
            "method": cams.method_name,
            "class": class_name,
            "top_k": k,
            **dataclasses.asdict(opts),
        },
    }
    todo = job.open(items, INDEX_HEADER, identity)
    if resume:
        remove_stale_temps(out_dir)
    if not overwrite and not resume:
        _refuse_existing(out_dir, {item.rel: bases[item.rel] for item in todo}, k, opts)

    work = GradcamWork(classifier, opts, cams.layer_name, cams.method_name, fixed, k, cams)
    empty = maps = 0
    with job, Progress(len(todo), "gradcam", quiet) as progress:
        for batch, explained in engine_batches(work, todo, batch_size, engine):
            job.fail_all(batch.failures)
            for item, e in zip(batch.items, explained):
                if not e.error:
                    try:
                        written = write_maps(out_dir, bases[item.rel], e.pictures, opts)
                    except Exception as exc:  # noqa: BLE001 - disk full, permissions: one input fails
                        e.error = output_failure(exc)
                if e.error:
                    job.fail(item.rel, e.error)
                    continue
                empty, maps = empty + e.empty, maps + len(e.classes)
                rows = zip(e.classes, e.scores, written)
                job.write_group([[item.rel, names[c], format_score(s), path_cell(name)] for c, s, name in rows])
            job.flush()
            progress.update(len(batch.items) + len(batch.failures))
    if empty:
        warn(empty_maps_warning(empty, maps, cams.layer_name, cams.method_name))
    return RunResult(job.processed, job.failed, job.out, job.errors)


def empty_maps_warning(empty: int, maps: int, layer: str, method: str) -> str:
    """A map of zeros is what the method defines when the class's weighted evidence at the layer is nowhere
    positive (the ReLU of Grad-CAM); the overlay then shows nothing, so the run says how many."""
    other = "gradcam" if method == "gradcam++" else "gradcam++"
    return (
        f"{empty} of {maps} maps are empty: {method} found no positive evidence for the class at layer {layer} "
        f"(their overlays show no heat); another --method ({other}) or an earlier --layer may show more"
    )


def _refuse_existing(out_dir: Path, bases: dict[str, str], k: int, opts: Rendering) -> None:
    for base in bases.values():
        for rank in range(1, k + 1):
            for name in output_names(base, rank, k, opts).values():
                if (out_dir / name).exists():
                    raise UsageError(f"{out_dir / name} already exists; pass --overwrite to replace it")


__all__ = [
    "gradcam",
    "GradcamWork",
    "output_bases",
    "output_names",
    "render_maps",
    "write_maps",
    "Rendering",
    "INDEX_FILE",
    "ERRORS_FILE",
]
