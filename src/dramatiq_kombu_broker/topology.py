"""The queues behind a dramatiq queue ``q``, classic (RabbitmqBroker's) or quorum.

Classic, exactly what RabbitmqBroker declares, so KombuBroker can take over a live system:
``q`` and ``q.DQ`` are durable and dead-letter through the default exchange to ``q.XQ``;
``q.XQ`` is durable and expires dead messages after ``dramatiq_dead_message_ttl`` milliseconds
(7 days by default). ``x-max-priority`` is added when the broker has a priority.

Quorum: the same three queues as quorum queues (replicated on a cluster). ``q`` and ``q.DQ``
dead-letter at-least-once (a dead message is removed from its queue only once ``q.XQ`` has
it), which RabbitMQ allows only together with ``x-overflow: reject-publish``; ``x-delivery-limit``
when the broker has one. Quorum queues have no ``x-max-priority``.
"""

from __future__ import annotations

import os
import re
from typing import Any

from dramatiq.common import dq_name, xq_name

CLASSIC = "classic"
QUORUM = "quorum"
QUEUE_TYPES = (CLASSIC, QUORUM)
#: What quorum queues need for at-least-once dead-lettering (RabbitMQ 3.10+, feature flag
#: stream_queue; with any other overflow the server falls back to at-most-once).
AT_LEAST_ONCE = {"x-dead-letter-strategy": "at-least-once", "x-overflow": "reject-publish"}


def dead_message_ttl() -> int:
    """Read at declare time, as RabbitmqBroker reads it at import time."""
    return int(os.getenv("dramatiq_dead_message_ttl", 86400000 * 7))  # noqa: SIM112 - dramatiq's name


def check_queue_options(queue_type: Any, max_priority: int | None, delivery_limit: Any,
                        queue_arguments: dict[str, Any]) -> None:
    """Raise ValueError for a combination the server would refuse or silently weaken."""
    if queue_type not in QUEUE_TYPES:
        raise ValueError(f"queue_type must be 'classic' or 'quorum', got {queue_type!r}")
    declared = queue_arguments.get("x-queue-type")
    if declared is not None and declared != queue_type:
        raise ValueError(
            f"queue_arguments has x-queue-type {declared!r}, which contradicts "
            f"queue_type={queue_type!r}; set queue_type (classic or quorum) instead"
        )
    if queue_type == CLASSIC:
        if delivery_limit is not None:
            raise ValueError("delivery_limit applies to quorum queues only "
                             "(queue_type='quorum'); classic queues have no delivery limit")
        return
    if max_priority is not None:
        raise ValueError(
            "max_priority cannot be used with queue_type='quorum': quorum queues refuse "
            "x-max-priority. On RabbitMQ 3.x they have no priorities at all (FIFO); 4.0 to 4.2 "
            "serve messages with priority above 4 ahead (2:1), 4.3 has 32 levels, always on. "
            "Drop max_priority and send with broker_priority."
        )
    if delivery_limit is not None and (isinstance(delivery_limit, bool)
                                       or not isinstance(delivery_limit, int)
                                       or delivery_limit < -1):
        raise ValueError(f"delivery_limit must be an integer >= 0, or -1 for no limit "
                         f"(RabbitMQ 4.x), got {delivery_limit!r}")
    for key, value in AT_LEAST_ONCE.items():
        if queue_arguments.get(key, value) != value:
            raise ValueError(
                f"queue_arguments has {key} {queue_arguments[key]!r}: quorum queues need "
                f"{key} {value!r} for at-least-once dead-lettering (nothing lost on the way "
                f"to q.XQ)"
            )


def queue_arguments(queue_name: str, max_priority: int | None,
                    extra: dict[str, Any] | None = None, queue_type: str = CLASSIC,
                    delivery_limit: int | None = None) -> dict[str, Any]:
    """Arguments of ``q`` and ``q.DQ`` for the canonical ``queue_name``."""
    arguments: dict[str, Any] = dict(extra or {})
    if queue_type == QUORUM:
        arguments["x-queue-type"] = QUORUM
        arguments.update(AT_LEAST_ONCE)
        if delivery_limit is not None:
            arguments["x-delivery-limit"] = delivery_limit
    arguments["x-dead-letter-exchange"] = ""
    arguments["x-dead-letter-routing-key"] = xq_name(queue_name)
    if max_priority:
        arguments["x-max-priority"] = max_priority
    return arguments


def declarations(queue_name: str, max_priority: int | None,
                 extra: dict[str, Any] | None = None, queue_type: str = CLASSIC,
                 delivery_limit: int | None = None) -> list[tuple[str, dict[str, Any]]]:
    """``(name, arguments)`` of the three queues behind the canonical ``queue_name``."""
    arguments = queue_arguments(queue_name, max_priority, extra, queue_type, delivery_limit)
    dead: dict[str, Any] = {"x-message-ttl": dead_message_ttl()}
    if queue_type == QUORUM:
        dead["x-queue-type"] = QUORUM
    return [
        (queue_name, arguments),
        (dq_name(queue_name), arguments),
        (xq_name(queue_name), dead),
    ]


#: RabbitMQ 3.10's texts: "... but current is none", "... but current is the value 'quorum'
#: of type 'longstr'", and for numeric arguments "received '5' but current is '0'".
_INEQUIVALENT = re.compile(
    r"inequivalent arg '(?P<key>[^']+)'.*but current is "
    r"(?:none|the value '(?P<value>[^']*)' of type '(?P<type>[^']+)'|'(?P<number>-?\d+)')"
)
_NUMERIC_TYPES = ("signedint", "long", "short", "byte", "unsignedbyte", "unsignedshort",
                  "unsignedint")
#: Declarations a probe may make before it gives up (each one finds one argument).
MAX_PROBES = 12


def inequivalent_argument(reply_text: str) -> tuple[str, Any] | None:
    """``(argument, the server's value or None)`` from a 406 "inequivalent arg" reply text."""
    match = _INEQUIVALENT.search(reply_text)
    if match is None:
        return None
    if match["number"] is not None:
        return match["key"], int(match["number"])
    if match["value"] is None:
        return match["key"], None
    if match["type"] in _NUMERIC_TYPES:
        return match["key"], int(match["value"])
    return match["key"], match["value"]


def existing_queue_type(declare: Any, arguments: dict[str, Any], reply_text: str) -> str | None:
    """The type of a queue the server refused to declare with ``arguments`` (None: unknown).

    A declare-ok carries no arguments, and the server names only the first argument that
    differs (for a quorum queue declared as classic, often x-dead-letter-strategy, not the
    type), so this declares again with that argument as the server has it, one at a time,
    until the server names x-queue-type or accepts. ``declare(arguments)`` declares on a
    fresh channel and returns the 406 reply text, or None when the server accepted.
    """
    probe = dict(arguments)
    for _ in range(MAX_PROBES):
        found = inequivalent_argument(reply_text)
        if found is None:
            return None
        key, value = found
        if key == "x-queue-type":
            return CLASSIC if value is None else str(value)
        if value is None:
            probe.pop(key, None)
        elif probe.get(key) == value:
            return None  # same text for the same value: a type we cannot write back
        else:
            probe[key] = value
        answer = declare(probe)
        if answer is None:
            return str(probe.get("x-queue-type", CLASSIC))
        reply_text = answer
    return None
