"""Celery on the thread-safe transport, against the real server and real ``celery worker``
subprocesses (never an in-process imitation).

Two setups, each as a user would write it, with otherwise default settings and publisher
confirms: ``broker_url="shared+amqp://..."`` after ``add_shared_amqp_transport()``, and
``amqp://`` after ``monkeypatch_pyamqp_transport()``. For each: a publishing process calls
``delay()`` from 50 threads (40 each) and holds one AMQP connection (counted on the server and
with psutil); a worker (``--pool threads`` for one setup, ``--pool prefork -c 2`` for the
other, started once for the module) runs every task; it keeps its heartbeats with Celery's
synchronous loop, survives ``close_all_connections`` and answers ``inspect ping``.

Each task publishes its key to a "done" queue from the worker (a thread or a forked child),
so the test sees exactly which tasks ran.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

import kombu_pyamqp_threadsafe as ts
from stress import rabbit_admin

HEARTBEAT = 2.0
SRC = Path(__file__).resolve().parents[1] / "src"

APP = textwrap.dedent('''
    import os

    from celery import Celery
    from kombu import Queue

    import kombu_pyamqp_threadsafe as ts

    SETUP, URL = os.environ["CT_SETUP"], os.environ["CT_URL"]
    if SETUP == "shared":
        ts.add_shared_amqp_transport()
        URL = "shared+" + URL
    else:
        ts.monkeypatch_pyamqp_transport()

    app = Celery("celery_test_app", broker=URL)
    options = {"confirm_publish": True,
               "client_properties": {"connection_name": os.environ["CT_NAME"]}}
    if os.environ.get("CT_HEARTBEAT"):
        options["heartbeat"] = float(os.environ["CT_HEARTBEAT"])
    app.conf.broker_transport_options = options
    app.conf.task_default_queue = "tasks-" + SETUP
    DONE = Queue("done-" + SETUP)


    @app.task(name="record")
    def record(key):
        with app.producer_or_acquire() as producer:
            producer.publish(key, routing_key=DONE.name, declare=[DONE], serializer="json")
''')

PUBLISHER = textwrap.dedent('''
    import json
    import sys
    import threading

    import psutil

    from celery_test_app import record

    run, threads, each = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    errors = []
    barrier = threading.Barrier(threads)


    def publish(index):
        try:
            barrier.wait(30)
            for n in range(each):
                record.delay(f"{run}-{index}-{n}")
        except BaseException as exc:
            errors.append(repr(exc))


    workers = [threading.Thread(target=publish, args=(i,)) for i in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(120)
    sockets = [c for c in psutil.Process().net_connections(kind="tcp")
               if c.raddr and c.raddr.port == 5672 and c.status == psutil.CONN_ESTABLISHED]
    print(json.dumps({"errors": errors[:5], "error_count": len(errors),
                      "sockets": len(sockets)}), flush=True)
    sys.stdin.readline()  # the test counts our connections on the server meanwhile
''')


@dataclass
class Setup:
    name: str
    pool: list[str]
    env: dict[str, str]
    worker: subprocess.Popen | None = None
    log: list[str] = field(default_factory=list)
    ready: threading.Event = field(default_factory=threading.Event)

    @property
    def worker_name(self) -> str:
        return self.env["CT_NAME"] + "-worker"

    def celery(self, *args: str, name: str | None = None, **kwargs: object) -> subprocess.Popen:
        env = dict(self.env, CT_NAME=name or self.env["CT_NAME"])
        return subprocess.Popen([sys.executable, "-m", "celery", "-A", "celery_test_app", *args],
                                env=env, **kwargs)  # type: ignore[call-overload]


def _start_worker(setup: Setup) -> None:
    setup.worker = setup.celery(
        "worker", "-l", "info", "-E", "--without-mingle", "-n", f"{setup.name}@%h", *setup.pool,
        name=setup.worker_name, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    stderr = setup.worker.stderr
    assert stderr is not None

    def follow() -> None:
        for line in stderr:
            setup.log.append(line)
            if " ready." in line:
                setup.ready.set()

    threading.Thread(target=follow, daemon=True).start()


@pytest.fixture(scope="module")
def setups(amqp_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Setup]]:
    directory = tmp_path_factory.mktemp("celery_app")
    (directory / "celery_test_app.py").write_text(APP)
    (directory / "publisher.py").write_text(PUBLISHER)
    tag = uuid.uuid4().hex[:8]
    base = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), str(directory)]),
            "CT_URL": amqp_url}
    found = {
        "shared": Setup("shared", ["--pool", "prefork", "-c", "2"],
                        dict(base, CT_SETUP="shared", CT_NAME=f"ct-shared-{tag}")),
        "patched": Setup("patched", ["--pool", "threads", "-c", "8"],
                         dict(base, CT_SETUP="patched", CT_NAME=f"ct-patched-{tag}")),
    }
    for setup in found.values():
        setup.env["CT_DIR"] = str(directory)
        # Heartbeats every 2 s, so that a worker whose heartbeats stopped is cut within the test.
        setup.env["CT_HEARTBEAT"] = str(HEARTBEAT)
        _start_worker(setup)
    try:
        for setup in found.values():
            assert setup.ready.wait(60), "".join(setup.log[-30:])
        yield found
    finally:
        for setup in found.values():
            if setup.worker is not None:
                setup.worker.terminate()
        for setup in found.values():
            if setup.worker is not None:
                try:
                    setup.worker.wait(20)
                except subprocess.TimeoutExpired:
                    setup.worker.kill()


def _start_publisher(setup: Setup, run: str, threads: int, each: int) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(Path(setup.env["CT_DIR"]) / "publisher.py"), run, str(threads),
         str(each)],
        env=dict(setup.env, CT_HEARTBEAT=""), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        text=True)


def _publish(setup: Setup, run: str, threads: int, each: int, vhost: str | None) -> dict:
    """Run the publishing process; return its report and (given ``vhost``) its server-side
    connections (their heartbeat timeouts)."""
    return _finish(setup, _start_publisher(setup, run, threads, each), vhost)


def _finish(setup: Setup, publisher: subprocess.Popen, vhost: str | None) -> dict:
    assert publisher.stdin is not None and publisher.stdout is not None
    try:
        line = publisher.stdout.readline()
        assert line, "publisher exited without a report"
        report = json.loads(line)
        if vhost is not None:
            report["timeouts"] = [row.get("timeout")
                                  for row in _connections(vhost, setup.env["CT_NAME"])]
        publisher.stdin.write("\n")
        publisher.stdin.flush()
        assert publisher.wait(30) == 0
    finally:
        if publisher.poll() is None:
            publisher.kill()
    return report


def _all_connections(vhost: str) -> dict[str, list[dict]]:
    """The vhost's server-side connections (peer_port, timeout) by connection name."""
    rows = rabbit_admin._json_rows("list_connections", "client_properties", "vhost", "peer_port",
                                   "timeout")
    found: dict[str, list[dict]] = {}
    for row in rows:
        if row.get("vhost") == vhost:
            name = rabbit_admin.table_to_dict(row.get("client_properties")).get("connection_name")
            found.setdefault(name, []).append(row)
    return found


