"""KombuBroker end to end through a real dramatiq.Worker on the real RabbitMQ.

Actors, retries, delays, priorities, dead letters, pipelines, groups, time limits, join,
flush, counts, acks, and interoperability with dramatiq's RabbitmqBroker on the same queues.
"""

from __future__ import annotations

import time
import uuid

import amqp
import dramatiq
import pytest
from dramatiq.errors import QueueJoinTimeout
from dramatiq.middleware.time_limit import TimeLimitExceeded

from broker_helpers import (
    Recorder,
    consumer_channels,
    raw_channel,
    recording_actor,
    run_bounded,
    time_limits,
    unique,
    wait_until,
)
from stress import rabbit_admin


def _idle(vhost: str, queue: str) -> dict | None:
    """The queue's row once it has no ready and no unacked message (None until then)."""
    row = rabbit_admin.queue_details(vhost).get(queue)
    if row and row["messages_ready"] == 0 and row["messages_unacknowledged"] == 0:
        return row
    return None


# --------------------------------------------------------------------------------------- actors


def test_actor_messages_are_processed_and_acked_on_the_consumer_channel(env, vhost):
    broker = env.broker()
    add, seen, queue = recording_actor(broker, record=lambda x, y, *, tag: (x + y, tag))
    env.worker(broker, threads=8)
    messages = [add.send(i, 1, tag=f"t{i}") for i in range(100)]
    assert all(message.queue_name == queue for message in messages)
    assert seen.wait(100, timeout=30), len(seen)
    assert sorted(seen.snapshot()) == sorted((i + 1, f"t{i}") for i in range(100))

    broker.join(queue, timeout=10_000)
    env.workers[0].join()
    # Every delivery was acked on the channel that delivered it: nothing stays unacked (an
    # ack on another channel would be a 406 closing the channel and redelivering everything).
    row = wait_until(lambda: _idle(vhost, queue), timeout=10, interval=0.3)
    assert row, rabbit_admin.queue_details(vhost).get(queue)
    assert broker.get_queue_message_counts(queue) == (0, 0, 0)
    assert len(seen) == 100  # and nothing was redelivered


def test_retries_with_backoff_until_success(env):
    broker = env.broker()
    queue = unique()
    attempts = Recorder()
    done = Recorder()

    @dramatiq.actor(broker=broker, queue_name=queue, min_backoff=10, max_backoff=50,
                    max_retries=5)
    def flaky(key):
        attempts.add((key, time.monotonic()))
        if len([a for a in attempts.snapshot() if a[0] == key]) < 3:
            raise RuntimeError("not yet")
        done.add(key)

    env.worker(broker, threads=2)
    flaky.send("a")
    flaky.send("b")
    assert done.wait(2, timeout=30), (attempts.snapshot(), done.snapshot())
    assert sorted(done.snapshot()) == ["a", "b"]
    assert sorted(key for key, _ in attempts.snapshot()) == ["a"] * 3 + ["b"] * 3
    broker.join(queue, timeout=10_000)
    assert broker.get_queue_message_counts(queue) == (0, 0, 0)


def test_delayed_message_arrives_after_its_delay(env):
    broker = env.broker()
    later, seen, queue = recording_actor(broker, record=lambda sent_at: time.time() - sent_at)
    env.worker(broker, threads=2)
    start = time.time()
    message = later.send_with_options(args=(start,), delay=500)
    assert message.queue_name == f"{queue}.DQ"
    assert "eta" in message.options
    assert seen.wait(1, timeout=15)
    [elapsed] = seen.snapshot()
    assert elapsed >= 0.5
    broker.join(queue, timeout=10_000)
    assert broker.get_queue_message_counts(queue) == (0, 0, 0)


def test_higher_priority_messages_are_processed_first(env):
    broker = env.broker(max_priority=10)
    job, order, queue = recording_actor(broker, record=lambda priority, index: (priority, index))
    for index in range(10):
        job.send_with_options(args=(0, index), broker_priority=0)
        job.send_with_options(args=(9, index), broker_priority=9)
        job.send_with_options(args=(5, index), broker_priority=5)
    assert broker.get_queue_message_counts(queue) == (30, 0, 0)

    env.worker(broker, threads=1)
    assert order.wait(30, timeout=30), len(order)
    priorities = [priority for priority, _ in order.snapshot()]
    assert priorities == [9] * 10 + [5] * 10 + [0] * 10


