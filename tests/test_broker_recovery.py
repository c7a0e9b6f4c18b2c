"""Recovery in place and failover: a consumer consumes again on a new channel inside its own
``__next__`` after a loss, and every connect goes node after node through the failover list.

Against the real server (a refused port and a proxy stand in for other nodes); the policy is
pure logic and is tested without a socket.
"""

from __future__ import annotations

import logging
import random
import socket
import threading
import time
from types import SimpleNamespace

import amqp
import dramatiq
import pytest

from broker_helpers import (
    Recorder,
    close_connections_named,
    raw_channel,
    recording_actor,
    run_bounded,
    unique,
    wait_until,
)
from dramatiq_kombu_broker import consumer as consumer_module
from dramatiq_kombu_broker import reconnect
from dramatiq_kombu_broker.consumer import KombuConsumer
from dramatiq_kombu_broker.reconnect import RecoveryPolicy, failover_order, recovery_policy
from kombu_pyamqp_threadsafe.connection import Connection as ThreadSafeConnection
from stress import rabbit_admin
from transport_helpers import Proxy

DRAMATIQ_RESTART = "Consumer encountered a connection error"

# ------------------------------------------------------------------------------ pure logic


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_failover_order_starts_anywhere_and_keeps_the_given_order():
    urls = ["a", "b", "c", "d"]
    orders = {tuple(failover_order(urls, random.Random(seed))) for seed in range(200)}
    assert orders == {("a", "b", "c", "d"), ("b", "c", "d", "a"), ("c", "d", "a", "b"),
                      ("d", "a", "b", "c")}
    assert failover_order(["only"]) == ["only"]
    with pytest.raises(ValueError, match="no URL"):
        failover_order([])


def test_recovery_policy_first_attempt_at_once_then_doubling_pauses_up_to_a_cap():
    clock = FakeClock()
    policy = RecoveryPolicy(attempts=6, first_delay=0.1, max_delay=0.5, budget=60, clock=clock)
    assert not policy.recovering
    policy.lost()
    assert policy.recovering and policy.wait() == 0
    delays = []
    for _ in range(5):
        delay = policy.failed()
        assert delay is not None and policy.wait() == pytest.approx(delay)
        clock.now += delay
        delays.append(delay)
    assert delays == pytest.approx([0.1, 0.2, 0.4, 0.5, 0.5])
    assert policy.failed() is None  # the sixth attempt failed: give up
    assert not policy.recovering


def test_recovery_policy_gives_up_at_its_deadline_and_starts_afresh_after_success():
    clock = FakeClock()
    policy = RecoveryPolicy(attempts=100, first_delay=1, max_delay=1, budget=2.5, clock=clock)
    policy.lost()
    clock.now += 1.0
    assert policy.failed() == 1
    clock.now += 1.0
    assert policy.failed() == pytest.approx(0.5)  # never past the deadline
    clock.now += 0.5
    assert policy.failed() is None
    policy.lost()
    assert policy.failed() == 1 and policy.failures == 1
    policy.succeeded()
    assert not policy.recovering and policy.failures == 0
    policy.lost()
    policy.lost()  # a second loss during one recovery keeps its deadline
    clock.now += 2.5
    assert policy.failed() is None


def test_recovery_policy_takes_pikas_attempts_per_node_and_retry_delay():
    default = recovery_policy(1, 0.1, 1)  # pika's one attempt: still rides out a short outage
    assert (default.attempts, default.first_delay, default.max_delay) == (8, 0.1, 2.0)
    assert default.budget == 30
    patient = recovery_policy(5, 3.0, 3)  # five rounds over three nodes, 3 s apart at least
    assert (patient.attempts, patient.first_delay, patient.max_delay) == (15, 3.0, 3.0)
    assert patient.budget == 45


def test_recovery_policy_needs_an_attempt():
    with pytest.raises(ValueError, match="attempts"):
        RecoveryPolicy(attempts=0)


# ---------------------------------------------------------------------------------- failover


