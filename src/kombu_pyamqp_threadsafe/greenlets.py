"""Whether this process's threads are greenlets (gevent's ``monkey.patch_all()``).

Patched, every ``threading.Thread`` (the reader included) is a greenlet in one OS thread, so a
wait that gevent cannot see (a plain read of an eventfd, an unpatched ``poll``) stops them all.
The two waits that differ, the inbox's wake-up and the reader's, ask here when they are made,
and so does the TLS reader's non-blocking read; the registry asks whether a thread ended,
which for a greenlet ``is_alive()`` does not say. gevent is imported only by a process that
has already imported and applied it.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable
from functools import partial
from typing import Any


def _patched(module: str) -> bool:
    monkey = sys.modules.get("gevent.monkey")
    return monkey is not None and bool(monkey.is_module_patched(module))


def threads_are_greenlets() -> bool:
    """True once gevent has patched ``threading`` in this process."""
    return _patched("threading")


def sockets_are_cooperative() -> bool:
    """True once gevent has patched ``socket`` in this process."""
    return _patched("socket")


def yield_to_ready() -> Callable[[], None]:
    """A call that lets every greenlet ready to run go first, once, and then returns
    (``gevent.sleep(0)``: this greenlet goes to the back of the hub's run queue). Only for a
    process whose threads are greenlets (gevent is imported here)."""
    from gevent import sleep  # only in a process that gevent has patched

    return partial(sleep, 0)


def system_socket(sock: Any) -> Any:
    """The socket inside gevent's cooperative ``sock``, whose calls go straight to the system
    (``_sock``, which gevent keeps non-blocking), for a read that must fail rather than wait:
    gevent's own socket retries a read that would block once the socket is readable, whatever
    the flags (``MSG_DONTWAIT`` included)."""
    return getattr(sock, "_sock", sock)


def thread_ended(thread: threading.Thread) -> bool:
    """Whether ``thread`` has ended. A greenlet not started as a Thread (``gevent.spawn``, a
    pool's, a WSGI server's) gets a dummy Thread whose ``is_alive()`` stays True; gevent takes
    it out of threading's table of running threads when the greenlet ends, as threading does
    for its own threads (``threading._active``, which typeshed leaves out). On CPython 3.13 a
    dummy Thread whose thread is gone raises RuntimeError from ``is_alive()`` instead."""
    running: dict[int | None, threading.Thread] = vars(threading)["_active"]
    if running.get(thread.ident) is not thread:
        return True
    try:
        return not thread.is_alive()
    except RuntimeError:  # 3.13's _DummyThread.is_alive(): "thread is not alive"
        return True