def test_failing_actor_without_retries_is_dead_lettered(env):
    broker = env.broker()
    queue = unique()
    calls = Recorder()

    @dramatiq.actor(broker=broker, queue_name=queue, max_retries=0)
    def boom():
        calls.add(1)
        raise ValueError("always")

    worker = env.worker(broker, threads=2)
    boom.send()
    assert calls.wait(1, timeout=15)
    counts = wait_until(lambda: broker.get_queue_message_counts(queue)[2] == 1, timeout=10)
    assert counts, broker.get_queue_message_counts(queue)
    worker.join()
    assert broker.get_queue_message_counts(queue) == (0, 0, 1)
    assert len(calls) == 1


def test_undecodable_message_is_dead_lettered_and_the_worker_keeps_going(env, amqp_url):
    broker = env.broker()
    ok, seen, queue = recording_actor(broker)
    broker.declare_queue(queue, ensure=True)
    env.worker(broker, threads=2)
    ok.send(1)
    with raw_channel(amqp_url) as channel:
        for body in (b"\x00\xffnot json", b'{"not": "a message"}', b"[1, 2"):
            channel.basic_publish(amqp.Message(body, delivery_mode=2), routing_key=queue)
    ok.send(2)
    assert seen.wait(2, timeout=15), seen.snapshot()
    assert wait_until(lambda: broker.get_queue_message_counts(queue)[2] == 3, timeout=10), (
        broker.get_queue_message_counts(queue))
    ok.send(3)
    assert seen.wait(3, timeout=15)
    broker.join(queue, timeout=10_000)
    assert broker.get_queue_message_counts(queue) == (0, 0, 3)


def test_message_for_unknown_actor_is_dead_lettered(env):
    broker = env.broker()
    known, seen, queue = recording_actor(broker, record=lambda: "known")
    env.worker(broker, threads=2)
    broker.enqueue(dramatiq.Message(queue_name=queue, actor_name="no_such_actor", args=(),
                                    kwargs={}, options={}))
    known.send()
    assert seen.wait(1, timeout=15)
    assert wait_until(lambda: broker.get_queue_message_counts(queue)[2] == 1, timeout=10), (
        broker.get_queue_message_counts(queue))
    assert broker.get_queue_message_counts(queue) == (0, 0, 1)


# ------------------------------------------------------------------------ pipelines and groups


def test_pipeline_passes_results_between_actors(env):
    broker = env.broker()
    queue = unique()
    final = Recorder()

    @dramatiq.actor(broker=broker, queue_name=queue)
    def inc(x):
        return x + 1

    @dramatiq.actor(broker=broker, queue_name=f"{queue}-b")
    def double(x):
        return x * 2

    @dramatiq.actor(broker=broker, queue_name=queue)
    def record(*args):
        final.add(args)

    env.worker(broker, threads=4)
    dramatiq.pipeline([inc.message(1), double.message(), inc.message(), record.message()]).run()
    dramatiq.pipeline(
        [inc.message(10), record.message_with_options(args=("ignored",), pipe_ignore=True)]
    ).run()
    assert final.wait(2, timeout=30), final.snapshot()
    assert sorted(final.snapshot(), key=repr) == [("ignored",), (5,)]


def test_group_messages_are_all_processed(env):
    broker = env.broker()
    member, seen, queue = recording_actor(broker)
    env.worker(broker, threads=8)
    group = dramatiq.group([member.message(i) for i in range(25)])
    group.run()
    assert seen.wait(25, timeout=30), len(seen)
    assert sorted(seen.snapshot()) == list(range(25))
    broker.join(queue, timeout=10_000)


# ---------------------------------------------------------------------------------- time limits


def test_time_limit_dead_letters_and_worker_stays_healthy(env, server_connections):
    broker = env.broker()
    time_limits(broker)
    queue = unique()
    outcome = Recorder()

    @dramatiq.actor(broker=broker, queue_name=queue, time_limit=200, max_retries=0)
    def slow():
        start = time.monotonic()
        try:
            # Far longer than the limit: only TimeLimit ends it "limited", however late it lands.
            while time.monotonic() - start < 60:
                time.sleep(0.01)
        except TimeLimitExceeded:
            outcome.add(("limited", time.monotonic() - start))
            raise
        outcome.add(("finished", time.monotonic() - start))

    @dramatiq.actor(broker=broker, queue_name=queue)
    def fast(i):
        outcome.add(("fast", i))

    env.worker(broker, threads=2)
    slow.send()
    assert outcome.wait(1, timeout=30)
    [(what, _)] = outcome.snapshot()
    assert what == "limited"
    assert wait_until(lambda: broker.get_queue_message_counts(queue)[2] == 1, timeout=10)

    for i in range(5):
        fast.send(i)
    assert outcome.wait(6, timeout=15), outcome.snapshot()
    assert server_connections.wait(f"{env.connection_name}-consumer", 1) == 1
    assert server_connections.wait(f"{env.connection_name}-producer", 1) == 1


