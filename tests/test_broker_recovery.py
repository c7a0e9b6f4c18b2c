"""Recovery in place and failover: a consumer consumes again on a new channel inside its own
``__next__`` after a loss, and every connect goes node after node through the failover list.

Against the real server (a refused port and a proxy stand in for other nodes); the policy is
pure logic and is tested without a socket.
"""

from __future__ import annotations

import random
import socket

import pytest

import rabbit_admin
from broker_helpers import close_connections_named, unique, wait_until
from dramatiq_kombu_broker import reconnect
from dramatiq_kombu_broker.reconnect import RecoveryPolicy, failover_order
from kombu_pyamqp_threadsafe.connection import Connection as ThreadSafeConnection
from transport_helpers import Proxy

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


def test_recovery_policy_needs_an_attempt():
    with pytest.raises(ValueError, match="attempts"):
        RecoveryPolicy(attempts=0)


# ---------------------------------------------------------------------------------- failover


def _refused_port() -> int:
    """A port nothing listens on (bound once, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


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
        assert close_connections_named(name, vhost, "test: node lost") == 1
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
