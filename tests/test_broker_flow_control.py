"""Flow control: a send during a resource alarm fails within blocked_timeout, naming the reason.

The FlowControl units run without a server; the rest raises real alarms on the real server
(``alarm_helpers``: short windows, limits restored in a ``finally``).
"""

from __future__ import annotations

import logging
import threading
import time

import dramatiq
import pytest
from dramatiq.errors import ConnectionClosed

from alarm_helpers import resource_alarm
from broker_helpers import BrokerEnv, raw_channel, run_bounded, unique, wait_until
from kombu_pyamqp_threadsafe.flow import FlowControl, PublishBlockedError

#: Slack over blocked_timeout for a send to come back (rabbitmqctl and a loaded machine).
SLACK = 1.5
FLOW_LOGGER = "kombu_pyamqp_threadsafe.flow"


# -- FlowControl without a server -----------------------------------------------------------

def test_open_flow_does_not_wait_or_bound() -> None:
    flow = FlowControl("host", timeout=0.0)
    flow.wait_before_write()
    assert flow.bound_confirm_wait(None) is None
    assert flow.bound_confirm_wait(3.0) == 3.0


def test_blocked_flow_raises_with_the_reason_after_the_timeout() -> None:
    flow = FlowControl("host", timeout=0.05)
    assert flow.block("low on memory")
    assert not flow.block("low on memory")  # a second notification starts no new block
    started = time.monotonic()
    with pytest.raises(PublishBlockedError, match="low on memory") as info:
        # A bound far above the 0.05 s: a wait that ignored the timeout would go on for ever.
        run_bounded(flow.wait_before_write, 30, "wait_before_write()")
    assert time.monotonic() - started >= 0.05  # it did wait (a lower bound load cannot break)
    assert info.value.reason == "low on memory"
    assert flow.blocks == 1


def test_a_publish_timeout_shorter_than_blocked_timeout_bounds_the_wait() -> None:
    flow = FlowControl("host", timeout=30.0)
    flow.block("low on disk")
    with pytest.raises(PublishBlockedError, match="low on disk"):
        # Returned well before blocked_timeout (30 s): the publish timeout bounded the wait.
        run_bounded(lambda: flow.wait_before_write(0.05), 15, "wait_before_write(0.05)")


@pytest.mark.parametrize("release", ["unblock", "end"])
def test_a_waiting_publisher_is_woken_by_unblock_and_by_the_connection_ending(
        release: str) -> None:
    flow = FlowControl("host", timeout=None)
    flow.block("low on memory")
    waiting = threading.Event()
    done = threading.Event()

    def publisher() -> None:
        waiting.set()
        flow.wait_before_write()
        done.set()

    thread = threading.Thread(target=publisher, daemon=True)
    thread.start()
    assert waiting.wait(5)
    assert not done.wait(0.05)
    getattr(flow, release)()
    assert done.wait(5)
    thread.join(5)


def test_reply_wait_is_bounded_from_the_start_of_the_block() -> None:
    flow = FlowControl("host", timeout=10.0)
    flow.block("low on memory")
    bound = flow.bound_confirm_wait(None)
    assert bound is not None and 9.0 < bound <= 10.0
    assert flow.bound_confirm_wait(1.0) == 1.0
    flow.since -= 11.0  # the block began 11 s ago
    with pytest.raises(PublishBlockedError, match="low on memory"):
        flow.bound_confirm_wait(None)
    flow.unblock()
    assert flow.bound_confirm_wait(None) is None


def test_block_and_unblock_log_once_each(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=FLOW_LOGGER)
    flow = FlowControl("rabbit:5672", timeout=1.0)
    flow.block("low on memory")
    flow.block("low on memory")
    flow.unblock()
    flow.unblock()
    messages = [r.getMessage() for r in caplog.records if r.name == FLOW_LOGGER]
    assert len(messages) == 2
    assert "blocks publishing" in messages[0] and "low on memory" in messages[0]
    assert "rabbit:5672" in messages[0]
    assert "unblocked" in messages[1]


def test_a_negative_blocked_timeout_is_refused(env: BrokerEnv) -> None:
    with pytest.raises(ValueError, match="blocked_timeout"):
        env.broker(blocked_timeout=-1)


