"""Celery publishers: kombu's own ``amqp`` transport against the thread-safe one
(``python -m stress.bench_celery``).

N threads call ``delay()`` with publisher confirms for a fixed time, with Celery's default
settings otherwise (``broker_pool_limit`` 10). "default" is Celery on kombu's transport;
"shared" is ``broker_url="shared+amqp://..."`` after ``add_shared_amqp_transport()``.
"""

from __future__ import annotations

import contextlib
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

from stress.common import ProcessSampler, amqp_ports, fmt_threads, latency_summary, vhost_session
from stress.start_line import race, time_calls

NAME = "bench_celery"
TITLE = "Celery publishers: kombu's amqp transport against shared+amqp"
COLUMNS = [("rate", "delay()/s"), ("p50", "p50"), ("p99", "p99"),
           ("connections", "connections held"), ("cpu_us", "client CPU/delay")]
HEADLINE = "rate"
HIGHER_IS_BETTER = True
SETUP_LABELS = {"default": "Celery on kombu's amqp", "shared": "Celery on shared+amqp"}
AGGREGATE = {"connections": "max"}


def cases(quick: bool, *, threads: list[int] | None = None,
          seconds: float | None = None) -> list[dict[str, Any]]:
    counts = threads or ([1, 8] if quick else [1, 8, 50, 200])
    span = seconds if seconds is not None else (1.0 if quick else 3.0)
    return [{"setup": setup, "label": fmt_threads(n), "threads": n, "seconds": span,
             "timeout": 60 + span}
            for n in counts for setup in SETUP_LABELS]


def session(planned: list[dict[str, Any]]) -> contextlib.AbstractContextManager[dict[str, str]]:
    return vhost_session("celery")


def notes(planned: list[dict[str, Any]]) -> list[str]:
    return [f"Threads calling `delay()` for {planned[0]['seconds']:g} s with publisher confirms, "
            "Celery's default settings otherwise (broker_pool_limit 10). connections held = "
            "peak TCP connections of the process to the AMQP port (psutil, every 0.5 s). "
            "Client CPU/delay = user + system CPU time of the process while publishing, per "
            "call."]


def run_case(case: dict[str, Any]) -> dict[str, Any]:
    """In the case's own process: publish for ``seconds`` from ``threads`` threads."""
    from celery import Celery

    url = case["url"]
    if case["setup"] == "shared":
        import kombu_pyamqp_threadsafe

        kombu_pyamqp_threadsafe.add_shared_amqp_transport()
        url = "shared+" + url
    app = Celery("bench", broker=url)
    app.conf.broker_transport_options = {"confirm_publish": True}
    queue = f"bench-{uuid.uuid4().hex[:8]}"
    app.conf.task_default_queue = queue

    @app.task(name="bench.noop")
    def noop(n: int) -> None:
        return None

    sampler = ProcessSampler(amqp_ports(case["url"])).start()
    noop.delay(0)  # connect, declare the queue
    stop = threading.Event()

    def publisher(index: int, start: Callable[[], None], latencies: list[float]) -> None:
        start()
        time_calls(lambda _: noop.delay(index), latencies, stop=stop)

    def hold() -> None:
        time.sleep(case["seconds"])
        stop.set()

    run = race(publisher, case["threads"], setup_timeout=30, run_timeout=60, hold=hold)
    sampler.stop()
    with app.connection_for_write() as conn:
        conn.default_channel.queue_delete(queue)
    published = len(run.latencies)
    return {"ok": not run.errors, "error": run.errors[0] if run.errors else None,
            "errors": len(run.errors), "published": published,
            "rate": published / run.elapsed, "connections": sampler.peak_sockets,
            "cpu_us": 1e6 * run.cpu_s / published if published else None,
            **latency_summary(run.latencies)}
