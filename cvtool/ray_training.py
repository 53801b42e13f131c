"""`train` and `finetune` with ``--engine ray``: cvtool's own trainer on N Ray Train workers.

Ray Train's ``TensorflowTrainer`` starts ``--workers`` processes and sets ``TF_CONFIG`` in each, so
:func:`cvtool.devices.distribution_strategy` picks ``MultiWorkerMirroredStrategy``; every worker then runs
the ordinary :func:`cvtool.train.train` / :func:`cvtool.finetune.finetune` (same data pipeline, callbacks,
precise BN, checkpoints). Worker 0, the chief, writes the normal run directory (``--out``); the others write
into scratch folders that are deleted at the end. ``--batch-size`` is per worker: the global batch is
``batch_size x workers`` (x GPUs per worker), and the learning rate is used as given (scale it yourself,
docs/ray.md).

Keras 3's ``model.fit`` does not run under ``MultiWorkerMirroredStrategy`` (it fails converting the
per-replica batch, keras-team/keras#20585, ray-project/ray#47464); cvtool's custom loop
(``--loop custom``: ``strategy.run`` inside a ``tf.function``) does, so Ray training uses it.

A worker that fails (killed process, lost node) makes Ray Train restart the group (``--max-failures``);
the restarted workers continue from the chief's last resume point (``--resume`` of the same run), so
``--out`` must be on a filesystem every worker sees (one machine, NFS, or a bucket URL).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import tempfile
from pathlib import Path

from cvtool.errors import CvtoolError, UnusableError, UsageError, first_line
from cvtool.progress import info, warn
from cvtool.ray_cluster import check_fits, ray_session

KINDS = ("train", "finetune")


@dataclasses.dataclass
class RayTrainResult:
    """The run directory the chief wrote, and how many files of DATA could not be read (its errors.csv)."""

    run_dir: Path
    skipped: int


def _run_fn(kind: str):
    if kind == "train":
        from cvtool.train import train

        return train
    from cvtool.finetune import finetune

    return finetune


def resume_point_text(run_dir: Path) -> str | None:
    """The run's resume point (``checkpoints/last.json``) as text, or None: it changes after every epoch."""
    from cvtool.bundle import CHECKPOINT_DIR
    from cvtool.callbacks import RESUME_FILE

    try:
        return (run_dir / CHECKPOINT_DIR / RESUME_FILE).read_text(encoding="utf-8")
    except OSError:
        return None


def worker_loop(config: dict) -> None:
    """One Ray Train worker: cvtool's trainer, the chief into ``out``, the others into a scratch folder."""
    import ray.train

    rank = ray.train.get_context().get_world_rank()
    out = Path(config["out"])
    # A resume point other than the one found before the job started: an earlier attempt of this job wrote it
    # and a worker failed since; every worker continues from it. (No worker finishes an epoch before all have
    # checked: the strategy's first collective waits for them.)
    now = resume_point_text(out)
    resume = config["resume"] or (now is not None and now != config["resume_point_before"])
    if rank == 0:
        target = out
    else:
        target = Path(tempfile.mkdtemp(prefix=f"cvtool-worker-{rank}-"))
        if resume:  # continue from the chief's resume point, in step with it
            shutil.rmtree(target)
            shutil.copytree(out, target, ignore=shutil.ignore_patterns("*.lock", "logs"))
    try:
        result = _run_fn(config["kind"])(
            config["data"],
            target,
            cfg=config["cfg"],
            overwrite=config["overwrite"] and not resume,
            quiet=config["quiet"] or rank != 0,
            resume=resume,
        )
    except CvtoolError as exc:  # a refusal (bad option, unusable data): every worker meets it; no retry
        ray.train.report({"rank": rank, "error": str(exc), "exit_code": exc.exit_code})
        return
    finally:
        if rank != 0:
            shutil.rmtree(target, ignore_errors=True)
    ray.train.report({"rank": rank, "skipped": len(result.failures)})


