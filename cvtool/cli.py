"""The `cvtool` command line: parses options, calls the package, prints, sets exit codes.

TensorFlow is imported only inside the commands that need it, so `--help`
and `--version` answer at once.
"""

from __future__ import annotations

import functools
import inspect
import signal
import sys
import typing
from pathlib import Path
from typing import Annotated, Optional

import typer
from typer.core import TyperArgument, TyperCommand, TyperGroup, TyperOption

from cvtool import __version__
from cvtool.cam import DEFAULT_METHOD as DEFAULT_CAM_METHOD
from cvtool.cam import METHODS as CAM_METHODS
from cvtool.classmap import DEFAULT_MODEL as DEFAULT_SEGMENT_MODEL
from cvtool.config import FinetuneConfig, TrainConfig, from_options, option_fields
from cvtool.engines import ENGINES
from cvtool.errors import EXIT_UNUSABLE, EXIT_USAGE, CvtoolError
from cvtool.export import FORMATS as EXPORT_FORMATS
from cvtool.formats import FORMATS
from cvtool.imagenet import LABEL_FORMATS
from cvtool.members import DEFAULT_DIVERSITY, DIVERSITY
from cvtool.rules import ENSEMBLE_RULES, VIEW_REDUCERS
from cvtool.runtimes import RUNTIME_ENV, RUNTIMES
from cvtool.storage import local_path
from cvtool.tta import DEFAULT_TRANSFORMS, TRANSFORMS
from cvtool.tune import DEFAULT_IMAGE_SIZES, OBJECTIVES, TUNERS

COMMAND_ORDER = (
    "train", "finetune", "tune", "predict", "tta", "ensemble", "evaluate", "gradcam", "visualize", "segment", "merge",
    "models", "export",
)  # fmt: skip


# Plain metavars in --help: a flag shows no value placeholder, a value shows an upper-case word (INTEGER,
# PATH, TEXT or its own metavar), arguments their name (MODEL, INPUT, DATA), the usage line plain names.
_TYPE_METAVARS = {int: "INTEGER", float: "FLOAT", str: "TEXT", Path: "PATH"}


class _PlainOption(TyperOption):
    def display_type_rich(self, ctx) -> str | None:
        if self.is_flag:
            return None
        if self.metavar is not None:
            return self.metavar
        return _TYPE_METAVARS.get(self.type_descriptor.annotation, "TEXT")


class _PlainArgument(TyperArgument):
    @property
    def display_name_raw(self) -> str:
        return self.metavar or self.name.upper()

    def display_type_rich(self, ctx) -> str | None:
        return None  # the name column already says MODEL, INPUT...

    def _usage_display_name(self) -> str:
        name = self.display_name_raw + ("..." if self.nargs != 1 else "")
        return name if self.required else f"[{name}]"


def _plain(params: list) -> list:
    for p in params:  # Typer builds its own parameter classes: give them the plain display
        if type(p) is TyperOption:
            p.__class__ = _PlainOption
        elif type(p) is TyperArgument:
            p.__class__ = _PlainArgument
    return params


class _PlainHelpCommand(TyperCommand):
    """A command whose --help shows plain metavars (Typer's own shows ``<bool>``, ``{MODEL}``, ``data``)."""

    def get_params(self, ctx) -> list:
        return _plain(super().get_params(ctx))


class _CommandsInWorkflowOrder(TyperGroup):
    """`cvtool --help`: commands in the order of a workflow, not of their definition; plain metavars."""

    def list_commands(self, ctx) -> list[str]:
        names = super().list_commands(ctx)
        return sorted(names, key=lambda n: COMMAND_ORDER.index(n) if n in COMMAND_ORDER else len(COMMAND_ORDER))

    def get_params(self, ctx) -> list:
        return _plain(super().get_params(ctx))


