"""Node loss under load on the local 3-node cluster (``scripts/rabbitmq-cluster``).

Shared by ``tests/test_cluster.py`` (short durations) and ``python -m stress.faults --cluster``
(the issue's durations, and the table in the README). Each case runs a real ``dramatiq.Worker``
(64 threads) on a broker given the three nodes' URLs, streams ids from 8 sending threads, injects
one fault on a node and returns a :class:`ClusterResult`: sent, processed, lost (sent, never
processed), duplicates (processed more than once: allowed, counted), the longest single send,
and the recovery time: from the moment the fault began until a message sent after it was
accepted and processed (so a broker that waits for the dead node to come back recovers only
after ``down`` seconds).

Brokers: ``kombu-quorum`` (KombuBroker, quorum queues), ``kombu-classic`` (KombuBroker, classic
queues) and ``rabbitmq-classic`` (dramatiq's RabbitmqBroker, pika, classic queues: it has no
quorum option). The bookkeeping (ledger, senders, log watch) is ``fault_scenarios``'.

:class:`Cluster` drives ``scripts/rabbitmq-cluster`` and administers the nodes with
``rabbitmqctl -n NODE`` through it (``scripts/rabbitmq-cluster ctl N ...``), always asking a
node that is up. Facts used here (RabbitMQ 3.10, checked on the cluster): ``list_connections``
has no node column (and its JSON pids do not name the node), but its ``port`` is the node's AMQP
port;
``list_queues`` gives a quorum queue's ``leader`` and, in its text output, a classic queue's
``pid`` as ``<kc2@localhost.1701.1234.0>``, which names the node; a quorum queue's leader
starts on the node of the client that declared it.

Cases: ``kill`` (kill -9 of the node holding the consumer connection and the queue's leader,
restarted ``down`` s later), ``freeze`` (the same node SIGSTOPped for ``freeze`` s, a short
heartbeat), ``rolling`` (stop_app/start_app of each node in turn), ``cancel`` (the queue is
deleted on the cluster: the server cancels the consumer, which must declare the queue again),
``classic-kill`` (a classic queue's node is killed and restarted).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import re
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any
from urllib.parse import quote

import dramatiq
from dramatiq.brokers.rabbitmq import RabbitmqBroker

from dramatiq_kombu_broker import KombuBroker
from stress import rabbit_admin
from stress.bounded import run_bounded
from stress.fault_scenarios.context import Context, Scale
from stress.fault_scenarios.ledger import ACTOR_PREFIX, PROBE_BASE, Ledger, Track, work_message
from stress.fault_scenarios.log_watch import LogWatch, watching
from stress.fault_scenarios.results import FaultResult, fmt_seconds
from stress.fault_scenarios.senders import Senders

now = time.monotonic


# ----------------------------------------------------------------------------- the cluster

REPO_ROOT = Path(__file__).resolve().parent.parent
SCRIPT = REPO_ROOT / "scripts" / "rabbitmq-cluster"
NODES = (1, 2, 3)
PREFIX = "kc"
AMQP_BASE = 5690

_NODE_RE = re.compile(rf"{PREFIX}([1-3])@")


class ClusterError(RuntimeError):
    """The cluster script failed (its output says why)."""


def node_index(text: str) -> int:
    """The node number named in ``text`` (a node name, or a pid like ``<kc2@localhost.1.2.3>``)."""
    found = _NODE_RE.search(text)
    if found is None:
        raise ValueError(f"no cluster node named in {text!r}")
    return int(found.group(1))


class Cluster:
    """The three nodes; :attr:`down` holds the nodes killed, frozen or stopped through it."""

    def __init__(self, script: Path = SCRIPT) -> None:
        self.script = script
        self.down: set[int] = set()

    # -- the script -----------------------------------------------------------------------

    def run(self, *args: str, timeout: float = 240) -> str:
        try:
            proc = subprocess.run([str(self.script), *args], capture_output=True, text=True,
                                  timeout=timeout, stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired as exc:
            raise ClusterError(f"{self.script.name} {' '.join(args)} timed out after "
                               f"{timeout} s") from exc
        if proc.returncode != 0:
            raise ClusterError(f"{self.script.name} {' '.join(args)} exited with "
                               f"{proc.returncode}: {proc.stderr.strip()} {proc.stdout.strip()}")
        return proc.stdout

    def running(self) -> bool:
        """All three nodes run as one cluster."""
        try:
            self.run("status", timeout=60)
        except ClusterError:
            return False
        return True

    def start(self) -> None:
        self.run("start")
        self.down.clear()

    def stop(self) -> None:
        self.run("stop", timeout=120)

    def kill(self, node: int) -> None:
        """``kill -9`` of the node's VM (returns once it is gone)."""
        self.down.add(node)
        self.run("kill", str(node))

    def freeze(self, node: int) -> None:
        self.down.add(node)
        self.run("freeze", str(node))

    def thaw(self, node: int) -> None:
        self.run("thaw", str(node))
        self.down.discard(node)

    def restart(self, node: int) -> None:
        """Bring the node back (after kill, freeze or stop_app) and wait until it runs."""
        self.run("restart", str(node))
        self.down.discard(node)

    def stop_app(self, node: int) -> None:
        self.down.add(node)
        self.ctl("stop_app", node=node, timeout=120)

    def start_app(self, node: int) -> None:
        """``rabbitmqctl start_app``, which returns once the app runs."""
        self.ctl("start_app", node=node, timeout=180)
        self.down.discard(node)

    def heal(self) -> None:
        """Every node up again (after a test that failed half-way)."""
        for node in sorted(self.down):
            self.restart(node)

    # -- addresses ------------------------------------------------------------------------

    @staticmethod
    def node_name(node: int) -> str:
        return f"{PREFIX}{node}@localhost"

    @staticmethod
    def port(node: int) -> int:
        return AMQP_BASE + node

    def url(self, node: int, vhost: str = "/", *, user: str = "guest",
            password: str = "guest", query: str = "") -> str:
        credentials = f"{quote(user, safe='')}:{quote(password, safe='')}"
        url = f"amqp://{credentials}@127.0.0.1:{self.port(node)}/{quote(vhost, safe='')}"
        return f"{url}?{query}" if query else url

    def urls(self, vhost: str = "/", **kwargs: Any) -> list[str]:
        return [self.url(node, vhost, **kwargs) for node in NODES]

    # -- administration -------------------------------------------------------------------

    def live_node(self) -> int:
        for node in NODES:
            if node not in self.down:
                return node
        raise ClusterError("every node of the cluster is down")

    def ctl(self, *args: str, node: int | None = None, timeout: float = 60) -> str:
        """``rabbitmqctl ARGS`` against ``node`` (default: the first node that is up)."""
        return self.run("ctl", str(node or self.live_node()), *args, timeout=timeout)

    def rows(self, *args: str, node: int | None = None) -> list[dict[str, Any]]:
        text = self.ctl(*args, "--formatter", "json", "--quiet", node=node).strip()
        return json.loads(text) if text else []

    def add_vhost(self, name: str) -> None:
        self.ctl("add_vhost", name)
        self.ctl("set_permissions", "-p", name, "guest", ".*", ".*", ".*")

    def delete_vhost(self, name: str) -> None:
        self.ctl("delete_vhost", name, timeout=120)

    def connection_nodes(self, vhost: str) -> dict[str, list[int]]:
        """The node of each connection of ``vhost``, by client connection_name."""
        result: dict[str, list[int]] = {}
        for row in self.rows("list_connections", "client_properties", "vhost", "port"):
            if row.get("vhost") != vhost:
                continue
            props = rabbit_admin.table_to_dict(row.get("client_properties"))
            result.setdefault(str(props.get("connection_name")), []).append(
                int(row["port"]) - AMQP_BASE)
        return result

    def queues(self, vhost: str) -> dict[str, dict[str, Any]]:
        """``list_queues`` of ``vhost`` by name: ``type``, ``messages``, and ``node`` (the
        quorum leader or the classic queue's node, a node number; None when unknown)."""
        # The text output, not JSON: JSON shows a pid as #PID<12726.1569.0>, without its node.
        text = self.ctl("list_queues", "-p", vhost, "name", "type", "messages", "leader", "pid",
                        "--quiet", "--no-table-headers")
        result: dict[str, dict[str, Any]] = {}
        for line in text.splitlines():
            fields = line.split("\t")
            if len(fields) < 5:
                continue
            name, kind, messages, leader, pid = fields[:5]
            try:
                node: int | None = node_index(leader if leader.strip() else pid)
            except ValueError:
                node = None
            result[name] = {"type": kind, "messages": int(messages or 0) if messages.isdigit()
                            else 0, "node": node}
        return result

    def queue_node(self, vhost: str, queue: str) -> int | None:
        return self.queues(vhost).get(queue, {}).get("node")

    def wait_connections(self, vhost: str, names: list[str], timeout: float = 20,
                         avoid: int | None = None) -> dict[str, list[int]]:
        """Poll until each of ``names`` has exactly one connection (on a node other than
        ``avoid``); the last listing."""
        deadline = time.monotonic() + timeout
        while True:
            listing = self.connection_nodes(vhost)
            if all(len(listing.get(n, [])) == 1 and avoid not in listing[n] for n in names):
                return listing
            if time.monotonic() >= deadline:
                return listing
            time.sleep(0.3)

    def delete_queue(self, vhost: str, queue: str) -> None:
        self.ctl("delete_queue", "-p", vhost, queue)


