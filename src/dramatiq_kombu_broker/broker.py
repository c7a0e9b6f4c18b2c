"""KombuBroker: dramatiq on RabbitMQ with two connections per process."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any

import amqp
from amqp.exceptions import AMQPError, ChannelError, PreconditionFailed
from dramatiq.broker import Broker, Consumer
from dramatiq.common import current_millis, dq_name, q_name, xq_name
from dramatiq.errors import ConnectionClosed, QueueJoinTimeout
from dramatiq.message import Message
from dramatiq.middleware import Middleware

from kombu_pyamqp_threadsafe import (
    ConnectionStats,
    KombuConnection,
    PublishBlockedError,
    forksafe,
    replies_within,
)

from .consumer import KombuConsumer
from .errors import QueueArgumentsMismatch
from .retry import retrying
from .settings import DEFAULT_MAX_DELAY_MS, BrokerSettings
from .stats import ConnectionHistory
from .topology import CLASSIC, existing_queue_type

logger = logging.getLogger(__name__)

#: Attempts of one enqueue (reconnecting in between) before ConnectionClosed, as RabbitmqBroker.
MAX_ENQUEUE_ATTEMPTS = 6
#: Attempts of one queue declaration before ConnectionClosed, as RabbitmqBroker.
MAX_DECLARE_ATTEMPTS = 2
#: The broker's connections, in the order of _connection_pair().
ROLES = ("consumer", "producer")
#: RabbitMQ's reply code for a mandatory message no queue took (the queue was deleted).
NO_ROUTE = 312


class KombuBroker(Broker):
    """A drop-in for dramatiq's RabbitmqBroker holding two connections per process.

    One connection consumes (each consumer thread its own channel), one publishes (each
    publishing thread its own channel, leased from a pool for as long as the thread lives).
    Both open on first use, and again in a forked child, which never uses its parent's.

    It takes RabbitmqBroker's arguments: ``url``, or ``parameters`` (a failover list of pika
    ConnectionParameters dicts), or pika's keyword parameters (``host``, ``port``,
    ``virtual_host``, ``credentials``, ...), one of the three; mixing them raises RuntimeError
    as RabbitmqBroker does. A pika parameter that has no equivalent here raises ValueError.

    Parameters:
      url: ``amqp://`` or ``amqps://`` URL, a ``;``-separated string or a list for failover.
        pika's query parameters (``?heartbeat=30&blocked_connection_timeout=60``) are read.
      confirm_delivery: a send returns only once the server holds the message (default True,
        where RabbitmqBroker's default is False).
      max_priority: declare queues with ``x-max-priority`` (1..255; classic queues only).
      middleware: as for every dramatiq broker.
      parameters: pika ConnectionParameters as dicts, tried in order (failover).
      host, port, virtual_host: pika's (defaults ``localhost``, 5672 or 5671 with TLS, ``/``).
      credentials: a pika ``PlainCredentials`` or a ``(user, password)`` pair (default guest).
      heartbeat: seconds between heartbeats (0 turns them off; default 60).
      connection_attempts, retry_delay: attempts per connect and seconds between them.
      socket_timeout: pika's name for ``connect_timeout``.
      blocked_connection_timeout: seconds a send waits while the server blocks publishing
        (memory or disk alarm) before it fails (default 30).
      ssl_options: ``True`` or a dict of py-amqp TLS options: connect with ``amqps``.
      client_properties: extra client properties (``connection_name`` names the connections).
      connection_name: shown by the server; ``-consumer``/``-producer`` are appended.
      prefetch, delay_prefetch: override the prefetch the worker asks for on queues / delay
        queues.
      queue_arguments: extra arguments for ``q`` and ``q.DQ``.
      connect_timeout: seconds to wait for the TCP and AMQP handshake (default 10).
      confirm_timeout: seconds a send waits for the server's replies, its confirm included,
        over all its attempts (default 10; then it raises ConnectionClosed).
      blocked_timeout: seconds a send waits while the server blocks publishing (a memory or
        disk alarm) before it raises ConnectionClosed naming the reason (default 30; pika's
        ``blocked_connection_timeout`` sets it too).
      ssl: options for ``amqps://`` (passed to kombu).
      transport_options: more options for kombu's connection.
      max_delay: longest accepted ``delay`` in milliseconds (default a year).
      queue_type: ``"classic"`` (RabbitmqBroker's queues) or ``"quorum"`` (replicated).
      delivery_limit: ``x-delivery-limit`` of quorum queues (deliveries before a message is
        dead-lettered to ``q.XQ``; -1: none, RabbitMQ 4.x).
    """

    def __init__(
        self, *,
        url: str | list[str] | None = None,
        confirm_delivery: bool = True,
        max_priority: int | None = None,
        middleware: list[Middleware] | None = None,
        parameters: Sequence[Mapping[str, Any]] | None = None,
        host: str | None = None,
        port: int | None = None,
        virtual_host: str | None = None,
        credentials: Any = None,
        heartbeat: float | None = None,
        connection_attempts: int | None = None,
        retry_delay: float | None = None,
        socket_timeout: float | None = None,
        blocked_connection_timeout: float | None = None,
        ssl_options: Any = None,
        client_properties: Mapping[str, Any] | None = None,
        connection_name: str | None = None,
        prefetch: int | None = None,
        delay_prefetch: int | None = None,
        queue_arguments: dict[str, Any] | None = None,
        connect_timeout: float | None = None,
        blocked_timeout: float | None = None,
        confirm_timeout: float | None = None,
        ssl: Any = None,
        transport_options: dict[str, Any] | None = None,
        max_delay: int = DEFAULT_MAX_DELAY_MS,
        queue_type: str = CLASSIC,
        delivery_limit: int | None = None,
    ) -> None:
        self.settings = BrokerSettings.from_arguments(
            url=url, parameters=parameters,
            pika={"host": host, "port": port, "virtual_host": virtual_host,
                  "credentials": credentials, "connection_attempts": connection_attempts,
                  "retry_delay": retry_delay, "socket_timeout": socket_timeout,
                  "blocked_connection_timeout": blocked_connection_timeout,
                  "ssl_options": ssl_options, "client_properties": client_properties},
            confirm_delivery=confirm_delivery, max_priority=max_priority, heartbeat=heartbeat,
            connection_name=connection_name, prefetch=prefetch, delay_prefetch=delay_prefetch,
            queue_arguments=queue_arguments, connect_timeout=connect_timeout,
            blocked_timeout=blocked_timeout, confirm_timeout=confirm_timeout, ssl=ssl,
            transport_options=transport_options, max_delay=max_delay, queue_type=queue_type,
            delivery_limit=delivery_limit,
        )
        self.confirm_delivery = self.settings.confirm_delivery
        self.max_priority = self.settings.max_priority
        # Guards _connections and _connections_pid (one pair per process).
        self._connections_lock = threading.Lock()
        self._connections: tuple[KombuConnection, KombuConnection] | None = None
        # Each connection's counts across reconnects, for stats().
        self._histories = {role: ConnectionHistory() for role in ROLES}
        # Each publishing thread's (pool, lease) on the producer connection.
        self._producer_leases = threading.local()
        # Canonical queue names whose three server queues may not exist yet.
        self.queues_pending: set[str] = set()
        forksafe.register(self)
        super().__init__(middleware=middleware)
        # Canonical names only (dramatiq's base class starts with a dict), as RabbitmqBroker.
        self.queues: set[str] = set()

    def __repr__(self) -> str:
        return f"<KombuBroker {self.settings.masked_url}>"

    # -- connections -----------------------------------------------------------------------

    def _connection_pair(self) -> tuple[KombuConnection, KombuConnection]:
        pair = self._connections
        if pair is None:
            with self._connections_lock:
                pair = self._connections
                if pair is None:
                    pair = self._connections = (
                        self.settings.connection("consumer", confirm_publish=False),
                        self.settings.connection("producer",
                                                 confirm_publish=self.confirm_delivery),
                    )
        return pair

    @property
    def consumer_connection(self) -> KombuConnection:
        """The connection every consumer of this process shares (opened on first use)."""
        return self._connection_pair()[0]

    @property
    def producer_connection(self) -> KombuConnection:
        """The connection every publishing thread of this process shares."""
        return self._connection_pair()[1]

    def _after_fork_in_child(self) -> None:
        # The parent's connection objects stay the parent's: the child builds its own pair.
        self._connections_lock = threading.Lock()
        self._connections = None
        self.queues_pending.update(self.queues)
        self._histories = {role: ConnectionHistory() for role in ROLES}

    def close(self) -> None:
        """Close both connections. Calling it again does nothing more."""
        with self._connections_lock:
            pair, self._connections = self._connections, None
        for connection in pair or ():
            try:
                connection.close()
            except (AMQPError, OSError):
                logger.debug("error while closing %r", connection, exc_info=True)

    # -- queues ----------------------------------------------------------------------------

    def consume(self, queue_name: str, prefetch: int = 1, timeout: int = 5000) -> Consumer:
        """A consumer of ``queue_name`` (``q`` or ``q.DQ``) on its own channel."""
        self.declare_queue(queue_name)
        delayed = queue_name != q_name(queue_name)
        override = self.settings.delay_prefetch if delayed else self.settings.prefetch
        return KombuConsumer(self, queue_name, override or prefetch, timeout)

    def declare_queue(self, queue_name: str, *, ensure: bool = False) -> None:
        """Record ``queue_name`` (idempotent); with ``ensure`` also declare it on the server."""
        canonical = q_name(queue_name)
        if canonical not in self.queues:
            self.emit_before("declare_queue", canonical)
            self.queues.add(canonical)
            self.queues_pending.add(canonical)
            self.emit_after("declare_queue", canonical)
            delayed = dq_name(canonical)
            self.delay_queues.add(delayed)
            self.emit_after("declare_delay_queue", delayed)
        if ensure:
            retrying(lambda: self._with_producer_channel(
                lambda channel: self.ensure_queues(canonical, channel)),
                MAX_DECLARE_ATTEMPTS, self.settings.connect_timeout, self._producer_server)

    def forget_queue(self, canonical: str) -> None:
        """The server may have lost this queue: declare it again before its next use."""
        if canonical in self.queues:
            self.queues_pending.add(canonical)

    def ensure_queues(self, canonical: str, channel: Any) -> None:
        """Declare ``q``, ``q.DQ`` and ``q.XQ`` on ``channel`` if not done yet."""
        if canonical not in self.queues_pending:
            return
        for name, arguments in self.settings.declarations(canonical):
            self._declare(channel, name, arguments)
        self.queues_pending.discard(canonical)

    def _declare(self, channel: Any, name: str, arguments: dict[str, Any]) -> Any:
        try:
            return channel.queue_declare(queue=name, durable=True, auto_delete=False,
                                         arguments=arguments)
        except PreconditionFailed as exc:
            raise self._mismatch(channel, name, arguments, exc.reply_text or "") from None

    def _mismatch(self, channel: Any, name: str, arguments: dict[str, Any],
                  reply_text: str) -> QueueArgumentsMismatch:
        """The error for a queue the server has with other arguments, naming both types when
        they differ (found by declaring again on fresh channels: the refused one is closed)."""
        def declare(probe: dict[str, Any]) -> str | None:
            fresh = channel.connection.channel()
            try:
                fresh.queue_declare(queue=name, durable=True, auto_delete=False,
                                    arguments=probe)
                return None
            except PreconditionFailed as exc:
                return str(exc.reply_text)
            finally:
                if fresh.is_open:
                    fresh.close()

        wanted = self.settings.queue_type
        try:
            existing = existing_queue_type(declare, arguments, reply_text)
        except (AMQPError, OSError):
            existing = None
        return QueueArgumentsMismatch(name, arguments, reply_text, wanted, existing)

    def get_declared_queues(self) -> set[str]:
        return self.queues.copy()

    def get_declared_delay_queues(self) -> set[str]:
        return self.delay_queues.copy()

    # -- publishing ------------------------------------------------------------------------

    def enqueue(self, message: Message[Any], *, delay: int | None = None) -> Message[Any]:
        """Publish ``message`` (to ``q.DQ`` with an eta when delayed) and return what was sent.

        With ``confirm_delivery`` it returns once the server has the message. Connection
        errors reconnect and retry, up to MAX_ENQUEUE_ATTEMPTS, then raise ConnectionClosed.
        """
        canonical = message.queue_name
        queue_name = canonical
        if delay is not None:
            self.settings.check_delay(delay)
            queue_name = dq_name(queue_name)
            message = message.copy(queue_name=queue_name,
                                   options={"eta": current_millis() + delay})
        self.declare_queue(canonical)

        # As RabbitmqBroker, per attempt: declare, before_enqueue, then encode, so what a
        # middleware writes into message.options there (broker_priority too) is what is sent.
        def publish(channel: Any) -> None:
            self.ensure_queues(canonical, channel)
            self.emit_before("enqueue", message, delay)
            body = amqp.Message(message.encode(), delivery_mode=2,
                                priority=message.options.get("broker_priority"))
            # A confirm that never comes (a frozen queue leader on another node) must not
            # hold the sender: it times out (TimeoutError, retried, then ConnectionClosed).
            channel.basic_publish(body, exchange="", routing_key=queue_name,
                                  mandatory=self.confirm_delivery,
                                  confirm_timeout=self.settings.confirm_timeout)

        def on_error(exc: BaseException) -> None:
            if isinstance(exc, ChannelError) and exc.reply_code == NO_ROUTE:
                self.forget_queue(canonical)
            logger.debug("enqueue of %s failed: %r", message.message_id, exc)

        # Every reply the send waits for (a new channel's Open-Ok, a declare, the confirm),
        # over all its attempts, comes within confirm_timeout: a server that answers nothing
        # with its socket open (a hung node) does not hold the sender until heartbeats notice.
        # No attempt starts after that deadline: it could not get a reply.
        settings = self.settings
        with replies_within(settings.confirm_timeout):
            retrying(lambda: self._with_producer_channel(publish), MAX_ENQUEUE_ATTEMPTS,
                     min(settings.connect_timeout, settings.confirm_timeout),
                     self._producer_server, on_error)
        self.emit_after("enqueue", message, delay)
        return message

    def _with_producer_channel(self, use: Any) -> Any:
        """Run ``use(channel)`` on the calling thread's channel of the producer connection.

        A thread keeps its lease on a pooled channel while it lives: taking and giving back a
        lease per send made many sending threads wait for the pool's lock (figures in
        docs/architecture.md). After an error the lease is given back and its channel
        closed (it may have a confirm in flight); when the thread ends the lease is dropped and
        the pool closes its channel at the next acquire().
        """
        connection = self.producer_connection
        self.connect(connection)
        pool = connection.default_channel_pool
        held = getattr(self._producer_leases, "held", None)
        if held is None or held[0] is not pool or not held[1].usable:
            # A failed channel goes back to be closed; a lease on an earlier pool (the
            # parent's after fork, or one from before close()) is only dropped, never used.
            if held is not None and held[0] is pool:
                held[1].release(discard=True)
            held = self._producer_leases.held = (
                pool, pool.acquire(timeout=self.settings.connect_timeout)
            )
        try:
            return use(held[1].channel)
        except PublishBlockedError:
            # The channel is fine and is kept: closing it would wait for a Close-Ok the server
            # does not send while it is not reading a blocked connection.
            raise
        except BaseException:
            self._producer_leases.held = None
            held[1].release(discard=True)
            raise

    def _producer_server(self) -> str:
        return self.producer_connection.as_uri()

    def connect(self, connection: KombuConnection) -> None:
        """Connect if needed with one attempt (kombu's own retry would sleep 2 s first).

        Threads that call it at once open one connection between them; a failed attempt moves
        the connection to the next URL of a failover list. A connection this broker no longer
        holds (it was closed) is never opened again.
        """
        if not connection.connected:
            if connection not in (self._connections or ()):
                raise ConnectionClosed(f"{self!r} was closed")
            connection.ensure_connection(max_retries=0, reraise_as_library_errors=False)
            for role, known in zip(ROLES, self._connections or (None, None), strict=True):
                if known is connection:
                    self._histories[role].observe(connection._connection)

    def stats(self) -> dict[str, ConnectionStats]:
        """What each connection of this process has done: ``{"consumer": ..., "producer": ...}``.

        Counters add up over reconnects (``reconnects`` counts them); ``state``, ``server``,
        ``channels``, ``blocked`` and ``undispatched`` describe the connection in use now.
        Cheap enough to call on every scrape: it reads counters, it sends nothing.
        """
        pair = self._connections or (None, None)
        return {
            role: self._histories[role].stats(getattr(connection, "_connection", None))
            for role, connection in zip(ROLES, pair, strict=True)
        }

    # -- inspection (tests, join) ----------------------------------------------------------

    def get_queue_message_counts(self, queue_name: str) -> tuple[int, int, int]:
        """Ready messages in ``q``, ``q.DQ`` and ``q.XQ`` (declaring them, as RabbitmqBroker)."""
        canonical = q_name(queue_name)
        counts = self._with_producer_channel(lambda channel: [
            self._declare(channel, name, arguments).message_count
            for name, arguments in self.settings.declarations(canonical)
        ])
        self.queues_pending.discard(canonical)
        return counts[0], counts[1], counts[2]

    def flush(self, queue_name: str) -> None:
        """Drop every message from ``q``, ``q.DQ`` and ``q.XQ``; missing queues are skipped."""
        canonical = q_name(queue_name)
        for name in (canonical, dq_name(canonical), xq_name(canonical)):
            try:
                self._with_producer_channel(lambda channel, name=name: channel.queue_purge(name))
            except ChannelError as exc:
                if exc.reply_code != 404:
                    raise

    def flush_all(self) -> None:
        for queue_name in self.queues:
            self.flush(queue_name)

    def join(self, queue_name: str, min_successes: int = 10, idle_time: int = 100, *,
             timeout: int | None = None) -> None:
        """Wait until ``q`` and ``q.DQ`` have been empty ``min_successes`` times in a row.

        Like RabbitmqBroker's, it does not wait for unacked messages. Raises QueueJoinTimeout
        after ``timeout`` milliseconds.
        """
        deadline = None if timeout is None else time.monotonic() + timeout / 1000
        successes = 0
        while successes < min_successes:
            if deadline is not None and time.monotonic() >= deadline:
                raise QueueJoinTimeout(queue_name)
            ready, delayed, _ = self.get_queue_message_counts(queue_name)
            successes = successes + 1 if ready + delayed == 0 else 0
            time.sleep(idle_time / 1000)

