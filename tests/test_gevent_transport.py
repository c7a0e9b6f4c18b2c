"""The transport under gevent's ``monkey.patch_all()`` (issue 15, the transport half).

Each test runs a scenario of ``gevent_child.py`` in a child process (the patch is for the whole
process, and must come before anything else is imported), against the real RabbitMQ (session
vhost). A wait that blocks the OS thread where gevent cannot see it stops every greenlet, the
timers included, so the child is bounded from here too: a hang fails the test with what the
child printed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from stress.bounded import run_bounded
from test_transport_tls import tls_files, tls_proxy  # noqa: F401 - fixtures
from transport_helpers import Proxy, url_for

CHILD = Path(__file__).with_name("gevent_child.py")
#: Bound of one child process (s); the scenarios take a few seconds.
CHILD_TIMEOUT = 90


def run_child(scenario: str, *args: str, import_first: bool = False) -> dict[str, Any]:
    env = dict(os.environ)
    if import_first:
        env["GEVENT_CHILD_IMPORT_FIRST"] = "1"
    try:
        proc = subprocess.run([sys.executable, str(CHILD), scenario, *args], env=env,
                              capture_output=True, text=True, timeout=CHILD_TIMEOUT)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"the {scenario} scenario hung under gevent for {CHILD_TIMEOUT} s\n"
                    f"stdout: {exc.stdout!r}\nstderr: {exc.stderr!r}")
    assert proc.returncode == 0, (
        f"exit {proc.returncode}\nstdout: {proc.stdout}\nstderr: {proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def assert_one_connection_served_all(result: dict[str, Any]) -> None:
    """What the transport scenario must have seen (see gevent_child.transport)."""
    assert result["received"] == result["published"] == result["distinct"], result
    assert result["passive_declare"] == "NotFound", result
    assert result["sockets"] == 1 and result["registry_connections"] == 1, result
    assert result["heartbeat"] == 1, result
    assert result["alive_after_idle"] and result["sockets_after_idle"] == 1, result


@pytest.mark.parametrize("import_first", [False, True], ids=["patched-first", "imported-first"])
def test_many_greenlets_share_one_connection(amqp_url, connection_name, import_first):
    """200 greenlets publish with confirms on one connection while one consumes: everything
    arrives once, over one socket; a passive declare of a missing queue fails in its own
    greenlet only; heartbeats keep the connection up through 2.5 idle intervals while a
    greenlet waits in drain_events() with no timeout. Also with the transport imported before
    the patch (its module-level locks and thread-locals then are the real ones). Before the
    fix the first reply wait read its eventfd and stopped every greenlet: the child hung."""
    result = run_child("transport", amqp_url, connection_name, import_first=import_first)
    assert_one_connection_served_all(result)


def test_many_greenlets_share_one_connection_over_tls(tls_files, tls_proxy, vhost,  # noqa: F811
                                                      connection_name):
    """The same over amqps:// (TLSSocket: memory BIOs, the raw socket read and written by the
    transport itself) through a TLS-terminating proxy in front of the server."""
    url = url_for(vhost, tls_proxy.port, scheme="amqps", host="localhost")
    result = run_child("transport", url, connection_name, tls_files["ca"])
    assert_one_connection_served_all(result)


def test_kombu_broker_worker_with_200_greenlets(amqp_url, connection_name):
    """A plain dramatiq Worker with 200 worker greenlets on KombuBroker processes 500 messages
    of an actor chain (each sent on from a worker greenlet, with confirms) over the broker's
    two connections, leaves nothing in the queues and stops within its bound. Before the fix
    the worker processed nothing: the first wait read the eventfd and stopped every greenlet."""
    result = run_child("broker", amqp_url, connection_name)
    assert result["finished"] == result["sent"] == result["distinct"], result
    assert result["sockets"] == 2, result
    assert result["worker_stopped"], result
    assert all(counts == [0, 0, 0] for counts in result["left"].values()), result
    assert result["sockets_after_close"] == 0, result


def test_default_channels_of_ended_greenlets_are_closed(amqp_url, connection_name):
    """300 greenlets from gevent.spawn, 10 at a time, each use their default channel and end:
    as for threads, a new default channel closes those of the greenlets that ended, so the
    connection holds one wave's worth. Before the fix all 300 stayed open (a spawned
    greenlet's dummy Thread says is_alive() forever), on the way to channel_max."""
    result = run_child("short_lived", amqp_url, connection_name)
    assert result["open_channels"] <= result["at_once"] + 1, result


def test_channel_pool_release_does_not_yield_holding_its_lock():
    """Giving a channel back lets no other greenlet run while the pool's lock is held. Before
    the fix each release's notify() asked a plain Lock whether it was held, by a failed
    acquire(blocking=False), which under gevent yields: after a forced close the sending
    greenlets queued on the pool's lock one hub iteration apiece, and their sends raised the
    old connection's failure their whole retry budget later (docs/gevent-findings.md, 3)."""
    result = run_child("pool_release")
    assert result == {"releases": 200, "releases_that_yielded": 0, "in_use": 0}, result


def test_tls_read_of_an_incomplete_record_does_not_wait():
    """The reader's TLS read with less than a record arrived raises SSLWantReadError at once,
    so the reader polls again and keeps ticking heartbeats. Before the fix gevent's socket
    turned the MSG_DONTWAIT read into a wait for the rest of the record (here: forever)."""
    assert run_child("tls_read_nowait")["outcome"] == "SSLWantReadError"


