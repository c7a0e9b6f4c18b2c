"""``KombuBroker(queue_type="quorum")`` against the real RabbitMQ (one node suffices).

The three queues are declared as quorum queues with at-least-once dead-lettering; a worker
processes messages on them, delays go through ``q.DQ``, failures land in ``q.XQ``; the
delivery limit dead-letters a message redelivered too often; a queue already on the server
with the other type raises QueueArgumentsMismatch naming both types; bad combinations fail at
construction.
"""

from __future__ import annotations

import json
import pickle

import dramatiq
import pytest

from broker_helpers import (
    DEAD_MESSAGE_TTL,
    Recorder,
    raw_channel,
    recording_actor,
    unique,
    wait_until,
)
from dramatiq_kombu_broker import KombuBroker, QueueArgumentsMismatch
from dramatiq_kombu_broker.topology import inequivalent_argument
from stress import rabbit_admin


def _queues(vhost: str, prefix: str) -> dict[str, tuple[str, dict]]:
    """name -> (type, arguments) of the queues in ``vhost`` whose name starts with ``prefix``."""
    out = rabbit_admin.rabbitmqctl("list_queues", "-p", vhost, "name", "type", "arguments",
                                   "--formatter", "json")
    return {row["name"]: (row["type"], rabbit_admin.table_to_dict(row["arguments"]))
            for row in json.loads(out.strip() or "[]") if row["name"].startswith(prefix)}


def _quorum_arguments(queue: str, **more) -> dict:
    return {"x-queue-type": "quorum", "x-dead-letter-exchange": "",
            "x-dead-letter-routing-key": f"{queue}.XQ", "x-dead-letter-strategy": "at-least-once",
            "x-overflow": "reject-publish", **more}


# ------------------------------------------------------------------------------- construction


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"queue_type": "quorum", "max_priority": 5}, "max_priority.*broker_priority"),
        ({"delivery_limit": 5}, "delivery_limit.*quorum"),
        ({"queue_type": "classic", "delivery_limit": 5}, "delivery_limit"),
        ({"queue_type": "stream"}, "queue_type"),
        ({"queue_type": "Quorum"}, "queue_type"),
        ({"queue_type": "quorum", "queue_arguments": {"x-queue-type": "classic"}},
         "x-queue-type.*contradicts"),
        ({"queue_arguments": {"x-queue-type": "quorum"}}, "x-queue-type.*contradicts"),
        ({"queue_type": "quorum", "delivery_limit": -2}, "delivery_limit"),
        ({"queue_type": "quorum", "delivery_limit": "20"}, "delivery_limit"),
        ({"queue_type": "quorum", "queue_arguments": {"x-overflow": "drop-head"}}, "x-overflow"),
        ({"queue_type": "quorum", "queue_arguments": {"x-dead-letter-strategy": "at-most-once"}},
         "x-dead-letter-strategy"),
    ],
)
def test_bad_combination_fails_at_construction(arguments, message):
    with pytest.raises(ValueError, match=message):
        KombuBroker(url="amqp://guest:guest@127.0.0.1:5672/", **arguments)


def test_matching_x_queue_type_in_queue_arguments_is_accepted():
    broker = KombuBroker(queue_type="quorum", queue_arguments={"x-queue-type": "quorum"})
    assert broker.settings.queue_type == "quorum"


# ----------------------------------------------------------------------------------- topology


def test_quorum_topology_is_declared_and_classic_stays_the_default(env, vhost):
    queue, classic = unique(), unique()
    broker = env.broker(queue_type="quorum", delivery_limit=7)
    broker.declare_queue(queue, ensure=True)
    env.broker().declare_queue(classic, ensure=True)
    declared = _queues(vhost, "q-")
    assert {name: declared[name] for name in declared if name.startswith(queue)} == {
        queue: ("quorum", _quorum_arguments(queue, **{"x-delivery-limit": 7})),
        f"{queue}.DQ": ("quorum", _quorum_arguments(queue, **{"x-delivery-limit": 7})),
        f"{queue}.XQ": ("quorum", {"x-queue-type": "quorum", "x-message-ttl": DEAD_MESSAGE_TTL}),
    }
    assert {name: kind for name, (kind, arguments) in declared.items()
            if name.startswith(classic) and "x-queue-type" not in arguments} == {
        classic: "classic", f"{classic}.DQ": "classic", f"{classic}.XQ": "classic"}
    # A second broker with the same settings accepts the queues as they are.
    assert env.broker(queue_type="quorum", delivery_limit=7).get_queue_message_counts(queue) \
        == (0, 0, 0)


# ------------------------------------------------------------------------------- end to end


def test_worker_processes_immediate_and_delayed_messages_on_quorum_queues(env):
    broker = env.broker(queue_type="quorum")
    record, seen, queue = recording_actor(broker)
    env.worker(broker, threads=4)
    for n in range(20):
        record.send(n)
    record.send_with_options(args=(100,), delay=300)
    assert seen.wait(21, timeout=30), seen.snapshot()
    assert sorted(seen.snapshot()) == [*range(20), 100]
    broker.join(queue, timeout=10_000)
    assert broker.get_queue_message_counts(queue) == (0, 0, 0)


