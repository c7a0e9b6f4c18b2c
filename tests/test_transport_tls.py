"""``amqps://`` through a local TLS endpoint (a TLS-terminating proxy in front of the real
RabbitMQ, with a throw-away CA made by the openssl CLI)."""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import random
import re
import select
import socket
import ssl
import subprocess
import sys
import threading
import time
import traceback
from contextlib import suppress

import pytest

import kombu_pyamqp_threadsafe as ts
from kombu_pyamqp_threadsafe.connection import SSLTransport as SharedSSLSocketTransport
from kombu_pyamqp_threadsafe.tls import TLSSocket
from transport_helpers import (
    Proxy,
    Worker,
    have_openssl,
    join_all,
    kombu_connection,
    make_tls_files,
    open_fds,
    provoke_server_close,
    server_tls_context,
    settled,
    start_all,
    url_for,
)


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory):
    assert have_openssl(), "the TLS test needs the openssl CLI (apt-get install openssl)"
    return make_tls_files(tmp_path_factory.mktemp("tls"))


@pytest.fixture
def tls_proxy(tls_files):
    with Proxy(tls=server_tls_context(tls_files)) as proxy:
        yield proxy


def test_amqps_with_many_threads(tls_files, tls_proxy, vhost, connection_name, queue_name,
                                 server_connections):
    url = url_for(vhost, tls_proxy.port, scheme="amqps", host="localhost")
    conn = kombu_connection(url, connection_name, ssl={
        "ca_certs": tls_files["ca"],
        "cert_reqs": ssl.CERT_REQUIRED,
        "server_hostname": "localhost",
    })
    try:
        conn.ensure_connection(max_retries=3)
        transport = conn.connection.transport
        assert isinstance(transport, SharedSSLSocketTransport)
        assert isinstance(transport.sock, TLSSocket)
        assert transport.sock.getpeercert()["subject"] == ((("commonName", "localhost"),),)
        assert server_connections(connection_name) == 1

        publishers, per_publisher = 8, 40
        total = publishers * per_publisher
        main = conn.default_channel
        main.queue_declare(queue_name, auto_delete=False)
        ready = threading.Event()
        received = []
        bad = []

        def consumer():
            channel = conn.channel()
            channel.basic_qos(0, 50, False)

            def on_message(message):
                digest = message.properties["application_headers"]["sha256"]
                if hashlib.sha256(message.body).hexdigest() != digest:
                    bad.append(digest)
                received.append(digest)
                message.channel.basic_ack(message.delivery_tag)

            channel.basic_consume(queue_name, callback=on_message, no_ack=False)
            ready.set()
            deadline = time.monotonic() + 60
            while len(received) < total and time.monotonic() < deadline:
                conn.drain_events(timeout=10)

        consuming = Worker(consumer, name="tls-consumer")
        consuming.start()
        assert ready.wait(10)
        barrier = threading.Barrier(publishers)

        def publisher(n):
            channel = conn.default_channel
            digests = []
            barrier.wait(10)
            for i in range(per_publisher):
                # Every fourth message spans several frames: reads and writes of the one
                # TLS socket overlap (the reader thread receives while others send).
                body = os.urandom(300 * 1024 if i % 4 == 0 else 200 + i)
                digest = hashlib.sha256(body).hexdigest()
                channel.basic_publish(
                    channel.prepare_message(body, headers={"sha256": digest}),
                    exchange="", routing_key=queue_name)
                digests.append(digest)
            return digests

        workers = start_all([Worker(publisher, n) for n in range(publishers)])
        assert join_all(workers, 60) == []
        expected = []
        for worker in workers:
            assert worker.error is None, repr(worker.error)
            expected += worker.result
        assert join_all([consuming], 60) == []
        assert consuming.error is None, repr(consuming.error)
        assert bad == []
        assert sorted(received) == sorted(expected)
        assert conn.connected
        main.queue_delete(queue_name)
    finally:
        with suppress(ValueError):  # a bug of its own: see test_amqps_close_is_clean
            conn.close()
    assert server_connections.wait(connection_name, 0) == 0


def _tls_connection(tls_files, proxy, vhost, name):
    url = url_for(vhost, proxy.port, scheme="amqps", host="localhost")
    return kombu_connection(url, name, ssl={
        "ca_certs": tls_files["ca"],
        "cert_reqs": ssl.CERT_REQUIRED,
        "server_hostname": "localhost",
    })


