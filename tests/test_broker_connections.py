"""KombuBroker's connections under a real dramatiq.Worker on the real RabbitMQ.

The headline: 900 worker threads share exactly two server-side connections. Then the failure
cases: connections closed by the server, a send interrupted by a TimeLimit, a consumer cancelled
because its queue was deleted, a publish into a deleted queue, and fork().
"""

from __future__ import annotations

import json
import os
import threading
import time

import dramatiq
import pytest
from dramatiq.middleware.time_limit import TimeLimitExceeded

from broker_helpers import (
    Recorder,
    close_connections_named,
    connection_info,
    connections_named,
    delete_queues,
    lock_held,
    pool_in_use,
    recording_actor,
    run_bounded,
    time_limits,
    unique,
    wait_until,
)
from stress import rabbit_admin
from transport_helpers import reap_child


def _server_side_names(connection_name: str, vhost: str) -> list[str]:
    """Server-side names (``"peer:port -> host:port"``) of the connections called
    ``connection_name``: a reconnect shows up as a different name."""
    return sorted(c["name"] for c in rabbit_admin.find_connections(connection_name, vhost=vhost))


def _write_lock_held(broker) -> object:
    """Diagnostic only: is the producer connection's frame write lock held right now?"""
    try:
        return lock_held(broker.producer_connection._connection.frame_writer.lock)
    except Exception as exc:  # noqa: BLE001
        return repr(exc)


def _pool_in_use(broker) -> int:
    return pool_in_use(broker.producer_connection.default_channel_pool)


# ------------------------------------------------------------------------------------ headline


def test_900_worker_threads_hold_exactly_two_connections(env, vhost, server_connections):
    broker = env.broker()
    name = env.connection_name
    queue, children = unique(), unique()
    parents = Recorder()
    kids = Recorder()
    errors = Recorder()
    senders = Recorder()
    # 200 worker threads publish at the same moment from inside actors.
    burst = threading.Barrier(200)

    @dramatiq.actor(broker=broker, queue_name=queue)
    def parent(i):
        if i < 200:
            try:
                burst.wait(timeout=60)
            except threading.BrokenBarrierError as exc:
                errors.add(("barrier", i, repr(exc)))
        try:
            child.send(i)
        except Exception as exc:  # noqa: BLE001 - the test reports it
            errors.add(("send", i, repr(exc)))
            raise
        senders.add(threading.get_ident())
        parents.add(i)

    @dramatiq.actor(broker=broker, queue_name=children)
    def child(i):
        kids.add(i)

    worker = env.worker(broker, threads=900)
    assert len(worker.workers) == 900
    for i in range(400):
        parent.send(i)

    assert parents.wait(400, timeout=90), (len(parents), errors.snapshot()[:5])
    assert kids.wait(400, timeout=60), len(kids)
    assert errors.snapshot() == []
    assert sorted(parents.snapshot()) == list(range(400))
    assert sorted(set(kids.snapshot())) == list(range(400))

    assert server_connections.wait(f"{name}-consumer", 1) == 1
    assert server_connections.wait(f"{name}-producer", 1) == 1
    assert connections_named(name, vhost) == [f"{name}-consumer", f"{name}-producer"]
    # Each thread that sent holds one channel of the producer connection (the main thread
    # too), none more; and the queues were fully acked.
    assert _pool_in_use(broker) == len(set(senders.snapshot())) + 1
    broker.join(queue, timeout=10_000)
    broker.join(children, timeout=10_000)
    rows = rabbit_admin.queue_details(vhost)
    assert rows[queue]["messages_unacknowledged"] == 0
    assert rows[children]["messages_unacknowledged"] == 0


# ------------------------------------------------------------------------- server closes things


def _stream(sender, count: int, pause: float, errors: Recorder) -> threading.Thread:
    def run() -> None:
        for i in range(count):
            try:
                sender.send(i)
            except Exception as exc:  # noqa: BLE001 - the test reports it
                errors.add((i, repr(exc)))
            time.sleep(pause)

    thread = threading.Thread(target=run, daemon=True, name="stream")
    thread.start()
    return thread


