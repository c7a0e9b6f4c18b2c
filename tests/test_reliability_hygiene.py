"""Resource hygiene: faults leave nothing behind, and an idle worker stays connected.

* The fault loop (close all connections, reset the network, close one consumer's channel,
  silence the network) leaves threads, file descriptors, server connections and server
  channels where they began. ``python -m stress.faults --loops 50`` runs it 50 times.
* A worker left idle keeps its two connections (heartbeats, no reconnect) and still consumes.
  Here for three heartbeat intervals of 2 s; ``python -m stress.faults --idle 600`` for ten
  minutes with the default heartbeat.
* Threads that used a channel and ended leave no file descriptor open.
* An interrupt (dramatiq's TimeLimit) landing at any bytecode of a publisher waiting out a
  connection.blocked, or a TLS renegotiation, leaves no lock held that the reader needs,
  and comes out as itself.
"""

from __future__ import annotations

import dis
import gc
import linecache
import os
import socket
import ssl
import sys
import threading
import uuid
from collections.abc import Callable
from functools import partial
from types import FrameType
from typing import Any

import pytest

from kombu_pyamqp_threadsafe.flow import FlowControl, PublishBlockedError
from kombu_pyamqp_threadsafe.tls import TLSSocket
from stress.fault_scenarios.context import PYTEST_SCALE, Context
from stress.fault_scenarios.hygiene import fault_loop
from stress.fault_scenarios.idle import idle_case
from transport_helpers import kombu_connection

LOOPS = 4


@pytest.fixture
def ctx(amqp_url, vhost):
    return Context(amqp_url, vhost, PYTEST_SCALE)


@pytest.mark.timeout(240)
def test_fault_loop_leaves_threads_fds_and_channels_where_they_began(ctx):
    hygiene = fault_loop(ctx, LOOPS, heartbeat=2.0)
    result = hygiene.result
    print("\n" + hygiene.table())
    assert sum(hygiene.faults.values()) == LOOPS + 1, hygiene.faults
    assert hygiene.problems == [], (hygiene.table(), result.explain())
    assert result.lost == 0, result.explain()
    assert result.unexpected_logs == [], result.explain()
    assert hygiene.after.threads <= hygiene.before.threads, hygiene.table()
    assert hygiene.after.kinds["socket"] <= hygiene.before.kinds["socket"], hygiene.table()
    assert hygiene.after.connections == hygiene.before.connections, hygiene.table()
    consumer = [name for name in hygiene.before.channels if name.endswith("-consumer")]
    assert [hygiene.after.channels[name] for name in consumer] == [
        hygiene.before.channels[name] for name in consumer], hygiene.table()


@pytest.mark.timeout(120)
def test_idle_worker_stays_connected_and_consumes(ctx):
    heartbeat = 2.0
    idle = idle_case(ctx, 3 * heartbeat, heartbeat=heartbeat)
    assert idle.server_heartbeat == [heartbeat, heartbeat], idle
    assert idle.problems == [], idle
    assert idle.latency_after is not None and idle.latency_after < 2.0, idle


def _descriptors() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_threads_that_used_a_channel_leave_no_descriptor_behind(amqp_url):
    """A thread that opened a channel, used it, closed it and ended leaves no file descriptor
    open, without waiting for Python's cyclic garbage collector (which may not run for a
    long time in a busy process: a thread per request would run out of descriptors)."""
    conn = kombu_connection(amqp_url, f"hygiene-{uuid.uuid4().hex[:6]}",
                            transport_options={"confirm_publish": True})
    conn.ensure_connection(max_retries=3)

    def use_a_channel() -> None:
        channel = conn.channel()
        channel.basic_publish(channel.prepare_message(b"x"), exchange="", routing_key="nowhere")
        channel.close()

    enabled = gc.isenabled()
    try:
        use_a_channel()  # warm-up in this thread
        gc.collect()
        before = _descriptors()
        gc.disable()  # what a process sees between two runs of the cyclic GC
        for _ in range(100):
            thread = threading.Thread(target=use_a_channel)
            thread.start()
            thread.join()
        after = _descriptors()
    finally:
        if enabled:
            gc.enable()
        conn.close()
    assert after <= before + 2, (
        f"{after - before} descriptors left open by 100 ended threads (freed only by the "
        f"cyclic GC)")