def train_on_ray(
    kind: str,
    data: str | Path,
    out: str | Path,
    *,
    cfg,
    workers: int = 2,
    gpus_per_worker: float = 0.0,
    cpus_per_worker: float = 1.0,
    max_failures: int = 2,
    address: str | None = None,
    overwrite: bool = False,
    resume: bool = False,
    quiet: bool = False,
) -> RayTrainResult:
    """Run ``train`` or ``finetune`` on ``workers`` Ray Train workers: the run directory and files skipped.

    Args:
        kind: ``train`` or ``finetune``.
        data: the labelled folder (every worker reads it: a shared path).
        out: the run directory the chief writes (a shared path: restarted workers resume from it).
        cfg: the command's config (``TrainConfig``, ``FinetuneConfig``); ``batch_size`` is per worker.
        workers: Ray Train workers (one TensorFlow process each).
        gpus_per_worker: GPUs each worker reserves (0: CPU workers).
        cpus_per_worker: CPUs each worker reserves.
        max_failures: how many times Ray Train restarts the workers after a failure.
        address: the Ray cluster to join (None: ``$RAY_ADDRESS``, else Ray starts on this machine).
        overwrite: replace a run already in ``out``.
        resume: continue the run in ``out``.
        quiet: no progress lines from the chief.

    Example: ``train_on_ray("train", "photos/", "runs/a", cfg=TrainConfig(epochs=5), workers=4)``.
    """
    if kind not in KINDS:
        raise UsageError(f"kind must be train or finetune, got {kind!r}")
    if workers < 1:
        raise UsageError("--workers must be at least 1")
    if gpus_per_worker < 0:
        raise UsageError("--gpus-per-worker must not be negative")
    data, out = Path(data).absolute(), Path(out).absolute()
    if not data.is_dir():
        raise UsageError(f"data folder not found: {data}")
    if cfg.loop != "custom":
        warn("--engine ray trains with --loop custom (Keras 3's model.fit fails under MultiWorkerMirroredStrategy)")
        cfg = dataclasses.replace(cfg, loop="custom")
    with ray_session(address, log_to_driver=not quiet) as ray:
        from ray.train import FailureConfig, RunConfig, ScalingConfig
        from ray.train.tensorflow import TensorflowTrainer

        check_fits(ray, cpus=cpus_per_worker, gpus=gpus_per_worker, what="training worker")
        scratch = Path(tempfile.mkdtemp(prefix="cvtool-ray-train-"))
        info(f"{kind} on Ray: {workers} workers, global batch {cfg.batch_size} x {workers}", quiet)
        trainer = TensorflowTrainer(
            worker_loop,
            train_loop_config={
                "kind": kind,
                "data": str(data),
                "out": str(out),
                "cfg": cfg,
                "overwrite": overwrite,
                "resume": resume,
                "quiet": quiet,
                "resume_point_before": resume_point_text(out),
            },
            scaling_config=ScalingConfig(
                num_workers=workers,
                use_gpu=gpus_per_worker > 0,
                resources_per_worker={"CPU": cpus_per_worker, **({"GPU": gpus_per_worker} if gpus_per_worker else {})},
            ),
            run_config=RunConfig(
                name="cvtool-" + kind,
                storage_path=str(scratch / "ray"),
                failure_config=FailureConfig(max_failures=max_failures),
            ),
        )
        try:
            metrics = trainer.fit().metrics or {}
        except Exception as exc:  # noqa: BLE001 - Ray Train's errors wrap the workers': one line
            cause = _worker_cause(exc)
            if isinstance(cause, CvtoolError):
                raise cause from None
            raise UnusableError(f"Ray training failed: {first_line(cause)}") from None
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    if metrics.get("error"):
        error = UsageError if metrics.get("exit_code") == UsageError.exit_code else UnusableError
        raise error(metrics["error"])
    _record_workers(out, workers, gpus_per_worker)
    return RayTrainResult(out, int(metrics.get("skipped", 0)))


def _worker_cause(exc: BaseException) -> BaseException:
    """The first worker's own exception inside Ray Train's error, else ``exc``."""
    failures = getattr(exc, "worker_failures", None)
    if isinstance(failures, dict) and failures:
        exc = next(iter(failures.values()))
    seen = 0
    while getattr(exc, "cause", None) is not None and seen < 10:
        exc, seen = exc.cause, seen + 1
    return exc.__cause__ if exc.__cause__ is not None and not isinstance(exc, CvtoolError) else exc


def _record_workers(run_dir: Path, workers: int, gpus_per_worker: float) -> None:
    """cvtool.json says how the run was trained: on Ray, with how many workers."""
    from cvtool.bundle import META_FILE
    from cvtool.outputs import write_json

    meta_path = run_dir / META_FILE
    if not meta_path.exists():
        return
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    if isinstance(meta.get("training"), dict):
        meta["training"].update({"engine": "ray", "workers": workers, "gpus_per_worker": gpus_per_worker})
    write_json(meta_path, meta)
