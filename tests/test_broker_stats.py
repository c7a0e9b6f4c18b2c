"""broker.stats() and the Prometheus collector count what a workload did, on the real server."""

from __future__ import annotations

import threading
from typing import Any

import amqp
import dramatiq
import pytest
from amqp.exceptions import MessageNacked
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from broker_helpers import (
    BrokerEnv,
    Recorder,
    close_connections_named,
    delete_queues,
    recording_actor,
    unique,
    wait_until,
)
from dramatiq_kombu_broker.metrics import KombuBrokerCollector
from kombu_pyamqp_threadsafe import ConnectionStats, connection_stats
from transport_helpers import Worker, join_all, start_all


def test_stats_add_up_across_connections_except_what_describes_the_current_one() -> None:
    earlier = ConnectionStats(server="a:1", state="failed", published=3, confirmed=2, blocks=1,
                              channels=4)
    now = ConnectionStats(server="b:2", state="open", published=1, confirmed=1, channels=1)
    total = now.plus(earlier)
    assert (total.published, total.confirmed, total.blocks) == (4, 3, 1)
    assert (total.server, total.state, total.channels) == ("b:2", "open", 1)


def test_confirmed_sends_from_many_threads_are_counted_exactly(env: BrokerEnv) -> None:
    broker = env.broker()
    queue = unique()

    @dramatiq.actor(broker=broker, queue_name=queue)
    def task(i: int) -> None:
        pass

    threads, per_thread = 8, 25
    start = threading.Barrier(threads)

    def sender() -> None:
        start.wait(10)
        for i in range(per_thread):
            task.send(i)

    senders = start_all([Worker(sender) for _ in range(threads)])
    assert join_all(senders, 60) == []
    assert [repr(w.error) for w in senders if w.error is not None] == []
    sent = threads * per_thread
    producer = broker.stats()["producer"]
    assert (producer.published, producer.confirmed, producer.nacked) == (sent, sent, 0)
    assert producer.returned == producer.deliveries == producer.reconnects == 0
    assert producer.state == "open" and 1 <= producer.channels <= threads
    assert producer.server == "127.0.0.1:5672" or producer.server.endswith(":5672")
    assert producer.cluster_name and producer.server_version
    assert not producer.blocked


def test_a_worker_counts_deliveries_acks_and_rejects(env: BrokerEnv) -> None:
    broker = env.broker()
    queue = unique()
    done = Recorder()

    @dramatiq.actor(broker=broker, queue_name=queue, max_retries=0)
    def task(fail: bool) -> None:
        done.add(fail)
        if fail:
            raise RuntimeError("rejected on purpose")

    handled = 12
    for i in range(handled):
        task.send(i == 0)
    env.worker(broker, threads=4)
    assert done.wait(handled, 20)

    def settled() -> ConnectionStats | None:
        consumer = broker.stats()["consumer"]
        return consumer if consumer.acks + consumer.rejects == handled else None

    consumer = wait_until(settled, 10)
    assert consumer, broker.stats()["consumer"]
    assert (consumer.deliveries, consumer.acks, consumer.rejects) == (handled, handled - 1, 1)
    assert consumer.published == 0  # the consumer connection never publishes
    assert consumer.state == "open" and consumer.channels >= 1


def test_a_mandatory_publish_to_a_missing_queue_is_counted_as_returned(
        env: BrokerEnv, amqp_url: str) -> None:
    broker = env.broker()
    task, _, queue = recording_actor(broker, record=lambda: None)
    task.send()
    delete_queues(amqp_url, queue, f"{queue}.DQ", f"{queue}.XQ")
    task.send()  # returned unroutable, then declared again and sent again
    producer = broker.stats()["producer"]
    assert producer.returned == 1
    assert producer.published == 3
    assert producer.confirmed == 2
    assert broker.get_queue_message_counts(queue)[0] == 1


def test_a_publish_the_server_nacks_is_counted_as_nacked(connect: Any) -> None:
    conn = connect(transport_options={"confirm_publish": True})
    queue = unique()
    with conn.default_channel_pool.acquire() as channel:
        # A full queue that refuses publishes: the server nacks them.
        channel.queue_declare(queue, auto_delete=True,
                              arguments={"x-max-length": 0, "x-overflow": "reject-publish"})
        with pytest.raises(MessageNacked):
            channel.basic_publish(amqp.Message(b"refused"), routing_key=queue)
        channel.basic_publish(amqp.Message(b"accepted"), routing_key="")  # no queue takes it
    stats = connection_stats(conn.connection)
    assert (stats.published, stats.nacked, stats.confirmed) == (2, 1, 1)


