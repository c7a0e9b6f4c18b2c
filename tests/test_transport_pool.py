"""The channel pool of KombuConnection under contention, against the real RabbitMQ."""

from __future__ import annotations

import threading
import time

import pytest
from amqp.exceptions import NotFound

import kombu_pyamqp_threadsafe as ts
from kombu_pyamqp_threadsafe import channel as ts_channel
from stress.bounded import run_bounded
from test_transport_failures import _stuck_send_with_the_queue_full, publish
from transport_helpers import Proxy, Worker, join_all, start_all, url_for


def test_pool_under_contention(connect, queue_name):
    """50 threads x 200 acquire/release on a pool of 8: a channel is never held by two
    threads, a closed (discarded) channel is never handed out again, nobody deadlocks."""
    limit, threads, iterations = 8, 50, 200
    conn = connect(channel_pool_limit=limit)
    pool = conn.default_channel_pool
    amqp_connection = conn.connection
    lock = threading.Lock()
    held: set[int] = set()
    discarded_ids: set[int] = set()
    discarded = []  # strong references: keeps the ids in discarded_ids unique
    problems = []
    peak = [0]
    barrier = threading.Barrier(threads)

    def worker(n):
        me = threading.current_thread()
        barrier.wait(20)
        acquired = 0
        for i in range(iterations):
            fail = (i + n) % 41 == 0
            try:
                with pool.acquire(timeout=20) as channel:
                    acquired += 1
                    key = id(channel)
                    with lock:
                        if key in held:
                            problems.append(f"channel {channel.channel_id} held twice")
                        if key in discarded_ids:
                            problems.append(f"discarded channel {channel.channel_id} reused")
                        held.add(key)
                        peak[0] = max(peak[0], len(held))
                    if not channel.is_open or channel.connection is not amqp_connection:
                        problems.append(f"unusable channel {channel.channel_id}")
                    if channel.owner is not me:
                        problems.append(f"channel {channel.channel_id} not adopted")
                    if i % 5 == 0:
                        channel.basic_qos(0, 10, False)  # a round trip: owner-only
                    if fail:
                        with lock:
                            held.discard(key)
                            discarded_ids.add(key)
                            discarded.append(channel)
                        # A channel error inside the lease: the pool must close the channel.
                        channel.queue_declare(f"missing-{queue_name}", passive=True)
                    with lock:
                        held.discard(key)
            except NotFound:
                pass
        return acquired

    workers = start_all([Worker(worker, n, name=f"pool-{n}") for n in range(threads)])
    assert join_all(workers, 60) == [], "deadlock: threads still waiting for the pool"
    for worker_thread in workers:
        assert worker_thread.error is None, repr(worker_thread.error)
        assert worker_thread.result == iterations
    assert problems == []
    assert 1 < peak[0] <= limit
    assert discarded and all(not channel.is_open for channel in discarded)
    assert pool.in_use == 0
    # Only the idle channels of the pool are still open on the connection.
    assert len(pool._idle) <= limit
    assert set(amqp_connection.channels) - {0} == {ch.channel_id for ch in pool._idle}
    assert conn.connected


def test_acquire_at_the_limit(connect):
    conn = connect(channel_pool_limit=2)
    pool = conn.default_channel_pool
    first, second = pool.acquire(), pool.acquire()
    with pytest.raises(ts.ChannelPoolLimitError, match="pool limit"):
        pool.acquire(block=False)
    started = time.monotonic()
    with pytest.raises(ts.ChannelPoolLimitError, match="pool limit"):
        # A bound far above the 0.2 s: an acquire that ignored its timeout would wait for ever.
        run_bounded(lambda: pool.acquire(timeout=0.2), 30, "pool.acquire(timeout=0.2)")
    assert time.monotonic() - started > 0.15  # it did wait (a lower bound load cannot break)

    # A blocked acquire gets the channel another thread gives back, and owns it.
    waiting = threading.Event()

    def waiter():
        waiting.set()
        with pool.acquire(timeout=10) as channel:
            channel.basic_qos(0, 1, False)
            return channel, channel.owner is threading.current_thread()

    worker = Worker(waiter)
    worker.start()
    assert waiting.wait(5)
    released = first.channel
    first.release()
    first.release()  # a second release changes nothing
    assert join_all([worker], 10) == []
    assert worker.error is None, repr(worker.error)
    channel, owned = worker.result
    assert channel is released and owned
    assert pool.in_use == 1
    second.release()
    assert pool.in_use == 0


def test_exhausting_channel_max_raises_a_clear_error(connect):
    """The pool without a limit, against the server's channel_max (2047 on RabbitMQ 3.10)."""
    conn = connect(channel_pool_limit=None)
    pool = conn.default_channel_pool
    channel_max = conn.connection.channel_max
    assert 0 < channel_max <= 4096, "too many channels for a fast test"
    leases = []
    with pytest.raises(conn.connection_errors + conn.channel_errors) as info:
        for _ in range(channel_max + 1):
            leases.append(pool.acquire(block=False))
    assert len(leases) == channel_max
    assert "channel_max" in str(info.value)
    assert pool.in_use == channel_max  # the failed acquire gave its slot back
    # Giving one back makes room again; the connection survived.
    leases.pop().release(discard=True)
    with pool.acquire(block=False) as channel:
        channel.basic_qos(0, 1, False)
    for lease in leases:
        lease.release()
    assert pool.in_use == 0
    assert conn.connected


