"""The dramatiq side of the stress test and the benchmark: brokers, the hop actor, bookkeeping.

The "send the next" workload: ``chains`` messages are seeded; processing hop ``k`` of a chain
sends hop ``k + 1`` of the same chain until the chain's budget is spent (or a deadline passed).
Every message carries a unique id (``chain * HOP_STRIDE + hop``) and the time it was sent, so
lost and duplicated messages are counted, not guessed, and end-to-end latency is exact.
"""

from __future__ import annotations

import logging
import threading
import time
from array import array
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import dramatiq

#: Message id = chain * HOP_STRIDE + hop.
HOP_STRIDE = 10_000_000
#: Actor names (the CLI worker module and the parent must agree on them).
HOP_ACTOR = "stress_hop"
SEND_ATTEMPTS = 3

logger = logging.getLogger("stress")


def make_broker(kind: str, url: str, connection_name: str, *, heartbeat: int | None = None,
                middleware: list[Any] | None = None) -> dramatiq.Broker:
    """``KombuBroker`` (``kind="kombu"``) or dramatiq's pika ``RabbitmqBroker`` (``"rabbitmq"``),
    both with ``confirm_delivery=True``, their connections named after ``connection_name``.

    KombuBroker names its two connections ``<name>-consumer`` and ``<name>-producer``; every
    pika connection of RabbitmqBroker is called ``<name>``.
    """
    if kind == "kombu":
        from dramatiq_kombu_broker import KombuBroker

        kwargs: dict[str, Any] = {"url": url, "confirm_delivery": True,
                                  "connection_name": connection_name}
        if heartbeat is not None:
            kwargs["heartbeat"] = heartbeat
        if middleware is not None:
            kwargs["middleware"] = middleware
        return KombuBroker(**kwargs)
    if kind == "rabbitmq":
        from dramatiq.brokers.rabbitmq import RabbitmqBroker

        broker = RabbitmqBroker(url=url, confirm_delivery=True, middleware=middleware)
        # URLParameters: one object shared by every pika connection the broker opens.
        params = broker.parameters
        for p in params if isinstance(params, list) else [params]:
            p.client_properties = {"connection_name": connection_name}
            if heartbeat is not None:
                p.heartbeat = heartbeat
        return broker
    raise ValueError(f"unknown broker kind {kind!r} (kombu or rabbitmq)")


def actors_environment(kind: str, url: str, connection_name: str, queue: str,
                       results_queue: str, *, deadline: float | None = None,
                       delay_every: int = 0, delay_ms: int = 0) -> dict[str, str]:
    """The environment ``stress.actors`` builds its broker and hop actor from (see there)."""
    return {
        "STRESS_BROKER": kind, "STRESS_URL": url, "STRESS_CONNECTION_NAME": connection_name,
        "STRESS_QUEUE": queue, "STRESS_RESULTS_QUEUE": results_queue,
        "STRESS_DEADLINE": "" if deadline is None else repr(deadline),
        "STRESS_DELAY_EVERY": str(delay_every), "STRESS_DELAY_MS": str(delay_ms),
    }


def broker_available(kind: str) -> str | None:
    """None when ``kind`` can be built here, else why not."""
    if kind == "kombu":
        try:
            from dramatiq_kombu_broker import KombuBroker  # noqa: F401
        except ImportError as exc:
            return f"KombuBroker cannot be imported: {exc}"
    return None


# --------------------------------------------------------------------------------- bookkeeping


