"""`cvtool segment`: per-pixel class masks, colour masks, overlays, a legend and pixel counts.

For every image under INPUT, mirrored under the output folder::

    <name>.mask.png     8-bit class ids (a palette PNG: shows in colour, values stay ids)
    <name>.color.png    the mask in the class colours
    <name>.overlay.jpg  image + alpha * colour mask

and once per run ``legend.png``, ``pixels.csv`` (path,class,pixels,fraction)
and ``errors.csv``. Images of one size are batched together; each mask has
its input's own size.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
from PIL import Image

from cvtool.bundle import absolute_spec
from cvtool.classmap import BACKGROUND_ID, DEFAULT_MODEL, ClassMap, camvid, numbered, read_class_file
from cvtool.engines import EngineSettings, engine_batches
from cvtool.errors import UnusableError, UsageError
from cvtool.fonts import text_fonts
from cvtool.images import InputItem, list_images, load_with_original
from cvtool.jobs import BatchJob, RunResult, Shard, file_digest, model_fingerprint, remove_stale_temps
from cvtool.locks import holds_output_lock
from cvtool.outputs import encode_image, save_figure, write_bytes_atomic
from cvtool.progress import Progress, warn
from cvtool.segmodels import SegmentationModel, load_segmentation_model
from cvtool.storage import stages_output

INPUT_RANGES = {"0-1": (1 / 255.0, 0.0), "0-255": (1.0, 0.0), "-1-1": (2 / 255.0, -1.0)}
OVERLAY_FORMATS = ("jpg", "png")
PIXELS_HEADER = ("path", "class", "pixels", "fraction")
RUN_FILES = ("pixels.csv", "legend.png", "errors.csv")
LEGEND_ALL_UP_TO = 64  # larger class maps list only the classes that occur


@dataclass
class SegmentConfig:
    """What `cvtool segment` does; the defaults are the CLI's defaults."""

    model: str = DEFAULT_MODEL
    classes: str | Path | None = None  # JSON or CSV class file; None: built-in CamVid or numbered
    input_range: str = "0-1"
    input_size: tuple[int, int] | None = None  # (height, width) for fixed-size models
    max_side: int = 1024  # longer side above this is downscaled before the model; 0: never
    drop_background: bool | None = None  # None: drop the model's extra background channel
    alpha: float = 0.6
    overlay_format: str = "jpg"
    batch_size: int = 4
    unsafe_load: bool = False


class Labeller:
    """Turns raw model outputs into uint8 masks of class ids, deciding the class map on the first batch.

    Scores or logits [B,H,W,C] are arg-maxed: with C = N + 1 for N classes,
    channel 0 is the model's own background class, dropped (arg-max over the
    rest) or kept as id 255. A single float channel is the probability of
    class 1 (threshold 0.5). Maps [B,H,W] or integer [B,H,W,1] are class ids.
    """

    def __init__(self, classes: ClassMap | None, drop_background: bool | None):
        self.given = classes
        self.drop_background = drop_background
        self.classes: ClassMap | None = None
        self._lut: np.ndarray | None = None  # model index -> mask id; None for id maps
        self._skip_first = False

    def __call__(self, out: np.ndarray, batch: int, source: str) -> np.ndarray:
        scores = self._scores(out, batch, source)
        if self.classes is None:
            self._resolve(scores, source)
        if scores is None:
            ids = np.rint(out.reshape(out.shape[:3])).astype(np.int64)
            if ids.size and (ids.min() < 0 or ids.max() > 255):
                raise UnusableError(f"{source} outputs class ids outside 0-255; an 8-bit mask cannot hold them")
            return ids.astype(np.uint8)
        if scores.shape[-1] != self._channels:
            raise UnusableError(f"{source} changed its number of output classes between batches")
        index = np.argmax(scores[..., 1:] if self._skip_first else scores, axis=-1)
        return self._lut[index]

    def _scores(self, out: np.ndarray, batch: int, source: str) -> np.ndarray | None:
        if out.ndim not in (3, 4) or out.shape[0] != batch:
            raise UnusableError(
                f"{source} output has shape {list(out.shape)}; expected [batch, height, width, classes] "
                "scores or a [batch, height, width] map of class ids"
            )
        if out.ndim == 3 or (np.issubdtype(out.dtype, np.integer) and out.shape[-1] == 1):
            return None
        if out.shape[-1] == 1:  # one float channel: probability of class 1
            p = out[..., 0]
            return np.stack([1.0 - p, p], axis=-1)
        return out

    def _resolve(self, scores: np.ndarray | None, source: str) -> None:
        if scores is None:
            self.classes = self.given or numbered(256)
            return
        channels = self._channels = scores.shape[-1]
        classes = self.given
        if classes is None:
            classes = camvid() if channels in (32, 33) else numbered(min(channels, 256))
        n = len(classes)
        if channels == n + 1:
            if self.drop_background is False:
                if BACKGROUND_ID in classes.ids:
                    raise UsageError(f"--keep-background needs id {BACKGROUND_ID} free, but {classes.source} uses it")
                classes = classes.with_background()
                self._lut = np.asarray((BACKGROUND_ID, *classes.ids[:-1]), dtype=np.uint8)
            else:
                self._skip_first = True
                self._lut = np.asarray(classes.ids, dtype=np.uint8)
        elif channels == n:
            if self.drop_background is not None:
                warn(f"{source} has no extra background channel ({channels} classes); background option ignored")
            self._lut = np.asarray(classes.ids, dtype=np.uint8)
        else:
            raise UnusableError(
                f"{source} outputs {channels} classes but {classes.source or 'the class map'} lists {n} "
                f"(expected {n}, or {n + 1} with a background channel 0); pass a matching --classes file"
            )
        self.classes = classes