def test_a_confirm_counted_as_its_connection_is_collected_is_kept(connect: Any) -> None:
    """The owner counts a confirm once its wait for it returns. The connection can be
    collected in between by another thread (the reader's teardown when the connection is lost,
    close() from another thread): collect() had moved the channel's counts to the connection's
    totals, and the count went to a channel no stats read any more."""
    conn = connect(transport_options={"confirm_publish": True})
    amqp_connection = conn.connection
    channel = conn.default_channel
    real_wait = channel._wait_for_confirm

    def wait_then_collected(seq: int, timeout: float | None) -> None:
        real_wait(seq, timeout)
        collector = Worker(amqp_connection.collect)
        start_all([collector])
        assert join_all([collector], 10) == [] and collector.error is None

    channel._wait_for_confirm = wait_then_collected
    channel.basic_publish(amqp.Message(b"confirmed"), routing_key="")
    stats = connection_stats(amqp_connection)
    assert (stats.state, stats.published, stats.confirmed) == ("closed", 1, 1)


def test_a_forced_close_counts_a_reconnect_and_keeps_the_counts(
        env: BrokerEnv, vhost: str) -> None:
    broker = env.broker()
    task, _, queue = recording_actor(broker, record=lambda: None)
    task.send()
    before = broker.stats()["producer"]
    assert before.reconnects == 0
    assert close_connections_named(f"{env.connection_name}-producer", vhost, "test: stats") == 1
    assert wait_until(lambda: broker.stats()["producer"].state == "failed", 10)
    task.send()
    after = broker.stats()["producer"]
    assert after.reconnects == 1
    assert after.state == "open"
    assert after.confirmed == before.confirmed + 1
    assert after.published >= before.published + 1


def test_undispatched_counts_deliveries_waiting_for_their_owner(env: BrokerEnv) -> None:
    broker = env.broker()
    queue = unique()

    @dramatiq.actor(broker=broker, queue_name=queue)
    def task() -> None:
        pass

    waiting = 5
    for _ in range(waiting):
        task.send()
    consumer = broker.consume(queue, prefetch=waiting, timeout=1000)
    try:
        # The server pushes the prefetched deliveries; nobody drains them yet.
        assert wait_until(lambda: broker.stats()["consumer"].undispatched == waiting, 10), \
            broker.stats()["consumer"]
        message = next(consumer)
        assert message is not None
        consumer.ack(message)
        assert broker.stats()["consumer"].undispatched < waiting
    finally:
        consumer.close()


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


def _samples(registry: CollectorRegistry) -> dict[tuple[str, str], float]:
    text = generate_latest(registry).decode()
    return {
        (sample.name, sample.labels.get("connection_role", "")): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_the_prometheus_collector_exposes_the_counts(env: BrokerEnv,
                                                    registry: CollectorRegistry) -> None:
    broker = env.broker()
    registry.register(KombuBrokerCollector(broker))
    task, done, queue = recording_actor(broker, record=lambda: 1)
    sent = 5
    for _ in range(sent):
        task.send()
    env.worker(broker, threads=2)
    assert done.wait(sent, 20)
    assert wait_until(lambda: broker.stats()["consumer"].acks == sent, 10)
    samples = _samples(registry)
    assert samples[("messaging_client_sent_messages_total", "producer")] == sent
    assert samples[("dramatiq_kombu_confirmed_messages_total", "producer")] == sent
    assert samples[("messaging_client_consumed_messages_total", "consumer")] == sent
    assert samples[("dramatiq_kombu_acked_messages_total", "consumer")] == sent
    assert samples[("dramatiq_kombu_rejected_messages_total", "consumer")] == 0
    assert samples[("dramatiq_kombu_reconnects_total", "producer")] == 0
    assert samples[("dramatiq_kombu_connection_blocked", "producer")] == 0
    assert samples[("dramatiq_kombu_channels", "producer")] == 1
    assert samples[("dramatiq_kombu_connection_info", "producer")] == 1
    text = generate_latest(registry).decode()
    assert 'messaging_system="rabbitmq"' in text
    assert 'state="open"' in text