app = typer.Typer(
    name="cvtool",
    cls=_CommandsInWorkflowOrder,
    help="Batch computer vision for folders of images: train, fine-tune, predict (plain, TTA, ensembles), "
    "evaluate, explain with Grad-CAM, segment.",
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
# Training (cvtool.config: CVTOOL_TRAIN_BATCH_SIZE) and segmentation keep their own variables: a cron job's
# CVTOOL_BATCH_SIZE for predict must not change training hyper-parameters, nor send full-size photos to a
# segmentation model 32 at a time.
SegmentBatchSize = Annotated[
    int,
    typer.Option(
        "--batch-size", "-b", envvar="CVTOOL_SEGMENT_BATCH_SIZE", min=1, help="Images (of one size) per model call."
    ),
]
TopK = Annotated[
    int,
    typer.Option("--top-k", "-k", envvar="CVTOOL_TOP_K", min=1, help="Classes per row (capped at the class count)."),
]
UnsafeLoad = Annotated[
    bool,
    typer.Option("--unsafe-load", help="Allow models with Lambda layers or custom code (only if you trust the file)."),
]
Resume = Annotated[
    bool,
    typer.Option(
        "--resume",
        envvar="CVTOOL_RESUME",
        help="Continue an interrupted run from OUT.part, keeping its rows; a finished OUT is left as it is.",
    ),
]
ShardOpt = Annotated[
    str,
    typer.Option(
        "--shard",
        envvar="CVTOOL_SHARD",
        help='K/N: do only shard K (0..N-1) of INPUT, e.g. "$JOB_COMPLETION_INDEX/8"; combine with `cvtool merge`.',
        show_default="all of INPUT",
    ),
]
ModelArg = Annotated[
    str,
    typer.Argument(
        help="Run directory from train/finetune, a .keras model file, or imagenet:NAME (see `cvtool models`).",
        metavar="MODEL",
        show_default=False,
    ),
]
ImagenetWeights = Annotated[
    Optional[Path],
    typer.Option(
        "--weights",
        help="For imagenet:NAME: a local weights file, or a folder of NAME.h5 files. "
        "Default: $CVTOOL_IMAGENET_WEIGHTS, else Keras' download cache (~/.keras/models).",
        show_default=False,
    ),
]
RUNTIME_HELP = (
    f"What runs the model: auto (a run's fastest fresh export, else TensorFlow), {RUNTIMES.described()}. "
    "tflite and onnx take the run's export (cvtool export) or an exported file, without importing TensorFlow."
)
Runtime = Annotated[str, typer.Option("--runtime", envvar=RUNTIME_ENV, help=RUNTIME_HELP)]
LabelFormat = Annotated[
    str,
    typer.Option("--label-format", help=f"CSV labels of imagenet:NAME models: {LABEL_FORMATS.described()}."),
]
# Paths that may be URLs (s3://, gs://, az://, file://, https://; see docs/storage.md) are strings: a Path would
# turn s3://b/k into s3:/b/k.
InputArg = Annotated[
    str,
    typer.Argument(help="Image file, or folder searched recursively (or a URL).", metavar="INPUT", show_default=False),
]


# The TTA, rule and CAM choices and their help are read from their registries (cvtool.registry).
Transforms = Annotated[
    str,
    typer.Option(envvar="CVTOOL_TTA_TRANSFORMS", help=f"TTA views, a comma list of: {TRANSFORMS.described()}."),
]
TTA_DEFAULT = ",".join(DEFAULT_TRANSFORMS)
Reduce = Annotated[str, typer.Option(help=f"How the TTA views of an image are reduced: {VIEW_REDUCERS.described()}.")]
CropScale = Annotated[float, typer.Option(help="Side of the TTA crops, fraction of the image (smallest for scale).")]
Copies = Annotated[int, typer.Option(min=1, help="Random copies per jitter transform (scale, brightness).")]
TtaSeed = Annotated[int, typer.Option("--seed", help="Seed of the random TTA views.")]
Rule = Annotated[str, typer.Option(help=f"How models are combined: {ENSEMBLE_RULES.described()}.")]
RuleWeights = Annotated[
    str,
    typer.Option(
        "--rule-weights",
        help="Weights of the weighted rule, one per model (e.g. 0.5,0.3,0.2).",
        show_default="none",
    ),
]
Method = Annotated[str, typer.Option(help=f"CAM method: {CAM_METHODS.described()}.")]
CsvOut = Annotated[
    str,
    typer.Option(
        "--out",
        "-o",
        help="Predictions file to write (.csv, .jsonl or .parquet), a path or a URL.",
        metavar="PATH",
        show_default=False,
    ),
]
ResultFormat = Annotated[
    Optional[str],
    typer.Option(
        "--format",
        envvar="CVTOOL_FORMAT",
        help=f"Results format: {FORMATS.described()}. Must agree with --out's suffix when that names one.",
        show_default="from --out's suffix",
    ),
]
# --engine and the Ray engine's worker options (cvtool.engines; docs/ray.md).
Engine = Annotated[str, typer.Option(envvar="CVTOOL_ENGINE", help=f"Where the work runs: {ENGINES.described()}.")]
RayAddress = Annotated[
    str,
    typer.Option(
        envvar="RAY_ADDRESS", help="--engine ray: the Ray cluster to join.", show_default="none: Ray starts here"
    ),
]
Replicas = Annotated[
    str,
    typer.Option(
        envvar="CVTOOL_REPLICAS",
        help="--engine ray: model replicas, N or MIN:MAX (Ray scales between them); auto: 1 to what the cluster fits.",
    ),
]
CpusPerReplica = Annotated[float, typer.Option(min=0.0, help="--engine ray: CPUs each model replica reserves.")]
GpusPerReplica = Annotated[
    float, typer.Option(min=0.0, help="--engine ray: GPUs each model replica reserves (fractions share one).")
]

# Each shared option once: its alias and default. Commands list the ones they take (@shared_options) and
# receive them as **options, named as the library functions name their keywords.
SHARED_OPTIONS = {
    "transforms": (Transforms, TTA_DEFAULT),
    "reduce": (Reduce, "mean"),
    "crop_scale": (CropScale, 0.875),
    "copies": (Copies, 2),
    "seed": (TtaSeed, 0),
    "top_k": (TopK, 3),
    "batch_size": (BatchSize, 32),
    "overwrite": (Overwrite, False),
    "quiet": (Quiet, False),
    "unsafe_load": (UnsafeLoad, False),
    "weights": (ImagenetWeights, None),
    "label_format": (LabelFormat, "name"),
    "runtime": (Runtime, "auto"),
    "resume": (Resume, False),
    "shard": (ShardOpt, ""),
    "format": (ResultFormat, None),
    "engine": (Engine, "local"),
    "ray_address": (RayAddress, ""),
    "replicas": (Replicas, "auto"),
    "cpus_per_replica": (CpusPerReplica, 1.0),
    "gpus_per_replica": (GpusPerReplica, 0.0),
}
TTA_FIELDS = ("transforms", "reduce", "crop_scale", "copies", "seed")  # cvtool.tta.TtaOptions' fields
JOB_OPTIONS = ("overwrite", "quiet", "resume", "shard")  # every resumable, shardable batch command
MODEL_OPTIONS = ("unsafe_load", "weights", "runtime")  # every command that scores with a classifier
ENGINE_OPTIONS = ("engine", "ray_address", "replicas", "cpus_per_replica", "gpus_per_replica")  # engine commands


def shared_options(*names: str):
    """Add the shared options ``names`` (see :data:`SHARED_OPTIONS`) to a command, after its own parameters.

    The command declares ``**options`` and receives them there. Example::

        @shared_options("top_k", *JOB_OPTIONS)
        def predict(model: ModelArg, input: InputArg, out: CsvOut, **options) -> int: ...
    """

    def add(func):
        signature = inspect.signature(func, eval_str=True)
        own = [p for p in signature.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
        extra = [
            inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=alias, default=default)
            for name in names
            for alias, default in [SHARED_OPTIONS[name]]
        ]
        func.__signature__ = signature.replace(parameters=[*own, *extra])
        func.__annotations__ = {**func.__annotations__, **{p.name: p.annotation for p in extra}}
        return func

    return add


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
        from cvtool.jobs import signals_as_interrupts

        try:
            with signals_as_interrupts():
                code = func(*args, **kwargs)
        except CvtoolError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt as exc:
            name = "SIGTERM" if getattr(exc, "signum", None) == signal.SIGTERM else "SIGINT"
            typer.echo(f"interrupted ({name}); finished outputs were kept", err=True)
            raise typer.Exit(getattr(exc, "exit_code", 130)) from None
        except MemoryError:
            typer.echo("error: out of memory; try a smaller --batch-size", err=True)
            raise typer.Exit(EXIT_UNUSABLE) from None
        raise typer.Exit(code or 0)

    return wrapper


def _refuse_impossible_out(
    out: Path | str, *, remote: bool = True, what: str = "a run directory is written locally"
) -> None:
    """An output folder that cannot be written is refused before TensorFlow is imported (seconds).

    The command checks it again, under its output lock (:mod:`cvtool.locks`). ``remote``: a URL is
    allowed (written through a local staging copy, :mod:`cvtool.storage`); training runs are local.
    """
    from cvtool.errors import UsageError
    from cvtool.outputs import check_output_location
    from cvtool.storage import is_url, redact

    if is_url(local_path(out)):
        if not remote:
            raise UsageError(
                f"--out {redact(out)}: {what}; copy it to object storage when it is done (MODEL URLs are read from "
                "there)"
            )
        return
    check_output_location(local_path(out), folder=True)


# train and finetune: DATA, --out and the run's own switches here; every other option is a field of
# cvtool.config's dataclasses (name, type, default, help), declared there once and added by `config_options`.
DataArg = Annotated[
    str,
    typer.Argument(
        help="Labelled folder: DATA/<class>/ or DATA/train|validation|test/<class>/ (or a URL).",
        metavar="DATA",
        show_default=False,
    ),
]
RunOut = Annotated[
    str, typer.Option("--out", "-o", help="Run directory to create.", metavar="PATH", show_default=False)
]
TrainResume = Annotated[
    bool,
    typer.Option(
        "--resume",
        help="Continue the run in --out from its last epoch, with its stored config (a larger --epochs extends it).",
        metavar="",
    ),
]
Members = Annotated[
    int,
    typer.Option(
        min=1,
        help="Train K models (seeds SEED..SEED+K-1) into RUN/member-1..K as an ensemble.",
        metavar="INTEGER",
    ),
]
Workers = Annotated[int, typer.Option(min=1, help="--engine ray: Ray Train workers (one TensorFlow process each).")]
GpusPerWorker = Annotated[float, typer.Option(min=0.0, help="--engine ray: GPUs each training worker reserves.")]
Diversity = Annotated[
    str, typer.Option(help=f"With --members: how members differ besides the seed: {DIVERSITY.described()}.")
]
# What a value looks like in --help (a flag shows none).
METAVARS = {int: "INTEGER", float: "FLOAT", str: "TEXT", bool: ""}


def _config_parameter(name: str, hint, metadata: dict) -> inspect.Parameter:
    """The Typer option of one config field (:func:`cvtool.config.option` holds its settings)."""
    settings = dict(metadata.get("cli", {}))
    flags = settings.pop("flags", ())  # none: Typer names it after the field (--image-size, --hflip/--no-hflip)
    resumable = settings.pop("resumable", False)
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    base = args[0] if len(args) == 1 and type(None) in typing.get_args(hint) else hint
    info = typer.Option(*flags, help=metadata.get("help"), metavar=METAVARS[base], **settings)
    annotation = Optional[base] if resumable or base is not hint else base  # noqa: UP045 - Typer reads it
    default = None if resumable else metadata.get("default")
    kind = inspect.Parameter.KEYWORD_ONLY
    return inspect.Parameter(name, kind, default=default, annotation=Annotated[annotation, info])


def field_option(cls, name: str):
    """The Annotated type of config field ``name``, for a command that takes it too (evaluate's --layout)."""
    return next(_config_parameter(n, t, m) for n, t, m in option_fields(cls) if n == name).annotation


def config_options(cls):
    """Give a command one option per field of the config class ``cls``, after its DATA and --out.

    The command receives their values as one dict, ``options`` (field name -> value; None:
    not given), for :func:`cvtool.config.from_options`. Usage: ``@config_options(TrainConfig)``.
    """
    params = [_config_parameter(n, t, m) for n, t, m in option_fields(cls)]

    def decorate(func):
        own = list(inspect.signature(func, eval_str=True).parameters.values())
        own = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in own if p.name != "options"]

        @functools.wraps(func)
        def command(**kwargs):
            options = {p.name: kwargs.pop(p.name) for p in params}
            return func(options=options, **kwargs)

        command.__signature__ = inspect.Signature([*own[:2], *params, *own[2:]])
        return command

    return decorate


