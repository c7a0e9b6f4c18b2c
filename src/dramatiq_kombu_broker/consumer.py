"""The dramatiq Consumer: one channel on the shared consumer connection.

Deliveries are dispatched in the consumer thread (it owns the channel). Worker threads ack and
nack straight onto that channel: basic.ack has no reply, so it needs no round trip through the
consumer thread, and it is on the wire before ``ack()`` returns, so a later channel close can
never overtake it.
"""

from __future__ import annotations

import logging
from collections import deque
from contextlib import suppress
from typing import TYPE_CHECKING, Any

from amqp.exceptions import AMQPError
from dramatiq.broker import Consumer, MessageProxy
from dramatiq.common import q_name
from dramatiq.errors import DecodeError
from dramatiq.message import Message, get_encoder

from .retry import connection_closed

if TYPE_CHECKING:
    from .broker import KombuBroker

logger = logging.getLogger(__name__)


class KombuMessage(MessageProxy):
    """A delivered message, tied to the channel that delivered it."""

    def __init__(self, message: Message, delivery_tag: int, redelivered: bool, channel: Any):
        super().__init__(message)
        self.redelivered = redelivered
        self._tag = delivery_tag
        self._channel = channel


class KombuConsumer(Consumer):
    """Consumes one queue (``q`` or ``q.DQ``) for one dramatiq consumer thread."""

    def __init__(self, broker: KombuBroker, queue_name: str, prefetch: int, timeout: int):
        self.broker = broker
        self.queue_name = queue_name
        self.timeout = timeout / 1000
        self._buffer: deque[Any] = deque()
        self._closed = False
        self._dropped = 0
        connection = broker.consumer_connection
        try:
            broker.connect(connection)
            self.channel = connection.channel()
            # py-amqp turns a body into str when the message names a content_encoding (kombu
            # and celery producers do); dramatiq decodes bytes itself.
            self.channel.auto_decode = False
            self.connection = self.channel.connection
            broker.ensure_queues(q_name(queue_name), self.channel)
            self.channel.basic_qos(0, prefetch, False)
            self.channel.basic_consume(queue_name, callback=self._buffer.append)
        except BaseException as exc:
            # dramatiq retries a failed consumer every few seconds: never leave its channel open.
            self._discard_channel()
            if isinstance(exc, (AMQPError, OSError)):
                raise connection_closed(exc, connection.as_uri()) from None
            raise

    def __next__(self) -> KombuMessage | None:
        buffer = self._buffer
        if not buffer:
            try:
                self.connection.drain_events(timeout=self.timeout)
            except TimeoutError:
                return None
            except (AMQPError, OSError) as exc:
                # The channel or connection is gone (or the server cancelled the consumer
                # because the queue was deleted): declare the queues again on restart.
                self._closed = True
                self.broker.forget_queue(q_name(self.queue_name))
                raise connection_closed(exc, self.broker.consumer_connection.as_uri()) from None
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

    def ack(self, message: KombuMessage) -> None:
        self._settle(message._channel, message._tag, ack=True)

    def nack(self, message: KombuMessage) -> None:
        self._settle(message._channel, message._tag, ack=False)

    def _settle(self, channel: Any, tag: int, ack: bool) -> None:
        if channel is not self.channel or self._closed:
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
            self._closed = True
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
        self._discard_channel()

    def _discard_channel(self) -> None:
        channel = getattr(self, "channel", None)
        if channel is not None and channel.is_open:
            with suppress(AMQPError, OSError):
                channel.close()


_FIELD_TYPES = {"queue_name": str, "actor_name": str, "args": (list, tuple), "kwargs": dict,
                "options": dict}


def _check_fields(message: Message) -> None:
    """Raise DecodeError for a message dramatiq would choke on (it decodes any JSON object).

    A ``kwargs`` that is not a dict, for one, kills the worker thread in dramatiq's own error
    handler and the message is acked unprocessed; dead-lettering keeps it.
    """
    for name, types in _FIELD_TYPES.items():
        value = getattr(message, name)
        if not isinstance(value, types):
            raise DecodeError(f"message field {name!r} is a {type(value).__name__}",
                              value, None)