def test_next_owner_gets_the_async_error_of_a_pooled_channel(connect, queue_name):
    """Thread A publishes to a missing exchange (the server closes the channel
    asynchronously) and gives the channel back before it learns about it; A then stays idle.
    Thread B takes the same channel from the pool: its next synchronous call must not wait
    forever for a reply the server will never send (the Channel.Close was queued for A)."""
    conn = connect(channel_pool_limit=1)
    pool = conn.default_channel_pool
    a_done = threading.Event()
    a_idle = threading.Event()

    def thread_a():
        with pool.acquire() as channel:
            channel.basic_publish(channel.prepare_message(b"x"),
                                  exchange=f"missing-{queue_name}", routing_key="x")
            # The server's Channel.Close is now queued for this thread (it owns the channel);
            # it gives the channel back without draining.
            deadline = time.monotonic() + 5
            while channel._mailbox.owner.qsize() == 0 and time.monotonic() < deadline:
                time.sleep(0.005)
            queued = channel._mailbox.owner.qsize()
        a_done.set()
        a_idle.wait(30)  # alive, but never drains again
        return queued

    def thread_b():
        with pool.acquire(timeout=5) as channel:
            try:
                channel.basic_qos(0, 1, False)
            except conn.channel_errors as exc:  # being told about the close is fine too
                return f"channel error: {exc!r}"
            return "qos ok"

    a = Worker(thread_a, name="A")
    a.start()
    assert a_done.wait(10)
    b = Worker(thread_b, name="B")
    b.start()
    try:
        assert join_all([b], 3) == [], (
            "B waits forever: the Channel.Close it needs was queued in idle A's inbox")
        assert b.error is None, repr(b.error)
    finally:
        a_idle.set()
        assert join_all([a], 10) == []
        assert a.result == 1


def test_a_lease_dropped_without_release_gives_its_channel_back(connect):
    """An asynchronous exception (dramatiq's TimeLimit) can land between acquire() and the
    ``with`` block, dropping the lease unreleased. The pool must not lose that capacity: the
    next acquire() at the limit reclaims the channel (closed, never handed out again)."""
    conn = connect(channel_pool_limit=2)
    pool = conn.default_channel_pool
    for _ in range(50):
        kept = pool.acquire(timeout=5)
        dropped = pool.acquire(timeout=5)
        lost_channel = dropped.channel
        del dropped  # never released
        replacement = pool.acquire(timeout=5)  # would raise ChannelPoolLimitError if lost
        assert replacement.channel is not lost_channel
        assert not lost_channel.is_open
        replacement.channel.basic_qos(0, 1, False)
        replacement.release()
        kept.release()
    assert pool.in_use == 0


@pytest.mark.parametrize("stuck", [False, True], ids=["silent-peer", "stuck-send"])
def test_acquire_does_not_wait_for_the_close_of_a_dropped_leases_channel(connect, vhost,
                                                                          queue_name, monkeypatch,
                                                                          stuck):
    """acquire() closes the channels of dropped leases once it has its place, outside its
    timeout: each close waited for its Close-Ok, on a server that answers nothing up to
    CLOSE_OK_TIMEOUT per channel, however short the caller's timeout; and its Close, written
    as a publisher writes, waited for the write lock behind a send stuck on that peer once
    MAX_QUEUED messages were queued. Nobody waits for those channels, so their Close is only
    queued (the reader collects each channel when its Close-Ok comes, its id reserved until
    then)."""
    monkeypatch.setattr(ts_channel, "CLOSE_OK_TIMEOUT", 3600.0)  # a peer that never answers
    with Proxy() as proxy:
        conn = connect(url_for(vhost, proxy.port))
        pool = conn.default_channel_pool
        idle = pool.acquire(timeout=5)
        dropped = pool.acquire(timeout=5)
        orphan = dropped.channel
        idle.release()
        del dropped  # never released: the next acquire() closes its channel
        channel = conn.default_channel
        publisher = Worker(publish, channel, b"x" * (12 << 20), queue_name)
        if stuck:
            _stuck_send_with_the_queue_full(proxy, publisher, channel, queue_name)
        else:
            proxy.pause()
        taker = Worker(lambda: pool.acquire(timeout=1))
        try:
            start_all([taker])
            assert join_all([taker], 20) == [], "acquire() waits for an orphan's Close-Ok"
            assert taker.error is None, repr(taker.error)
            assert not orphan.is_open
        finally:
            proxy.kill()
            join_all([thread for thread in (taker, publisher) if thread.ident], 10)


def test_a_thread_gets_back_the_channel_it_gave_back(connect):
    """While its last channel is idle, a thread's acquire() hands it that one, whatever other
    threads gave back since, so a busy publisher keeps one channel and its mailbox never moves;
    a thread whose last channel is out gets another idle one."""
    conn = connect()
    pool = conn.default_channel_pool
    with pool.acquire(timeout=5) as mine:
        pass
    returned_by_other = threading.Event()
    others = []

    def other_thread():
        first = pool.acquire(timeout=5)  # takes `mine`: the only idle channel
        second = pool.acquire(timeout=5)  # a new one
        others.extend([first.channel, second.channel])
        first.release()
        second.release()  # given back last: the newest idle channel
        returned_by_other.set()

    worker = Worker(other_thread)
    start_all([worker])
    assert join_all([worker], 10) == [] and worker.error is None, repr(worker.error)
    assert returned_by_other.is_set()
    assert others[0] is mine and others[1] is not mine
    # Both are idle; `others[1]` came back last, but `mine` is this thread's last channel.
    with pool.acquire(timeout=5) as again:
        assert again is mine
        assert again.owner is threading.current_thread()