def test_amqps_close_is_clean(tls_files, tls_proxy, vhost, connection_name,
                              server_connections, caplog):
    """close() of an amqps connection raises nothing, leaves no socket open, logs nothing."""
    def cycle():
        conn = _tls_connection(tls_files, tls_proxy, vhost, connection_name)
        conn.ensure_connection(max_retries=3)
        channel = conn.default_channel
        channel.basic_qos(0, 1, False)
        errors = []
        try:
            conn.close()
        except Exception as exc:  # noqa: BLE001
            errors.append(repr(exc))
        return errors, channel

    cycle()
    fds_before = open_fds()
    outcomes = [cycle() for _ in range(10)]
    assert [errors for errors, _ in outcomes if errors] == []
    assert all(not channel.is_open for _, channel in outcomes)
    assert settled(open_fds, fds_before + 2) <= fds_before + 2
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []
    assert server_connections.wait(connection_name, 0) == 0


def test_amqps_server_close_and_reconnect(tls_files, tls_proxy, vhost, connection_name,
                                          monkeypatch):
    """The server closes the amqps connection (a connection-level error) 10 times: the
    reader thread must fail the connection cleanly (no exception escaping the thread, old
    channels closed, socket closed), and the connection comes back."""
    unhandled = []
    monkeypatch.setattr(threading, "excepthook",
                        lambda args: unhandled.append((args.thread.name, repr(args.exc_value))))
    conn = _tls_connection(tls_files, tls_proxy, vhost, connection_name)
    try:
        conn.ensure_connection(max_retries=3)
        old_channels = []
        fds_before = None
        for cycle in range(11):
            channel = conn.default_channel
            amqp_connection = channel.connection
            old_channels.append(channel)
            with suppress(*conn.recoverable_connection_errors):
                # TLS writes combine: this thread may also write the reader's Close-Ok queued
                # behind its message and meet the close itself (the failure is the point).
                provoke_server_close(conn)
            with pytest.raises(conn.recoverable_connection_errors):
                while True:
                    amqp_connection.drain_events(timeout=5)
            amqp_connection._reader.thread.join(5)
            conn.ensure_connection(max_retries=3)
            conn.default_channel.basic_qos(0, 1, False)
            if cycle == 0:
                fds_before = open_fds()
        assert unhandled == []
        assert [ch.channel_id for ch in old_channels if ch.is_open] == []
        assert settled(open_fds, fds_before + 2) <= fds_before + 2
    finally:
        with suppress(Exception):
            conn.close()


def test_amqps_refuses_an_unknown_ca(tls_proxy, vhost, connection_name):
    url = url_for(vhost, tls_proxy.port, scheme="amqps", host="localhost")
    conn = kombu_connection(url, connection_name, ssl={
        "cert_reqs": ssl.CERT_REQUIRED,
        "server_hostname": "localhost",
    })
    threads_before = threading.active_count()
    try:
        assert_certificate_refused(conn)
        assert not conn.connected
    finally:
        with suppress(Exception):
            conn.close()
    # No reader thread was left behind (the proxy's thread for the attempt ends too).
    assert settled(threading.active_count, threads_before) <= threads_before


def test_amqps_verifies_the_certificate_by_default(tls_files, tls_proxy, vhost,
                                                  connection_name):
    url = url_for(vhost, tls_proxy.port, scheme="amqps", host="localhost")
    # Only the CA given: certificate and host name ("localhost") are verified, and pass.
    conn = kombu_connection(url, connection_name, ssl={"ca_certs": tls_files["ca"]})
    try:
        conn.ensure_connection(max_retries=1)
        assert conn.connection.transport.sock.getpeercert()
    finally:
        with suppress(Exception):
            conn.close()
    # Nothing given: the throw-away CA is unknown, so the connection is refused.
    conn = kombu_connection(url, connection_name)
    try:
        assert_certificate_refused(conn)
    finally:
        with suppress(Exception):
            conn.close()


def test_amqps_transport_is_the_shared_one(tls_files, tls_proxy, vhost, connection_name):
    """``amqps://`` alone (no ssl= dict) also selects the thread-safe TLS transport."""
    url = url_for(vhost, tls_proxy.port, scheme="amqps", host="localhost")
    conn = ts.KombuConnection(url)
    assert isinstance(conn.transport, ts.SSLTransport)
    conn.close()


