"""KombuBroker's two connections, each counted across its reconnects."""

from __future__ import annotations

import threading
from dataclasses import replace
from typing import Any

from kombu_pyamqp_threadsafe import ConnectionStats, connection_stats


class ConnectionHistory:
    """One of the broker's connections (consumer or producer) over every transport connection
    it has had: a reconnect opens a new one whose counters start at 0, so the counts of the
    ones before are kept here and added."""

    def __init__(self) -> None:
        # Guards _current, _earlier and _opens (taken on connect and on reading, never per
        # message).
        self._lock = threading.Lock()
        self._current: Any = None
        self._earlier = ConnectionStats()
        self._opens = 0

    def observe(self, transport_connection: Any) -> None:
        """``transport_connection`` is the one in use now (a new one after a reconnect)."""
        if transport_connection is None:
            return
        with self._lock:
            current = self._current
            if transport_connection is current:
                return
            if current is not None:
                self._earlier = connection_stats(current).plus(self._earlier)
            self._current = transport_connection
            self._opens += 1

    def stats(self, transport_connection: Any) -> ConnectionStats:
        self.observe(transport_connection)
        with self._lock:
            total = connection_stats(self._current).plus(self._earlier)
            return replace(total, reconnects=max(self._opens - 1, 0))
