"""One bound for every reply a thread waits for during an operation of several round trips.

A send through a pooled channel may wait for a channel's Open-Ok, a queue's Declare-Ok and the
confirm. A server that stops answering with its socket open (a SIGSTOPped cluster node) holds
each of them; bounding only the confirm left the others to the heartbeat check (two intervals,
or forever with heartbeats off). Inside :func:`replies_within` every such wait of the calling
thread ends by one deadline, with TimeoutError.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from time import monotonic

_local = threading.local()


@contextmanager
def replies_within(seconds: float | None) -> Iterator[None]:
    """Until the block ends, every reply the calling thread waits for (Channel.wait, a
    publisher confirm, a Close-Ok) comes by ``seconds`` from now or the wait raises
    TimeoutError. An enclosing block's earlier deadline is kept; None sets none."""
    previous = getattr(_local, "deadline", None)
    if seconds is not None:
        mine = monotonic() + seconds
        _local.deadline = mine if previous is None else min(previous, mine)
    try:
        yield
    finally:
        _local.deadline = previous


def bounded(timeout: float | None) -> float | None:
    """``timeout`` (None: none) cut to what is left of the calling thread's deadline."""
    deadline = getattr(_local, "deadline", None)
    if deadline is None:
        return timeout
    left = max(0.0, deadline - monotonic())
    return left if timeout is None else min(timeout, left)
