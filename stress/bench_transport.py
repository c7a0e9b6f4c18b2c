"""Publish throughput and latency: one shared KombuConnection versus a connection per thread.

Cases (each in a fresh subprocess, interleaved, repeated; medians reported):

- ``shared``: ONE ``kombu_pyamqp_threadsafe.KombuConnection``; each publishing thread leases its
  own channel from ``conn.default_channel_pool`` for the whole run. An idle consumer thread sits
  in ``conn.drain_events(timeout=None)`` on the same connection during the whole measurement (it
  must not slow the publishers down); at the end one message is sent to it and it must wake up.
- ``plain``: one stock ``kombu.Connection`` (pyamqp) per publishing thread.

Each for publisher confirms on and off, at 1, 10, 100 and 900 threads. A case publishes a fixed
number of messages (split evenly over its threads) to one queue with ``kombu.Producer.publish``;
the clock runs from a barrier that releases every thread at once (connections and channels are
open by then) to the last publish returning. Latency is the time one ``publish()`` call takes.
"Connections held" is the peak number of TCP connections to the AMQP port the process held
(psutil, sampled every 0.5 s).

RabbitMQ 3.x stops accepting handshakes once its socket limit is reached (832 with the default
``ulimit -n 1024``), which would stall every other client of a shared server: a ``plain`` case
that needs more connections than the server has to spare is skipped and shown as such
(``--force-over-socket-limit`` runs it anyway).

With ``--tls`` every connection is ``amqps://`` through a local TLS endpoint (``socat``, one
process per connection, in front of the server; a throw-away CA made by the openssl CLI), the
certificate and host name verified by both variants.

    python -m stress.bench_transport [--repeat 3] [--threads 1,10,100,900] [--messages N]
    python -m stress.bench_transport --tls [...]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from stress import rabbit_admin
from stress.common import (
    RESULTS_DIR,
    ProcessSampler,
    amqp_ports,
    dedicated_vhost,
    emit_result,
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

MODULE = "stress.bench_transport"
OUTPUT = RESULTS_DIR / "bench_transport.md"
OUTPUT_TLS = RESULTS_DIR / "bench_transport_tls.md"


# ------------------------------------------------------------------------------- one case (child)


def _publish_loop(producer: Any, count: int, queue: str, body: bytes, delivery_mode: int,
                  latencies: list[float]) -> None:
    perf = time.perf_counter
    publish = producer.publish
    local: list[float] = []
    for _ in range(count):
        t0 = perf()
        publish(body, exchange="", routing_key=queue, delivery_mode=delivery_mode,
                content_type="application/octet-stream", content_encoding="binary", retry=False)
        local.append(perf() - t0)
    latencies.extend(local)


def _declare(url: str, *names: str) -> None:
    import kombu

    with kombu.Connection(url) as conn:
        channel = conn.channel()
        for name in names:
            channel.queue_declare(queue=name, durable=False, auto_delete=False)
        channel.close()


def _delete(url: str, *names: str) -> None:
    import kombu

    try:
        with kombu.Connection(url) as conn:
            channel = conn.channel()
            for name in names:
                channel.queue_delete(queue=name)
            channel.close()
    except Exception as exc:  # noqa: BLE001 - the vhost is deleted at the end anyway
        print(f"warning: could not delete {names}: {exc}", file=sys.stderr)


def run_one(case: dict[str, Any]) -> dict[str, Any]:
    import kombu
    from kombu.transport import pyamqp

    from kombu_pyamqp_threadsafe import KombuConnection

    url: str = case["url"]
    admin_url: str = case.get("admin_url", url)
    tls: dict[str, Any] | None = case.get("ssl")
    variant: str = case["variant"]
    threads: int = case["threads"]
    confirm: bool = case["confirm"]
    setup_timeout: float = case["setup_timeout"]
    body = b"x" * case["body_size"]
    delivery_mode = 2 if case["persistent"] else 1
    queue = f"bt-{variant}-{uuid.uuid4().hex[:8]}"
    idle_queue = f"{queue}-idle"
    name = f"bench-transport-{variant}"
    options = {"confirm_publish": confirm, "client_properties": {"connection_name": name}}
    _declare(admin_url, queue, idle_queue)

    sampler = ProcessSampler(amqp_ports(url)).start()
    counts = split(case["messages"], threads)
    latencies: list[float] = []
    errors: list[str] = []
    barrier = threading.Barrier(threads + 1)
    result: dict[str, Any] = {"ok": True, "variant": variant, "threads": threads,
                              "confirm": confirm, "messages": case["messages"]}
    shared: KombuConnection | None = None
    idle_thread = None
    idle_state: dict[str, Any] = {"ready": threading.Event(), "got": threading.Event()}
    setup_started = time.perf_counter()

    def fail(exc: BaseException) -> None:
        errors.append(f"{type(exc).__name__}: {exc}")
        barrier.abort()

    if variant == "shared":
        shared = KombuConnection(url, transport_options=options, ssl=tls)
        shared.ensure_connection(max_retries=3)
        pool = shared.default_channel_pool

        def idle_consumer() -> None:
            try:
                channel = shared.channel()
                channel.basic_consume(queue=idle_queue, no_ack=True,
                                      callback=lambda message: idle_state["got"].set())
                idle_state["ready"].set()
                while not idle_state["got"].is_set():
                    shared.drain_events(timeout=None)
                idle_state["woke_at"] = time.perf_counter()
            except BaseException as exc:  # noqa: BLE001 - reported in the result
                idle_state["error"] = f"{type(exc).__name__}: {exc}"
                idle_state["ready"].set()

        idle_thread = threading.Thread(target=idle_consumer, name="idle-consumer", daemon=True)
        idle_thread.start()
        if not idle_state["ready"].wait(setup_timeout) or "error" in idle_state:
            raise RuntimeError(f"idle consumer did not start: {idle_state.get('error')}")

        def worker(count: int) -> None:
            try:
                with pool.acquire(timeout=setup_timeout) as channel:
                    producer = kombu.Producer(channel, auto_declare=False)
                    barrier.wait(setup_timeout)
                    _publish_loop(producer, count, queue, body, delivery_mode, latencies)
            except BaseException as exc:  # noqa: BLE001 - reported in the result
                fail(exc)
    else:
        def worker(count: int) -> None:
            conn = kombu.Connection(url, transport_options=options, ssl=tls,
                                    connect_timeout=setup_timeout)
            try:
                conn.ensure_connection(max_retries=3)
                if not isinstance(conn.transport, pyamqp.Transport) or type(
                        conn.transport).__module__ != pyamqp.__name__:
                    raise RuntimeError(f"not the stock transport: {type(conn.transport)}")
                producer = kombu.Producer(conn.channel(), auto_declare=False)
                barrier.wait(setup_timeout)
                _publish_loop(producer, count, queue, body, delivery_mode, latencies)
            except BaseException as exc:  # noqa: BLE001 - reported in the result
                fail(exc)
            finally:
                conn.release()

    workers = [threading.Thread(target=worker, args=(n,), name=f"pub-{i}", daemon=True)
               for i, n in enumerate(counts)]
    for t in workers:
        t.start()
    # Count the connections while every thread holds its own and waits at the barrier.
    deadline = time.monotonic() + setup_timeout + 30
    while barrier.n_waiting < threads and not barrier.broken and time.monotonic() < deadline:
        time.sleep(0.01)
    sampler.sample()
    with contextlib.suppress(threading.BrokenBarrierError):
        barrier.wait(max(1.0, deadline - time.monotonic()))
    started = time.perf_counter()
    cpu_started = os.times()
    result["setup_s"] = started - setup_started
    for t in workers:
        t.join()
    elapsed = time.perf_counter() - started
    cpu_ended = os.times()
    cpu_s = (cpu_ended.user - cpu_started.user) + (cpu_ended.system - cpu_started.system)

    if shared is not None and idle_thread is not None:
        # The idle consumer was blocked in drain_events(timeout=None) the whole time: it must
        # wake up for one message and must not have taken anything from the publishers.
        sent_at = time.perf_counter()
        with shared.default_channel_pool.acquire(timeout=setup_timeout) as channel:
            kombu.Producer(channel, auto_declare=False).publish(
                b"wake", exchange="", routing_key=idle_queue, retry=False)
        idle_thread.join(10)
        woke = idle_state["got"].is_set() and "woke_at" in idle_state
        result["idle_consumer_woke"] = woke
        result["idle_wake_s"] = idle_state["woke_at"] - sent_at if woke else None
        if not woke:
            errors.append(f"idle consumer did not wake: {idle_state.get('error', 'timeout')}")

    sampler.stop()
    if shared is not None:
        shared.release()
    _delete(admin_url, queue, idle_queue)

    published = len(latencies)
    result.update(latency_summary(latencies))
    result.update({
        "published": published,
        "elapsed_s": elapsed,
        "rate": published / elapsed if elapsed > 0 and not errors else None,
        "cpu_us": 1e6 * cpu_s / published if published else None,
        "connections_held": sampler.peak_sockets,
        "peak_rss": sampler.peak_rss,
        "peak_threads": sampler.peak_threads,
    })
    if errors or published != case["messages"]:
        result["ok"] = False
        first = errors[0] if errors else f"published {published} of {case['messages']}"
        result["error"] = f"{len(errors)} thread(s) failed; first: {first}"
    return result


# ------------------------------------------------------------------------------ TLS endpoint


@contextlib.contextmanager
def tls_endpoint(target: tuple[str, int]) -> Any:
    """A ``socat`` TLS endpoint on 127.0.0.1 in front of ``target`` (a process per connection)
    with a throw-away CA; yields ``(port, ca_path)``."""
    from tests.transport_helpers import make_tls_files

    if shutil.which("socat") is None:
        raise SystemExit("--tls needs socat (apt-get install socat) and the openssl CLI")
    with tempfile.TemporaryDirectory(prefix="bench-tls-") as directory:
        files = make_tls_files(Path(directory))
        with socket.socket() as probe:  # a free ephemeral port
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        proc = subprocess.Popen(
            ["socat", f"OPENSSL-LISTEN:{port},bind=127.0.0.1,reuseaddr,fork,"
             f"cert={files['cert']},key={files['key']},verify=0",
             f"TCP:{target[0]}:{target[1]}"], stdin=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL)  # else the readiness probe logs an SSL_accept error
        try:
            deadline = time.monotonic() + 10
            while True:
                with contextlib.suppress(OSError), socket.create_connection(
                        ("127.0.0.1", port), timeout=1):
                    break
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(f"socat did not start (exit status {proc.poll()})")
                time.sleep(0.05)
            yield port, files["ca"]
        finally:
            proc.terminate()
            proc.wait(10)


# ----------------------------------------------------------------------------------- the table


def _fmt_us(value: float | None) -> str:
    return "—" if value is None else f"{value:.0f} us"


def _label(variant: str, confirm: bool) -> str:
    conf = "confirms" if confirm else "no confirms"
    if variant == "shared":
        return f"shared KombuConnection + idle consumer, {conf}"
    return f"kombu.Connection per thread, {conf}"


def render(args: argparse.Namespace, results: dict[tuple[bool, int, str], list[dict]]) -> str:
    rows = []
    notes = []
    for confirm in args.confirm_modes:
        for threads in args.threads:
            for variant in args.variants:
                runs = results.get((confirm, threads, variant), [])
                ok = [r for r in runs if r.get("ok")]
                skipped = [r for r in runs if r.get("skipped")]
                held = max((r.get("connections_held", 0) for r in runs), default=0)
                if not ok:
                    why = short_error(skipped[0] if skipped else runs[0], 160) if runs else (
                        "not run")
                    rows.append([_label(variant, confirm), threads,
                                 held or "—", "FAILED" if not skipped else "skipped", "—", "—",
                                 "—", "—", why])
                    continue
                rates = [r["rate"] for r in ok]
                lo_hi = spread(rates)
                note = f"{len(ok)}/{len(runs)} ok"
                if len(ok) < len(runs):
                    note += "; " + short_error(next(r for r in runs if not r.get("ok")), 60)
                if variant == "shared":
                    woke = sum(1 for r in ok if r.get("idle_consumer_woke"))
                    wake = median_or_none([r.get("idle_wake_s") for r in ok])
                    note += f"; idle consumer woke {woke}/{len(ok)} ({fmt_ms(wake)})"
                rows.append([
                    _label(variant, confirm), threads, held,
                    fmt_rate(median_or_none(rates)),
                    f"{fmt_rate(lo_hi[0])}–{fmt_rate(lo_hi[1])}" if lo_hi else "—",
                    fmt_ms(median_or_none([r["p50"] for r in ok])),
                    fmt_ms(median_or_none([r["p99"] for r in ok])),
                    _fmt_us(median_or_none([r.get("cpu_us") for r in ok])),
                    note,
                ])
    table = markdown_table(
        ["case", "threads", "connections held", "msgs/s (median)", "msgs/s min–max",
         "p50 publish", "p99 publish", "client CPU/msg", "notes"], rows)
    body = "persistent" if args.persistent else "transient"
    notes.append(
        f"{args.messages:,} messages per case without confirms, {args.messages_confirm:,} with "
        f"confirms, split evenly over the threads; {args.body_size}-byte {body} bodies to one "
        f"classic queue; medians of {args.repeat} interleaved repeats, each case in a fresh "
        "process.")
    notes.append(
        "connections held = peak TCP connections of the process to the AMQP port (psutil, "
        "sampled every 0.5 s). Latency = duration of one `Producer.publish()` call (with "
        "confirms: until the broker's ack). The shared case keeps a consumer thread blocked in "
        "`drain_events(timeout=None)` on the same connection throughout; 'woke' = it received "
        "the one message sent to it after the publishers finished (time to wake in brackets). "
        "Client CPU/msg = user + system CPU time of the benchmark process while publishing, "
        "per message (less sensitive to other load on the machine than msgs/s).")
    if any(r.get("skipped") for runs in results.values() for r in runs):
        notes.append(
            "skipped: RabbitMQ 3.x stops accepting handshakes at its socket limit (832 with "
            "the usual `ulimit -n` 1024), stalling every client of the server; raise the limit "
            "(e.g. `ulimit -n 65536` before `rabbitmq-server` starts) and pass "
            "`--force-over-socket-limit` to run those cases.")
    if args.tls:
        notes.append(
            "Over TLS: `amqps://` through a local `socat` TLS endpoint (one process per "
            "connection) in front of the server, certificate and host name verified in both "
            "variants.")
    notes.append(f"Machine: {machine_line()}.")
    return (
        f"# Transport publish benchmark{' over TLS' if args.tls else ''}\n\n"
        f"`python -m {MODULE} {' '.join(args.argv)}`\n\n"
        + table + "\n\n" + "\n".join(f"- {n}" for n in notes) + "\n"
    )


# ---------------------------------------------------------------------------------------- main


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=f"python -m {MODULE}", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int_list, default=[1, 10, 100, 900],
                        help="comma-separated thread counts (default 1,10,100,900)")
    parser.add_argument("--repeat", type=int, default=3, help="repeats per case (default 3)")
    parser.add_argument("--messages", type=int, default=40000,
                        help="messages per case without confirms (default 40000)")
    parser.add_argument("--messages-confirm", type=int, default=10000,
                        help="messages per case with confirms (default 10000)")
    parser.add_argument("--body-size", type=int, default=128, help="body bytes (default 128)")
    parser.add_argument("--persistent", action="store_true",
                        help="delivery_mode 2 (default: transient, to measure the client)")
    parser.add_argument("--confirm", choices=["both", "on", "off"], default="both")
    parser.add_argument("--variants", default="shared,plain",
                        help="comma-separated subset of shared,plain")
    parser.add_argument("--timeout", type=float, default=180, help="seconds per case (default 180)")
    parser.add_argument("--setup-timeout", type=float, default=60,
                        help="seconds to open connections/channels in a case (default 60)")
    parser.add_argument("--force-over-socket-limit", action="store_true",
                        help="run plain cases even when they exceed the server's spare sockets")
    parser.add_argument("--tls", action="store_true",
                        help="amqps:// through a local socat TLS endpoint")
    parser.add_argument("--output", help="markdown output file (default "
                        f"{OUTPUT.name}, with --tls {OUTPUT_TLS.name}, in {RESULTS_DIR})")
    parser.add_argument("--case", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.argv = argv
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    if set(args.variants) - {"shared", "plain"}:
        parser.error("--variants takes shared and/or plain")
    args.confirm_modes = {"both": [False, True], "on": [True], "off": [False]}[args.confirm]
    if args.output is None:
        args.output = str(OUTPUT_TLS if args.tls else OUTPUT)
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.case:
        import json

        try:
            emit_result(run_one(json.loads(args.case)))
        except BaseException as exc:  # noqa: BLE001 - a failed case is data
            emit_result({"ok": False, "error": f"{type(exc).__name__}: {exc}"})
            return 1
        return 0

    results: dict[tuple[bool, int, str], list[dict]] = {}
    total = args.repeat * len(args.confirm_modes) * len(args.threads) * len(args.variants)
    done = 0
    started = time.monotonic()
    with contextlib.ExitStack() as stack:
        vhost = stack.enter_context(dedicated_vhost("transport"))
        admin_url = url = url_for_vhost(rabbit_admin.amqp_url(), vhost)
        tls = None
        if args.tls:
            parts = urlsplit(rabbit_admin.amqp_url())
            port, ca = stack.enter_context(tls_endpoint(
                (parts.hostname or "127.0.0.1", parts.port or 5672)))
            url = url_for_vhost(f"amqps://{parts.username}:{parts.password}@localhost:{port}/",
                                vhost)
            tls = {"ca_certs": ca, "cert_reqs": ssl.CERT_REQUIRED, "server_hostname": "localhost"}
        print(f"vhost {vhost}; {total} case runs", file=sys.stderr)
        for rep in range(args.repeat):
            for confirm in args.confirm_modes:
                for threads in args.threads:
                    # Alternate which variant goes first so drift hits both alike.
                    order = args.variants if (rep + threads) % 2 == 0 else args.variants[::-1]
                    for variant in order:
                        done += 1
                        case = {
                            "url": url, "admin_url": admin_url, "ssl": tls,
                            "variant": variant, "threads": threads,
                            "confirm": confirm,
                            "messages": args.messages_confirm if confirm else args.messages,
                            "body_size": args.body_size, "persistent": args.persistent,
                            "setup_timeout": args.setup_timeout,
                        }
                        result = None
                        if variant == "plain" and threads > 50 and not args.force_over_socket_limit:
                            headroom = socket_headroom()
                            if headroom is not None and threads > headroom[0]:
                                result = {"ok": False, "skipped": True,
                                          "error": f"skipped: needs {threads} connections "
                                                   f"({headroom[1]})"}
                        if result is None:
                            result = run_case(MODULE, case, args.timeout)
                        results.setdefault((confirm, threads, variant), []).append(result)
                        status = (f"{fmt_rate(result.get('rate'))} msg/s, p99 "
                                  f"{fmt_ms(result.get('p99'))}, held "
                                  f"{result.get('connections_held')}"
                                  if result.get("ok") else short_error(result, 200))
                        print(f"[{done}/{total} {time.monotonic() - started:5.0f}s] rep {rep + 1} "
                              f"{_label(variant, confirm)} x{threads}: {status}",
                              file=sys.stderr, flush=True)
    text = render(args, results)
    print(text)
    write_result(Path(args.output), text)
    print(f"wrote {args.output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