def assert_certificate_refused(conn) -> None:
    """Connecting fails, and somewhere in the chain of errors (kombu wraps it) is the
    certificate verification."""
    with pytest.raises(Exception) as info:  # noqa: B017 - kombu wraps it
        conn.ensure_connection(max_retries=1, interval_start=0)
    chain, error = [], info.value
    while error is not None:
        chain.append(error)
        error = error.__cause__ or error.__context__
    assert any(isinstance(e, ssl.SSLCertVerificationError) for e in chain), chain


# ------------------------------------------------------------- one TLS object, one thread at a time


def _load(conn, queue_name, publishers, per_publisher, consumers=4, timeout=60):
    """``publishers`` threads publish with confirms (each on its own channel) while
    ``consumers`` threads consume and ack on the same connection. Bodies of mixed sizes, some
    spanning several frames; each carries the SHA-256 of the rest. Returns the ids received
    and the ids of bodies that arrived damaged."""
    total = publishers * per_publisher
    main = conn.default_channel
    main.queue_declare(queue_name, auto_delete=False)
    received, damaged = [], []
    ready = threading.Barrier(consumers + 1)

    def consumer():
        channel = conn.channel()
        channel.basic_qos(0, 200, False)

        def on_message(message):
            body = message.body
            if hashlib.sha256(body[32:]).digest() != body[:32]:
                damaged.append(body[32:40])
            received.append(body[32:40])
            message.channel.basic_ack(message.delivery_tag)

        channel.basic_consume(queue_name, callback=on_message, no_ack=False)
        ready.wait(10)
        deadline = time.monotonic() + timeout
        while len(received) < total and time.monotonic() < deadline:
            with suppress(TimeoutError):
                conn.drain_events(timeout=0.5)

    consuming = start_all([Worker(consumer, name=f"tls-consumer-{n}") for n in range(consumers)])
    ready.wait(10)
    barrier = threading.Barrier(publishers)

    def publisher(n):
        rand = random.Random(n)
        channel = conn.channel()
        barrier.wait(30)
        for i in range(per_publisher):
            # One in 50 spans two or three frames (frame_max is 128 KiB; py-amqp takes the
            # server's), the rest fit in one.
            size = rand.randrange(140_000, 260_000) if i % 50 == 0 else rand.randrange(50, 3_000)
            payload = n.to_bytes(4, "big") + i.to_bytes(4, "big") + rand.randbytes(size)
            channel.basic_publish(
                channel.prepare_message(hashlib.sha256(payload).digest() + payload),
                exchange="", routing_key=queue_name)
        channel.close()

    publishing = start_all([Worker(publisher, n, name=f"tls-publisher-{n}")
                            for n in range(publishers)])
    assert join_all(publishing, timeout) == []
    assert [repr(w.error) for w in publishing if w.error is not None] == []
    assert join_all(consuming, timeout) == []
    assert [repr(w.error) for w in consuming if w.error is not None] == []
    main.queue_delete(queue_name)
    return received, damaged


def _expected_ids(publishers, per_publisher):
    return sorted(n.to_bytes(4, "big") + i.to_bytes(4, "big")
                  for n in range(publishers) for i in range(per_publisher))


def _load_over_tls(tls_files, proxy, vhost, name, queue_name, publishers, per_publisher):
    """:func:`_load` on a new amqps connection through ``proxy``: every body arrives once and
    intact, and the connection is still up at the end (it is closed then)."""
    url = url_for(vhost, proxy.port, scheme="amqps", host="localhost")
    conn = kombu_connection(url, name, ssl={"ca_certs": tls_files["ca"]},
                            transport_options={"confirm_publish": True})
    try:
        conn.ensure_connection(max_retries=3)
        received, damaged = _load(conn, queue_name, publishers, per_publisher)
        assert damaged == []
        assert sorted(received) == _expected_ids(publishers, per_publisher)
        assert conn.connected
    finally:
        conn.close()


def test_amqps_100_publishers_with_confirms_and_consumers(tls_files, tls_proxy, vhost,
                                                          connection_name, queue_name):
    """20,000 confirmed publishes from 100 threads and 4 consumers on one amqps connection:
    every body arrives once and intact, and nothing fails."""
    _load_over_tls(tls_files, tls_proxy, vhost, connection_name, queue_name,
                   publishers=100, per_publisher=200)


