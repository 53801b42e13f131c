"""Ray for one cvtool run: join a cluster (``--ray-address``, ``$RAY_ADDRESS``) or start Ray on this machine.

Shared by Ray inference (:mod:`cvtool.ray_inference`) and Ray training (:mod:`cvtool.ray_training`).
Errors are one line: Ray not installed (exit 2, names the extra), a cluster that cannot be reached (exit 3),
a replica or worker that asks for more GPUs or CPUs than any node has (exit 3, what was asked and what
exists).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator

from cvtool.errors import UnusableError, UsageError, first_line

RAY_EXTRA = 'pip install "cvtool[ray]"'


def import_ray():
    """The ``ray`` module with its data part; missing: a usage error naming the extra (exit 2)."""
    try:
        import ray
        import ray.data  # noqa: F401 - the engine needs the data part too
    except ImportError:
        raise UsageError(f"--engine ray needs Ray: {RAY_EXTRA}") from None
    return ray


@contextlib.contextmanager
def ray_session(address: str | None = None, *, log_to_driver: bool = False) -> Iterator[object]:
    """Ray connected for the block: joins ``address`` (else ``$RAY_ADDRESS``) or starts Ray on this machine.

    A Ray that the caller already started (``ray.init()`` in Python) is used and left running; a Ray this
    function started or joined is shut down (or left) at the end.

    Args:
        address: a cluster address (``host:6379``, ``ray://host:10001``); None: ``$RAY_ADDRESS`` or local.
        log_to_driver: show the workers' output here (training shows the chief's progress lines).

    Example: ``with ray_session("head:6379") as ray: ray.cluster_resources()``.
    """
    ray = import_ray()
    if ray.is_initialized():
        yield ray
        return
    address = address or os.environ.get("RAY_ADDRESS") or None
    # Workers' stdout/stderr (TensorFlow's start-up lines) stay in Ray's logs; failures come back as exceptions.
    kwargs = {"include_dashboard": False, "log_to_driver": log_to_driver, "logging_level": logging.ERROR}
    if address:
        check_reachable(address)
    try:
        with _quiet_core_logs(), _keep_signal_handlers():
            ray.init(address=address or "local", **kwargs)  # "local": always a Ray of our own
    except (ConnectionError, TimeoutError, ValueError, RuntimeError) as exc:
        where = f"the Ray cluster at {address}" if address else "a local Ray"
        raise UnusableError(f"cannot reach {where}: {first_line(exc)}") from None
    try:
        _quiet_ray_data()
        yield ray
    finally:
        ray.shutdown()


def check_reachable(address: str, timeout: float = 10.0) -> None:
    """A cluster address whose port does not answer is refused at once (exit 3): Ray itself keeps retrying
    an unreachable head for minutes. ``auto`` (Ray's own lookup) is left to Ray."""
    import socket

    host_port = address.split("://", 1)[-1].rstrip("/")
    host, _, port = host_port.rpartition(":")
    if address == "auto" or not host or not port.isdigit():
        return
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as exc:
        raise UnusableError(f"cannot reach the Ray cluster at {address}: {exc.strerror or exc}") from None


@contextlib.contextmanager
def _keep_signal_handlers() -> Iterator[None]:
    """SIGINT/SIGTERM handlers as they were before ``ray.init``: Ray's core installs its own crash handler for
    SIGTERM, which prints a stack banner and aborts (exit -6) after cvtool has kept the partial; cvtool's
    handler stops the run cleanly instead (exit 143, ``--resume`` continues)."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in saved.items():
            if handler is not None:
                signal.signal(sig, handler)


@contextlib.contextmanager
def _quiet_core_logs() -> Iterator[None]:
    """Ray's C++ core logs to stderr (it says so when its level is set, and warns about every actor pool's
    constructor arguments): the driver's core starts here with the level at fatal, and its start-up line
    goes nowhere. Ray's logs on the nodes are unchanged."""
    from cvtool.progress import quiet_stderr

    previous = os.environ.get("RAY_BACKEND_LOG_LEVEL")
    os.environ["RAY_BACKEND_LOG_LEVEL"] = "fatal"
    try:
        with quiet_stderr():
            yield
    finally:
        if previous is None:
            os.environ.pop("RAY_BACKEND_LOG_LEVEL", None)
        else:
            os.environ["RAY_BACKEND_LOG_LEVEL"] = previous


def _quiet_ray_data() -> None:
    """Ray Data's own progress bars and execution logs off: cvtool prints its own progress."""
    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    for name in ("ray.data", "ray.train", "ray.tune"):
        logging.getLogger(name).setLevel(logging.ERROR)


def node_resources(ray) -> list[dict]:
    """The resources of each live node (``CPU``, ``GPU``...)."""
    return [node["Resources"] for node in ray.nodes() if node.get("Alive")]


def check_fits(ray, *, cpus: float, gpus: float, what: str) -> None:
    """Refuse (exit 3) a ``what`` (replica, worker) that needs more CPUs or GPUs than any live node has.

    Example: ``check_fits(ray, cpus=1, gpus=2, what="replica")``.
    """
    nodes = node_resources(ray)
    if any(n.get("CPU", 0) >= cpus and n.get("GPU", 0) >= gpus for n in nodes):
        return
    have = ", ".join(f"{n.get('CPU', 0):g} CPUs/{n.get('GPU', 0):g} GPUs" for n in nodes) or "no live nodes"
    raise UnusableError(
        f"no Ray node has the {cpus:g} CPUs and {gpus:g} GPUs asked per {what}; the cluster's nodes have: {have}"
    )


def total(ray, resource: str) -> float:
    """The cluster's total of ``resource`` (``CPU``, ``GPU``)."""
    return float(ray.cluster_resources().get(resource, 0))