class IdSet:
    """Message ids (``chain * HOP_STRIDE + hop``) at one bit each.

    The bookkeeping of a run must not weigh on the RSS it reports: a set of ints costs about
    100 bytes an id, so the broker that moved more messages in a timed case looked heavier.
    """

    def __init__(self) -> None:
        self._chains: dict[int, bytearray] = {}
        self._len = 0

    def add(self, mid: int) -> bool:
        """Add ``mid``; False if it was there already."""
        chain, hop = divmod(mid, HOP_STRIDE)
        bits = self._chains.get(chain)
        if bits is None:
            bits = self._chains[chain] = bytearray(1)
        index, mask = hop >> 3, 1 << (hop & 7)
        if index >= len(bits):
            bits.extend(bytes(max(index + 1, 2 * len(bits)) - len(bits)))
        if bits[index] & mask:
            return False
        bits[index] |= mask
        self._len += 1
        return True

    def update(self, mids: Iterable[int]) -> None:
        for mid in mids:
            self.add(mid)

    def __contains__(self, mid: int) -> bool:
        chain, hop = divmod(mid, HOP_STRIDE)
        bits = self._chains.get(chain)
        return bits is not None and (hop >> 3) < len(bits) and bool(bits[hop >> 3] >> (hop & 7) & 1)

    def __len__(self) -> int:
        return self._len

    def __iter__(self) -> Iterator[int]:
        for chain, bits in self._chains.items():
            for index, byte in enumerate(bits):
                for bit in range(8) if byte else ():
                    if byte >> bit & 1:
                        yield chain * HOP_STRIDE + index * 8 + bit

    def __sub__(self, other: IdSet) -> set[int]:
        return {mid for mid in self if mid not in other}


