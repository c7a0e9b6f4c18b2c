"""A confirm that never comes must not hold a sender: ``confirm_timeout`` bounds the wait.

On a cluster, a publish to a quorum queue whose leader node hangs (SIGSTOP) reaches a healthy
node, which holds the confirm until the cluster has a new leader (about net_ticktime, 60 s);
heartbeats on the client's own connection keep arriving, so only a bound on the confirm wait
ends the send. Here a bound shorter than any round trip stands in for the missing confirm.
"""

from __future__ import annotations

import time

import dramatiq
import pytest
from dramatiq.errors import ConnectionClosed

from broker_helpers import BrokerEnv, run_bounded, unique


def test_a_confirm_that_does_not_come_in_time_fails_the_send(env: BrokerEnv) -> None:
    broker = env.broker(confirm_timeout=1e-6)

    @dramatiq.actor(broker=broker, queue_name=unique())
    def task() -> None:
        pass

    def send() -> float:
        started = time.monotonic()
        with pytest.raises(ConnectionClosed, match="timed out"):
            task.send()
        return time.monotonic() - started

    took = run_bounded(send, 30, "send whose confirms time out")
    # Retried within the connect budget (10 s), each attempt on a fresh channel.
    assert took < 20, took


def test_the_default_confirm_timeout_lets_a_send_through(env: BrokerEnv) -> None:
    broker = env.broker()
    queue = unique()
    assert broker.settings.confirm_timeout == 30.0

    @dramatiq.actor(broker=broker, queue_name=queue)
    def task() -> None:
        pass

    task.send()
    assert broker.get_queue_message_counts(queue)[0] == 1


@pytest.mark.parametrize("value", [0, -1, "5", True])
def test_a_bad_confirm_timeout_is_refused(env: BrokerEnv, value: object) -> None:
    with pytest.raises(ValueError, match="confirm_timeout"):
        env.broker(confirm_timeout=value)
