"""The 900-thread stress test: dramatiq's real Worker on KombuBroker, "send the next" workload.

``threads`` chains are seeded; each actor call processes one message and sends the next of its
chain until ``--messages`` messages in total were sent (or ``--duration`` seconds passed). Every
message carries a unique id and its send time, so at the end sent and processed ids are compared:
lost, duplicated and unexpected messages are counted exactly, and end-to-end latency is measured.

Default mode: one process, ``dramatiq.Worker(broker, worker_threads=T, worker_timeout=100)``.
``--cli``: the real ``dramatiq`` CLI (``--processes P --threads T``) runs ``stress.actors``;
every processed id is reported through a results queue that this process consumes.
``--gevent``: the same under ``dramatiq-gevent`` (monkey-patched; ``--threads`` greenlets per
process, 1,000 and one process by default).

A live progress line shows processed messages, rate, in-flight messages and the server-side
connection count of the run (``rabbitmqctl``, polled every few seconds). The run works in a
vhost of its own, deleted at the end.

Exit status: 0 when nothing was lost or duplicated, no send failed and the broker held at most
``--max-connections`` connections (default: 2 per process for KombuBroker, unchecked for
RabbitmqBroker); 1 otherwise; 2 when the broker cannot be used at all.

    python -m stress.run [--threads 900] [--messages 100000] [--duration S]
    python -m stress.run --cli --processes 2 --threads 100 --messages 20000
    python -m stress.run --gevent --messages 20000        # 1 process x 1,000 greenlets
    python -m stress.run --broker rabbitmq --threads 50 --messages 5000   # the pika broker
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dramatiq_kombu_broker.topology import declarations, queue_arguments
from stress import rabbit_admin
from stress.cli_workers import CliWorkers
from stress.common import (
    RESULTS_DIR,
    ProcessSampler,
    ServerConnectionPoller,
    amqp_ports,
    dedicated_vhost,
    fmt_mib,
    fmt_ms,
    fmt_rate,
    latency_summary,
    machine_line,
    markdown_table,
    split,
    url_for_vhost,
    write_result,
)
from stress.workload import (
    HOP_STRIDE,
    LogCounter,
    Tracker,
    actors_environment,
    broker_available,
    define_hop_actor,
    make_broker,
    seed_chains,
    tracker_recorder,
)

OUTPUT = RESULTS_DIR / "run.md"


# ------------------------------------------------------------------------------------ progress


@dataclass
class Monitor:
    """Prints the progress line and decides when the run is over."""

    args: argparse.Namespace
    tracker: Tracker
    total: int
    sampler: ProcessSampler
    poller: ServerConnectionPoller
    seeding: threading.Thread | None
    deadline: float | None
    tty: bool = field(default_factory=sys.stderr.isatty)
    started: float = field(default_factory=time.monotonic)

    def line(self, rate: float) -> str:
        t = self.tracker
        n, sent = t.n_processed, t.n_sent
        server = "?" if self.poller.last is None else str(self.poller.last)
        return (f"[{time.monotonic() - self.started:6.1f}s] processed {n:,}/{self.total:,} "
                f"rate {rate:,.0f}/s in-flight {max(0, sent - n):,} "
                f"server conns {server} (peak {self.poller.peak}) "
                f"local {self.sampler.sockets} threads {self.sampler.threads} "
                f"rss {fmt_mib(self.sampler.rss)}")

    def run(self) -> str:
        window: deque[tuple[float, int]] = deque(maxlen=5)
        last_n, last_change, idle_checks, last_print = -1, time.monotonic(), 0, 0.0
        reason = "complete"
        try:
            while True:
                time.sleep(0.5)
                now = time.monotonic()
                n, sent = self.tracker.n_processed, self.tracker.n_sent
                window.append((now, n))
                t0, n0 = window[0]
                rate = (n - n0) / (now - t0) if now > t0 else 0.0
                if self.tty:
                    sys.stderr.write("\r" + self.line(rate).ljust(120))
                    sys.stderr.flush()
                elif now - last_print >= 5:
                    print(self.line(rate), file=sys.stderr, flush=True)
                    last_print = now
                if n != last_n:
                    last_n, last_change = n, now
                seeded = self.seeding is None or not self.seeding.is_alive()
                if seeded and sent - n <= 0:
                    idle_checks += 1
                else:
                    idle_checks = 0
                if seeded and n >= self.total:
                    break
                if idle_checks >= 2:  # nothing in flight for a second: every chain ended
                    reason = "complete" if n >= self.total else "chains ended"
                    if self.deadline is not None and time.time() >= self.deadline:
                        reason = "duration reached"
                    break
                if now - last_change > self.args.stall_timeout:
                    reason = f"stalled (no progress for {self.args.stall_timeout:.0f} s)"
                    break
        except KeyboardInterrupt:
            reason = "interrupted"
        elapsed = time.monotonic() - self.started
        final = self.line(self.tracker.n_processed / elapsed if elapsed > 0 else 0.0)
        if self.tty:
            sys.stderr.write("\r" + final.ljust(120) + "\n")
        else:
            print(final, file=sys.stderr)
        return reason


def close_by_peer_port(vhost: str, peer_port: int, reason: str) -> bool:
    """Force-close the connection of ``vhost`` from client port ``peer_port``."""
    return rabbit_admin.close_connections(reason, vhost=vhost, peer_ports=[peer_port]) > 0


class Chaos:
    """Force-closes one of the run's connections (server side) every ``interval`` seconds,
    alternating between them, to exercise reconnects under load."""

    def __init__(self, vhost: str, prefix: str, interval: float) -> None:
        self.vhost = vhost
        self.prefix = prefix
        self.interval = interval
        self.closed: list[str] = []
        self.errors = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="chaos", daemon=True)

    def start(self) -> Chaos:
        if self.interval > 0:
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(60)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                conns = sorted(
                    (c for c in rabbit_admin.list_connections(self.vhost)
                     if (rabbit_admin.connection_name_of(c) or "").startswith(self.prefix)),
                    key=lambda c: (rabbit_admin.connection_name_of(c) or "", c["name"]))
                if not conns:
                    continue
                victim = conns[len(self.closed) % len(conns)]
                if close_by_peer_port(self.vhost, victim["peer_port"], "stress.run chaos"):
                    self.closed.append(rabbit_admin.connection_name_of(victim) or victim["name"])
            except rabbit_admin.RabbitmqctlError as exc:
                self.errors += 1
                if self.errors <= 3:
                    print(f"\nchaos: {exc}", file=sys.stderr)


# ---------------------------------------------------------------------------------- in-process


def run_in_process(args: argparse.Namespace, vhost: str, url: str, prefix: str) -> dict[str, Any]:
    import dramatiq

    tracker = Tracker()
    deadline: list[float | None] = [None]
    broker = make_broker(args.broker, url, prefix, heartbeat=args.heartbeat)
    actor = define_hop_actor(broker, args.queue, tracker_recorder(tracker), lambda: deadline[0],
                             claim=tracker.claim, delay_every=args.delay_every,
                             delay_ms=args.delay_ms)
    chains = max(1, min(args.threads, args.messages))
    budgets = split(args.messages, chains)

    poller = ServerConnectionPoller(vhost, prefix, args.poll_interval)
    sampler = ProcessSampler(amqp_ports(url)).start()
    # Seed before the worker starts: a seeder competing with 900 busy worker threads for the
    # GIL takes tens of seconds, and the first chains would be done before the last began.
    seed_started = time.monotonic()
    seed_errors = seed_chains(actor, tracker, chains, budgets)
    print(f"seeded {chains} chains in {time.monotonic() - seed_started:.1f} s", file=sys.stderr)
    worker = dramatiq.Worker(broker, worker_threads=args.threads, worker_timeout=100)
    started = time.time()
    worker.start()
    if args.duration:
        deadline[0] = started + args.duration
    poller.start()
    chaos = Chaos(vhost, prefix, args.chaos_interval).start()
    reason = Monitor(args, tracker, args.messages, sampler, poller, None, deadline[0]).run()
    chaos.stop()
    poller.stop(final_poll=True)  # the last count, while every connection is still open
    stop_started = time.monotonic()
    worker.stop(timeout=int(args.stop_timeout * 1000))
    broker.close()
    stop_s = time.monotonic() - stop_started
    sampler.stop()
    return {
        "reason": reason, "tracker": tracker, "started": started, "stop_s": stop_s,
        "sampler": sampler, "poller": poller, "seed_errors": seed_errors,
        "processes": 1, "chains": chains, "chaos": chaos,
    }


# ------------------------------------------------------------------------------------ CLI mode


class ResultsConsumer:
    """Consumes the results queue that ``stress.actors`` reports every processed id to."""

    def __init__(self, url: str, queue: str, tracker: Tracker, name: str) -> None:
        self.url = url
        self.queue = queue
        self.tracker = tracker
        self.name = name
        self.received = 0
        self.pids: set[int] = set()
        self.errors: list[str] = []
        self.last_message = time.monotonic()
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="results-consumer", daemon=True)

    def start(self) -> ResultsConsumer:
        self._thread.start()
        if not self._ready.wait(30):
            raise RuntimeError(f"results consumer did not start: {self.errors}")
        return self

    def _on_message(self, message: Any) -> None:
        try:
            body = json.loads(message.body)
            payload = json.loads(body["args"][0])
        except (ValueError, KeyError, IndexError, TypeError) as exc:
            self.errors.append(f"bad result message: {exc}")
            return
        self.received += 1
        self.last_message = time.monotonic()
        self.pids.add(payload.get("pid"))
        successor = payload.get("next")
        if successor is not None:
            if payload.get("err") is None:
                self.tracker.sent(successor)
            else:
                self.tracker.send_failed(successor, payload["err"])
        self.tracker.processed(payload["id"], payload.get("lat"), payload.get("at") or 0.0)

    def _run(self) -> None:
        import kombu

        try:
            with kombu.Connection(self.url, transport_options={
                    "client_properties": {"connection_name": self.name}}) as conn:
                channel = conn.channel()
                # Exactly the arguments dramatiq's brokers declare a queue with.
                channel.queue_declare(queue=self.queue, durable=True, auto_delete=False,
                                      arguments=queue_arguments(self.queue, None))
                channel.basic_qos(0, 2000, False)
                channel.basic_consume(queue=self.queue, no_ack=True, callback=self._on_message)
                self._ready.set()
                while not self._stop.is_set():
                    with contextlib.suppress(TimeoutError):
                        conn.drain_events(timeout=0.5)
        except Exception as exc:  # noqa: BLE001 - reported in the summary
            self.errors.append(f"{type(exc).__name__}: {exc}")
            self._ready.set()

    def drain(self, idle: float = 3.0, timeout: float = 120.0) -> None:
        """Wait until no result arrived for ``idle`` seconds, then stop."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and time.monotonic() - self.last_message < idle:
            time.sleep(0.2)
        self._stop.set()
        self._thread.join(10)