@dataclass
class Segmented:
    """One image's segmentation: pixels per class id ([256]), its files encoded (suffix -> bytes, see
    :func:`encode_outputs`) and the class map they were drawn with."""

    counts: np.ndarray
    files: dict[str, bytes]
    classes: ClassMap


@dataclass
class SegmentWork:
    """Segmentation's per-batch work on every engine (:class:`cvtool.engines.Work`): the model on a batch of
    one input size, masks labelled, resized to each input's size and encoded with their colour mask and
    overlay. Locally in this process; on Ray in the model replicas (which load the model themselves).

    Example: ``SegmentWork(cfg, None, model=load_segmentation_model(cfg.model)).run(payloads)``.
    """

    cfg: SegmentConfig
    given: ClassMap | None = None  # the --classes file's map
    fixed: tuple[int, int] | None = None  # the model's input size (--input-size, or what the model demands)
    model: SegmentationModel | None = None
    labeller: Labeller | None = None
    loadable: bool = True  # False: a model given from Python, which other processes cannot load

    def __post_init__(self) -> None:
        if self.model is not None and self.labeller is None:
            self.labeller = Labeller(self.given, self.cfg.drop_background)

    def key(self, payload) -> tuple:
        """Images of one model input size are stacked into one model call."""
        return payload[1].shape

    def decode(self, item: InputItem):
        # The same decode and resize as every command's model input (see images.load_with_original).
        return load_with_original(item.path, lambda full: model_input_size(full, self.fixed, self.cfg.max_side))

    def run(self, payloads: Sequence) -> list[Segmented]:
        inputs = np.stack([x for _, x in payloads])
        raw = self.model.run(model_input(inputs, self.cfg.input_range, self.model.input_dtype))
        masks = self.labeller(raw, len(payloads), self.model.source)
        out = []
        for (original, _), mask in zip(payloads, masks):
            mask = resize_mask(mask, original.shape[:2])
            counts = np.bincount(mask.ravel(), minlength=256)
            out.append(
                Segmented(
                    counts, encode_outputs(original, mask, self.labeller.classes, self.cfg), self.labeller.classes
                )
            )
        return out

    def join(self, results: list[Segmented]) -> list[Segmented]:
        return results

    def portable(self) -> SegmentWork:
        if not self.loadable:
            raise UsageError("this model was not loaded from a path, so other processes cannot load it: give --model")
        return dataclasses.replace(self, model=None, labeller=None)

    def loaded(self) -> SegmentWork:
        return dataclasses.replace(self, model=load_segmentation_model(self.cfg.model, unsafe=self.cfg.unsafe_load))

    def decode_bytes(self) -> int:
        h, w = self.fixed or (self.cfg.max_side or 4096, self.cfg.max_side or 4096)
        return 3 * h * w + 3 * 4096 * 3072  # the model's input and an original of up to 12 megapixels