def _on_ray(engine: str) -> bool:
    from cvtool.engines import engine_settings

    return engine_settings(engine).name == "ray"


def _train_on_ray(kind, data, out, cfg, workers, gpus_per_worker, address, overwrite, resume, quiet) -> int:
    """train/finetune --engine ray (:mod:`cvtool.ray_training`): the chief writes --out."""
    from cvtool.ray_training import train_on_ray

    result = train_on_ray(
        kind,
        data,
        out,
        cfg=cfg,
        workers=workers,
        gpus_per_worker=gpus_per_worker,
        address=address or None,
        overwrite=overwrite,
        resume=resume,
        quiet=quiet,
    )
    typer.echo(f"model saved to {result.run_dir} ({workers} Ray workers)")
    if result.skipped:
        typer.echo(f"{result.skipped} files skipped: could not be read (see {result.run_dir / 'errors.csv'})", err=True)
    return 1 if result.skipped else 0


def _report_skipped(results) -> None:
    """Why a training run exits 1: how many unreadable files it skipped, and where they are listed."""
    from cvtool.trainer import ERRORS_FILE

    skipped = [r for r in results if r.failures]
    if skipped:
        n = len(skipped[0].failures)  # every member reads the same DATA
        where = ", ".join(str(r.run_dir / ERRORS_FILE) for r in skipped)
        typer.echo(f"{n} file{'s' if n != 1 else ''} skipped: could not be read (see {where})", err=True)