def run_cli(args: argparse.Namespace, vhost: str, url: str, prefix: str) -> dict[str, Any]:
    tracker = Tracker()
    results_queue = f"{args.queue}-results"
    consumer = ResultsConsumer(url, results_queue, tracker, f"{prefix}-results").start()
    total_threads = args.processes * args.threads
    chains = max(1, min(total_threads, args.messages))
    budgets = split(args.messages, chains)
    worker_prefix = f"{prefix}-w"
    started = time.time()
    deadline = started + args.duration if args.duration else None
    env = actors_environment(args.broker, url, worker_prefix, args.queue, results_queue,
                             deadline=deadline, delay_every=args.delay_every,
                             delay_ms=args.delay_ms)
    workers = CliWorkers("stress.actors", processes=args.processes, threads=args.threads,
                         queues=[args.queue], env=env, gevent=args.gevent,
                         shutdown_timeout_ms=int(args.stop_timeout * 1000),
                         log_path=RESULTS_DIR / "run-cli-workers.log.tmp")
    print(f"$ {' '.join(workers.cmd)}  (worker log: {workers.log_path})", file=sys.stderr)
    workers.start()
    poller = ServerConnectionPoller(vhost, worker_prefix, args.poll_interval).start()
    sampler = ProcessSampler(amqp_ports(url), pid=workers.pid, children=True).start()

    # Seed from this process, on a broker of the same kind with a connection of its own.
    seeder = make_broker(args.broker, url, f"{prefix}-seed")
    seed_actor = define_hop_actor(seeder, args.queue, lambda *a: None, lambda: None)
    seed_errors: list[str] = []
    seeding = threading.Thread(
        target=lambda: seed_errors.extend(seed_chains(seed_actor, tracker, chains, budgets)),
        name="seeder")
    seeding.start()
    chaos = Chaos(vhost, worker_prefix, args.chaos_interval).start()
    reason = Monitor(args, tracker, args.messages, sampler, poller, seeding, deadline).run()
    chaos.stop()
    poller.stop(final_poll=True)  # the last count, while every connection is still open
    seeding.join()
    seeder.close()
    early = workers.exit_status()
    if early is not None and reason != "interrupted":
        reason += f"; dramatiq exited early with status {early}"
    stop_started = time.monotonic()
    exit_status = workers.stop(args.stop_timeout + 30)
    if workers.killed:
        reason += "; dramatiq did not stop in time (killed)"
    stop_s = time.monotonic() - stop_started
    sampler.stop()
    consumer.drain()
    return {
        "reason": reason, "tracker": tracker, "started": started, "stop_s": stop_s,
        "sampler": sampler, "poller": poller, "seed_errors": seed_errors + consumer.errors,
        "processes": args.processes, "chains": chains, "exit_status": exit_status,
        "chaos": chaos,
        "reporting_pids": len(consumer.pids - {None}), "results_received": consumer.received,
        "worker_log": str(workers.log_path),
    }


