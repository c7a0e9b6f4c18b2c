"""Where the reader leaves methods for the thread that owns their channel.

Each thread has an :class:`Inbox` (one per connection): a queue of doorbells, one per method
waiting for it. Each channel has a :class:`Mailbox` holding its undispatched methods in order.
The methods live with the channel, not with the thread, so when another thread adopts the
channel (the pool hands it on, or another thread closes it) the methods go with it: the new
owner gets a doorbell for each, and the old owner's doorbells for that channel ring empty.
"""

from __future__ import annotations

import queue
import threading
from collections import deque
from typing import Any

#: A method as the reader hands it over: (method_sig, payload, content).
Method = tuple[Any, Any, Any]


class Inbox(queue.SimpleQueue):
    """One thread's doorbells: a Mailbox with a method for it, or None ("look at the
    connection's state": it failed, or a channel moved away)."""

    def __init__(self) -> None:
        super().__init__()
        self.thread = threading.current_thread()
        # The mailboxes this thread owns (changed by Mailbox, from any thread).
        self.owned: set[Mailbox] = set()

    def wake(self) -> None:
        self.put(None)

    def next_mailbox(self, timeout: float | None) -> Mailbox | None:
        """The next doorbell; raises queue.Empty after ``timeout`` seconds.

        An asynchronous exception (dramatiq's TimeLimit) can land after a doorbell was taken
        and before its method was, leaving a method with no doorbell. So before blocking, an
        empty inbox looks for an owned mailbox that still holds methods.
        """
        try:
            return self.get_nowait()
        except queue.Empty:
            for mailbox in tuple(self.owned):
                if mailbox.has_pending():
                    return mailbox
        return self.get(timeout=timeout)


class Mailbox:
    """The methods received for one channel that its owner has not dispatched yet."""

    __slots__ = ("channel", "owner", "_pending", "_lock")

    def __init__(self, channel: Any, owner: Inbox) -> None:
        self.channel = channel
        self.owner = owner
        self._pending: deque[Method] = deque()
        # Guards the pairing of _pending with doorbells in owner's inbox: every method has a
        # doorbell in the inbox of the thread that owns the channel when it can be taken.
        self._lock = threading.Lock()
        owner.owned.add(self)

    def has_pending(self) -> bool:
        return bool(self._pending)

    def post(self, method: Method) -> None:
        """Reader thread: keep ``method`` and ring the owner."""
        with self._lock:
            self._pending.append(method)
            self.owner.put(self)

    def take(self, inbox: Inbox) -> Method | None:
        """Owner thread, after a doorbell: the next method, or None if it moved away."""
        with self._lock:
            if self.owner is not inbox or not self._pending:
                return None
            return self._pending.popleft()

    def move_to(self, inbox: Inbox) -> Inbox:
        """Make ``inbox``'s thread the owner; return the previous owner's inbox."""
        with self._lock:
            previous, self.owner = self.owner, inbox
            if previous is not inbox:
                previous.owned.discard(self)
                inbox.owned.add(self)
                for _ in range(len(self._pending)):
                    inbox.put(self)
        return previous

    def retire(self) -> None:
        """The channel is gone: drop its methods and leave the owner's set."""
        with self._lock:
            self._pending.clear()
            self.owner.owned.discard(self)
