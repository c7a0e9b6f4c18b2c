"""Errors specific to KombuBroker (connection failures use dramatiq's ConnectionClosed)."""

from __future__ import annotations

from typing import Any

from dramatiq.errors import BrokerError


class QueueArgumentsMismatch(BrokerError):
    """A queue exists on the server with other arguments than this broker declares.

    RabbitMQ refuses such a declare (406 PRECONDITION_FAILED); silently going on would publish
    into a queue that does not dead-letter, prioritise or replicate as configured. ``queue``,
    ``arguments`` (what the broker declared), ``reason`` (the server's text), ``queue_type``
    (the broker's) and ``existing_type`` (the server's, None when not found) say which.
    """

    def __init__(self, queue: str, arguments: dict[str, Any], reason: str, queue_type: str,
                 existing_type: str | None) -> None:
        self.queue = queue
        self.arguments = arguments
        self.reason = reason
        self.queue_type = queue_type
        self.existing_type = existing_type
        if existing_type is not None and existing_type != queue_type:
            message = (
                f"queue {queue!r} exists as a {existing_type} queue, but KombuBroker is "
                f"configured with queue_type={queue_type!r}; the server says: {reason}. "
                f"A queue's type cannot change. To migrate, stop the senders, let the workers "
                f"drain {queue!r} and its .DQ (delayed messages wait there), delete {queue!r}, "
                f"its .DQ and .XQ, and start again with the new queue_type; or move the actors "
                f"to a new queue name. Or keep queue_type={existing_type!r}."
            )
        else:
            message = (
                f"queue {queue!r} exists with other arguments than KombuBroker declares "
                f"({arguments!r}); the server says: {reason}. Delete the queue or configure "
                f"the broker (max_priority, queue_type, delivery_limit, queue_arguments) to "
                f"match it."
            )
        super().__init__(message)

    def __reduce__(self) -> tuple[Any, ...]:
        # Exception pickles its message only; rebuild from the fields instead.
        return (type(self), (self.queue, self.arguments, self.reason, self.queue_type,
                             self.existing_type))
