"""Where cells (and sweep runs) execute: a local process pool, or Ray (a local instance or an existing cluster).

Both run a module-level function on picklable arguments and hand back results as they finish:
``submit(fn, *args)`` returns a handle, ``wait(handles)`` blocks until at least one is done and splits
them into ``(done, pending)``, ``result(handle)`` returns the value or raises the worker's error.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import socket
import sys
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from contextlib import contextmanager
from typing import Any
from urllib.parse import urlparse

from rlbackdoor.errors import SpecError, detail

BACKENDS = ("local", "ray")
CONNECT_TIMEOUT = 5.0
"""Seconds to wait for a Ray cluster address to accept a connection."""


class LocalBackend:
    """A pool of ``workers`` spawned processes, each on one torch thread.

    :param workers: processes.
    :param initializer: called once in each worker.
    """

    def __init__(self, workers: int, initializer: Callable[[], None] | None = None) -> None:
        context = multiprocessing.get_context("spawn")
        self._pool = ProcessPoolExecutor(max_workers=workers, mp_context=context, initializer=initializer)

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future:
        return self._pool.submit(fn, *args)

    def wait(self, handles: Iterable[Future]) -> tuple[set[Future], set[Future]]:
        done, pending = wait(set(handles), return_when=FIRST_COMPLETED)
        return set(done), set(pending)

    def result(self, handle: Future) -> Any:
        return handle.result()

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


def check_address(address: str) -> None:
    """Raise :class:`SpecError` unless the ``host:port`` of a Ray address accepts a TCP connection."""
    if address == "auto":
        return
    parsed = urlparse(address if "://" in address else f"ray://{address}")
    try:
        host, port = parsed.hostname, parsed.port
    except ValueError:
        host = port = None
    if not host or not port:
        raise SpecError(f"--ray-address '{address}' is not host:port; write e.g. 10.0.0.5:6379 or ray://host:10001")
    try:
        with socket.create_connection((host, port), timeout=CONNECT_TIMEOUT):
            pass
    except OSError as err:
        raise SpecError(
            f"Ray cluster at {address} is unreachable ({err.strerror or err}); start it (ray start --head) "
            "or drop --ray-address to run a local Ray instance"
        ) from None


@contextmanager
def _silenced_stderr() -> Iterator[None]:
    """Send file descriptor 2 (native libraries' logging included) to /dev/null for the block."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


class RayBackend:
    """Ray tasks of one CPU each: on the cluster at ``address``, else on a local instance of ``workers`` CPUs.

    :param workers: CPUs of the local instance (ignored with ``address``).
    :param address: an existing cluster (``host:port``, ``ray://host:port`` or ``auto``).
    """

    def __init__(self, workers: int, address: str | None = None) -> None:
        try:
            import ray
        except ImportError:
            raise SpecError("--backend ray needs Ray; pip install 'rlbackdoor[ray]'") from None
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no usage-stats notice or upload
        kwargs: dict[str, Any] = {
            "include_dashboard": False,
            "log_to_driver": False,
            "logging_level": logging.ERROR,
            "ignore_reinit_error": True,
        }
        try:
            with _silenced_stderr():  # Ray's C++ core logs every failed connection attempt to fd 2
                if address is not None:
                    ray.init(address=address, **kwargs)
                else:
                    ray.init(num_cpus=workers, **kwargs)
        except Exception as err:
            where = f"the Ray cluster at {address}" if address else "a local Ray instance"
            raise SpecError(f"cannot start {where} ({type(err).__name__}: {detail(err)}); check the address") from None
        self._ray = ray
        self._remote: dict[Callable[..., Any], Any] = {}

    def submit(self, fn: Callable[..., Any], *args: Any) -> Any:
        if fn not in self._remote:
            self._remote[fn] = self._ray.remote(num_cpus=1, max_retries=0)(fn)
        return self._remote[fn].remote(*args)

    def wait(self, handles: Iterable[Any]) -> tuple[set[Any], set[Any]]:
        handles = list(handles)
        done, pending = self._ray.wait(handles, num_returns=1)
        return set(done), set(pending)

    def result(self, handle: Any) -> Any:
        return self._ray.get(handle)

    def close(self) -> None:
        self._ray.shutdown()


def check_backend(name: str, workers: int = 1, address: str | None = None) -> None:
    """Raise :class:`SpecError` for an unknown backend, no workers, or an unreachable Ray address."""
    if name not in BACKENDS:
        raise SpecError(f"unknown backend '{name}'; use one of {', '.join(BACKENDS)}")
    if workers < 1:
        raise SpecError(f"--workers {workers}: use at least 1")
    if address is not None and name != "ray":
        raise SpecError("--ray-address needs --backend ray; add it or drop the address")
    if address is not None:
        check_address(address)


def make_backend(
    name: str, workers: int, address: str | None = None, initializer: Callable[[], None] | None = None
) -> LocalBackend | RayBackend:
    """The backend ``name`` (``local`` or ``ray``); a bad name or an unreachable Ray address raises :class:`SpecError`.

    :param name: ``local`` or ``ray``.
    :param workers: parallel workers (local processes, or CPUs of a local Ray instance).
    :param address: ``ray`` only: an existing cluster.
    :param initializer: ``local`` only: per-worker setup (Ray tasks set themselves up).
    """
    check_backend(name, workers, address)
    if name == "ray":
        return RayBackend(workers, address)
    return LocalBackend(workers, initializer)
