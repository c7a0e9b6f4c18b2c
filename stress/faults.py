"""Reliability under faults: KombuBroker loses nothing when RabbitMQ or the network fails.

    python -m stress.faults                      # every fault case, then the results table
    python -m stress.faults --cases close-all,silent-network
    python -m stress.faults --skip restart       # leave the server alone (shared servers)
    python -m stress.faults --loops 50           # resource hygiene over 50 faults
    python -m stress.faults --idle               # a worker idle for 600 s (--idle SECONDS)
    python -m stress.faults --close-cost --messages 5000 --work-ms 50   # 3 closes vs no fault
    python -m stress.faults --cluster            # node loss on the local 3-node cluster
                                                 # (stress/cluster_faults.py, its own options)

Each fault case runs a real dramatiq Worker (64 threads) on KombuBroker while senders stream a
few thousand messages, each with an id, and injects one fault:

- ``close-all``: the server closes every connection (``rabbitmqctl close_all_connections``)
  three times during the run;
- ``restart``: the server restarts (``rabbitmqctl stop_app``, 3 s, ``start_app``). This
  disconnects EVERY client of the RabbitMQ node; the server is always started again;
- ``silent-network``: a TCP proxy stops forwarding without closing anything (heartbeat 2 s),
  then forwards again: the loss is detected through heartbeats and the worker reconnects;
- ``network-reset``: the proxy resets every connection (TCP RST), three times, while 64
  threads publish as fast as they can;
- ``channel-close``: the server closes one consumer's channel while the others keep going;
- ``sigterm``: the worker (the ``dramatiq`` CLI, 2 processes) gets SIGTERM mid-run and is
  started again.

The table gives, per case: messages sent, distinct messages processed, lost (sent but never
processed), duplicates (processed more than once: delivery is at-least-once) and the recovery
time: from the end of the fault until a message sent afterwards was accepted and a message
delivered on a new consumer channel was processed (the slowest of the case's faults).

All cases connect as a throw-away user with a distinctive password and check that it appears
in no log line. Everything runs in a vhost of its own, deleted at the end.

Exit status: 0 when nothing was lost and every case recovered; 1 otherwise.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from stress import rabbit_admin
from stress.common import dedicated_vhost
from stress.fault_scenarios.channel_close import channel_close_case
from stress.fault_scenarios.cli_sigterm import cli_sigterm_case
from stress.fault_scenarios.connection_close import close_all_connections_case
from stress.fault_scenarios.context import SCRIPT_SCALE, Context
from stress.fault_scenarios.credentials import secret_user, url_with
from stress.fault_scenarios.harness import LoadedWorker
from stress.fault_scenarios.hygiene import fault_loop
from stress.fault_scenarios.idle import idle_case
from stress.fault_scenarios.log_watch import watching
from stress.fault_scenarios.network import network_reset_case, silent_network_case
from stress.fault_scenarios.results import FaultResult, details_table, markdown_table
from stress.fault_scenarios.server_restart import server_restart_case

#: The fault cases, in the order they run.
FAULT_CASES: dict[str, Callable[[Context], FaultResult]] = {
    "close-all": close_all_connections_case,
    "restart": server_restart_case,
    "silent-network": silent_network_case,
    "network-reset": network_reset_case,
    "channel-close": channel_close_case,
    "sigterm": cli_sigterm_case,
}

#: (flag, field of Scale, type, help) of the options that size the cases.
SCALE_OPTIONS: list[tuple[str, str, type, str]] = [
    ("--messages", "messages", int, "messages per case"),
    ("--threads", "threads", int, "worker threads"),
    ("--senders", "senders", int, "threads streaming the messages"),
    ("--burst-senders", "burst_senders", int, "threads publishing flat out in network-reset"),
    ("--rate", "send_rate", float, "messages per second streamed"),
    ("--work-ms", "work_ms", float, "time each message takes in the actor"),
    ("--processes", "cli_processes", int, "dramatiq CLI processes in the sigterm case"),
]


def progress(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m stress.faults", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default=rabbit_admin.amqp_url(),
                        help="the RabbitMQ (default: AMQP_URL or %(default)s)")
    parser.add_argument("--cases", help=f"comma-separated fault cases (default: all of "
                        f"{','.join(FAULT_CASES)}; none when --loops or --idle is given)")
    parser.add_argument("--skip", default="", help="comma-separated cases to leave out")
    for flag, field, kind, what in SCALE_OPTIONS:
        parser.add_argument(flag, dest=field, type=kind, default=getattr(SCRIPT_SCALE, field),
                            metavar=flag[2:].upper(), help=f"{what} (default %(default)s)")
    parser.add_argument("--loops", type=int, metavar="N",
                        help="resource hygiene: N faults in turn on one worker, threads, "
                             "file descriptors and server channels before vs after")
    parser.add_argument("--idle", type=float, nargs="?", const=600.0, metavar="SECONDS",
                        help="idle test: a worker idle for SECONDS (600 if not given) still "
                             "holds its connections and consumes")
    parser.add_argument("--heartbeat", type=float, default=None,
                        help="heartbeat of the idle test (default: the broker's, 60 s)")
    parser.add_argument("--close-cost", type=int, nargs="?", const=3, metavar="CLOSES",
                        help="drain a full queue without a fault and with CLOSES (3) forced "
                             "closes: what recovery costs against the no-fault floor")
    parser.add_argument("--output", type=Path, help="also write the markdown report here")
    args = parser.parse_args(argv)
    if args.cases is None:
        args.cases = "" if (args.loops or args.idle or args.close_cost) else ",".join(FAULT_CASES)
    cases = [c for c in args.cases.split(",") if c]
    skip = {c for c in args.skip.split(",") if c}
    unknown = [c for c in [*cases, *skip] if c not in FAULT_CASES]
    if unknown:
        parser.error(f"unknown case(s) {unknown}; known: {', '.join(FAULT_CASES)}")
    args.case_list = [c for c in FAULT_CASES if c in cases and c not in skip]
    return args


def drain_with_closes(ctx: Context, closes: int, *, close: bool = True
                      ) -> tuple[float, list[float], FaultResult]:
    """Seconds the worker takes to process a full queue while the server closes every
    connection ``closes`` times (0: the no-fault floor), how long after each close (when the
    consumer saw it) a message delivered on a new channel was processed, and the result.

    Close N starts once N/(closes+1) of the queue is processed; rabbitmqctl takes seconds to
    start on a loaded machine, so it lands later: a close that lands after the queue drained
    is reported as a problem (run more messages then). With ``close`` false the same
    rabbitmqctl calls and probes run but close nothing: the floor of the harness itself
    (each rabbitmqctl call burns about a CPU second starting an Erlang VM).
    """
    with watching(ctx) as watch:
        lw = LoadedWorker(ctx, watch=watch)
        with lw.closing_on_error():
            total = ctx.scale.messages
            for queue in lw.queues:
                lw.broker.declare_queue(queue, ensure=True)
            senders = lw.stream(list(range(total)), threads=ctx.scale.senders, rate=None)
            senders.join(ctx.scale.timeout)
            started = lw.started = time.monotonic()
            lw.worker.start()
            for number in range(closes):
                lw.wait_processed(total * (number + 1) // (closes + 1))
                if close:
                    rabbit_admin.close_all_connections(f"close cost {number + 1}",
                                                       vhost=ctx.vhost)
                else:
                    rabbit_admin.rabbitmqctl("list_connections", "-p", ctx.vhost, "pid")
                lw.probe()  # the producer connection comes back too
            lw.wait_processed(total + closes)
            drained = max(t for t, mid, _, _ in lw.ledger.log if mid < total)
        result = lw.finish(f"{closes} closes")
    losses: list[float] = []
    for moment, _, text in watch.warnings:
        if "lost its channel" in text and (not losses or moment - losses[-1] > 0.5):
            losses.append(moment)
    deficits = _rate_deficits(lw.ledger.log, losses, started, drained)
    result.notes.append("processing time lost to each close, from the rate in this run (s): "
                        + ", ".join(f"{d:.2f}" for d in deficits))
    resumed = []
    for loss in losses:
        first = lw.ledger.first_processing(loss, lw.ledger.channels_before(loss))
        if first is None or loss > drained:
            result.problems.append("a close landed after the queue was drained")
        else:
            resumed.append(first - loss)
    if len(losses) != (closes if close else 0):
        result.problems.append(f"{len(losses)} losses seen for {closes} closes")
    return drained - started, resumed, result


def _rate_deficits(log: list[tuple[float, int, str, object]], losses: list[float],
                   started: float, drained: float, bucket: float = 0.1,
                   span: tuple[float, float] = (-0.2, 1.0)) -> list[float]:
    """Per loss, the seconds of processing it cost: the shortfall of completions against the
    run's median rate, in ``span`` around the loss (noise on a shared machine cancels out
    better within one run than between two)."""
    counts: dict[int, int] = {}
    for moment, _, _, _ in log:
        if started <= moment <= drained:
            counts[int((moment - started) / bucket)] = counts.get(
                int((moment - started) / bucket), 0) + 1
    buckets = int((drained - started) / bucket)
    if buckets < 10:
        return []
    median = statistics.median(counts.get(i, 0) for i in range(5, buckets))
    deficits = []
    for loss in losses:
        first = int((loss - started + span[0]) / bucket)
        last = min(buckets, int((loss - started + span[1]) / bucket))
        missing = sum(max(0.0, median - counts.get(i, 0)) for i in range(first, last))
        deficits.append(missing / median * bucket if median else 0.0)
    return deficits


def guarded(title: str, section: Callable[[], list[str]]) -> list[str]:
    """The lines of a report section; a section that raises is one problem line, not the end
    of the run."""
    try:
        return section()
    except Exception as exc:  # noqa: BLE001 - reported as a problem of the section
        logging.exception("%s failed", title)
        return [f"problem: {type(exc).__name__}: {exc}"]


def hygiene(ctx: Context, loops: int) -> list[str]:
    """Resource hygiene: ``loops`` faults in turn on one worker, resources before vs after."""
    result = fault_loop(ctx, loops, progress=progress)
    problems = result.problems + result.result.unexpected_logs[:3]
    return [result.table(), "", f"faults: {dict(result.faults)}; messages: "
            f"sent {result.result.sent}, lost {result.result.lost}, "
            f"duplicates {result.result.duplicates}", ""] + [f"problem: {p}" for p in problems]


def idle(ctx: Context, seconds: float, heartbeat: float | None) -> list[str]:
    """A worker idle for ``seconds`` still holds its connections and consumes."""
    result = idle_case(ctx, seconds, heartbeat=heartbeat, progress=progress)
    return [f"heartbeat {result.heartbeat:g} s",
            f"connections before: {result.ports_before}",
            f"connections after:  {result.ports_after}",
            f"heartbeat negotiated with the server: {result.server_heartbeat}",
            f"'connection lost' warnings while idle: {result.lost_warnings}",
            f"a message sent after the idle period: accepted in "
            f"{result.send_after:.3f} s, processed "
            + (f"{result.latency_after:.3f} s after it was sent"
               if result.latency_after is not None else "never"), ""
            ] + [f"problem: {p}" for p in result.problems]


def close_cost(ctx: Context, closes: int = 3) -> list[str]:
    """Issue 13's measurement: a full queue drained without a fault and with ``closes``
    forced closes; what the closes cost and how fast consumers resumed after each."""
    floor, _, base = drain_with_closes(ctx, 0)
    faulted, resumed, result = drain_with_closes(ctx, closes)
    calls, _, harness = drain_with_closes(ctx, closes, close=False)
    problems = [f"{r.fault}: {p}" for r in (base, result, harness)
                for p in r.problems + ([f"{r.lost} lost"] if r.lost else [])]
    median = statistics.median(resumed) if resumed else float("nan")
    return [f"{ctx.scale.threads} worker threads, {ctx.scale.messages} messages of "
            f"{ctx.scale.work_ms:g} ms, queue full before the worker starts:", "",
            "| run | drained in (s) | processing resumed after each close (s) | lost | "
            "duplicates |", "| --- | ---: | ---: | ---: | ---: |",
            f"| no fault (floor) | {floor:.1f} | | {base.lost} | {base.duplicates} |",
            f"| no fault, the same {closes} rabbitmqctl calls and probes | {calls:.1f} | | "
            f"{harness.lost} | {harness.duplicates} |",
            f"| {closes} x close_all_connections | {faulted:.1f} (+{faulted - floor:.1f}) | "
            f"{', '.join(f'{r:.2f}' for r in resumed)} (median {median:.2f}) | {result.lost} | "
            f"{result.duplicates} |", "", *result.notes, ""] + [f"problem: {p}" for p in problems]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--cluster" in argv:
        from stress import cluster_faults

        return cluster_faults.main([a for a in argv if a != "--cluster"])
    args = parse_args(argv)
    scale = replace(SCRIPT_SCALE, **{field: getattr(args, field)
                                        for _, field, _, _ in SCALE_OPTIONS})
    work_dir = Path(tempfile.mkdtemp(prefix="faults-"))
    log_file = work_dir / "run.log"
    logging.basicConfig(filename=log_file, level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(threadName)s %(name)s %(message)s")
    progress(f"logs and CLI output in {work_dir}")
    report: list[str] = []
    failed = False
    with dedicated_vhost("faults") as vhost, secret_user(vhost) as (user, password):
        ctx = Context(url_with(args.url, vhost, user, password), vhost, scale,
                         secret=password, work_dir=work_dir)
        results: list[FaultResult] = []
        for case in args.case_list:
            if case == "restart":
                progress("restarting RabbitMQ (stop_app/start_app): every client of the node "
                         "is disconnected")
            progress(f"{case}: {scale.messages} messages, {scale.threads} worker threads")
            try:
                result = FAULT_CASES[case](ctx)
            except Exception as exc:  # noqa: BLE001 - reported as a failed case
                logging.exception("case %s failed", case)
                result = FaultResult(case, problems=[f"{type(exc).__name__}: {exc}"])
            results.append(result)
            failed |= not result.ok
            progress(("ok  " if result.ok else "FAIL") + " " + result.explain().splitlines()[0])
            for line in result.explain().splitlines()[1:]:
                progress("     " + line)
        if results:
            report += ["## Faults under load", "",
                       f"{scale.threads} worker threads, {scale.messages} messages per case "
                       f"(streamed by {scale.senders} threads at {scale.send_rate:g}/s, "
                       f"{scale.work_ms:g} ms of work each).", "",
                       markdown_table(results), "", details_table(results), ""]
        sections: list[tuple[str, Callable[[], list[str]]]] = []
        if args.loops:
            sections.append((f"Resource hygiene ({args.loops} faults)",
                             lambda: hygiene(ctx, args.loops)))
        if args.idle:
            sections.append((f"Idle for {args.idle:.0f} s",
                             lambda: idle(ctx, args.idle, args.heartbeat)))
        if args.close_cost:
            sections.append((f"Cost of forced closes ({scale.messages} messages, "
                             f"{args.close_cost} closes)",
                             lambda: close_cost(ctx, args.close_cost)))
        for title, section in sections:
            progress(title)
            lines = guarded(title, section)
            report += [f"## {title}", "", *lines]
            failed |= any(line.startswith("problem:") for line in lines)
    text = "\n".join(report)
    print(text)
    if args.output:
        args.output.write_text(text + "\n")
    progress("FAILED" if failed else "all cases passed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
