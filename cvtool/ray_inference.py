"""The Ray engine of the scoring loop: Ray Data decode tasks, an actor pool of model replicas, rows in order.

The pipeline for the images a job still has to do (listed once, on the driver, after ``--resume`` and
``--shard`` filtering):

1. the list becomes a Ray dataset of one block per batch (each row: its position and its pickled
   :class:`~cvtool.images.InputItem`, so local paths and URLs travel the same way);
2. **decode tasks** (CPU) run cvtool's own decoder on each block: :func:`cvtool.batches.decode_stream` with the
   scorer's :meth:`~cvtool.scoring.Scorer.decode` (EXIF, DCT-scaled JPEG, TTA views); a bad file becomes a
   row with its error, carried along to the errors file;
3. **model replicas** (an actor pool, ``concurrency=(min, max)``) each load the models once, through
   :meth:`cvtool.bundle.Classifier.reload` (the one loading path), and score whole batches;
4. the driver reads the blocks **in input order** (``preserve_order``) one at a time, so its memory stays flat,
   and hands them to the command's single writer.

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

import numpy as np

from cvtool.batches import Batch, Failure, decode_stream
from cvtool.engines import EngineSettings
from cvtool.errors import CvtoolError, UnusableError, first_line
from cvtool.images import InputItem
from cvtool.ray_cluster import check_fits, ray_session, total
from cvtool.scoring import Member, Scorer


def portable_scorer(scorer: Scorer) -> Scorer:
    """``scorer`` without its models, to send to decode tasks and replicas (each replica loads them again).

    A model built in Python (not loaded from a path) cannot be loaded elsewhere: usage error.
    """
    for m in scorer.members:
        if m.classifier.load_args is None:
            m.classifier.reload()  # raises the usage error
    return dataclasses.replace(scorer, members=[Member(m.classifier.without_model(), m.order) for m in scorer.members])


def _portable_item(item: InputItem) -> bytes:
    """The item as workers open it: a relative local path made absolute (workers run in another folder)."""
    if isinstance(item.path, Path) and not item.path.is_absolute():
        item = dataclasses.replace(item, path=item.path.absolute())
    return pickle.dumps(item)


def decode_block(table, scorer: Scorer):
    """Decode task: one block of items -> positions, error texts ('' when decoded) and pickled payloads."""
    import pyarrow as pa

    items = [pickle.loads(b) for b in table["item"].to_pylist()]
    errors, payloads = [], []
    for _, result in decode_stream(items, scorer.decode):
        failed = isinstance(result, Failure)
        errors.append(result.reason if failed else "")
        payloads.append(b"" if failed else pickle.dumps(result, protocol=5))
    return pa.table(
        {"i": table["i"], "error": pa.array(errors, pa.string()), "payload": pa.array(payloads, pa.large_binary())}
    )


class ScoreReplica:
    """Actor: loads the scorer's models once, then scores decoded blocks (probabilities per image, pickled)."""

    def __init__(self, scorer: Scorer):
        self.scorer = dataclasses.replace(
            scorer, members=[Member(m.classifier.reload(), m.order) for m in scorer.members]
        )

    def __call__(self, table):
        import pyarrow as pa

        errors = table["error"].to_pylist()
        payloads = table["payload"].to_pylist()
        ok = [k for k, e in enumerate(errors) if not e]
        probs = self.scorer.member_probs([pickle.loads(payloads[k]) for k in ok])
        out = [b""] * len(errors)
        for j, k in enumerate(ok):
            out[k] = pickle.dumps(probs[j], protocol=5)
        return pa.table({"i": table["i"], "error": table["error"], "probs": pa.array(out, pa.large_binary())})


def bound_replica(scorer: Scorer) -> type:
    """A :class:`ScoreReplica` class that carries ``scorer`` in its own definition, not as a constructor
    argument: Ray keeps constructor arguments in the object store, where a lost node can take them and make
    restarting the replica fail (ray-project/ray#53727)."""

    class BoundScoreReplica(ScoreReplica):
        def __init__(self):
            super().__init__(scorer)

    return BoundScoreReplica