def _refused_port() -> int:
    """A port nothing listens on (bound once, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _close_connection(name: str, vhost: str) -> None:
    """Force-close the one connection called ``name`` (the server may list a new connection
    only a moment after it opened, so this asks again)."""
    assert wait_until(lambda: close_connections_named(name, vhost, "test: lost") == 1,
                      timeout=10), f"no connection {name} to close"


def _cut(connection) -> None:
    """The socket fails under ``connection`` (as a network reset does), at once: a
    rabbitmqctl close takes seconds to start on a loaded machine."""
    connection.connection.transport.sock.shutdown(socket.SHUT_RDWR)


def _url_at(amqp_url: str, port: int) -> str:
    return amqp_url.replace("127.0.0.1:5672", f"127.0.0.1:{port}")


def test_each_connection_starts_on_a_random_node(env, amqp_url):
    urls = [_url_at(amqp_url, port) for port in (5672, 5673, 5674)]
    broker = env.broker(url=urls)
    starts = {broker.settings.connection("consumer", confirm_publish=False).port
              for _ in range(60)}
    assert starts == {5672, 5673, 5674}


def test_failover_goes_node_after_node_on_every_connect_and_reconnect(
        env, vhost, amqp_url, monkeypatch):
    """Before the fix every connect stayed on the first URL (a refused port here): the broker
    never reached the second node; and a failover fell back to kombu's own transport."""
    refused = _refused_port()
    with Proxy() as proxy:
        urls = [_url_at(amqp_url, port) for port in (refused, 5672, proxy.port)]
        monkeypatch.setattr(reconnect.random, "randrange", lambda n: 0)  # start at the first
        broker = env.broker(url=urls, connect_timeout=2)
        queue = unique()
        producer = broker.producer_connection
        assert producer.port == refused

        broker.declare_queue(queue, ensure=True)  # refused, then the next node
        assert producer.port == 5672
        assert isinstance(producer.connection, ThreadSafeConnection)

        # A lost connection is opened again on the next node, not on the one it was lost on.
        name = f"{env.connection_name}-producer"
        _close_connection(name, vhost)
        wait_until(lambda: not producer.connected, timeout=10)
        broker.declare_queue(queue, ensure=True)
        assert producer.port == proxy.port and proxy.accepted == 1
        assert isinstance(producer.connection, ThreadSafeConnection)

        # And round again: the proxy's node is lost, the refused one is skipped.
        proxy.kill()
        wait_until(lambda: not producer.connected, timeout=10)
        broker.declare_queue(queue, ensure=True)
        assert producer.port == 5672
        assert rabbit_admin.count_connections(name, vhost=vhost) == 1


# --------------------------------------------------------------------------- recovery in place


def _consumers(worker) -> dict[str, KombuConsumer]:
    return {queue: thread.consumer for queue, thread in worker.consumers.items()}


def _restarts(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if DRAMATIQ_RESTART in r.getMessage()]


def test_consumer_recovers_in_place_after_its_connection_is_closed(env, vhost, caplog):
    """Before the fix the consumer raised ConnectionClosed to dramatiq's consumer thread, which
    logged it and restarted the consumer after its fixed 3 s."""
    caplog.set_level(logging.INFO)
    broker = env.broker()
    work, seen, queue = recording_actor(broker)
    worker = env.worker(broker, threads=8)
    for i in range(100):
        work.send(i)
    assert seen.wait_for(lambda items: len(set(items)) == 100, timeout=30)
    before = _consumers(worker)
    assert len(before) == 2

    name = f"{env.connection_name}-consumer"
    _close_connection(name, vhost)
    for i in range(100, 200):
        work.send(i)
    assert seen.wait_for(lambda items: len(set(items)) == 200, timeout=30), (
        sorted(set(range(200)) - set(seen.snapshot()))[:20])
    # Both consumers (q and q.DQ) recovered in place: the same objects, not restarted (a
    # restart logs DRAMATIQ_RESTART, waits 3 s and makes new consumers).
    assert _consumers(worker) == before
    assert all(consumer.recoveries == 1 for consumer in before.values())
    assert _restarts(caplog) == []
    assert rabbit_admin.count_connections(name, vhost=vhost) == 1


