"""The network delay of ``stress.tcp_proxy``: the delay line's logic on made-up times, then the
proxy on real sockets in front of a small TCP server (no RabbitMQ)."""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest

from stress.delay_line import DelayLine
from stress.tcp_proxy import Proxy


def test_delay_line_lets_each_chunk_out_when_due_in_order() -> None:
    line = DelayLine(0.5)
    line.put(b"a", now=10.0)
    line.put(b"b", now=10.2)
    assert line.next_due() == 10.5
    assert line.take(10.49) == b""
    assert line.take(10.5) == b"a"
    assert line.next_due() == pytest.approx(10.7)
    assert line.take(11.0) == b"b" and len(line) == 0 and line.next_due() is None
    for n, now in enumerate((20.0, 20.1, 20.2)):
        line.put(b"%d" % n, now)
    assert line.take(30.0) == b"012"  # everything due leaves at once, joined in order


def test_delay_line_never_lets_a_chunk_overtake_an_earlier_one() -> None:
    line = DelayLine(1.0)
    line.put(b"first", now=10.0)
    line.put(b"second", now=5.0)  # due earlier, but behind "first"
    assert line.take(7.0) == b""
    assert line.take(11.0) == b"firstsecond"


def test_delay_line_refuses_a_negative_delay() -> None:
    with pytest.raises(ValueError, match="negative"):
        DelayLine(-1)
    with pytest.raises(ValueError, match="negative"):
        Proxy(delay=-0.1)


@contextmanager
def tcp_server(handle: Callable[[socket.socket, int], None]) -> Iterator[tuple[str, int]]:
    """A server on 127.0.0.1 running ``handle(conn, number)`` in a thread per connection."""
    listener = socket.create_server(("127.0.0.1", 0))
    conns: list[socket.socket] = []

    def accept() -> None:
        number = 0
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            conns.append(conn)
            threading.Thread(target=handle, args=(conn, number), daemon=True).start()
            number += 1

    threading.Thread(target=accept, daemon=True).start()
    try:
        yield listener.getsockname()
    finally:
        listener.close()
        for conn in conns:
            conn.close()


def echo(conn: socket.socket, number: int) -> None:
    try:
        while data := conn.recv(65536):
            conn.sendall(data)
    except OSError:
        pass


def recv_exactly(sock: socket.socket, size: int) -> bytes:
    chunks, got = [], 0
    while got < size:
        chunk = sock.recv(min(65536, size - got))
        assert chunk, f"connection ended after {got} of {size} bytes"
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def test_a_round_trip_through_the_proxy_takes_at_least_twice_the_delay() -> None:
    delay = 0.05
    with tcp_server(echo) as target, Proxy(target, delay=delay) as proxy:
        client = socket.create_connection(("127.0.0.1", proxy.port), timeout=10)
        with client:
            for n in range(5):
                started = time.monotonic()
                client.sendall(b"ping %d" % n)
                assert recv_exactly(client, 6) == b"ping %d" % n
                assert time.monotonic() - started >= 2 * delay


def test_bytes_cross_the_delayed_proxy_in_order_in_both_directions() -> None:
    payload = os.urandom(2 * 2**20)
    with tcp_server(echo) as target, Proxy(target, delay=0.002) as proxy:
        client = socket.create_connection(("127.0.0.1", proxy.port), timeout=10)
        with client:
            sending = threading.Thread(
                target=lambda: [client.sendall(payload[i:i + 1000])
                                for i in range(0, len(payload), 1000)])
            sending.start()
            assert recv_exactly(client, len(payload)) == payload
            sending.join(10)


def test_a_peer_that_reads_nothing_holds_neither_its_other_direction_nor_other_connections(
) -> None:
    """Connection 0's server never reads: the proxy keeps reading its client (whose 32 MiB all
    leave it), the server's greeting still reaches that client, and connection 1 still echoes."""
    flooded = threading.Event()

    def handle(conn: socket.socket, number: int) -> None:
        if number == 0:
            assert flooded.wait(30)
            conn.sendall(b"hello")
        else:
            echo(conn, number)

    with tcp_server(handle) as target, Proxy(target, delay=0.001) as proxy:
        stuck = socket.create_connection(("127.0.0.1", proxy.port), timeout=20)
        with stuck:
            stuck.sendall(bytes(32 * 2**20))  # far more than the socket buffers hold
            flooded.set()
            assert recv_exactly(stuck, 5) == b"hello"
            other = socket.create_connection(("127.0.0.1", proxy.port), timeout=20)
            with other:
                other.sendall(b"still here")
                assert recv_exactly(other, 10) == b"still here"


def test_a_delayed_proxy_hands_on_the_last_bytes_before_the_end() -> None:
    """The server writes and closes at once: the client still gets every byte, then the end
    (as a Close-Ok followed by the server's close must reach an AMQP client)."""

    def say_and_close(conn: socket.socket, number: int) -> None:
        conn.sendall(b"bye")
        conn.close()

    with tcp_server(say_and_close) as target, Proxy(target, delay=0.05) as proxy:
        client = socket.create_connection(("127.0.0.1", proxy.port), timeout=10)
        with client:
            assert recv_exactly(client, 3) == b"bye"
            assert client.recv(10) == b""


def test_kill_cuts_a_delayed_connection_with_bytes_still_queued() -> None:
    reached = threading.Event()

    def hold(conn: socket.socket, number: int) -> None:
        reached.set()
        echo(conn, number)

    with tcp_server(hold) as target, Proxy(target, delay=30) as proxy:
        client = socket.create_connection(("127.0.0.1", proxy.port), timeout=10)
        with client:
            assert reached.wait(10)  # the proxy is connected upstream
            client.sendall(b"due in 30 s")
            proxy.kill()
            # Cut: an end of stream, or a reset when the proxy closed with these bytes unread.
            try:
                data = client.recv(10)
            except ConnectionResetError:
                data = b""
            assert data == b""
