"""``monkeypatch_pyamqp_transport()`` and ``add_shared_amqp_transport()`` against the real
RabbitMQ. Both change process-global kombu state, so each runs in a fresh interpreter."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from contextlib import suppress

import pytest

from transport_helpers import kombu_connection

COMMON = textwrap.dedent('''
    import sys
    import threading

    import kombu
    from kombu.transport import pyamqp

    import kombu_pyamqp_threadsafe as ts

    URL, QUEUE = sys.argv[1], sys.argv[2]
    REST = URL.split("://", 1)[1]


    def check_vhost(conn):
        # The queue exists only in the session vhost: a wrong vhost raises NotFound.
        channel = conn.channel()
        channel.queue_declare(QUEUE, passive=True)
        channel.close()


    def use_from_threads(conn, threads=4, each=25):
        """Publish from several threads (each on its own channel), consume all."""
        main = conn.channel()
        queue = main.queue_declare("", exclusive=True).queue
        barrier = threading.Barrier(threads)
        errors = []

        def publisher():
            try:
                channel = conn.channel()
                barrier.wait(10)
                for i in range(each):
                    channel.basic_publish(channel.prepare_message(b"m"), exchange="",
                                          routing_key=queue)
            except BaseException as exc:
                errors.append(exc)

        workers = [threading.Thread(target=publisher) for _ in range(threads)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join(30)
        assert not errors, errors
        got = []
        main.basic_consume(queue, callback=got.append, no_ack=True)
        while len(got) < threads * each:
            conn.drain_events(timeout=10)
        main.close()
''')

MONKEYPATCH = COMMON + textwrap.dedent('''
    stock = kombu.Connection(URL)
    stock.connect()
    assert type(stock.connection) is pyamqp.Connection, type(stock.connection)
    stock.close()

    ts.monkeypatch_pyamqp_transport()
    ts.monkeypatch_pyamqp_transport()  # harmless the second time

    for url in (URL, "pyamqp://" + REST):
        conn = kombu.Connection(url)
        conn.connect()
        assert isinstance(conn.connection, ts.Connection), (url, type(conn.connection))
        assert isinstance(conn.transport, ts.Transport), (url, type(conn.transport))
        check_vhost(conn)
        use_from_threads(conn)
        conn.close()
    amqps = kombu.Connection("amqps://" + REST)
    assert isinstance(amqps.transport, ts.SSLTransport), type(amqps.transport)
    print("OK")
''')

SHARED = COMMON + textwrap.dedent('''
    ts.add_shared_amqp_transport()
    ts.add_shared_amqp_transport()

    connections = {
        "shared+amqp://": kombu.Connection("shared+amqp://" + REST),
        "shared+pyamqp://": kombu.Connection("shared+pyamqp://" + REST),
        "transport='shared+amqp'": kombu.Connection(URL, transport="shared+amqp"),
        "KombuConnection(transport='shared+amqp')":
            ts.KombuConnection(URL, transport="shared+amqp"),
    }
    for label, conn in connections.items():
        conn.connect()
        assert isinstance(conn.connection, ts.Connection), (label, type(conn.connection))
        check_vhost(conn)
        use_from_threads(conn)
        conn.close()

    # The stock transport is left alone.
    stock = kombu.Connection(URL)
    stock.connect()
    assert type(stock.connection) is pyamqp.Connection, type(stock.connection)
    check_vhost(stock)
    stock.close()
    tls = kombu.Connection("shared+amqps://" + REST)
    assert isinstance(tls.transport, ts.Transport), type(tls.transport)
    assert tls.ssl, "shared+amqps:// must turn TLS on"
    print("OK")
''')


@pytest.fixture
def existing_queue(amqp_url, connection_name, queue_name):
    conn = kombu_connection(amqp_url, connection_name)
    channel = conn.default_channel
    channel.queue_declare(queue_name, auto_delete=False)
    yield queue_name
    with suppress(Exception):
        conn.default_channel.queue_delete(queue_name)
    conn.close()


@pytest.mark.parametrize("script", [MONKEYPATCH, SHARED], ids=["monkeypatch", "shared"])
def test_registration_in_a_fresh_interpreter(script, amqp_url, existing_queue):
    proc = subprocess.run([sys.executable, "-c", script, amqp_url, existing_queue],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("OK"), (
        f"exit {proc.returncode}\nstdout: {proc.stdout}\nstderr: {proc.stderr}")
