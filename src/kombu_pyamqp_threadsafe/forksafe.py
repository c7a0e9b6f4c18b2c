"""Reset per-process state in a forked child.

Threads do not survive fork(): a lock one of them held stays locked in the child and a socket
shared with the parent must not be used. Objects registered here get
``_after_fork_in_child()`` called in the child before it runs anything else.
"""

from __future__ import annotations

import os
import weakref
from typing import Protocol


class ForkAware(Protocol):
    def _after_fork_in_child(self) -> None: ...


_registered: weakref.WeakSet[ForkAware] = weakref.WeakSet()


def register(obj: ForkAware) -> None:
    _registered.add(obj)


def _after_fork_in_child() -> None:
    for obj in list(_registered):
        obj._after_fork_in_child()


os.register_at_fork(after_in_child=_after_fork_in_child)