_NOP = dis.opmap["NOP"]


def _passed_over(frame: FrameType) -> bool:
    if frame.f_code.co_code[frame.f_lasti] == _NOP:
        return True
    lineno = frame.f_lineno
    line = linecache.getline(frame.f_code.co_filename, lineno).strip() if lineno else ""
    return line.startswith("with ") and line.endswith("lock:")


class Interrupt(BaseException):
    """Stands for dramatiq's TimeLimit, raised at one chosen bytecode."""


def _interrupt_at(nth: int, call: Callable[[], object]) -> BaseException | None:
    """Run ``call`` raising Interrupt at the ``nth`` opcode it (and what it calls) executes;
    returns what came out (None when it returned).

    Passed over, as CPython delivers async exceptions only at calls and backward jumps: NOPs
    (3.11 leaves the NOP of a ``try:`` opening a ``with`` body outside the ``with``'s
    handler) and the glue of ``with <a C lock>:`` around its C enter and exit.
    """
    seen = 0

    def trace(frame: FrameType, event: str, arg: Any) -> Any:
        nonlocal seen
        frame.f_trace_opcodes = True
        if event == "opcode" and not _passed_over(frame):
            seen += 1
            if seen == nth:
                raise Interrupt(nth)
        return trace

    previous = sys.gettrace()
    sys.settrace(trace)
    try:
        call()
    except BaseException as exc:
        return exc
    finally:
        sys.settrace(previous)
    return None


def _returns(action: Callable[[], object]) -> bool:
    """Whether ``action`` returns within 5 s in another thread (as the reader would run it)."""
    done = threading.Event()

    def run() -> None:
        action()
        done.set()

    threading.Thread(target=run, daemon=True).start()
    return done.wait(5.0)


@pytest.mark.parametrize("wake", ["unblock", "end"])
def test_publisher_interrupted_anywhere_in_a_blocked_wait_leaves_the_reader_free(wake):
    outcome: BaseException | None = Interrupt(0)
    nth = 0
    while isinstance(outcome, Interrupt):
        nth += 1
        assert nth < 10_000, "the wait never completed"
        flow = FlowControl("test", timeout=0.01)
        flow.block("low on memory")
        outcome = _interrupt_at(nth, flow.wait_before_write)
        assert isinstance(outcome, (Interrupt, PublishBlockedError)), (nth, outcome)
        assert _returns(getattr(flow, wake)), f"{wake}() hangs after an interrupt at {nth}"
        assert not flow.blocked
        flow.wait_before_write()
    assert nth > 1


class _Renegotiating:
    """An SSLObject in a TLS 1.2 renegotiation that never completes: every write wants a read."""

    def write(self, data: object) -> int:
        raise ssl.SSLWantReadError("renegotiating")


def test_write_interrupted_anywhere_in_a_renegotiation_wait_leaves_the_tls_lock_free():
    outcome: BaseException | None = Interrupt(0)
    nth = 0
    while isinstance(outcome, Interrupt):
        nth += 1
        assert nth < 10_000, "the wait never completed"
        ours, theirs = socket.socketpair()
        with ours, theirs:
            tls = TLSSocket(ours, ssl.create_default_context(), timeout=0.01)
            tls._ssl = _Renegotiating()
            outcome = _interrupt_at(nth, partial(tls._encrypt, [b"payload"]))
            assert isinstance(outcome, (Interrupt, TimeoutError)), (nth, outcome)
            # What the reader takes to decrypt (and wake a renegotiating write).
            assert tls._tls_lock.acquire(blocking=False), f"TLS lock leaked at {nth}"
            tls._tls_lock.release()
    assert nth > 1