# -------------------------------------------------------------------- join, flush and counts


def test_join_returns_when_drained_and_times_out_when_not(env):
    broker = env.broker()
    idle_queue = unique()

    def slowly(i):
        time.sleep(0.01)
        return i

    work, seen, queue = recording_actor(broker, record=slowly)

    @dramatiq.actor(broker=broker, queue_name=idle_queue)
    def never(i):
        pass

    for i in range(30):
        work.send(i)
    never.send(1)
    worker = env.worker(broker, threads=4, queues={queue})
    broker.join(queue, timeout=20_000)
    worker.join()
    assert len(seen) == 30

    # Nobody consumes idle_queue: its message stays and join gives up.
    with pytest.raises(QueueJoinTimeout):
        # A bound far above the 0.5 s: a join that ignored its timeout would wait forever.
        run_bounded(lambda: broker.join(idle_queue, timeout=500), 30, "broker.join(timeout=500)")
    # A delayed message counts too (join waits for q.DQ as well).
    never.send_with_options(args=(2,), delay=60_000)
    assert broker.get_queue_message_counts(idle_queue) == (1, 1, 0)


def test_flush_and_flush_all_empty_all_three_queues(env):
    broker = env.broker()
    first, second = unique(), unique()

    @dramatiq.actor(broker=broker, queue_name=first, max_retries=0)
    def one(i):
        raise ValueError(i)

    @dramatiq.actor(broker=broker, queue_name=second)
    def two(i):
        pass

    # A dead letter in first.XQ, through a worker that then stops.
    worker = env.worker(broker, threads=1)
    one.send(0)
    assert wait_until(lambda: broker.get_queue_message_counts(first)[2] == 1, timeout=15)
    env.stop_worker(worker)

    for i in range(3):
        one.send(i)
        two.send(i)
    one.send_with_options(args=(9,), delay=60_000)
    two.send_with_options(args=(9,), delay=60_000)
    assert broker.get_queue_message_counts(first) == (3, 1, 1)
    assert broker.get_queue_message_counts(second) == (3, 1, 0)

    broker.flush(first)
    assert broker.get_queue_message_counts(first) == (0, 0, 0)
    assert broker.get_queue_message_counts(second) == (3, 1, 0)

    one.send(5)
    broker.flush_all()
    assert broker.get_queue_message_counts(first) == (0, 0, 0)
    assert broker.get_queue_message_counts(second) == (0, 0, 0)


def test_flush_of_a_queue_not_yet_on_the_server_is_a_no_op(env, vhost):
    broker = env.broker()
    queue = unique()
    broker.declare_queue(queue)
    broker.flush(queue)
    broker.flush_all()
    # The producer connection is still fine after the 404s.
    assert broker.get_queue_message_counts(queue) == (0, 0, 0)


# -------------------------------------------------------------------------------------- interop


def _sender_side(broker, queue):
    """A newly named actor on ``queue`` that ``broker`` only sends: no worker of it runs."""

    def sender_side(*args, **kwargs):
        raise AssertionError(f"{broker!r} has no worker")

    return dramatiq.actor(sender_side, broker=broker, queue_name=queue,
                          actor_name=f"interop_{uuid.uuid4().hex[:6]}")


def test_rabbitmq_broker_sends_kombu_broker_processes(env):
    reference = env.rabbitmq_broker()
    queue = unique()
    sender_side = _sender_side(reference, queue)
    for i in range(20):
        sender_side.send_with_options(args=(i,), kwargs={"text": f"m{i}"},
                                      broker_priority=None)
    sender_side.send_with_options(args=(20,), kwargs={"text": "late"}, delay=300)
    assert reference.get_queue_message_counts(queue)[0] == 20

    broker = env.broker()
    _, seen, _ = recording_actor(broker, queue, actor_name=sender_side.actor_name,
                                 record=lambda i, *, text: (i, text))
    env.worker(broker, threads=4)
    assert seen.wait(21, timeout=30), seen.snapshot()
    assert sorted(seen.snapshot()) == [(i, f"m{i}") for i in range(20)] + [(20, "late")]
    broker.join(queue, timeout=10_000)
    assert reference.get_queue_message_counts(queue) == (0, 0, 0)


