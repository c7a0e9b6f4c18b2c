"""Bad input: each gives a clear error within seconds (or a dead-lettered message and a log
line), and a worker that is running meanwhile goes on serving the other messages.

A module-wide worker (``serving``) consumes one queue for the whole module; after every bad
input a fresh message must still be processed by it within seconds (the canary), and at the
end every message it was sent was processed.
"""

from __future__ import annotations

import json
import socket
import time
import uuid
from functools import partial

import amqp
import dramatiq
import pytest
from dramatiq import Message
from dramatiq.errors import ConnectionClosed

from broker_helpers import raw_channel, run_bounded
from dramatiq_kombu_broker import KombuBroker
from dramatiq_kombu_broker.broker import MAX_ENQUEUE_ATTEMPTS
from stress import rabbit_admin
from stress.fault_scenarios.context import PYTEST_SCALE, Context
from stress.fault_scenarios.credentials import url_with
from stress.fault_scenarios.fault_proxy import FaultProxy
from stress.fault_scenarios.harness import LoadedWorker
from stress.fault_scenarios.log_watch import LogWatch
from stress.fault_scenarios.server_state import queue_messages

CONNECT_TIMEOUT = 2
#: A worker must log a connection error within this many seconds (one connect timeout for the
#: attempt in progress when the retry budget runs out, plus the budget, plus slack).
ERROR_WITHIN = 2 * CONNECT_TIMEOUT + 1.5


class Serving:
    """The module's running worker, with a canary to prove it still serves."""

    def __init__(self, ctx: Context, threads: int = 4) -> None:
        self.ctx = ctx
        self.watch = LogWatch().install()
        self.lw = LoadedWorker(ctx, threads=threads, watch=self.watch).start()
        self.queue = self.lw.queues[0]
        self.next_id = 0

    def canary(self, timeout: float = 10) -> float:
        """Send a new message; return how long it took to be processed (fails if it was not)."""
        mid = self.next_id
        self.next_id += 1
        start = time.monotonic()
        self.lw.send(mid)
        self.lw.ledger.record_sent(mid)
        assert self.lw.ledger.wait_for(lambda: mid in self.lw.ledger.counts, timeout), (
            f"the running worker did not process message {mid} within {timeout} s")
        elapsed = time.monotonic() - start
        dead = [t.name for t in self.lw.worker.workers if not t.is_alive()]
        assert dead == [], f"worker threads died: {dead}"
        return elapsed

    def xq_messages(self) -> int:
        with raw_channel(self.ctx.url) as channel:
            return channel.queue_declare(f"{self.queue}.XQ", passive=True).message_count

    def wait_dead_lettered(self, expected: int, timeout: float = 8) -> int:
        deadline = time.monotonic() + timeout
        while True:
            count = self.xq_messages()
            if count >= expected or time.monotonic() >= deadline:
                return count
            time.sleep(0.2)


@pytest.fixture(scope="module")
def serving(amqp_url, vhost):
    serving = Serving(Context(amqp_url, vhost, PYTEST_SCALE))
    try:
        try:
            serving.canary(30)
            yield serving
        except BaseException:
            serving.lw.close()
            raise
        result = serving.lw.finish("bad input")
    finally:
        serving.watch.remove()
    assert result.lost == 0, result.explain()
    assert result.problems == [], result.explain()


# ------------------------------------------------------------------------- connection errors


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _bad_url(kind: str, base: str, vhost: str, password: str) -> tuple[str, str, str]:
    """(url, what the error must say, the server address it must name)."""
    if kind == "wrong password":
        return url_with(base, vhost, "guest", password), "ACCESS_REFUSED", "127.0.0.1:5672"
    if kind == "unknown vhost":
        missing = f"no-such-vhost-{uuid.uuid4().hex[:6]}"
        return (url_with(base, missing), f"vhost {missing} not found", "127.0.0.1:5672")
    if kind == "connection refused":
        port = _free_port()
        return (f"amqp://guest:{password}@127.0.0.1:{port}/{vhost}", "Connection refused",
                f"127.0.0.1:{port}")
    if kind == "unknown host":
        return (f"amqp://guest:{password}@no-such-host.invalid:5672/{vhost}", "not known",
                "no-such-host.invalid")
    raise AssertionError(kind)


