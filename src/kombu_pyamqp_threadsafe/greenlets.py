"""Whether this process's threads are greenlets (gevent's ``monkey.patch_all()``).

Patched, every ``threading.Thread`` (the reader included) is a greenlet in one OS thread, so a
wait that gevent cannot see (a plain read of an eventfd, an unpatched ``poll``) stops them all.
The two waits that differ, the inbox's wake-up and the reader's poll, ask here when they are
made; gevent is imported only by a process that has already imported and applied it.
"""

from __future__ import annotations

import sys


def threads_are_greenlets() -> bool:
    """True once gevent has patched ``threading`` in this process."""
    monkey = sys.modules.get("gevent.monkey")
    return monkey is not None and bool(monkey.is_module_patched("threading"))