def test_consumer_connection_closed_by_server_mid_stream(env, vhost, server_connections):
    broker = env.broker()
    name = env.connection_name

    def slowly(i):
        time.sleep(0.002)
        return i

    work, seen, queue = recording_actor(broker, record=slowly)
    errors = Recorder()
    env.worker(broker, threads=8)
    stream = _stream(work, 300, 0.01, errors)
    assert seen.wait(60, timeout=30)
    before = _server_side_names(f"{name}-consumer", vhost)
    assert len(before) == 1
    closed = close_connections_named(f"{name}-consumer", vhost, "test: consumer connection lost")
    assert closed == 1
    stream.join(60)
    assert not stream.is_alive()
    assert errors.snapshot() == []

    # At least once: every id shows up (a few twice, redelivered after the close).
    assert seen.wait_for(lambda items: len(set(items)) == 300, timeout=60), (
        sorted(set(range(300)) - set(seen.snapshot()))[:20])
    def reconnected() -> list[str] | None:
        names = _server_side_names(f"{name}-consumer", vhost)
        return names if len(names) == 1 and names != before else None

    assert wait_until(reconnected, timeout=15), _server_side_names(f"{name}-consumer", vhost)
    assert server_connections.wait(f"{name}-producer", 1) == 1
    broker.join(queue, timeout=15_000)

    # And the recovered consumer keeps working.
    marker = len(seen)
    work.send(1000)
    assert seen.wait(marker + 1, timeout=15)


def test_all_connections_closed_by_server_while_streaming(env, vhost, server_connections):
    broker = env.broker()
    name = env.connection_name
    work, seen, queue = recording_actor(broker)
    errors = Recorder()
    env.worker(broker, threads=8)
    stream = _stream(work, 300, 0.01, errors)
    assert seen.wait(50, timeout=30)
    assert rabbit_admin.close_all_connections("test: all lost", vhost=vhost) >= 2
    stream.join(60)
    assert not stream.is_alive()
    # Enqueues reconnect and retry: none of them failed.
    assert errors.snapshot() == []
    assert seen.wait_for(lambda items: len(set(items)) == 300, timeout=60), (
        sorted(set(range(300)) - set(seen.snapshot()))[:20])
    assert server_connections.wait(f"{name}-consumer", 1) == 1
    assert server_connections.wait(f"{name}-producer", 1) == 1
    assert connections_named(name, vhost) == [f"{name}-consumer", f"{name}-producer"]


def test_producer_connection_lost_then_enqueue_reconnects(env, vhost, server_connections):
    broker = env.broker()
    name = env.connection_name
    queue = unique()

    @dramatiq.actor(broker=broker, queue_name=queue)
    def task(i):
        pass

    task.send(0)
    before = _server_side_names(f"{name}-producer", vhost)
    assert len(before) == 1
    assert close_connections_named(f"{name}-producer", vhost, "test: producer lost") == 1
    assert server_connections.wait(f"{name}-producer", 0) == 0

    task.send(1)
    task.send_with_options(args=(2,), delay=60_000)
    after = _server_side_names(f"{name}-producer", vhost)
    assert len(after) == 1 and after != before
    assert broker.get_queue_message_counts(queue) == (2, 1, 0)
    assert server_connections(f"{name}-consumer") == 0


