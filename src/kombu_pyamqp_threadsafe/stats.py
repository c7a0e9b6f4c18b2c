"""What one shared connection has done, read without disturbing it.

Counting costs one dict update per method, in places that already run per method, and no
lock of its own on the hot path:

- methods written are counted by signature in ``FrameWriter._enqueue``, under the order lock
  every message already takes there (publishes, acks, rejects and nacks from any thread);
- methods received are counted by signature in ``Connection.on_inbound_method``, which only
  the reader thread runs once the handshake is done (deliveries, returns);
- confirms and nacks of a confirmed publish are counted per channel by its owner thread (the
  only thread that waits for them) and added to the connection's :class:`ChannelTotals` when
  the channel is collected; a confirm the owner counts after that (another thread collected
  the channel as the owner's wait for it returned) is added then.

Other threads read these plain ints and dicts at any time: under the GIL a read sees a whole
value, at most an increment or two old.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, fields
from typing import Any

from amqp import spec

from .errors import ConnectionClosedError

#: The counters of :class:`ConnectionStats`, which add up across connections.
COUNTERS = ("published", "confirmed", "nacked", "returned", "deliveries", "acks", "rejects",
            "blocks", "reconnects")


@dataclass(frozen=True)
class ConnectionStats:
    """One connection at the moment it was read. Counters start at 0 with the connection."""

    #: ``host:port`` the connection was opened to ("" when it never connected).
    server: str = ""
    #: The server's cluster_name and version (server properties), when connected.
    cluster_name: str | None = None
    server_version: str | None = None
    #: "open", "failed" (lost, not reconnected yet), "closed" or "not connected".
    state: str = "not connected"
    #: Channels open on it now.
    channels: int = 0
    #: Basic.Publish written.
    published: int = 0
    #: Confirmed publishes whose sender got the server's ack / nack.
    confirmed: int = 0
    nacked: int = 0
    #: Mandatory publishes the server returned unroutable (Basic.Return).
    returned: int = 0
    #: Messages delivered to this client (Basic.Deliver and Basic.GetOk).
    deliveries: int = 0
    #: Basic.Ack / Basic.Reject and Basic.Nack written (settling deliveries).
    acks: int = 0
    rejects: int = 0
    #: Whether the server blocks publishing now (connection.blocked), why, and how many times.
    blocked: bool = False
    blocked_reason: str | None = None
    blocks: int = 0
    #: Methods the reader routed to their owner threads and those have not dispatched yet
    #: (summed over the channels' mailboxes): how far the owners are behind the reader.
    undispatched: int = 0
    #: Times the application connected again (kept by the owner of the connection, for
    #: example KombuBroker; one transport connection never reconnects).
    reconnects: int = 0

    def plus(self, earlier: ConnectionStats) -> ConnectionStats:
        """These stats with the counters of ``earlier`` (a previous connection) added."""
        return ConnectionStats(**{
            f.name: getattr(self, f.name) + getattr(earlier, f.name)
            if f.name in COUNTERS else getattr(self, f.name)
            for f in fields(self)
        })


class ChannelTotals:
    """Confirms and nacks counted by channels of this connection that were collected."""

    def __init__(self) -> None:
        # Guards confirmed and nacked, and moving a channel's counts into them (so a reader
        # never counts a channel twice or not at all).
        self.lock = threading.Lock()
        self.confirmed = 0
        self.nacked = 0

    def _after_fork_in_child(self) -> None:
        """Called by the inherited connection, whose channels the child collects."""
        self.lock = threading.Lock()

    def collect(self, channel: Any) -> None:
        """A channel is collected: keep what it counted since the last call. Its owner calls
        this again for a confirm it counts after the channel was collected by another thread.

        The channel's counters are only ever increased, by its owner alone; ``moved`` marks
        what is here already. ``collected`` is set before the counts are read, so an owner
        that counts after this read sees it and moves its count itself."""
        with self.lock:
            channel.collected = True
            confirmed, nacked = channel.confirmed, channel.nacked
            moved_confirmed, moved_nacked = channel.moved
            self.confirmed += confirmed - moved_confirmed
            self.nacked += nacked - moved_nacked
            channel.moved = (confirmed, nacked)


def _count(counts: dict[Any, int], *signatures: Any) -> int:
    return sum(counts.get(signature, 0) for signature in signatures)


def connection_stats(connection: Any) -> ConnectionStats:
    """The stats of a thread-safe transport ``Connection`` (None: never connected)."""
    if connection is None:
        return ConnectionStats()
    channels = [channel for channel in list((connection.channels or {}).values())
                if channel is not connection]
    totals: ChannelTotals = connection.channel_totals
    with totals.lock:
        confirmed = totals.confirmed + sum(channel.confirmed - channel.moved[0]
                                           for channel in channels)
        nacked = totals.nacked + sum(channel.nacked - channel.moved[1] for channel in channels)
    writer = connection._frame_writer
    sent: dict[Any, int] = getattr(writer, "sent", {})
    received: dict[Any, int] = connection.received
    properties = connection.server_properties or {}
    flow = connection.flow
    failure = connection._failure
    if failure is not None:
        state = "closed" if issubclass(failure.error_type, ConnectionClosedError) else "failed"
    else:
        state = "open" if connection.connected else "not connected"
    return ConnectionStats(
        server=str(connection.host),
        cluster_name=_text(properties.get("cluster_name")),
        server_version=_text(properties.get("version")),
        state=state,
        channels=len(channels),
        published=_count(sent, spec.Basic.Publish),
        confirmed=confirmed,
        nacked=nacked,
        returned=_count(received, spec.Basic.Return),
        deliveries=_count(received, spec.Basic.Deliver, spec.Basic.GetOk),
        acks=_count(sent, spec.Basic.Ack),
        rejects=_count(sent, spec.Basic.Reject, spec.Basic.Nack),
        blocked=flow.blocked,
        blocked_reason=flow.reason,
        blocks=flow.blocks,
        undispatched=sum(channel._mailbox.pending_count() for channel in channels),
    )


def _text(value: Any) -> str | None:
    if value is None:
        return None
    return value.decode() if isinstance(value, bytes) else str(value)