class _Tracker:
    """Counts threads inside the TLS object at once and checks every raw socket call."""

    def __init__(self):
        self._lock = threading.Lock()  # guards the counters below
        self.inside = {}  # thread ident: calls it is inside (nested calls of one thread count once)
        self.overlaps = []
        self.calls = {}
        self.callers = set()
        self.raw_calls = []

    def enter(self, name):
        me = threading.get_ident()
        with self._lock:
            self.calls[name] = self.calls.get(name, 0) + 1
            self.callers.add((name, threading.current_thread().name))
            if any(thread != me for thread in self.inside):
                self.overlaps.append(name)
            self.inside[me] = self.inside.get(me, 0) + 1

    def exit(self):
        me = threading.get_ident()
        with self._lock:
            self.inside[me] -= 1
            if not self.inside[me]:
                del self.inside[me]


class _TrackedTLS:
    """Stands in for the C TLS object: read/write/do_handshake/shutdown/pending, counted."""

    def __init__(self, inner, tracker):
        self._inner = inner
        self._tracker = tracker

    def _call(self, name, *args):
        self._tracker.enter(name)
        try:
            return getattr(self._inner, name)(*args)
        finally:
            self._tracker.exit()

    def read(self, *args):
        return self._call("read", *args)

    def write(self, data):
        return self._call("write", data)

    def do_handshake(self):
        return self._call("do_handshake")

    def shutdown(self):
        return self._call("shutdown")

    def pending(self):
        return self._call("pending")


class _OwnedLock:
    """A lock that knows its holder (so raw socket calls can check they are made outside it)."""

    def __init__(self):
        self._lock = threading.Lock()
        self.owner = None

    def acquire(self, blocking=True, timeout=-1):
        if self._lock.acquire(blocking, timeout):
            self.owner = threading.get_ident()
            return True
        return False

    def release(self):
        self.owner = None
        self._lock.release()

    def _is_owned(self):
        return self.owner == threading.get_ident()

    __enter__ = acquire

    def __exit__(self, *exc_info):
        self.release()


class _RawRecorder:
    """Wraps the raw TCP socket: records who calls it, with which flags, and whether the
    caller holds the TLS lock."""

    def __init__(self, sock, tls_lock, tracker):
        self._sock = sock
        self._tls_lock = tls_lock
        self._tracker = tracker

    def _record(self, name, flags):
        self._tracker.raw_calls.append(
            (name, threading.current_thread().name, flags,
             self._tls_lock.owner == threading.get_ident()))

    def recv_into(self, buffer, nbytes=0, flags=0):
        self._record("recv_into", flags)
        return self._sock.recv_into(buffer, nbytes, flags)

    def sendmsg(self, buffers, ancdata=(), flags=0):
        self._record("sendmsg", flags)
        return self._sock.sendmsg(buffers, ancdata, flags)

    def __getattr__(self, name):
        return getattr(self._sock, name)


@pytest.fixture
def tls_tracker(monkeypatch):
    """Instruments every TLSSocket made while the test runs, from before its handshake."""
    tracker = _Tracker()
    original = TLSSocket.__init__

    def instrumented(self, *args, **kwargs):
        original(self, *args, **kwargs)
        self._ssl = _TrackedTLS(self._ssl, tracker)
        self._tls_lock = _OwnedLock()
        self._progress = threading.Condition(self._tls_lock)
        self._sock = _RawRecorder(self._sock, self._tls_lock, tracker)

    monkeypatch.setattr(TLSSocket, "__init__", instrumented)
    return tracker


def test_amqps_tls_object_is_used_by_one_thread_at_a_time(tls_files, tls_proxy, vhost,
                                                          connection_name, queue_name,
                                                          tls_tracker):
    """Under the same kind of load (40 publishers with confirms, 4 consumers): no two threads
    are ever inside the TLS object at once; no raw socket call is made holding the TLS lock;
    the reader thread never makes a blocking socket call; writes were combined."""
    publishers, per_publisher = 40, 100
    _load_over_tls(tls_files, tls_proxy, vhost, connection_name, queue_name, publishers,
                   per_publisher)
    tracker = tls_tracker
    assert tracker.overlaps == []
    # The instrumentation saw real traffic, from the reader and from many writing threads.
    assert tracker.calls["do_handshake"] >= 1
    assert tracker.calls["shutdown"] == 1  # close_notify
    assert tracker.calls["read"] > 1000
    assert tracker.calls["write"] > publishers * per_publisher
    readers = {thread for name, thread in tracker.callers if name == "read"}
    writers = {thread for name, thread in tracker.callers if name == "write"}
    assert any(thread.startswith("amqp-reader") for thread in readers)
    assert len(writers) > publishers
    raw = tracker.raw_calls
    assert [call for call in raw if call[3]] == []  # never under the TLS lock
    by_reader = [call for call in raw if call[1].startswith("amqp-reader")]
    assert by_reader
    assert [call for call in by_reader if not call[2] & socket.MSG_DONTWAIT] == []
    # Fewer sends than messages and acks written: writes from many threads combined.
    sends = sum(1 for call in raw if call[0] == "sendmsg")
    assert sends < tracker.calls["write"]


