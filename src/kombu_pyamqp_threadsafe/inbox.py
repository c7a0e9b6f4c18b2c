"""Where the reader leaves methods for the thread that owns their channel.

Each thread has an :class:`Inbox` (one per connection): a queue of doorbells, one per method
waiting for it. Each channel has a :class:`Mailbox` holding its undispatched methods in order.
The methods live with the channel, not with the thread, so when another thread adopts the
channel (the pool hands it on, or another thread closes it) the methods go with it: the new
owner gets a doorbell for each, and the old owner's doorbells for that channel ring empty.
"""

from __future__ import annotations

import ctypes
import errno
import os
import queue
import select
import threading
import weakref
from collections import deque
from collections.abc import Callable
from contextlib import suppress
from time import monotonic
from typing import Any, NamedTuple, cast

from . import forksafe
from .greenlets import threads_are_greenlets

#: A method as the reader hands it over: (method_sig, payload, content).
Method = tuple[Any, Any, Any]


class Deferred(NamedTuple):
    """Mailbox.take(): only methods the caller defers are pending, the first ``scanned`` of
    them at least (the reader may have appended more since the scan)."""

    scanned: int


#: What a ring writes: an eventfd's counter increment (8 bytes).
_ONE = b"\x01\0\0\0\0\0\0\0"


def _write_holding_gil() -> Callable[[int, bytes, int], int] | None:
    """libc's ``write(2)`` called without letting the GIL go (ctypes.PyDLL), or None.

    ``os.write`` releases the GIL for every call. The reader rings several owners after one
    read; with many threads waiting for the GIL it then had to win it back after every ring,
    one publisher's turn each, so its rings took longer than the rest of its work and the
    socket went unread meanwhile. A ring never blocks (see Wakeup.set), so holding the GIL
    across it costs nothing.
    """
    try:
        write = ctypes.PyDLL(None, use_errno=True).write
    except (AttributeError, OSError):
        return None
    write.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.c_size_t)
    write.restype = ctypes.c_ssize_t
    return cast("Callable[[int, bytes, int], int]", write)


_gil_held_write = _write_holding_gil()


class Wakeup:
    """Wakes one thread that sleeps in a system call.

    A thread blocked on a lock or a SimpleQueue wakes without the GIL and then waits for it a
    second time; one that sleeps on an eventfd is woken by a write that releases the GIL, a
    hop several times shorter (figures in docs/architecture.md). An eventfd where the platform
    has one, a pipe elsewhere.
    """

    __slots__ = ("_read_fd", "_write_fd", "_poller", "__weakref__")

    def __init__(self) -> None:
        if hasattr(os, "eventfd"):
            self._read_fd = self._write_fd = os.eventfd(0, os.EFD_CLOEXEC)
            weakref.finalize(self, os.close, self._read_fd)
        else:
            self._read_fd, self._write_fd = os.pipe()
            os.set_blocking(self._write_fd, False)
            weakref.finalize(self, _close_pair, self._read_fd, self._write_fd)
        self._poller = select.poll()
        self._poller.register(self._read_fd, select.POLLIN)

    def set(self, release_gil: bool = True) -> None:
        """Any thread: wake the sleeper (or make its next wait return at once).

        With ``release_gil=False`` the write keeps the GIL (the reader ringing several owners
        in a row, see _write_holding_gil). It never blocks: an eventfd's counter does not
        overflow by ones, and the pipe's write end is non-blocking.
        """
        write = _gil_held_write
        if release_gil or write is None:
            with suppress(BlockingIOError):  # a full pipe wakes the sleeper already
                os.write(self._write_fd, _ONE)
            return
        if write(self._write_fd, _ONE, 8) < 0:
            code = ctypes.get_errno()
            if code not in (errno.EAGAIN, errno.EWOULDBLOCK):  # a full pipe: as above
                raise OSError(code, os.strerror(code))

    def wait(self, timeout: float | None) -> None:
        """The owning thread: sleep until set() or ``timeout`` seconds, then reset."""
        if timeout is not None and not self._poller.poll(timeout * 1000):
            return
        # 8 bytes: an eventfd's counter. os.read allocates its buffer before it blocks, so a
        # larger one is held by every sleeping thread, megabytes with hundreds of threads; a
        # pipe keeps what is left, which only makes the next wait return at once.
        os.read(self._read_fd, 8)


#: The longest one wait on a gevent Event (s): a native thread's hub (gevent's thread pool)
#: with nothing else to do takes a wait without a timeout for a deadlock (LoopExit), even
#: though a set() from another thread would end it.
MAX_GREENLET_WAIT = 60.0