def test_send_interrupted_by_time_limit_leaves_producer_connection_healthy(
    env, vhost, server_connections
):
    """Actors publish in a tight loop until their TimeLimit fires: the asynchronous exception
    lands anywhere in a publish (waiting for the write lock, mid-write, waiting for a confirm).
    Other threads must still be able to publish on the shared producer connection, which must
    not have been dropped (a half-written frame would make the server close it)."""
    broker = env.broker()
    time_limits(broker, interval_ms=5)
    name = env.connection_name
    queue, sink, check = unique(), unique(), unique()
    limited = Recorder()
    other = Recorder()

    @dramatiq.actor(broker=broker, queue_name=queue, max_retries=0)
    def spam(i):
        sent = 0
        try:
            while True:
                sink_actor.send(i, sent)
                sent += 1
        except TimeLimitExceeded:
            limited.add((i, sent))
            raise
        except BaseException as exc:
            other.add((i, repr(exc)))
            raise

    @dramatiq.actor(broker=broker, queue_name=sink)
    def sink_actor(i, n):
        pass

    @dramatiq.actor(broker=broker, queue_name=check)
    def check_actor(i):
        pass

    sink_actor.send(-1, -1)  # opens the producer connection
    before = _server_side_names(f"{name}-producer", vhost)
    total = 96
    for i in range(total):
        spam.send_with_options(args=(i,), time_limit=30 + (i % 7) * 15)
    worker = env.worker(broker, threads=24, queues={queue})

    finished = limited.wait_for(lambda items: len(items) + len(other) >= total, timeout=20)
    assert other.snapshot() == []
    assert finished, (
        f"only {len(limited)} of {total} interrupted actors finished: the others hang in a "
        f"publish (producer write lock held: {_write_lock_held(broker)})"
    )
    assert sum(sent for _, sent in limited.snapshot()) > total  # they did publish

    # Every other thread can still publish, promptly, without errors.
    def publish_batch(k: int) -> None:
        for j in range(50):
            check_actor.send(k * 100 + j)

    threads = [threading.Thread(target=publish_batch, args=(k,), daemon=True) for k in range(8)]
    run_bounded(lambda: [t.start() for t in threads] and [t.join() for t in threads], 30,
                "publishing after interrupted sends")
    assert run_bounded(lambda: broker.get_queue_message_counts(check), 15,
                       "get_queue_message_counts") == (400, 0, 0)

    # The same producer connection throughout, and no channel lease leaked by an interrupt:
    # once the worker threads have ended, the main thread's is the only one out.
    assert _server_side_names(f"{name}-producer", vhost) == before
    assert server_connections.wait(f"{name}-producer", 1) == 1
    env.stop_worker(worker)
    assert _pool_in_use(broker) == 1


def test_deleted_queue_cancels_only_its_consumer(env, vhost, amqp_url):
    broker = env.broker()
    name = env.connection_name
    first, second = unique(), unique()
    seen = Recorder()

    @dramatiq.actor(broker=broker, queue_name=first)
    def one(tag):
        seen.add(("one", tag))

    @dramatiq.actor(broker=broker, queue_name=second)
    def two(tag):
        seen.add(("two", tag))

    env.worker(broker, threads=4)
    one.send("before")
    two.send("before")
    one.send_with_options(args=("delayed-before",), delay=50)
    assert seen.wait(3, timeout=15)
    consumer_before = _server_side_names(f"{name}-consumer", vhost)

    # The server cancels the consumer of first.DQ; the other three consumers are unaffected.
    delete_queues(amqp_url, f"{first}.DQ")
    for i in range(10):
        two.send(i)
        one.send(i)
    assert seen.wait(23, timeout=10), seen.snapshot()

    # first.DQ comes back when its consumer restarts (dramatiq waits ~3 s) or on the next send.
    one.send_with_options(args=("delayed-after",), delay=50)
    assert seen.wait_for(lambda items: ("one", "delayed-after") in items, timeout=30)
    assert f"{first}.DQ" in rabbit_admin.queue_details(vhost)
    # One channel was closed, not the connection.
    assert _server_side_names(f"{name}-consumer", vhost) == consumer_before


