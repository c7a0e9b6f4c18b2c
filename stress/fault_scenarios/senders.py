"""Threads that stream ids to the broker, retrying a send that raised, as an application would."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from stress.fault_scenarios.ledger import Ledger

now = time.monotonic


class Senders:
    """Threads that send ids (paced at ``rate`` per second in total, None: flat out).

    A send that raises is retried after a short pause until ``deadline`` (monotonic), as an
    application would: the id only counts as sent once a send returned.
    """

    def __init__(self, send: Callable[[int], None], ids: list[int], threads: int,
                 rate: float | None, ledger: Ledger, deadline: float,
                 name: str = "fault-sender") -> None:
        self._send = send
        self._ids = ids
        self._next = 0
        self._lock = threading.Lock()
        self._rate = rate
        self._ledger = ledger
        self._deadline = deadline
        self._started = 0.0
        self.paused = threading.Event()
        self.stopped = threading.Event()
        self.unsent: list[int] = []
        self.threads = [threading.Thread(target=self._run, name=f"{name}-{i}", daemon=True)
                        for i in range(threads)]

    def start(self) -> Senders:
        self._started = now()
        for thread in self.threads:
            thread.start()
        return self

    @property
    def issued(self) -> int:
        with self._lock:
            return self._next

    def _take(self) -> tuple[int, int] | None:
        with self._lock:
            if self._next >= len(self._ids) or self.stopped.is_set():
                return None
            index = self._next
            self._next += 1
            return index, self._ids[index]

    def _run(self) -> None:
        while True:
            while self.paused.is_set() and not self.stopped.is_set():
                time.sleep(0.05)
            taken = self._take()
            if taken is None:
                return
            index, mid = taken
            if self._rate:
                delay = self._started + index / self._rate - now()
                if delay > 0:
                    time.sleep(delay)
            while True:
                try:
                    self._send(mid)
                except Exception as exc:  # noqa: BLE001 - retried; counted
                    self._ledger.record_send_failure(mid, exc)
                    if now() >= self._deadline or self.stopped.is_set():
                        with self._lock:
                            self.unsent.append(mid)
                        break
                    time.sleep(0.2)
                    continue
                self._ledger.record_sent(mid)
                break

    def join(self, timeout: float) -> bool:
        deadline = now() + timeout
        for thread in self.threads:
            thread.join(max(0.0, deadline - now()))
        return not any(thread.is_alive() for thread in self.threads)

    def stop(self) -> None:
        self.stopped.set()


def wait_sent_and_processed(senders: list[Senders], ledger: Ledger, deadline: float) -> list[str]:
    """Wait until ``deadline`` (monotonic) for ``senders`` to end (stopped if they do not) and
    every sent id to be processed; the problems seen."""
    problems: list[str] = []
    for group in senders:
        if not group.join(max(1.0, deadline - now())):
            problems.append("senders did not finish")
            group.stop()
        if group.unsent:
            problems.append(f"{len(group.unsent)} ids could not be sent")
    if not ledger.wait_all_sent_processed(max(1.0, deadline - now())):
        problems.append("not every sent message was processed in time")
    return problems
