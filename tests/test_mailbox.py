"""Mailbox handover under a racing reader (pure logic: no connection).

The reader appends to a mailbox without its lock while owners hand the mailbox to each other
(the pool passes a channel on; a closing thread adopts it). Here each owner adopts the mailbox
while the previous one is still taking from it. Every method must be taken exactly once, and
each owner must take its methods in the order they were posted.
"""

from __future__ import annotations

import queue
import threading

from kombu_pyamqp_threadsafe.inbox import Inbox, Mailbox, Wakeup

METHODS = 20_000
OWNERS = 4
#: Methods an owner takes before it lets the next owner adopt the mailbox.
TURN = 37


def test_every_method_is_taken_once_while_owners_change() -> None:
    first_owner = Inbox()  # this thread's; replaced by the first owner thread's at once
    mailbox = Mailbox(channel=object(), owner=first_owner)
    taken: list[list[int]] = [[] for _ in range(OWNERS)]
    batons = [threading.Event() for _ in range(OWNERS)]
    done = threading.Event()
    posting = threading.Barrier(OWNERS + 1)

    def poster() -> None:
        posting.wait(10)
        for n in range(METHODS):
            # As the reader does: post, then ring the inbox post() named.
            mailbox.post((n, None, None)).put(mailbox)

    def owner(index: int) -> None:
        inbox = Inbox()
        posting.wait(10)
        while not done.is_set():
            if not batons[index].wait(0.05):
                continue
            batons[index].clear()
            mailbox.move_to(inbox)
            got = 0
            # Take on after letting the next owner adopt: takes race with its move_to().
            while not done.is_set():
                try:
                    box = inbox.next_mailbox(timeout=0.2)
                except queue.Empty:
                    break
                method = box.take(inbox) if box is not None else None
                if method is None:
                    if mailbox.owner is not inbox:
                        break  # adopted by the next owner
                    continue
                box.dispatching(*method)  # as Channel.dispatch_method does
                taken[index].append(method[0])
                got += 1
                if sum(map(len, taken)) == METHODS:
                    done.set()
                if got == TURN:
                    batons[(index + 1) % OWNERS].set()
            if got < TURN:
                batons[(index + 1) % OWNERS].set()

    threads = [threading.Thread(target=poster, daemon=True)]
    threads += [threading.Thread(target=owner, args=(i,), daemon=True, name=f"owner-{i}")
                for i in range(OWNERS)]
    for thread in threads:
        thread.start()
    batons[0].set()
    assert done.wait(60), f"{sum(map(len, taken))} of {METHODS} methods taken"
    for thread in threads:
        thread.join(10)
    assert sorted(n for mine in taken for n in mine) == list(range(METHODS))
    assert all(taken), [len(mine) for mine in taken]  # the mailbox went round
    for mine in taken:
        assert mine == sorted(mine)


def test_a_ring_that_keeps_the_gil_wakes_a_sleeper() -> None:
    """The reader rings several owners in a row without letting the GIL go
    (``Wakeup.set(release_gil=False)``); each sleeper must wake as from an ordinary ring. A
    ring that wrote nothing would leave its sleeper blocked (without a timeout) for good."""
    wakeups = [Wakeup() for _ in range(3)]
    sleepers = [threading.Thread(target=wakeup.wait, args=(None,), daemon=True)
                for wakeup in wakeups]
    for sleeper in sleepers:
        sleeper.start()
    for wakeup in wakeups:
        wakeup.set(release_gil=False)
    for sleeper in sleepers:
        sleeper.join(10)
    assert [sleeper.is_alive() for sleeper in sleepers] == [False, False, False]
