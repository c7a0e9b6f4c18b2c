"""A TCP proxy on 127.0.0.1 in front of the AMQP server, for network faults (no mocks).

``pause()`` makes the network silent (nothing forwarded, every socket kept open) until
``resume()``, ``kill()`` cuts every forwarded connection; ``delay`` adds a fixed one-way delay
in both directions (a network between client and server). Used by the fault scenarios and
benchmarks of ``stress`` and by the tests.
"""

from __future__ import annotations

import select
import socket
import ssl
import threading
from collections.abc import Callable
from contextlib import suppress
from typing import Any

from stress.delay_line import DelayedSender

AMQP_TARGET = ("127.0.0.1", 5672)


class _Pipe:
    """One proxied connection: a client socket and its upstream socket, one thread."""

    def __init__(self, proxy: Proxy, client: socket.socket) -> None:
        self.proxy = proxy
        self.client = client
        self.upstream: socket.socket | None = None
        self.closed = threading.Event()
        #: The two delayed directions (none without a delay); only the pipe's thread adds them.
        self.senders: list[DelayedSender] = []
        self._wake_r, self._wake_w = socket.socketpair()
        self.thread = threading.Thread(target=self._run, name="test-proxy-pipe", daemon=True)

    def wake(self) -> None:
        with suppress(OSError):
            self._wake_w.send(b"x")

    def _run(self) -> None:
        try:
            self._forward()
        except (OSError, ValueError):
            pass
        finally:
            self._close_sockets()
            self.proxy._forget(self)

    def _forward(self) -> None:
        proxy = self.proxy
        client = self.client
        if proxy.tls is not None:
            client.settimeout(10)
            # A TCP end without close_notify raises (SSLEOFError), so the two ends differ.
            client = self.client = proxy.tls.wrap_socket(client, server_side=True,
                                                         suppress_ragged_eofs=False)
            client.settimeout(None)
        self.upstream = upstream = socket.create_connection(proxy.target, timeout=10)
        upstream.settimeout(None)
        forward = self._forwarders(client, upstream)
        while not self.closed.is_set():
            if proxy.paused.is_set():
                # A silent peer: read nothing, write nothing, keep both sockets open.
                with proxy.resumed:
                    proxy.resumed.wait_for(lambda: self.closed.is_set()
                                           or not proxy.paused.is_set())
                continue
            pending = getattr(client, "pending", None)
            if pending is not None and pending():
                readable = [client]
            else:
                readable, _, _ = select.select([client, upstream, self._wake_r], [], [])
            if self._wake_r in readable:
                with suppress(OSError):
                    self._wake_r.recv(4096)
                continue
            for sock in readable:
                if proxy.paused.is_set():
                    break
                try:
                    data = sock.recv(256 * 1024)
                except ssl.SSLEOFError:
                    proxy.tls_endings.append("ragged")
                    raise
                if not data:
                    if proxy.tls is not None:
                        self._client_tls_ending(client, sock is client)
                    self._drain()
                    return
                forward[sock](data)

    def _forwarders(self, client: socket.socket,
                    upstream: socket.socket) -> dict[socket.socket, Callable[[bytes], None]]:
        """Per socket, what to do with the bytes read from it: write them to its peer now or,
        with a delay, hand them to the peer's :class:`DelayedSender`. No Nagle: a proxy that
        holds small writes back would add delays of its own."""
        for sock in (client, upstream):
            with suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        delay = self.proxy.delay
        if not delay:
            return {client: upstream.sendall, upstream: client.sendall}
        to_upstream, to_client = (
            DelayedSender(sock, delay, paused=self.proxy.paused, on_error=self.close)
            for sock in (upstream, client))
        self.senders += [to_upstream, to_client]
        if self.closed.is_set():  # close() ran before the senders existed
            self._stop_senders()
        return {client: to_upstream.send, upstream: to_client.send}

    def _drain(self) -> None:
        """At an end of stream: let the delayed bytes of both directions out before the pipe
        closes (the server's last frames, a Close-Ok, are often still on their way)."""
        for sender in self.senders:
            sender.drain()
        for sender in self.senders:
            sender.thread.join(self.proxy.delay + 5)

    def _stop_senders(self) -> None:
        for sender in list(self.senders):
            sender.stop()

    def _client_tls_ending(self, client: ssl.SSLSocket, client_ended: bool) -> None:
        """Record how the TLS client ended: "close_notify", "ragged" (TCP end without it) or
        "open" (nothing within 5 s). The server usually closes first (after Close-Ok): then
        the rest of what the client sends is read and dropped until it ends."""
        ending = "close_notify"
        if not client_ended:
            client.settimeout(5)
            try:
                while client.recv(256 * 1024):
                    pass
            except ssl.SSLEOFError:
                ending = "ragged"
            except TimeoutError:
                ending = "open"
            except OSError as exc:
                ending = f"error: {exc!r}"
        self.proxy.tls_endings.append(ending)

    def close(self) -> None:
        self.closed.set()
        self._stop_senders()
        self.wake()
        with self.proxy.resumed:
            self.proxy.resumed.notify_all()
        # Shutting down makes both ends see EOF now, even if the thread is blocked.
        for sock in (self.client, self.upstream):
            if sock is not None:
                with suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

    def _close_sockets(self) -> None:
        self.closed.set()
        self._stop_senders()
        for sock in (self.client, self.upstream, self._wake_r, self._wake_w):
            if sock is not None:
                with suppress(OSError):
                    sock.close()


