"""Send the next under the real ``dramatiq-gevent`` CLI: KombuBroker against RabbitmqBroker.

One worker process with ``greenlets`` greenlets (``-p 1 -t N``) runs ``stress.actors``: each
processing sends the next hop of its chain and a report, both with publisher confirms, and
this process counts the reports. RabbitmqBroker opens a connection per greenlet that publishes
(its connections are thread-local, and gevent makes thread-locals greenlet-local), so it holds
about as many connections as greenlets; KombuBroker holds two whatever the number.

Figures: throughput (distinct messages processed per second, from the first processing to the
last), the worker's CPU time per message over the same span (steadier than wall-clock on a
loaded machine), the peak server-side connections of the worker (``rabbitmqctl``, by name),
the peak RSS of the CLI and its worker process, and lost messages.

A RabbitmqBroker case needs a connection per greenlet: one the server has no socket budget for
(RabbitMQ stops every client's handshakes at its limit, 832 with ``ulimit -n 1024``) is skipped
(``skip``), and the report says why.
"""

from __future__ import annotations

import contextlib
import tempfile
from pathlib import Path
from typing import Any

import psutil

from stress import rabbit_admin
from stress.cli_send_next import CliSendNext
from stress.cli_workers import CliWorkers
from stress.common import (
    ProcessSampler,
    ServerConnectionPoller,
    amqp_ports,
    dedicated_vhost,
    fmt_rate,
    socket_headroom,
    url_for_vhost,
)

NAME = "gevent-send-next"
TITLE = "Send the next under dramatiq-gevent (1 process, N greenlets, confirms on)"
COLUMNS = [
    ("throughput", "msg/s"),
    ("cpu_us_per_msg", "worker CPU µs/msg"),
    ("connections", "server connections"),
    ("rss_mb", "peak RSS MiB"),
    ("lost", "lost"),
]
HEADLINE = "throughput"
HIGHER_IS_BETTER = True
SETUP_LABELS = {"kombu": "KombuBroker", "rabbitmq": "RabbitmqBroker (pika)"}
FORMATS = {"throughput": fmt_rate, "cpu_us_per_msg": lambda v: f"{v:,.0f}",
           "rss_mb": lambda v: f"{v:.0f}"}
AGGREGATE = {"connections": "max", "lost": "sum"}

#: RabbitmqBroker's connections besides one per greenlet: a consumer connection for each of
#: the two consumers (q, q.DQ), the connection the worker declares on, and ours (seed, results).
RABBITMQ_EXTRA_CONNECTIONS = 5
#: Seconds a case may take to process its messages once the worker is up.
PROCESS_TIMEOUT = 300
#: Sockets of the (shared) server a case leaves to other clients.
SOCKET_RESERVE = 100


def cases(quick: bool) -> list[dict[str, Any]]:
    greenlets = [100, 1000] if quick else [200, 500, 1000]
    messages = 2000 if quick else 20000
    # "timeout": the runner's bound on the child (boot, processing, stop, the vhost's removal).
    return [{"setup": setup, "label": f"{count:,} greenlets", "greenlets": count,
             "messages": messages, "timeout": PROCESS_TIMEOUT + 240}
            for count in greenlets for setup in ("rabbitmq", "kombu")]


def notes(planned: list[dict[str, Any]]) -> list[str]:
    return [
        f"`dramatiq-gevent stress.actors -p 1 -t N`: {planned[0]['messages']:,} messages in N "
        "chains; each processing sends the next hop and a report (both confirmed), this "
        "process counts the reports. msg/s: distinct messages from the first processing to the "
        "last; worker CPU: user+system time of the worker process over the same span, per "
        "message; server connections: the worker's, by name (rabbitmqctl); RSS: the CLI and its "
        "worker process.",
        "RabbitmqBroker opens a connection per greenlet that publishes: a case the server has "
        f"no sockets for (keeping {SOCKET_RESERVE} for other clients) is skipped; RabbitMQ 3.x "
        "stalls every client at its socket limit (stress/README.md).",
    ]


def connections_needed(case: dict[str, Any]) -> int:
    if case["setup"] == "kombu":
        return 2 + 2  # the worker's two, and this process's seeder and results consumer
    return int(case["greenlets"]) + RABBITMQ_EXTRA_CONNECTIONS


def skip(case: dict[str, Any]) -> str | None:
    """Why not to run ``case`` now: the server cannot take its connections and keep
    SOCKET_RESERVE sockets for its other clients (None: run it)."""
    needed = connections_needed(case)
    headroom = socket_headroom(SOCKET_RESERVE)
    if headroom is not None and headroom[0] < needed:
        return (f"needs about {needed:,} connections, the server has {headroom[0]:,} to spare "
                f"({headroom[1]})")
    return None


def _worker_cpu(workers: CliWorkers) -> float:
    """CPU seconds (user + system) of the CLI's worker processes so far."""
    total = 0.0
    for pid in workers.worker_pids():
        with contextlib.suppress(psutil.Error):
            times = psutil.Process(pid).cpu_times()
            total += times.user + times.system
    return total


def run_case(case: dict[str, Any]) -> dict[str, Any]:
    greenlets, messages = int(case["greenlets"]), int(case["messages"])
    with dedicated_vhost("gevent-next") as vhost, \
            tempfile.TemporaryDirectory(prefix="gevent-send-next-") as tmp:
        url = url_for_vhost(rabbit_admin.amqp_url(), vhost)
        run = CliSendNext(case["setup"], url, chains=greenlets, messages=messages)
        errors = run.seed()
        if errors:
            raise RuntimeError(f"seeding failed: {errors[:3]}")
        consumer = run.consume_results()
        workers = CliWorkers("stress.actors", processes=1, threads=greenlets,
                             queues=[run.queue], env=run.environment(), gevent=True,
                             shutdown_timeout_ms=10_000, log_path=Path(tmp) / "worker.log")
        with workers:
            poller = ServerConnectionPoller(vhost, run.workers, interval=2.0).start()
            sampler = ProcessSampler(amqp_ports(url), pid=workers.pid, children=True).start()
            try:
                if run.wait_processed(1, timeout=120) < 1:
                    raise RuntimeError(f"nothing processed in 120 s:\n{workers.log_tail(1500)}")
                cpu_start, first = _worker_cpu(workers), run.tracker.n_processed
                done = run.wait_processed(timeout=PROCESS_TIMEOUT)
                cpu_end, last = _worker_cpu(workers), run.tracker.n_processed
                poller.stop(final_poll=True)
            finally:
                poller.stop()
                sampler.stop()
            exit_status = workers.stop(60)
            stop_s = workers.stop_seconds
        consumer.drain(idle=1.0)
    comparison = run.tracker.comparison()
    if done < messages:
        raise RuntimeError(f"processed {done:,}/{messages:,} in {PROCESS_TIMEOUT} s "
                           f"({comparison['lost']:,} lost)")
    tracker = run.tracker
    span = (tracker.last_processed or 0.0) - (tracker.first_processed or 0.0)
    return {
        "throughput": comparison["processed"] / span if span > 0 else None,
        "cpu_us_per_msg": (cpu_end - cpu_start) / (last - first) * 1e6 if last > first else None,
        "connections": poller.peak,
        "rss_mb": sampler.peak_rss / 2**20,
        "lost": comparison["lost"],
        "duplicated": comparison["duplicated"],
        "send_failures": comparison["send_failures"],
        "local_sockets": sampler.peak_sockets,
        "connection_names": poller.peak_names,
        "exit_status": exit_status,
        "stop_s": stop_s,
        "seconds": span,
    }
