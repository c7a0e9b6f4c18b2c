"""KombuBroker construction and queue topology, against the real RabbitMQ.

Construction: RabbitmqBroker's arguments (url, parameters, pika keyword parameters) map onto
the connection the transport opens; invalid options fail at once, naming the argument; a
broker opens no connection until it is used; its repr never shows a password. Topology: the
queues are exactly those RabbitmqBroker declares, so either broker can take over the other's.
"""

from __future__ import annotations

import ssl
from urllib.parse import urlsplit

import dramatiq
import pika
import pytest
from dramatiq.brokers.rabbitmq import RabbitmqBroker

from broker_helpers import DEAD_MESSAGE_TTL, recording_actor, unique
from dramatiq_kombu_broker import KombuBroker, QueueArgumentsMismatch
from stress import rabbit_admin
from transport_helpers import Proxy, have_openssl, make_tls_files, server_tls_context

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


# ----------------------------------------------------------- RabbitmqBroker's arguments


def _built(**arguments):
    """The (unconnected) producer connection of a KombuBroker made with ``arguments``."""
    broker = KombuBroker(**arguments)
    connection = broker.producer_connection
    broker.close()
    return broker, connection


def test_pika_keyword_parameters_map_to_the_connection():
    broker, connection = _built(
        host="rabbit.example", port=5673, virtual_host="jobs/eu",
        credentials=pika.PlainCredentials("app", "p@ss:w/rd%"), heartbeat=15,
        socket_timeout=4, connection_attempts=3, retry_delay=0.5,
        blocked_connection_timeout=12, client_properties={"product": "billing"},
        connection_name="billing",
    )
    assert (connection.hostname, connection.port) == ("rabbit.example", 5673)
    assert (connection.userid, connection.password) == ("app", "p@ss:w/rd%")
    assert connection.virtual_host == "jobs/eu"
    assert connection.heartbeat == 15
    assert connection.connect_timeout == 4
    assert not connection.ssl
    assert connection.transport_options["client_properties"] == {
        "product": "billing", "connection_name": "billing-producer"}
    settings = broker.settings
    assert (settings.connection_attempts, settings.retry_delay) == (3, 0.5)
    assert settings.blocked_timeout == 12
    assert "p@ss" not in repr(broker) and "p%40ss" not in repr(broker)


def test_pika_defaults_and_credentials_pair():
    broker, connection = _built(host="127.0.0.1", credentials=("u", "p"))
    assert (connection.hostname, connection.port) == ("127.0.0.1", 5672)
    assert (connection.userid, connection.password, connection.virtual_host) == ("u", "p", "/")
    assert broker.settings.heartbeat == 60
    assert broker.settings.blocked_timeout == 30.0
    assert broker.confirm_delivery is True  # RabbitmqBroker's default is False


def test_ssl_options_connect_with_amqps_on_5671():
    options = {"ca_certs": "/etc/ssl/ca.pem", "server_hostname": "rabbit.example"}
    _, connection = _built(host="rabbit.example", ssl_options=options)
    assert urlsplit(connection.as_uri()).scheme == "amqps"
    assert connection.port == 5671
    assert connection.ssl == options
    _, connection = _built(host="rabbit.example", ssl_options=True)
    assert urlsplit(connection.as_uri()).scheme == "amqps"


def test_parameters_list_is_a_failover_list():
    broker, connection = _built(parameters=[
        {"host": "node-a", "credentials": ("u", "p"), "virtual_host": "v", "heartbeat": 5},
        {"host": "node-b", "port": 5673, "credentials": pika.PlainCredentials("u", "p"),
         "virtual_host": "v", "heartbeat": 5},
    ])
    # The list starts at a random node (failover_order), the others following in order.
    hosts = [urlsplit(url).hostname for url in connection.alt]
    assert hosts in (["node-a", "node-b"], ["node-b", "node-a"])
    assert {urlsplit(url).hostname: urlsplit(url).port for url in connection.alt} == {
        "node-a": 5672, "node-b": 5673}
    assert (connection.hostname, connection.virtual_host) == (hosts[0], "v")
    assert broker.settings.heartbeat == 5