CONNECTION_CASES = ["wrong password", "unknown vhost", "connection refused", "unknown host",
                    "silent server"]


@pytest.fixture(scope="module")
def silent_server():
    """Accepts TCP connections and never says a word (a hung or firewalled server)."""
    with FaultProxy() as proxy:
        proxy.silence()
        yield proxy.port


@pytest.fixture(scope="module")
def bad_servers(amqp_url_base, vhost, silent_server):
    """kind -> (url, expected fragment, server address, password), one per module."""
    servers = {}
    for kind in CONNECTION_CASES:
        password = f"pw-{uuid.uuid4().hex}"
        if kind == "silent server":
            servers[kind] = (f"amqp://guest:{password}@127.0.0.1:{silent_server}/{vhost}",
                             "timed out", f"127.0.0.1:{silent_server}", password)
        else:
            servers[kind] = (*_bad_url(kind, amqp_url_base, vhost, password), password)
    return servers


@pytest.fixture
def bad_server(request, bad_servers):
    return request.param, *bad_servers[request.param]


_ERRORS: dict[str, tuple[BaseException, float, KombuBroker]] = {}


def _enqueue_error_once(kind: str, url: str, queue: str) -> tuple[BaseException, int,
                                                                   KombuBroker]:
    """The error of the first enqueue to the bad server ``kind`` and how many connection
    attempts it made (attempted once per module: each attempt takes seconds)."""
    if kind not in _ERRORS:
        _ERRORS[kind] = _enqueue_error(url, queue)
    return _ERRORS[kind]


def _enqueue_error(url: str, queue: str) -> tuple[BaseException, int, KombuBroker]:
    broker = KombuBroker(url=url, connect_timeout=CONNECT_TIMEOUT,
                         connection_name=f"bad-{uuid.uuid4().hex[:6]}")
    message = Message(queue_name=queue, actor_name="fault_work_0", args=(1,), kwargs={},
                      options={})
    attempts = []
    connect = broker.connect

    def counting_connect(connection):
        attempts.append(connection)
        return connect(connection)

    broker.connect = counting_connect
    try:
        # A bound far above the retry budget (CONNECT_TIMEOUT): an attempt must not hang.
        run_bounded(lambda: broker.enqueue(message), 30, "enqueue")
    except ConnectionClosed as exc:
        return exc, len(attempts), broker
    finally:
        run_bounded(broker.close, 15, "close")
    raise AssertionError(f"enqueue to {url} did not fail")


@pytest.mark.parametrize("bad_server", CONNECTION_CASES, indirect=True)
def test_connection_error_is_clear_and_prompt(bad_server, serving):
    kind, url, fragment, _, password = bad_server
    exc, attempts, broker = _enqueue_error_once(kind, url, serving.queue)
    text = f"{exc} {exc!r} {exc.__context__!r} {exc.__cause__!r}"
    assert fragment in str(exc), text
    # Prompt: no retry of what no retry can fix; a silent server's one attempt takes the whole
    # budget (the connect timeout); the rest within the enqueue's attempts, none of kombu's.
    limit = {"wrong password": 1, "unknown vhost": 1, "silent server": 1}.get(
        kind, MAX_ENQUEUE_ATTEMPTS)
    assert 1 <= attempts <= limit, (attempts, text)
    assert password not in text and password not in repr(broker)
    serving.canary()


@pytest.mark.parametrize("bad_server", CONNECTION_CASES, indirect=True)
def test_connection_error_names_the_server(bad_server, serving):
    """An operator must see *which* server failed (several brokers, failover lists)."""
    kind, url, _, address, password = bad_server
    exc, _, _ = _enqueue_error_once(kind, url, serving.queue)
    assert address in str(exc), f"{str(exc)!r} does not name {address}"
    assert password not in str(exc)