def test_kombu_broker_sends_rabbitmq_broker_processes(env):
    broker = env.broker()
    queue = unique()
    sender_side = _sender_side(broker, queue)
    for i in range(20):
        sender_side.send(i)
    sender_side.send_with_options(args=(20,), delay=300)
    assert broker.get_queue_message_counts(queue) == (20, 1, 0)

    reference = env.rabbitmq_broker()
    dramatiq.set_broker(reference)
    _, seen, _ = recording_actor(reference, queue, actor_name=sender_side.actor_name)
    env.worker(reference, threads=4)
    assert seen.wait(21, timeout=30), seen.snapshot()
    assert sorted(seen.snapshot()) == list(range(21))
    reference.join(queue, timeout=10_000)
    assert broker.get_queue_message_counts(queue) == (0, 0, 0)



# ------------------------------------------------------------------------ worker stop, prefetch


def test_worker_stop_mid_stream_neither_loses_nor_duplicates(env, vhost):
    """Worker.stop() lets the running actors finish (their acks must reach the server before
    the consumer channel closes) and hands the prefetched rest back to the queue."""
    broker = env.broker()

    def slowly(i):
        time.sleep(0.005)
        return i

    work, seen, queue = recording_actor(broker, record=slowly)
    for i in range(300):
        work.send(i)
    worker = env.worker(broker, threads=4)
    assert seen.wait(60, timeout=30)
    env.stop_worker(worker)
    processed = seen.snapshot()
    assert len(processed) == len(set(processed)) < 300

    rest = 300 - len(processed)
    row = wait_until(lambda: _idle_with(vhost, queue, rest), timeout=10, interval=0.3)
    assert row, (rest, rabbit_admin.queue_details(vhost).get(queue))

    env.worker(broker, threads=4)
    assert seen.wait(300, timeout=30), len(seen)
    broker.join(queue, timeout=10_000)
    env.workers[-1].join()
    everything = seen.snapshot()
    assert sorted(everything) == list(range(300)), "a message was processed twice or lost"


def _idle_with(vhost: str, queue: str, ready: int) -> dict | None:
    row = rabbit_admin.queue_details(vhost).get(queue)
    if row and row["messages_ready"] == ready and row["messages_unacknowledged"] == 0:
        return row
    return None


@pytest.mark.parametrize(("options", "expected"), [
    ({}, [8, 4000]),  # dramatiq's defaults for 4 threads: 2 * 4 and 1000 * 4
    ({"prefetch": 3, "delay_prefetch": 7}, [3, 7]),
])
def test_prefetch_reaches_the_server(env, vhost, options, expected):
    broker = env.broker(**options)
    queue = unique()

    @dramatiq.actor(broker=broker, queue_name=queue)
    def noop():
        pass

    env.worker(broker, threads=4)
    name = f"{broker.settings.connection_name}-consumer"
    channels = wait_until(
        lambda: (lambda rows: rows if len(rows) == 2 and all(r["consumer_count"] for r in rows)
                 else None)(consumer_channels(name, vhost)),
        timeout=15, interval=0.3)
    assert channels, consumer_channels(name, vhost)
    assert sorted(row["prefetch_count"] for row in channels) == expected


def test_message_naming_another_queue_does_not_kill_a_worker_thread(env, amqp_url):
    """A valid message whose body names another queue (moved by a shovel, re-published by
    hand) is delivered on ``queue``. The worker looks the consumer up by ``proxy.queue_name``
    and a miss is a KeyError that kills the worker thread (and leaves the message unacked):
    the consumer's proxy must carry the queue it was consumed from."""
    broker = env.broker()
    job, seen, queue = recording_actor(broker)
    broker.declare_queue(queue, ensure=True)
    stray = job.message("stray").copy(queue_name=unique("elsewhere"))
    with raw_channel(amqp_url) as channel:
        channel.basic_publish(amqp.Message(stray.encode(), delivery_mode=2), routing_key=queue)
    worker = env.worker(broker, threads=1)
    assert seen.wait(1, timeout=15)
    job.send("after")
    assert seen.wait(2, timeout=10), (
        f"the only worker thread died: alive={[t.is_alive() for t in worker.workers]}")
    assert sorted(seen.snapshot()) == ["after", "stray"]
    broker.join(queue, timeout=10_000)
    assert wait_until(lambda: broker.get_queue_message_counts(queue) == (0, 0, 0), timeout=10)
