"""The Ray engine: Ray Data decode tasks, an actor pool of model replicas, results in input order.

It runs any command's per-batch :class:`~cvtool.engines.Work` (a scorer for predict, tta, ensemble and
evaluate; Grad-CAM; segmentation). The pipeline for the images a job still has to do (listed once, on the
driver, after ``--resume`` and ``--shard`` filtering):

1. the list becomes a Ray dataset of one block per batch (each row: its position and its pickled
   :class:`~cvtool.images.InputItem`, so local paths and URLs travel the same way);
2. **decode tasks** (CPU) run cvtool's own decoder on each block: :func:`cvtool.batches.decode_stream` with the
   work's ``decode`` (EXIF, DCT-scaled JPEG, TTA views, the original kept for overlays); a bad file becomes a
   row with its error, carried along to the errors file;
3. **model replicas** (an actor pool, ``concurrency=(min, max)``) each load the models once (the work's
   ``loaded``, through the commands' one loading path) and run the work on whole blocks: scores, or Grad-CAM
   maps and segmentation masks already rendered and encoded as image files, so that the heavy CPU work is
   spread too;
4. the driver reads the blocks **in input order** (``preserve_order``) one at a time, so its memory stays flat,
   and hands them to the command's single writer (rows and files).

Exactly once: Ray retries a decode task whose worker died and restarts a killed replica and retries its
batch (``max_restarts``/``max_task_retries``); the driver checks the positions it receives, so a row is
never written twice and a missing one stops the run (``--resume`` continues it) instead of going unnoticed.
"""

from __future__ import annotations

import dataclasses
import math
import pickle
from collections.abc import Iterable, Iterator
from pathlib import Path

from cvtool.batches import Batch, Failure, decode_stream
from cvtool.engines import EngineSettings, Work
from cvtool.errors import CvtoolError, UnusableError, first_line
from cvtool.images import InputItem
from cvtool.ray_cluster import check_fits, node_resources, ray_session, total


def _portable_item(item: InputItem) -> bytes:
    """The item as workers open it: a relative local path made absolute (workers run in another folder)."""
    if isinstance(item.path, Path) and not item.path.is_absolute():
        item = dataclasses.replace(item, path=item.path.absolute())
    return pickle.dumps(item)


def decode_block(table, work: Work):
    """Decode task: one block of items -> positions, error texts ('' when decoded) and pickled payloads."""
    import pyarrow as pa

    items = [pickle.loads(b) for b in table["item"].to_pylist()]
    errors, payloads = [], []
    for _, result in decode_stream(items, work.decode):
        failed = isinstance(result, Failure)
        errors.append(result.reason if failed else "")
        payloads.append(b"" if failed else pickle.dumps(result, protocol=5))
    return pa.table(
        {"i": table["i"], "error": pa.array(errors, pa.string()), "payload": pa.array(payloads, pa.large_binary())}
    )


class ModelReplica:
    """Actor: loads the work's models once, then runs it on decoded blocks (one pickled result per image).

    A block's images are run in groups of consecutive images with one ``work.key`` (one model call each), as
    the local engine batches them.
    """

    def __init__(self, work: Work):
        self.work = work.loaded()

    def __call__(self, table):
        import pyarrow as pa

        errors = table["error"].to_pylist()
        payloads = table["payload"].to_pylist()
        ok = [k for k, e in enumerate(errors) if not e]
        decoded = [pickle.loads(payloads[k]) for k in ok]
        results = []
        for group in _runs(decoded, self.work.key):
            results.extend(self.work.run(group))
        out = [b""] * len(errors)
        for j, k in enumerate(ok):
            out[k] = pickle.dumps(results[j], protocol=5)
        return pa.table({"i": table["i"], "error": table["error"], "result": pa.array(out, pa.large_binary())})


def _runs(payloads: list, key) -> Iterator[list]:
    """``payloads`` cut where ``key(payload)`` changes (all of them at once without a key)."""
    group: list = []
    for payload in payloads:
        if group and key is not None and key(payload) != key(group[-1]):
            yield group
            group = []
        group.append(payload)
    if group:
        yield group


def bound_replica(work: Work) -> type:
    """A :class:`ModelReplica` class that carries ``work`` in its own definition, not as a constructor
    argument: Ray keeps constructor arguments in the object store, where a lost node can take them and make
    restarting the replica fail (ray-project/ray#53727)."""

    class BoundModelReplica(ModelReplica):
        def __init__(self):
            super().__init__(work)

    return BoundModelReplica


def decode_memory(work: Work, batch_size: int) -> int:
    """Bytes a decode task holds: its block's decoded payloads (twice: arrays and their pickles) plus 64 MiB."""
    return 2 * batch_size * work.decode_bytes() + (64 << 20)


def auto_replicas(ray, settings: EngineSettings) -> tuple[int, int]:
    """One replica to as many as the cluster's GPUs allow (GPU replicas), or its CPUs less one for decoding."""
    if settings.gpus_per_replica > 0:
        most = total(ray, "GPU") // settings.gpus_per_replica
    else:
        most = (total(ray, "CPU") - 1) // max(settings.cpus_per_replica, 1e-9)
    return 1, max(1, int(most))


