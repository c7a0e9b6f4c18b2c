"""A small dramatiq app on KombuBroker, run by the real dramatiq CLI.

    AMQP_URL=amqp://guest:guest@127.0.0.1:5672/ dramatiq examples.app -p 2 -t 8

Each worker process imports this module after the CLI forks it, so each builds its own broker
and holds exactly two connections: ``<name>-<pid>-consumer`` and ``<name>-<pid>-producer``.

Environment:
  AMQP_URL                  the RabbitMQ to use (default amqp://guest:guest@127.0.0.1:5672/)
  EXAMPLE_QUEUE             the queue of the ``work`` actor (default "example")
  EXAMPLE_RESULTS_QUEUE     where ``record`` messages go (default "<EXAMPLE_QUEUE>-results");
                            run the worker with ``--queues <EXAMPLE_QUEUE>`` to leave them there
  EXAMPLE_CONNECTION_NAME   prefix of the connection names (default "example")
"""

from __future__ import annotations

import os
import time

import dramatiq
from dramatiq.middleware import Middleware

from dramatiq_kombu_broker import KombuBroker

QUEUE = os.environ.get("EXAMPLE_QUEUE", "example")
RESULTS_QUEUE = os.environ.get("EXAMPLE_RESULTS_QUEUE", f"{QUEUE}-results")
CONNECTION_NAME = os.environ.get("EXAMPLE_CONNECTION_NAME", "example")


class AnnounceBoot(Middleware):
    """Tells whoever reads the results queue that this worker process is up (and so opens the
    process's producer connection at boot)."""

    def after_worker_boot(self, broker, worker):
        record.send("boot", os.getpid())


broker = KombuBroker(
    url=os.environ.get("AMQP_URL") or None,  # None: KombuBroker's default
    connection_name=f"{CONNECTION_NAME}-{os.getpid()}",
)
broker.add_middleware(AnnounceBoot())
dramatiq.set_broker(broker)


@dramatiq.actor(queue_name=QUEUE, max_retries=3, min_backoff=10, max_backoff=100)
def work(item: int) -> None:
    """Pretend to do something, then report the item as done."""
    time.sleep(0.01)
    record.send("done", item, os.getpid())


@dramatiq.actor(queue_name=RESULTS_QUEUE)
def record(kind: str, *values: int) -> None:
    """Only a destination: the example's reader takes these messages off the queue."""
