"""Decoding many files in parallel, in input order, in batches.

Pillow releases the GIL while it decodes and resizes, so a thread pool keeps
both cores busy while the model runs. The look-ahead is bounded, so memory
stays flat however many files there are. A file that fails to decode becomes
a :class:`Failure` in the stream; it never stops the others.
"""

from __future__ import annotations

import itertools
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from cvtool.errors import ImageError
from cvtool.images import InputItem
from cvtool.storage import is_url


@dataclass
class Failure:
    item: InputItem
    reason: str


@dataclass
class Batch:
    """Items decoded successfully (with their payloads) and the failures met on the way."""

    items: list[InputItem] = field(default_factory=list)
    payloads: list[Any] = field(default_factory=list)
    failures: list[Failure] = field(default_factory=list)


def default_workers() -> int:
    from cvtool.errors import env_int

    return env_int("CVTOOL_WORKERS", 0) or max(2, os.cpu_count() or 2)


def remote_workers() -> int:
    """Decode threads for objects read from URLs (``CVTOOL_REMOTE_WORKERS``, default 16): fetching is I/O."""
    from cvtool.errors import env_int

    return env_int("CVTOOL_REMOTE_WORKERS", 16, minimum=1)


def decode_stream(
    items: Iterable[InputItem], decode: Callable[[InputItem], Any], workers: int | None = None, lookahead: int = 64
) -> Iterator[tuple[InputItem, Any | Failure]]:
    """Yield ``(item, decode(item))`` in input order, or ``(item, Failure)`` when decoding fails."""

    def safe(item: InputItem):
        try:
            return decode(item)
        except ImageError as exc:
            return Failure(item, str(exc))
        except MemoryError:
            return Failure(item, "out of memory while decoding")

    iterator = iter(items)
    first = next(iterator, None)
    if first is None:
        return
    iterator = itertools.chain([first], iterator)
    # Objects in a bucket: a thread mostly waits for the network, so more of them keep both cores decoding.
    workers = workers or (remote_workers() if is_url(first.path) else default_workers())
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="cvtool-decode") as pool:
        pending: deque = deque()
        for item in iterator:
            pending.append((item, pool.submit(safe, item)))
            if len(pending) >= lookahead:
                break
        while pending:
            item, future = pending.popleft()
            nxt = next(iterator, None)
            if nxt is not None:
                pending.append((nxt, pool.submit(safe, nxt)))
            yield item, future.result()


def batched(
    items: Iterable[InputItem],
    decode: Callable[[InputItem], Any],
    batch_size: int,
    workers: int | None = None,
    key: Callable[[Any], Any] | None = None,
) -> Iterator[Batch]:
    """Group the decoded stream into batches of ``batch_size`` successes.

    With ``key``, a batch also ends where ``key(payload)`` changes, so that
    consecutive images of one size can be stacked and images of another size
    start a new batch.
    """
    batch = Batch()
    current = None
    for item, result in decode_stream(items, decode, workers, lookahead=max(2 * batch_size, 16)):
        if isinstance(result, Failure):
            batch.failures.append(result)
            continue
        if key is not None:
            k = key(result)
            if batch.items and k != current:
                yield batch
                batch = Batch()
            current = k
        batch.items.append(item)
        batch.payloads.append(result)
        if len(batch.items) >= batch_size:
            yield batch
            batch = Batch()
    if batch.items or batch.failures:
        yield batch