def test_publish_to_deleted_queue_redeclares_it_never_drops(env, vhost, amqp_url):
    """dramatiq issue 832: with confirm_delivery, a message published into a queue that was
    deleted under the broker comes back unroutable; the broker must declare the queues again
    and deliver it, not report success for a dropped message."""
    broker = env.broker(confirm_delivery=True)
    queue = unique()

    @dramatiq.actor(broker=broker, queue_name=queue)
    def task(i):
        pass

    task.send(0)
    assert broker.get_queue_message_counts(queue) == (1, 0, 0)
    delete_queues(amqp_url, queue, f"{queue}.DQ", f"{queue}.XQ")
    assert queue not in rabbit_admin.queue_details(vhost)

    task.send(1)
    rows = rabbit_admin.queue_details(vhost)
    assert rows[queue]["messages_ready"] == 1
    assert rows[queue]["arguments"]["x-dead-letter-routing-key"] == f"{queue}.XQ"
    assert f"{queue}.XQ" in rows

    delete_queues(amqp_url, queue, f"{queue}.DQ", f"{queue}.XQ")
    task.send_with_options(args=(2,), delay=60_000)
    assert rabbit_admin.queue_details(vhost)[f"{queue}.DQ"]["messages_ready"] == 1


def test_publish_to_queue_deleted_under_a_running_worker(env, vhost, amqp_url):
    broker = env.broker(confirm_delivery=True)
    task, seen, queue = recording_actor(broker)
    env.worker(broker, threads=4)
    task.send(-1)
    assert seen.wait(1, timeout=15)
    delete_queues(amqp_url, queue, f"{queue}.DQ", f"{queue}.XQ")
    for i in range(20):
        task.send(i)
    # The consumer was cancelled; after its restart it consumes the re-declared queue.
    assert seen.wait_for(lambda items: set(range(20)) <= set(items), timeout=30), (
        sorted(set(range(20)) - set(seen.snapshot())))
    broker.join(queue, timeout=10_000)


# ---------------------------------------------------------------------------------------- fork


def test_fork_child_opens_its_own_connections(env, vhost, amqp_url, server_connections):
    broker = env.broker(connection_name=None)
    queue = unique()

    @dramatiq.actor(broker=broker, queue_name=queue)
    def task(origin):
        pass

    task.send("parent-before")
    parent_name = f"dramatiq-kombu-{os.getpid()}"
    assert server_connections.wait(f"{parent_name}-producer", 1, vhost=vhost) == 1
    parent_side = _server_side_names(f"{parent_name}-producer", vhost)

    report_r, report_w = os.pipe()
    go_r, go_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child reports through the pipe
        code = 1
        try:
            result: dict = {}
            try:
                task.send("child")
                result["counts"] = list(broker.get_queue_message_counts(queue))
                result["ok"] = True
            except BaseException as exc:  # noqa: BLE001
                result["error"] = repr(exc)
            os.write(report_w, json.dumps(result).encode() + b"\n")
            os.read(go_r, 1)  # stay alive while the parent looks at the server
            broker.close()
            code = 0
        finally:
            os._exit(code)

    os.close(report_w)
    os.close(go_r)
    try:
        line = run_bounded(lambda: os.read(report_r, 65536), 30, "the forked child's enqueue")
        result = json.loads(line)
        assert result.get("ok"), result
        assert result["counts"] == [2, 0, 0]
        child_name = f"dramatiq-kombu-{pid}"
        assert server_connections.wait(f"{child_name}-producer", 1, vhost=vhost) == 1
        # The parent's connection is untouched and still its own.
        assert _server_side_names(f"{parent_name}-producer", vhost) == parent_side
    finally:
        code = reap_child(pid, go_w, report_r)
    assert code == 0
    assert server_connections.wait(f"dramatiq-kombu-{pid}-producer", 0, vhost=vhost) == 0

    task.send("parent-after")
    assert broker.get_queue_message_counts(queue) == (3, 0, 0)
    assert _server_side_names(f"{parent_name}-producer", vhost) == parent_side


# ------------------------------------------------------------------- heartbeats, large frames


