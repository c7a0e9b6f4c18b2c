"""Publish throughput: one shared KombuConnection against a connection per thread
(``python -m stress.bench_transport``).

- ``shared``: ONE ``kombu_pyamqp_threadsafe.KombuConnection``; each publishing thread leases
  its own channel from ``conn.default_channel_pool`` for the whole run. An idle consumer thread
  sits in ``conn.drain_events(timeout=None)`` on the same connection throughout (it must not slow
  the publishers down); at the end one message is sent to it and it must wake up.
- ``plain``: one stock ``kombu.Connection`` (pyamqp) per publishing thread.

Each with publisher confirms on and off. A case publishes a fixed number of messages (split
evenly over its threads) to one queue with ``kombu.Producer.publish``; the clock runs from the
start line (connections and channels open) to the last publish returning. Latency is one
``publish()`` call. A ``plain`` case needing more connections than the server has to spare is
skipped (RabbitMQ 3.x stalls every client at its socket limit) unless it has ``"force": True``.
``"tls": True`` cases go through a local ``socat`` TLS endpoint (``amqps://``, throw-away CA,
certificate and host name verified by both variants).
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from stress import rabbit_admin
from stress.common import (
    ProcessSampler,
    amqp_ports,
    fmt_ms,
    fmt_threads,
    latency_summary,
    socket_headroom,
    split,
    url_for_vhost,
    vhost_session,
)
from stress.polling import poll
from stress.start_line import race, time_calls
from stress.workloads import sizes as workload_sizes

NAME = "bench_transport"
TITLE = "Transport publish benchmark"
COLUMNS = [("rate", "msgs/s"), ("connections_held", "connections held"),
           ("p50", "p50 publish"), ("p99", "p99 publish"), ("cpu_us", "client CPU/msg")]
HEADLINE = "rate"
HIGHER_IS_BETTER = True
SETUP_LABELS = {"shared": "shared KombuConnection + idle consumer",
                "plain": "kombu.Connection per thread"}
AGGREGATE = {"connections_held": "max"}
PLOT_X = "threads"
CONFIRM_MODES = {"both": (False, True), "on": (True,), "off": (False,)}
#: option: (quick, full) default of :func:`cases`.
DEFAULTS: dict[str, tuple[Any, Any]] = {
    "threads": ([1, 10], [1, 10, 100, 900]), "messages": (4000, 40000),
    "messages_confirm": (1000, 10000),
}


def cases(quick: bool, *, variants: tuple[str, ...] = ("shared", "plain"),
          confirm: str = "both", body_size: int = 128,
          persistent: bool = False, setup_timeout: float = 60, timeout: float = 180,
          tls: bool = False, force: bool = False, **sizes: Any) -> list[dict[str, Any]]:
    """Every case of one repeat; ``sizes`` override :data:`DEFAULTS` (None: the default)."""
    unknown = set(variants) - set(SETUP_LABELS) or {confirm} - set(CONFIRM_MODES)
    if unknown:
        raise ValueError(f"unknown variant or confirm mode: {sorted(unknown)}")
    size = workload_sizes(DEFAULTS, quick, sizes)
    return [{"setup": variant, "threads": threads, "confirm": on,
             "label": f"{'confirms' if on else 'no confirms'}, {fmt_threads(threads)}",
             "series": "confirms" if on else "no confirms",
             "messages": size["messages_confirm"] if on else size["messages"],
             "body_size": body_size, "persistent": persistent, "tls": tls, "force": force,
             "setup_timeout": setup_timeout, "timeout": timeout}
            for on in CONFIRM_MODES[confirm] for threads in size["threads"]
            for variant in variants]


@contextlib.contextmanager
def session(planned: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """One vhost for the run; with TLS cases, the TLS endpoint in front of the server."""
    with vhost_session("transport") as shared:
        admin = {"admin_url": shared["url"]}
        if not any(case.get("tls") for case in planned):
            yield {**shared, **admin, "ssl": None}
            return
        parts = urlsplit(rabbit_admin.amqp_url())
        with tls_endpoint((parts.hostname or "127.0.0.1", parts.port or 5672)) as (port, ca):
            yield {**admin,
                   "url": url_for_vhost(f"amqps://{parts.username}:{parts.password}@localhost:"
                                        f"{port}/", shared["vhost"]),
                   "ssl": {"ca_certs": ca, "cert_reqs": ssl.CERT_REQUIRED,
                           "server_hostname": "localhost"}}


def skip(case: dict[str, Any]) -> str | None:
    if case["setup"] != "plain" or case["threads"] <= 50 or case.get("force"):
        return None
    headroom = socket_headroom()
    if headroom is not None and case["threads"] > headroom[0]:
        return f"needs {case['threads']} connections ({headroom[1]})"
    return None


def notes(planned: list[dict[str, Any]]) -> list[str]:
    first = planned[0]
    plain = {c["messages"] for c in planned if not c["confirm"]}
    confirmed = {c["messages"] for c in planned if c["confirm"]}
    text = [
        f"Messages per case: {', '.join(f'{n:,}' for n in sorted(plain)) or '—'} without "
        f"confirms, {', '.join(f'{n:,}' for n in sorted(confirmed)) or '—'} with confirms, "
        f"split evenly over the threads; {first['body_size']}-byte "
        f"{'persistent' if first['persistent'] else 'transient'} bodies to one classic queue.",
        "connections held = peak TCP connections of the process to the AMQP port (psutil, "
        "sampled every 0.5 s). Latency = one `Producer.publish()` call (with confirms: until "
        "the broker's ack). The shared case keeps a consumer thread blocked in "
        "`drain_events(timeout=None)` on the same connection throughout; 'woke' = it received "
        "the one message sent to it after the publishers finished (time to wake in brackets). "
        "Client CPU/msg = user + system CPU time of the process while publishing, per message "
        "(less sensitive to other load on the machine than msgs/s).",
    ]
    if any(c.get("tls") for c in planned):
        text.append("Over TLS: `amqps://` through a local `socat` TLS endpoint (one process per "
                    "connection) in front of the server, certificate and host name verified in "
                    "both variants.")
    return text


def row_note(runs: list[dict[str, Any]]) -> str:
    ok = [r for r in runs if r.get("ok") and "idle_consumer_woke" in r]
    if not ok:
        return ""
    woke = sum(1 for r in ok if r["idle_consumer_woke"])
    wakes = sorted(r["idle_wake_s"] for r in ok if r.get("idle_wake_s") is not None)
    return (f"idle consumer woke {woke}/{len(ok)}"
            + (f" ({fmt_ms(wakes[len(wakes) // 2])})" if wakes else ""))


# ------------------------------------------------------------------------------ one case (child)


def _queues(url: str, names: tuple[str, ...], *, delete: bool = False) -> None:
    import kombu

    with kombu.Connection(url) as conn:
        channel = conn.channel()
        for name in names:
            if delete:
                channel.queue_delete(queue=name)
            else:
                channel.queue_declare(queue=name, durable=False, auto_delete=False)
        channel.close()


class IdleConsumer:
    """A consumer thread blocked in ``drain_events(timeout=None)`` on the shared connection."""

    def __init__(self, conn: Any, queue: str, timeout: float) -> None:
        self.conn, self.queue = conn, queue
        self.ready, self.got = threading.Event(), threading.Event()
        self.error: str | None = None
        self.woke_at: float | None = None
        self.thread = threading.Thread(target=self._run, name="idle-consumer", daemon=True)
        self.thread.start()
        if not self.ready.wait(timeout) or self.error:
            raise RuntimeError(f"idle consumer did not start: {self.error}")

    def _run(self) -> None:
        try:
            channel = self.conn.channel()
            channel.basic_consume(queue=self.queue, no_ack=True,
                                  callback=lambda message: self.got.set())
            self.ready.set()
            while not self.got.is_set():
                self.conn.drain_events(timeout=None)
            self.woke_at = time.perf_counter()
        except BaseException as exc:  # noqa: BLE001 - reported in the result
            self.error = f"{type(exc).__name__}: {exc}"
            self.ready.set()

    def wake(self, timeout: float) -> dict[str, Any]:
        """Send it one message; whether (and how fast) it woke up."""
        import kombu

        sent_at = time.perf_counter()
        with self.conn.default_channel_pool.acquire(timeout=timeout) as channel:
            kombu.Producer(channel, auto_declare=False).publish(
                b"wake", exchange="", routing_key=self.queue, retry=False)
        self.thread.join(10)
        woke = self.got.is_set() and self.woke_at is not None
        return {"idle_consumer_woke": woke,
                "idle_wake_s": self.woke_at - sent_at if self.woke_at is not None else None}


def _publisher(case: dict[str, Any], queue: str, shared: Any) -> Callable[..., None]:
    """The work of one publishing thread, on the shared connection or on its own."""
    import kombu
    from kombu.transport import pyamqp

    body = b"x" * case["body_size"]
    delivery_mode = 2 if case["persistent"] else 1
    setup_timeout = case["setup_timeout"]
    counts = split(case["messages"], case["threads"])
    options = {"confirm_publish": case["confirm"],
               "client_properties": {"connection_name": f"bench-transport-{case['setup']}"}}

    def publish(producer: Any, index: int, start: Callable[[], None],
                latencies: list[float]) -> None:
        start()
        time_calls(lambda _: producer.publish(
            body, exchange="", routing_key=queue, delivery_mode=delivery_mode,
            content_type="application/octet-stream", content_encoding="binary", retry=False),
            latencies, count=counts[index])

    def on_shared(index: int, start: Callable[[], None], latencies: list[float]) -> None:
        with shared.default_channel_pool.acquire(timeout=setup_timeout) as channel:
            publish(kombu.Producer(channel, auto_declare=False), index, start, latencies)

    def on_own(index: int, start: Callable[[], None], latencies: list[float]) -> None:
        conn = kombu.Connection(case["url"], transport_options=options, ssl=case["ssl"],
                                connect_timeout=setup_timeout)
        try:
            conn.ensure_connection(max_retries=3)
            if not isinstance(conn.transport, pyamqp.Transport) or type(
                    conn.transport).__module__ != pyamqp.__name__:
                raise RuntimeError(f"not the stock transport: {type(conn.transport)}")
            publish(kombu.Producer(conn.channel(), auto_declare=False), index, start, latencies)
        finally:
            conn.release()

    return on_shared if shared is not None else on_own


def run_case(case: dict[str, Any]) -> dict[str, Any]:
    from kombu_pyamqp_threadsafe import KombuConnection

    queue = f"bt-{case['setup']}-{uuid.uuid4().hex[:8]}"
    names = (queue, f"{queue}-idle")
    _queues(case["admin_url"], names)
    sampler = ProcessSampler(amqp_ports(case["url"])).start()
    shared = idle = None
    if case["setup"] == "shared":
        shared = KombuConnection(case["url"], ssl=case["ssl"], transport_options={
            "confirm_publish": case["confirm"],
            "client_properties": {"connection_name": "bench-transport-shared"}})
        shared.ensure_connection(max_retries=3)
        idle = IdleConsumer(shared, names[1], case["setup_timeout"])
    # Count the connections while every thread holds its own and waits at the start line.
    run = race(_publisher(case, queue, shared), case["threads"],
               setup_timeout=case["setup_timeout"], run_timeout=case["timeout"],
               at_start=sampler.sample)
    result: dict[str, Any] = {}
    if idle is not None:
        # It was blocked in drain_events(timeout=None) the whole time: it must wake up for one
        # message and must not have taken anything from the publishers.
        result.update(idle.wake(case["setup_timeout"]))
        if not result["idle_consumer_woke"]:
            run.errors.append(f"idle consumer did not wake: {idle.error or 'timeout'}")
    sampler.stop()
    if shared is not None:
        shared.release()
    try:
        _queues(case["admin_url"], names, delete=True)
    except Exception as exc:  # noqa: BLE001 - the vhost is deleted at the end anyway
        print(f"warning: could not delete {names}: {exc}", file=sys.stderr)
    published = len(run.latencies)
    result.update(latency_summary(run.latencies))
    result.update(ok=not run.errors and published == case["messages"], published=published,
                  setup_s=run.setup_s, elapsed_s=run.elapsed,
                  rate=published / run.elapsed if run.elapsed > 0 and not run.errors else None,
                  cpu_us=1e6 * run.cpu_s / published if published else None,
                  connections_held=sampler.peak_sockets, peak_rss=sampler.peak_rss,
                  peak_threads=sampler.peak_threads)
    if not result["ok"]:
        first = run.errors[0] if run.errors else f"published {published} of {case['messages']}"
        result["error"] = f"{len(run.errors)} thread(s) failed; first: {first}"
    return result


# ------------------------------------------------------------------------------ TLS endpoint


@contextlib.contextmanager
def tls_endpoint(target: tuple[str, int]) -> Iterator[tuple[int, str]]:
    """A ``socat`` TLS endpoint on 127.0.0.1 in front of ``target`` (a process per connection)
    with a throw-away CA; yields ``(port, ca_path)``."""
    from tests.transport_helpers import make_tls_files

    if shutil.which("socat") is None:
        raise SystemExit("TLS cases need socat (apt-get install socat) and the openssl CLI")
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
            def reachable() -> bool:
                with contextlib.suppress(OSError), socket.create_connection(
                        ("127.0.0.1", port), timeout=1):
                    return True
                return False

            if not poll(lambda: reachable() or proc.poll() is not None, bool, 10) or (
                    proc.poll() is not None):
                raise SystemExit(f"socat did not start (exit status {proc.poll()})")
            yield port, str(files["ca"])
        finally:
            proc.terminate()
            proc.wait(10)