# ------------------------------------------------------------------------------------- summary


def leftover_messages(vhost: str, queue: str) -> dict[str, int]:
    try:
        queues = rabbit_admin.list_queues(vhost)
    except rabbit_admin.RabbitmqctlError:
        return {}
    return {name: queues[name][0] for name, _ in declarations(queue, None) if name in queues}


def summarize(args: argparse.Namespace, run: dict[str, Any], vhost: str,
              logs: LogCounter) -> tuple[str, bool]:
    tracker: Tracker = run["tracker"]
    cmp = tracker.comparison()
    lat = latency_summary(list(tracker.latencies))
    sampler: ProcessSampler = run["sampler"]
    poller: ServerConnectionPoller = run["poller"]
    active = ((tracker.last_processed or run["started"]) - run["started"])
    throughput = cmp["processed"] / active if active > 0 else None
    leftover = leftover_messages(vhost, args.queue)
    limit = args.max_connections
    if limit is None and args.broker == "kombu":
        limit = 2 * run["processes"]
    peak_conns = max(poller.peak, sampler.peak_sockets)
    problems = []
    if cmp["lost"]:
        problems.append(f"{cmp['lost']} lost")
    chaos: Chaos = run["chaos"]
    if cmp["duplicated"] and not chaos.closed:
        # With connections force-closed, redelivery of unacked messages is expected.
        problems.append(f"{cmp['duplicated']} duplicated")
    if cmp["unexpected"]:
        problems.append(f"{cmp['unexpected']} unexpected ids")
    if cmp["send_failures"]:
        problems.append(f"{cmp['send_failures']} send failures")
    if run["seed_errors"]:
        problems.append(f"{len(run['seed_errors'])} seeding/results errors")
    if limit is not None and peak_conns > limit:
        problems.append(f"{peak_conns} connections held (limit {limit})")
    if poller.polls == 0:
        problems.append("server connection count never read")
    if run["reason"] == "interrupted":
        problems.append("interrupted")
    if args.cli and run.get("exit_status") != 0:
        status = run.get("exit_status")
        problems.append("dramatiq killed: it did not stop on SIGTERM" if status is None
                        else f"dramatiq exit status {status}")
    if args.gevent:
        mode = f"dramatiq-gevent CLI, {run['processes']} processes x {args.threads} greenlets"
    elif args.cli:
        mode = f"dramatiq CLI, {run['processes']} processes x {args.threads} threads"
    else:
        mode = f"in-process dramatiq.Worker, {args.threads} threads"
    names = ", ".join(f"{k} x{v}" if v > 1 else k for k, v in sorted(poller.peak_names.items()))
    rows = [
        ("broker", f"{args.broker} ({mode})"),
        ("delayed messages", f"every {args.delay_every}th successor, {args.delay_ms} ms"
         if args.delay_every else "none"),
        ("ended", run["reason"]),
        ("chains seeded", f"{run['chains']:,}"),
        ("sent", f"{cmp['sent']:,}"),
        ("processed (unique ids)", f"{cmp['processed']:,}"),
        ("processings (incl. duplicates)", f"{cmp['processings']:,}"),
        ("lost (sent, never processed)", f"{cmp['lost']:,}"
         + (f" e.g. {cmp['lost_sample'][:5]}" if cmp["lost"] else "")),
        ("duplicated", f"{cmp['duplicated']:,}"
         + (f" e.g. {cmp['duplicate_sample'][:5]}" if cmp["duplicated"] else "")),
        ("unexpected (processed, never sent)", f"{cmp['unexpected']:,}"),
        ("send failures", f"{cmp['send_failures']:,}"
         + (f" e.g. {cmp['send_errors'][:1]}" if cmp["send_failures"] else "")),
        ("left in queues after stop", ", ".join(f"{k}: {v}" for k, v in leftover.items()) or "?"),
        ("peak server-side connections (rabbitmqctl)",
         f"{poller.peak} ({poller.polls} polls{', ' + names if names else ''})"),
        ("peak TCP connections to AMQP port (psutil)", f"{sampler.peak_sockets}"),
        ("connection limit checked", "none" if limit is None else str(limit)),
        ("throughput", f"{fmt_rate(throughput)} msg/s over {active:,.1f} s"),
        ("end-to-end latency p50 / p95 / p99 / max (seeds excluded)",
         " / ".join(fmt_ms(lat[k]) for k in ("p50", "p95", "p99", "max"))),
        ("peak RSS", fmt_mib(sampler.peak_rss)),
        ("peak threads", f"{sampler.peak_threads:,}"),
        ("stop took", f"{run['stop_s']:.1f} s"),
        ("connections force-closed (--chaos-interval)",
         f"{len(chaos.closed)}" + (f" ({', '.join(sorted(set(chaos.closed)))})"
                                   if chaos.closed else "")
         + (f"; {chaos.errors} failed attempts" if chaos.errors else "")),
        ("warnings/errors logged", f"{logs.count}" + (f" first: {logs.first[0]}" if logs.first
                                                      else "")),
    ]
    if args.cli:
        bad = []
        with contextlib.suppress(OSError), open(run["worker_log"]) as log:
            bad = [line.strip() for line in log
                   if any(f"[{lvl}]" in line for lvl in ("WARNING", "ERROR", "CRITICAL"))]
        rows.append(("worker warnings/errors logged",
                     f"{len(bad)}" + (f" first: {bad[0][:200]}" if bad else "")))
        rows.append(("dramatiq exit status / processes reporting",
                     f"{run.get('exit_status')} / {run.get('reporting_pids')}"))
        rows.append(("worker log", run["worker_log"]))
    if run["seed_errors"]:
        rows.append(("seeding/results errors", "; ".join(run["seed_errors"][:3])))
    verdict = "PASS" if not problems else "FAIL: " + ", ".join(problems)
    rows.append(("verdict", verdict))
    table = markdown_table(["metric", "value"], [(k, str(v).replace("|", "/")) for k, v in rows])
    text = (f"# Stress run\n\n`python -m stress.run {' '.join(args.argv)}`\n\n{table}\n\n"
            f"- Machine: {machine_line()}.\n")
    return text, not problems