class GreenletWakeup:
    """Wakes one greenlet under gevent's monkey-patching, where threads are greenlets in one
    OS thread: a read of an eventfd would block that thread and every greenlet with it, the
    reader's included. A gevent Event instead, which set() from any greenlet (or thread)
    schedules in the hub. It holds no descriptor, so there is one per inbox, not per thread.
    """

    __slots__ = ("_event",)

    def __init__(self) -> None:
        from gevent.event import Event  # only in a process that gevent has patched

        self._event = Event()

    def set(self, release_gil: bool = True) -> None:
        """Any greenlet: wake the sleeper (or make its next wait return at once); the GIL
        does not come into it (one OS thread)."""
        self._event.set()

    def wait(self, timeout: float | None) -> None:
        """The owning greenlet: sleep until set() or ``timeout`` seconds, then reset (a set()
        after the reset makes the next wait return at once; the caller looks at its
        doorbells in between). Without a timeout it returns after MAX_GREENLET_WAIT all the
        same, and the caller, finding nothing, waits again."""
        event = self._event
        if event.wait(MAX_GREENLET_WAIT if timeout is None else timeout):
            event.clear()


def _close_pair(read_fd: int, write_fd: int) -> None:
    os.close(read_fd)
    os.close(write_fd)


class _ThreadWakeups:
    """Each thread's Wakeup. A thread waits on one connection at a time, so one descriptor per
    thread serves all its inboxes (a ring from another connection is a spurious wake-up); it
    closes when the thread ends, whatever happens to the connections."""

    def __init__(self) -> None:
        self._local = threading.local()

    def get(self) -> Wakeup:
        wakeup = getattr(self._local, "wakeup", None)
        if wakeup is None:
            wakeup = self._local.wakeup = Wakeup()
        return wakeup

    def _after_fork_in_child(self) -> None:
        # The child must not share an eventfd with its parent (it would steal the parent's wakes).
        self._local = threading.local()


_wakeups = _ThreadWakeups()
forksafe.register(_wakeups)


def thread_wakeup() -> Wakeup | GreenletWakeup:
    """The wake-up of a new inbox: its thread's eventfd, or under gevent a new GreenletWakeup
    (decided when the inbox is made, so a module imported before the patch still follows it)."""
    if threads_are_greenlets():
        return GreenletWakeup()
    return _wakeups.get()


class Inbox:
    """One thread's doorbells on one connection: a Mailbox with a method for it, or None
    ("look at the connection's state": it failed, or a channel moved away). Created by, and
    only waited on by, that thread."""

    __slots__ = ("thread", "owned", "_doorbells", "_wakeup", "__weakref__")

    def __init__(self) -> None:
        self.thread = threading.current_thread()
        # The mailboxes this thread owns (changed by Mailbox, from any thread).
        self.owned: set[Mailbox] = set()
        self._doorbells: deque[Mailbox | None] = deque()
        self._wakeup = thread_wakeup()

    def put(self, mailbox: Mailbox | None, release_gil: bool = True) -> None:
        """Any thread: ring (``release_gil``: see Wakeup.set)."""
        self._doorbells.append(mailbox)
        self._wakeup.set(release_gil)

    def wake(self) -> None:
        self.put(None)

    def qsize(self) -> int:
        return len(self._doorbells)

    def put_back(self, mailboxes: list[Mailbox]) -> None:
        """The owning thread: doorbells it took and left for later go back in front."""
        self._doorbells.extendleft(reversed(mailboxes))

    def next_mailbox(self, timeout: float | None, skip: Any = ()) -> Mailbox | None:
        """The owning thread: the next doorbell; raises queue.Empty after ``timeout`` seconds.

        An asynchronous exception (dramatiq's TimeLimit) can land after a doorbell was taken
        and before its method was, leaving a method with no doorbell. So an empty inbox also
        looks for an owned mailbox that still holds methods before it sleeps.
        """
        deadline = None if timeout is None else monotonic() + timeout
        while True:
            if self._doorbells:
                return self._doorbells.popleft()
            for mailbox in tuple(self.owned):
                if mailbox.has_pending() and mailbox not in skip:
                    return mailbox
            remaining = None
            if deadline is not None:
                remaining = deadline - monotonic()
                if remaining <= 0:
                    raise queue.Empty
            self._wakeup.wait(remaining)


class _RetiredInbox:
    """The owner of a mailbox whose channel is gone: rings go nowhere, no descriptor held."""

    thread = None
    owned: set[Mailbox] = set()

    def put(self, mailbox: Mailbox | None, release_gil: bool = True) -> None:
        return None

    def wake(self) -> None:
        return None


RETIRED: Any = _RetiredInbox()


