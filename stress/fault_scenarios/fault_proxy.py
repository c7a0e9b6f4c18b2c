"""The TCP proxy of the network faults: silence the path, bring it back, reset every connection."""

from __future__ import annotations

import contextlib
import socket
import struct

from stress.tcp_proxy import Proxy


class FaultProxy(Proxy):
    """transport_helpers.Proxy plus the two network faults of the reliability cases.

    ``silence()`` stops forwarding without closing anything (a dead network path);
    ``restore()`` brings the path back: connections that were silenced are gone by then on both
    peers (they missed their heartbeats), so they are cut, and new connections flow again.
    ``reset()`` aborts every connection with a TCP RST on both sides, as a dropped NAT entry or
    a failing router does.
    """

    def silence(self) -> None:
        self.pause()

    def restore(self) -> None:
        with self._lock:
            stale = list(self._pipes)
        self.paused.clear()
        for pipe in stale:
            pipe.close()

    def reset(self) -> None:
        with self._lock:
            pipes = list(self._pipes)
        linger = struct.pack("ii", 1, 0)
        for pipe in pipes:
            for sock in (pipe.client, pipe.upstream):
                if sock is not None:
                    with contextlib.suppress(OSError):
                        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
            pipe.closed.set()  # the pipe thread closes both sockets: RST, no FIN
            pipe.wake()
        for pipe in pipes:
            pipe.thread.join(1.0)
            if pipe.thread.is_alive():
                pipe.close()
