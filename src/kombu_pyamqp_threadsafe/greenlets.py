"""Whether this process's threads are greenlets (gevent's ``monkey.patch_all()``).

Patched, every ``threading.Thread`` (the reader included) is a greenlet in one OS thread, so a
wait that gevent cannot see (a plain read of an eventfd, an unpatched ``poll``) stops them all.
The two waits that differ, the inbox's wake-up and the reader's poll, ask here when they are
made; gevent is imported only by a process that has already imported and applied it. The
registry asks here whether a thread ended, which for a greenlet is_alive() does not say.
"""

from __future__ import annotations

import sys
import threading


def threads_are_greenlets() -> bool:
    """True once gevent has patched ``threading`` in this process."""
    monkey = sys.modules.get("gevent.monkey")
    return monkey is not None and bool(monkey.is_module_patched("threading"))


def thread_ended(thread: threading.Thread) -> bool:
    """Whether ``thread`` has ended. A greenlet not started as a Thread (``gevent.spawn``, a
    pool's, a WSGI server's) gets a dummy Thread whose ``is_alive()`` stays True; gevent takes
    it out of threading's table of running threads when the greenlet ends, as threading does
    for its own threads (``threading._active``, which typeshed leaves out)."""
    running: dict[int | None, threading.Thread] = vars(threading)["_active"]
    return not thread.is_alive() or running.get(thread.ident) is not thread