@stages_output("out", folder=True)
@holds_output_lock("out", folder=True)
def segment(
    input: str | Path,
    out: str | Path,
    *,
    config: SegmentConfig | None = None,
    model: SegmentationModel | None = None,
    overwrite: bool = False,
    quiet: bool = False,
    resume: bool = False,
    shard: str | Shard | None = None,
    engine: str | EngineSettings | None = None,
) -> RunResult:
    """Segment every image under ``input`` into ``out``; returns counts and file locations.

    Each image's files are written (atomically) before its ``pixels.csv`` rows,
    so ``resume`` continues an interrupted run.

    Args:
        input: an image file, or a folder searched recursively.
        out: the output folder (masks, colour masks, overlays mirroring ``input``; legend.png, pixels.csv).
        config: the model to load and how its output is read (default: :class:`SegmentConfig`'s).
        model: an already loaded segmentation model (then ``config.model`` is not loaded).
        overwrite: replace existing outputs.
        quiet: no progress bar or log lines.
        resume: continue an interrupted run from its partial files.
        shard: ``"K/N"``: do only shard K of ``input``.
        engine: where the model runs and the files are encoded: ``local`` or ``ray`` (:mod:`cvtool.engines`;
            None: ``$CVTOOL_ENGINE``); this process writes them.

    Example: ``segment("photos/", "masks/", config=SegmentConfig(model="seg.keras", batch_size=2))``.
    """
    cfg = config or SegmentConfig()
    _check_config(cfg)
    out_dir = Path(out)  # a file there is refused by the output lock, before anything else
    items = list_images(input, exclude=out_dir)
    if not items:
        warn(f"no images found in {input}")
    given = read_class_file(cfg.classes) if cfg.classes is not None else None
    names = output_names(items)
    job = BatchJob(
        out_dir / "pixels.csv", overwrite, resume, shard, errors=out_dir / "errors.csv", grouped=True, lock=out_dir
    )
    if not resume:
        _check_free(out_dir, names, cfg.overlay_format, overwrite)
    seg_model = model or load_segmentation_model(cfg.model, unsafe=cfg.unsafe_load)
    shipped = dataclasses.replace(cfg, model=absolute_spec(cfg.model))  # replicas may run in another folder
    work = SegmentWork(shipped, given, cfg.input_size or seg_model.input_size, seg_model, loadable=model is None)
    out_dir.mkdir(parents=True, exist_ok=True)
    seen = np.zeros(256, dtype=np.int64)
    classes = None  # the class map the masks were drawn with (decided on the model's first output)
    todo = job.open(items, PIXELS_HEADER, {"command": "segment", **_identity(cfg, seg_model)})
    if job.complete:
        return RunResult(job.processed, job.failed, job.out, job.errors)
    if resume:
        remove_stale_temps(out_dir)
    with job:
        with Progress(len(todo), "segment", quiet) as progress:
            for batch, segmented in engine_batches(work, todo, cfg.batch_size, engine):
                job.fail_all(batch.failures)
                for item, result in zip(batch.items, segmented):
                    classes = result.classes
                    seen += result.counts
                    write_files(out_dir / names[item.rel], result.files)
                    job.write_group(pixel_rows(item.rel, result.counts, classes))
                job.flush()
                progress.update(len(batch.items) + len(batch.failures))
    legend = out_dir / "legend.png"
    if classes is None:  # nothing reached the model: draw the class map it would use
        if job.kept and legend.exists():
            return RunResult(job.processed, job.failed, job.out, job.errors)  # resumed with nothing left: keep it
        classes = given or camvid()
    if job.kept:  # classes seen before the interruption count too
        seen += _seen_in(job.out, classes)
    write_legend(classes, legend, seen)
    return RunResult(job.processed, job.failed, job.out, job.errors)


