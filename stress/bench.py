"""KombuBroker side by side with dramatiq's RabbitmqBroker (pika), same workloads, same server.

Workloads (both brokers with ``confirm_delivery=True``):

- ``enqueue``: ``actor.send()`` from 1, 8 and 64 threads (fixed message count; each thread
  sends one untimed message first so connections and queues exist before the clock starts).
- ``drain``: a ``dramatiq.Worker`` with 8 and 64 threads drains 5000 preloaded messages (clock
  from ``worker.start()`` to the last message processed).
- ``chain``: the "send the next" workload (see ``stress.run``) with 8, 50, 300 and 900 worker
  threads for a fixed duration; end-to-end latency from the send time carried in the message.

Every case runs in a fresh subprocess (per-case RSS and threads, no dramatiq global state
leaking between cases), the two brokers interleaved, the whole set repeated (``--repeat``);
medians and min–max spreads are reported. Connections are the peak number of TCP connections
of the case's process to the AMQP port (psutil, sampled every 0.5 s). Lost and duplicated
messages are counted by id in the drain and chain workloads. A failing case is recorded as data.

RabbitmqBroker opens one connection per thread that sends. RabbitMQ 3.x stops accepting
handshakes once its socket limit is reached (832 with the default ``ulimit -n 1024``), which
stalls every client of the server: a case that needs more connections than the server has to
spare is skipped and shown as such (``--force-over-socket-limit`` runs it anyway).

Writes ``stress/results/bench.md`` and ``bench-throughput.png``, ``bench-connections.png``,
``bench-p99.png``.

    python -m stress.bench [--repeat 3] [--quick] [--duration 15] [--brokers kombu,rabbitmq]
    python -m stress.bench --cluster     # on the local 3-node cluster (stress/cluster_faults.py):
                                         # KombuBroker on quorum and on classic queues,
                                         # RabbitmqBroker on classic; writes bench-cluster.md
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dramatiq_kombu_broker.topology import declarations, queue_arguments
from stress import rabbit_admin
from stress.cluster_faults import (
    CLUSTER_NOTE,
    bench_broker,
    bench_cluster,
    cluster_bench_defaults,
    cluster_url,
)
from stress.common import (
    RESULTS_DIR,
    ProcessSampler,
    amqp_ports,
    dedicated_vhost,
    emit_result,
    fmt_mib,
    fmt_ms,
    fmt_rate,
    int_list,
    latency_summary,
    machine_line,
    markdown_table,
    median_or_none,
    run_case,
    short_error,
    socket_headroom,
    split,
    spread,
    url_for_vhost,
    write_result,
)
from stress.polling import poll
from stress.workload import (
    HOP_STRIDE,
    LogCounter,
    Tracker,
    broker_available,
    define_hop_actor,
    make_broker,
    seed_chains,
    tracker_recorder,
)

MODULE = "stress.bench"
OUTPUT = RESULTS_DIR / "bench.md"
BROKER_LABELS = {"kombu": "KombuBroker", "rabbitmq": "RabbitmqBroker (pika)",
                 "kombu-quorum": "KombuBroker (quorum queues)"}
WORKLOAD_LABELS = {"enqueue": "enqueue", "drain": "worker drain", "chain": "send-the-next"}


# ------------------------------------------------------------------------------ one case (child)


def _queue_admin(url: str, queue: str, *, declare: bool = False, delete: bool = False,
                 preload: list[bytes] | None = None) -> None:
    """Declare (with dramatiq's arguments), preload or delete a queue over a short-lived plain
    connection that is closed before the measurement starts."""
    import kombu

    with kombu.Connection(url, transport_options={"confirm_publish": True}) as conn:
        channel = conn.channel()
        if declare:
            channel.queue_declare(queue=queue, durable=True, auto_delete=False,
                                  arguments=queue_arguments(queue, None))
        if preload:
            import amqp

            # As dramatiq's brokers publish: persistent, no content type or encoding.
            for body in preload:
                channel.basic_publish(amqp.Message(body, delivery_mode=2), exchange="",
                                      routing_key=queue)
        if delete:
            for name, _ in declarations(queue, None):
                with contextlib.suppress(Exception):
                    channel.queue_delete(queue=name)
        channel.close()


def _wait_for(predicate: Callable[[], bool], timeout: float, interval: float = 0.05) -> bool:
    return poll(predicate, bool, timeout, interval)


def run_one(case: dict[str, Any]) -> dict[str, Any]:
    import dramatiq
    import psutil

    logs = LogCounter()
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    logging.getLogger().addHandler(logs)
    url, kind, workload, threads = case["url"], case["broker"], case["workload"], case["threads"]
    queue = f"b-{workload}-{uuid.uuid4().hex[:8]}"
    prefix = f"bench-{kind}-{workload}-{threads}"
    me = psutil.Process()
    tracker = Tracker()
    deadline: list[float | None] = [None]
    result: dict[str, Any] = {"ok": True}

    if workload == "drain":
        # Preload before anything of the broker exists, so the preload connection is not counted.
        from dramatiq import Message

        from stress.workload import HOP_ACTOR

        bodies = [Message(queue_name=queue, actor_name=HOP_ACTOR,
                          args=(i, 0, 1, 0.0), kwargs={}, options={}).encode()
                  for i in range(case["messages"])]
        _queue_admin(url, queue, declare=True, preload=bodies)

    sampler = ProcessSampler(amqp_ports(url)).start()
    broker = (bench_broker if kind == "kombu-quorum" else make_broker)(kind, url, prefix)
    actor = define_hop_actor(broker, queue, tracker_recorder(tracker), lambda: deadline[0],
                             claim=tracker.claim)
    worker = None
    cpu0 = me.cpu_times()
    try:
        if workload == "enqueue":
            total = case["messages"]
            latencies: list[float] = []
            errors: list[str] = []
            barrier = threading.Barrier(threads + 1)

            def sender(index: int, count: int) -> None:
                perf = time.perf_counter
                local: list[float] = []
                try:
                    actor.send(index, 0, 1, time.time())  # warm-up: connection, channel, queue
                    barrier.wait(120)
                    for hop in range(1, count + 1):
                        t0 = perf()
                        actor.send(index, hop, 1, time.time())
                        local.append(perf() - t0)
                except BaseException as exc:  # noqa: BLE001 - reported in the result
                    errors.append(f"{type(exc).__name__}: {exc}")
                    barrier.abort()
                latencies.extend(local)

            workers = [threading.Thread(target=sender, args=(i, n), name=f"send-{i}")
                       for i, n in enumerate(split(total, threads))]
            setup0 = time.perf_counter()
            for t in workers:
                t.start()
            _wait_for(lambda: barrier.n_waiting >= threads or barrier.broken, 180)
            sampler.sample()  # every sender holds its connection and waits: count them now
            with contextlib.suppress(threading.BrokenBarrierError):
                barrier.wait(180)
            started = time.perf_counter()
            cpu0 = me.cpu_times()
            result["setup_s"] = started - setup0
            for t in workers:
                t.join()
            elapsed = time.perf_counter() - started
            done = len(latencies)
            result.update(latency_summary(latencies))
            result["messages"] = done
            result["rate"] = done / elapsed if elapsed > 0 else None
            if errors or done != total:
                result["ok"] = False
                result["error"] = (f"{len(errors)} sender(s) failed; first: "
                                   f"{errors[0] if errors else f'sent {done} of {total}'}")

        elif workload == "drain":
            total = case["messages"]
            tracker.sent_ids.update(i * HOP_STRIDE for i in range(total))
            worker = dramatiq.Worker(broker, worker_threads=threads, worker_timeout=100)
            started = time.perf_counter()
            worker.start()
            _wait_for(lambda: tracker.n_processed > 0, 10, 0.01)
            sampler.sample()
            finished = _wait_for(lambda: tracker.n_processed >= total, case["timeout"])
            elapsed = time.perf_counter() - started
            result["rate"] = tracker.n_processed / elapsed if elapsed > 0 else None
            result["messages"] = tracker.n_processed
            if not finished:
                result["ok"] = False
                result["error"] = f"processed {tracker.n_processed} of {total} in time"

        elif workload == "chain":
            duration = case["duration"]
            # Seed first (one chain per worker thread), then start the clock with the worker.
            budgets = [HOP_STRIDE - 1] * threads
            seed0 = time.time()
            seed_errors = seed_chains(actor, tracker, threads, budgets)
            result["seeding_s"] = time.time() - seed0
            worker = dramatiq.Worker(broker, worker_threads=threads, worker_timeout=100)
            seeded_wall = time.time()
            deadline[0] = seeded_wall + duration
            cpu0 = me.cpu_times()
            worker.start()
            _wait_for(lambda: time.time() >= deadline[0], duration + 5, 0.1)
            # Let the chains run out (no successor after the deadline), bounded.
            drained = _wait_for(lambda: tracker.n_sent - tracker.n_processed <= 0,
                                case["timeout"] / 2, 0.1)
            with tracker.lock:
                window = [(lat, at) for lat, at in zip(tracker.latencies, tracker.at_times,
                                                       strict=True)
                          if seeded_wall <= at <= deadline[0]]
                seeds = sum(1 for at in tracker.seed_at_times if at <= deadline[0])
            span = deadline[0] - seeded_wall
            result["rate"] = (len(window) + seeds) / span if span > 0 else None
            result["messages"] = len(window) + seeds
            result.update(latency_summary([lat for lat, _ in window]))
            if seed_errors:
                result["ok"] = False
                result["error"] = f"{len(seed_errors)} seed sends failed: {seed_errors[0]}"
            elif not drained:
                result["ok"] = False
                result["error"] = (f"{tracker.n_sent - tracker.n_processed} messages still in "
                                   "flight after the deadline")
        else:
            raise ValueError(f"unknown workload {workload!r}")
    finally:
        cpu1 = me.cpu_times()
        result["cpu_s"] = (cpu1.user + cpu1.system) - (cpu0.user + cpu0.system)
        sampler.sample()
        stop0 = time.perf_counter()
        if worker is not None:
            worker.stop(timeout=30_000)
        broker.close()
        result["stop_s"] = time.perf_counter() - stop0
        sampler.stop()
        with contextlib.suppress(Exception):
            _queue_admin(url, queue, delete=True)

    if workload in ("drain", "chain"):
        cmp = tracker.comparison()
        result.update({k: cmp[k] for k in ("lost", "duplicated", "unexpected", "send_failures")})
        if result["ok"] and (cmp["lost"] or cmp["duplicated"] or cmp["unexpected"]):
            result["ok"] = False
            result["error"] = (f"lost {cmp['lost']}, duplicated {cmp['duplicated']}, "
                               f"unexpected {cmp['unexpected']}")
    result.update({
        "connections": sampler.peak_sockets, "peak_rss": sampler.peak_rss,
        "peak_threads": sampler.peak_threads, "log_warnings": logs.count,
        "log_first": logs.first[:2],
    })
    return result


# ----------------------------------------------------------------------------------- the plan


def plan(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Cases of one repeat (without broker): (workload, threads, parameters)."""
    cases = []
    timeout = 45 if args.quick else 180
    for t in args.enqueue_threads:
        cases.append({"workload": "enqueue", "threads": t, "messages": args.enqueue_messages,
                      "timeout": timeout})
    for t in args.drain_threads:
        cases.append({"workload": "drain", "threads": t, "messages": args.drain_messages,
                      "timeout": timeout})
    for t in args.chain_threads:
        cases.append({"workload": "chain", "threads": t, "duration": args.duration,
                      "timeout": args.duration + timeout})
    return cases


def connections_needed(kind: str, case: dict[str, Any]) -> int:
    if kind == "kombu":
        return 2
    if case["workload"] == "enqueue":
        return case["threads"]
    if case["workload"] == "drain":
        return 2
    # One per worker thread; each of the two consumer threads has its consumer connection and
    # the thread-local one it declared the queue on; the seeder.
    return case["threads"] + 5


# ------------------------------------------------------------------------------------ reporting


Key = tuple[str, int, str]


def _row(workload: str, threads: int, kind: str, runs: list[dict]) -> list[str]:
    ok = [r for r in runs if r.get("ok")]
    label = [WORKLOAD_LABELS[workload], str(threads), BROKER_LABELS[kind]]
    conns = max((r.get("connections") or 0 for r in runs), default=0)
    if not ok:
        first = runs[0] if runs else {"error": "not run"}
        status = "skipped" if first.get("skipped") else "FAILED"
        return label + [status, "—", "—", "—", str(conns or "—"), "—", "—", "—", "—",
                        f"0/{len(runs)} ok: {short_error(first, 160)}"]
    rates = [r.get("rate") for r in ok]
    lo_hi = spread(rates)
    lost = sum(r.get("lost", 0) for r in runs)
    dup = sum(r.get("duplicated", 0) for r in runs)
    cpu_per_k = median_or_none([1000 * r["cpu_s"] / r["messages"] for r in ok
                                if r.get("messages")])
    note = f"{len(ok)}/{len(runs)} ok"
    failed = [r for r in runs if not r.get("ok")]
    if failed:
        note += ": " + short_error(failed[0], 70)
    warnings = sum(r.get("log_warnings", 0) for r in runs)
    if warnings:
        note += f"; {warnings} log warnings"
    return label + [
        fmt_rate(median_or_none(rates)),
        f"{fmt_rate(lo_hi[0])}–{fmt_rate(lo_hi[1])}" if lo_hi else "—",
        fmt_ms(median_or_none([r.get("p50") for r in ok])),
        fmt_ms(median_or_none([r.get("p99") for r in ok])),
        str(conns),
        fmt_mib(median_or_none([r.get("peak_rss") for r in ok])),
        f"{median_or_none([r.get('peak_threads') for r in ok]):.0f}",
        "—" if cpu_per_k is None else f"{cpu_per_k:.2f}",
        "—" if workload == "enqueue" else f"{lost}/{dup}",
        note,
    ]


def render(args: argparse.Namespace, cases: list[dict], results: dict[Key, list[dict]]) -> str:
    rows = []
    for case in cases:
        for kind in args.brokers:
            key = (case["workload"], case["threads"], kind)
            rows.append(_row(case["workload"], case["threads"], kind, results.get(key, [])))
    table = markdown_table(
        ["workload", "threads", "broker", "msgs/s (median)", "msgs/s min–max", "p50", "p99",
         "peak connections", "peak RSS", "peak threads", "CPU s / 1k msgs", "lost/dup",
         "runs"], rows)
    notes = [
        f"enqueue: {args.enqueue_messages:,} timed `actor.send()` per case, latency = one send "
        "(until the publisher confirm). drain: "
        f"{args.drain_messages:,} preloaded messages, a no-op actor; no latency (the messages "
        f"waited in the queue by design). send-the-next: {args.duration:g} s per case, "
        "one chain per worker thread, latency = enqueue to start of processing.",
        "peak connections = TCP connections of the case's process to the AMQP port(s) (psutil, "
        "every 0.5 s). RSS and threads: peak of the case's process. CPU = user+system seconds "
        "of the case's process per 1000 messages (2 cores shared by client and server). "
        "lost/dup summed over the runs.",
        f"Medians of {args.repeat} repeat(s); brokers interleaved, each case a fresh process. "
        "Both brokers: `confirm_delivery=True`, persistent messages, classic queues.",
        f"Machine (shared and noisy, RabbitMQ on the same 2 cores): {machine_line()}.",
    ]
    if args.cluster:
        notes.append(CLUSTER_NOTE)
    if any(r.get("skipped") for runs in results.values() for r in runs):
        notes.append(
            "skipped: RabbitMQ 3.x stops accepting handshakes at its socket limit (832 with "
            "the usual `ulimit -n` 1024), stalling every client of the server; raise the limit "
            "(e.g. `ulimit -n 65536` before `rabbitmq-server` starts) and pass "
            "`--force-over-socket-limit` to run those cases.")
    return ("# KombuBroker vs RabbitmqBroker\n\n"
            f"`python -m {MODULE} {' '.join(args.argv)}`\n\n{table}\n\n"
            + "\n".join(f"- {n}" for n in notes) + "\n")


def plot(args: argparse.Namespace, cases: list[dict], results: dict[Key, list[dict]],
         out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [
        ("throughput", "messages / s", lambda r: r.get("rate"), False),
        ("connections", "peak TCP connections to RabbitMQ", lambda r: r.get("connections"), True),
        ("p99", "p99 latency (ms)",
         lambda r: None if r.get("p99") is None else r["p99"] * 1000, False),
    ]
    colors = {"kombu": "tab:blue", "rabbitmq": "tab:orange", "kombu-quorum": "tab:green"}
    styles = {"enqueue": "o-", "drain": "s--", "chain": "^-."}
    written = []
    workloads = [w for w in ("enqueue", "drain", "chain") if any(c["workload"] == w for c in cases)]
    for name, ylabel, get, include_failed in metrics:
        fig, ax = plt.subplots(figsize=(8, 5))
        for workload in workloads:
            if name == "p99" and workload == "drain":
                continue
            threads_list = sorted({c["threads"] for c in cases if c["workload"] == workload})
            for kind in args.brokers:
                xs, ys, lo, hi, failed_x = [], [], [], [], []
                for t in threads_list:
                    runs = results.get((workload, t, kind), [])
                    pool = runs if include_failed else [r for r in runs if r.get("ok")]
                    values = [v for v in (get(r) for r in pool) if v]
                    if not values:
                        if runs:
                            failed_x.append(t)
                        continue
                    med = median_or_none(values)
                    xs.append(t)
                    ys.append(med)
                    lo.append(med - min(values))
                    hi.append(max(values) - med)
                label = f"{BROKER_LABELS[kind]}, {WORKLOAD_LABELS[workload]}"
                if xs:
                    ax.errorbar(xs, ys, yerr=[lo, hi], fmt=styles[workload],
                                color=colors[kind], label=label, capsize=3)
                for t in failed_x:
                    ax.axvline(t, color=colors[kind], alpha=0.25, linestyle=":")
                    ax.annotate(f"{BROKER_LABELS[kind].split()[0]}\n{WORKLOAD_LABELS[workload]}"
                                "\nfailed/skipped", (t, 0.5), xycoords=("data", "axes fraction"),
                                fontsize=7, color=colors[kind], ha="center")
        ax.set_xscale("log")
        ticks = sorted({c["threads"] for c in cases})
        ax.set_xticks(ticks)
        ax.set_xticklabels([str(t) for t in ticks])
        ax.minorticks_off()
        if name != "throughput":
            ax.set_yscale("log")
        ax.set_xlabel("threads")
        ax.set_ylabel(ylabel)
        ax.set_title(f"{ylabel} vs threads (median, min–max bars)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = out_dir / f"{Path(args.output).stem}-{name}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


# ---------------------------------------------------------------------------------------- main


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=f"python -m {MODULE}", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=None, help="repeats (default 3; quick 1)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: few threads, short cases, one repeat (< 1 min)")
    parser.add_argument("--brokers", default=None,
                        help="comma-separated subset of kombu,rabbitmq (--cluster: and "
                             "kombu-quorum; default all)")
    parser.add_argument("--cluster", action="store_true",
                        help="run on the local 3-node cluster (started if needed): "
                             "send-the-next at 50 and 300 threads, enqueue at 64")
    parser.add_argument("--enqueue-threads", type=int_list, default=None,
                        help="default 1,8,64")
    parser.add_argument("--enqueue-messages", type=int, default=None, help="default 3000")
    parser.add_argument("--drain-threads", type=int_list, default=None, help="default 8,64")
    parser.add_argument("--drain-messages", type=int, default=None, help="default 5000")
    parser.add_argument("--chain-threads", type=int_list, default=None,
                        help="default 8,50,300,900")
    parser.add_argument("--duration", type=float, default=None,
                        help="seconds per send-the-next case (default 15)")
    parser.add_argument("--workloads", default="enqueue,drain,chain",
                        help="comma-separated subset of enqueue,drain,chain")
    parser.add_argument("--force-over-socket-limit", action="store_true",
                        help="run cases even when they exceed the server's spare sockets")
    parser.add_argument("--output", default=None, help=f"markdown output file (default {OUTPUT}; "
                        "--cluster: bench-cluster.md)")
    parser.add_argument("--case", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.argv = argv
    quick = args.quick
    if args.cluster:
        cluster_bench_defaults(args)
    args.brokers = args.brokers or "kombu,rabbitmq"
    args.output = args.output or str(OUTPUT)
    defaults = {
        "repeat": (1, 3), "enqueue_threads": ([1, 8], [1, 8, 64]),
        "enqueue_messages": (300, 3000), "drain_threads": ([8], [8, 64]),
        "drain_messages": (500, 5000), "chain_threads": ([8, 50], [8, 50, 300, 900]),
        "duration": (3.0, 15.0),
    }
    for name, (q, full) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, q if quick else full)
    args.brokers = [b.strip() for b in args.brokers.split(",") if b.strip()]
    if set(args.brokers) - set(BROKER_LABELS):
        parser.error("--brokers takes kombu and/or rabbitmq")
    workloads = {w.strip() for w in args.workloads.split(",") if w.strip()}
    if workloads - set(WORKLOAD_LABELS):
        parser.error("--workloads takes enqueue, drain and/or chain")
    for w, attr in (("enqueue", "enqueue_threads"), ("drain", "drain_threads"),
                    ("chain", "chain_threads")):
        if w not in workloads:
            setattr(args, attr, [])
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.case:
        case = json.loads(args.case)
        try:
            emit_result(run_one(case))
        except BaseException as exc:  # noqa: BLE001 - a failed case is data
            emit_result({"ok": False, "error": f"{type(exc).__name__}: {exc}"})
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)  # never wait for stuck non-daemon threads of a broken case

    unavailable = {kind: why for kind in args.brokers if (why := broker_available(kind))}
    cases = plan(args)
    results: dict[Key, list[dict]] = {}
    runs_total = args.repeat * len(cases) * len(args.brokers)
    done = 0
    started = time.monotonic()
    with bench_cluster() if args.cluster else dedicated_vhost("bench") as vhost:
        url = cluster_url(vhost) if args.cluster else url_for_vhost(rabbit_admin.amqp_url(), vhost)
        print(f"vhost {vhost}; {runs_total} case runs", file=sys.stderr)
        for rep in range(args.repeat):
            for index, case in enumerate(cases):
                order = args.brokers if (rep + index) % 2 == 0 else args.brokers[::-1]
                for kind in order:
                    done += 1
                    key = (case["workload"], case["threads"], kind)
                    result: dict[str, Any] | None = None
                    if kind in unavailable:
                        result = {"ok": False, "error": unavailable[kind]}
                    needed = connections_needed(kind, case)
                    if result is None and needed > 50 and not args.force_over_socket_limit:
                        headroom = socket_headroom()
                        if headroom is not None and needed > headroom[0]:
                            result = {"ok": False, "skipped": True,
                                      "error": f"skipped: needs ~{needed} connections "
                                               f"({headroom[1]})"}
                    if result is None:
                        result = run_case(MODULE, {**case, "broker": kind, "url": url},
                                          case["timeout"] + 60)
                    results.setdefault(key, []).append(result)
                    status = (f"{fmt_rate(result.get('rate'))} msg/s, p99 "
                              f"{fmt_ms(result.get('p99'))}, conns {result.get('connections')}, "
                              f"rss {fmt_mib(result.get('peak_rss'))}"
                              if result.get("ok") else short_error(result, 300))
                    print(f"[{done}/{runs_total} {time.monotonic() - started:5.0f}s] rep {rep + 1} "
                          f"{BROKER_LABELS[kind]} {WORKLOAD_LABELS[case['workload']]} "
                          f"x{case['threads']}: {status}", file=sys.stderr, flush=True)
    text = render(args, cases, results)
    output = Path(args.output)
    write_result(output, text)
    raw = output.with_suffix(".json")
    write_result(raw, json.dumps({f"{w}|{t}|{k}": v for (w, t, k), v in results.items()},
                                 indent=1))
    try:
        pngs = plot(args, cases, results, output.parent)
    except Exception as exc:  # noqa: BLE001 - the table is the main output
        pngs = []
        print(f"warning: plots failed: {exc}", file=sys.stderr)
    print(text)
    print(f"wrote {output}, {raw}" + "".join(f", {p}" for p in pngs), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