class Mailbox:
    """The methods received for one channel that its owner has not dispatched yet."""

    __slots__ = ("channel", "owner", "_pending", "_in_hand", "_lock")

    def __init__(self, channel: Any, owner: Inbox) -> None:
        self.channel: Any = channel
        self.owner = owner
        self._pending: deque[Method] = deque()
        # The method taken last, until its dispatch begins (see take()).
        self._in_hand: Method | None = None
        # Guards owner against a concurrent take(), so a method is taken only by the current
        # owner (post() appends without it; see there).
        self._lock = threading.Lock()
        owner.owned.add(self)

    def has_pending(self) -> bool:
        return bool(self._pending) or self._in_hand is not None

    def pending_count(self) -> int:
        """Any thread: how many methods wait for the owner (for stats)."""
        return len(self._pending)

    def post(self, method: Method) -> Inbox:
        """Reader thread: keep ``method``; returns the inbox to ring for it.

        The reader rings once it has handled everything one read brought, just before it
        waits on the socket again (and releases the GIL), so a woken owner finds the GIL free
        instead of waking a second time for it.

        No lock: the reader must never wait for an owner (an owner that holds a lock and is
        waiting for the GIL would make the reader sleep). move_to() sets the new owner before
        it counts the pending methods, so a method appended meanwhile is rung for the new
        owner by one of the two, perhaps by both (a spare doorbell finds nothing and is
        ignored), and a ring that reaches the former owner is harmless likewise.
        """
        self._pending.append(method)
        return self.owner

    def take(self, inbox: Inbox, defer: Any = None, start: int = 0) -> Any:
        """Owner thread, after a doorbell: the next method, or None if it moved away.

        With ``defer`` (method signatures), the first method of another kind from index
        ``start`` on (the caller knows the ones before are deferred), or :class:`Deferred` with
        how many it scanned when there is none (the deferred ones stay, in order). The count is
        the scan's own: the reader appends without the lock, so the length read after the
        scan may include a method nobody looked at.

        The method stays in hand until :meth:`dispatching` says its dispatch began, so one
        that an asynchronous exception (dramatiq's TimeLimit) loses on the way (a delivery
        that nobody would ack until its channel closed) is taken again by the next wait. It
        is put in hand before it leaves the queue: CPython raises such an exception only
        after a call returns, and never between the two stores.
        """
        with self._lock:
            if self.owner is not inbox:
                return None
            in_hand = self._in_hand
            if in_hand is not None:
                return in_hand
            pending = self._pending
            if not pending:
                return None
            if not defer or (start == 0 and pending[0][0] not in defer):
                in_hand = self._in_hand = pending[0]
                pending.popleft()
                return in_hand
            end = len(pending)
            for index in range(start, end):
                method = pending[index]
                if method[0] not in defer:
                    self._in_hand = method
                    del pending[index]
                    return method
            return Deferred(end)

    def dispatching(self, method_sig: Any, payload: Any, content: Any) -> None:
        """Owner thread: this method's dispatch begins; never take it again."""
        in_hand = self._in_hand
        if (in_hand is not None and in_hand[1] is payload and in_hand[2] is content
                and in_hand[0] == method_sig):
            self._in_hand = None

    def move_to(self, inbox: Inbox) -> Inbox:
        """Make ``inbox``'s thread the owner; return the previous owner's inbox."""
        with self._lock:
            if self.owner is RETIRED:  # the channel was collected meanwhile: nothing to move
                return RETIRED
            previous, self.owner = self.owner, inbox
            if previous is not inbox:
                previous.owned.discard(self)
                inbox.owned.add(self)
                # A method in hand stays the previous owner's: it may be dispatching it.
                self._in_hand = None
                for _ in range(len(self._pending)):
                    inbox.put(self)
        return previous

    def _after_fork_in_child(self) -> None:
        """Called by the inherited connection: a parent's thread may have held the lock at
        fork() (an owner inside take(), a move_to()), and the child retires this mailbox."""
        self._lock = threading.Lock()

    def retire(self) -> list[Method]:
        """The channel is gone: drop its methods and every reference that makes a cycle, so
        reference counting alone frees the channel, its mailbox and, once its thread ends, the
        thread's inbox and eventfd (not whenever the cyclic collector runs).

        Returns the methods dropped. The owner is RETIRED before they are taken, so a method
        the reader posts meanwhile is either among them or posted to RETIRED (post() says so).
        """
        with self._lock:
            self.owner.owned.discard(self)
            self.owner = RETIRED
            pending = self._pending
            dropped = []
            while pending:
                dropped.append(pending.popleft())
            self._in_hand = None
            self.channel = None
        return dropped
