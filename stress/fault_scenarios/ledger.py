"""Which ids were sent and which processed, when and on which channel: the bookkeeping every
scenario counts lost messages, duplicates and recovery with, and the middleware that feeds it."""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

from dramatiq import Message
from dramatiq.middleware import Middleware

#: Ids of the probe messages sent right after a fault ends (regular ids count from 0).
PROBE_BASE = 10_000_000
ACTOR_PREFIX = "fault_work"


now = time.monotonic


class Ledger:
    """Sent and processed ids, and when and on which channel each processing happened."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self.sent: set[int] = set()
        self.counts: Counter[int] = Counter()
        #: (time, id, queue, channel key) of every completed processing.
        self.log: list[tuple[float, int, str, Any]] = []
        self.send_retries = 0
        self.send_errors: list[str] = []
        # Channel objects are kept alive so their id() stays unique for the whole run.
        self._channels: dict[int, Any] = {}

    def record_sent(self, mid: int) -> None:
        with self._cond:
            self.sent.add(mid)
            self._cond.notify_all()

    def record_send_failure(self, mid: int, exc: BaseException) -> None:
        with self._cond:
            self.send_retries += 1
            if len(self.send_errors) < 20:
                self.send_errors.append(f"{mid}: {type(exc).__name__}: {exc}")

    def record_processed(self, mid: int, queue: str, channel: Any,
                         at: float | None = None) -> None:
        key: Any = channel
        if channel is not None and not isinstance(channel, (int, str)):
            key = id(channel)
            self._channels.setdefault(key, channel)
        with self._cond:
            self.counts[mid] += 1
            self.log.append((now() if at is None else at, mid, queue, key))
            self._cond.notify_all()

    @property
    def processed(self) -> int:
        with self._cond:
            return len(self.counts)

    def processed_of(self, ids: set[int]) -> int:
        with self._cond:
            return sum(1 for mid in ids if mid in self.counts)

    def wait_for(self, predicate: Callable[[], bool], timeout: float) -> bool:
        with self._cond:
            return self._cond.wait_for(predicate, timeout)

    def wait_processed(self, count: int, timeout: float) -> bool:
        return self.wait_for(lambda: len(self.counts) >= count, timeout)

    def wait_all_sent_processed(self, timeout: float) -> bool:
        return self.wait_for(lambda: all(mid in self.counts for mid in self.sent), timeout)

    def channels_before(self, moment: float, queue: str | None = None) -> set[Any]:
        with self._cond:
            return {key for t, _, q, key in self.log
                    if t < moment and (queue is None or q == queue)}

    def keys_of(self, channels: list[Any]) -> set[Any]:
        """Keys of ``channels`` (kept alive, like those of processed messages)."""
        keys = set()
        for channel in channels:
            key = id(channel)
            self._channels.setdefault(key, channel)
            keys.add(key)
        return keys

    def first_processing(self, after: float, old: set[Any], queue: str | None = None,
                         timeout: float = 0.0) -> float | None:
        """When a message delivered on a channel not in ``old`` was first completed after
        ``after`` (waiting up to ``timeout`` for it); None if it did not happen."""
        found: list[float] = []

        def check() -> bool:
            for t, _, q, key in self.log:
                if t >= after and key not in old and (queue is None or q == queue):
                    found.append(t)
                    return True
            return False

        self.wait_for(check, timeout)
        return found[0] if found else None

    def summary(self) -> tuple[int, int, int, int]:
        """(sent, processed, lost, duplicates)."""
        with self._cond:
            sent = len(self.sent)
            processed = len(self.counts)
            lost = sum(1 for mid in self.sent if mid not in self.counts)
            duplicates = sum(self.counts.values()) - processed
            return sent, processed, lost, duplicates

    def lost_ids(self) -> list[int]:
        with self._cond:
            return sorted(mid for mid in self.sent if mid not in self.counts)


def delivery_channel(message: Any) -> Any:
    """The channel a KombuBroker message was delivered on (a private attribute of
    ``dramatiq_kombu_broker.consumer.KombuMessage``; None for other brokers)."""
    return getattr(message, "_channel", None)


class Track(Middleware):
    """Records every completed processing of the scenario's actors in the ledger."""

    def __init__(self, ledger: Ledger) -> None:
        self.ledger = ledger

    def after_process_message(self, broker: Any, message: Any, *, result: Any = None,
                              exception: BaseException | None = None) -> None:
        if exception is None and message.actor_name.startswith(ACTOR_PREFIX):
            self.ledger.record_processed(message.args[0], message.queue_name,
                                         delivery_channel(message))


def work_message(queue: str, mid: int, actor_name: str) -> Message:
    return Message(queue_name=queue, actor_name=actor_name, args=(mid,), kwargs={}, options={})