def test_amqps_close_sends_close_notify(tls_files, tls_proxy, vhost, connection_name):
    """close() ends the TLS stream with close_notify, after the AMQP Close/Close-Ok (before
    the fix the TCP stream simply ended: a truncation attack looks the same)."""
    for _ in range(3):
        conn = _tls_connection(tls_files, tls_proxy, vhost, connection_name)
        conn.ensure_connection(max_retries=3)
        conn.default_channel.basic_qos(0, 1, False)
        conn.close()
    tls_proxy.close()  # joins the proxy's threads: every ending is recorded
    assert tls_proxy.tls_endings == ["close_notify"] * 3


# ------------------------------------------------ records the reader makes (openssl s_server)


class _SServer:
    """``openssl s_server`` on an ephemeral port: its stdin sends commands (``r``: TLS 1.2
    renegotiation, ``K``: TLS 1.3 KeyUpdate asking for ours), its stdout shows what it got.

    s_server reads its stdin only when no record of ours is pending, so the writer below
    writes in bursts and waits for each to be printed."""

    def __init__(self, files, version):
        self.process = subprocess.Popen(
            ["openssl", "s_server", "-accept", "127.0.0.1:0", "-cert", files["cert"],
             "-key", files["key"], f"-{version}"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        self.lines = []
        self._printed = threading.Condition()  # guards lines
        threading.Thread(target=self._read, daemon=True).start()
        accept = self.wait_for(lambda line: line.startswith(b"ACCEPT "))
        self.port = int(accept.rsplit(b":", 1)[1])

    def _read(self):
        for line in iter(self.process.stdout.readline, b""):
            with self._printed:
                self.lines.append(line.rstrip(b"\n"))
                self._printed.notify_all()

    def command(self, text):
        self.process.stdin.write(text.encode() + b"\n")
        self.process.stdin.flush()

    def wait_for(self, match, timeout=20):
        """The first line printed that ``match(line)`` accepts (within ``timeout`` s)."""
        with self._printed:
            found = self._printed.wait_for(
                lambda: next((line for line in self.lines if match(line)), None), timeout)
        assert found is not None, f"s_server printed no such line: {self.lines[-5:]}"
        return found

    def close(self):
        self.process.kill()
        self.process.wait(10)


@pytest.mark.parametrize("version, command", [("tls1_2", "r"), ("tls1_3", "K")])
def test_tls_records_made_while_reading_go_out_in_order(tls_files, version, command,
                                                        tls_tracker):
    """The server renegotiates (TLS 1.2) or asks for a KeyUpdate (TLS 1.3) while a writer
    thread writes and a reader thread reads: every line arrives intact and in order, the
    server's line after the exchange arrives, the reader sends what it makes without
    blocking, nothing overlaps."""
    server = _SServer(tls_files, version)
    raw = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    sock = TLSSocket(raw, ssl.create_default_context(cafile=tls_files["ca"]),
                     server_hostname="localhost")
    stop, after = threading.Event(), threading.Event()
    got = []

    def line(i):
        return b"line-%d-" % i + b"x" * 3000 + b"\n"

    try:
        sock.do_handshake(10)
        sock.settimeout(None)  # as the reader thread has it
        assert sock.version() == {"tls1_2": "TLSv1.2", "tls1_3": "TLSv1.3"}[version]

        def reader():
            buffer = bytearray(64 * 1024)
            while not stop.is_set():
                if not sock.pending():
                    select.select([sock], [], [], 0.2)
                with suppress(ssl.SSLWantReadError, BlockingIOError):
                    n = sock.recv_into(buffer)
                    if not n:
                        return
                    got.append(bytes(buffer[:n]))
                    if b"after\n" in b"".join(got):
                        after.set()

        def writer():
            i = 0
            while not stop.is_set():
                for _ in range(10):  # a burst of 20 lines, two per sendmsg, one record each
                    sock.sendmsg([line(i), line(i + 1)])
                    i += 2
                last = line(i - 1)[:-1]
                server.wait_for(last.__eq__)
            sock.sendall(b"last\n")
            return i

        reading = Worker(reader, name="tls-reader")
        writing = Worker(writer, name="tls-writer")
        start_all([reading, writing])
        server.wait_for(line(100)[:-1].__eq__)
        server.command(command)
        server.wait_for(b"SSL_do_handshake -> 1".__eq__)
        # The server's next line to us goes under the new keys, after the exchange.
        server.command("after")
        assert after.wait(20), (got, reading.error)
        printed = len(server.lines)
        server.wait_for(lambda text: text.startswith(b"line-") and
                        server.lines.index(text) > printed + 100)  # more lines after it
        stop.set()
        assert join_all([writing], 20) == []
        assert writing.error is None, repr(writing.error)
        server.wait_for(b"last".__eq__)
        assert [text for text in server.lines if text.startswith(b"line-")] == [
            line(i)[:-1] for i in range(writing.result)]
    finally:
        stop.set()
        sock.shutdown(socket.SHUT_RDWR)
        sock.close()
        server.close()
    assert tls_tracker.overlaps == []
    by_reader = [call for call in tls_tracker.raw_calls if call[1] == "tls-reader"]
    assert [call for call in by_reader if not call[2] & socket.MSG_DONTWAIT] == []
    if version == "tls1_2":  # the reader answered the renegotiation itself, without blocking
        assert [call for call in by_reader if call[0] == "sendmsg"]


def test_tls_nonblocking_send_keeps_the_rest_for_the_next_write(tls_files):
    """``sendmsg(..., MSG_DONTWAIT)`` on a full socket returns at once with every byte taken;
    what the socket did not take goes out, in order, with the next (blocking) write."""
    client_raw, server_raw = socket.socketpair()
    server_raw.settimeout(10)
    client_raw.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    context = ssl.create_default_context(cafile=tls_files["ca"])
    sock = TLSSocket(client_raw, context, server_hostname="localhost")
    accepted = Worker(lambda: server_tls_context(tls_files).wrap_socket(server_raw,
                                                                         server_side=True))
    accepted.start()
    try:
        sock.do_handshake(10)
        sock.settimeout(None)  # as the reader thread has it (a timeout would wait to write)
        assert join_all([accepted], 10) == []
        server = accepted.result
        chunk = b"y" * 65536
        # The server reads nothing yet: the socket fills, and each call still returns at once.
        sending = Worker(lambda: [sock.sendmsg([b"%08d" % i, chunk], (), socket.MSG_DONTWAIT)
                                  for i in range(40)])
        sending.start()
        assert join_all([sending], 10) == []
        assert sending.error is None, repr(sending.error)
        assert sending.result == [8 + len(chunk)] * 40
        assert sock._unsent  # what the socket did not take
        received = Worker(lambda: b"".join(iter(lambda: server.recv(1 << 20), b"")))
        received.start()
        sock.sendall(b"end")
        sock.shutdown(socket.SHUT_RDWR)
        assert join_all([received], 10) == []
        assert received.result == b"".join(b"%08d" % i + chunk for i in range(40)) + b"end"
    finally:
        sock.close()
        server_raw.close()


class _Interrupt(Exception):
    """Raised into publisher threads the way dramatiq raises TimeLimit."""


def _stacks(threads):
    """Where each of ``threads`` is now (for an assertion's message)."""
    frames = sys._current_frames()
    return {thread.name: "".join(traceback.format_stack(frames[thread.ident]))
            for thread in threads if thread.ident in frames}


def _raise_in(thread, exc_type):
    ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread.ident),
                                               ctypes.py_object(exc_type))