Layout = field_option(TrainConfig, "layout")  # evaluate reads DATA the same way


@app.command()
@reports_errors
@config_options(TrainConfig)
def train(
    data: DataArg,
    out: RunOut,
    options: dict,
    resume: TrainResume = False,
    members: Members = 1,
    diversity: Diversity = DEFAULT_DIVERSITY,
    overwrite: Overwrite = False,
    quiet: Quiet = False,
    engine: Engine = "local",
    workers: Workers = 2,
    gpus_per_worker: GpusPerWorker = 0.0,
    ray_address: RayAddress = "",
) -> int:
    """Train a classifier from scratch; writes model.keras, cvtool.json, history, checkpoints/, logs/ into --out."""
    _refuse_impossible_out(out, remote=False)  # these modules import TensorFlow: fail fast
    out = local_path(out)
    cfg = from_options(TrainConfig, options, resume)  # --resume: the stored config; only --epochs can change
    if _on_ray(engine):
        if members > 1:
            from cvtool.errors import UsageError

            raise UsageError("--members does not run on --engine ray yet; train the members with --engine local")
        return _train_on_ray("train", data, out, cfg, workers, gpus_per_worker, ray_address, overwrite, resume, quiet)
    from cvtool.train import train as run_train

    if members > 1:
        from cvtool.train import train_members

        if resume:
            from cvtool.errors import UsageError

            raise UsageError("--resume works on one run; resume each RUN/member-N folder on its own")
        results = train_members(
            data, out, cfg=cfg, members=members, diversity=diversity, overwrite=overwrite, quiet=quiet
        )
        typer.echo(f"ensemble of {members} models saved to {out}")
        _report_skipped(results)
        return 1 if any(r.failures for r in results) else 0
    result = run_train(data, out, cfg=cfg, overwrite=overwrite, quiet=quiet, resume=resume)
    typer.echo(f"model saved to {result.run_dir}")
    _report_skipped([result])
    return 1 if result.failures else 0


@app.command()
@reports_errors
@shared_options("top_k", "batch_size", *MODEL_OPTIONS, "label_format", *JOB_OPTIONS, "format", *ENGINE_OPTIONS)
def predict(model: ModelArg, input: InputArg, out: CsvOut, **options) -> int:
    """Classify every image under INPUT: one CSV row per image (path,label,score,label_2,score_2,...)."""
    from cvtool.predict import predict as run_predict

    result = run_predict(model, input, out, engine=_engine_options(options), **options)
    _report(result.processed, result.failed, result.out, result.errors, options["quiet"])
    return result.exit_code


@app.command()
@reports_errors
@shared_options("top_k", "batch_size", "overwrite", "quiet", *MODEL_OPTIONS, *TTA_FIELDS, *ENGINE_OPTIONS)
def evaluate(
    models: Annotated[
        list[str],
        typer.Argument(
            help="Run directory, .keras file or imagenet:NAME; several (or an ensemble run) are compared and combined.",
            metavar="MODEL",
            show_default=False,
        ),
    ],
    data: Annotated[str, typer.Argument(help="Labelled folder, or a flat folder with --labels.", show_default=False)],
    out: Annotated[
        str,
        typer.Option(
            "--out",
            "-o",
            help="Folder for metrics.json, confusion matrix, predictions.",
            metavar="PATH",
            show_default=False,
        ),
    ],
    labels: Annotated[
        Optional[str],
        typer.Option(help="CSV of paths (relative to DATA, else to its own folder) and labels.", metavar="PATH"),
    ] = None,
    path_column: Annotated[str, typer.Option(help="Path column of --labels.")] = "path",
    label_column: Annotated[
        str, typer.Option(help="Label column of --labels: class names, WordNet ids (imagenet:) or numeric class ids.")
    ] = "label",
    delimiter: Annotated[
        str,
        typer.Option(help="Field delimiter of --labels: one character or 'tab'; empty: detected from the header."),
    ] = "",
    split: Annotated[
        str, typer.Option(help="auto (test/, else validation/, else all), test, validation, train or all.")
    ] = "auto",
    layout: Layout = "auto",
    rank: Annotated[str, typer.Option(help="Comma list of N for rank-N (top-N) accuracy.")] = "1,3,5",
    rule: Rule = "mean",
    rule_weights: RuleWeights = "",
    use_tta: Annotated[bool, typer.Option("--tta", help="Also score TTA views and report the gain.")] = False,
    report: Annotated[
        bool, typer.Option("--report/--no-report", help="Write OUT/report.html (plots, captioned thumbnails).")
    ] = True,
    report_max: Annotated[
        int, typer.Option(help="Misclassified images shown in report.html, most confident first (0-1000).")
    ] = 100,
    explain: Annotated[
        int, typer.Option(min=0, help="Grad-CAM overlays in report.html for the N most confident errors.")
    ] = 0,
    **options,
) -> int:
    """Accuracy, rank-N accuracy, per-class precision/recall/F1 and a confusion matrix.

    Several MODELs (or an ensemble run) are combined by --rule and compared side by side with each member alone;
    --tta adds the TTA views and reports the gain.
    """
    from cvtool.errors import UsageError
    from cvtool.evaluate import evaluate as run_evaluate
    from cvtool.rules import parse_weights

    try:
        ranks = tuple(int(r) for r in rank.split(",") if r.strip())
    except ValueError:
        raise UsageError(f"--rank takes a comma list of integers, got {rank!r}") from None
    if split not in ("auto", "test", "validation", "train", "all"):
        raise UsageError(f"--split must be auto, test, validation, train or all, got {split!r}")
    result = run_evaluate(
        models,
        data,
        out,
        labels=labels,
        path_column=path_column,
        label_column=label_column,
        delimiter=delimiter,
        split=split,
        layout=layout,
        ranks=ranks,
        tta=_tta_options(options, use=use_tta),
        rule=rule if len(models) > 1 or rule != "mean" else None,
        rule_weights=parse_weights(rule_weights),
        engine=_engine_options(options),
        report=report,
        report_max=report_max,
        explain=explain,
        **options,
    )
    from cvtool.evaluate import format_summary

    typer.echo(format_summary(result.metrics))  # the answer: printed with --quiet too, which silences progress
    report = result.out_dir
    _report(result.processed, result.failed, join(report, "metrics.json"), join(report, "errors.csv"), options["quiet"])
    return result.exit_code


