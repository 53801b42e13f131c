"""The `cvtool` command line: parses options, calls the package, prints, sets exit codes.

TensorFlow is imported only inside the commands that need it, so `--help`
and `--version` answer at once.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from cvtool import __version__
from cvtool.errors import EXIT_UNUSABLE, EXIT_USAGE, CvtoolError

app = typer.Typer(
    name="cvtool",
    help="Batch computer vision for folders of images: train, predict, evaluate.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

# Options shared by several commands (declared once).
Quiet = Annotated[bool, typer.Option("--quiet", "-q", envvar="CVTOOL_QUIET", help="No progress bars or log lines.")]
Overwrite = Annotated[bool, typer.Option("--overwrite", envvar="CVTOOL_OVERWRITE", help="Replace existing results.")]
BatchSize = Annotated[
    int, typer.Option("--batch-size", "-b", envvar="CVTOOL_BATCH_SIZE", min=1, help="Images per batch.")
]
TopK = Annotated[
    int,
    typer.Option("--top-k", "-k", envvar="CVTOOL_TOP_K", min=1, help="Classes per row (capped at the class count)."),
]
UnsafeLoad = Annotated[
    bool,
    typer.Option("--unsafe-load", help="Allow models with Lambda layers or custom code (only if you trust the file)."),
]
ModelArg = Annotated[
    str, typer.Argument(help="Run directory from train/finetune, or a .keras model file.", show_default=False)
]
InputArg = Annotated[Path, typer.Argument(help="Image file, or folder searched recursively.", show_default=False)]
Transforms = Annotated[
    str,
    typer.Option(
        envvar="CVTOOL_TTA_TRANSFORMS",
        help="TTA views, comma list of identity, hflip, vflip, rot90, crop (5 crops), scale, brightness (random).",
    ),
]
Reduce = Annotated[str, typer.Option(help="How TTA views are combined per image: mean, max or vote.")]
CropScale = Annotated[float, typer.Option(help="Side of the TTA crops, fraction of the image (smallest for scale).")]
Copies = Annotated[int, typer.Option(min=1, help="Random copies per jitter transform (scale, brightness).")]
TtaSeed = Annotated[int, typer.Option("--seed", help="Seed of the random TTA views.")]
Rule = Annotated[str, typer.Option(help="How models are combined: mean, weighted, vote or geometric.")]
Weights = Annotated[
    str,
    typer.Option(help="Weights of the weighted rule, one per model (e.g. 0.5,0.3,0.2).", show_default="none"),
]


def version_callback(value: bool) -> None:
    if value:
        typer.echo(f"cvtool {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    version: Annotated[
        Optional[bool],
        typer.Option("--version", callback=version_callback, is_eager=True, help="Print the version and exit."),
    ] = None,
) -> None:
    """Batch computer vision for folders of images."""


def reports_errors(func):
    """Run a command; turn cvtool errors into one line on stderr and the documented exit code."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            code = func(*args, **kwargs)
        except CvtoolError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt:
            typer.echo("interrupted; finished outputs were kept, unfinished ones discarded", err=True)
            raise typer.Exit(130) from None
        except MemoryError:
            typer.echo("error: out of memory; try a smaller --batch-size", err=True)
            raise typer.Exit(EXIT_UNUSABLE) from None
        raise typer.Exit(code or 0)

    return wrapper


