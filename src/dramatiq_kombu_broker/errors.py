"""Errors specific to KombuBroker (connection failures use dramatiq's ConnectionClosed)."""

from __future__ import annotations

from dramatiq.errors import BrokerError


class QueueArgumentsMismatch(BrokerError):
    """A queue exists on the server with other arguments than this broker declares.

    RabbitMQ refuses such a declare (406 PRECONDITION_FAILED); silently going on would publish
    into a queue that does not dead-letter or prioritise as configured.
    """