# ---------------------------------------------------------------------------------------- main


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m stress.run", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=None,
                        help="worker threads (per process with --cli, greenlets per process "
                             "with --gevent); default 900, 1000 with --gevent")
    parser.add_argument("--messages", type=int, default=100_000,
                        help="messages in total (seeds included); default 100000")
    parser.add_argument("--duration", type=float, default=None,
                        help="stop sending successors after this many seconds")
    parser.add_argument("--broker", choices=["kombu", "rabbitmq"], default="kombu",
                        help="kombu: KombuBroker (default); rabbitmq: dramatiq's RabbitmqBroker")
    parser.add_argument("--cli", action="store_true",
                        help="run the workers under the dramatiq CLI (stress.actors)")
    parser.add_argument("--gevent", action="store_true",
                        help="run the workers under dramatiq-gevent (implies --cli)")
    parser.add_argument("--processes", type=int, default=None,
                        help="--cli worker processes (default 2, 1 with --gevent)")
    parser.add_argument("--max-connections", type=int, default=None,
                        help="fail above this many connections (default: 2 per process for "
                             "kombu, unchecked for rabbitmq)")
    parser.add_argument("--queue", default="stress", help="queue name (default stress)")
    parser.add_argument("--heartbeat", type=int, default=None, help="AMQP heartbeat seconds")
    parser.add_argument("--stall-timeout", type=float, default=60,
                        help="give up after this many seconds without progress (default 60)")
    parser.add_argument("--stop-timeout", type=float, default=60,
                        help="seconds allowed for the worker to stop (default 60)")
    parser.add_argument("--poll-interval", type=float, default=3.0,
                        help="seconds between rabbitmqctl connection counts (default 3)")
    parser.add_argument("--delay-every", type=int, default=0,
                        help="send every Nth successor with a delay (through q.DQ); default off")
    parser.add_argument("--delay-ms", type=int, default=500,
                        help="the delay of those messages in ms (default 500)")
    parser.add_argument("--chaos-interval", type=float, default=0,
                        help="force-close one of the run's connections every S seconds "
                             "(duplicates are then expected and not a failure; default off)")
    parser.add_argument("--keep-vhost", action="store_true", help="do not delete the vhost")
    parser.add_argument("--log-level", default="WARNING", help="logging level (default WARNING)")
    parser.add_argument("--output", default=str(OUTPUT), help="markdown summary file")
    args = parser.parse_args(argv)
    args.argv = argv
    args.cli = args.cli or args.gevent
    if args.threads is None:
        args.threads = 1000 if args.gevent else 900
    if args.processes is None:
        args.processes = 1 if args.gevent else 2
    if args.threads < 1 or args.messages < 1 or args.processes < 1:
        parser.error("--threads, --messages and --processes must be positive")
    if args.messages // args.threads >= HOP_STRIDE:
        parser.error(f"at most {HOP_STRIDE - 1} messages per chain (thread)")
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    logging.basicConfig(level=getattr(logging, args.log_level.upper(), logging.WARNING),
                        format="%(asctime)s %(levelname)s %(threadName)s %(name)s: %(message)s")
    logs = LogCounter()
    logging.getLogger().addHandler(logs)
    problem = broker_available(args.broker)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    prefix = f"stress-run-{uuid.uuid4().hex[:8]}"
    with dedicated_vhost("run", keep=args.keep_vhost) as vhost:
        url = url_for_vhost(rabbit_admin.amqp_url(), vhost)
        unit = "greenlets" if args.gevent else "threads"
        print(f"vhost {vhost}, connection name prefix {prefix}; {args.messages:,} messages, "
              f"{args.threads} {unit}{f' x {args.processes} processes' if args.cli else ''}",
              file=sys.stderr)
        runner = run_cli if args.cli else run_in_process
        run = runner(args, vhost, url, prefix)
        text, ok = summarize(args, run, vhost, logs)
    print(text)
    write_result(Path(args.output), text)
    print(f"wrote {args.output}", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
