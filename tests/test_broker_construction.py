"""KombuBroker construction and queue topology, against the real RabbitMQ.

Construction: invalid options fail at once, naming the argument; a broker opens no connection
until it is used; its repr never shows a password. Topology: the queues are exactly those
RabbitmqBroker declares, so either broker can take over the other's queues.
"""

from __future__ import annotations

import dramatiq
import pytest

from broker_helpers import DEAD_MESSAGE_TTL, unique
from dramatiq_kombu_broker import KombuBroker, QueueArgumentsMismatch
from stress import rabbit_admin

# ---------------------------------------------------------------------------- invalid options


@pytest.mark.parametrize(
    ("options", "argument"),
    [
        ({"max_priority": 0}, "max_priority"),
        ({"max_priority": 256}, "max_priority"),
        ({"max_priority": -1}, "max_priority"),
        ({"heartbeat": -1}, "heartbeat"),
        ({"prefetch": 0}, "prefetch"),
        ({"prefetch": 65536}, "prefetch"),
        ({"delay_prefetch": 0}, "delay_prefetch"),
        ({"connect_timeout": -1}, "connect_timeout"),
        ({"confirm_delivery": "yes"}, "confirm_delivery"),
        ({"queue_arguments": [("x-queue-type", "classic")]}, "queue_arguments"),
    ],
)
def test_invalid_option_raises_value_error_naming_it(options, argument):
    with pytest.raises(ValueError, match=argument):
        KombuBroker(url="amqp://guest:guest@127.0.0.1:5672/", **options)


def test_unknown_keyword_raises_type_error_naming_it():
    with pytest.raises(TypeError, match="no_such_option"):
        KombuBroker(url="amqp://guest:guest@127.0.0.1:5672/", no_such_option=1)


@pytest.mark.parametrize(
    "url",
    [
        "localhost:5672",
        "http://guest:s3cr3t@127.0.0.1:5672/",
        "redis://:s3cr3t@127.0.0.1:6379/0",
        "sqs://key:s3cr3t@",
        "amqp://guest:guest@127.0.0.1:5672/;http://guest:s3cr3t@127.0.0.1/",
    ],
)
def test_url_that_is_not_amqp_raises_value_error_naming_url(url):
    """The check must not hand the URL to kombu first: for an unknown scheme kombu raises
    KeyError, for a known non-AMQP one it imports that transport (ImportError, AttributeError)."""
    with pytest.raises(ValueError, match="url") as info:
        KombuBroker(url=url)
    assert "s3cr3t" not in str(info.value)


def test_url_of_wrong_type_raises_value_error():
    with pytest.raises(ValueError, match="url"):
        KombuBroker(url=5672)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------ laziness


def test_construction_and_declaration_open_no_connection(env, server_connections):
    broker = env.broker()
    name = env.connection_name
    queue = unique()
    broker.declare_queue(queue)

    @dramatiq.actor(broker=broker, queue_name=queue)
    def noop():
        pass

    assert queue in broker.get_declared_queues()
    assert f"{queue}.DQ" in broker.get_declared_delay_queues()
    assert server_connections(f"{name}-consumer") == 0
    assert server_connections(f"{name}-producer") == 0

    # The first send opens the producer connection only; consuming is what opens the other.
    noop.send()
    assert server_connections.wait(f"{name}-producer", 1) == 1
    assert server_connections(f"{name}-consumer") == 0


def test_close_twice_and_close_unused_broker(env, server_connections):
    unused = env.broker()
    unused.close()
    unused.close()
    broker = env.broker()
    queue = unique()
    broker.declare_queue(queue, ensure=True)
    assert server_connections.wait(f"{env.connection_name}-2-producer", 1) == 1
    broker.close()
    broker.close()
    assert server_connections.wait(f"{env.connection_name}-2-producer", 0) == 0


# ------------------------------------------------------------------------------------ secrets


@pytest.mark.parametrize(
    "url",
    [
        "amqp://guest:guest@127.0.0.1:5672/",
        "amqp://admin:s3cr3t@127.0.0.1:5672/vh",
        "amqp://admin:s3cr3t@host-a:5672/vh;amqp://admin:s3cr3t@host-b:5672/vh",
        ["amqp://admin:s3cr3t@host-a:5672/vh", "amqps://admin:s3cr3t@host-b:5671/vh"],
    ],
)
def test_repr_and_str_never_contain_the_password(url):
    broker = KombuBroker(url=url)
    try:
        for text in (repr(broker), str(broker), repr(broker.settings.masked_url)):
            assert "guest:guest" not in text
            assert "s3cr3t" not in text
            assert "KombuBroker" in text or "amqp" in text
    finally:
        broker.close()