def ray_work_batches(
    work: Work, items: Iterable[InputItem], batch_size: int, settings: EngineSettings
) -> Iterator[tuple[Batch, object]]:
    """``(Batch, work's results)`` in input order, computed on Ray.

    Args:
        work: the driver's work (a scorer, Grad-CAM, segmentation); its models are loaded again in each replica.
        items: the images left to do, in order.
        batch_size: images per block (a decode task and a replica call each take one block).
        settings: the Ray engine's options (address, replicas, CPUs and GPUs per replica).

    Example: ``for batch, scores in ray_work_batches(scorer, items, 32, EngineSettings("ray")): ...``.
    """
    items = list(items)
    if not items:
        return
    shipped = work.portable()
    with ray_session(settings.address) as ray:
        from ray.data import DataContext

        check_fits(ray, cpus=settings.cpus_per_replica, gpus=settings.gpus_per_replica, what="model replica")
        low, high = settings.replicas or auto_replicas(ray, settings)
        context = DataContext.get_current()
        context.execution_options.preserve_order = True
        # Ray Data waits for capacity that may never come back (a lost node took the only place a replica or a
        # decode task fits) until its no-progress guard fires: cvtool's stall timeout, not its 30 minutes.
        context.execution_no_progress_timeout_s = stall_timeout()
        nodes = live_nodes(ray)
        rows = [{"i": i, "item": _portable_item(item)} for i, item in enumerate(items)]
        ds = ray.data.from_items(rows, override_num_blocks=math.ceil(len(rows) / batch_size))
        # Decode tasks reserve the memory of their block; that also keeps Ray Data from fusing decoding into
        # the replicas (its remote arguments differ): CPUs decode the next blocks while the replicas score.
        ds = ds.map_batches(
            decode_block,
            fn_kwargs={"work": shipped},
            batch_size=batch_size,
            batch_format="pyarrow",
            memory=decode_memory(shipped, batch_size),
        )
        # Ray Data restarts a killed replica and retries its batch (max_restarts and max_task_retries: -1).
        ds = ds.map_batches(
            bound_replica(shipped),
            batch_size=batch_size,
            batch_format="pyarrow",
            concurrency=(low, high) if high > low else low,
            num_cpus=settings.cpus_per_replica,
            num_gpus=settings.gpus_per_replica,
        )
        blocks = ds.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=2)
        yield from _in_order(items, _watched(blocks, ray, nodes), work)


def stall_timeout() -> int:
    """``CVTOOL_RAY_STALL_TIMEOUT``: seconds the Ray engine may go without progress before it stops (600)."""
    from cvtool.errors import env_int

    return env_int("CVTOOL_RAY_STALL_TIMEOUT", 600, minimum=1)


def live_nodes(ray) -> set[str]:
    """The ids of the cluster's live nodes."""
    return {node["NodeID"] for node in ray.nodes() if node.get("Alive")}


def _watched(blocks, ray, nodes_at_start: set[str]) -> Iterator:
    """``blocks``, with Ray Data's no-progress timeout turned into one line that says what the cluster lost and
    what it has left (exit 3); the rows written so far stay for ``--resume``."""
    try:
        yield from blocks
    except Exception as exc:  # noqa: BLE001 - anything else is _in_order's to report
        if not _is_stall(exc):
            raise
        lost = len(nodes_at_start - live_nodes(ray))  # Ray may not have noticed a lost node yet
        have = ", ".join(f"{n.get('CPU', 0):g} CPUs/{n.get('GPU', 0):g} GPUs" for n in node_resources(ray)) or "none"
        lost_text = f"; {lost} of its {len(nodes_at_start)} nodes lost" if lost else ""
        raise UnusableError(
            f"the Ray engine made no progress for {stall_timeout()} s (the cluster's live nodes: {have}{lost_text}); "
            "the rows so far are kept: rerun with --resume once the cluster has room for a model replica and a "
            "decode task"
        ) from None


def _is_stall(exc: BaseException | None) -> bool:
    """Whether ``exc`` is (or was caused by) Ray Data's ExecutionTimeoutError."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if type(exc).__name__ == "ExecutionTimeoutError":
            return True
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return False


def _in_order(items: list[InputItem], blocks, work: Work) -> Iterator[tuple[Batch, object]]:
    """The driver side: blocks checked to hold each position exactly once, in order, as cvtool batches."""
    expected = 0
    blocks = iter(blocks)
    while True:
        try:
            table = next(blocks, None)
        except CvtoolError:
            raise
        except Exception as exc:  # noqa: BLE001 - a Ray task or actor error: one line
            raise UnusableError(f"the Ray engine failed: {_ray_reason(exc)}") from None
        if table is None:
            break
        batch, results = Batch(), []
        for i, error, r in zip(table["i"].to_pylist(), table["error"].to_pylist(), table["result"].to_pylist()):
            if i < expected:
                continue  # delivered twice: written once
            if i != expected:
                raise UnusableError(f"the Ray engine lost {items[expected].rel} (got input {i}, expected {expected})")
            expected += 1
            if error:
                batch.failures.append(Failure(items[i], error))
            else:
                batch.items.append(items[i])
                results.append(pickle.loads(r))
        yield batch, work.join(results)
    if expected != len(items):
        raise UnusableError(f"the Ray engine returned {expected} of {len(items)} inputs")


def _ray_reason(exc: BaseException) -> str:
    """The user's cause inside a Ray error (a cvtool error raised in a replica keeps its own text)."""
    cause = getattr(exc, "cause", None) or exc.__cause__
    while cause is not None and getattr(cause, "cause", None) is not None and cause.cause is not cause:
        cause = cause.cause
    return first_line(cause if cause is not None else exc)