def _identity(cfg: SegmentConfig, seg_model: SegmentationModel) -> dict:
    """Which model and options made a pixels.csv (for --resume and merge checks)."""
    spec = Path(cfg.model)
    source = model_fingerprint(spec) if spec.exists() else str(cfg.model)  # a file or SavedModel: its contents
    settings = {
        "classes": file_digest(cfg.classes),
        "input_range": cfg.input_range,
        "input_size": cfg.input_size,
        "max_side": cfg.max_side,
        "drop_background": cfg.drop_background,
        "alpha": cfg.alpha,
        "overlay_format": cfg.overlay_format,
    }
    return {"model": f"{source}|{seg_model.source}", "settings": settings}


def _seen_in(pixels_csv: Path, classes: ClassMap) -> np.ndarray:
    """Per class id, whether ``pixels_csv`` has a row of it (for the legend of a resumed run)."""
    import csv

    ids = dict(zip(classes.names, classes.ids))
    seen = np.zeros(256, dtype=np.int64)
    with open(pixels_csv, newline="", encoding="utf-8") as f:
        for row in list(csv.reader(f))[1:]:
            if len(row) > 1 and row[1] in ids:
                seen[ids[row[1]]] = 1
    return seen


def model_input_size(size: tuple[int, int], fixed: tuple[int, int] | None, max_side: int) -> tuple[int, int]:
    """The (height, width) an image of ``size`` is given to the model at."""
    if fixed is not None:
        return fixed
    h, w = size
    if max_side and max(h, w) > max_side:
        scale = max_side / max(h, w)
        return max(1, round(h * scale)), max(1, round(w * scale))
    return h, w


def model_input(batch: np.ndarray, input_range: str, dtype: str) -> np.ndarray:
    """uint8 pixels -> what the model takes: floats in ``input_range``, or the pixels for integer inputs."""
    if dtype.startswith(("uint", "int")):
        return batch
    scale, offset = INPUT_RANGES[input_range]
    return batch.astype(np.float32) * np.float32(scale) + np.float32(offset)