@app.command()
@reports_errors
@shared_options(*JOB_OPTIONS, *ENGINE_OPTIONS)
def segment(
    input: InputArg,
    out: Annotated[
        str,
        typer.Option(
            "--out",
            "-o",
            help="Folder for masks, overlays, legend.png, pixels.csv.",
            metavar="PATH",
            show_default=False,
        ),
    ],
    model: Annotated[
        str,
        typer.Option(
            "--model", "-m", envvar="CVTOOL_SEGMENT_MODEL", help="TF-Hub handle, SavedModel folder or .keras file."
        ),
    ] = DEFAULT_SEGMENT_MODEL,
    classes: Annotated[
        Optional[str],
        typer.Option(
            metavar="PATH",
            help="Class file: JSON list of {id,name,color} or CSV id,name,r,g,b "
            "(default: built-in CamVid for 32 or 33 outputs, else numbered classes)",
            show_default=False,
        ),
    ] = None,
    input_range: Annotated[str, typer.Option(help="Pixel range the model takes: 0-1, 0-255 or -1-1.")] = "0-1",
    input_size: Annotated[
        Optional[str],
        typer.Option(help="HxW every image is resized to, for fixed-size models (default: the image's own size)."),
    ] = None,
    max_side: Annotated[
        int, typer.Option(min=0, help="Downscale images whose longer side is over this before the model (0: never).")
    ] = 1024,
    drop_background: Annotated[
        Optional[bool],
        typer.Option(
            "--drop-background/--keep-background",
            help="With an extra background channel 0: drop it, or keep it as class 255 (default: drop).",
            show_default=False,
        ),
    ] = None,
    alpha: Annotated[float, typer.Option(min=0.0, max=1.0, help="Weight of the colour mask in overlays.")] = 0.6,
    overlay_format: Annotated[str, typer.Option(help="Overlay files: jpg or png.")] = "jpg",
    batch_size: SegmentBatchSize = 4,
    unsafe_load: UnsafeLoad = False,
    **options,
) -> int:
    """Per-pixel classes for every image under INPUT: mask, colour mask and overlay per image, legend, pixel counts."""
    engine = _engine_options(options)
    _refuse_impossible_out(out)  # these modules import TensorFlow: fail fast
    from cvtool.segment import SegmentConfig, parse_size
    from cvtool.segment import segment as run_segment

    cfg = SegmentConfig(
        model=model,
        classes=classes,
        input_range=input_range,
        input_size=parse_size(input_size),
        max_side=max_side,
        drop_background=drop_background,
        alpha=alpha,
        overlay_format=overlay_format,
        batch_size=batch_size,
        unsafe_load=unsafe_load,
    )
    result = run_segment(input, out, config=cfg, engine=engine, **options)
    _report(result.processed, result.failed, out, result.errors, options["quiet"])
    return result.exit_code