# ----------------------------------------------------------------------------- the cases


BROKERS = ("kombu-quorum", "kombu-classic", "rabbitmq-classic")


@dataclass(frozen=True)
class ClusterScale(Scale):
    """``fault_scenarios``' scale with the cluster cases' fault durations (pytest uses
    :data:`PYTEST_SCALE`)."""

    send_rate: float = 200.0
    work_ms: float = 20.0
    #: Seconds a killed node stays down before it is restarted.
    down: float = 10.0
    #: Seconds a node stays frozen (SIGSTOP).
    freeze: float = 30.0
    #: Heartbeat of the brokers in the freeze case (the other cases keep the default).
    heartbeat: float = 5.0
    #: Seconds between the nodes of a rolling restart.
    settle: float = 3.0


SCRIPT_SCALE = ClusterScale()
PYTEST_SCALE = ClusterScale(messages=1200, send_rate=300.0, down=6.0, freeze=8.0,
                            heartbeat=2.0, settle=0.5, timeout=120.0)


@dataclass
class ClusterResult(FaultResult):
    broker: str = ""
    #: The longest single send() (seconds), and how many sends raised (then retried).
    longest_send: float = 0.0
    #: Seconds from the fault's start until a message sent after it was accepted and processed.
    resumed: float | None = None
    node: int | None = None

    @property
    def recovery(self) -> float | None:
        return self.resumed

    @property
    def ok(self) -> bool:
        """Nothing lost, nothing stuck. Error logs are expected here (a node is lost)."""
        return self.lost == 0 and not self.problems and self.recovery is not None


