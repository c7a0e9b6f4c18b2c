"""KombuBroker side by side with dramatiq's RabbitmqBroker (pika): ``python -m stress.bench``.

Three kinds of case (series), both brokers with ``confirm_delivery=True``:

- ``enqueue``: ``actor.send()`` from N threads, a fixed message count (each thread first sends
  one untimed message, so connections and queues exist before the clock starts);
- ``drain``: a ``dramatiq.Worker`` with N threads drains preloaded messages (clock from
  ``worker.start()`` to the last message processed);
- ``chain``: the "send the next" workload of ``stress.run`` with N worker threads for a fixed
  duration; end-to-end latency from the send time carried in the message.

Connections are the peak number of TCP connections of the case's process to the AMQP port
(psutil, sampled every 0.5 s). Lost and duplicated messages are counted by id (drain, chain).
RabbitmqBroker opens one connection per thread that sends: a case needing more connections than
the server has to spare is skipped (RabbitMQ 3.x stalls every client at its socket limit)
unless the case has ``"force": True``. ``"cluster": True`` cases run on the local 3-node cluster
(stress/cluster_faults.py), where ``kombu-quorum`` is KombuBroker on quorum queues.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

from dramatiq_kombu_broker.topology import declarations, queue_arguments
from stress import cluster_faults
from stress import workload as hops
from stress.common import (
    ProcessSampler,
    amqp_ports,
    fmt_threads,
    latency_summary,
    socket_headroom,
    split,
    vhost_session,
)
from stress.polling import poll
from stress.start_line import race, time_calls
from stress.workloads import sizes as workload_sizes

NAME = "bench"
TITLE = "KombuBroker vs RabbitmqBroker"
COLUMNS = [("rate", "msgs/s"), ("p50", "p50"), ("p99", "p99"),
           ("connections", "peak connections"), ("peak_rss", "peak RSS"),
           ("peak_threads", "peak threads"), ("cpu_per_1k", "CPU s / 1k msgs"),
           ("lost", "lost"), ("duplicated", "dup")]
HEADLINE = "rate"
HIGHER_IS_BETTER = True
SETUP_LABELS = {"kombu": "KombuBroker", "rabbitmq": "RabbitmqBroker (pika)",
                "kombu-quorum": "KombuBroker (quorum queues)"}
FORMATS = {"peak_threads": lambda v: f"{v:.0f}", "cpu_per_1k": lambda v: f"{v:.2f}"}
AGGREGATE = {"connections": "max", "lost": "sum", "duplicated": "sum"}
PLOT_X = "threads"
PLOTS = [("throughput", "rate", "messages / s", False),
         ("connections", "connections", "peak TCP connections to RabbitMQ", True),
         ("p99", "p99", "p99 latency (s)", True)]
SERIES = {"enqueue": "enqueue", "drain": "worker drain", "chain": "send-the-next"}
#: option: (quick, full) default of :func:`cases`.
DEFAULTS: dict[str, tuple[Any, Any]] = {
    "enqueue_threads": ([1, 8], [1, 8, 64]), "enqueue_messages": (300, 3000),
    "drain_threads": ([8], [8, 64]), "drain_messages": (500, 5000),
    "chain_threads": ([8, 50], [8, 50, 300, 900]), "duration": (3.0, 15.0),
}


def cases(quick: bool, *, brokers: tuple[str, ...] = ("kombu", "rabbitmq"),
          workloads: tuple[str, ...] = tuple(SERIES), cluster: bool = False, force: bool = False,
          **sizes: Any) -> list[dict[str, Any]]:
    """Every case of one repeat; ``sizes`` override :data:`DEFAULTS` (None: the default)."""
    unknown = set(brokers) - set(SETUP_LABELS) or set(workloads) - set(SERIES)
    if unknown:
        raise ValueError(f"unknown broker or workload: {sorted(unknown)}")
    size = workload_sizes(DEFAULTS, quick, sizes)
    wait = 45 if quick else 180
    shapes = []
    if "enqueue" in workloads:
        shapes += [("enqueue", t, {"messages": size["enqueue_messages"], "timeout": wait})
                   for t in size["enqueue_threads"]]
    if "drain" in workloads:
        shapes += [("drain", t, {"messages": size["drain_messages"], "timeout": wait})
                   for t in size["drain_threads"]]
    if "chain" in workloads:
        shapes += [("chain", t, {"duration": size["duration"],
                                 "timeout": size["duration"] + wait})
                   for t in size["chain_threads"]]
    return [{"setup": kind, "label": f"{SERIES[kind_of]}, {fmt_threads(threads)}",
             "series": SERIES[kind_of], "workload": kind_of, "threads": threads,
             "cluster": cluster, "force": force, **extra}
            for kind_of, threads, extra in shapes for kind in brokers]


@contextlib.contextmanager
def session(planned: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """One vhost for the run, on the local cluster for cluster cases."""
    if any(case.get("cluster") for case in planned):
        with cluster_faults.bench_cluster() as vhost:
            yield {"url": cluster_faults.cluster_url(vhost)}
    else:
        with vhost_session("bench") as shared:
            yield shared


def connections_needed(case: dict[str, Any]) -> int:
    if case["setup"] != "rabbitmq" or case["workload"] == "drain":
        return 2
    if case["workload"] == "enqueue":
        return case["threads"]
    # One per worker thread; each of the two consumer threads has its consumer connection and
    # the thread-local one it declared the queue on; the seeder.
    return case["threads"] + 5


def skip(case: dict[str, Any]) -> str | None:
    needed = connections_needed(case)
    if needed <= 50 or case.get("force"):
        return None
    headroom = socket_headroom()
    if headroom is not None and needed > headroom[0]:
        return f"needs ~{needed} connections ({headroom[1]})"
    return None


def notes(planned: list[dict[str, Any]]) -> list[str]:
    first = {c["workload"]: c for c in reversed(planned)}
    text = []
    if "enqueue" in first:
        text.append(f"enqueue: {first['enqueue']['messages']:,} timed `actor.send()` per case, "
                    "latency = one send (until the publisher confirm).")
    if "drain" in first:
        text.append(f"worker drain: {first['drain']['messages']:,} preloaded messages, a no-op "
                    "actor; no latency (the messages waited in the queue by design).")
    if "chain" in first:
        text.append(f"send-the-next: {first['chain']['duration']:g} s per case, one chain per "
                    "worker thread, latency = enqueue to start of processing.")
    text.append(
        "peak connections = TCP connections of the case's process to the AMQP port(s) (psutil, "
        "every 0.5 s; max over the runs). RSS and threads: peak of the case's process. CPU = "
        "user+system seconds of the case's process per 1000 messages. lost/dup summed over the "
        "runs. Both brokers: `confirm_delivery=True`, persistent messages. A case needing more "
        "connections than the server has to spare is skipped (stress/README.md, RabbitMQ's "
        "socket limit).")
    if any(c.get("cluster") for c in planned):
        text.append(cluster_faults.CLUSTER_NOTE)
    return text


def row_note(runs: list[dict[str, Any]]) -> str:
    warnings = sum(r.get("log_warnings", 0) for r in runs)
    return f"{warnings} log warnings" if warnings else ""


# ------------------------------------------------------------------------------ one case (child)


def _queue_admin(url: str, queue: str, *, preload: list[bytes] | None = None,
                 delete: bool = False) -> None:
    """Declare (with dramatiq's arguments) and preload, or delete, a queue over a short-lived
    plain connection that is closed before the measurement starts."""
    import amqp
    import kombu

    with kombu.Connection(url, transport_options={"confirm_publish": True}) as conn:
        channel = conn.channel()
        if preload is not None:
            channel.queue_declare(queue=queue, durable=True, auto_delete=False,
                                  arguments=queue_arguments(queue, None))
            # As dramatiq's brokers publish: persistent, no content type or encoding.
            for body in preload:
                channel.basic_publish(amqp.Message(body, delivery_mode=2), exchange="",
                                      routing_key=queue)
        if delete:
            for name, _ in declarations(queue, None):
                with contextlib.suppress(Exception):
                    channel.queue_delete(queue=name)
        channel.close()


class Setup:
    """The broker, hop actor, bookkeeping and sampler of one case."""

    def __init__(self, case: dict[str, Any]) -> None:
        import psutil

        self.case = case
        self.queue = f"b-{case['workload']}-{uuid.uuid4().hex[:8]}"
        self.tracker = hops.Tracker()
        self.deadline: float | None = None
        self.me = psutil.Process()
        if case["workload"] == "drain":
            # Preload before anything of the broker exists: the preload connection is not counted.
            from dramatiq import Message

            _queue_admin(case["url"], self.queue, preload=[
                Message(queue_name=self.queue, actor_name=hops.HOP_ACTOR, args=(i, 0, 1, 0.0),
                        kwargs={}, options={}).encode() for i in range(case["messages"])])
        self.sampler = ProcessSampler(amqp_ports(case["url"])).start()
        kind = case["setup"]
        make = cluster_faults.bench_broker if kind == "kombu-quorum" else hops.make_broker
        self.broker = make(kind, case["url"],
                           f"bench-{kind}-{case['workload']}-{case['threads']}")
        self.actor = hops.define_hop_actor(self.broker, self.queue,
                                           hops.tracker_recorder(self.tracker),
                                           lambda: self.deadline, claim=self.tracker.claim)
        self.worker: Any = None

    def cpu(self) -> float:
        times = self.me.cpu_times()
        return times.user + times.system

    def start_worker(self) -> None:
        import dramatiq

        self.worker = dramatiq.Worker(self.broker, worker_threads=self.case["threads"],
                                      worker_timeout=100)
        self.worker.start()

    def close(self, result: dict[str, Any]) -> None:
        self.sampler.sample()
        stop0 = time.perf_counter()
        if self.worker is not None:
            self.worker.stop(timeout=30_000)
        self.broker.close()
        result["stop_s"] = time.perf_counter() - stop0
        self.sampler.stop()
        with contextlib.suppress(Exception):
            _queue_admin(self.case["url"], self.queue, delete=True)
        result.update({"connections": self.sampler.peak_sockets,
                       "peak_rss": self.sampler.peak_rss,
                       "peak_threads": self.sampler.peak_threads})


def _enqueue(s: Setup) -> dict[str, Any]:
    total, threads = s.case["messages"], s.case["threads"]
    counts = split(total, threads)

    def sender(index: int, start: Callable[[], None], latencies: list[float]) -> None:
        s.actor.send(index, 0, 1, time.time())  # warm-up: connection, channel, queue
        start()
        time_calls(lambda i: s.actor.send(index, i + 1, 1, time.time()), latencies,
                   count=counts[index])

    # Every sender holds its connection and waits at the start line: count them then.
    run = race(sender, threads, setup_timeout=120, run_timeout=s.case["timeout"],
               at_start=s.sampler.sample)
    done = len(run.latencies)
    result: dict[str, Any] = {"ok": not run.errors and done == total, "setup_s": run.setup_s,
                              "messages": done, "cpu_s": run.cpu_s,
                              "rate": done / run.elapsed if run.elapsed > 0 else None,
                              **latency_summary(run.latencies)}
    if not result["ok"]:
        result["error"] = (f"{len(run.errors)} sender(s) failed; first: "
                           f"{run.errors[0] if run.errors else f'sent {done} of {total}'}")
    return result


def _drain(s: Setup) -> dict[str, Any]:
    total, tracker = s.case["messages"], s.tracker
    tracker.sent_ids.update(i * hops.HOP_STRIDE for i in range(total))
    cpu0, started = s.cpu(), time.perf_counter()
    s.start_worker()
    poll(lambda: tracker.n_processed, bool, 10, 0.01)
    s.sampler.sample()
    finished = poll(lambda: tracker.n_processed, lambda n: n >= total, s.case["timeout"]) >= total
    elapsed = time.perf_counter() - started
    result: dict[str, Any] = {"ok": finished, "messages": tracker.n_processed,
                              "cpu_s": s.cpu() - cpu0,
                              "rate": tracker.n_processed / elapsed if elapsed > 0 else None}
    if not finished:
        result["error"] = f"processed {tracker.n_processed} of {total} in time"
    return result


def _chain(s: Setup) -> dict[str, Any]:
    duration, threads, tracker = s.case["duration"], s.case["threads"], s.tracker
    # Seed first (one chain per worker thread), then start the clock with the worker.
    seed0 = time.time()
    seed_errors = hops.seed_chains(s.actor, tracker, threads, [hops.HOP_STRIDE - 1] * threads)
    seeded = time.time()
    deadline = s.deadline = seeded + duration
    cpu0 = s.cpu()
    s.start_worker()
    poll(time.time, lambda now: now >= deadline, duration + 5, 0.1)
    # Let the chains run out (no successor after the deadline), bounded.
    in_flight = poll(lambda: tracker.n_sent - tracker.n_processed, lambda n: n <= 0,
                     s.case["timeout"] / 2, 0.1)
    with tracker.lock:
        window = [lat for lat, at in zip(tracker.latencies, tracker.at_times, strict=True)
                  if seeded <= at <= deadline]
        seeds = sum(1 for at in tracker.seed_at_times if at <= deadline)
    result: dict[str, Any] = {"ok": True, "seeding_s": seeded - seed0, "cpu_s": s.cpu() - cpu0,
                              "messages": len(window) + seeds,
                              "rate": (len(window) + seeds) / duration,
                              **latency_summary(window)}
    if seed_errors:
        result.update(ok=False, error=f"{len(seed_errors)} seed sends failed: {seed_errors[0]}")
    elif in_flight > 0:
        result.update(ok=False, error=f"{in_flight} messages still in flight after the deadline")
    return result


RUNS = {"enqueue": _enqueue, "drain": _drain, "chain": _chain}


def run_case(case: dict[str, Any]) -> dict[str, Any]:
    logs = hops.LogCounter()
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    logging.getLogger().addHandler(logs)
    setup = Setup(case)
    result: dict[str, Any] = {"ok": False, "error": "interrupted"}
    try:
        result = RUNS[case["workload"]](setup)
    finally:
        setup.close(result)
    if case["workload"] != "enqueue":
        cmp = setup.tracker.comparison()
        result.update({k: cmp[k] for k in ("lost", "duplicated", "unexpected", "send_failures")})
        if result["ok"] and (cmp["lost"] or cmp["duplicated"] or cmp["unexpected"]):
            result.update(ok=False, error=f"lost {cmp['lost']}, duplicated {cmp['duplicated']}, "
                                          f"unexpected {cmp['unexpected']}")
    if result.get("messages"):
        result["cpu_per_1k"] = 1000 * result["cpu_s"] / result["messages"]
    result.update(log_warnings=logs.count, log_first=logs.first[:2])
    return result