@app.command("models")
@reports_errors
def models_command(
    folder: Annotated[
        Optional[Path],
        typer.Argument(
            help="Folder searched (recursively) for run directories; without it, only imagenet: names are listed.",
            show_default=False,
        ),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> int:
    """List what can be given as MODEL: the imagenet:NAME classifiers, and run directories under FOLDER."""
    import json

    from cvtool.catalog import format_catalog, list_models
    from cvtool.progress import warn

    catalog = list_models(folder)
    for run_dir, reason in catalog.skipped:
        warn(f"{run_dir}: skipped: {reason}")
    if as_json:
        typer.echo(json.dumps({"imagenet": catalog.imagenet, "runs": catalog.runs}, indent=2))
    else:
        typer.echo(format_catalog(catalog))
    return 0


@app.command()
@reports_errors
def merge(
    out: Annotated[
        str,
        typer.Argument(help="Combined file to write: .csv, .jsonl or .parquet (a path or a URL).", show_default=False),
    ],
    shards: Annotated[
        list[str],
        typer.Argument(help="Shard files (from --shard K/N runs), in any format, paths or URLs.", show_default=False),
    ],
    partial: Annotated[bool, typer.Option("--partial", help="Merge even if some shards of K/N are missing.")] = False,
    overwrite: Overwrite = False,
    quiet: Quiet = False,
    format: ResultFormat = None,
) -> int:
    """Combine shard results (and their errors files) into one, in input order; refuses duplicates and mixed models."""
    from cvtool.merge import merge as run_merge

    result = run_merge(out, shards, overwrite=overwrite, partial=partial, format=format)
    _report(result.processed, result.failed, result.out, result.errors, quiet)
    return result.exit_code


@app.command()
@reports_errors
@shared_options("batch_size", "unsafe_load", "weights", *JOB_OPTIONS, *ENGINE_OPTIONS)
def gradcam(
    model: ModelArg,
    input: InputArg,
    out: Annotated[
        str,
        typer.Option(
            "--out",
            "-o",
            help="Folder for the pictures (mirroring INPUT), gradcam.csv, errors.csv.",
            metavar="PATH",
            show_default=False,
        ),
    ],
    class_name: Annotated[
        Optional[str], typer.Option("--class", help="Explain this class for every image (default: top-1 class)")
    ] = None,
    top_k: Annotated[int, typer.Option("--top-k", "-k", min=1, help="One map per each of the top K classes.")] = 1,
    layer: Annotated[
        Optional[str],
        typer.Option(
            help="Target layer name (or backbone/NAME) (default: the last convolution block's output, before pooling)"
        ),
    ] = None,
    method: Method = DEFAULT_CAM_METHOD,
    colormap: Annotated[str, typer.Option(help="OpenCV colour map name (jet, viridis, inferno, turbo...).")] = "jet",
    alpha: Annotated[float, typer.Option(help="Heatmap weight in the overlay, 0 to 1.")] = 0.5,
    layout: Annotated[str, typer.Option(help="overlay, or panel (original | heatmap | overlay).")] = "overlay",
    fmt: Annotated[str, typer.Option("--format", help="jpg or png.")] = "jpg",
    save_heatmap: Annotated[
        bool, typer.Option("--save-heatmap", help="Also write the map as 8-bit grayscale <name>.heatmap.png.")
    ] = False,
    npy: Annotated[bool, typer.Option("--npy", help="Also write the map as float32 <name>.heatmap.npy.")] = False,
    runtime: Annotated[
        str, typer.Option("--runtime", help="Grad-CAM needs gradients: auto and tf (the Keras model) only.")
    ] = "auto",
    **options,
) -> int:
    """Grad-CAM heatmaps: where the model looked, as overlays at each input image's own size."""
    engine = _engine_options(options)
    _refuse_impossible_out(out)  # these modules import TensorFlow: fail fast
    from cvtool.gradcam import gradcam as run_gradcam

    result = run_gradcam(
        model,
        input,
        out,
        layer=layer,
        method=method,
        class_name=class_name,
        top_k=top_k,
        colormap=colormap,
        alpha=alpha,
        layout=layout,
        fmt=fmt,
        save_heatmap=save_heatmap,
        npy=npy,
        runtime=runtime,
        engine=engine,
        **options,
    )
    _report(result.processed, result.failed, result.out, result.errors, options["quiet"])
    return result.exit_code


@app.command()
@reports_errors
@shared_options("batch_size", "overwrite", "quiet", "unsafe_load", "weights")  # gradients: TensorFlow only
def visualize(
    model: ModelArg,
    input: Annotated[
        str,
        typer.Argument(
            help="Image file, or folder searched recursively (a path or a URL).", metavar="IMAGE", show_default=False
        ),
    ],
    out: Annotated[
        str,
        typer.Option(
            "--out", "-o", help="Local folder for the activation grids and filter patterns.", show_default=False
        ),
    ],
    layers: Annotated[
        Optional[str],
        typer.Option(help="Comma list of layer names (or backbone/NAME).", show_default="one per convolution block"),
    ] = None,
    filters: Annotated[int, typer.Option(min=0, help="Filter patterns per layer (its first N); 0: none.")] = 16,
    channels: Annotated[int, typer.Option(min=0, help="Channels per activation grid (the first N); 0: all.")] = 64,
    steps: Annotated[int, typer.Option(min=0, help="Gradient-ascent steps of the filter patterns.")] = 30,
    step_size: Annotated[float, typer.Option(help="Pixel levels (RMS) per gradient-ascent step.")] = 5.0,
    **options,
) -> int:
    """Intermediate activations of each image as channel grids, and the patterns that maximise chosen filters."""
    _refuse_impossible_out(out, remote=False, what="visualize writes its pictures locally")
    out = Path(local_path(out))
    from cvtool.visualize import visualize as run_visualize

    result = run_visualize(
        model,
        input,
        out,
        layers=layers,
        filters=filters,
        channels=channels,
        steps=steps,
        step_size=step_size,
        **options,
    )
    _report(result.processed, result.failed, result.out, result.errors, options["quiet"])
    return result.exit_code


@app.command()
@reports_errors
@config_options(FinetuneConfig)
def finetune(
    data: DataArg,
    out: RunOut,
    options: dict,
    resume: TrainResume = False,
    overwrite: Overwrite = False,
    quiet: Quiet = False,
    engine: Engine = "local",
    workers: Workers = 2,
    gpus_per_worker: GpusPerWorker = 0.0,
    ray_address: RayAddress = "",
) -> int:
    """Transfer learning: train a new head on a frozen pretrained backbone, then fine-tune its top layers."""
    _refuse_impossible_out(out, remote=False)  # these modules import TensorFlow: fail fast
    out = local_path(out)
    cfg = from_options(FinetuneConfig, options, resume)  # --resume: the stored config; only --epochs can change
    if _on_ray(engine):
        gpus, address = gpus_per_worker, ray_address
        return _train_on_ray("finetune", data, out, cfg, workers, gpus, address, overwrite, resume, quiet)
    from cvtool.finetune import finetune as run_finetune

    result = run_finetune(data, out, cfg=cfg, overwrite=overwrite, quiet=quiet, resume=resume)
    typer.echo(f"model saved to {result.run_dir}")
    _report_skipped([result])
    return 1 if result.failures else 0


@app.command()
@reports_errors
def tune(
    data: DataArg,
    out: Annotated[
        str, typer.Option("--out", "-o", help="Search folder to create (local).", metavar="PATH", show_default=False)
    ],
    tuner: Annotated[str, typer.Option(help=f"Search strategy: {TUNERS.described()}.", metavar="TEXT")] = "random",
    max_trials: Annotated[int, typer.Option(min=1, help="Trials in all (a resumed search counts its own).")] = 10,
    epochs: Annotated[int, typer.Option(min=1, help="Epochs per trial (hyperband: the most one trial gets).")] = 5,
    objective: Annotated[
        str, typer.Option(help=f"What the search optimises: {' or '.join(OBJECTIVES)}.", metavar="TEXT")
    ] = "val_accuracy",
    image_sizes: Annotated[
        str, typer.Option(help="Square sides (pixels) the search chooses among, comma-separated.", metavar="TEXT")
    ] = ",".join(map(str, DEFAULT_IMAGE_SIZES)),
    seed: Annotated[int, typer.Option(help="Seeds the search and every trial.")] = 42,
    val_split: Annotated[float, typer.Option(help="Fraction held out per class when DATA has no validation/.")] = 0.2,
    layout: Layout = "auto",
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue the search in --out; finished trials are kept.", metavar="")
    ] = False,
    overwrite: Overwrite = False,
    quiet: Quiet = False,
) -> int:
    """Hyper-parameter search (Keras Tuner) over train's options; writes trials.csv, best.json and best/ (a run)."""
    _refuse_impossible_out(out, remote=False, what="a search folder is written locally")
    out = Path(local_path(out))
    from cvtool.config import TrainConfig as Base
    from cvtool.errors import UsageError
    from cvtool.tune import tune as run_tune

    try:
        sizes = [int(s) for s in image_sizes.split(",") if s.strip()]
    except ValueError:
        raise UsageError(f"--image-sizes must be whole numbers separated by commas, got {image_sizes!r}") from None
    base = Base(seed=seed, val_split=val_split, layout=layout)
    result = run_tune(
        data,
        out,
        tuner=tuner,
        max_trials=max_trials,
        epochs=epochs,
        objective=objective,
        image_sizes=sizes or DEFAULT_IMAGE_SIZES,
        base=base,
        resume=resume,
        overwrite=overwrite,
        quiet=quiet,
    )
    if result.best is not None:
        best = result.best
        typer.echo(f"{result.trials} trials; best trial {best['trial']}: {best['objective']} {best['value']:.4f}")
        typer.echo(f"best model saved to {out / 'best'}")
    return 0


@app.command()
@reports_errors
@shared_options(
    *TTA_FIELDS, "top_k", "batch_size", *MODEL_OPTIONS, "label_format", *JOB_OPTIONS, "format", *ENGINE_OPTIONS
)
def tta(model: ModelArg, input: InputArg, out: CsvOut, **options) -> int:
    """Predictions averaged over augmented views of every image (test-time augmentation); predict's CSV format."""
    from cvtool.tta import tta as run_tta

    result = run_tta(model, input, out, options=_tta_options(options), engine=_engine_options(options), **options)
    _report(result.processed, result.failed, result.out, result.errors, options["quiet"])
    return result.exit_code


@app.command()
@reports_errors
@shared_options(
    *TTA_FIELDS, "top_k", "batch_size", "unsafe_load", "runtime", "label_format", *JOB_OPTIONS, "format",
    *ENGINE_OPTIONS,
)  # fmt: skip
def ensemble(
    models: Annotated[
        Optional[list[str]],
        typer.Argument(
            help="Run directories, .keras files or imagenet:NAME (an ensemble run adds its members).",
            show_default=False,
            metavar="MODEL",
        ),
    ] = None,
    input: Annotated[
        Optional[str],
        typer.Argument(help="Image file, or folder searched recursively (the last argument).", show_default=False),
    ] = None,
    out: CsvOut = ...,
    rule: Rule = "mean",
    rule_weights: RuleWeights = "",
    use_tta: Annotated[bool, typer.Option("--tta", help="Apply the TTA views to every member.")] = False,
    weights: Annotated[
        Optional[str],
        typer.Option(
            "--weights",
            help="For imagenet:NAME members: a local weights file (one such member) or a folder of NAME.h5 files. "
            "Default: $CVTOOL_IMAGENET_WEIGHTS, else Keras' download cache.",
            show_default=False,
        ),
    ] = None,
    old_input: Annotated[Optional[str], typer.Option("--input", "-i", hidden=True)] = None,
    **options,
) -> int:
    """Combine several models' predictions (classes aligned by name); predict's CSV format.

    INPUT is the last argument, as in every command: cvtool ensemble MODEL... INPUT --out CSV.
    """
    from cvtool.ensemble import ensemble as run_ensemble
    from cvtool.errors import UsageError
    from cvtool.progress import warn
    from cvtool.rules import parse_weights

    models = list(models or [])
    if old_input is not None:  # deprecated spelling: every argument is a MODEL
        warn("ensemble --input is deprecated and will be removed; give INPUT as the last argument")
        if input is not None and Path(input).resolve() == Path(old_input).resolve():
            raise UsageError(f"INPUT {input} is given twice (as the last argument and with --input); give it once")
        models += [str(input)] if input is not None else []
        input = old_input
    if input is None or not models:
        raise UsageError("give MODEL... and then INPUT (cvtool ensemble MODEL... INPUT --out CSV)")
    if weights is not None and _is_number_list(weights):  # deprecated spelling of --rule-weights
        warn("ensemble --weights N,N... is deprecated; use --rule-weights (--weights names ImageNet weights)")
        if rule_weights:
            raise UsageError("give the rule's weights once: --rule-weights (not also the deprecated --weights N,N)")
        rule_weights, weights = rule_weights or weights, None
    result = run_ensemble(
        models,
        input,
        out,
        rule=rule,
        rule_weights=parse_weights(rule_weights),
        weights=weights,
        tta=_tta_options(options, use=use_tta),
        engine=_engine_options(options),
        **options,
    )
    _report(result.processed, result.failed, result.out, result.errors, options["quiet"])
    return result.exit_code


@app.command("export")
@reports_errors
def export_command(
    model: Annotated[
        str,
        typer.Argument(
            help="Run directory from train/finetune, its .keras file, or imagenet:NAME (with --out).",
            metavar="RUN",
            show_default=False,
        ),
    ],
    fmt: Annotated[str, typer.Option("--format", "-f", help=f"What to write: {EXPORT_FORMATS.described()}.")],
    out: Annotated[
        Optional[Path],
        typer.Option(
            "--out",
            "-o",
            help="Artefact to write; labels.txt and export.json go beside it.",
            show_default="RUN/export/saved_model, model.tflite, model-int8.tflite or model.onnx",
        ),
    ] = None,
    int8: Annotated[
        bool, typer.Option("--int8", help="TFLite full-integer quantization (uint8 pixels in), calibrated on images.")
    ] = False,
    calibration: Annotated[
        Optional[Path],
        typer.Option(
            help="Folder of images: what --int8 calibrates on, and the parity set when the run's validation "
            "images are not available (class sub-folders add accuracy).",
            show_default="the run's training images (int8), validation images (parity)",
        ),
    ] = None,
    samples: Annotated[int, typer.Option(min=1, help="At most this many images scored for parity.")] = 200,
    overwrite: Overwrite = False,
    quiet: Quiet = False,
    unsafe_load: UnsafeLoad = False,
    weights: ImagenetWeights = None,
) -> int:
    """Export a model as a standalone SavedModel, TFLite or ONNX file (RGB 0-255 in, probabilities out).

    Parity with the Keras model is measured on the run's validation images: a float export that disagrees
    (top-1 agreement < 99.5% or max |dp| > 1e-3) is refused (exit 3).
    """
    from cvtool.export import export

    result = export(
        model,
        format=fmt,
        out=out,
        int8=int8,
        calibration=calibration,
        samples=samples,
        overwrite=overwrite,
        quiet=quiet,
        unsafe_load=unsafe_load,
        weights=weights,
    )
    typer.echo(result.summary())
    return 0


def _is_number_list(text: str) -> bool:
    """Is ``text`` a comma list of numbers (old ``ensemble --weights 0.5,0.5``) rather than a path?"""
    try:
        return bool([float(w) for w in text.split(",") if w.strip()]) and not Path(text).exists()
    except ValueError:
        return False


def _tta_options(options: dict, use: bool = True):
    """Take the TTA options out of a command's ``options``; with ``use``, they as one :class:`cvtool.tta.TtaOptions`."""
    fields = {name: options.pop(name) for name in TTA_FIELDS}
    if not use:
        return None
    from cvtool.tta import TtaOptions, parse_transforms

    return TtaOptions(**{**fields, "transforms": parse_transforms(fields["transforms"])})


def join(base, name: str):
    """``base/name`` for a local path or a URL (evaluate's report folder may be either)."""
    from cvtool.storage import join as join_location

    return join_location(base, name)


def _engine_options(options: dict):
    """Take the engine options out of a command's ``options``: one :class:`cvtool.engines.EngineSettings`."""
    from cvtool.engines import engine_settings

    fields = {name: options.pop(name) for name in ENGINE_OPTIONS if name in options}
    return engine_settings(
        fields["engine"],
        address=fields["ray_address"],
        replicas=fields["replicas"],
        cpus_per_replica=fields["cpus_per_replica"],
        gpus_per_replica=fields["gpus_per_replica"],
    )


def _report(processed: int, failed: int, out: Path | str, errors: Path | str, quiet: bool) -> None:
    if failed:
        typer.echo(f"{processed} images done, {failed} failed (see {errors}); wrote {out}", err=True)
    elif not quiet:
        typer.echo(f"{processed} images done; wrote {out}", err=True)


for _command in app.registered_commands:  # every command, whoever declared it, gets the plain --help
    if _command.cls in (None, TyperCommand):
        _command.cls = _PlainHelpCommand


def main() -> None:
    """Console-script entry point: usage errors as one line (exit 2), never a traceback."""
    try:
        from typer._click.exceptions import ClickException  # typer >= 0.2x carries its own click
        from typer.exceptions import Abort
    except ImportError:  # pragma: no cover - older typer on top of click
        from click.exceptions import Abort, ClickException

    try:
        code = app(standalone_mode=False)
    except ClickException as exc:  # bad option, missing argument, unknown command: exit 2
        if not exc.format_message():  # `cvtool` alone: the help was shown
            sys.exit(exc.exit_code)
        hint = f" (see: {exc.ctx.command_path} --help)" if getattr(exc, "ctx", None) is not None else ""
        print(f"error: {exc.format_message()}{hint}", file=sys.stderr)
        sys.exit(exc.exit_code)
    except Abort:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except Exception as exc:  # noqa: BLE001 - last resort: one line, never a traceback
        print(f"error: unexpected {type(exc).__name__}: {exc} (please report this)", file=sys.stderr)
        sys.exit(EXIT_UNUSABLE)
    sys.exit(code if isinstance(code, int) else 0)


__all__ = ["app", "main", "EXIT_USAGE"]