def test_url_query_parameters_are_read_as_pika_reads_them():
    broker, connection = _built(
        url="amqp://u:p@host-a:5672/v?heartbeat=20&connection_attempts=4&retry_delay=0.25"
            "&socket_timeout=3&blocked_connection_timeout=9")
    assert (connection.hostname, connection.virtual_host) == ("host-a", "v")
    assert broker.settings.urls == ["amqp://u:p@host-a:5672/v"]
    assert connection.heartbeat == 20
    assert connection.connect_timeout == 3
    settings = broker.settings
    assert (settings.connection_attempts, settings.retry_delay, settings.blocked_timeout) == (
        4, 0.25, 9)


def test_heartbeat_may_be_combined_with_a_url():
    _, connection = _built(url="amqp://u:p@h:5672/", heartbeat=7)
    assert connection.heartbeat == 7


def test_rabbitmq_broker_raises_runtime_error_when_url_is_mixed(amqp_url):
    """The reference: KombuBroker must fail the same way for the same arguments."""
    with pytest.raises(RuntimeError):
        RabbitmqBroker(url=amqp_url, host="127.0.0.1")
    with pytest.raises(RuntimeError):
        RabbitmqBroker(parameters=[{"host": "127.0.0.1"}], port=5672)


@pytest.mark.parametrize(
    ("arguments", "names"),
    [
        ({"url": "amqp://h/", "host": "h"}, "host"),
        ({"url": "amqp://h/", "credentials": ("u", "p")}, "credentials"),
        ({"url": "amqp://h/", "blocked_connection_timeout": 3}, "blocked_connection_timeout"),
        ({"url": "amqp://h/", "parameters": [{"host": "h"}]}, "parameters"),
        ({"parameters": [{"host": "h"}], "virtual_host": "v"}, "virtual_host"),
    ],
)
def test_mixing_url_parameters_and_keywords_raises_runtime_error(arguments, names):
    with pytest.raises(RuntimeError, match=names):
        KombuBroker(**arguments)


@pytest.mark.parametrize(
    ("arguments", "argument"),
    [
        ({"port": 0}, "port"),
        ({"port": "5672"}, "port"),
        ({"host": "a/b"}, "host"),
        ({"virtual_host": 3}, "virtual_host"),
        ({"credentials": ("only-user",)}, "credentials"),
        ({"credentials": pika.credentials.ExternalCredentials()}, "credentials"),
        ({"heartbeat": -1}, "heartbeat"),
        ({"connection_attempts": 0}, "connection_attempts"),
        ({"retry_delay": -1}, "retry_delay"),
        ({"blocked_connection_timeout": 0}, "blocked_timeout"),
        ({"socket_timeout": 3, "connect_timeout": 4}, "socket_timeout"),
        ({"ssl_options": pika.SSLOptions(ssl.create_default_context())}, "ssl_options"),
        ({"ssl_options": "yes"}, "ssl_options"),
        ({"ssl_options": True, "ssl": {"ca_certs": "/ca.pem"}}, "ssl_options"),
        ({"client_properties": {"capabilities": {}}}, "capabilities"),
        ({"client_properties": {"connection_name": "a"}, "connection_name": "b"},
         "connection_name"),
        ({"parameters": []}, "parameters"),
        ({"parameters": {"host": "h"}}, "parameters"),
        ({"parameters": [{"host": "h", "frame_max": 8192}]}, "frame_max"),
        ({"parameters": [{"host": "h", "channel_max": 8}]}, r"parameters\[0\]\.channel_max"),
        ({"parameters": [{"heartbeat": 5}, {"heartbeat": 6}]}, r"parameters\[1\]\.heartbeat"),
        ({"parameters": [{"heartbeat": lambda conn, proposed: 5}]}, "heartbeat"),
        ({"url": "amqp://h/?frame_max=8192"}, "frame_max"),
        ({"url": "amqp://h/?heartbeat=soon"}, "heartbeat"),
        ({"url": "amqp://h/?heartbeat=5", "heartbeat": 6}, "heartbeat"),
    ],
)
def test_pika_parameter_that_cannot_map_raises_value_error_naming_it(arguments, argument):
    with pytest.raises(ValueError, match=argument):
        KombuBroker(**arguments)


