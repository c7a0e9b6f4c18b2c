"""Shared helpers for the ``test_transport_*`` suites (real RabbitMQ, no mocks).

* :class:`Proxy`: a TCP proxy on 127.0.0.1 in front of the server that can stop forwarding
  (a silent peer) or cut every connection; with an ``ssl.SSLContext`` it terminates TLS.
* :func:`make_tls_files`: a throw-away CA and a ``localhost`` server certificate (openssl CLI).
* :class:`Worker`: a daemon thread that records its result, its exception and when it raised.
* :func:`open_fds` / :func:`settled`: leak accounting.
"""

from __future__ import annotations

import os
import select
import shutil
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Callable
from contextlib import suppress
from pathlib import Path
from typing import Any
from urllib.parse import quote

from amqp import spec
from amqp.serialization import dumps

import kombu_pyamqp_threadsafe as ts

AMQP_TARGET = ("127.0.0.1", 5672)


def kombu_connection(url: str, name: str, **kwargs: Any) -> ts.KombuConnection:
    """A KombuConnection that the server lists under client connection_name ``name``."""
    options = dict(kwargs.pop("transport_options", None) or {})
    properties = dict(options.get("client_properties") or {})
    properties["connection_name"] = name
    options["client_properties"] = properties
    return ts.KombuConnection(url, transport_options=options, **kwargs)


def url_for(vhost: str, port: int = 5672, scheme: str = "amqp", host: str = "127.0.0.1") -> str:
    return f"{scheme}://guest:guest@{host}:{port}/{quote(vhost, safe='')}"


def provoke_server_close(conn: ts.KombuConnection) -> None:
    """Make the server close the connection (Connection.Close, 504 CHANNEL_ERROR) by sending a
    second channel.open on an open channel. Fast, unlike rabbitmqctl."""
    channel = conn.default_channel
    conn.connection.frame_writer(1, channel.channel_id, spec.Channel.Open, dumps("s", ("",)),
                                 None)


# ------------------------------------------------------------------------------------- threads


class Worker(threading.Thread):
    """Runs ``fn(*args)`` in a daemon thread; keeps ``result``, ``error`` and ``error_at``."""

    def __init__(self, fn: Callable[..., Any], *args: Any, name: str | None = None) -> None:
        super().__init__(daemon=True, name=name)
        self._fn = fn
        self._args = args
        self.result: Any = None
        self.error: BaseException | None = None
        self.error_at: float | None = None

    def run(self) -> None:
        try:
            self.result = self._fn(*self._args)
        except BaseException as exc:  # noqa: BLE001 - the test inspects it
            self.error_at = time.monotonic()
            self.error = exc


def start_all(workers: list[Worker]) -> list[Worker]:
    for worker in workers:
        worker.start()
    return workers


def join_all(workers: list[threading.Thread], timeout: float) -> list[threading.Thread]:
    """Join every thread within ``timeout`` seconds in total; return those still running."""
    deadline = time.monotonic() + timeout
    for worker in workers:
        worker.join(max(0.0, deadline - time.monotonic()))
    return [worker for worker in workers if worker.is_alive()]



# ------------------------------------------------------------------------------------ accounting


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def settled(measure: Callable[[], int], limit: int, timeout: float = 5.0) -> int:
    """Poll ``measure()`` until it is <= ``limit`` (threads and sockets end asynchronously)."""
    deadline = time.monotonic() + timeout
    while True:
        value = measure()
        if value <= limit or time.monotonic() >= deadline:
            return value
        time.sleep(0.05)


# -------------------------------------------------------------------------------------- proxy


class _Pipe:
    """One proxied connection: a client socket and its upstream socket, one thread."""

    def __init__(self, proxy: Proxy, client: socket.socket) -> None:
        self.proxy = proxy
        self.client = client
        self.upstream: socket.socket | None = None
        self.closed = threading.Event()
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
        peer = {client: upstream, upstream: client}
        while not self.closed.is_set():
            if proxy.paused.is_set():
                # A silent peer: read nothing, write nothing, keep both sockets open.
                self.closed.wait()
                return
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
                    return
                peer[sock].sendall(data)

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
        self.wake()
        # Shutting down makes both ends see EOF now, even if the thread is blocked.
        for sock in (self.client, self.upstream):
            if sock is not None:
                with suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

    def _close_sockets(self) -> None:
        self.closed.set()
        for sock in (self.client, self.upstream, self._wake_r, self._wake_w):
            if sock is not None:
                with suppress(OSError):
                    sock.close()


class Proxy:
    """A TCP proxy on 127.0.0.1 in front of ``target`` (one thread per connection).

    ``pause()`` stops forwarding in both directions while keeping every socket open (the
    client then sees a silent peer); ``kill()`` cuts every forwarded connection; ``close()``
    stops the proxy. With ``tls`` (a server-side ``ssl.SSLContext``) it terminates TLS.
    """

    def __init__(self, target: tuple[str, int] = AMQP_TARGET,
                 tls: ssl.SSLContext | None = None) -> None:
        self.target = target
        self.tls = tls
        self.paused = threading.Event()
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


# ---------------------------------------------------------------------------------------- TLS


def have_openssl() -> bool:
    return shutil.which("openssl") is not None


def make_tls_files(directory: Path) -> dict[str, str]:
    """Write a self-signed CA and a server certificate for ``localhost`` / 127.0.0.1.

    Returns paths: ``ca`` (CA certificate), ``cert`` and ``key`` (server).
    """
    directory = Path(directory)
    ca_key, ca_pem = directory / "ca.key", directory / "ca.pem"
    key, csr, pem = directory / "server.key", directory / "server.csr", directory / "server.pem"
    ext = directory / "server.ext"
    ext.write_text(
        "basicConstraints=critical,CA:FALSE\n"
        "keyUsage=critical,digitalSignature,keyEncipherment\n"
        "extendedKeyUsage=serverAuth\n"
        "subjectAltName=DNS:localhost,IP:127.0.0.1\n"
        "subjectKeyIdentifier=hash\n"
        "authorityKeyIdentifier=keyid,issuer\n"
    )

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)

    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(ca_key),
            "-out", str(ca_pem), "-days", "2", "-subj", "/CN=kombu-pyamqp-threadsafe test CA",
            "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(csr),
            "-subj", "/CN=localhost")
    openssl("x509", "-req", "-in", str(csr), "-CA", str(ca_pem), "-CAkey", str(ca_key),
            "-CAcreateserial", "-out", str(pem), "-days", "2", "-sha256",
            "-extfile", str(ext))
    return {"ca": str(ca_pem), "cert": str(pem), "key": str(key)}


def server_tls_context(files: dict[str, str]) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(files["cert"], files["key"])
    return context