class Proxy:
    """A TCP proxy on 127.0.0.1 in front of ``target`` (one thread per connection).

    ``pause()`` stops forwarding in both directions while keeping every socket open (the
    client then sees a silent peer) until ``resume()``; ``kill()`` cuts every forwarded
    connection; ``close()`` stops the proxy. With ``tls`` (a server-side ``ssl.SSLContext``)
    it terminates TLS. With ``delay`` (seconds, one way) every byte reaches the other end that
    much later, in both directions and in order (a round trip gains twice the delay); each
    direction of each connection has its own sender thread, so neither waits for the other,
    nor for another connection. Not with TLS: an ``SSLSocket`` must not be read and written by
    two threads.
    """

    def __init__(self, target: tuple[str, int] = AMQP_TARGET,
                 tls: ssl.SSLContext | None = None, delay: float = 0.0) -> None:
        if delay < 0:
            raise ValueError(f"delay must not be negative, not {delay}")
        if delay and tls is not None:
            raise ValueError("a delay and TLS cannot be combined")
        self.target = target
        self.tls = tls
        self.delay = delay
        self.paused = threading.Event()
        # Notified when a pause ends or a pipe closes (a paused pipe waits on it).
        self.resumed = threading.Condition()
        self._lock = threading.Lock()
        self._pipes: set[_Pipe] = set()
        self.accepted = 0
        #: How each TLS client connection ended (see _Pipe._client_tls_ending).
        self.tls_endings: list[str] = []
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._stopped = False
        self._thread = threading.Thread(target=self._accept, name="test-proxy", daemon=True)
        self._thread.start()

    def __enter__(self) -> Proxy:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def _accept(self) -> None:
        while not self._stopped:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            if self._stopped:
                client.close()
                return
            pipe = _Pipe(self, client)
            with self._lock:
                self._pipes.add(pipe)
                self.accepted += 1
            pipe.thread.start()

    def _forget(self, pipe: _Pipe) -> None:
        with self._lock:
            self._pipes.discard(pipe)

    @property
    def active(self) -> int:
        with self._lock:
            return len(self._pipes)

    def pause(self) -> None:
        self.paused.set()
        with self._lock:
            pipes = list(self._pipes)
        for pipe in pipes:
            pipe.wake()

    def resume(self) -> None:
        """Forward again what the paused connections have not read yet."""
        with self.resumed:
            self.paused.clear()
            self.resumed.notify_all()

    def kill(self) -> None:
        with self._lock:
            pipes = list(self._pipes)
        for pipe in pipes:
            pipe.close()

    def close(self) -> None:
        self._stopped = True
        with suppress(OSError):  # wakes the thread blocked in accept() (close() would not)
            self._listener.shutdown(socket.SHUT_RDWR)
        self._thread.join(5)
        with suppress(OSError):
            self._listener.close()
        self.kill()
        self._thread.join(5)
        with self._lock:
            pipes = list(self._pipes)
        for pipe in pipes:
            pipe.thread.join(5)