def markdown_table(results: list[ClusterResult]) -> str:
    rows = [["fault", "broker", "sent", "processed", "lost", "duplicates", "longest send (s)",
             "recovery time (s)"],
            ["---", "---", "---:", "---:", "---:", "---:", "---:", "---:"]]
    for r in results:
        rows.append([r.fault, r.broker, str(r.sent), str(r.processed), str(r.lost),
                     str(r.duplicates), f"{r.longest_send:.1f}", fmt_seconds(r.recovery)])
    return "\n".join("| " + " | ".join(row) + " |" for row in rows)


def details_table(results: list[ClusterResult]) -> str:
    rows = [["fault", "broker", "send retries", "duration (s)", "notes"],
            ["---", "---", "---:", "---:", "---"]]
    for r in results:
        rows.append([r.fault, r.broker, str(r.send_retries), f"{r.duration:.0f}",
                     "; ".join(r.notes + r.problems)])
    return "\n".join("| " + " | ".join(row) + " |" for row in rows)


def make_broker(kind: str, urls: list[str], name: str, heartbeat: float | None) -> Any:
    """A broker of ``kind`` on ``urls`` (the failover list)."""
    if kind == "rabbitmq-classic":
        query = f"heartbeat={int(heartbeat)}" if heartbeat else ""
        # pika's URLParameters: the connection tries the URLs in order.
        return RabbitmqBroker(url=[f"{u}?{query}" if query else u for u in urls],
                              confirm_delivery=True)
    options: dict[str, Any] = {"connection_name": name, "connect_timeout": 3}
    if heartbeat:
        # A hung node: its connections are left through heartbeats, and a confirm its queue
        # leader holds is given up after as long (the send is retried, then raises).
        options["heartbeat"] = heartbeat
        options["confirm_timeout"] = 2 * heartbeat
    if kind == "kombu-quorum":
        options["queue_type"] = "quorum"
    return KombuBroker(url=urls, **options)


