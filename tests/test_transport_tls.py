"""``amqps://`` through a local TLS endpoint (a TLS-terminating proxy in front of the real
RabbitMQ, with a throw-away CA made by the openssl CLI)."""

from __future__ import annotations

import hashlib
import logging
import os
import ssl
import threading
import time
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
