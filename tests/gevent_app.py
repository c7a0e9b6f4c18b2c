"""Actors for tests/test_broker_gevent.py, run by the real ``dramatiq-gevent`` CLI.

``flood`` publishes without end until its TimeLimit interrupts it. Under gevent the limit is a
``gevent.Timeout`` raised in the actor's greenlet at its next switch, and a publisher switches
only while it waits (for the write lock, a confirm): so the interrupt lands inside a publish.
``work`` reports each item on the same connection, from every other greenlet, meanwhile.

Environment: ``AMQP_URL``, ``GEVENT_APP_QUEUE`` (the actors'), ``GEVENT_APP_RESULTS_QUEUE``
(``record``'s, left to the test), ``GEVENT_APP_SINK_QUEUE`` (``flood``'s, consumed by nobody),
``GEVENT_APP_CONNECTION_NAME``, ``GEVENT_APP_TIME_LIMIT_MS`` (``flood``'s limit).
"""

from __future__ import annotations

import os

import dramatiq
from dramatiq.middleware import Middleware

from dramatiq_kombu_broker import KombuBroker

_env = os.environ
QUEUE = _env.get("GEVENT_APP_QUEUE", "gevent-app")
RESULTS_QUEUE = _env.get("GEVENT_APP_RESULTS_QUEUE", f"{QUEUE}-results")
SINK_QUEUE = _env.get("GEVENT_APP_SINK_QUEUE", f"{QUEUE}-sink")


class AnnounceBoot(Middleware):
    """Opens the producer connection at boot and says which process is up."""

    def after_worker_boot(self, broker: dramatiq.Broker, worker: dramatiq.Worker) -> None:
        record.send("boot", os.getpid())


broker = KombuBroker(url=_env.get("AMQP_URL") or None,
                     connection_name=_env.get("GEVENT_APP_CONNECTION_NAME", "gevent-app"))
broker.add_middleware(AnnounceBoot())
dramatiq.set_broker(broker)


@dramatiq.actor(queue_name=QUEUE, max_retries=0,
                time_limit=int(_env.get("GEVENT_APP_TIME_LIMIT_MS") or 200))
def flood(n: int) -> None:
    """Publish until the time limit interrupts (the message then goes to ``q.XQ``)."""
    record.send("flood", n)
    i = 0
    while True:
        sink.send(n, i)
        i += 1


@dramatiq.actor(queue_name=QUEUE, max_retries=0)
def work(item: int) -> None:
    record.send("done", item)


@dramatiq.actor(queue_name=RESULTS_QUEUE)
def record(kind: str, *values: int) -> None:
    """Only a destination: the test takes these messages off the queue."""


@dramatiq.actor(queue_name=SINK_QUEUE)
def sink(n: int, i: int) -> None:
    """Only a destination."""