def test_fork_while_greenlets_publish(amqp_url, connection_name):
    """gevent's fork keeps every greenlet, unlike threads: in the child the 10 inherited
    publishers, waiting for confirms that cannot come, get ConnectionLostError at once, and a
    new connection serves the child; the parent's publishers go on over its one socket.
    Before the fix the inherited publishers slept until their publish timeout."""
    result = run_child("fork", amqp_url, connection_name)
    assert "error" not in result, result
    assert result["inherited"] == ["ConnectionLostError"] * 10, result
    assert result["child_connections"] == 1 and result["child_sockets"] == 1, result
    assert result["child_exit"] == 0, result
    assert result["parent_publishers"] == ["stopped"] * 10, result
    assert result["parent_sockets"] == 1, result


def test_time_limits_interrupting_publishers(amqp_url, connection_name):
    """dramatiq's time limit under gevent lands at a greenlet's next yield, in the transport's
    waits (a confirm, a reply) and writes: 20 actors publishing without pause are each
    interrupted, and 200 messages sent afterwards are all processed on the same broker."""
    result = run_child("time_limits", amqp_url, connection_name)
    assert result["interrupted"] == result["floods"], result
    assert result["markers_processed"] == result["markers"], result
    assert result["worker_stopped"], result


def test_greenlets_publishing_at_once_share_sendmsg_calls(amqp_url, connection_name):
    """50 greenlets woken at once each publish with confirms: their messages leave in fewer
    sendmsg calls than messages (the writer holds the lock through one yield, so the others
    queue behind it). A greenlet interrupted as it resumes from that yield, with another's
    message queued behind its own, lets go of the lock and writes both once before its
    exception goes on. Before the change every publish had its own sendmsg (50 calls) and
    no publish yielded in the writer."""
    result = run_child("write_batching", amqp_url, connection_name)
    assert result["batch_sendmsg"] < result["publishers"] // 2, result
    assert result["interrupted"] == {"outcome": "Interrupt", "in_writer": True,
                                     "queued_after": 0, "lock_free_after": True}, result
    assert result["queued_while_yielding"] == 1, result
    assert result["queued"] == result["expected"], result
    assert result["connection_alive"], result


UNPATCHED = '''
import sys
import kombu_pyamqp_threadsafe as ts
from kombu_pyamqp_threadsafe import inbox
conn = ts.KombuConnection(sys.argv[1])
conn.ensure_connection(max_retries=3)
channel = conn.default_channel
channel.queue_declare("", exclusive=True)
wakeup = conn.connection._current_inbox()._wakeup
conn.close()
assert isinstance(wakeup, inbox.Wakeup), type(wakeup)
assert "gevent" not in sys.modules, "gevent imported by a process that did not patch"
print("OK")
'''


def test_threads_path_does_not_import_gevent(amqp_url):
    """Without the patch the transport keeps its eventfd wake-up and never imports gevent
    (installed here), so threads pay nothing for the gevent path."""
    proc = subprocess.run([sys.executable, "-c", UNPATCHED, amqp_url], capture_output=True,
                          text=True, timeout=CHILD_TIMEOUT)
    assert proc.returncode == 0 and proc.stdout.strip() == "OK", (
        f"exit {proc.returncode}\nstdout: {proc.stdout}\nstderr: {proc.stderr}")


def test_native_threads_beside_greenlets(amqp_url, connection_name):
    """Threads of gevent's thread pool (each with its own hub) publish with confirms on the
    connection beside greenlets, woken across hubs. Before the fix their first reply wait,
    without a timeout, on a hub with nothing else to do raised LoopExit ("This operation
    would block forever")."""
    result = run_child("native_threads", amqp_url, connection_name)
    assert result["published"] == result["queued"] == 8 * 100, result


def test_silent_peer_fails_every_waiting_greenlet(vhost, connection_name):
    """The proxy stops forwarding (sockets stay open): a greenlet draining with no timeout,
    one waiting for a confirm and one blocked in a send all get a recoverable error within
    three heartbeat intervals: the reader, never blocked by a send, counts the missed
    heartbeats and fails the connection, whose shutdown wakes the blocked writer."""
    with Proxy() as proxy:
        url = url_for(vhost, proxy.port)
        child = subprocess.Popen([sys.executable, str(CHILD), "silent_peer", url,
                                  connection_name], stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            assert child.stdout is not None and child.stdin is not None
            ready = run_bounded(child.stdout.readline, CHILD_TIMEOUT, "the child's ready line")
            assert ready.strip() == "ready", ready
            proxy.pause()
            child.stdin.write("go\n")
            child.stdin.flush()
            stdout, stderr = child.communicate(timeout=CHILD_TIMEOUT)
        finally:
            if child.poll() is None:
                child.kill()
                child.wait()
    assert child.returncode == 0, f"exit {child.returncode}\nstdout: {stdout}\nstderr: {stderr}"
    result = json.loads(stdout.strip().splitlines()[-1])
    heartbeat = result["heartbeat"]
    for _name, took, recoverable in result["outcomes"]:
        assert recoverable and took < 3 * heartbeat + 1, result
