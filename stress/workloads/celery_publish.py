"""Celery publishers: kombu's own ``amqp`` transport against the thread-safe one
(``python -m stress.bench_celery``).

N threads call ``delay()`` with publisher confirms for a fixed time, with Celery's default
settings otherwise (``broker_pool_limit`` 10). "default" is Celery on kombu's transport;
"shared" is ``broker_url="shared+amqp://..."`` after ``add_shared_amqp_transport()``.

With ``latency_ms``, every case also goes through a ``stress.tcp_proxy`` in the runner's process
that delays each direction by that many ms (one proxy per delay, both setups through it): on a
network each pooled connection of the default setup is held for a confirm's round trip, which
loopback hides.
"""

from __future__ import annotations

import contextlib
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import urlsplit

from stress import rabbit_admin
from stress.common import (
    ProcessSampler,
    amqp_ports,
    fmt_threads,
    latency_summary,
    url_at,
    vhost_session,
)
from stress.start_line import race, time_calls
from stress.tcp_proxy import Proxy

NAME = "bench_celery"
TITLE = "Celery publishers: kombu's amqp transport against shared+amqp"
COLUMNS = [("rate", "delay()/s"), ("p50", "p50"), ("p99", "p99"),
           ("connections", "connections held"), ("cpu_us", "client CPU/delay")]
HEADLINE = "rate"
HIGHER_IS_BETTER = True
SETUP_LABELS = {"default": "Celery on kombu's amqp", "shared": "Celery on shared+amqp"}
AGGREGATE = {"connections": "max"}


def cases(quick: bool, *, threads: list[int] | None = None, seconds: float | None = None,
          latency_ms: list[float] | None = None) -> list[dict[str, Any]]:
    """Per thread count, one case per setup; with ``latency_ms`` (one-way delays through the
    proxy, 0 included if wanted), that for each delay, the cases of one delay together."""
    counts = threads or ([1, 8] if quick else [1, 8, 50, 200])
    span = seconds if seconds is not None else (1.0 if quick else 3.0)
    delays: list[float | None] = list(latency_ms) if latency_ms else [None]
    return [{"setup": setup, "label": label(n, delay), "threads": n, "seconds": span,
             "latency_ms": delay, "timeout": 60 + span}
            for delay in delays for n in counts for setup in SETUP_LABELS]


def label(threads: int, delay: float | None) -> str:
    return fmt_threads(threads) if delay is None else f"{delay:g} ms each way, {threads}"


def delay_key(delay: float) -> str:
    """The key of a delay's proxy port in the session (JSON turns 5 into 5.0, not this)."""
    return f"{delay:g}"


@contextlib.contextmanager
def session(planned: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """One vhost for the run; for the cases with a delay, a delaying proxy per delay (in this,
    the runner's, process: the proxy's threads cost the case's process nothing)."""
    delays = sorted({c["latency_ms"] for c in planned if c.get("latency_ms") is not None})
    server = urlsplit(rabbit_admin.amqp_url())
    target = (server.hostname or "127.0.0.1", server.port or 5672)
    with vhost_session("celery") as shared, contextlib.ExitStack() as proxies:
        ports = {delay_key(d): proxies.enter_context(Proxy(target, delay=d / 1000)).port
                 for d in delays}
        yield {**shared, "proxy_ports": ports}


def case_url(case: dict[str, Any]) -> str:
    """The server's URL for the case's vhost, through its delay's proxy if it has one."""
    delay = case.get("latency_ms")
    if delay is None:
        return str(case["url"])
    return url_at(case["url"], case["proxy_ports"][delay_key(delay)])


def notes(planned: list[dict[str, Any]]) -> list[str]:
    text = [f"Threads calling `delay()` for {planned[0]['seconds']:g} s with publisher "
            "confirms, Celery's default settings otherwise (broker_pool_limit 10). connections "
            "held = peak TCP connections of the process to the AMQP port (psutil, every "
            "0.5 s). Client CPU/delay = user + system CPU time of the process while "
            "publishing, per call."]
    if any(c.get("latency_ms") is not None for c in planned):
        text.append("\"N ms each way, T\": T threads, every byte delayed N ms in each "
                    "direction by a TCP proxy (stress/tcp_proxy.py, in the runner's process) "
                    "between the client and RabbitMQ: a round trip gains 2N ms. Both setups "
                    "of a row go through the same proxy; the 0 ms rows go through it too, "
                    "without a delay.")
    return text


def run_case(case: dict[str, Any]) -> dict[str, Any]:
    """In the case's own process: publish for ``seconds`` from ``threads`` threads."""
    from celery import Celery

    url = case_url(case)
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

    sampler = ProcessSampler(amqp_ports(url)).start()
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