def test_failed_message_is_dead_lettered_from_quorum_queue_to_xq(env, amqp_url):
    broker = env.broker(queue_type="quorum")
    queue = unique()
    calls = Recorder()

    @dramatiq.actor(broker=broker, queue_name=queue, max_retries=0)
    def boom(tag):
        calls.add(tag)
        raise ValueError("always")

    env.worker(broker, threads=2)
    sent = boom.send("dead-1")
    assert calls.wait(1, timeout=15)
    assert wait_until(lambda: broker.get_queue_message_counts(queue)[2] == 1, timeout=15), \
        broker.get_queue_message_counts(queue)
    with raw_channel(amqp_url) as channel:
        dead = channel.basic_get(f"{queue}.XQ", no_ack=True)
    assert dead is not None
    assert json.loads(dead.body)["message_id"] == sent.message_id


def test_delivery_limit_dead_letters_a_message_returned_too_often(env, amqp_url):
    """What a delivery limit means for dramatiq: each time a consumer's channel or connection
    goes away with the message unacked (a crash, a lost connection) counts; past the limit the
    message goes to q.XQ instead of back to the queue."""
    broker = env.broker(queue_type="quorum", delivery_limit=1)
    queue = unique()

    @dramatiq.actor(broker=broker, queue_name=queue)
    def task():
        raise AssertionError("never processed here")

    task.send()
    returned = 0
    for _ in range(3):
        with raw_channel(amqp_url) as channel:
            delivery = channel.basic_get(queue, no_ack=False)
        if delivery is None:
            break
        returned += 1  # the connection closed with the message unacked: it goes back
    assert returned == 2  # the first delivery and one redelivery (limit 1)
    assert wait_until(lambda: broker.get_queue_message_counts(queue) == (0, 0, 1), timeout=10), \
        broker.get_queue_message_counts(queue)


# ------------------------------------------------------------------------------- mismatches


def test_classic_queue_where_quorum_is_asked_raises_mismatch_naming_both(env):
    queue = unique()
    env.rabbitmq_broker().declare_queue(queue, ensure=True)
    broker = env.broker(queue_type="quorum")
    with pytest.raises(QueueArgumentsMismatch) as info:
        broker.declare_queue(queue, ensure=True)
    text = str(info.value)
    assert f"queue {queue!r} exists as a classic queue" in text
    assert "queue_type='quorum'" in text
    assert "migrate" in text
    assert (info.value.existing_type, info.value.queue_type) == ("classic", "quorum")


def test_quorum_queue_where_classic_is_asked_raises_mismatch_naming_both(env, vhost):
    """The server names x-dead-letter-strategy here, not the type: the broker finds it."""
    queue = unique()
    env.broker(queue_type="quorum").declare_queue(queue, ensure=True)
    broker = env.broker()
    for attempt in (lambda: broker.declare_queue(queue, ensure=True),
                    lambda: broker.consume(queue, prefetch=1, timeout=100)):
        with pytest.raises(QueueArgumentsMismatch) as info:
            attempt()
        assert f"queue {queue!r} exists as a quorum queue" in str(info.value)
        assert "queue_type='classic'" in str(info.value)
    # The refused channels and the probes' channels are all closed.
    for connection in (broker.producer_connection, broker.consumer_connection):
        amqp_connection = connection.connection
        assert [channel for channel in amqp_connection.channels.values()
                if channel is not amqp_connection and channel.is_open] == []
    assert _queues(vhost, queue)[queue][0] == "quorum"


def test_other_argument_mismatch_on_quorum_queue_is_not_called_a_type_change(env):
    queue = unique()
    env.broker(queue_type="quorum", delivery_limit=3).declare_queue(queue, ensure=True)
    with pytest.raises(QueueArgumentsMismatch, match="other arguments") as info:
        env.broker(queue_type="quorum", delivery_limit=5).declare_queue(queue, ensure=True)
    assert "x-delivery-limit" in str(info.value)
    assert info.value.existing_type == "quorum"  # found through the numeric argument


def test_quorum_queue_with_a_delivery_limit_where_classic_is_asked(env):
    """The server names a numeric argument first here ("received ... but current is '3'")."""
    queue = unique()
    env.broker(queue_type="quorum", delivery_limit=3).declare_queue(queue, ensure=True)
    with pytest.raises(QueueArgumentsMismatch, match="exists as a quorum queue") as info:
        env.broker().declare_queue(queue, ensure=True)
    assert info.value.existing_type == "quorum"


def test_mismatch_error_survives_pickling():
    error = QueueArgumentsMismatch("q", {"x-queue-type": "quorum"}, "inequivalent arg",
                                   "quorum", "classic")
    copy = pickle.loads(pickle.dumps(error))
    assert str(copy) == str(error)
    assert (copy.queue, copy.queue_type, copy.existing_type) == ("q", "quorum", "classic")


@pytest.mark.parametrize(
    ("text", "found"),
    [
        ("PRECONDITION_FAILED - inequivalent arg 'x-queue-type' for queue 'q' in vhost 'v': "
         "received the value 'quorum' of type 'longstr' but current is none",
         ("x-queue-type", None)),
        ("PRECONDITION_FAILED - inequivalent arg 'x-dead-letter-strategy' for queue 'q' in "
         "vhost 'v': received none but current is the value 'at-least-once' of type 'longstr'",
         ("x-dead-letter-strategy", "at-least-once")),
        ("PRECONDITION_FAILED - inequivalent arg 'x-delivery-limit' for queue 'q' in vhost "
         "'v': received '5' but current is '3'", ("x-delivery-limit", 3)),
        ("PRECONDITION_FAILED - inequivalent arg 'x-max-priority' for queue 'q' in vhost 'v': "
         "received none but current is the value '10' of type 'signedint'",
         ("x-max-priority", 10)),
        ("PRECONDITION_FAILED - invalid arg 'x-max-priority' for queue 'q'", None),
    ],
)
def test_server_reply_text_is_read(text, found):
    assert inequivalent_argument(text) == found
