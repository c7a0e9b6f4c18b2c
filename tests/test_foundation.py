"""Tests of the test helpers themselves, against the real RabbitMQ."""

from __future__ import annotations

from urllib.parse import unquote, urlsplit

import amqp
import pytest

from dramatiq_kombu_broker.topology import queue_arguments
from stress import rabbit_admin


def test_session_vhost_exists_and_url_points_at_it(vhost, amqp_url):
    assert vhost.startswith("test-")
    assert vhost in rabbit_admin.list_vhosts()
    assert unquote(urlsplit(amqp_url).path[1:]) == vhost
    assert rabbit_admin.amqp_connect_kwargs(amqp_url)["virtual_host"] == vhost


def test_connection_name_is_counted_then_gone_after_close(
    amqp_connect_kwargs, vhost, connection_name, server_connections
):
    assert server_connections(connection_name) == 0
    conn = amqp.Connection(
        client_properties={"connection_name": connection_name}, **amqp_connect_kwargs
    )
    conn.connect()
    try:
        assert server_connections(connection_name) == 1
        assert server_connections(connection_name, vhost=vhost) == 1
        assert server_connections(connection_name, vhost="/") == 0
        port = conn.sock.getsockname()[1]
        [info] = rabbit_admin.find_connections(peer_ports=[port])
        assert rabbit_admin.connection_name_of(info) == connection_name
        assert info["vhost"] == vhost
        assert info["user"] == "guest"
        assert info["client_properties"]["product"] == "py-amqp"
    finally:
        conn.close()
    assert server_connections.wait(connection_name, 0) == 0


def test_channels_and_queues_are_listed(amqp_connect_kwargs, vhost, queue_name, connection_name):
    conn = amqp.Connection(
        client_properties={"connection_name": connection_name}, **amqp_connect_kwargs
    )
    conn.connect()
    try:
        ch1, ch2 = conn.channel(), conn.channel()
        arguments = queue_arguments(queue_name, max_priority=10)
        ch1.queue_declare(queue_name, durable=True, auto_delete=False, arguments=arguments)
        ch1.confirm_select()
        ch1.basic_publish(amqp.Message(b"hello", delivery_mode=2), routing_key=queue_name)
        assert rabbit_admin.count_channels(vhost=vhost, connection_name=connection_name) == 2
        assert rabbit_admin.list_channels(vhost) >= 2
        messages, declared = rabbit_admin.list_queues(vhost)[queue_name]
        assert messages == 1
        assert declared == arguments
        ch2.close()
    finally:
        conn.close()


def test_close_all_connections_in_vhost_forces_the_client_out(
    amqp_connect_kwargs, vhost, connection_name, server_connections
):
    conn = amqp.Connection(
        client_properties={"connection_name": connection_name}, **amqp_connect_kwargs
    )
    conn.connect()
    try:
        assert rabbit_admin.close_all_connections("foundation test", vhost=vhost) >= 1
        with pytest.raises(amqp.exceptions.ConnectionForced):
            conn.drain_events(timeout=10)
    finally:
        conn.collect()
    assert server_connections.wait(connection_name, 0) == 0


def test_table_to_dict_decodes_nested_tables():
    raw = [
        ["product", "longstr", "py-amqp"],
        ["capabilities", "table", [["connection.blocked", "bool", True]]],
    ]
    assert rabbit_admin.table_to_dict(raw) == {
        "product": "py-amqp",
        "capabilities": {"connection.blocked": True},
    }
    assert rabbit_admin.table_to_dict("") == {}