def test_amqps_interrupts_in_publishers_never_corrupt_the_stream(tls_files, tls_proxy, vhost,
                                                                 connection_name, queue_name):
    """200 asynchronous exceptions raised into 8 threads that publish without pause over one
    amqps connection, mostly into the one holding the write lock (a few land inside tls.py
    itself, most in the code around it): the TLS stream stays whole (the connection never
    drops, so the proxy's TLS end never saw a bad record), and every body that arrives is
    intact, the last one too."""
    conn = _tls_connection(tls_files, tls_proxy, vhost, connection_name)
    conn.ensure_connection(max_retries=3)
    main = conn.default_channel
    main.queue_declare(queue_name, auto_delete=False)
    stop = threading.Event()
    received, damaged, where = [], [], []  # where: the file each interrupt landed in
    end = threading.Event()

    def consumer():
        channel = conn.channel()

        def on_message(message):
            body = message.body
            if body == b"end":
                end.set()
            elif hashlib.sha256(body[32:]).digest() != body[:32]:
                damaged.append(len(body))
            received.append(1)

        channel.basic_consume(queue_name, callback=on_message, no_ack=True)
        while not end.is_set():
            with suppress(TimeoutError):
                conn.drain_events(timeout=0.5)

    publishers = []
    # The handshake: a publisher takes interrupts only while its window is open, and opens and
    # closes it inside its try; the raising thread holds the window's lock across its look and
    # the raise, so every interrupt lands inside the try (never at the loop's jump back, say,
    # once the publish returned), and the publisher waits there for one raised before it closed.
    windows = [threading.Lock() for _ in range(8)]  # guards open_ and in_flight[n]
    open_ = [False] * 8  # per publisher: inside its try, where it catches interrupts
    in_flight = [False] * 8  # per publisher: an interrupt raised into it and not yet caught

    def publisher(n):
        rand = random.Random(n)
        channel = conn.channel()
        window = windows[n]
        interrupted = 0
        while True:
            try:
                with window:  # no interrupt is pending here: the last one was caught
                    in_flight[n] = False
                    if stop.is_set():
                        return interrupted
                    open_[n] = True
                payload = rand.randbytes(rand.choice((100, 2_000, 8_000)))
                channel.basic_publish(
                    channel.prepare_message(hashlib.sha256(payload).digest() + payload),
                    exchange="", routing_key=queue_name)
                with window:
                    open_[n] = False
                    pending = in_flight[n]
                # Raised before the window closed: it lands in this loop, still in the try.
                landing = time.monotonic() + 30
                while pending and time.monotonic() < landing:
                    pass
                assert not pending, "an interrupt raised into the window never landed"
            except _Interrupt as exc:
                interrupted += 1
                innermost = traceback.extract_tb(exc.__traceback__)[-1]
                where.append(os.path.basename(innermost.filename))

    consuming = Worker(consumer, name="tls-consumer")
    consuming.start()
    for n in range(8):
        publishers.append(Worker(publisher, n, name=f"tls-publisher-{n}"))
    start_all(publishers)
    rand = random.Random(0)
    raised = 0
    by_ident = {worker.ident: n for n, worker in enumerate(publishers)}
    write_lock = conn.connection.frame_writer.lock
    deadline = time.monotonic() + 300  # a hang bound: 200 raises take seconds when idle
    while raised < 200 and time.monotonic() < deadline:
        # Mostly the thread that holds the write lock (it is writing, through the TLS object).
        owner = re.search(r"owner=(\d+)", repr(write_lock))
        n = by_ident.get(int(owner.group(1)) if owner else None)
        if n is None or rand.random() < 0.2:
            n = rand.randrange(len(publishers))
        with windows[n]:
            ready = open_[n] and not in_flight[n]
            if ready:
                in_flight[n] = True
                _raise_in(publishers[n], _Interrupt)
        if not ready:
            time.sleep(0)  # let the publishers run: this loop would keep the GIL
            continue
        raised += 1
        for _ in range(rand.randrange(20_000)):  # let it run a random while
            pass
    # Every interrupt caught (its publisher is back at the top of its try), then stop.
    deadline = time.monotonic() + 30
    while any(in_flight) and time.monotonic() < deadline:
        time.sleep(0.01)
    stop.set()
    try:
        stuck = join_all(publishers, 30)
        assert stuck == [], _stacks(stuck)
        assert ["".join(traceback.format_exception(w.error)) for w in publishers
                if w.error is not None] == []
        assert raised == 200
        assert sum(w.result for w in publishers) == 200
        assert conn.connected
        assert tls_proxy.accepted == 1  # the one connection stayed up throughout
        main.basic_publish(main.prepare_message(b"end"), exchange="", routing_key=queue_name)
        assert end.wait(30)
        assert join_all([consuming], 10) == []
        assert consuming.error is None, repr(consuming.error)
        assert damaged == []
        assert len(where) == 200
    finally:
        stop.set()
        with suppress(Exception):
            main.queue_delete(queue_name)
        conn.close()
