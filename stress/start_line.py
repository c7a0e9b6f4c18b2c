"""Threads that get ready, wait at one start line, then do timed work: a throughput case's clock.

A case's figures must not include connecting: every thread gets ready (its connection, channel,
a warm-up call), then waits at a barrier. While all of them wait, ``at_start`` runs (count the
connections they hold); the barrier then lets them all go at once, and the wall and CPU clocks
run from there to the last thread's end. A thread that fails breaks the barrier, so nobody
waits for it, and its error is reported, not raised.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from stress.polling import poll

#: ``work(index, start, latencies)``: get ready, call ``start()``, then the timed part,
#: appending each timed call's seconds to ``latencies``.
Work = Callable[[int, Callable[[], None], list[float]], None]


@dataclass
class Race:
    """What :func:`race` measured."""

    setup_s: float
    elapsed: float
    cpu_s: float
    latencies: list[float]
    errors: list[str]


def _cpu() -> float:
    times = os.times()
    return times.user + times.system


def race(work: Work, threads: int, *, setup_timeout: float, run_timeout: float,
         at_start: Callable[[], None] = lambda: None,
         hold: Callable[[], None] | None = None) -> Race:
    """Run ``work`` in ``threads`` daemon threads from one start line.

    ``hold`` (e.g. sleep for a fixed time, then tell the threads to stop) runs in the caller
    once they are released. A thread still running ``run_timeout`` s later is an error.
    """
    barrier = threading.Barrier(threads + 1)
    errors: list[str] = []
    latencies: list[list[float]] = [[] for _ in range(threads)]

    def start() -> None:
        barrier.wait(setup_timeout)

    def target(index: int) -> None:
        try:
            work(index, start, latencies[index])
        except BaseException as exc:  # noqa: BLE001 - reported in the result
            errors.append(f"{type(exc).__name__}: {exc}")
            barrier.abort()

    workers = [threading.Thread(target=target, args=(i,), name=f"race-{i}", daemon=True)
               for i in range(threads)]
    setup0 = time.perf_counter()
    for thread in workers:
        thread.start()
    poll(lambda: barrier.n_waiting >= threads or barrier.broken, bool, setup_timeout, 0.01)
    at_start()
    with contextlib.suppress(threading.BrokenBarrierError):
        barrier.wait(setup_timeout)
    started, cpu0 = time.perf_counter(), _cpu()
    if hold is not None:
        hold()
    deadline = time.monotonic() + run_timeout
    for thread in workers:
        thread.join(max(0.0, deadline - time.monotonic()))
    elapsed, cpu_s = time.perf_counter() - started, _cpu() - cpu0
    still = sum(1 for thread in workers if thread.is_alive())
    if still:
        errors.append(f"{still} thread(s) still running {run_timeout:g} s after the start")
    return Race(setup_s=started - setup0, elapsed=elapsed, cpu_s=cpu_s,
                latencies=[s for mine in latencies for s in mine], errors=errors)


def time_calls(call: Callable[[int], object], latencies: list[float], *,
               count: int | None = None, stop: threading.Event | None = None) -> None:
    """``call(i)`` for i = 0, 1, ... until ``count`` calls were made or ``stop`` is set,
    appending each call's duration to ``latencies``."""
    perf = time.perf_counter
    i = 0
    while (count is None or i < count) and not (stop is not None and stop.is_set()):
        t0 = perf()
        call(i)
        latencies.append(perf() - t0)
        i += 1