class Tracker:
    """Thread-safe record of sent and processed message ids (in-process runs)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.sent_ids = IdSet()
        self.processed_ids = IdSet()
        self.claimed = IdSet()
        self.processings = 0
        self.duplicates = 0
        self.duplicate_ids: list[int] = []
        self.send_failures = 0
        self.send_errors: list[str] = []
        # End-to-end latency and processing time of every processed message but the seeds
        # (hop 0 waits for the worker to start, which says nothing about the broker).
        self.latencies = array("d")
        self.at_times = array("d")
        self.seed_at_times = array("d")
        self.first_processed: float | None = None
        self.last_processed: float | None = None

    def sent(self, mid: int) -> None:
        with self.lock:
            self.sent_ids.add(mid)

    def claim(self, mid: int) -> bool:
        """True the first time ``mid`` is claimed (by the first processing of that id)."""
        with self.lock:
            return self.claimed.add(mid)

    def send_failed(self, mid: int, error: str) -> None:
        with self.lock:
            self.send_failures += 1
            if len(self.send_errors) < 10:
                self.send_errors.append(f"{mid}: {error}")

    def processed(self, mid: int, latency: float | None, at: float) -> None:
        with self.lock:
            self.processings += 1
            if not self.processed_ids.add(mid):
                self.duplicates += 1
                if len(self.duplicate_ids) < 20:
                    self.duplicate_ids.append(mid)
            if mid % HOP_STRIDE == 0:
                self.seed_at_times.append(at)
            elif latency is not None:
                self.latencies.append(latency)
                self.at_times.append(at)
            if self.first_processed is None:
                self.first_processed = at
            self.last_processed = at

    # Cheap reads for the progress line (an int read is atomic under the GIL).
    @property
    def n_processed(self) -> int:
        return len(self.processed_ids)

    @property
    def n_sent(self) -> int:
        return len(self.sent_ids)

    def comparison(self) -> dict[str, Any]:
        with self.lock:
            lost = self.sent_ids - self.processed_ids
            unexpected = self.processed_ids - self.sent_ids
            return {
                "sent": len(self.sent_ids),
                "processed": len(self.processed_ids),
                "processings": self.processings,
                "lost": len(lost),
                "lost_sample": sorted(lost)[:10],
                "duplicated": self.duplicates,
                "duplicate_sample": self.duplicate_ids[:10],
                "unexpected": len(unexpected),
                "send_failures": self.send_failures,
                "send_errors": self.send_errors[:5],
            }


def send_with_retries(actor: dramatiq.Actor, args: tuple, delay: int | None = None) -> str | None:
    """Send (``delay`` ms later if given); retry a few times. None on success, else the last
    error."""
    error = None
    for attempt in range(SEND_ATTEMPTS):
        try:
            if delay:
                actor.send_with_options(args=args, delay=delay)
            else:
                actor.send(*args)
            return None
        except Exception as exc:  # noqa: BLE001 - counted as a send failure by the caller
            error = f"{type(exc).__name__}: {exc}"
            logger.warning("send attempt %d failed: %s", attempt + 1, error)
            time.sleep(0.2 * (attempt + 1))
    return error


#: record(processed_id, latency_s, processed_at, successor_id_or_None, send_error_or_None)
Recorder = Callable[[int, float, float, int | None, str | None], None]


def define_hop_actor(broker: dramatiq.Broker, queue_name: str, record: Recorder,
                     deadline: Callable[[], float | None],
                     claim: Callable[[int], bool] | None = None, delay_every: int = 0,
                     delay_ms: int = 0) -> dramatiq.Actor:
    """The send-the-next actor: ``hop(chain, hop, budget, sent_at)``.

    ``deadline()`` returns the wall-clock time after which no successor is sent (or None).
    ``claim(id)`` (optional) is False when the id was processed before: a redelivered message
    is counted but does not send its successor again (the chain would fork otherwise).
    With ``delay_every`` N > 0, every successor whose hop is a multiple of N is sent with
    ``delay=delay_ms`` (through ``q.DQ``); its ``sent_at`` is the time it is due, so latency
    stays "time from due to processing".
    """
    holder: dict[str, dramatiq.Actor] = {}

    def stress_hop(chain: int, hop: int, budget: int, sent_at: float) -> None:
        now = time.time()
        mid = chain * HOP_STRIDE + hop
        successor = error = None
        limit = deadline()
        first = claim is None or claim(mid)
        if first and hop + 1 < budget and (limit is None or now < limit):
            successor = mid + 1
            delay = delay_ms if delay_every and (hop + 1) % delay_every == 0 else None
            due = time.time() + (delay or 0) / 1000
            error = send_with_retries(holder["actor"], (chain, hop + 1, budget, due), delay)
        record(mid, now - sent_at, now, successor, error)

    actor = dramatiq.actor(stress_hop, actor_name=HOP_ACTOR, queue_name=queue_name,
                           broker=broker, max_retries=0)
    holder["actor"] = actor
    return actor


def tracker_recorder(tracker: Tracker) -> Recorder:
    def record(mid: int, latency: float, at: float, successor: int | None,
               error: str | None) -> None:
        if successor is not None:
            if error is None:
                tracker.sent(successor)
            else:
                tracker.send_failed(successor, error)
        tracker.processed(mid, latency, at)

    return record


def seed_chains(actor: dramatiq.Actor, tracker: Tracker | None, chains: int, budgets: list[int],
                threads: int = 1) -> list[str]:
    """Send hop 0 of every chain from ``threads`` threads (one by default: RabbitmqBroker opens
    a connection per sending thread and keeps it). Returns the errors."""
    errors: list[str] = []
    todo = [c for c in range(chains) if budgets[c] > 0]

    def run(part: list[int]) -> None:
        for chain in part:
            error = send_with_retries(actor, (chain, 0, budgets[chain], time.time()))
            if error is None:
                if tracker is not None:
                    tracker.sent(chain * HOP_STRIDE)
            else:
                errors.append(error)
                if tracker is not None:
                    tracker.send_failed(chain * HOP_STRIDE, error)

    parts = [todo[i::threads] for i in range(threads)]
    workers = [threading.Thread(target=run, args=(p,), name=f"seed-{i}")
               for i, p in enumerate(parts) if p]
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    return errors


class LogCounter(logging.Handler):
    """Counts WARNING+ records (and keeps the first few) so the summary can show them."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.count = 0
        self.first: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.count += 1
        if len(self.first) < 5:
            try:
                self.first.append(f"{record.levelname} {record.name}: {record.getMessage()}"[:300])
            except Exception:  # noqa: BLE001
                self.first.append(f"{record.levelname} {record.name}: <unprintable>")
