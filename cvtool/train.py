"""`cvtool train`: a classifier trained from scratch into a run directory; `train --members K`: an ensemble.

The engine (run folder, data, callbacks, loops, cvtool.json) is :mod:`cvtool.trainer`;
this module builds the model and runs it.
"""

from __future__ import annotations

from pathlib import Path

from cvtool.bundle import META_FILE, write_ensemble_manifest
from cvtool.config import TrainConfig
from cvtool.errors import UsageError
from cvtool.locks import holds_output_lock
from cvtool.members import DEFAULT_DIVERSITY, DIVERSITY, member_config
from cvtool.progress import info
from cvtool.trainer import (
    Trainer,
    TrainResult,
    finished_run,
    load_data,
    open_run,
    precision_scope,
    validate,
    write_run_meta,
)


def validate_train(cfg: TrainConfig) -> None:
    """:func:`cvtool.trainer.validate`, and ``arch`` one of the networks train builds from scratch."""
    from cvtool.backbones import SCRATCH_ARCHS

    if cfg.arch not in SCRATCH_ARCHS:
        raise UsageError(
            f"--arch must be one of {', '.join(SCRATCH_ARCHS)}, got {cfg.arch!r} (other backbones: cvtool finetune)"
        )
    validate(cfg)


@holds_output_lock("out", folder=True)
def train(
    data: str | Path,
    out: str | Path,
    *,
    cfg: TrainConfig | None = None,
    overwrite: bool = False,
    quiet: bool = False,
    resume: bool = False,
    exclude: str | Path | None = None,
) -> TrainResult:
    """Train ``cfg.arch`` from scratch on the labelled folder ``data``; write the run directory ``out``.

    Args:
        data: DATA/<class>/ or DATA/train|validation|test/<class>/ (``cfg.layout``).
        out: the run directory (model.keras, cvtool.json, history, checkpoints/, logs/, errors.csv).
        cfg: the options (default: ``TrainConfig()``); with ``resume``, only its ``epochs`` counts.
        overwrite: replace a run in ``out`` once the new one has saved its first epoch
            (:class:`cvtool.trainer.RunFolder`).
        quiet: no progress lines (warnings still print).
        resume: continue the interrupted (or finished) run in ``out`` from its last epoch,
            with its stored config.
        exclude: the folder inside ``data`` never read as data (default ``out``; an ensemble
            passes its own folder).

    Returns:
        A :class:`cvtool.trainer.TrainResult`: the run folder, best-epoch metrics, skipped files, model.

    Usage: ``train("photos/", "runs/a", cfg=TrainConfig(epochs=5))``.
    """
    from cvtool.architectures import build_scratch
    from cvtool.backbones import default_image_size
    from cvtool.devices import distribution_strategy, seed_everything, strategy_name

    run, cfg, state = open_run(
        out, cfg, cls=TrainConfig, kind="train", overwrite=overwrite, resume=resume, check=validate_train
    )
    with run:
        if cfg.epochs < 1:
            raise UsageError("--epochs must be at least 1")
        if state is not None and state["epoch"] >= cfg.epochs:
            return finished_run(run, state["epoch"], quiet)
        side = cfg.image_size or default_image_size(cfg.arch)
        seed_everything(cfg.seed + (state["epoch"] if state else 0), cfg.deterministic)
        with precision_scope(cfg.mixed_precision) as mixed:
            strategy = distribution_strategy()
            info(f"training {cfg.arch} ({strategy_name(strategy)}, mixed precision {'on' if mixed else 'off'})", quiet)
            tdata = load_data(data, cfg, run_dir=run.path, side=side, quiet=quiet, exclude=Path(exclude or run.target))
            trainer = Trainer(run, cfg, tdata, kind="train", quiet=quiet, strategy=strategy)
            if state is not None:
                trainer.restore(state)
                model = trainer.load_resume_model(state)
                info(f"resuming {run.target} after epoch {trainer.epoch}", quiet)
            else:
                with strategy.scope():
                    model = build_scratch(
                        cfg.arch,
                        tdata.num_classes,
                        tdata.image_size,
                        dropout=cfg.dropout,
                        width=cfg.width,
                        depth=cfg.depth,
                    )
                trainer.compile(model, cfg.lr)
            trainer.fit(model, cfg.epochs)
            trainer.publish()
            extra = {"arch": cfg.arch, "backbone": None if cfg.arch == "small-cnn" else cfg.arch}
            write_run_meta(trainer, data, extra, mixed)
    return trainer.result(model)


@holds_output_lock("out", folder=True)
def train_members(
    data: str | Path,
    out: str | Path,
    *,
    cfg: TrainConfig | None = None,
    members: int = 2,
    diversity: str = DEFAULT_DIVERSITY,
    overwrite: bool = False,
    quiet: bool = False,
) -> list[TrainResult]:
    """Train ``members`` models with seeds ``cfg.seed``, ``cfg.seed + 1``... into ``out/member-1..K/``.

    ``diversity`` (:data:`cvtool.members.DIVERSITY`) says how else they differ: their own
    bootstrap sample of the training split, a different augmentation, both, or nothing (default).

    Then writes ``out/cvtool.json`` naming them (rule ``mean``), so ``out`` is a MODEL for
    predict, tta, ensemble and evaluate.

    Args:
        data: the labelled folder, as for :func:`train`.
        out: the ensemble's folder.
        cfg: every member's config but its seed (default: ``TrainConfig()``).
        members: how many models.
        diversity: a :data:`cvtool.members.DIVERSITY` mode; each member's config is in its cvtool.json.
        overwrite: replace an ensemble (and members) already in ``out``.
        quiet: no progress lines.

    Returns:
        The members' :class:`cvtool.trainer.TrainResult`, in order.

    Usage: ``train_members("photos/", "runs/ens", cfg=TrainConfig(epochs=5), members=3)``.
    """
    cfg = cfg or TrainConfig()
    DIVERSITY.entry(diversity)
    validate_train(cfg)  # the options as given: a mode may change them per member (scale: the image size)
    if members < 1:
        raise UsageError("--members must be at least 1")
    run_dir = Path(out)
    if run_dir.exists() and not run_dir.is_dir():
        raise UsageError(f"--out {run_dir} is a file; give a folder for the run")
    if (run_dir / META_FILE).exists() and not overwrite:
        raise UsageError(f"{run_dir} already holds a trained model; pass --overwrite to replace it")
    results, names = [], []
    for i in range(1, members + 1):
        name = f"member-{i}"
        member_cfg = member_config(cfg, i - 1, diversity)
        info(f"member {i}/{members} (seed {member_cfg.seed}, diversity {diversity}) -> {run_dir / name}", quiet)
        results.append(train(data, run_dir / name, cfg=member_cfg, overwrite=overwrite, quiet=quiet, exclude=run_dir))
        names.append(name)
    from cvtool.bundle import read_meta

    class_names = read_meta(run_dir / names[0])["class_names"]
    write_ensemble_manifest(
        run_dir,
        names,
        class_names,
        "mean",
        {
            "config": cfg.to_dict(),
            "diversity": diversity,
            "members_metrics": {n: r.metrics for n, r in zip(names, results)},
        },
    )
    info(f"ensemble of {members} members saved to {run_dir}", quiet)
    return results
