"""A reply that never comes must not hold a sender (``confirm_timeout``) or a consumer
subscribing (``connect_timeout``).

On a cluster, a publish to a quorum queue whose leader node hangs (SIGSTOP) reaches a healthy
node, which holds the confirm until the cluster has a new leader (about net_ticktime, 60 s);
heartbeats on the client's own connection keep arriving, so only a bound on the confirm wait
ends the send. Here the channel never counts its confirms (its ack handler does nothing), or a
proxy stops forwarding: a bound shorter than any round trip would not do on a loaded machine,
where the ack may arrive before the sender starts to wait.
"""

from __future__ import annotations

from contextlib import suppress

import amqp
import dramatiq
import pytest
from dramatiq.errors import ConnectionClosed

from broker_helpers import BrokerEnv, run_bounded, unique
from kombu_pyamqp_threadsafe import channel as ts_channel
from transport_helpers import Proxy, kombu_connection, url_for


def test_a_confirm_that_does_not_come_in_time_fails_the_send(env: BrokerEnv,
                                                             monkeypatch: pytest.MonkeyPatch,
                                                             ) -> None:
    monkeypatch.setattr(ts_channel.Channel, "_on_confirm_ack", lambda self, tag, multiple: None)
    broker = env.broker(confirm_timeout=0.2)

    @dramatiq.actor(broker=broker, queue_name=unique())
    def task() -> None:
        pass

    def send() -> None:
        with pytest.raises(ConnectionClosed, match="timed out"):
            task.send()

    # confirm_timeout bounds the whole send, its retries included (each attempt on a fresh
    # channel); a send that waited for the confirm (none comes in time) or retried without end
    # would hang.
    run_bounded(send, 60, "send whose confirms time out")


def test_the_default_confirm_timeout_lets_a_send_through(env: BrokerEnv) -> None:
    broker = env.broker()
    queue = unique()
    assert broker.settings.confirm_timeout == 10.0

    @dramatiq.actor(broker=broker, queue_name=queue)
    def task() -> None:
        pass

    task.send()
    assert broker.get_queue_message_counts(queue)[0] == 1


@pytest.mark.parametrize("value", [0, -1, "5", True])
def test_a_bad_confirm_timeout_is_refused(env: BrokerEnv, value: object) -> None:
    with pytest.raises(ValueError, match="confirm_timeout"):
        env.broker(confirm_timeout=value)


def test_a_channel_whose_confirm_timed_out_closes_without_waiting(vhost, connection_name,
                                                                  monkeypatch):
    """The server holds the confirm (here a proxy that stops forwarding, heartbeats off): it may
    hold the Close-Ok as long, so close() must not wait for it (before: CLOSE_OK_TIMEOUT, 5 s,
    per discarded channel, on top of the confirm timeout)."""
    with Proxy() as proxy:
        conn = kombu_connection(url_for(vhost, proxy.port), connection_name, heartbeat=0,
                                transport_options={"confirm_publish": True})
        try:
            conn.ensure_connection(max_retries=3)
            channel = conn.channel()
            queue = channel.queue_declare("", exclusive=True).queue
            channel.basic_publish(amqp.Message(b"x"), routing_key=queue)  # confirm.select done
            proxy.pause()
            with pytest.raises(TimeoutError):
                channel.basic_publish(amqp.Message(b"x"), routing_key=queue, confirm_timeout=0.5)
            # Far longer than the bound below: a close that waited for the Close-Ok would hang.
            monkeypatch.setattr(ts_channel, "CLOSE_OK_TIMEOUT", 60.0)
            with suppress(OSError):
                run_bounded(channel.close, 30, "close() of a channel whose confirm timed out")
            assert not channel.is_open
        finally:
            conn.collect()


def test_a_send_to_a_silent_server_is_bounded_by_confirm_timeout(env: BrokerEnv, vhost) -> None:
    """A server that stops answering with its socket open (a SIGSTOPped cluster node; here a
    proxy that stops forwarding, heartbeats off) holds every reply, not only the confirm: a
    send from a thread without a channel waits for Channel.Open-Ok, one whose queue must be
    declared again for Declare-Ok. confirm_timeout bounds those waits too (before: they waited
    until heartbeats declared the connection lost, with heartbeats off forever)."""
    with Proxy() as proxy:
        broker = env.broker(url=url_for(vhost, proxy.port), heartbeat=0, confirm_timeout=0.5,
                            connect_timeout=1)
        queue = unique()

        @dramatiq.actor(broker=broker, queue_name=queue)
        def task() -> None:
            pass

        task.send()  # connected, this thread's channel leased, the queues declared
        proxy.pause()

        def send() -> None:
            with pytest.raises(ConnectionClosed, match="timed out"):
                task.send()

        run_bounded(send, 30, "send from a thread without a channel (Open-Ok held)")
        broker.forget_queue(queue)
        run_bounded(send, 30, "send whose queue is declared again (Declare-Ok held)")


def test_a_consumer_whose_server_answers_nothing_gives_up_within_connect_timeout(
        env: BrokerEnv, vhost) -> None:
    """Subscribing waits for Open-Ok, Declare-Ok, Qos-Ok and Consume-Ok. A quorum queue's
    basic.consume waits on the server for the queue's leader, and after the leader's node hung
    the server held it a minute past the thaw; each reply now comes within connect_timeout or
    the attempt fails, and the next attempt opens a new channel (before: it waited until
    heartbeats declared the connection lost, with heartbeats off forever)."""
    with Proxy() as proxy:
        broker = env.broker(url=url_for(vhost, proxy.port), heartbeat=0, connect_timeout=1)
        queue = unique()
        broker.declare_queue(queue, ensure=True)
        broker.connect(broker.consumer_connection)  # only the replies are missing, not the
        proxy.pause()                                 # handshake (connect_timeout bounds it)

        def consume() -> None:
            with pytest.raises(ConnectionClosed, match="timed out"):
                broker.consume(queue)

        run_bounded(consume, 30, "consumer subscribing to a silent server")