@app.command()
@reports_errors
def train(
    data: Annotated[
        Path,
        typer.Argument(
            help="Labelled folder: DATA/<class>/ or DATA/train|validation|test/<class>/.", show_default=False
        ),
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="Run directory to create.", show_default=False)],
    arch: Annotated[
        str, typer.Option(help="small-cnn, mobilenet_v2, efficientnet_b0 or resnet50 (from scratch).")
    ] = "small-cnn",
    epochs: Annotated[int, typer.Option(min=1, help="Training epochs.")] = 10,
    image_size: Annotated[
        Optional[int],
        typer.Option(help="Square input side in pixels [default: 64 for small-cnn, else the network's own]"),
    ] = None,
    batch_size: BatchSize = 32,
    lr: Annotated[float, typer.Option(help="Learning rate.")] = 1e-3,
    optimizer: Annotated[str, typer.Option(help="adam, rmsprop or sgd (momentum 0.9, Nesterov).")] = "adam",
    seed: Annotated[int, typer.Option(help="Seed for the split, shuffling, augmentation and weights.")] = 42,
    val_split: Annotated[
        float, typer.Option(help="Fraction held out per class when DATA has no validation/ folder.")
    ] = 0.2,
    label_smoothing: Annotated[float, typer.Option(help="Label smoothing (0.1 is usual).")] = 0.0,
    hflip: Annotated[bool, typer.Option("--hflip/--no-hflip", help="Random horizontal flips.")] = True,
    vflip: Annotated[bool, typer.Option("--vflip/--no-vflip", help="Random vertical flips.")] = False,
    rotation: Annotated[
        float, typer.Option(help="Random rotation, fraction of a full turn (0.05 = 18 degrees).")
    ] = 0.0,
    zoom: Annotated[float, typer.Option(help="Random zoom in/out, fraction.")] = 0.0,
    shift: Annotated[float, typer.Option(help="Random shift, fraction of height/width.")] = 0.0,
    shear: Annotated[float, typer.Option(help="Random shear intensity.")] = 0.0,
    crop: Annotated[float, typer.Option(help="Random crop of up to this fraction, resized back.")] = 0.0,
    contrast: Annotated[float, typer.Option(help="Random contrast factor.")] = 0.0,
    brightness: Annotated[float, typer.Option(help="Random brightness, fraction of the pixel range.")] = 0.0,
    members: Annotated[
        int, typer.Option(min=1, help="Train K models (seeds SEED..SEED+K-1) into RUN/member-1..K as an ensemble.")
    ] = 1,
    overwrite: Overwrite = False,
    quiet: Quiet = False,
) -> int:
    """Train a classifier from scratch; writes model.keras, cvtool.json, history.csv/png into --out."""
    from cvtool.augment import AugmentConfig
    from cvtool.train import TrainConfig
    from cvtool.train import train as run_train

    augment = AugmentConfig(hflip, vflip, rotation, zoom, shift, shear, crop, contrast, brightness)
    cfg = TrainConfig(arch, epochs, image_size, batch_size, lr, optimizer, seed, val_split, label_smoothing, augment)
    if members > 1:
        from cvtool.ensemble import train_members

        results = train_members(data, out, cfg, members, overwrite=overwrite, quiet=quiet)
        typer.echo(f"ensemble of {members} models saved to {out}")
        return 1 if any(r.failures for r in results) else 0
    result = run_train(data, out, cfg, overwrite=overwrite, quiet=quiet)
    typer.echo(f"model saved to {result.run_dir}")
    return 1 if result.failures else 0


@app.command()
@reports_errors
def predict(
    model: ModelArg,
    input: InputArg,
    out: Annotated[Path, typer.Option("--out", "-o", help="Predictions CSV to write.", show_default=False)],
    top_k: TopK = 3,
    batch_size: BatchSize = 32,
    overwrite: Overwrite = False,
    quiet: Quiet = False,
    unsafe_load: UnsafeLoad = False,
) -> int:
    """Classify every image under INPUT: one CSV row per image (path,label,score,label_2,score_2,...)."""
    from cvtool.predict import predict as run_predict

    result = run_predict(model, input, out, top_k, batch_size, overwrite, quiet, unsafe_load)
    _report(result.processed, result.failed, result.out, result.errors, quiet)
    return result.exit_code


@app.command()
@reports_errors
def evaluate(
    models: Annotated[
        list[str],
        typer.Argument(
            help="Run directory or .keras file; several (or an ensemble run) are compared and combined.",
            metavar="MODEL",
            show_default=False,
        ),
    ],
    data: Annotated[Path, typer.Argument(help="Labelled folder, or a flat folder with --labels.", show_default=False)],
    out: Annotated[
        Path,
        typer.Option("--out", "-o", help="Folder for metrics.json, confusion matrix, predictions.", show_default=False),
    ],
    labels: Annotated[Optional[Path], typer.Option(help="CSV of paths (relative to DATA) and labels.")] = None,
    path_column: Annotated[str, typer.Option(help="Path column of --labels.")] = "path",
    label_column: Annotated[
        str, typer.Option(help="Label column of --labels: class names or numeric class ids.")
    ] = "label",
    split: Annotated[
        str, typer.Option(help="auto (test/, else validation/, else all), test, validation, train or all.")
    ] = "auto",
    rank: Annotated[str, typer.Option(help="Comma list of N for rank-N (top-N) accuracy.")] = "1,3,5",
    top_k: TopK = 3,
    batch_size: BatchSize = 32,
    use_tta: Annotated[bool, typer.Option("--tta", help="Also score TTA views and report the gain.")] = False,
    transforms: Transforms = "identity,hflip,crop",
    reduce: Reduce = "mean",
    crop_scale: CropScale = 0.875,
    copies: Copies = 2,
    tta_seed: TtaSeed = 0,
    rule: Rule = "mean",
    weights: Weights = "",
    overwrite: Overwrite = False,
    quiet: Quiet = False,
    unsafe_load: UnsafeLoad = False,
) -> int:
    """Accuracy, rank-N accuracy, per-class precision/recall/F1 and a confusion matrix.

    Several MODELs (or an ensemble run) are combined by --rule and compared side by side with each member alone;
    --tta adds the TTA views and reports the gain.
    """
    from cvtool.combine import parse_weights
    from cvtool.errors import UsageError
    from cvtool.evaluate import evaluate as run_evaluate

    try:
        ranks = tuple(int(r) for r in rank.split(",") if r.strip())
    except ValueError:
        raise UsageError(f"--rank takes a comma list of integers, got {rank!r}") from None
    if split not in ("auto", "test", "validation", "train", "all"):
        raise UsageError(f"--split must be auto, test, validation, train or all, got {split!r}")
    tta = _tta_options(transforms, reduce, crop_scale, copies, tta_seed) if use_tta else None
    result = run_evaluate(
        models,
        data,
        out,
        labels,
        path_column,
        label_column,
        split,
        ranks,
        top_k,
        batch_size,
        overwrite,
        quiet,
        unsafe_load,
        tta,
        rule if len(models) > 1 or rule != "mean" else None,
        parse_weights(weights),
    )
    _report(result.processed, result.failed, result.out_dir / "metrics.json", result.out_dir / "errors.csv", quiet)
    return result.exit_code


