"""Every kombu path that builds a connection from another keeps the thread-safe transport, and
connections of the same parameters in one process share one socket.

The round trips construct connections without connecting (pure logic). The rest runs against
the real server. The install functions change kombu's alias table for the process; the
``installed`` fixture puts it back after each test.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from urllib.parse import quote

import kombu
import pytest
from kombu import Exchange, Producer, Queue, pools
from kombu import transport as kombu_transports

import kombu_pyamqp_threadsafe as ts
from kombu_pyamqp_threadsafe.registry import registry
from stress import rabbit_admin

VHOST = "v h/1"
REST = f"guest:secret@127.0.0.1:5673/{quote(VHOST, safe='')}"


@pytest.fixture
def installed() -> Iterator[None]:
    aliases = dict(kombu_transports.TRANSPORT_ALIASES)
    ts.monkeypatch_pyamqp_transport()
    ts.add_shared_amqp_transport()
    try:
        yield
    finally:
        kombu_transports.TRANSPORT_ALIASES.clear()
        kombu_transports.TRANSPORT_ALIASES.update(aliases)
        kombu_transports._transport_cache.clear()
        pools.reset()


# (how the connection is made, whether it is TLS)
FORMS = {
    "amqp": (lambda: kombu.Connection(f"amqp://{REST}"), False),
    "pyamqp": (lambda: kombu.Connection(f"pyamqp://{REST}"), False),
    "amqps": (lambda: kombu.Connection(f"amqps://{REST}"), True),
    "shared+amqp": (lambda: kombu.Connection(f"shared+amqp://{REST}"), False),
    "shared+pyamqp": (lambda: kombu.Connection(f"shared+pyamqp://{REST}"), False),
    "shared+amqps": (lambda: kombu.Connection(f"shared+amqps://{REST}"), True),
    "transport=shared+amqp": (
        lambda: kombu.Connection(f"amqp://{REST}", transport="shared+amqp"), False),
    "transport=shared+pyamqp": (
        lambda: kombu.Connection(f"pyamqp://{REST}", transport="shared+pyamqp"), False),
    "transport=shared+amqps": (
        lambda: kombu.Connection(f"amqps://{REST}", transport="shared+amqps"), True),
    "failover shared+amqp;": (
        lambda: kombu.Connection(f"shared+amqp://{REST};shared+amqp://{REST}"), False),
    "failover [shared+amqp]": (
        lambda: kombu.Connection([f"shared+amqp://{REST}", f"shared+amqp://{REST}"]), False),
    "failover amqp;": (lambda: kombu.Connection(f"amqp://{REST};amqp://{REST}"), False),
    "KombuConnection amqp": (lambda: ts.KombuConnection(f"amqp://{REST}"), False),
    "KombuConnection shared+amqps": (
        lambda: ts.KombuConnection(f"shared+amqps://{REST}"), True),
}


def fields(conn: kombu.Connection) -> tuple:
    """What a copy must keep: the transport class and every parameter of the socket."""
    conn.transport  # noqa: B018 - a transport that parses its URL fills the fields in here
    return (conn.get_transport_cls().__name__, conn.hostname, conn.port, conn.userid,
            conn.password, conn.virtual_host, bool(conn.ssl))


@pytest.mark.parametrize("form", list(FORMS))
def test_copies_keep_the_transport_and_parameters(installed: None, form: str) -> None:
    make, tls = FORMS[form]
    conn = make()
    expected = ("SSLTransport" if tls else "Transport", "127.0.0.1", 5673, "guest", "secret",
                VHOST, tls)
    got = fields(conn)
    assert issubclass(conn.get_transport_cls(), ts.Transport)
    assert got[1:] == expected[1:]
    copies = {
        "clone": conn.clone(),
        "clone of clone": conn.clone().clone(),
        "Connection(**info())": kombu.Connection(**conn.info()),
        "as_uri": kombu.Connection(conn.as_uri(include_password=True)),
        "as_uri of clone": kombu.Connection(conn.clone().as_uri(include_password=True)),
        "pools.connections": pools.connections[conn].acquire(),
        "pools.producers": pools.producers[conn].acquire().__connection__,
    }
    for how, copy in copies.items():
        assert issubclass(copy.get_transport_cls(), ts.Transport), how
        assert fields(copy)[1:] == expected[1:], how
    assert "secret" not in conn.as_uri()
    if conn.alt:
        assert conn.clone().alt == conn.alt


def test_shared_uri_prints_as_a_shared_url(installed: None) -> None:
    conn = kombu.Connection(f"shared+amqp://{REST}")
    assert conn.as_uri() == f"shared+amqp://guest:**@127.0.0.1:5673/{quote(VHOST)}"
    assert conn.clone().as_uri() == conn.as_uri()


# ------------------------------------------------------------------- one socket per parameters


def _named(url: str, name: str, **kwargs: object) -> kombu.Connection:
    return kombu.Connection(url, transport_options={"client_properties": {
        "connection_name": name}, "confirm_publish": True}, **kwargs)


def test_copies_share_one_socket_and_release_one_by_one(installed: None, amqp_url: str,
                                                      vhost: str, queue_name: str) -> None:
    name = f"clone-{uuid.uuid4().hex[:8]}"
    first = _named("shared+" + amqp_url, name)
    copies = [first, first.clone(), kombu.Connection(**first.info()),
              pools.connections[first].acquire(), _named(amqp_url, name)]
    for conn in copies:
        conn.ensure_connection(max_retries=1)
    channel = copies[0].default_channel
    channel.queue_declare(queue_name, auto_delete=False)
    assert rabbit_admin.wait_for_connections(name, 1, vhost=vhost) == 1
    assert len({id(conn.connection) for conn in copies}) == 1
    for conn in copies[:-1]:
        conn.release()
        # The remaining handles still publish (with confirms) on the shared socket.
        Producer(copies[-1]).publish(b"x", routing_key=queue_name)
    assert rabbit_admin.count_connections(name, vhost=vhost) == 1
    copies[-1].release()
    # A pooled handle goes back to its pool on release(); the pool drops it when closed.
    assert rabbit_admin.count_connections(name, vhost=vhost) == 1
    pools.connections[first].force_close_all()
    assert rabbit_admin.wait_for_connections(name, 0, vhost=vhost) == 0
    with _named(amqp_url, name) as again:
        assert again.default_channel.queue_declare(queue_name, passive=True).message_count == 4


def test_other_parameters_get_their_own_socket(installed: None, amqp_url: str,
                                               vhost: str) -> None:
    name = f"clone-{uuid.uuid4().hex[:8]}"
    a, b = _named(amqp_url, name), _named(amqp_url, name, heartbeat=7)
    try:
        a.ensure_connection(max_retries=1)
        b.ensure_connection(max_retries=1)
        assert a.connection is not b.connection
        assert rabbit_admin.wait_for_connections(name, 2, vhost=vhost) == 2
    finally:
        a.release()
        b.release()


# ------------------------------------------------------------ kombu APIs from many threads at once


THREADS = 16


def _run_threads(target, count: int = THREADS) -> list[BaseException]:  # type: ignore[no-untyped-def]
    errors: list[BaseException] = []
    barrier = threading.Barrier(count)

    def run(index: int) -> None:
        try:
            barrier.wait(10)
            target(index)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not any(thread.is_alive() for thread in threads)
    return errors


def test_kombu_apis_from_many_threads_on_one_connection(installed: None, amqp_url: str,
                                                        vhost: str) -> None:
    """Producer.publish (confirms) through ensure/autoretry, a Consumer per thread draining
    the one connection, and SimpleQueue, all at once from 16 threads: nothing lost, no error,
    one socket."""
    name = f"apis-{uuid.uuid4().hex[:8]}"
    conn = _named(amqp_url, name)
    exchange = Exchange(f"x-{name}", type="direct")
    each = 20

    def thread(index: int) -> None:
        queue = Queue(f"{name}-{index}", exchange, routing_key=str(index), auto_delete=True)
        producer = Producer(conn, exchange=exchange)
        publish = conn.ensure(producer, producer.publish, max_retries=3)
        declare = conn.autoretry(lambda channel=None: queue.bind(channel).declare(),
                                 channel=conn.default_channel)
        declare()
        got: list[int] = []
        with kombu.Consumer(conn, [queue], callbacks=[lambda body, m: (got.append(body),
                                                                       m.ack())]):
            for n in range(each):
                publish(n, routing_key=str(index), serializer="json")
            while len(got) < each:
                conn.drain_events(timeout=10)
        assert sorted(got) == list(range(each))
        with conn.SimpleQueue(f"{name}-simple-{index}",
                              queue_opts={"auto_delete": True}) as simple:
            simple.put({"n": index})
            message = simple.get(timeout=10)
            assert message.payload == {"n": index}
            message.ack()

    try:
        assert _run_threads(thread) == []
        assert rabbit_admin.count_connections(name, vhost=vhost) == 1
        assert registry.connections() >= 1
    finally:
        conn.release()


def test_a_wait_for_a_confirm_runs_no_consumer_callback(installed: None, amqp_url: str,
                                                       queue_name: str) -> None:
    """Two kombu.Connections share the socket; one thread consumes on one and publishes with
    confirms on the other (Celery's worker: task consumer and event dispatcher). Deliveries
    wait for the thread's next drain_events() instead of running inside the publish (which
    re-entered Celery's dispatcher and hung the worker)."""
    consuming, publishing = _named(amqp_url, "nested"), _named(amqp_url, "nested")
    try:
        queue = Queue(queue_name, auto_delete=True)
        inside_publish = threading.local()
        nested: list[bytes] = []
        got: list[bytes] = []

        def on_message(body: bytes, message: kombu.Message) -> None:
            (nested if getattr(inside_publish, "value", False) else got).append(body)
            message.ack()

        producer = Producer(publishing)
        with kombu.Consumer(consuming, [queue], callbacks=[on_message], accept=["json"]):
            for n in range(50):
                producer.publish(n, routing_key=queue_name, serializer="json")
            inside_publish.value = True
            for n in range(50, 100):
                producer.publish(n, routing_key=queue_name, serializer="json")
            inside_publish.value = False
            while len(got) + len(nested) < 100:
                consuming.drain_events(timeout=10)
        assert consuming.connection is publishing.connection
        assert nested == []
        assert sorted(got) == list(range(100))
    finally:
        consuming.release()
        publishing.release()


@pytest.mark.parametrize("broker", [f"shared+amqp://{REST}", f"amqp://{REST}"])
def test_celery_pools_keep_the_transport_and_never_wait(installed: None, broker: str) -> None:
    """Celery's app.pool and app.producer_pool (broker_pool_limit 10 by default): copies on
    the thread-safe transport, and 15 held at once without a wait (upstream: the 11th waits
    for a free slot, here it would time out)."""
    from celery import Celery

    app = Celery("clone-test", broker=broker)
    connections = [app.pool.acquire(block=True, timeout=0.1) for _ in range(15)]
    producers = [app.producer_pool.acquire(block=True, timeout=0.1) for _ in range(15)]
    for conn in [*connections, *(p.__connection__ for p in producers)]:
        assert issubclass(conn.get_transport_cls(), ts.Transport)
        assert fields(conn)[1:] == ("127.0.0.1", 5673, "guest", "secret", VHOST, False)
    for producer in producers:
        producer.release()
    for conn in connections:
        conn.release()