class ClusterRun:
    """A broker of ``kind`` with a 64-thread worker on one queue of the cluster, a ledger of
    every processing, timed sends, and probes that measure when the broker works again."""

    def __init__(self, cluster: Cluster, vhost: str, kind: str, scale: ClusterScale, *,
                 heartbeat: float | None = None, watch: LogWatch | None = None,
                 elsewhere: bool = False) -> None:
        self.cluster = cluster
        self.vhost = vhost
        self.kind = kind
        self.scale = scale
        self.heartbeat = heartbeat
        self.watch = watch
        #: Put the queue on another node than the consumer connection's.
        self.elsewhere = elsewhere
        self.name = f"cluster-{kind}-{uuid.uuid4().hex[:6]}"
        self.queue = f"cq-{uuid.uuid4().hex[:6]}"
        self.actor_name = f"{ACTOR_PREFIX}_{self.queue.replace('-', '_')}"
        self.ledger = Ledger()
        self.broker = make_broker(kind, cluster.urls(vhost), self.name, heartbeat)
        self.broker.add_middleware(Track(self.ledger))
        work_s = scale.work_ms / 1000

        def work(mid: int) -> None:
            time.sleep(work_s)

        dramatiq.actor(work, broker=self.broker, actor_name=self.actor_name,
                       queue_name=self.queue, max_retries=0)
        self.worker = dramatiq.Worker(self.broker, worker_threads=scale.threads,
                                      worker_timeout=100)
        self._lock = threading.Lock()  # guards longest_send and _probes
        self.longest_send = 0.0
        self._probes = 0
        self.senders: list[Senders] = []
        self.started = 0.0
        self.home: int | None = None
        #: Where the connections and the queue were when the fault began (for the notes).
        self.placement = ""

    @property
    def consumer_name(self) -> str:
        return f"{self.name}-consumer"

    def send(self, mid: int) -> None:
        started = now()
        try:
            self.broker.enqueue(work_message(self.queue, mid, self.actor_name))
        finally:
            took = now() - started
            with self._lock:
                self.longest_send = max(self.longest_send, took)

    @property
    def producer_name(self) -> str:
        return f"{self.name}-producer"

    def _home_node(self) -> int:
        """The node the consumer connection is on (RabbitmqBroker: every connection goes to
        the first URL that answers, node 1 when all are up)."""
        if not isinstance(self.broker, KombuBroker):
            return NODES[0]
        self.broker.consumer_connection.ensure_connection(max_retries=3)
        listing = self.cluster.wait_connections(self.vhost, [self.consumer_name])
        return listing[self.consumer_name][0]

    def start(self) -> ClusterRun:
        """Declare the queue on the consumer connection's node (so its leader, or a classic
        queue's home, is there: :attr:`home`, the node the faults hit; with ``elsewhere`` on
        the next node), then start the worker."""
        self.home = self._home_node()
        if self.elsewhere:
            self.home = self.home % len(NODES) + 1
        placer = make_broker(self.kind, [self.cluster.url(self.home, self.vhost)],
                             f"{self.name}-placer", None)
        try:
            placer.declare_queue(self.queue, ensure=True)
        finally:
            placer.close()
        self.started = now()
        self.worker.start()
        return self

    def stream(self, ids: list[int]) -> Senders:
        senders = Senders(self.send, ids, self.scale.senders, self.scale.send_rate,
                          self.ledger, deadline=now() + self.scale.timeout)
        self.senders.append(senders)
        return senders.start()

    def wait_processed(self, count: int) -> None:
        """Wait until ``count`` ids are processed; note where the connections and the queue
        are then (the fault comes next)."""
        if not self.ledger.wait_processed(count, self.scale.timeout):
            raise TimeoutError(f"only {self.ledger.processed} of {count} messages processed")
        if isinstance(self.broker, KombuBroker):
            listing = self.cluster.connection_nodes(self.vhost)
            where = {role: listing.get(name) for role, name in
                     (("consumer", self.consumer_name), ("producer", self.producer_name))}
        else:
            where = {"connections": sorted(set(sum(self.cluster.connection_nodes(
                self.vhost).values(), [])))}
        where["queue"] = self.cluster.queue_node(self.vhost, self.queue)
        self.placement = ", ".join(f"{k} on {v}" for k, v in where.items())

    def probe(self, since: float, timeout: float) -> float | None:
        """Send one message (retrying until accepted) and wait until it is processed; seconds
        from ``since`` until both happened (None: not within ``timeout``)."""
        with self._lock:
            self._probes += 1
            mid = PROBE_BASE + self._probes
        deadline = now() + timeout
        while True:
            try:
                self.send(mid)
                break
            except Exception as exc:  # noqa: BLE001 - retried until the deadline
                self.ledger.record_send_failure(mid, exc)
                if now() >= deadline:
                    return None
                time.sleep(0.05)
        self.ledger.record_sent(mid)
        if not self.ledger.wait_for(lambda: mid in self.ledger.counts,
                                    max(0.0, deadline - now())):
            return None
        return now() - since

    def probe_during(self, since: float, timeout: float, fault: Callable[[], None]) -> float | None:
        """:meth:`probe` in a thread while ``fault()`` runs here (it ends the fault: the
        probe must not wait for it); the probe's result."""
        box: list[float | None] = []
        thread = threading.Thread(target=lambda: box.append(self.probe(since, timeout)),
                                  name="cluster-probe", daemon=True)
        thread.start()
        fault()
        thread.join(timeout)
        return box[0] if box else None

    def finish(self, fault: str) -> ClusterResult:
        """Wait until every sent id was processed and the queue is empty, stop, and count."""
        result = ClusterResult(fault, broker=self.kind, node=self.home)
        if self.placement:
            result.notes.append(f"node {self.home} hit; before: {self.placement}")
        deadline = now() + self.scale.timeout
        try:
            for senders in self.senders:
                if not senders.join(max(1.0, deadline - now())):
                    result.problems.append("senders did not finish")
                    senders.stop()
                if senders.unsent:
                    result.problems.append(f"{len(senders.unsent)} ids could not be sent")
            if not self.ledger.wait_all_sent_processed(max(1.0, deadline - now())):
                result.problems.append("not every sent message was processed in time")
            names = [self.queue, f"{self.queue}.DQ"]
            while True:
                queues = self.cluster.queues(self.vhost)
                left = {n: queues.get(n, {}).get("messages", 0) for n in names}
                if not any(left.values()) or now() >= deadline:
                    break
                time.sleep(0.5)
            if any(left.values()):
                result.problems.append(f"messages still on the cluster: {left}")
        finally:
            self.close(result)
        sent, processed, lost, duplicates = self.ledger.summary()
        result.sent, result.processed, result.lost = sent, processed, lost
        result.duplicates = duplicates
        result.lost_ids = self.ledger.lost_ids()
        result.send_retries = self.ledger.send_retries
        result.longest_send = self.longest_send
        result.duration = now() - self.started
        if self.ledger.send_errors:
            result.notes.append(f"first send error: {self.ledger.send_errors[0][:160]}")
        if self.watch is not None:
            result.unexpected_logs = list(self.watch.unexpected)
            if result.unexpected_logs:
                result.notes.append(f"{len(result.unexpected_logs)} error log lines")
        return result

    def close(self, result: ClusterResult | None = None) -> None:
        for senders in self.senders:
            senders.stop()
        for action, what in ((lambda: self.worker.stop(timeout=20_000), "worker.stop()"),
                             (self.broker.close, "broker.close()")):
            try:
                run_bounded(action, 40, what)
            except AssertionError as exc:
                if result is not None:
                    result.problems.append(str(exc))


