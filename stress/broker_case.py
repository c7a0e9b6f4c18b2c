"""One workload case's broker: in a vhost of its own, its connections counted, closed at the end.

The workloads of ``stress/workloads/`` compare ``KombuBroker`` with dramatiq's ``RabbitmqBroker``
on what a connection per thread costs, so every case needs the same bookkeeping: a vhost deleted
at the end, the broker's connections named (``stress.workload.make_broker``) so the server can
count them, the process's TCP connections and RSS sampled (psutil), and what is still open after
``broker.close()`` counted, then force-closed, so that a leaking broker cannot keep sockets of the
shared server after its case.

RabbitMQ 3.x stops answering handshakes at its socket limit, stalling every client of the node:
a case that needs more connections than the server can spare raises :class:`NotEnoughSockets`
before it opens any, unless ``STRESS_OVER_SOCKET_LIMIT=1`` is set.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import dramatiq

from stress import rabbit_admin
from stress.common import (
    ProcessSampler,
    ServerConnectionPoller,
    amqp_ports,
    dedicated_vhost,
    socket_headroom,
    url_for_vhost,
)
from stress.polling import poll
from stress.workload import LogCounter, make_broker

#: Set to 1 to run a case that needs more connections than the server can spare.
FORCE_ENV = "STRESS_OVER_SOCKET_LIMIT"
#: Below this many connections a case does not ask the server for its socket budget (a slow call).
CHECK_ABOVE = 50
#: How long a closed connection may stay listed on the server before it counts as left open.
CLOSE_GRACE_S = 10.0


class NotEnoughSockets(RuntimeError):
    """The case would take the server past its socket limit (and stall every other client)."""


def forced_over_socket_limit(case: dict[str, Any]) -> bool:
    """True when the case may go past the server's spare sockets (``"force"`` or FORCE_ENV)."""
    return bool(case.get("force")) or os.environ.get(FORCE_ENV) == "1"


def socket_shortage(needed: int, case: dict[str, Any]) -> str | None:
    """Why the server cannot spare ``needed`` connections for ``case`` now (None: it can)."""
    if needed <= CHECK_ABOVE or forced_over_socket_limit(case):
        return None
    headroom = socket_headroom()
    if headroom is not None and needed > headroom[0]:
        return (f"needs ~{needed} connections ({headroom[1]}); set {FORCE_ENV}=1 to run it "
                "anyway, see stress/README.md \"RabbitMQ's socket limit\"")
    return None


@dataclass
class BrokerCase:
    """The broker of one case and what was counted about its connections."""

    setup: str
    vhost: str
    url: str
    connection_name: str
    broker: dramatiq.Broker
    sampler: ProcessSampler
    server: ServerConnectionPoller
    logs: LogCounter
    #: Server-side connections by name still listed CLOSE_GRACE_S after ``broker.close()``.
    open_after_close: int | None = None
    force_closed: int = 0

    def count_server_connections(self) -> int:
        """The broker's connections on the server now (by connection name; ~1 s a call);
        -1 when rabbitmqctl has not answered yet."""
        self.server.poll()
        return self.server.last if self.server.last is not None else -1

    def count_channels(self) -> int:
        """Channels open on the server in this case's vhost now."""
        return rabbit_admin.count_channels(vhost=self.vhost)

    def figures(self) -> dict[str, Any]:
        """The figures every case reports (read after the ``with`` block has closed the broker)."""
        return {
            "setup": self.setup,
            "connections": self.sampler.peak_sockets,
            "server_connections": self.server.peak,
            "open_after_close": self.open_after_close,
            "force_closed": self.force_closed,
            "rss_mb": round(self.sampler.peak_rss / 2**20, 1),
            "peak_threads": self.sampler.peak_threads,
            "log_warnings": self.logs.count,
            "log_first": self.logs.first[:2],
        }


@contextlib.contextmanager
def case_vhost(case: dict[str, Any], tag: str) -> Iterator[tuple[str, str]]:
    """``(vhost, url)``: the run's (``"vhost"`` and ``"url"`` in the case, from the workload's
    ``session``) or, for a case run on its own, one made for it and deleted at the end."""
    if case.get("vhost") and case.get("url"):
        yield case["vhost"], case["url"]
        return
    with dedicated_vhost(tag) as vhost:
        yield vhost, url_for_vhost(rabbit_admin.amqp_url(), vhost)


@contextlib.contextmanager
def broker_case(case: dict[str, Any], tag: str, *, connections_needed: int
                ) -> Iterator[BrokerCase]:
    """A ``case["setup"]`` broker ("kombu" or "rabbitmq", ``confirm_delivery=True``) in the
    case's vhost (:func:`case_vhost`); :class:`NotEnoughSockets` if the server cannot spare
    ``connections_needed``. Its connections are named ``<tag>-<setup>-<hex>``
    (:attr:`BrokerCase.connection_name`, unique: cases of one run may share a vhost).

    The server is polled for connections only when the case asks
    (:meth:`BrokerCase.count_server_connections`), not in the background: a ``rabbitmqctl`` call
    costs about a CPU-second, which would weigh on the timed part of a case on a 2-CPU machine.
    """
    shortage = socket_shortage(connections_needed, case)
    if shortage:
        raise NotEnoughSockets(shortage)
    setup = case["setup"]
    logs = LogCounter()
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    logging.getLogger().addHandler(logs)
    try:
        with case_vhost(case, tag) as (vhost, url):
            name = f"{tag}-{setup}-{uuid.uuid4().hex[:6]}"
            sampler = ProcessSampler(amqp_ports(url)).start()
            bc = BrokerCase(setup, vhost, url, name, make_broker(setup, url, name), sampler,
                            ServerConnectionPoller(vhost, name), logs)
            try:
                yield bc
            finally:
                try:
                    bc.broker.close()
                finally:
                    sampler.stop()
                    bc.open_after_close = poll(bc.count_server_connections,
                                               lambda n: n == 0, CLOSE_GRACE_S, 0.5)
                    if bc.open_after_close:
                        # Cases of a run share its vhost one after the other: what is in it
                        # now is this case's.
                        bc.force_closed = rabbit_admin.close_all_connections(
                            "left open by a stress case", vhost=vhost)
    finally:
        logging.getLogger().removeHandler(logs)
