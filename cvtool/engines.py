"""Where a command's per-batch work runs: the engines behind ``--engine`` (a registry, like every other variant).

An engine turns the listed images into ``(Batch, results)`` pairs **in input order**: each
:class:`~cvtool.batches.Batch` holds the images decoded successfully and the failures met on the way, and
the results are what the command's :class:`Work` made of the decoded images (a scorer's probabilities
[images, members, views, classes]; Grad-CAM's maps rendered as image bytes; segmentation masks encoded as
PNG). What happens to them (rows of the one output job, files, metrics) is the command's business, on the
driver, so every engine writes the same rows, files, errors file and exit code.

- ``local``: this process: decode threads (:func:`cvtool.batches.batched`) and the model here.
- ``ray``: Ray Data (:mod:`cvtool.ray_inference`): decode tasks and an actor pool of model replicas, on a
  Ray cluster or on Ray started on this machine.

This module imports neither TensorFlow nor Ray (``--help`` reads it).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from cvtool.errors import UsageError
from cvtool.registry import Registry

ENGINES = Registry("--engine")


class Work(Protocol):
    """A command's per-batch work, as every engine runs it (:class:`cvtool.scoring.Scorer`,
    :class:`cvtool.gradcam.GradcamWork`, :class:`cvtool.segment.SegmentWork`).

    ``decode`` runs in decode threads (local) or CPU tasks (Ray); ``run`` runs where the model is: this
    process (local), or a model replica that loaded it once (Ray: :meth:`portable` is what travels,
    :meth:`loaded` what the replica makes of it). ``key``: None, or a function of a payload; batches then end
    where it changes (images stacked into one model call must share a shape).
    """

    key: Callable[[Any], Any] | None

    def decode(self, item) -> Any:
        """The payload of one image (raises :class:`cvtool.errors.ImageError` for a bad file)."""

    def run(self, payloads: list) -> Sequence:
        """One result per payload, in order."""

    def join(self, results: list) -> Any:
        """Results gathered one by one (from the Ray engine's blocks) as :meth:`run` returns them."""

    def portable(self) -> Work:
        """A copy without its models, to send to other processes (a usage error when they cannot load them)."""

    def loaded(self) -> Work:
        """The portable copy with its models loaded again (once per model replica)."""

    def decode_bytes(self) -> int:
        """About the most memory one decoded payload holds (the Ray engine reserves it for decode tasks)."""


@dataclass(frozen=True)
class EngineSettings:
    """Which engine runs the scoring, and the Ray engine's worker options.

    Args:
        name: ``local`` or ``ray`` (:data:`ENGINES`).
        address: a Ray cluster to join (``ray://host:10001`` or ``host:6379``); None: ``$RAY_ADDRESS``, else Ray
            is started on this machine for the run.
        replicas: (min, max) model replicas; None: one to as many as the cluster's GPUs (or CPUs, leaving
            one for decoding) allow.
        cpus_per_replica: CPUs each replica reserves.
        gpus_per_replica: GPUs each replica reserves (fractions share a GPU).

    Example: ``EngineSettings("ray", replicas=(2, 8), gpus_per_replica=1)``.
    """

    name: str = "local"
    address: str | None = None
    replicas: tuple[int, int] | None = None
    cpus_per_replica: float = 1.0
    gpus_per_replica: float = 0.0

    def __post_init__(self) -> None:
        ENGINES.entry(self.name)  # an unknown engine is refused with the choices
        if self.cpus_per_replica < 0 or self.gpus_per_replica < 0:
            raise UsageError("--cpus-per-replica and --gpus-per-replica must not be negative")
        if self.cpus_per_replica == 0 and self.gpus_per_replica == 0:
            raise UsageError("a replica needs a CPU or a GPU: --cpus-per-replica and --gpus-per-replica are both 0")
        if self.name == "ray":  # Ray missing, or a cluster that does not answer: said before any model is loaded
            from cvtool.ray_cluster import check_reachable, import_ray

            import_ray()
            address = self.address or os.environ.get("RAY_ADDRESS")
            if address:
                check_reachable(address)


def parse_replicas(text: str | None) -> tuple[int, int] | None:
    """``--replicas``: ``N`` (a fixed pool), ``MIN:MAX`` (Ray scales between them) or empty/``auto`` (None).

    Example: ``parse_replicas("2:8")`` is ``(2, 8)``.
    """
    if text is None or text.strip() in ("", "auto"):
        return None
    parts = text.split(":")
    try:
        low, high = (int(parts[0]), int(parts[-1])) if len(parts) <= 2 else (0, -1)
    except ValueError:
        low, high = 0, -1
    if len(parts) > 2 or low < 1 or high < low:
        raise UsageError(f"--replicas takes N or MIN:MAX with 1 <= MIN <= MAX, got {text!r}")
    return low, high


def engine_settings(
    engine: str | EngineSettings | None = None,
    *,
    address: str | None = None,
    replicas: str | tuple[int, int] | None = None,
    cpus_per_replica: float = 1.0,
    gpus_per_replica: float = 0.0,
) -> EngineSettings:
    """The settings of ``engine`` (a name; None: ``$CVTOOL_ENGINE``, else ``local``), options checked.

    Example: ``engine_settings("ray", replicas="1:4")``.
    """
    if isinstance(engine, EngineSettings):
        return engine
    name = engine or os.environ.get("CVTOOL_ENGINE", "").strip() or "local"
    if isinstance(replicas, str) or replicas is None:
        replicas = parse_replicas(replicas)
    return EngineSettings(name, address or None, replicas, cpus_per_replica, gpus_per_replica)


@ENGINES.register("local", help="this process: decode threads and one model")
def local_batches(work: Work, items: Iterable, batch_size: int, settings: EngineSettings) -> Iterator[tuple]:
    from cvtool.batches import batched

    for batch in batched(items, work.decode, batch_size, key=work.key):
        yield batch, work.run(batch.payloads) if batch.payloads else work.join([])  # failures only: no model call


@ENGINES.register("ray", help="Ray Data: decode tasks and a pool of model replicas, on a cluster or this machine")
def ray_batches(work: Work, items: Iterable, batch_size: int, settings: EngineSettings) -> Iterator[tuple]:
    from cvtool.ray_inference import ray_work_batches

    yield from ray_work_batches(work, items, batch_size, settings)


def engine_batches(
    work: Work, items: Iterable, batch_size: int, engine: str | EngineSettings | None = None
) -> Iterator[tuple]:
    """``(Batch, work's results)`` for ``items``, in input order, on ``engine``.

    Args:
        work: what decodes and processes the images (a :class:`~cvtool.scoring.Scorer`: scores
            [images, members, views, classes]; :class:`Work` says what else).
        items: the images left to do, in order.
        batch_size: images per batch.
        engine: an engine name or :class:`EngineSettings` (None: ``$CVTOOL_ENGINE``, else local).

    Example: ``for batch, scores in engine_batches(scorer, items, 32, "ray"): ...``.
    """
    settings = engine_settings(engine)
    yield from ENGINES.get(settings.name)(work, items, batch_size, settings)