@pytest.mark.parametrize("name", ["confirm_timeout", "blocked_timeout"])
@pytest.mark.parametrize("value", [0, -1, float("inf"), float("nan"), "5", True])
def test_a_bound_of_a_wait_must_be_a_finite_positive_number_of_seconds(name, value):
    with pytest.raises(ValueError, match=rf"^{name}\b.* must be a finite number of seconds > 0"):
        KombuBroker(url="amqp://guest:guest@127.0.0.1:5672/", **{name: value})


@pytest.mark.parametrize("name", ["heartbeat", "connect_timeout"])
@pytest.mark.parametrize("value", [-1, float("inf"), float("nan"), "5", True])
def test_a_duration_that_may_be_zero_must_still_be_a_finite_number_of_seconds(name, value):
    with pytest.raises(ValueError, match=rf"^{name} must be a finite number of seconds >= 0"):
        KombuBroker(url="amqp://guest:guest@127.0.0.1:5672/", **{name: value})


def test_a_retry_delay_must_be_a_finite_number_of_seconds():
    with pytest.raises(ValueError, match=r"^retry_delay must be a finite number of seconds >= 0"):
        KombuBroker(url="amqp://guest:guest@127.0.0.1:5672/?retry_delay=inf")


def test_pika_style_construction_sends_and_consumes(env, vhost):
    """dramatiq's docs build ``RabbitmqBroker(host=...)``: the same call works unchanged."""
    broker = env.broker(url=None, host="127.0.0.1", port=5672, virtual_host=vhost,
                        credentials=pika.PlainCredentials("guest", "guest"), heartbeat=30)
    record, seen, _ = recording_actor(broker)
    env.worker(broker, threads=2)
    for n in range(5):
        record.send(n)
    assert seen.wait(5, timeout=20), seen.snapshot()
    assert sorted(seen.snapshot()) == list(range(5))


def test_parameters_list_and_pair_credentials_connect(env, vhost, server_connections):
    broker = env.broker(url=None, connection_name=None, parameters=[
        {"host": "127.0.0.1", "virtual_host": vhost, "credentials": ("guest", "guest"),
         "client_properties": {"connection_name": f"{env.connection_name}-params"}},
    ])
    queue = unique()
    broker.declare_queue(queue, ensure=True)
    assert server_connections.wait(f"{env.connection_name}-params-producer", 1,
                                   vhost=vhost) == 1
    assert broker.get_queue_message_counts(queue) == (0, 0, 0)


def test_ssl_options_connect_over_tls(env, vhost, tmp_path):
    """pika-style TLS: ``ssl_options`` with the CA verifies the server's certificate and name."""
    assert have_openssl(), "the TLS test needs the openssl CLI (apt-get install openssl)"
    files = make_tls_files(tmp_path)
    with Proxy(tls=server_tls_context(files)) as proxy:
        broker = env.broker(url=None, host="localhost", port=proxy.port, virtual_host=vhost,
                            credentials=("guest", "guest"), connect_timeout=5,
                            ssl_options={"ca_certs": files["ca"]})
        queue = unique()
        broker.declare_queue(queue, ensure=True)
        assert broker.get_queue_message_counts(queue) == (0, 0, 0)
        # Only TLS gets through this proxy; the certificate is the one the CA signed.
        sock = broker.producer_connection.connection.transport.sock
        assert sock.getpeercert()["subject"] == ((("commonName", "localhost"),),)
        broker.close()


def test_url_query_heartbeat_reaches_the_server(env, amqp_url):
    """pika's query parameters are read by the broker (kombu alone silently drops
    blocked_connection_timeout)."""
    broker = env.broker(url=f"{amqp_url}?heartbeat=5&blocked_connection_timeout=20")
    broker.declare_queue(unique(), ensure=True)
    # The heartbeat the client proposed and the server accepted in connection.tune-ok.
    assert broker.producer_connection.connection.heartbeat == 5
    assert broker.settings.blocked_timeout == 20


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


def test_ipv6_host_and_odd_names_survive_the_url():
    _, connection = _built(host="::1", virtual_host="a b/%c", credentials=("us er", "p:w@/"))
    assert (connection.hostname, connection.port) == ("::1", 5672)
    assert (connection.virtual_host, connection.userid, connection.password) == (
        "a b/%c", "us er", "p:w@/")
