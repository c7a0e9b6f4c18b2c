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
quorum option). The bookkeeping (ledger, senders, log watch) is ``fault_helpers``'.

Cases: ``kill`` (kill -9 of the node holding the consumer connection and the queue's leader,
restarted ``down`` s later), ``freeze`` (the same node SIGSTOPped for ``freeze`` s, a short
heartbeat), ``rolling`` (stop_app/start_app of each node in turn), ``cancel`` (the queue is
deleted on the cluster: the server cancels the consumer, which must declare the queue again),
``classic-kill`` (a classic queue's node is killed and restarted).
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import dramatiq
from dramatiq.brokers.rabbitmq import RabbitmqBroker

import fault_helpers as fh
from cluster_helpers import NODES, Cluster
from dramatiq_kombu_broker import KombuBroker

now = time.monotonic
logger = logging.getLogger(__name__)

BROKERS = ("kombu-quorum", "kombu-classic", "rabbitmq-classic")


@dataclass(frozen=True)
class ClusterScale:
    """How big and how long a case is (pytest uses :data:`PYTEST_SCALE`)."""

    messages: int = 3000
    threads: int = 64
    senders: int = 8
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
    timeout: float = 240.0


SCRIPT_SCALE = ClusterScale()
PYTEST_SCALE = ClusterScale(messages=2000, send_rate=250.0, down=10.0, freeze=6.0,
                            heartbeat=2.0, settle=1.0, timeout=120.0)


@dataclass
class ClusterResult(fh.FaultResult):
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
                     str(r.duplicates), f"{r.longest_send:.1f}", fh.fmt_seconds(r.recovery)])
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
        options["heartbeat"] = heartbeat
    if kind == "kombu-quorum":
        options["queue_type"] = "quorum"
    return KombuBroker(url=urls, **options)


class ClusterRun:
    """A broker of ``kind`` with a 64-thread worker on one queue of the cluster, a ledger of
    every processing, timed sends, and probes that measure when the broker works again."""

    def __init__(self, cluster: Cluster, vhost: str, kind: str, scale: ClusterScale, *,
                 heartbeat: float | None = None, watch: fh.LogWatch | None = None,
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
        self.actor_name = f"{fh.ACTOR_PREFIX}_{self.queue.replace('-', '_')}"
        self.ledger = fh.Ledger()
        self.broker = make_broker(kind, cluster.urls(vhost), self.name, heartbeat)
        self.broker.add_middleware(fh.Track(self.ledger))
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
        self.senders: list[fh.Senders] = []
        self.started = 0.0
        self.home: int | None = None

    @property
    def consumer_name(self) -> str:
        return f"{self.name}-consumer"

    def send(self, mid: int) -> None:
        started = now()
        try:
            self.broker.enqueue(fh.work_message(self.queue, mid, self.actor_name))
        finally:
            took = now() - started
            with self._lock:
                self.longest_send = max(self.longest_send, took)

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

    def stream(self, ids: list[int]) -> fh.Senders:
        senders = fh.Senders(self.send, ids, self.scale.senders, self.scale.send_rate,
                             self.ledger, deadline=now() + self.scale.timeout)
        self.senders.append(senders)
        return senders.start()

    def wait_processed(self, count: int) -> None:
        if not self.ledger.wait_processed(count, self.scale.timeout):
            raise TimeoutError(f"only {self.ledger.processed} of {count} messages processed")

    def probe(self, since: float, timeout: float) -> float | None:
        """Send one message (retrying until accepted) and wait until it is processed; seconds
        from ``since`` until both happened (None: not within ``timeout``)."""
        with self._lock:
            self._probes += 1
            mid = fh.PROBE_BASE + self._probes
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
                fh.run_bounded(action, 40, what)
            except AssertionError as exc:
                if result is not None:
                    result.problems.append(str(exc))


Case = Callable[[Cluster, str, str, ClusterScale], ClusterResult]


def _run_case(cluster: Cluster, vhost: str, kind: str, scale: ClusterScale, fault: str,
              inject: Callable[[ClusterRun], float | None], *,
              heartbeat: float | None = None) -> ClusterResult:
    """Start a run, stream the ids, ``inject`` the fault once a third is processed (it returns
    the recovery time), then finish; the cluster is healed whatever happens."""
    with fh.watching(fh.Context(url="", vhost=vhost)) as watch:
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


def kill_case(cluster: Cluster, vhost: str, kind: str, scale: ClusterScale) -> ClusterResult:
    """kill -9 of the node holding the consumer connection and the queue's leader (or home),
    restarted ``down`` seconds later."""
    def inject(run: ClusterRun) -> float | None:
        assert run.home is not None
        start = now()
        cluster.kill(run.home)

        def back_later() -> None:
            time.sleep(max(0.0, start + scale.down - now()))
            cluster.restart(run.home)

        return run.probe_during(start, scale.down + scale.timeout / 2, back_later)

    result = _run_case(cluster, vhost, kind, scale, f"node killed, back after {scale.down:g} s",
                       inject)
    if result.resumed is not None and result.resumed >= scale.down:
        result.notes.append("waited for the killed node to come back")
    return result


def freeze_case(cluster: Cluster, vhost: str, kind: str, scale: ClusterScale) -> ClusterResult:
    """SIGSTOP of the same node for ``freeze`` seconds (heartbeat ``scale.heartbeat``)."""
    def inject(run: ClusterRun) -> float | None:
        assert run.home is not None
        start = now()
        cluster.freeze(run.home)

        def thaw_later() -> None:
            time.sleep(max(0.0, start + scale.freeze - now()))
            cluster.thaw(run.home)

        return run.probe_during(start, scale.freeze + scale.timeout / 2, thaw_later)

    return _run_case(cluster, vhost, kind, scale,
                     f"node frozen {scale.freeze:g} s (heartbeat {scale.heartbeat:g} s)",
                     inject, heartbeat=scale.heartbeat)


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
    with fh.watching(fh.Context(url="", vhost=vhost)) as watch:
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
    with fh.watching(fh.Context(url="", vhost=vhost)) as watch:
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

