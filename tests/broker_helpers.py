"""Shared helpers for the ``test_broker_*`` suites: KombuBroker through a real dramatiq Worker
on the real RabbitMQ (no mocks).

* :class:`BrokerEnv`: builds brokers and workers for one test and always tears them down
  (workers stopped, brokers closed, with bounded waits so a hang fails instead of blocking).
* :class:`Recorder`: a thread-safe event log that tests wait on instead of sleeping;
  :func:`recording_actor`, an actor on its own queue that records its calls in one.
* :func:`raw_channel`: a plain py-amqp connection to the session vhost, for publishing garbage,
  deleting queues and reading results behind the broker's back.
"""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from typing import Any, NamedTuple

import amqp
import dramatiq
from dramatiq.brokers.rabbitmq import RabbitmqBroker
from dramatiq.middleware.time_limit import TimeLimit

from dramatiq_kombu_broker import KombuBroker
from stress import rabbit_admin

# Re-exported for the tests: the fault scenarios of stress/ use it too.
from stress.bounded import run_bounded as run_bounded
from stress.polling import poll

#: Arguments RabbitmqBroker's queues have (dramatiq 2.2, dramatiq_dead_message_ttl unset).
DEAD_MESSAGE_TTL = 86400000 * 7


def unique(prefix: str = "q") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def wait_until(predicate: Callable[[], Any], timeout: float, interval: float = 0.05) -> Any:
    """Poll ``predicate`` until it returns something truthy (returned) or ``timeout`` s pass
    (then the last falsy value is returned)."""
    return poll(predicate, bool, timeout, interval)