# -- real alarms ---------------------------------------------------------------------------

def _flow_messages(caplog: pytest.LogCaptureFixture, text: str) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == FLOW_LOGGER and text in r.getMessage()]


def _timed_send(actor: dramatiq.Actor) -> tuple[BaseException | None, float]:
    """Send once (bounded: a hang fails the test, inside the alarm's window)."""
    started = time.monotonic()
    try:
        run_bounded(actor.send, 15, "send during an alarm")
    except ConnectionClosed as exc:
        return exc, time.monotonic() - started
    return None, time.monotonic() - started


def test_memory_alarm_send_fails_in_time_and_the_consumer_keeps_acking(
        env: BrokerEnv, amqp_url: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=FLOW_LOGGER)
    blocked_timeout = 1.5
    broker = env.broker(blocked_timeout=blocked_timeout)
    queue_name, work_queue = unique(), unique()

    @dramatiq.actor(queue_name=queue_name, broker=broker)
    def send_me() -> None:
        pass

    @dramatiq.actor(queue_name=work_queue, broker=broker)
    def queued() -> None:
        pass

    @dramatiq.actor(queue_name=unique(), broker=broker)
    def to_a_new_queue() -> None:
        pass

    send_me.send()  # the producer connection is open and has published
    queued_count = 5
    for _ in range(queued_count):
        queued.send()
    consumer = broker.consume(work_queue, prefetch=queued_count, timeout=2000)
    try:
        with resource_alarm("memory"):
            # The first send is read by the server, which then blocks the connection: its
            # confirm does not come, and the wait for it is bounded.
            first, first_took = _timed_send(send_me)
            # The connection is blocked now: the next send waits before it writes.
            second, second_took = _timed_send(send_me)
            # A new queue: its declare would wait for a reply the server does not send now.
            third, third_took = _timed_send(to_a_new_queue)
            # The consumer connection never publishes: it is not blocked.
            received = []
            for _ in range(queued_count * 3):  # None when a wait times out (2 s)
                message = next(consumer)
                if message is not None:
                    received.append(message)
                    consumer.ack(message)
                    if len(received) == queued_count:
                        break
            consumer.close()
            with raw_channel(amqp_url) as channel:
                _, ready, _ = channel.queue_declare(work_queue, passive=True)
        assert first is not None and "low on memory" in str(first), first
        assert second is not None and "low on memory" in str(second), second
        assert first_took < blocked_timeout + SLACK, first_took
        assert blocked_timeout <= second_took < blocked_timeout + SLACK, second_took
        assert third is not None and "low on memory" in str(third), third
        assert blocked_timeout <= third_took < blocked_timeout + SLACK, third_took
        assert len(received) == queued_count
        assert ready == 0  # the acks reached the server: closing requeued nothing
        assert len(_flow_messages(caplog, "blocks publishing")) == 1
        assert wait_until(lambda: _flow_messages(caplog, "unblocked"), 15)
        send_me.send()  # works again once the alarm cleared
        to_a_new_queue.send()
        assert len(_flow_messages(caplog, "unblocked")) == 1
        assert len(_flow_messages(caplog, "blocks publishing")) == 1
    finally:
        consumer.close()


def test_disk_alarm_send_fails_naming_the_reason(
        env: BrokerEnv, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=FLOW_LOGGER)
    blocked_timeout = 1.0
    broker = env.broker(blocked_timeout=blocked_timeout, confirm_delivery=False)
    queue_name = unique()

    @dramatiq.actor(queue_name=queue_name, broker=broker)
    def send_me() -> None:
        pass

    send_me.send()
    with resource_alarm("disk"):
        # Without confirms the first send is written and returns; the server blocks the
        # connection as it reads it, and a send or two may cross its notification.
        error, took = None, 0.0
        for _ in range(20):
            error, took = _timed_send(send_me)
            if error is not None:
                break
    assert error is not None, "no send failed during the disk alarm"
    assert "low on disk" in str(error), error
    assert took < blocked_timeout + SLACK, took
    assert wait_until(lambda: _flow_messages(caplog, "unblocked"), 15)
    send_me.send()
