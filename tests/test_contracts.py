"""Contracts the type checkers hold the code to (make typecheck), checked at run time too.

An override accepts whatever its base accepts (a channel made the way py-amqp makes one, a
consumer asked to settle any MessageProxy), and a call the types rule out fails with an error
that names the problem instead of an AttributeError from deep inside.
"""

from __future__ import annotations

import uuid

import pytest
from dramatiq import Message
from dramatiq.broker import MessageProxy

import kombu_pyamqp_threadsafe as ts
from kombu_pyamqp_threadsafe.frames import encode_method


def test_a_method_frame_without_its_method_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match="method_sig"):
        encode_method(1, 1, None, b"", None, 131072)


def test_a_transport_without_its_kombu_connection_says_so() -> None:
    with pytest.raises(TypeError, match="kombu.Connection"):
        ts.Transport(None).establish_connection()


def test_a_channel_takes_py_amqps_positional_arguments(connect) -> None:
    conn = connect()
    amqp_connection = conn.connection
    channel = amqp_connection.Channel(amqp_connection, None, False)  # auto_decode=False
    try:
        channel.open()
        assert channel.is_open and channel.auto_decode is False
    finally:
        channel.close()


def test_a_consumer_refuses_to_settle_a_message_it_did_not_deliver(env) -> None:
    queue = f"contracts-{uuid.uuid4().hex[:8]}"
    broker = env.broker()
    broker.declare_queue(queue, ensure=True)
    consumer = broker.consume(queue, prefetch=1, timeout=100)
    try:
        foreign = MessageProxy(Message(queue_name=queue, actor_name="a", args=(), kwargs={},
                                       options={}))
        with pytest.raises(TypeError, match="not delivered by a KombuConsumer"):
            consumer.ack(foreign)
        with pytest.raises(TypeError, match="not delivered by a KombuConsumer"):
            consumer.nack(foreign)
    finally:
        consumer.close()