# ----------------------------------------------------------------------------------- topology


def _expected_arguments(queue: str, max_priority: int | None) -> dict:
    arguments = {"x-dead-letter-exchange": "", "x-dead-letter-routing-key": f"{queue}.XQ"}
    if max_priority:
        arguments["x-max-priority"] = max_priority
    return arguments


@pytest.mark.parametrize("max_priority", [None, 10])
def test_topology_is_rabbitmq_brokers(env, vhost, max_priority):
    queue = unique()
    broker = env.broker(max_priority=max_priority)
    broker.declare_queue(queue, ensure=True)

    rows = rabbit_admin.queue_details(vhost)
    ours = {name: row for name, row in rows.items() if name.startswith(queue)}
    assert sorted(ours) == [queue, f"{queue}.DQ", f"{queue}.XQ"]
    for name in (queue, f"{queue}.DQ"):
        assert ours[name]["durable"] is True
        assert ours[name]["arguments"] == _expected_arguments(queue, max_priority)
    assert ours[f"{queue}.XQ"]["durable"] is True
    assert ours[f"{queue}.XQ"]["arguments"] == {"x-message-ttl": DEAD_MESSAGE_TTL}

    # The reference broker accepts the queues as they are (a difference would be a 406).
    reference = env.rabbitmq_broker(max_priority=max_priority)
    reference.declare_queue(queue, ensure=True)
    assert reference.get_queue_message_counts(queue) == (0, 0, 0)

    # And the other way round: KombuBroker takes over queues RabbitmqBroker created.
    other = unique()
    reference.declare_queue(other, ensure=True)
    second = env.broker(max_priority=max_priority)
    second.declare_queue(other, ensure=True)
    assert second.get_queue_message_counts(other) == (0, 0, 0)


def test_queue_arguments_extend_the_topology(env, vhost):
    queue = unique()
    broker = env.broker(queue_arguments={"x-queue-mode": "lazy"})
    broker.declare_queue(queue, ensure=True)
    rows = rabbit_admin.queue_details(vhost)
    expected = {**_expected_arguments(queue, None), "x-queue-mode": "lazy"}
    assert rows[queue]["arguments"] == expected
    assert rows[f"{queue}.DQ"]["arguments"] == expected
    assert rows[f"{queue}.XQ"]["arguments"] == {"x-message-ttl": DEAD_MESSAGE_TTL}


def test_existing_queue_with_other_arguments_raises_mismatch_naming_it(env):
    queue = unique()
    reference = env.rabbitmq_broker()
    reference.declare_queue(queue, ensure=True)

    broker = env.broker(max_priority=10)
    with pytest.raises(QueueArgumentsMismatch, match=queue):
        broker.declare_queue(queue, ensure=True)

    @dramatiq.actor(broker=broker, queue_name=queue)
    def task():
        pass

    with pytest.raises(QueueArgumentsMismatch, match=queue):
        task.send()
    with pytest.raises(QueueArgumentsMismatch, match=queue):
        broker.get_queue_message_counts(queue)

    # The failed declarations did not break the producer connection for other queues.
    fine = unique()
    broker.declare_queue(fine, ensure=True)
    assert broker.get_queue_message_counts(fine) == (0, 0, 0)


def test_consumer_on_mismatched_queue_fails_without_leaking_its_channel(env, vhost):
    """The worker retries a failing consumer every 3 s (q and q.DQ): a channel left open per
    attempt adds up to channel_max (2047) on the shared consumer connection within the hour."""
    queue = unique()
    reference = env.rabbitmq_broker()
    reference.declare_queue(queue, ensure=True)
    broker = env.broker(max_priority=10)
    for name in (queue, f"{queue}.DQ", queue):
        with pytest.raises(QueueArgumentsMismatch, match=queue):
            broker.consume(name, prefetch=2, timeout=100)
    open_channels = [channel for channel in broker.consumer_connection.connection.channels.values()
                     if channel is not broker.consumer_connection.connection and channel.is_open]
    assert open_channels == []
    name = f"{env.connection_name}-consumer"
    assert rabbit_admin.count_channels(vhost=vhost, connection_name=name) == 0