def test_acks_of_the_lost_channel_are_dropped_never_sent_on_the_new_one(env, vhost, caplog):
    caplog.set_level(logging.INFO)
    broker = env.broker()
    queue = unique()
    release = threading.Event()
    seen = Recorder()

    @dramatiq.actor(broker=broker, queue_name=queue, max_retries=0)
    def hold(tag):
        seen.add(tag)
        if tag == "held":
            release.wait(30)

    worker = env.worker(broker, threads=2)
    hold.send("held")
    assert seen.wait(1, timeout=15)
    consumer = _consumers(worker)[queue]
    old_channel = consumer.channel
    _cut(broker.consumer_connection)
    assert wait_until(lambda: consumer.recoveries == 1, timeout=15)
    assert consumer.channel is not old_channel
    release.set()  # its ack is for the lost channel: dropped, the server redelivers the message
    assert seen.wait_for(lambda items: items.count("held") == 2, timeout=15), seen.snapshot()
    assert wait_until(lambda: any("Dropped ack" in r.getMessage() for r in caplog.records),
                      timeout=15)
    # The new channel never saw a stray tag (the server would close it: PRECONDITION_FAILED).
    hold.send("after")
    assert seen.wait_for(lambda items: "after" in items, timeout=15)
    broker.join(queue, timeout=10_000)
    assert consumer.recoveries == 1 and consumer.channel.is_open


def test_one_new_connection_for_all_consumers_after_a_loss(env, vhost):
    broker = env.broker()
    queues = [unique() for _ in range(4)]
    seen = Recorder()
    for index, queue in enumerate(queues):
        dramatiq.actor(lambda i: seen.add(i), broker=broker, queue_name=queue,
                       actor_name=f"recover_{index}")
    worker = env.worker(broker, threads=4)
    assert wait_until(lambda: len(worker.consumers) == 8 and all(_consumers(worker).values()),
                      timeout=15)
    consumers = _consumers(worker)
    connection = broker.consumer_connection
    assert wait_until(lambda: connection.connected, timeout=10)
    opened = Recorder()
    establish = connection._establish_connection

    def counting():
        opened.add(threading.current_thread().name)
        return establish()

    connection._establish_connection = counting
    _cut(broker.consumer_connection)
    assert wait_until(lambda: all(c.recoveries == 1 for c in consumers.values()), timeout=15), (
        {q: c.recoveries for q, c in consumers.items()})
    assert len(opened) == 1, opened.snapshot()
    for index, queue in enumerate(queues):
        broker.enqueue(dramatiq.Message(queue_name=queue, actor_name=f"recover_{index}",
                                        args=(index,), kwargs={}, options={}))
    assert seen.wait_for(lambda items: set(items) == set(range(4)), timeout=15)
    assert rabbit_admin.count_connections(f"{env.connection_name}-consumer", vhost=vhost) == 1


def test_queue_deleted_under_a_running_worker_is_declared_again(env, vhost, amqp_url, caplog):
    """The server cancels the consumer of a deleted queue: it declares the queue again itself
    and consumes on, before any message is sent (dramatiq's restart took 3 s before)."""
    caplog.set_level(logging.INFO)
    broker = env.broker()
    work, seen, queue = recording_actor(broker)
    worker = env.worker(broker, threads=2)
    work.send(0)
    assert seen.wait(1, timeout=15)
    consumer = _consumers(worker)[queue]
    with raw_channel(amqp_url) as channel:
        channel.queue_delete(queue)
        connection = channel.connection

        def declared_again() -> bool:
            try:
                connection.channel().queue_declare(queue, passive=True)
            except amqp.exceptions.NotFound:
                return False
            return True

        assert wait_until(declared_again, timeout=10, interval=0.02)
    # Declared by the consumer's own recovery, in place: no restart by dramatiq.
    assert wait_until(lambda: consumer.recoveries == 1, timeout=10)
    assert _consumers(worker)[queue] is consumer
    assert any("cancelled the consumer" in r.getMessage() and queue in r.getMessage()
               for r in caplog.records)
    for i in range(1, 11):
        work.send(i)
    assert seen.wait_for(lambda items: set(range(11)) <= set(items), timeout=15)
    assert _restarts(caplog) == []


