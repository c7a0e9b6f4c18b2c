"""The dramatiq Consumer: one channel on the shared consumer connection.

Deliveries are dispatched in the consumer thread (it owns the channel). Worker threads ack and
nack straight onto that channel: basic.ack has no reply, so it needs no round trip through the
consumer thread, and it is on the wire before ``ack()`` returns, so a later channel close can
never overtake it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from contextlib import suppress
from queue import PriorityQueue
from typing import TYPE_CHECKING, Any

from amqp.exceptions import AMQPError, ConsumerCancelled
from dramatiq.broker import Consumer, MessageProxy
from dramatiq.common import q_name
from dramatiq.errors import DecodeError
from dramatiq.message import Message, get_encoder

from kombu_pyamqp_threadsafe import replies_within

from .reconnect import recovery_policy
from .retry import connection_closed

if TYPE_CHECKING:
    from .broker import KombuBroker

logger = logging.getLogger(__name__)


class KombuMessage(MessageProxy):
    """A delivered message, tied to the channel that delivered it."""

    def __init__(self, message: Message[Any], delivery_tag: int, redelivered: bool,
                 channel: Any) -> None:
        super().__init__(message)
        self.redelivered = redelivered
        self._tag = delivery_tag
        self._channel = channel


class KombuConsumer(Consumer):
    """Consumes one queue (``q`` or ``q.DQ``) for one dramatiq consumer thread.

    When its channel or the connection fails, or the server cancels it, the consumer recovers
    in place: ``__next__`` opens a new channel (reconnecting the shared connection, one new
    connection for every consumer) and consumes again, with bounded attempts and backoff
    (:class:`~.reconnect.RecoveryPolicy`). Only when those run out does it raise
    ConnectionClosed, and dramatiq's consumer thread restarts it after its fixed delay.
    """

    def __init__(self, broker: KombuBroker, queue_name: str, prefetch: int, timeout: int):
        self.broker = broker
        self.queue_name = queue_name
        self.prefetch = prefetch
        self.timeout = timeout / 1000
        self._buffer: deque[Any] = deque()
        self._closed = False
        # False from the moment the channel failed until a new one consumes.
        self._live = False
        self._dropped = 0
        settings = broker.settings
        self._policy = recovery_policy(settings.connection_attempts, settings.retry_delay,
                                       len(settings.urls))
        #: Recoveries in place so far (a restart by dramatiq makes a new consumer).
        self.recoveries = 0
        self._kombu = broker.consumer_connection
        try:
            self._open()
        except BaseException as exc:
            # dramatiq retries a failed consumer every few seconds: never leave its channel open.
            self._discard_channel()
            if isinstance(exc, (AMQPError, OSError)):
                raise connection_closed(exc, self._kombu.as_uri()) from None
            raise

    def _open(self) -> None:
        """Connect if needed, open a channel, declare the queues and consume.

        Each reply (Open-Ok, Declare-Ok, Qos-Ok, Consume-Ok) comes within connect_timeout or
        the attempt fails (TimeoutError) and the next one opens a new channel: a quorum queue's
        basic.consume waits on the server for the queue's leader, and one sent while the
        leader's node hung was held up to a minute past the thaw, while a new one consumed at
        once.
        """
        with replies_within(self.broker.settings.connect_timeout):
            self.broker.connect(self._kombu)
            channel = self._kombu.channel()
            self.channel = channel
            # py-amqp turns a body into str when the message names a content_encoding (kombu
            # and celery producers do); dramatiq decodes bytes itself.
            channel.auto_decode = False
            self.connection = channel.connection
            self.broker.ensure_queues(q_name(self.queue_name), channel)
            channel.basic_qos(0, self.prefetch, False)
            channel.basic_consume(self.queue_name, callback=self._buffer.append)
        self._live = True

    def __next__(self) -> KombuMessage | None:
        buffer = self._buffer
        if not buffer:
            if not self._live and not self._recover():
                return None
            try:
                self.connection.drain_events(timeout=self.timeout)
            except TimeoutError:
                return None
            except (AMQPError, OSError) as exc:
                self._lost(exc)
                return None
            if not buffer:
                return None
        raw = buffer.popleft()
        tag = raw.delivery_info["delivery_tag"]
        try:
            message = Message.decode(raw.body)
            _check_fields(message)
        except DecodeError:
            logger.exception(
                "Dead-lettering undecodable message %s on queue %r (encoder %r).",
                tag, self.queue_name, get_encoder(),
            )
            self._settle(self.channel, tag, ack=False)
            return None
        if message.queue_name != self.queue_name:
            # dramatiq finds the consumer to ack with by the message's queue name; a body naming
            # another queue (a shovel, a manual re-publish) must still be acked here.
            logger.warning("Message %s in queue %r names queue %r; handling it as %r.",
                           message.message_id, self.queue_name, message.queue_name,
                           self.queue_name)
            message = message.copy(queue_name=self.queue_name)
        return KombuMessage(message, tag, raw.delivery_info["redelivered"], self.channel)

    def _lost(self, exc: BaseException) -> None:
        """The channel is gone (or the server cancelled the consumer: the queue was deleted, or
        its node is down): drop what it delivered, declare the queues again on recovery."""
        self._live = False
        self._buffer.clear()
        self.broker.forget_queue(q_name(self.queue_name))
        self._policy.lost()
        logger.warning("Consumer of queue %r lost its channel (%s); consuming again on a new "
                       "channel (AMQP server %s).", self.queue_name, _describe(exc),
                       self._kombu.as_uri())
        _forget_delayed_messages()

    def _recover(self) -> bool:
        """One recovery attempt if it is due, else wait (at most ``timeout``) for it.

        True once consuming again. Raises ConnectionClosed when the policy gives up, so
        dramatiq's restart is the last resort. Returns False at once when the consumer was
        closed or its thread is stopping (a worker shutting down makes no new attempt).
        """
        if self._closed or not _thread_running():
            return False
        wait = self._policy.wait()
        if wait > 0:
            time.sleep(min(wait, self.timeout))
            return False
        self._discard_channel()
        try:
            self._open()
        except (AMQPError, OSError) as exc:
            if self._closed:
                # close() (another thread: the worker stopping) took the channel over to close
                # it, which woke this attempt; closing it here too would take it back.
                return False
            self._discard_channel()
            if self._policy.failed() is None:
                raise connection_closed(exc, self._kombu.as_uri()) from None
            logger.warning("Consumer of queue %r could not consume again (attempt %d): %s "
                           "(AMQP server %s).", self.queue_name, self._policy.failures,
                           _describe(exc), self._kombu.as_uri())
            return False
        self._policy.succeeded()
        self.recoveries += 1
        logger.info("Consumer of queue %r consumes again (AMQP server %s).", self.queue_name,
                    self._kombu.as_uri())
        return True

    # Upstream (dramatiq's Consumer): takes any MessageProxy. Here only the messages this
    # consumer delivered, which carry their channel and delivery tag.
    def ack(self, message: MessageProxy) -> None:
        delivered = _delivered(message)
        self._settle(delivered._channel, delivered._tag, ack=True)

    def nack(self, message: MessageProxy) -> None:
        delivered = _delivered(message)
        self._settle(delivered._channel, delivered._tag, ack=False)

    def _settle(self, channel: Any, tag: int, ack: bool) -> None:
        if channel is not self.channel or self._closed or not self._live:
            # Delivery tags are per channel: on a newer channel this tag may name another message.
            self._drop(tag, ack)
            return
        try:
            if ack:
                channel.basic_ack(tag)
            else:
                channel.basic_reject(tag, requeue=False)
        except (AMQPError, OSError):
            # The channel died under the ack. Its deliveries go back to the queue, so no later
            # attempt can settle this one (dramatiq's retry would only wait 5 s to drop it).
            # The consumer thread sees the failure too, and recovers; marking it here could
            # mark the new channel it may have opened meanwhile.
            self._drop(tag, ack)

    def _drop(self, tag: int, ack: bool) -> None:
        self._dropped += 1
        log = logger.warning if self._dropped == 1 else logger.debug
        log("Dropped %s of message %s on %r: its channel is gone, so the server redelivers it "
            "(%d dropped on this consumer so far).", "ack" if ack else "nack", tag,
            self.queue_name, self._dropped)

    def requeue(self, messages: Any) -> None:
        """No-op: the server requeues whatever a closed channel left unacked."""

    def close(self) -> None:
        self._closed = True
        self._live = False
        self._discard_channel()

    def _discard_channel(self) -> None:
        channel = getattr(self, "channel", None)
        if channel is not None and channel.is_open:
            with suppress(AMQPError, OSError):
                channel.close()


_FIELD_TYPES: dict[str, type | tuple[type, ...]] = {
    "queue_name": str, "actor_name": str, "args": (list, tuple), "kwargs": dict, "options": dict}


def _describe(exc: BaseException) -> str:
    if isinstance(exc, ConsumerCancelled):
        return "the server cancelled the consumer: the queue was deleted or is unavailable"
    return f"{type(exc).__name__}: {exc}"


def _thread_running() -> bool:
    """False once dramatiq asked the calling consumer thread to stop."""
    return getattr(threading.current_thread(), "running", True) is not False


def _forget_delayed_messages() -> None:
    """Clear the calling consumer thread's delayed messages, as dramatiq does on a restart.

    They came from the lost channel, which the server redelivers: kept, each would be enqueued
    when due AND again when its redelivered copy is due, and its ack would be dropped.
    """
    thread = threading.current_thread()
    if isinstance(getattr(thread, "delay_queue", None), PriorityQueue):
        thread.delay_queue = PriorityQueue()  # type: ignore[attr-defined]


def _delivered(message: MessageProxy) -> KombuMessage:
    if not isinstance(message, KombuMessage):
        raise TypeError(f"{message!r} was not delivered by a KombuConsumer: it cannot be settled")
    return message


def _check_fields(message: Message[Any]) -> None:
    """Raise DecodeError for a message dramatiq would choke on (it decodes any JSON object).

    A ``kwargs`` that is not a dict, for one, kills the worker thread in dramatiq's own error
    handler and the message is acked unprocessed; dead-lettering keeps it.
    """
    for name, types in _FIELD_TYPES.items():
        value = getattr(message, name)
        if not isinstance(value, types):
            raise DecodeError(f"message field {name!r} is a {type(value).__name__}",
                              value, None)
