"""Celery publishers: kombu's own ``amqp`` transport against the thread-safe one.

N threads call ``delay()`` with publisher confirms for a fixed time, with Celery's default
settings otherwise (``broker_pool_limit`` 10). "default" is Celery on kombu's transport;
"shared" is ``broker_url="shared+amqp://..."`` after ``add_shared_amqp_transport()``. Cases
run interleaved, each in a fresh process, in a vhost of their own; medians of the repeats.

    python -m stress.bench_celery [--threads 1,8,50,200] [--seconds 3] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
import uuid
from typing import Any

import psutil

from stress import rabbit_admin
from stress.common import (
    RESULTS_DIR,
    amqp_port,
    count_amqp_sockets,
    dedicated_vhost,
    emit_result,
    fmt_ms,
    fmt_rate,
    latency_summary,
    machine_line,
    markdown_table,
    median_or_none,
    run_case,
    short_error,
    spread,
    url_for_vhost,
    write_result,
)

SETUPS = ("default", "shared")
LABELS = {"default": "Celery on kombu's amqp", "shared": "Celery on shared+amqp"}


def run_one(case: dict[str, Any]) -> dict[str, Any]:
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

    noop.delay(0)  # connect, declare the queue
    threads, seconds = case["threads"], case["seconds"]
    barrier = threading.Barrier(threads + 1)
    stop = threading.Event()
    latencies: list[list[float]] = [[] for _ in range(threads)]
    errors: list[str] = []

    def publisher(index: int) -> None:
        mine = latencies[index]
        barrier.wait(30)
        try:
            while not stop.is_set():
                started = time.perf_counter()
                noop.delay(index)
                mine.append(time.perf_counter() - started)
        except Exception as exc:
            errors.append(repr(exc))

    workers = [threading.Thread(target=publisher, args=(i,)) for i in range(threads)]
    for worker in workers:
        worker.start()
    barrier.wait(30)
    started, cpu_started = time.perf_counter(), time.process_time()
    time.sleep(seconds)
    stop.set()
    for worker in workers:
        worker.join(60)
    elapsed = time.perf_counter() - started
    cpu = time.process_time() - cpu_started  # every thread of the process, the reader's too
    held = count_amqp_sockets(psutil.Process(), amqp_port(case["url"]))
    samples = [s for mine in latencies for s in mine]
    with app.connection_for_write() as conn:
        conn.default_channel.queue_delete(queue)
    return {"ok": not errors, "error": errors[0] if errors else None, "errors": len(errors),
            "published": len(samples), "rate": len(samples) / elapsed, "connections": held,
            "cpu_per_delay": cpu / len(samples) if samples else None,
            **latency_summary(samples)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", default="1,8,50,200")
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--case", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        emit_result(run_one(json.loads(args.case)))
        return 0
    counts = [int(n) for n in args.threads.split(",")]
    results: dict[tuple[int, str], list[dict[str, Any]]] = {}
    with dedicated_vhost("celery") as vhost:
        url = url_for_vhost(rabbit_admin.amqp_url(), vhost)
        for repeat in range(args.repeats):
            for threads in counts:
                for setup in SETUPS:
                    case = {"url": url, "setup": setup, "threads": threads,
                            "seconds": args.seconds}
                    result = run_case("stress.bench_celery", case, timeout=120 + args.seconds)
                    results.setdefault((threads, setup), []).append(result)
                    print(f"run {repeat + 1} threads {threads} {setup}: "
                          f"{fmt_rate(result.get('rate'))}/s, p99 {fmt_ms(result.get('p99'))}, "
                          f"CPU {fmt_ms(result.get('cpu_per_delay'))}/delay, "
                          f"{result.get('connections')} connections"
                          + ("" if result.get("ok") else f", {short_error(result)}"),
                          file=sys.stderr)
    text = report(results, counts, args)
    write_result(RESULTS_DIR / "bench_celery.md", text)
    print(text)
    return 0 if all(r.get("ok") for runs in results.values() for r in runs) else 1


def report(results: dict[tuple[int, str], list[dict[str, Any]]], counts: list[int],
           args: argparse.Namespace) -> str:
    rows = []
    for threads in counts:
        base = median_or_none([r.get("rate") for r in results[(threads, "default")]])
        for setup in SETUPS:
            runs = results[(threads, setup)]
            rate = median_or_none([r.get("rate") for r in runs])
            low_high = spread([r.get("rate") for r in runs])
            ok = sum(1 for r in runs if r.get("ok"))
            rows.append([
                threads, LABELS[setup],
                fmt_rate(rate),
                "—" if low_high is None else f"{fmt_rate(low_high[0])}–{fmt_rate(low_high[1])}",
                fmt_ms(median_or_none([r.get("p50") for r in runs])),
                fmt_ms(median_or_none([r.get("p99") for r in runs])),
                fmt_ms(median_or_none([r.get("cpu_per_delay") for r in runs])),
                max((r.get("connections") or 0) for r in runs),
                "—" if rate is None or not base else f"{rate / base:.2f}x",
                f"{ok}/{len(runs)} ok",
            ])
    headers = ["threads", "setup", "delay()/s (median)", "min–max", "p50", "p99",
               "CPU per delay", "connections held", "vs default", "runs"]
    return "\n".join([
        "# Celery publishers: kombu's amqp transport against shared+amqp",
        "",
        f"`python -m stress.bench_celery --threads {args.threads} --seconds {args.seconds:g} "
        f"--repeats {args.repeats}`: threads calling `delay()` with publisher confirms, Celery's "
        "default settings otherwise (broker_pool_limit 10); cases interleaved, each in a fresh "
        "process; medians of the repeats.",
        "",
        markdown_table(headers, rows),
        "",
        f"Machine: {machine_line()}. Shared with other sessions: compare the two rows of a "
        "thread count, not absolute figures.",
        "",
    ])


if __name__ == "__main__":
    sys.exit(main())