@pytest.mark.parametrize("bad_server", ["wrong password", "silent server"], indirect=True)
def test_worker_on_a_bad_server_logs_the_error_and_keeps_trying(bad_server, serving):
    _, url, fragment, _, password = bad_server
    broker = KombuBroker(url=url, connect_timeout=CONNECT_TIMEOUT,
                         connection_name=f"bad-{uuid.uuid4().hex[:6]}")
    dramatiq.actor(lambda: None, broker=broker, actor_name="bad_server_actor",
                   queue_name=f"bad-{uuid.uuid4().hex[:6]}")
    watch = LogWatch([password]).install()
    worker = dramatiq.Worker(broker, worker_threads=1, worker_timeout=100)
    since = time.monotonic()
    try:
        worker.start()
        lines = watch.wait_for("Consumer encountered a connection error", since, ERROR_WITHIN)
        assert lines, "the worker logged no connection error"
        assert fragment in lines[0], lines
        serving.canary()
    finally:
        run_bounded(lambda: worker.stop(timeout=10_000), 30, "worker.stop()")
        run_bounded(broker.close, 15, "close")
        watch.remove()
    assert watch.leaks == []
    # The consumer kept trying (dramatiq restarts it every 3 s) rather than dying.
    assert not [u for u in watch.unexpected if "unexpected error" in u], watch.unexpected


@pytest.mark.parametrize("url", [
    "amqp://guest:{pw}@127.0.0.1:notaport/v",
    "amqp://guest:{pw}@[::1/v",
    "amqp://guest:{pw}@127.0.0.1:99999/v",
    "http://guest:{pw}@127.0.0.1:5672/v",
    "amqp//guest:{pw}@127.0.0.1:5672/v",
    "guest:{pw}@127.0.0.1:5672",
    "amqp:/guest:{pw}@127.0.0.1:5672/v",
    "amqp:guest:{pw}@127.0.0.1:5672/v",
])
def test_malformed_url_is_refused_at_construction_without_its_password(url):
    password = f"pw-{uuid.uuid4().hex}"
    with pytest.raises(ValueError) as info:
        KombuBroker(url=url.format(pw=password))
    assert "url" in str(info.value)
    assert password not in str(info.value), str(info.value)


# ------------------------------------------------------------------------ message errors


def _publish_raw(amqp_url: str, queue: str, body: bytes) -> None:
    with raw_channel(amqp_url) as channel:
        channel.confirm_select()
        channel.basic_publish(amqp.Message(body, delivery_mode=2), exchange="",
                              routing_key=queue)


def _take_dead_letters(amqp_url: str, queue: str) -> list[bytes]:
    """Take every message off ``queue``.XQ (py-amqp gives an empty body as ``''``)."""
    bodies = []
    with raw_channel(amqp_url) as channel:
        while (message := channel.basic_get(f"{queue}.XQ", no_ack=True)) is not None:
            body = message.body
            bodies.append(body.encode() if isinstance(body, str) else bytes(body))
    return bodies


@pytest.fixture
def dead_letters(serving, amqp_url):
    """The dead-letter queue is empty when the test starts."""
    _take_dead_letters(amqp_url, serving.queue)


def _dramatiq_body(queue: str, **changes) -> bytes:
    message = {"queue_name": queue, "actor_name": "fault_work_0", "args": [99_999_999],
               "kwargs": {}, "options": {}, "message_id": str(uuid.uuid4()),
               "message_timestamp": int(time.time() * 1000)}
    message.update(changes)
    return json.dumps(message).encode()


@pytest.mark.parametrize("body", [
    b"this is not json",
    b"\xff\xfe\x00garbage",
    b"",
    b"[1, 2, 3]",
    b'{"hello": "world"}',
], ids=["text", "binary", "empty", "json-list", "json-object"])
def test_undecodable_body_is_dead_lettered_with_a_log_line(body, serving, amqp_url,
                                                          dead_letters):
    since = time.monotonic()
    _publish_raw(amqp_url, serving.queue, body)
    assert serving.wait_dead_lettered(1) == 1
    assert serving.watch.wait_for("undecodable message", since, 5), "no log line"
    assert _take_dead_letters(amqp_url, serving.queue) == [body]
    serving.canary()


@pytest.fixture
def own_worker(amqp_url, vhost):
    """A worker of its own (2 threads), for inputs that may break the worker they reach."""
    worker = Serving(Context(amqp_url, vhost, PYTEST_SCALE), threads=2)
    try:
        worker.canary(30)
        yield worker
    finally:
        worker.lw.close()
        worker.watch.remove()


@pytest.mark.parametrize("changes, outcome", [
    ({"args": 5}, "dead-lettered"),
    ({"kwargs": [1]}, "dead-lettered"),
    ({"options": []}, "dead-lettered"),
    ({"actor_name": None}, "dead-lettered"),
    # dramatiq's own rule: an eta that is not a number is logged and replaced by "now".
    ({"options": {"eta": "soon"}}, "processed"),
], ids=["args-not-a-list", "kwargs-not-a-dict", "options-not-a-dict", "no-actor-name",
        "eta-not-a-number"])
