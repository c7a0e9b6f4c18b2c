"""The send-the-next workload under the real CLI (``stress.actors``), as one object.

This process seeds the chains and consumes the results queue that every processing is reported
to, so lost, duplicated and unexpected ids are counted exactly (``stress.workload.Tracker``);
the caller runs the CLI (``stress.cli_workers.CliWorkers``) with :meth:`CliSendNext.environment`
in between. Used by the gevent tests and ``stress/workloads/gevent_send_next.py``.
"""

from __future__ import annotations

import uuid

from stress.common import split
from stress.polling import poll
from stress.run import ResultsConsumer
from stress.workload import (
    Tracker,
    actors_environment,
    define_hop_actor,
    make_broker,
    seed_chains,
)


class CliSendNext:
    """``chains`` chains, ``messages`` messages in all, on broker ``kind`` ("kombu" or
    "rabbitmq") at ``url`` (a vhost of the caller's)."""

    def __init__(self, kind: str, url: str, *, chains: int, messages: int,
                 name: str | None = None) -> None:
        self.kind = kind
        self.url = url
        self.chains = chains
        self.messages = messages
        tag = uuid.uuid4().hex[:8]
        self.name = name or f"send-next-{tag}"
        self.queue = f"next-{tag}"
        self.results_queue = f"{self.queue}-results"
        #: The worker processes' connections: KombuBroker's are ``<workers>-consumer`` and
        #: ``<workers>-producer``; every one of RabbitmqBroker's is called ``<workers>``.
        self.workers = f"{self.name}-w"
        self.tracker = Tracker()

    def environment(self) -> dict[str, str]:
        """What ``stress.actors`` reads (the caller adds PYTHONPATH)."""
        return actors_environment(self.kind, self.url, self.workers, self.queue,
                                  self.results_queue)

    def seed(self) -> list[str]:
        """Send hop 0 of every chain (and declare the results queue); the send errors."""
        seeder = make_broker(self.kind, self.url, f"{self.name}-seed")
        try:
            actor = define_hop_actor(seeder, self.queue, lambda *a: None, lambda: None)
            # Both brokers declare a queue's three server queues here (with their arguments):
            # the results queue exists before the first report, whoever consumes it.
            seeder.get_queue_message_counts(self.results_queue)
            return seed_chains(actor, self.tracker, self.chains, split(self.messages, self.chains))
        finally:
            seeder.close()

    def consume_results(self) -> ResultsConsumer:
        """Start counting the reports (``drain()`` it once the workers stopped)."""
        return ResultsConsumer(self.url, self.results_queue, self.tracker,
                               f"{self.name}-results").start()

    def wait_processed(self, count: int | None = None, timeout: float = 240) -> int:
        """Distinct ids processed, once ``count`` (default: all) are, or at ``timeout``."""
        wanted = self.messages if count is None else count
        return poll(lambda: self.tracker.n_processed, lambda n: n >= wanted, timeout, 0.2)
