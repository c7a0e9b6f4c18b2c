"""KombuBroker's producer channels: each publishing thread keeps one while it lives.

A lease per send made 64 sending threads queue on the pool's lock; a thread now keeps its
channel. These tests pin down what that must not cost: one channel per live sending thread,
none kept for threads that ended, and a fresh channel after an error closed the old one.
"""

from __future__ import annotations

import threading

import dramatiq
import pytest

from broker_helpers import Recorder, pool_in_use, run_bounded, unique, wait_until
from dramatiq_kombu_broker import QueueArgumentsMismatch
from stress import rabbit_admin

SENDERS = 8
SENDS = 50


def _producer_channels(env, vhost: str) -> int:
    return rabbit_admin.count_channels(vhost, connection_name=f"{env.connection_name}-producer")


def test_each_sending_thread_keeps_one_channel_and_an_ended_threads_channel_is_closed(env, vhost):
    broker = env.broker()
    queue = unique()

    @dramatiq.actor(broker=broker, queue_name=queue)
    def task(i):
        pass

    pool = broker.producer_connection.default_channel_pool
    start = threading.Barrier(SENDERS)
    sent = threading.Barrier(SENDERS + 1)
    finish = threading.Event()
    errors = Recorder()

    def sender(k: int) -> None:
        try:
            start.wait(10)
            for i in range(SENDS):
                task.send(k * SENDS + i)
        except BaseException as exc:  # noqa: BLE001 - the test reports it
            errors.add(repr(exc))
        sent.wait(30)
        finish.wait(30)

    threads = [threading.Thread(target=sender, args=(k,), daemon=True) for k in range(SENDERS)]
    for thread in threads:
        thread.start()
    try:
        sent.wait(30)
        assert errors.snapshot() == []
        # Every live sender holds exactly its own channel, on the server too.
        assert pool_in_use(pool) == SENDERS
        assert wait_until(lambda: _producer_channels(env, vhost) == SENDERS, timeout=10), (
            _producer_channels(env, vhost))
    finally:
        finish.set()
        for thread in threads:
            thread.join(10)
    # The ended threads' leases are gone; the next lease closes their channels on the server.
    assert pool_in_use(pool) == 0
    run_bounded(lambda: task.send(-1), 10, "a send from a new thread")
    assert wait_until(lambda: _producer_channels(env, vhost) == 1, timeout=10), (
        _producer_channels(env, vhost))
    assert broker.get_queue_message_counts(queue)[0] == SENDERS * SENDS + 1


def test_a_thread_whose_channel_an_error_closed_sends_on_a_new_one(env, vhost):
    queue, clash = unique(), unique()
    env.rabbitmq_broker().declare_queue(clash, ensure=True)  # without x-max-priority
    broker = env.broker(max_priority=10)

    @dramatiq.actor(broker=broker, queue_name=queue)
    def task(i):
        pass

    pool = broker.producer_connection.default_channel_pool

    def send_fail_send() -> None:
        task.send(1)
        # PRECONDITION_FAILED: the server closes the channel this thread sends on.
        with pytest.raises(QueueArgumentsMismatch):
            broker.get_queue_message_counts(clash)
        task.send(2)
        assert pool_in_use(pool) == 1

    run_bounded(send_fail_send, 15, "send, channel error, send")
    assert broker.get_queue_message_counts(queue)[0] == 2
    # The closed channel was given back and not kept: only the main thread's is open now.
    assert wait_until(lambda: _producer_channels(env, vhost) == 1, timeout=10), (
        _producer_channels(env, vhost))