def test_heartbeats_keep_idle_and_busy_connections_alive(env, vhost):
    """heartbeat=1: the server drops a connection silent for ~2 s. The reader threads send
    heartbeats, so neither an idle producer nor a consumer whose only worker thread is busy
    in an actor for 3.5 s loses its connection."""
    broker = env.broker(heartbeat=1)
    name = env.connection_name
    queue = unique()
    seen = Recorder()

    @dramatiq.actor(broker=broker, queue_name=queue)
    def slow(i, seconds):
        time.sleep(seconds)
        seen.add(i)

    env.worker(broker, threads=1)
    slow.send(0, 3.5)
    consumer = wait_until(lambda: _server_side_names(f"{name}-consumer", vhost), timeout=10)
    producer = _server_side_names(f"{name}-producer", vhost)
    assert [row["timeout"] for row in connection_info(f"{name}-producer", vhost, "timeout")] == [1]
    assert seen.wait(1, timeout=15)
    # The producer has been idle all along.
    slow.send(1, 0)
    assert seen.wait(2, timeout=15)
    assert _server_side_names(f"{name}-consumer", vhost) == consumer
    assert _server_side_names(f"{name}-producer", vhost) == producer
    broker.join(queue, timeout=10_000)
    env.workers[0].join()
    assert sorted(seen.snapshot()) == [0, 1]  # no redelivery either


def test_large_messages_from_many_threads_at_once(env, vhost):
    """Bodies over frame_max (128 KiB) take several frames; frames of messages published by
    different threads at the same moment must never interleave on the shared socket."""
    broker = env.broker()
    name = env.connection_name
    big, seen, queue = recording_actor(
        broker, record=lambda tag, payload: (tag, len(payload), payload == tag[0] * len(payload)))
    env.worker(broker, threads=8)
    big.send("z0", "z")
    assert seen.wait(1, timeout=15)
    producer = _server_side_names(f"{name}-producer", vhost)
    consumer = _server_side_names(f"{name}-consumer", vhost)

    start = threading.Barrier(16)
    errors = Recorder()

    def publish(k: int) -> None:
        letter = "abcdefghijklmnop"[k]
        start.wait(timeout=30)
        try:
            for j in range(3):
                big.send(f"{letter}{j}", letter * (300_000 + 1000 * k))
        except Exception as exc:  # noqa: BLE001 - the test reports it
            errors.add(repr(exc))

    threads = [threading.Thread(target=publish, args=(k,), daemon=True) for k in range(16)]
    run_bounded(lambda: [t.start() for t in threads] and [t.join() for t in threads], 60,
                "16 threads publishing large messages")
    assert errors.snapshot() == []
    assert seen.wait(49, timeout=60), len(seen)
    received = seen.snapshot()[1:]
    assert all(intact for _, _, intact in received)
    assert sorted(tag for tag, _, _ in received) == sorted(
        f"{letter}{j}" for letter in "abcdefghijklmnop" for j in range(3))
    assert _server_side_names(f"{name}-producer", vhost) == producer
    assert _server_side_names(f"{name}-consumer", vhost) == consumer


# ------------------------------------------------------------------------ unreachable server


@pytest.mark.parametrize(
    "url",
    [
        "amqp://guest:s3cr3t@127.0.0.1:1/",  # nothing listens
        "amqp://guest:s3cr3t@127.0.0.1:5672/",  # wrong password
        "amqp://guest:guest@127.0.0.1:5672/no-such-vhost-for-kombu-broker",
    ],
)
def test_unreachable_server_raises_connection_closed_promptly(env, url):
    broker = env.broker(url=url, connect_timeout=2)
    queue = unique()

    @dramatiq.actor(broker=broker, queue_name=queue)
    def task():
        pass

    # A bound far above the connect budget (2 s): kombu's own retries would go on for ever.
    with pytest.raises(dramatiq.errors.ConnectionClosed) as info:
        run_bounded(task.send, 30, "send to an unreachable server")
    assert "s3cr3t" not in repr(info.value) and "s3cr3t" not in str(info.value)