@app.command()
@reports_errors
def tta(
    model: ModelArg,
    input: InputArg,
    out: Annotated[Path, typer.Option("--out", "-o", help="Predictions CSV to write.", show_default=False)],
    transforms: Transforms = "identity,hflip,crop",
    reduce: Reduce = "mean",
    crop_scale: CropScale = 0.875,
    copies: Copies = 2,
    seed: TtaSeed = 0,
    top_k: TopK = 3,
    batch_size: BatchSize = 32,
    overwrite: Overwrite = False,
    quiet: Quiet = False,
    unsafe_load: UnsafeLoad = False,
) -> int:
    """Predictions averaged over augmented views of every image (test-time augmentation); predict's CSV format."""
    from cvtool.tta import tta as run_tta

    options = _tta_options(transforms, reduce, crop_scale, copies, seed)
    result = run_tta(model, input, out, options, top_k, batch_size, overwrite, quiet, unsafe_load)
    _report(result.processed, result.failed, result.out, result.errors, quiet)
    return result.exit_code


@app.command()
@reports_errors
def ensemble(
    models: Annotated[
        list[str],
        typer.Argument(
            help="Run directories or .keras files (an ensemble run adds its members).",
            show_default=False,
            metavar="MODEL",
        ),
    ],
    input: Annotated[Path, typer.Option("--input", "-i", help="Image file, or folder searched recursively.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Predictions CSV to write.", show_default=False)],
    rule: Rule = "mean",
    weights: Weights = "",
    use_tta: Annotated[bool, typer.Option("--tta", help="Apply the TTA views to every member.")] = False,
    transforms: Transforms = "identity,hflip,crop",
    reduce: Reduce = "mean",
    crop_scale: CropScale = 0.875,
    copies: Copies = 2,
    seed: TtaSeed = 0,
    top_k: TopK = 3,
    batch_size: BatchSize = 32,
    overwrite: Overwrite = False,
    quiet: Quiet = False,
    unsafe_load: UnsafeLoad = False,
) -> int:
    """Combine several models' predictions (classes aligned by name); predict's CSV format."""
    from cvtool.combine import parse_weights
    from cvtool.ensemble import ensemble as run_ensemble

    options = _tta_options(transforms, reduce, crop_scale, copies, seed) if use_tta else None
    result = run_ensemble(
        models, input, out, rule, parse_weights(weights), options, top_k, batch_size, overwrite, quiet, unsafe_load
    )
    _report(result.processed, result.failed, result.out, result.errors, quiet)
    return result.exit_code


def _tta_options(transforms: str, reduce: str, crop_scale: float, copies: int, seed: int):
    from cvtool.tta import TtaOptions, parse_transforms

    return TtaOptions(parse_transforms(transforms), reduce, crop_scale, copies, seed)


def _report(processed: int, failed: int, out: Path, errors: Path, quiet: bool) -> None:
    if failed:
        typer.echo(f"{processed} images done, {failed} failed (see {errors}); wrote {out}", err=True)
    elif not quiet:
        typer.echo(f"{processed} images done; wrote {out}", err=True)


def main() -> None:
    """Console-script entry point."""
    try:
        app()
    except SystemExit as exc:
        # click reports usage errors with exit 2 already; keep codes as they are.
        raise exc
    except Exception as exc:  # noqa: BLE001 - last resort: one line, never a traceback
        print(f"error: unexpected {type(exc).__name__}: {exc} (please report this)", file=sys.stderr)
        sys.exit(EXIT_UNUSABLE)


__all__ = ["app", "main", "EXIT_USAGE"]