class Recorder:
    """Thread-safe list of what actors saw; ``wait(n)`` blocks until ``n`` items arrived."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self.items: list[Any] = []

    def add(self, item: Any) -> None:
        with self._cond:
            self.items.append(item)
            self._cond.notify_all()

    def __len__(self) -> int:
        with self._cond:
            return len(self.items)

    def snapshot(self) -> list[Any]:
        with self._cond:
            return list(self.items)

    def wait_for(self, predicate: Callable[[list[Any]], bool], timeout: float) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: predicate(self.items), timeout)

    def wait(self, count: int, timeout: float) -> bool:
        """True once at least ``count`` items were recorded, False after ``timeout`` s."""
        return self.wait_for(lambda items: len(items) >= count, timeout)


class Recording(NamedTuple):
    """What :func:`recording_actor` makes: the actor, what its calls recorded, and its queue."""

    actor: dramatiq.Actor[Any, Any]
    seen: Recorder
    queue: str


def _the_argument(item: Any) -> Any:
    return item


def recording_actor(broker: Any, queue: str | None = None, *,
                    record: Callable[..., Any] = _the_argument, **options: Any) -> Recording:
    """An actor of ``broker`` on ``queue`` (a new unique one by default) whose every call adds
    ``record(*args, **kwargs)`` (by default: its one argument) to a :class:`Recorder`.

    ``options`` go to ``dramatiq.actor``; the actor is named after its queue unless
    ``actor_name`` says otherwise, so several can share a broker."""
    queue = queue or unique()
    seen = Recorder()

    def call(*args: Any, **kwargs: Any) -> None:
        seen.add(record(*args, **kwargs))

    options.setdefault("actor_name", f"record_{queue}")
    return Recording(dramatiq.actor(call, broker=broker, queue_name=queue, **options), seen, queue)


class BrokerEnv:
    """Brokers and workers of one test; :meth:`close` stops and closes them all."""

    def __init__(self, amqp_url: str, vhost: str, connection_name: str) -> None:
        self.amqp_url = amqp_url
        self.vhost = vhost
        self.connection_name = connection_name
        self.brokers: list[Any] = []
        self.workers: list[dramatiq.Worker] = []
        self._names = 0

    def broker(self, *, set_global: bool = True, **options: Any) -> KombuBroker:
        """A KombuBroker on the session vhost named ``connection_name`` (then ``-2``, ``-3``)."""
        if "connection_name" not in options:
            self._names += 1
            suffix = "" if self._names == 1 else f"-{self._names}"
            options["connection_name"] = f"{self.connection_name}{suffix}"
        options.setdefault("url", self.amqp_url)
        broker = KombuBroker(**options)
        self.brokers.append(broker)
        if set_global:
            dramatiq.set_broker(broker)
        return broker

    def rabbitmq_broker(self, **options: Any) -> RabbitmqBroker:
        """The reference broker (pika) on the same vhost, with publisher confirms."""
        options.setdefault("url", self.amqp_url)
        options.setdefault("confirm_delivery", True)
        broker = RabbitmqBroker(**options)
        self.brokers.append(broker)
        return broker

    def worker(self, broker: Any, *, threads: int = 4, start: bool = True,
               **options: Any) -> dramatiq.Worker:
        options.setdefault("worker_timeout", 100)
        worker = dramatiq.Worker(broker, worker_threads=threads, **options)
        self.workers.append(worker)
        if start:
            worker.start()
        return worker

    def stop_worker(self, worker: dramatiq.Worker, timeout: float = 5) -> None:
        if worker in self.workers:
            self.workers.remove(worker)
        run_bounded(lambda: worker.stop(timeout=int(timeout * 1000)), timeout + 10,
                    "worker.stop()")

    def close(self) -> None:
        errors: list[BaseException] = []
        for worker in list(self.workers):
            try:
                self.stop_worker(worker)
            except BaseException as exc:  # noqa: BLE001 - reported after the rest is closed
                errors.append(exc)
        for broker in self.brokers:
            try:
                run_bounded(broker.close, 10, f"{broker!r}.close()")
            except BaseException as exc:  # noqa: BLE001
                errors.append(exc)
        self.brokers.clear()
        if errors:
            raise errors[0]


def time_limits(broker: Any, interval_ms: int = 20) -> None:
    """Start the broker's TimeLimit watchdog (the CLI does it on process_boot), checking every
    ``interval_ms`` instead of every second so limits fire close to their deadline."""
    for middleware in broker.middleware:
        if isinstance(middleware, TimeLimit):
            middleware.manager.interval = interval_ms / 1000
    broker.emit_after("process_boot")


@contextmanager
def raw_channel(amqp_url: str, name: str | None = None) -> Iterator[amqp.Channel]:
    """A plain py-amqp channel on the session vhost (closed at exit)."""
    properties = {"connection_name": name or unique("raw")}
    connection = amqp.Connection(client_properties=properties, connect_timeout=10,
                                 **rabbit_admin.amqp_connect_kwargs(amqp_url))
    connection.connect()
    try:
        yield connection.channel()
    finally:
        with suppress(Exception):
            connection.close()


def delete_queues(amqp_url: str, *names: str) -> None:
    with raw_channel(amqp_url) as channel:
        for name in names:
            channel.queue_delete(name)


def queue_row(vhost: str, name: str) -> dict[str, Any] | None:
    return rabbit_admin.queue_details(vhost).get(name)


def lock_held(lock: Any) -> bool:
    """Whether another thread holds ``lock`` (a Lock or an RLock, which has no locked())."""
    if lock.acquire(blocking=False):
        lock.release()
        return False
    return True


def pool_in_use(pool: Any) -> int:
    """Leases out of a ChannelPool (public ``in_use`` when the pool has it)."""
    in_use = getattr(type(pool), "in_use", None)
    if in_use is not None:
        return pool.in_use() if callable(in_use) and not isinstance(in_use, property) \
            else pool.in_use
    return pool._in_use


def close_connections_named(connection_name: str, vhost: str, reason: str) -> int:
    """Force-close the connections of ``vhost`` called ``connection_name``; returns how many."""
    return rabbit_admin.close_connections(reason, connection_name=connection_name, vhost=vhost)


def connection_info(connection_name: str, vhost: str, *columns: str) -> list[dict[str, Any]]:
    """Extra ``rabbitmqctl list_connections`` columns (e.g. ``timeout``, ``channels``) of the
    connections of ``vhost`` called ``connection_name``."""
    ports = {c["peer_port"] for c in rabbit_admin.find_connections(connection_name, vhost=vhost)}
    out = rabbit_admin.rabbitmqctl("list_connections", "peer_port", "vhost", *columns,
                                   "--formatter", "json")
    rows = json.loads(out.strip() or "[]")
    return [row for row in rows if row.get("vhost") == vhost and row.get("peer_port") in ports]


def consumer_channels(connection_name: str, vhost: str) -> list[dict[str, Any]]:
    """``rabbit_admin.channel_details`` rows of the connections called ``connection_name``."""
    pids = {c["pid"] for c in rabbit_admin.find_connections(connection_name, vhost=vhost)}
    return [row for row in rabbit_admin.channel_details(vhost) if row.get("connection") in pids]


def connections_named(prefix: str, vhost: str | None = None) -> list[str]:
    """Client connection_names on the server that start with ``prefix``."""
    names = [rabbit_admin.connection_name_of(c) or "" for c in rabbit_admin.list_connections(vhost)]
    return sorted(name for name in names if name.startswith(prefix))