def test_dramatiq_message_with_fields_of_the_wrong_type(changes, outcome, own_worker, amqp_url):
    """JSON that decodes but is not a valid dramatiq message: dead-lettered with a log line
    (never run with half its middleware failing), and no worker thread dies of it."""
    since = time.monotonic()
    body = _dramatiq_body(own_worker.queue, **changes)
    _publish_raw(amqp_url, own_worker.queue, body)
    if outcome == "processed":
        assert own_worker.lw.ledger.wait_for(lambda: 99_999_999 in own_worker.lw.ledger.counts,
                                             10)
        assert own_worker.watch.wait_for("Invalid eta", since, 5)
    else:
        dead = own_worker.wait_dead_lettered(1)
        unacked = queue_messages(own_worker.ctx.vhost, [own_worker.queue])
        assert dead == 1, (f"not dead-lettered (messages left in the queue: {unacked}); "
                           f"log: {own_worker.watch.lines('', since)[:3]}")
        assert own_worker.watch.wait_for("", since, 5), "no log line"
        assert _take_dead_letters(amqp_url, own_worker.queue) == [body]
        assert 99_999_999 not in own_worker.lw.ledger.counts, "the invalid message was run"
    own_worker.canary()


def test_message_for_an_unknown_actor_is_dead_lettered_with_a_log_line(serving, amqp_url,
                                                                      dead_letters):
    since = time.monotonic()
    message = Message(queue_name=serving.queue, actor_name="no_such_actor", args=(1,),
                      kwargs={}, options={})
    serving.lw.broker.enqueue(message)
    assert serving.wait_dead_lettered(1) == 1
    lines = serving.watch.wait_for("undefined actor", since, 5)
    assert lines and "no_such_actor" in lines[0], lines
    bodies = _take_dead_letters(amqp_url, serving.queue)
    assert [json.loads(b)["message_id"] for b in bodies] == [message.message_id]
    serving.canary()


@pytest.mark.timeout(120)
def test_message_larger_than_the_server_limit_raises_at_send(serving):
    """RabbitMQ 3.10 refuses bodies over max_message_size (128 MiB by default)."""
    limit = 128 * 1024 * 1024
    message = Message(queue_name=serving.queue, actor_name="fault_work_0",
                      args=("x" * (limit + 1024 * 1024),), kwargs={}, options={})
    with pytest.raises(ConnectionClosed) as info:
        # Refused, not retried (406 is fatal) nor hung: bounded far above one 129 MiB write.
        run_bounded(partial(serving.lw.broker.enqueue, message), 90, "enqueue of 129 MiB")
    del message
    assert "PRECONDITION_FAILED" in str(info.value) and "max size" in str(info.value)
    # The producer connection goes on (the server closed only the publishing channel).
    serving.canary()
    assert queue_messages(serving.ctx.vhost, [serving.queue])[serving.queue] == 0


def test_delay_past_the_limit_raises_value_error_at_send(serving, amqp_url):
    actor = serving.lw.broker.get_actor("fault_work_0")
    year = 366 * 24 * 3600 * 1000
    with pytest.raises(ValueError, match="max_delay"):
        actor.send_with_options(args=(1,), delay=year + 1)
    with pytest.raises(ValueError, match="delay"):
        actor.send_with_options(args=(1,), delay=-1)
    counts = queue_messages(serving.ctx.vhost, [f"{serving.queue}.DQ"])
    assert counts == {f"{serving.queue}.DQ": 0}
    # A broker with a smaller limit applies it.
    small = KombuBroker(url=amqp_url, max_delay=60_000)
    try:
        dramatiq.actor(lambda: None, broker=small, actor_name="small_limit",
                       queue_name=serving.queue)
        with pytest.raises(ValueError, match="60000"):
            small.get_actor("small_limit").send_with_options(delay=60_001)
    finally:
        small.close()
    serving.canary()


def test_bad_brokers_leave_no_connection_behind(vhost):
    names = [rabbit_admin.connection_name_of(c) or "" for c in
             rabbit_admin.list_connections(vhost)]
    assert [n for n in names if n.startswith("bad-")] == []