def decode_memory(scorer: Scorer, batch_size: int) -> int:
    """Bytes a decode task holds: its block's decoded views (twice: arrays and their pickles) plus 64 MiB."""
    options = getattr(scorer.views, "options", None)
    if options is not None:
        from cvtool.tta import view_counts

        views = sum(view_counts(options).values())
    else:
        views = 1
    pixels = sum(h * w * 3 for h, w in {m.size for m in scorer.members})
    return 2 * batch_size * views * pixels + (64 << 20)


def auto_replicas(ray, settings: EngineSettings) -> tuple[int, int]:
    """One replica to as many as the cluster's GPUs allow (GPU replicas), or its CPUs less one for decoding."""
    if settings.gpus_per_replica > 0:
        most = total(ray, "GPU") // settings.gpus_per_replica
    else:
        most = (total(ray, "CPU") - 1) // max(settings.cpus_per_replica, 1e-9)
    return 1, max(1, int(most))


def ray_score_batches(
    scorer: Scorer, items: Iterable[InputItem], batch_size: int, settings: EngineSettings
) -> Iterator[tuple[Batch, np.ndarray]]:
    """``(Batch, scores [images, members, views, classes])`` in input order, computed on Ray.

    Args:
        scorer: the driver's scorer (its models are loaded again in each replica).
        items: the images left to do, in order.
        batch_size: images per block (a decode task and a replica call each take one block).
        settings: the Ray engine's options (address, replicas, CPUs and GPUs per replica).

    Example: ``for batch, scores in ray_score_batches(scorer, items, 32, EngineSettings("ray")): ...``.
    """
    items = list(items)
    if not items:
        return
    shipped = portable_scorer(scorer)
    with ray_session(settings.address) as ray:
        from ray.data import DataContext

        check_fits(ray, cpus=settings.cpus_per_replica, gpus=settings.gpus_per_replica, what="model replica")
        low, high = settings.replicas or auto_replicas(ray, settings)
        DataContext.get_current().execution_options.preserve_order = True
        rows = [{"i": i, "item": _portable_item(item)} for i, item in enumerate(items)]
        ds = ray.data.from_items(rows, override_num_blocks=math.ceil(len(rows) / batch_size))
        # Decode tasks reserve the memory of their block; that also keeps Ray Data from fusing decoding into
        # the replicas (its remote arguments differ): CPUs decode the next blocks while the replicas score.
        ds = ds.map_batches(
            decode_block,
            fn_kwargs={"scorer": shipped},
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
        yield from _in_order(items, blocks, len(scorer.members), scorer.num_classes)


def _in_order(items: list[InputItem], blocks, members: int, classes: int) -> Iterator[tuple[Batch, np.ndarray]]:
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
        batch, probs = Batch(), []
        for i, error, p in zip(table["i"].to_pylist(), table["error"].to_pylist(), table["probs"].to_pylist()):
            if i < expected:
                continue  # delivered twice: written once
            if i != expected:
                raise UnusableError(f"the Ray engine lost {items[expected].rel} (got input {i}, expected {expected})")
            expected += 1
            if error:
                batch.failures.append(Failure(items[i], error))
            else:
                batch.items.append(items[i])
                probs.append(pickle.loads(p))
        scores = np.stack(probs) if probs else np.zeros((0, members, 1, classes), np.float32)
        yield batch, scores
    if expected != len(items):
        raise UnusableError(f"the Ray engine returned {expected} of {len(items)} inputs")


def _ray_reason(exc: BaseException) -> str:
    """The user's cause inside a Ray error (a cvtool error raised in a replica keeps its own text)."""
    cause = getattr(exc, "cause", None) or exc.__cause__
    while cause is not None and getattr(cause, "cause", None) is not None and cause.cause is not cause:
        cause = cause.cause
    return first_line(cause if cause is not None else exc)
