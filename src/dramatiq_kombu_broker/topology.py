"""The queues RabbitmqBroker declares, so KombuBroker can take over a live system.

For a queue ``q``: ``q`` and ``q.DQ`` are durable and dead-letter through the default exchange
to ``q.XQ``; ``q.XQ`` is durable and expires dead messages after ``dramatiq_dead_message_ttl``
milliseconds (7 days by default). ``x-max-priority`` is added when the broker has a priority.
"""

from __future__ import annotations

import os
from typing import Any

from dramatiq.common import dq_name, xq_name


def dead_message_ttl() -> int:
    """Read at declare time, as RabbitmqBroker reads it at import time."""
    return int(os.getenv("dramatiq_dead_message_ttl", 86400000 * 7))  # noqa: SIM112 - dramatiq's name


def queue_arguments(queue_name: str, max_priority: int | None,
                    extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Arguments of ``q`` and ``q.DQ`` for the canonical ``queue_name``."""
    arguments: dict[str, Any] = dict(extra or {})
    arguments["x-dead-letter-exchange"] = ""
    arguments["x-dead-letter-routing-key"] = xq_name(queue_name)
    if max_priority:
        arguments["x-max-priority"] = max_priority
    return arguments


def declarations(queue_name: str, max_priority: int | None,
                 extra: dict[str, Any] | None = None) -> list[tuple[str, dict[str, Any]]]:
    """``(name, arguments)`` of the three queues behind the canonical ``queue_name``."""
    arguments = queue_arguments(queue_name, max_priority, extra)
    return [
        (queue_name, arguments),
        (dq_name(queue_name), arguments),
        (xq_name(queue_name), {"x-message-ttl": dead_message_ttl()}),
    ]
