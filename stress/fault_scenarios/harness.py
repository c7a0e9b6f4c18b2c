"""A KombuBroker and a dramatiq Worker under load: stream ids, inject a fault, measure recovery,
and check at the end that nothing was lost and nothing is left on the server."""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import Iterator
from typing import Any

import dramatiq

from dramatiq_kombu_broker import KombuBroker
from stress.bounded import run_bounded
from stress.fault_scenarios.context import Context
from stress.fault_scenarios.ledger import ACTOR_PREFIX, PROBE_BASE, Ledger, Track, work_message
from stress.fault_scenarios.log_watch import LogWatch
from stress.fault_scenarios.results import FaultResult, Window
from stress.fault_scenarios.senders import Senders, wait_sent_and_processed
from stress.fault_scenarios.server_state import wait_one_connection_each, wait_queues_empty

now = time.monotonic


class LoadedWorker:
    """A KombuBroker with a dramatiq Worker consuming ``queues`` queues, a ledger of every
    processing, and the means to stream ids, inject a fault and measure recovery."""

    def __init__(self, ctx: Context, *, url: str | None = None, queues: int = 1,
                 threads: int | None = None, heartbeat: float | None = None,
                 connect_timeout: float = 5, name: str | None = None,
                 watch: LogWatch | None = None) -> None:
        self.ctx = ctx
        self.scale = ctx.scale
        self.name = name or f"faults-{uuid.uuid4().hex[:6]}"
        tag = uuid.uuid4().hex[:6]
        self.queues = [f"fq-{tag}-{i}" for i in range(queues)]
        self.ledger = Ledger()
        self.watch = watch
        options: dict[str, Any] = {"connection_name": self.name,
                                   "connect_timeout": connect_timeout}
        if heartbeat is not None:
            options["heartbeat"] = heartbeat
        self.broker = KombuBroker(url=url or ctx.url, **options)
        self.broker.add_middleware(Track(self.ledger))
        work_s = self.scale.work_ms / 1000

        def work(mid: int) -> None:
            time.sleep(work_s)

        for index, queue in enumerate(self.queues):
            dramatiq.actor(work, broker=self.broker, actor_name=f"{ACTOR_PREFIX}_{index}",
                           queue_name=queue, max_retries=0)
        self.worker = dramatiq.Worker(self.broker, worker_threads=threads or self.scale.threads,
                                      worker_timeout=100)
        self.started = 0.0
        self._probes = 0
        self.senders: list[Senders] = []
        self.windows: list[Window] = []

    @property
    def consumer_name(self) -> str:
        return f"{self.name}-consumer"

    @property
    def producer_name(self) -> str:
        return f"{self.name}-producer"

    def send(self, mid: int) -> None:
        index = mid % len(self.queues)
        self.broker.enqueue(work_message(self.queues[index], mid, f"{ACTOR_PREFIX}_{index}"))

    def start(self) -> LoadedWorker:
        for queue in self.queues:  # declared up front so counts and joins see them
            self.broker.declare_queue(queue, ensure=True)
        self.started = now()
        self.worker.start()
        return self

    def stream(self, ids: list[int], *, threads: int | None = None,
               rate: float | None = -1.0) -> Senders:
        """Start sending ``ids`` (rate -1: the scale's rate; None: flat out)."""
        senders = Senders(self.send, ids, threads or self.scale.senders,
                          self.scale.send_rate if rate == -1.0 else rate, self.ledger,
                          deadline=now() + self.scale.timeout)
        self.senders.append(senders)
        return senders.start()

    def wait_processed(self, count: int, timeout: float | None = None) -> None:
        if not self.ledger.wait_processed(count, timeout or self.scale.timeout):
            raise TimeoutError(f"only {self.ledger.processed} of {count} messages processed")

    def probe(self, queue_index: int = 0, timeout: float | None = None) -> float:
        """Send one message (retrying until it is accepted); return when it was accepted."""
        self._probes += 1
        mid = (PROBE_BASE + self._probes) * len(self.queues) + queue_index  # on that queue
        deadline = now() + (timeout or self.scale.timeout)
        while True:
            try:
                self.send(mid)
            except Exception as exc:  # noqa: BLE001 - retried until the deadline
                self.ledger.record_send_failure(mid, exc)
                if now() >= deadline:
                    raise
                time.sleep(0.05)
                continue
            self.ledger.record_sent(mid)
            return now()

    def consumer_channels(self) -> list[Any]:
        """The channels the worker's consumers use right now (dramatiq's consumer threads)."""
        threads = list(self.worker.consumers.values())
        consumers = [getattr(thread, "consumer", None) for thread in threads]
        return [c.channel for c in consumers if getattr(c, "channel", None) is not None]

    def begin(self) -> Window:
        """A fault starts now: remember which channels are the old ones."""
        window = Window(now(), 0.0)
        window.old = self.ledger.keys_of(self.consumer_channels())
        return window

    def recover(self, window: Window, queue_index: int | None = None,
                timeout: float | None = None) -> Window:
        """Measure recovery from ``window`` (begun with :meth:`begin`; ``end`` is the moment
        the fault ended, now if not set)."""
        if not window.end:
            window.end = now()
        timeout = timeout or self.scale.timeout / 2
        queue = None if queue_index is None else self.queues[queue_index]
        old = self.ledger.channels_before(window.start, queue) | window.old
        accepted = self.probe(queue_index or 0, timeout)
        window.producer = accepted - window.end
        first = self.ledger.first_processing(window.end, old, queue, timeout)
        window.consumer = None if first is None else max(0.0, first - window.end)
        self.windows.append(window)
        return window

    def finish(self, fault: str) -> FaultResult:
        """Wait until everything sent was processed and the queues are empty on the server,
        then stop the worker, close the broker and return the result."""
        scale = self.scale
        result = FaultResult(fault)
        deadline = now() + scale.timeout
        try:
            result.problems += wait_sent_and_processed(self.senders, self.ledger, deadline)
            names = [q for queue in self.queues for q in (queue, f"{queue}.DQ")]
            dead_names = [f"{q}.XQ" for q in self.queues]
            left = wait_queues_empty(self.ctx.vhost, names + dead_names,
                                     max(5.0, deadline - now()), only=names)
            if any(left[n] for n in names):
                result.problems.append(f"messages still on the server: {left}")
            result.dead_lettered = sum(left[n] for n in dead_names)
            names = [self.consumer_name, self.producer_name]
            listing = wait_one_connection_each(self.ctx.vhost, names)
            for name in names:
                count = len(listing.get(name, []))
                if count != 1:
                    result.problems.append(f"{count} server connections named {name} "
                                           "(expected exactly 1)")
        finally:
            self.close(result)
        result.count(self.ledger, self.watch)
        result.windows = list(self.windows)
        result.duration = now() - self.started
        for window in self.windows:
            if window.consumer is None:
                result.problems.append("the worker did not consume again after a fault")
        return result

    @contextlib.contextmanager
    def closing_on_error(self) -> Iterator[LoadedWorker]:
        """Around the body of a case: the worker is closed if the body raises (else
        :meth:`finish` closes it, once everything sent was processed)."""
        try:
            yield self
        except BaseException:
            self.close()
            raise

    def close(self, result: FaultResult | None = None) -> None:
        for senders in self.senders:
            senders.stop()
        try:
            run_bounded(lambda: self.worker.stop(timeout=20_000), 40, "worker.stop()")
        except AssertionError as exc:
            if result is not None:
                result.problems.append(str(exc))
        try:
            run_bounded(self.broker.close, 20, "broker.close()")
        except AssertionError as exc:
            if result is not None:
                result.problems.append(str(exc))
