"""What the server holds for a scenario: messages of its queues, its connections by name."""

from __future__ import annotations

from typing import Any

from stress import rabbit_admin
from stress.polling import poll


def queue_messages(vhost: str, names: list[str]) -> dict[str, int]:
    """Messages (ready + unacknowledged) of ``names`` on the server (missing queues: 0)."""
    rows = rabbit_admin.queue_details(vhost)
    return {name: int((rows.get(name) or {}).get("messages") or 0) for name in names}


def wait_queues_empty(vhost: str, names: list[str], timeout: float,
                      only: list[str] | None = None) -> dict[str, int]:
    """Poll until the queues ``only`` (default: all ``names``) hold no message; return the
    last counts of ``names``."""
    return poll(lambda: queue_messages(vhost, names),
                lambda counts: not any(counts[n] for n in (only or names)), timeout, 0.5)


def connections_by_name(vhost: str) -> dict[str, list[dict[str, Any]]]:
    """The server's connections of ``vhost`` by client connection_name, in one rabbitmqctl
    call (rows have ``peer_port``, ``pid``, ``timeout`` (heartbeat) and ``channels``)."""
    result: dict[str, list[dict[str, Any]]] = {}
    for row in rabbit_admin.list_connections(vhost):
        result.setdefault(str(rabbit_admin.connection_name_of(row)), []).append(row)
    return result


def wait_one_connection_each(vhost: str, names: list[str],
                             timeout: float = 15) -> dict[str, list[dict[str, Any]]]:
    """Poll until each of ``names`` has exactly one server connection; the last listing."""
    return poll(lambda: connections_by_name(vhost),
                lambda listing: all(len(listing.get(n, [])) == 1 for n in names), timeout, 0.3)


def connection_ports(name: str, vhost: str) -> list[int]:
    """Client ports of the server-side connections called ``name`` (a reconnect changes it)."""
    return sorted(int(c["peer_port"]) for c in rabbit_admin.find_connections(name, vhost=vhost))