def resize_mask(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of a class-id mask to (height, width): ids are never blended."""
    if mask.shape[:2] == tuple(size):
        return mask
    return np.asarray(Image.fromarray(mask).resize((size[1], size[0]), Image.NEAREST))


def output_names(items: list[InputItem]) -> dict[str, str]:
    """Relative path -> output name stem: ``sub/a.jpg`` -> ``sub/a``; ``sub/a.jpg`` if ``sub/a.png`` also exists."""
    stems = {item.rel: PurePosixPath(item.rel).with_suffix("").as_posix() for item in items}
    uses = Counter(stems.values())
    return {rel: stem if uses[stem] == 1 else rel for rel, stem in stems.items()}


def pixel_rows(rel: str, counts: np.ndarray, classes: ClassMap) -> list[list]:
    """``path,class,pixels,fraction`` rows for the classes present in one mask, by class id."""
    total = int(counts.sum())
    return [[rel, classes.name_of(int(i)), int(counts[i]), f"{counts[i] / total:.6f}"] for i in np.flatnonzero(counts)]


def mask_image(mask: np.ndarray, classes: ClassMap) -> Image.Image:
    """An 8-bit palette image whose pixel values are the class ids and whose palette is the class colours."""
    img = Image.fromarray(mask.astype(np.uint8))
    img.putpalette(classes.palette())
    return img


def overlay(image: np.ndarray, mask: np.ndarray, classes: ClassMap, alpha: float) -> np.ndarray:
    """image * 1.0 + alpha * class colour, saturated (as cv2.addWeighted does), in RGB order."""
    tint = np.rint(np.float32(alpha) * classes.color_table().astype(np.float32)).astype(np.uint16)
    return np.minimum(image.astype(np.uint16) + tint[mask], 255).astype(np.uint8)


def encode_outputs(image: np.ndarray, mask: np.ndarray, classes: ClassMap, cfg: SegmentConfig) -> dict[str, bytes]:
    """One image's files, encoded: ``.mask.png`` (palette PNG of class ids), ``.color.png`` and
    ``.overlay.jpg`` (or ``.png``), by suffix."""
    params = {"quality": 90} if cfg.overlay_format == "jpg" else {}
    overlaid = Image.fromarray(overlay(image, mask, classes, cfg.alpha))
    return {
        ".mask.png": encode_image(mask_image(mask, classes), "PNG"),
        ".color.png": encode_image(Image.fromarray(classes.color_table()[mask]), "PNG"),
        f".overlay.{cfg.overlay_format}": encode_image(
            overlaid, "JPEG" if cfg.overlay_format == "jpg" else "PNG", **params
        ),
    }


def write_files(stem: Path, files: dict[str, bytes]) -> None:
    """Write ``<stem><suffix>`` for each encoded file of :func:`encode_outputs`, each atomically."""
    for suffix, data in files.items():
        write_bytes_atomic(f"{stem}{suffix}", data)


def write_legend(classes: ClassMap, path: Path, seen: np.ndarray | None = None) -> Path:
    """Colour swatches with class names; a class map over 64 classes lists only the classes seen."""
    from matplotlib.figure import Figure

    entries = list(zip(classes.ids, classes.names, classes.colors))
    if len(entries) > LEGEND_ALL_UP_TO and seen is not None:
        entries = [e for e in entries if seen[e[0]]] or entries[:1]
    columns = 1 if len(entries) <= 16 else 2
    rows = -(-len(entries) // columns)
    with text_fonts(name for _, name, _ in entries):  # class names in any script, no glyph warnings
        fig = Figure(figsize=(3.2 * columns, 0.3 * rows + 0.3))
        ax = fig.add_axes((0, 0, 1, 1))
        ax.set_xlim(0, columns)
        ax.set_ylim(rows, -0.5)
        ax.axis("off")
        for n, (class_id, name, color) in enumerate(entries):
            x, y = n // rows, n % rows
            ax.add_patch(_swatch(x + 0.04, y - 0.35, color))
            ax.text(x + 0.2, y, f"{class_id}  {name}", va="center", fontsize=9)
        return save_figure(fig, path)


def _swatch(x: float, y: float, color):
    from matplotlib.patches import Rectangle

    return Rectangle((x, y), 0.12, 0.7, facecolor=[c / 255 for c in color], edgecolor="0.5", linewidth=0.5)


def _check_config(cfg: SegmentConfig) -> None:
    if cfg.input_range not in INPUT_RANGES:
        raise UsageError(f"--input-range must be one of {', '.join(INPUT_RANGES)}, got {cfg.input_range!r}")
    if cfg.overlay_format not in OVERLAY_FORMATS:
        raise UsageError(f"--overlay-format must be jpg or png, got {cfg.overlay_format!r}")
    if not 0.0 <= cfg.alpha <= 1.0:
        raise UsageError(f"--alpha must be between 0 and 1, got {cfg.alpha}")
    if cfg.max_side < 0 or cfg.batch_size < 1:
        raise UsageError("--max-side must be 0 or more and --batch-size at least 1")
    if cfg.input_size is not None and min(cfg.input_size) < 1:
        raise UsageError("--input-size must be HxW with positive sides")


def parse_size(text: str | None) -> tuple[int, int] | None:
    """``"512x1024"`` -> (512, 1024) (height x width); empty -> None."""
    if not text:
        return None
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise UsageError(f"--input-size takes HxW, e.g. 512x1024, got {text!r}") from None
    if h < 1 or w < 1:
        raise UsageError(f"--input-size takes positive sides, got {text!r}")
    return h, w


def _check_free(out_dir: Path, names: dict[str, str], overlay_format: str, overwrite: bool) -> None:
    if overwrite or not out_dir.exists():
        return
    suffixes = (".mask.png", ".color.png", f".overlay.{overlay_format}")
    candidates = [out_dir / name for name in RUN_FILES]
    candidates += [out_dir / f"{stem}{suffix}" for stem in names.values() for suffix in suffixes]
    for path in candidates:
        if path.exists():
            raise UsageError(f"{path} already exists; pass --overwrite to replace results in {out_dir}")
