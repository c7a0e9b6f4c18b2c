"""Per-thread inbox: the frames of every channel one thread owns, in arrival order."""

from __future__ import annotations

import queue
import threading
from typing import Any

#: An inbox item: (channel, method_sig, payload, content). ``channel`` None means "wake up
#: and look at the connection's state" (it died, or a channel moved to another thread).
Item = tuple[Any, Any, Any, Any]
WAKE: Item = (None, None, None, None)


class Inbox(queue.SimpleQueue):
    """A SimpleQueue (lock-free put from the reader, blocking get with timeout) tagged
    with the thread that drains it."""

    def __init__(self) -> None:
        super().__init__()
        self.thread = threading.current_thread()

    def wake(self) -> None:
        self.put(WAKE)