def test_worker_stops_promptly_while_its_consumers_cannot_reconnect(env, vhost, amqp_url, caplog,
                                                                   monkeypatch):
    """A consumer that cannot reconnect waits between attempts at most its timeout, and makes
    no new attempt once the worker stops (before: dramatiq slept its 3 s restart delay)."""
    caplog.set_level(logging.INFO)
    proxy = Proxy()
    try:
        broker = env.broker(url=_url_at(amqp_url, proxy.port), connect_timeout=2)
        queue = unique()
        dramatiq.actor(lambda: None, broker=broker, queue_name=queue, actor_name="idle")
        worker = env.worker(broker, threads=2)
        connection = broker.consumer_connection
        assert wait_until(lambda: len(worker.consumers) == 2 and all(
            c is not None and c.channel.is_open for c in _consumers(worker).values()),
            timeout=10)
        refused = Recorder()
        establish = connection._establish_connection

        def failing():
            try:
                return establish()
            except OSError as exc:
                refused.add(exc)
                raise

        pauses = Recorder()

        def sleep(seconds):
            pauses.add(seconds)
            time.sleep(seconds)

        monkeypatch.setattr(consumer_module, "time", SimpleNamespace(**{**vars(time),
                                                                       "sleep": sleep}))
        connection._establish_connection = failing
        proxy.close()  # the listener goes: every reconnect is refused
        # Three refusals each: the pause due after the second (0.2 s) is longer than the
        # consumers' timeout (0.1 s).
        assert refused.wait(6, timeout=15)
        # A bound far above the consumers' 0.1 s pauses and below their recovery (about 7 s of
        # pauses, then dramatiq's restart after 3 s).
        env.stop_worker(worker, timeout=20)
        assert [t.name for t in worker.consumers.values() if t.is_alive()] == []
        timeout = worker.worker_timeout / 1000
        assert pauses.snapshot() and max(pauses.snapshot()) <= timeout, pauses.snapshot()
        assert _restarts(caplog) == []
    finally:
        proxy.close()


def test_consumer_that_cannot_reconnect_within_its_bound_raises_connection_closed(env):
    """__next__ returns within about its timeout while it retries, then gives up to dramatiq."""
    proxy = Proxy()
    try:
        broker = env.broker(url=_url_at(env.amqp_url, proxy.port), connect_timeout=2)
        queue = unique()
        broker.declare_queue(queue)
        consumer = broker.consume(queue, prefetch=1, timeout=200)
        consumer._policy = RecoveryPolicy(attempts=3, first_delay=0.3, max_delay=0.3)
        proxy.close()
        durations = []
        with pytest.raises(dramatiq.errors.ConnectionClosed, match="refused"):
            for _ in range(100):
                started = time.monotonic()
                try:
                    assert next(consumer) is None
                finally:
                    durations.append(time.monotonic() - started)
        assert consumer._policy.failures == 3 and not consumer._policy.recovering
        assert max(durations) < 1.0, durations
        assert len(durations) >= 4  # the pauses were waited out over several calls
        consumer.close()
    finally:
        proxy.close()


def test_delayed_messages_of_the_lost_channel_are_not_enqueued_twice(env, vhost):
    """The consumer thread's delayed messages came from the lost channel, which the server
    redelivers: kept, each would be enqueued when due AND again when its copy is due."""
    broker = env.broker()
    work, seen, queue = recording_actor(broker)
    worker = env.worker(broker, threads=2)
    assert wait_until(lambda: all(_consumers(worker).values()) and len(worker.consumers) == 2,
                      timeout=15)
    delay_thread = worker.consumers[f"{queue}.DQ"]
    consumer = delay_thread.consumer
    work.send_with_options(args=("late",), delay=2000)
    assert wait_until(lambda: delay_thread.delay_queue.qsize() == 1, timeout=10)
    _cut(broker.consumer_connection)
    assert wait_until(lambda: consumer.recoveries == 1, timeout=10)
    assert wait_until(lambda: delay_thread.delay_queue.qsize() == 1, timeout=10)  # its copy
    assert seen.wait(1, timeout=15)
    run_bounded(worker.join, 15, "worker.join()")
    assert seen.snapshot() == ["late"]