Case = Callable[[Cluster, str, str, ClusterScale], ClusterResult]


def _run_case(cluster: Cluster, vhost: str, kind: str, scale: ClusterScale, fault: str,
              inject: Callable[[ClusterRun], float | None], *,
              heartbeat: float | None = None) -> ClusterResult:
    """Start a run, stream the ids, ``inject`` the fault once a third is processed (it returns
    the recovery time), then finish; the cluster is healed whatever happens."""
    with watching(Context(url="", vhost=vhost)) as watch:
        run = ClusterRun(cluster, vhost, kind, scale, heartbeat=heartbeat, watch=watch)
        try:
            run.start()
            run.stream(list(range(scale.messages)))
            run.wait_processed(scale.messages // 3)
            resumed = inject(run)
        except BaseException:
            run.close()
            raise
        finally:
            cluster.heal()
        result = run.finish(fault)
    result.resumed = resumed
    if resumed is None:
        result.problems.append("the broker did not work again after the fault")
    return result


def _node_lost_case(cluster: Cluster, vhost: str, kind: str, scale: ClusterScale, fault: str,
                    lose: Callable[[int], None], back: Callable[[int], None], seconds: float,
                    heartbeat: float | None = None) -> ClusterResult:
    """``lose`` the node holding the consumer connection and the queue's leader (or home),
    ``back`` ``seconds`` later, probing meanwhile."""
    def inject(run: ClusterRun) -> float | None:
        node = run.home
        assert node is not None
        start = now()
        lose(node)

        def back_later() -> None:
            time.sleep(max(0.0, start + seconds - now()))
            back(node)

        return run.probe_during(start, seconds + scale.timeout / 2, back_later)

    return _run_case(cluster, vhost, kind, scale, fault, inject, heartbeat=heartbeat)


def kill_case(cluster: Cluster, vhost: str, kind: str, scale: ClusterScale) -> ClusterResult:
    """kill -9 of the node holding the consumer connection and the queue's leader (or home),
    restarted ``down`` seconds later."""
    result = _node_lost_case(cluster, vhost, kind, scale,
                             f"node killed, back after {scale.down:g} s", cluster.kill,
                             cluster.restart, scale.down)
    if result.resumed is not None and result.resumed >= scale.down:
        result.problems.append("waited for the killed node to come back")
    return result


def freeze_case(cluster: Cluster, vhost: str, kind: str, scale: ClusterScale) -> ClusterResult:
    """SIGSTOP of the same node for ``freeze`` seconds (heartbeat ``scale.heartbeat``)."""
    result = _node_lost_case(cluster, vhost, kind, scale,
                             f"node frozen {scale.freeze:g} s (heartbeat {scale.heartbeat:g} s)",
                             cluster.freeze, cluster.thaw, scale.freeze,
                             heartbeat=scale.heartbeat)
    if result.resumed is not None and result.resumed >= scale.freeze:
        # The hung node keeps its queue leaderships until the cluster declares it down
        # (net_ticktime, 60 s by default): until then nobody can confirm into its queues.
        result.notes.append("processing resumed once the node thawed (its queue leader hung)")
    # A KombuBroker send waits for replies (a confirm, a channel, a declare) at most
    # confirm_timeout (2 heartbeats here, less than the freeze), plus a reconnect's handshake.
    if result.longest_send >= 0.9 * scale.freeze:
        result.problems.append(f"a send() was stuck {result.longest_send:.1f} s, about as long "
                               "as the node was frozen (a reply that does not come)")
    return result


def rolling_case(cluster: Cluster, vhost: str, kind: str,
                 scale: ClusterScale) -> ClusterResult:
    """stop_app/start_app of each node in turn under load; recovery: the slowest resumption
    after a node stopped."""
    def inject(run: ClusterRun) -> float | None:
        slowest = 0.0
        for node in NODES:
            start = now()
            cluster.stop_app(node)
            resumed = run.probe_during(start, scale.timeout / 2,
                                       lambda n=node: cluster.start_app(n))
            if resumed is None:
                return None
            slowest = max(slowest, resumed)
            time.sleep(scale.settle)
        return slowest

    return _run_case(cluster, vhost, kind, scale, "rolling restart (stop_app/start_app each)",
                     inject)


def cancel_case(cluster: Cluster, vhost: str, kind: str, scale: ClusterScale) -> ClusterResult:
    """The queue is deleted on the cluster while the worker runs (the server cancels its
    consumer): the consumer must declare the queue again. The ids sent before the deletion
    are processed first (the deletion would drop them), the rest after the queue is back."""
    first = scale.messages // 2
    rest = list(range(first, scale.messages))
    with watching(Context(url="", vhost=vhost)) as watch:
        run = ClusterRun(cluster, vhost, kind, scale, watch=watch)
        try:
            run.start()
            run.stream(list(range(first))).join(scale.timeout)
            run.ledger.wait_all_sent_processed(scale.timeout)
            start = now()
            cluster.delete_queue(vhost, run.queue)
            back = None
            while now() < start + scale.timeout / 2:
                if run.queue in cluster.queues(vhost):
                    back = now() - start
                    break
                time.sleep(0.2)
            resumed = run.probe(start, scale.timeout / 2) if back is not None else None
            run.stream(rest)
        except BaseException:
            run.close()
            raise
        result = run.finish("queue deleted (server cancels the consumer)")
    result.resumed = resumed
    if back is None:
        result.problems.append("the consumer never declared the deleted queue again")
    else:
        result.notes.append(f"queue declared again after {back:.1f} s")
    return result


def classic_kill_case(cluster: Cluster, vhost: str, kind: str,
                      scale: ClusterScale) -> ClusterResult:
    """A classic queue's node killed while the consumer connection is on another node (its
    consumer gets 404 'home node ... is down'), restarted ``down`` seconds later: the log names
    the queue and its node, the consumer retries, nothing is lost once the node is back."""
    if kind == "kombu-quorum":
        kind = "kombu-classic"
    with watching(Context(url="", vhost=vhost)) as watch:
        run = ClusterRun(cluster, vhost, kind, scale, watch=watch, elsewhere=True)
        try:
            run.start()
            run.stream(list(range(scale.messages)))
            run.wait_processed(scale.messages // 3)
            assert run.home is not None
            start = now()
            cluster.kill(run.home)

            def back_later() -> None:
                time.sleep(scale.down)
                cluster.restart(run.home)

            resumed = run.probe_during(start, scale.down + scale.timeout / 2, back_later)
        except BaseException:
            run.close()
            raise
        finally:
            cluster.heal()
        result = run.finish(f"classic queue's node killed, back after {scale.down:g} s")
        node = f"{cluster.node_name(run.home)}"
        named = [line for line in watch.lines(run.queue, since=start) if node in line]
    result.resumed = resumed
    if named:
        result.notes.append(f"logged: {named[0][:200]}")
    else:
        result.problems.append(f"no log line names both the queue {run.queue} and its node "
                               f"{node}")
    return result


CASES: dict[str, Case] = {
    "kill": kill_case,
    "freeze": freeze_case,
    "rolling": rolling_case,
    "cancel": cancel_case,
    "classic-kill": classic_kill_case,
}


def scaled(scale: ClusterScale, **changes: Any) -> ClusterScale:
    return replace(scale, **{k: v for k, v in changes.items() if v is not None})



ORDER = ["kill", "freeze", "rolling", "cancel", "classic-kill"]


def progress(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    """``python -m stress.faults --cluster``: every case with each broker, then the table."""
    parser = argparse.ArgumentParser(
        prog="python -m stress.faults --cluster",
        description="Node loss under load on the local 3-node cluster (scripts/rabbitmq-cluster, "
                    "started if it is not running and then stopped at the end).")
    parser.add_argument("--cases", default=",".join(ORDER), help="comma-separated, of "
                        f"{','.join(ORDER)} (default: all)")
    parser.add_argument("--brokers", default="kombu-quorum,rabbitmq-classic",
                        help=f"comma-separated, of {','.join(BROKERS)} (default %(default)s; "
                             "classic-kill runs KombuBroker on classic queues)")
    defaults = SCRIPT_SCALE
    parser.add_argument("--messages", type=int, default=defaults.messages)
    parser.add_argument("--threads", type=int, default=defaults.threads)
    parser.add_argument("--senders", type=int, default=defaults.senders)
    parser.add_argument("--rate", type=float, default=defaults.send_rate)
    parser.add_argument("--down", type=float, default=defaults.down,
                        help="seconds a killed node stays down (default %(default)s)")
    parser.add_argument("--freeze", type=float, default=defaults.freeze,
                        help="seconds a node stays frozen (default %(default)s)")
    parser.add_argument("--heartbeat", type=float, default=defaults.heartbeat,
                        help="heartbeat of the freeze case (default %(default)s)")
    parser.add_argument("--output", type=Path, help="also write the markdown report here")
    args = parser.parse_args(argv)
    cases = [c for c in args.cases.split(",") if c]
    kinds = [k for k in args.brokers.split(",") if k]
    unknown = [c for c in cases if c not in CASES] + [k for k in kinds if k not in BROKERS]
    if unknown:
        parser.error(f"unknown case(s) or broker(s): {unknown}")
    scale = replace(SCRIPT_SCALE, messages=args.messages, threads=args.threads,
                    senders=args.senders, send_rate=args.rate, down=args.down,
                    freeze=args.freeze, heartbeat=args.heartbeat)
    work_dir = Path(tempfile.mkdtemp(prefix="cluster-faults-"))
    logging.basicConfig(filename=work_dir / "run.log", level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(threadName)s %(name)s %(message)s")
    progress(f"logs in {work_dir}")
    cluster = Cluster()
    started = not cluster.running()
    if started:
        progress("starting the local cluster (scripts/rabbitmq-cluster start)")
        cluster.start()
    results: list[ClusterResult] = []
    vhost = f"cluster-faults-{uuid.uuid4().hex[:6]}"
    try:
        cluster.add_vhost(vhost)
        for case in cases:
            for kind in kinds:
                progress(f"{case} / {kind}: {scale.messages} messages, {scale.threads} threads")
                try:
                    result = CASES[case](cluster, vhost, kind, scale)
                except Exception as exc:  # noqa: BLE001 - reported as a failed case
                    logging.exception("case %s / %s failed", case, kind)
                    cluster.heal()
                    result = ClusterResult(case, broker=kind,
                                           problems=[f"{type(exc).__name__}: {exc}"])
                results.append(result)
                progress(("ok  " if result.ok else "FAIL") + " "
                         + result.explain().splitlines()[0] + f" longest send "
                         f"{result.longest_send:.1f} s")
                for line in result.explain().splitlines()[1:]:
                    progress("     " + line)
        cluster.delete_vhost(vhost)
    finally:
        if started:
            cluster.stop()
    text = "\n".join([
        "## Node loss on a 3-node cluster", "",
        f"{scale.threads} worker threads, {scale.messages} messages per case (streamed by "
        f"{scale.senders} threads at {scale.send_rate:g}/s, {scale.work_ms:g} ms of work each); "
        f"recovery: from the fault's start until a message sent after it was accepted and "
        f"processed.", "", markdown_table(results), "", details_table(results), ""])
    print(text)
    if args.output:
        args.output.write_text(text + "\n")
    failed = [r for r in results if not r.ok and r.broker != "rabbitmq-classic"]
    progress("FAILED" if failed else "KombuBroker passed every case")
    return 1 if failed else 0


# ------------------------------------------------------------- python -m stress.bench --cluster

CLUSTER_NOTE = (
    "On the local 3-node cluster (scripts/rabbitmq-cluster, three RabbitMQ nodes on the same "
    "2 cores), every broker given the three URLs; 'KombuBroker (quorum queues)' declares "
    "quorum queues (replicated on the 3 nodes), the others classic queues. Peak connections "
    "count the case's connections to all three nodes' ports.")


def cluster_bench_defaults(args: argparse.Namespace) -> None:
    """The cluster benchmark's defaults (options the user gave are kept)."""
    args.brokers = args.brokers or "kombu-quorum,kombu,rabbitmq"
    args.output = args.output or str(REPO_ROOT / "stress" / "results" / "bench-cluster.md")
    if args.enqueue_threads is None:
        args.enqueue_threads = [64]
    if args.chain_threads is None:
        args.chain_threads = [50, 300]
    if args.workloads == "enqueue,drain,chain":
        args.workloads = "enqueue,chain"


def bench_broker(kind: str, url: str, name: str) -> Any:
    """KombuBroker on quorum queues, as the benchmark's other brokers are built."""
    assert kind == "kombu-quorum", kind
    return KombuBroker(url=url, confirm_delivery=True, connection_name=name,
                       queue_type="quorum")


def cluster_url(vhost: str) -> str:
    """The three nodes' URLs for ``vhost``, ``;``-separated (both brokers accept that)."""
    return ";".join(Cluster().urls(vhost))


@contextlib.contextmanager
def bench_cluster() -> Iterator[str]:
    """A fresh vhost on the local cluster (started, and stopped at exit, if not running)."""
    cluster = Cluster()
    started = not cluster.running()
    if started:
        print("starting the local cluster (scripts/rabbitmq-cluster start)", file=sys.stderr)
        cluster.start()
    vhost = f"bench-{uuid.uuid4().hex[:8]}"
    try:
        cluster.add_vhost(vhost)
        try:
            yield vhost
        finally:
            cluster.delete_vhost(vhost)
    finally:
        if started:
            cluster.stop()