def _connections(vhost: str, name: str) -> list[dict]:
    return _all_connections(vhost).get(name, [])


def _collect_done(setup: Setup, amqp_url: str, expected: set[str], timeout: float = 60) -> set:
    """Keys the worker's tasks published, until all of ``expected`` arrived or ``timeout``."""
    got: set[str] = set()
    conn = ts.KombuConnection(amqp_url)
    try:
        with conn.SimpleQueue("done-" + setup.name) as queue:
            deadline = time.monotonic() + timeout
            while not expected <= got and time.monotonic() < deadline:
                try:
                    message = queue.get(timeout=1)
                except queue.Empty:
                    continue
                got.add(message.payload)
                message.ack()
    finally:
        conn.release()
    return got


@pytest.mark.parametrize("name", ["shared", "patched"])
def test_delay_from_50_threads_on_one_connection_and_worker_runs_all(
        setups: dict[str, Setup], name: str, amqp_url: str, vhost: str) -> None:
    setup = setups[name]
    run = uuid.uuid4().hex[:6]
    report = _publish(setup, run, threads=50, each=40, vhost=vhost)
    assert report["error_count"] == 0, report["errors"]
    assert report["sockets"] == 1, report
    # One connection on the server, with heartbeats on at default settings (Celery asks for
    # none; the reader thread ticks them).
    assert report["timeouts"] == [ts.transport.DEFAULT_HEARTBEAT], report
    expected = {f"{run}-{i}-{n}" for i in range(50) for n in range(40)}
    got = _collect_done(setup, amqp_url, expected)
    assert expected - got == set()
    assert setup.worker is not None and setup.worker.poll() is None


def test_worker_keeps_heartbeats_with_celerys_synchronous_loop(
        setups: dict[str, Setup], vhost: str) -> None:
    """Celery's synloop ticks no heartbeats (it asks for none); ours are ticked by the reader
    thread: each worker's connections stay up across three idle heartbeat intervals."""
    listed = _all_connections(vhost)
    before = {name: listed.get(setup.worker_name, []) for name, setup in setups.items()}
    for name, rows in before.items():
        assert rows, f"{name}: no worker connection"
        assert {row["timeout"] for row in rows} == {HEARTBEAT}, rows
    # A consumer and a publisher connection in the main process (prefork children add theirs).
    assert len(before["patched"]) == 2, before["patched"]
    time.sleep(3 * HEARTBEAT)
    listed = _all_connections(vhost)
    for name, setup in setups.items():
        after = {row["peer_port"] for row in listed.get(setup.worker_name, [])}
        assert {row["peer_port"] for row in before[name]} <= after, name
        assert setup.worker is not None and setup.worker.poll() is None


def test_workers_survive_close_all_connections_and_answer_ping(
        setups: dict[str, Setup], amqp_url: str, vhost: str) -> None:
    assert rabbit_admin.close_all_connections("test: close all", vhost=vhost) >= 2
    runs = {name: uuid.uuid4().hex[:6] for name in setups}
    publishers = {name: _start_publisher(setup, runs[name], 4, 25)
                  for name, setup in setups.items()}
    pings = {name: setup.celery("inspect", "ping", "-d", f"{name}@{os.uname().nodename}",
                                "--timeout", "10", name=setup.env["CT_NAME"] + "-ping",
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for name, setup in setups.items()}
    for name, setup in setups.items():
        report = _finish(setup, publishers[name], None)
        assert report["error_count"] == 0, report["errors"]
        expected = {f"{runs[name]}-{i}-{n}" for i in range(4) for n in range(25)}
        assert expected - _collect_done(setup, amqp_url, expected) == set()
        out, _ = pings[name].communicate(timeout=60)
        assert pings[name].returncode == 0 and "pong" in out, out
        assert setup.worker is not None and setup.worker.poll() is None
