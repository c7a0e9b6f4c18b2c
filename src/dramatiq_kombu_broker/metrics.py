"""A Prometheus collector for KombuBroker's connections (``pip install ...[prometheus]``).

    from prometheus_client import REGISTRY
    from dramatiq_kombu_broker.metrics import KombuBrokerCollector
    REGISTRY.register(KombuBrokerCollector(broker))

It reads :meth:`KombuBroker.stats` at scrape time, so it costs nothing between scrapes. Names
follow the OpenTelemetry messaging conventions where one fits (``messaging.client.sent.messages``
and ``messaging.client.consumed.messages``, with ``messaging.system``); the rest are this
broker's own, prefixed ``dramatiq_kombu_``. Counters carry only the connection's role as a
label, so they stay one series across reconnects and failover; where the connection is now
(server, cluster, version, state) is in ``dramatiq_kombu_connection_info``.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from .broker import KombuBroker

SYSTEM = "rabbitmq"
LABELS = ["messaging_system", "connection_role"]

#: (metric name without _total, ConnectionStats field, help).
COUNTERS = (
    ("messaging_client_sent_messages", "published",
     "Messages published (OpenTelemetry messaging.client.sent.messages)."),
    ("messaging_client_consumed_messages", "deliveries",
     "Messages delivered to this process (OpenTelemetry messaging.client.consumed.messages)."),
    ("dramatiq_kombu_confirmed_messages", "confirmed",
     "Confirmed publishes the server acknowledged."),
    ("dramatiq_kombu_nacked_messages", "nacked", "Confirmed publishes the server nacked."),
    ("dramatiq_kombu_returned_messages", "returned",
     "Mandatory publishes the server returned unroutable."),
    ("dramatiq_kombu_acked_messages", "acks", "Deliveries acknowledged."),
    ("dramatiq_kombu_rejected_messages", "rejects", "Deliveries rejected or nacked."),
    ("dramatiq_kombu_reconnects", "reconnects", "Times the connection was opened again."),
    ("dramatiq_kombu_blocks", "blocks",
     "Times the server blocked publishing (memory or disk alarm)."),
)
GAUGES = (
    ("dramatiq_kombu_connection_blocked", "blocked",
     "1 while the server blocks publishing on the connection."),
    ("dramatiq_kombu_channels", "channels", "Channels open on the connection."),
    ("dramatiq_kombu_undispatched_methods", "undispatched",
     "Methods the reader routed that their owner threads have not dispatched yet."),
)


class KombuBrokerCollector(Collector):
    """Exposes ``broker.stats()`` of one KombuBroker."""

    def __init__(self, broker: KombuBroker) -> None:
        self.broker = broker

    def collect(self) -> Iterator[Metric]:
        stats = self.broker.stats()
        for name, field, documentation in COUNTERS:
            counter = CounterMetricFamily(name, documentation, labels=LABELS)
            for role, connection in stats.items():
                counter.add_metric([SYSTEM, role], float(getattr(connection, field)))
            yield counter
        for name, field, documentation in GAUGES:
            gauge = GaugeMetricFamily(name, documentation, labels=LABELS)
            for role, connection in stats.items():
                gauge.add_metric([SYSTEM, role], float(getattr(connection, field)))
            yield gauge
        info = GaugeMetricFamily(
            "dramatiq_kombu_connection_info",
            "Where the connection is now (always 1): server, cluster, version and state.",
            labels=[*LABELS, "server_address", "server_port", "cluster_name",
                    "server_version", "state"],
        )
        for role, connection in stats.items():
            address, _, port = connection.server.rpartition(":")
            info.add_metric([SYSTEM, role, address, port, connection.cluster_name or "",
                             connection.server_version or "", connection.state], 1.0)
        yield info
