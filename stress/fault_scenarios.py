"""Fault scenarios for KombuBroker under load, against the real RabbitMQ (no mocks).

Run by ``python -m stress.faults`` (the full scale, and the table in the README) and by
``tests/test_reliability_*.py`` (small scale). Each scenario runs a real ``dramatiq.Worker`` (or the
real ``dramatiq`` CLI) on a KombuBroker, streams messages that each carry a unique integer id,
injects one kind of fault, and returns a :class:`FaultResult`:

* ``sent``: ids whose send returned (a send that raised is retried by the sender, as an
  application would, and counted in ``send_retries``);
* ``processed``: distinct ids the actor completed; ``lost`` = sent ids never processed;
* ``duplicates``: completions beyond the first of an id (at-least-once delivery);
* ``recovery``: per fault, seconds from the moment the fault ended (the server reachable
  again) until the broker works again end to end: the larger of (a) the first send started
  after that moment has returned, and (b) the worker completed a message delivered on a
  channel opened after the fault began (a new consumer, not a message it had buffered).

The run ends only when every sent id was processed and the server holds no message of the
queues any more (ready or unacknowledged), so no redelivery, and no duplicate, can follow.

Faults: the server closes every connection; the server restarts (stop_app/start_app, guarded
by the callers); the network goes silent (a proxy stops forwarding) and comes back; the
network resets connections while many threads publish; the server closes one consumer's
channel; the worker (the ``dramatiq`` CLI) gets SIGTERM and is started again.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import os
import secrets
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

import dramatiq
from dramatiq import Message
from dramatiq.middleware import Middleware

from dramatiq_kombu_broker import KombuBroker
from stress import rabbit_admin
from stress.bounded import run_bounded
from stress.polling import poll
from stress.resources import open_fds
from stress.tcp_proxy import Proxy

REPO_ROOT = Path(__file__).resolve().parent.parent
DRAMATIQ_CLI = Path(sys.executable).with_name("dramatiq")

#: Ids of the probe messages sent right after a fault ends (regular ids count from 0).
PROBE_BASE = 10_000_000
ACTOR_PREFIX = "fault_work"

now = time.monotonic


# ------------------------------------------------------------------------------ configuration


@dataclass(frozen=True)
class Scale:
    """How big a scenario is. The pytest suite uses a small one, the script the full one."""

    messages: int = 3000
    threads: int = 64
    #: Threads that stream the messages (paced at ``send_rate`` in total).
    senders: int = 8
    send_rate: float = 300.0
    #: Threads that publish as fast as they can in the network-reset case.
    burst_senders: int = 64
    #: Time each message takes in the actor (so the worker holds many messages at a time).
    work_ms: float = 40.0
    #: Upper bound of one case (a hang fails the case instead of blocking forever).
    timeout: float = 240.0
    #: ``dramatiq`` CLI worker processes in the SIGTERM case.
    cli_processes: int = 2


PYTEST_SCALE = Scale(messages=1200, threads=32, senders=4, send_rate=200.0, burst_senders=32,
                     work_ms=40.0, timeout=150.0, cli_processes=1)
SCRIPT_SCALE = Scale()


@dataclass
class Context:
    """Where a scenario runs: ``url`` has the credentials and the vhost."""

    url: str
    vhost: str
    scale: Scale = PYTEST_SCALE
    #: A password that must never appear in any log line, error or repr (None: not checked).
    secret: str | None = None
    #: Where the CLI case writes its logs and records.
    work_dir: Path = field(default_factory=lambda: Path(tempfile.gettempdir()))

    def url_via(self, port: int, host: str = "127.0.0.1") -> str:
        """``url`` pointed at ``host:port`` (a proxy), same credentials and vhost."""
        parts = urlsplit(self.url)
        credentials = parts.netloc.rpartition("@")[0]
        netloc = f"{credentials}@{host}:{port}" if credentials else f"{host}:{port}"
        return urlunsplit(parts._replace(netloc=netloc))


def url_with(base: str, vhost: str, user: str | None = None, password: str | None = None) -> str:
    """``base`` with its path replaced by ``vhost`` and, if given, other credentials."""
    parts = urlsplit(base)
    netloc = parts.netloc.rpartition("@")[2]
    if user is not None:
        netloc = f"{quote(user, safe='')}:{quote(password or '', safe='')}@{netloc}"
    else:
        netloc = parts.netloc
    return urlunsplit(parts._replace(netloc=netloc, path="/" + quote(vhost, safe="")))


@contextlib.contextmanager
def scratch_vhost(prefix: str = "faults") -> Iterator[str]:
    """A fresh vhost ``<prefix>-<hex>`` (guest has full rights), deleted at exit."""
    name = f"{prefix}-{uuid.uuid4().hex[:8]}"
    rabbit_admin.add_vhost(name, user="guest")
    try:
        yield name
    finally:
        with contextlib.suppress(rabbit_admin.RabbitmqctlError):
            rabbit_admin.delete_vhost(name)


@contextlib.contextmanager
def secret_user(vhost: str) -> Iterator[tuple[str, str]]:
    """A user with a random, distinctive password and full rights on ``vhost``.

    The password contains characters that need URL quoting, so both its raw and quoted forms
    can be looked for in logs. Deleted at exit.
    """
    user = f"faults-{uuid.uuid4().hex[:8]}"
    password = f"S3cr3t#{secrets.token_hex(8)}@x"
    rabbit_admin.rabbitmqctl("add_user", user, password)
    try:
        rabbit_admin.set_permissions(vhost, user)
        yield user, password
    finally:
        with contextlib.suppress(rabbit_admin.RabbitmqctlError):
            rabbit_admin.rabbitmqctl("delete_user", user)


def secret_forms(password: str) -> list[str]:
    """The forms in which a password could leak: raw and URL-quoted."""
    return sorted({password, quote(password, safe=""), quote(password)})


# -------------------------------------------------------------------------------------- logs


#: ERROR/CRITICAL lines a fault is expected to cause (the consumer restarts after a connection
#: error). Any other ERROR/CRITICAL line during a scenario is reported as unexpected.
EXPECTED_ERRORS = ("Consumer encountered a connection error",)


class LogWatch(logging.Handler):
    """Every log record of the process, while installed: warnings are kept with their time,
    ERROR/CRITICAL lines other than EXPECTED_ERRORS are kept as ``unexpected``, and any line
    (message, arguments, traceback) containing one of ``secrets`` is kept as a leak."""

    LOGGERS = ("dramatiq", "dramatiq_kombu_broker", "kombu_pyamqp_threadsafe", "kombu", "amqp")

    def __init__(self, secrets: list[str] | None = None, debug: bool = False) -> None:
        super().__init__(logging.DEBUG)
        self.setFormatter(logging.Formatter("%(levelname)s %(name)s %(threadName)s %(message)s"))
        self.secrets = list(secrets or [])
        self.debug = debug
        self._lock_ = threading.Lock()
        self.records = 0
        self.warnings: list[tuple[float, str, str]] = []
        self.unexpected: list[str] = []
        self.leaks: list[str] = []
        self._levels: dict[str, int] = {}

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = self.format(record)
        except Exception as exc:  # noqa: BLE001 - a broken log call is itself a finding
            text = f"<unformattable record {record.msg!r}: {exc!r}>"
        with self._lock_:
            self.records += 1
            if self.secrets and any(s in text for s in self.secrets):
                self.leaks.append(text[:1000])
            if record.levelno >= logging.WARNING:
                self.warnings.append((now(), record.name, record.getMessage()))
            if record.levelno >= logging.ERROR and not any(
                    e in record.getMessage() for e in EXPECTED_ERRORS):
                self.unexpected.append(text[:3000])

    def install(self) -> LogWatch:
        root = logging.getLogger()
        root.addHandler(self)
        level = logging.DEBUG if self.debug else logging.INFO
        for name in ("", *self.LOGGERS):
            log = logging.getLogger(name)
            self._levels[name] = log.level
            if log.getEffectiveLevel() > level:
                log.setLevel(level)
        return self

    def remove(self) -> None:
        logging.getLogger().removeHandler(self)
        for name, level in self._levels.items():
            logging.getLogger(name).setLevel(level)
        self._levels.clear()

    def count(self, fragment: str, since: float = 0.0) -> int:
        with self._lock_:
            return sum(1 for t, _, text in self.warnings if t >= since and fragment in text)

    def first(self, fragment: str, since: float = 0.0) -> float | None:
        with self._lock_:
            return next((t for t, _, text in self.warnings if t >= since and fragment in text),
                        None)

    def lines(self, fragment: str, since: float = 0.0) -> list[str]:
        """WARNING and higher messages since ``since`` that contain ``fragment``."""
        with self._lock_:
            return [text for t, _, text in self.warnings if t >= since and fragment in text]

    def wait_for(self, fragment: str, since: float, timeout: float) -> list[str]:
        deadline = now() + timeout
        while True:
            found = self.lines(fragment, since)
            if found or now() >= deadline:
                return found
            time.sleep(0.05)


# ------------------------------------------------------------------------------------ ledger


class Ledger:
    """Sent and processed ids, and when and on which channel each processing happened."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self.sent: set[int] = set()
        self.counts: Counter[int] = Counter()
        #: (time, id, queue, channel key) of every completed processing.
        self.log: list[tuple[float, int, str, Any]] = []
        self.send_retries = 0
        self.send_errors: list[str] = []
        # Channel objects are kept alive so their id() stays unique for the whole run.
        self._channels: dict[int, Any] = {}

    def record_sent(self, mid: int) -> None:
        with self._cond:
            self.sent.add(mid)
            self._cond.notify_all()

    def record_send_failure(self, mid: int, exc: BaseException) -> None:
        with self._cond:
            self.send_retries += 1
            if len(self.send_errors) < 20:
                self.send_errors.append(f"{mid}: {type(exc).__name__}: {exc}")

    def record_processed(self, mid: int, queue: str, channel: Any,
                         at: float | None = None) -> None:
        key: Any = channel
        if channel is not None and not isinstance(channel, (int, str)):
            key = id(channel)
            self._channels.setdefault(key, channel)
        with self._cond:
            self.counts[mid] += 1
            self.log.append((now() if at is None else at, mid, queue, key))
            self._cond.notify_all()

    @property
    def processed(self) -> int:
        with self._cond:
            return len(self.counts)

    def processed_of(self, ids: set[int]) -> int:
        with self._cond:
            return sum(1 for mid in ids if mid in self.counts)

    def wait_for(self, predicate: Callable[[], bool], timeout: float) -> bool:
        with self._cond:
            return self._cond.wait_for(predicate, timeout)

    def wait_processed(self, count: int, timeout: float) -> bool:
        return self.wait_for(lambda: len(self.counts) >= count, timeout)

    def wait_all_sent_processed(self, timeout: float) -> bool:
        return self.wait_for(lambda: all(mid in self.counts for mid in self.sent), timeout)

    def channels_before(self, moment: float, queue: str | None = None) -> set[Any]:
        with self._cond:
            return {key for t, _, q, key in self.log
                    if t < moment and (queue is None or q == queue)}

    def keys_of(self, channels: list[Any]) -> set[Any]:
        """Keys of ``channels`` (kept alive, like those of processed messages)."""
        keys = set()
        for channel in channels:
            key = id(channel)
            self._channels.setdefault(key, channel)
            keys.add(key)
        return keys

    def first_processing(self, after: float, old: set[Any], queue: str | None = None,
                         timeout: float = 0.0) -> float | None:
        """When a message delivered on a channel not in ``old`` was first completed after
        ``after`` (waiting up to ``timeout`` for it); None if it did not happen."""
        found: list[float] = []

        def check() -> bool:
            for t, _, q, key in self.log:
                if t >= after and key not in old and (queue is None or q == queue):
                    found.append(t)
                    return True
            return False

        self.wait_for(check, timeout)
        return found[0] if found else None

    def summary(self) -> tuple[int, int, int, int]:
        """(sent, processed, lost, duplicates)."""
        with self._cond:
            sent = len(self.sent)
            processed = len(self.counts)
            lost = sum(1 for mid in self.sent if mid not in self.counts)
            duplicates = sum(self.counts.values()) - processed
            return sent, processed, lost, duplicates

    def lost_ids(self) -> list[int]:
        with self._cond:
            return sorted(mid for mid in self.sent if mid not in self.counts)


def delivery_channel(message: Any) -> Any:
    """The channel a KombuBroker message was delivered on (a private attribute of
    ``dramatiq_kombu_broker.consumer.KombuMessage``; None for other brokers)."""
    return getattr(message, "_channel", None)


class Track(Middleware):
    """Records every completed processing of the scenario's actors in the ledger."""

    def __init__(self, ledger: Ledger) -> None:
        self.ledger = ledger

    def after_process_message(self, broker: Any, message: Any, *, result: Any = None,
                              exception: BaseException | None = None) -> None:
        if exception is None and message.actor_name.startswith(ACTOR_PREFIX):
            self.ledger.record_processed(message.args[0], message.queue_name,
                                         delivery_channel(message))


def work_message(queue: str, mid: int, actor_name: str) -> Message:
    return Message(queue_name=queue, actor_name=actor_name, args=(mid,), kwargs={}, options={})


# ----------------------------------------------------------------------------------- senders


class Senders:
    """Threads that send ids (paced at ``rate`` per second in total, None: flat out).

    A send that raises is retried after a short pause until ``deadline`` (monotonic), as an
    application would: the id only counts as sent once a send returned.
    """

    def __init__(self, send: Callable[[int], None], ids: list[int], threads: int,
                 rate: float | None, ledger: Ledger, deadline: float,
                 name: str = "fault-sender") -> None:
        self._send = send
        self._ids = ids
        self._next = 0
        self._lock = threading.Lock()
        self._rate = rate
        self._ledger = ledger
        self._deadline = deadline
        self._started = 0.0
        self.paused = threading.Event()
        self.stopped = threading.Event()
        self.unsent: list[int] = []
        self.threads = [threading.Thread(target=self._run, name=f"{name}-{i}", daemon=True)
                        for i in range(threads)]

    def start(self) -> Senders:
        self._started = now()
        for thread in self.threads:
            thread.start()
        return self

    @property
    def issued(self) -> int:
        with self._lock:
            return self._next

    def _take(self) -> tuple[int, int] | None:
        with self._lock:
            if self._next >= len(self._ids) or self.stopped.is_set():
                return None
            index = self._next
            self._next += 1
            return index, self._ids[index]

    def _run(self) -> None:
        while True:
            while self.paused.is_set() and not self.stopped.is_set():
                time.sleep(0.05)
            taken = self._take()
            if taken is None:
                return
            index, mid = taken
            if self._rate:
                delay = self._started + index / self._rate - now()
                if delay > 0:
                    time.sleep(delay)
            while True:
                try:
                    self._send(mid)
                except Exception as exc:  # noqa: BLE001 - retried; counted
                    self._ledger.record_send_failure(mid, exc)
                    if now() >= self._deadline or self.stopped.is_set():
                        with self._lock:
                            self.unsent.append(mid)
                        break
                    time.sleep(0.2)
                    continue
                self._ledger.record_sent(mid)
                break

    def join(self, timeout: float) -> bool:
        deadline = now() + timeout
        for thread in self.threads:
            thread.join(max(0.0, deadline - now()))
        return not any(thread.is_alive() for thread in self.threads)

    def stop(self) -> None:
        self.stopped.set()


# ------------------------------------------------------------------------------------- proxy


class FaultProxy(Proxy):
    """transport_helpers.Proxy plus the two network faults of the reliability cases.

    ``silence()`` stops forwarding without closing anything (a dead network path);
    ``restore()`` brings the path back: connections that were silenced are gone by then on both
    peers (they missed their heartbeats), so they are cut, and new connections flow again.
    ``reset()`` aborts every connection with a TCP RST on both sides, as a dropped NAT entry or
    a failing router does.
    """

    def silence(self) -> None:
        self.pause()

    def restore(self) -> None:
        with self._lock:
            stale = list(self._pipes)
        self.paused.clear()
        for pipe in stale:
            pipe.close()

    def reset(self) -> None:
        with self._lock:
            pipes = list(self._pipes)
        linger = struct.pack("ii", 1, 0)
        for pipe in pipes:
            for sock in (pipe.client, pipe.upstream):
                if sock is not None:
                    with contextlib.suppress(OSError):
                        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
            pipe.closed.set()  # the pipe thread closes both sockets: RST, no FIN
            pipe.wake()
        for pipe in pipes:
            pipe.thread.join(1.0)
            if pipe.thread.is_alive():
                pipe.close()


def make_server_cert(tls_files: dict[str, str], directory: Path, names: list[str],
                     stem: str = "other") -> dict[str, str]:
    """A server certificate for the DNS ``names`` only (no IP address) signed by the CA of
    ``transport_helpers.make_tls_files(...)``; files ``<stem>.pem`` and ``<stem>.key``."""
    directory = Path(directory)
    ca_key = Path(tls_files["ca"]).with_name("ca.key")
    key, csr, pem = (directory / f"{stem}.key", directory / f"{stem}.csr",
                     directory / f"{stem}.pem")
    ext = directory / f"{stem}.ext"
    ext.write_text("basicConstraints=critical,CA:FALSE\n"
                   "keyUsage=critical,digitalSignature,keyEncipherment\n"
                   "extendedKeyUsage=serverAuth\n"
                   f"subjectAltName={','.join(f'DNS:{n}' for n in names)}\n")

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)

    openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(csr),
            "-subj", f"/CN={names[0]}")
    openssl("x509", "-req", "-in", str(csr), "-CA", tls_files["ca"], "-CAkey", str(ca_key),
            "-CAcreateserial", "-out", str(pem), "-days", "2", "-sha256", "-extfile", str(ext))
    return {"ca": tls_files["ca"], "cert": str(pem), "key": str(key)}


# ------------------------------------------------------------------------------------ results


@dataclass
class Window:
    """One fault: when it began and ended, and how long recovery took."""

    start: float
    end: float
    producer: float | None = None
    consumer: float | None = None
    detection: float | None = None
    #: Keys of the channels the consumers used when the fault began.
    old: set[Any] = field(default_factory=set)

    @property
    def recovery(self) -> float | None:
        if self.producer is None or self.consumer is None:
            return None
        return max(self.producer, self.consumer)


@dataclass
class FaultResult:
    fault: str
    sent: int = 0
    processed: int = 0
    lost: int = 0
    duplicates: int = 0
    windows: list[Window] = field(default_factory=list)
    send_retries: int = 0
    dead_lettered: int = 0
    #: Problems that fail the case besides lost messages (unrecovered fault, leak, hang...).
    problems: list[str] = field(default_factory=list)
    #: Facts worth reporting (detection times, connection counts...).
    notes: list[str] = field(default_factory=list)
    lost_ids: list[int] = field(default_factory=list)
    unexpected_logs: list[str] = field(default_factory=list)
    leaks: list[str] = field(default_factory=list)
    duration: float = 0.0

    @property
    def recovery(self) -> float | None:
        """The slowest recovery of the case (None if a fault never recovered)."""
        values = [w.recovery for w in self.windows]
        if not values or any(v is None for v in values):
            return None
        return max(v for v in values if v is not None)

    @property
    def ok(self) -> bool:
        return (self.lost == 0 and not self.problems and not self.leaks
                and not self.unexpected_logs and self.recovery is not None)

    def explain(self) -> str:
        lines = [f"{self.fault}: sent={self.sent} processed={self.processed} lost={self.lost} "
                 f"duplicates={self.duplicates} recovery={fmt_seconds(self.recovery)} "
                 f"windows={[(w.producer, w.consumer, w.detection) for w in self.windows]}"]
        lines += [f"problem: {p}" for p in self.problems]
        lines += [f"note: {n}" for n in self.notes]
        if self.lost_ids:
            lines.append(f"lost ids (first 20): {self.lost_ids[:20]}")
        lines += [f"unexpected log: {u}" for u in self.unexpected_logs[:5]]
        lines += [f"secret leaked: {leak}" for leak in self.leaks[:5]]
        return "\n".join(lines)


def fmt_seconds(value: float | None) -> str:
    return "not recovered" if value is None else f"{value:.1f}"


def markdown_table(results: list[FaultResult]) -> str:
    rows = [["fault", "sent", "processed", "lost", "duplicates", "recovery time (s)"],
            ["---", "---:", "---:", "---:", "---:", "---:"]]
    for r in results:
        windows = [w.recovery for w in r.windows]
        recovery = fmt_seconds(r.recovery)
        if len(windows) > 1 and r.recovery is not None:
            recovery = f"{recovery} (max of {len(windows)})"
        rows.append([r.fault, str(r.sent), str(r.processed), str(r.lost), str(r.duplicates),
                     recovery])
    return "\n".join("| " + " | ".join(row) + " |" for row in rows)


def details_table(results: list[FaultResult]) -> str:
    rows = [["fault", "send retries", "dead-lettered", "duration (s)", "notes"],
            ["---", "---:", "---:", "---:", "---"]]
    for r in results:
        rows.append([r.fault, str(r.send_retries), str(r.dead_lettered),
                     f"{r.duration:.0f}", "; ".join(r.notes + r.problems)])
    return "\n".join("| " + " | ".join(row) + " |" for row in rows)


# ------------------------------------------------------------------------------------ server


def queue_messages(vhost: str, names: list[str]) -> dict[str, int]:
    """Messages (ready + unacknowledged) of ``names`` on the server (missing queues: 0)."""
    rows = rabbit_admin.queue_details(vhost)
    return {name: int((rows.get(name) or {}).get("messages") or 0) for name in names}


def wait_queues_empty(vhost: str, names: list[str], timeout: float,
                      only: list[str] | None = None) -> dict[str, int]:
    """Poll until the queues ``only`` (default: all ``names``) hold no message; return the
    last counts of ``names``."""
    return poll(lambda: queue_messages(vhost, names),
                lambda counts: not any(counts[n] for n in (only or names)), timeout, 0.5)


def connections_by_name(vhost: str) -> dict[str, list[dict[str, Any]]]:
    """The server's connections of ``vhost`` by client connection_name, in one rabbitmqctl
    call (rows have ``peer_port``, ``pid``, ``timeout`` (heartbeat) and ``channels``)."""
    out = rabbit_admin.rabbitmqctl("list_connections", "client_properties", "vhost",
                                   "peer_port", "pid", "timeout", "channels",
                                   "--formatter", "json")
    result: dict[str, list[dict[str, Any]]] = {}
    for row in json.loads(out.strip() or "[]"):
        if row.get("vhost") != vhost:
            continue
        name = rabbit_admin.table_to_dict(row.get("client_properties")).get("connection_name")
        result.setdefault(str(name), []).append(row)
    return result


def wait_one_connection_each(vhost: str, names: list[str],
                             timeout: float = 15) -> dict[str, list[dict[str, Any]]]:
    """Poll until each of ``names`` has exactly one server connection; the last listing."""
    return poll(lambda: connections_by_name(vhost),
                lambda listing: all(len(listing.get(n, [])) == 1 for n in names), timeout, 0.3)


def connection_ports(name: str, vhost: str) -> list[int]:
    """Client ports of the server-side connections called ``name`` (a reconnect changes it)."""
    return sorted(int(c["peer_port"]) for c in rabbit_admin.find_connections(name, vhost=vhost))


def rabbitmq_running() -> bool:
    try:
        rabbit_admin.rabbitmqctl("await_startup", "--timeout", "5", timeout=30)
    except rabbit_admin.RabbitmqctlError:
        return False
    return True


@contextlib.contextmanager
def server_stopped() -> Iterator[None]:
    """``rabbitmqctl stop_app`` for the body; always ``start_app`` and ``await_startup`` after,
    so the server is left running as it was found (it must be running to begin with)."""
    if not rabbitmq_running():
        raise RuntimeError("RabbitMQ is not running: refusing to restart it")
    try:
        rabbit_admin.rabbitmqctl("stop_app", timeout=120)
        yield
    finally:
        rabbit_admin.rabbitmqctl("start_app", timeout=180)
        rabbit_admin.rabbitmqctl("await_startup", timeout=180)


# ---------------------------------------------------------------------------- the harness


class LoadedWorker:
    """A KombuBroker with a dramatiq Worker consuming ``queues`` queues, a ledger of every
    processing, and the means to stream ids, inject a fault and measure recovery."""

    def __init__(self, ctx: Context, *, url: str | None = None, queues: int = 1,
                 threads: int | None = None, heartbeat: float | None = None,
                 connect_timeout: float = 5, name: str | None = None,
                 watch: LogWatch | None = None) -> None:
        self.ctx = ctx
        self.scale = ctx.scale
        self.name = name or f"faults-{uuid.uuid4().hex[:6]}"
        tag = uuid.uuid4().hex[:6]
        self.queues = [f"fq-{tag}-{i}" for i in range(queues)]
        self.ledger = Ledger()
        self.watch = watch
        options: dict[str, Any] = {"connection_name": self.name,
                                   "connect_timeout": connect_timeout}
        if heartbeat is not None:
            options["heartbeat"] = heartbeat
        self.broker = KombuBroker(url=url or ctx.url, **options)
        self.broker.add_middleware(Track(self.ledger))
        work_s = self.scale.work_ms / 1000

        def work(mid: int) -> None:
            time.sleep(work_s)

        for index, queue in enumerate(self.queues):
            dramatiq.actor(work, broker=self.broker, actor_name=f"{ACTOR_PREFIX}_{index}",
                           queue_name=queue, max_retries=0)
        self.worker = dramatiq.Worker(self.broker, worker_threads=threads or self.scale.threads,
                                      worker_timeout=100)
        self.started = 0.0
        self._probes = 0
        self.senders: list[Senders] = []
        self.windows: list[Window] = []

    @property
    def consumer_name(self) -> str:
        return f"{self.name}-consumer"

    @property
    def producer_name(self) -> str:
        return f"{self.name}-producer"

    def send(self, mid: int) -> None:
        index = mid % len(self.queues)
        self.broker.enqueue(work_message(self.queues[index], mid, f"{ACTOR_PREFIX}_{index}"))

    def start(self) -> LoadedWorker:
        for queue in self.queues:  # declared up front so counts and joins see them
            self.broker.declare_queue(queue, ensure=True)
        self.started = now()
        self.worker.start()
        return self

    def stream(self, ids: list[int], *, threads: int | None = None,
               rate: float | None = -1.0) -> Senders:
        """Start sending ``ids`` (rate -1: the scale's rate; None: flat out)."""
        senders = Senders(self.send, ids, threads or self.scale.senders,
                          self.scale.send_rate if rate == -1.0 else rate, self.ledger,
                          deadline=now() + self.scale.timeout)
        self.senders.append(senders)
        return senders.start()

    def wait_processed(self, count: int, timeout: float | None = None) -> None:
        if not self.ledger.wait_processed(count, timeout or self.scale.timeout):
            raise TimeoutError(f"only {self.ledger.processed} of {count} messages processed")

    def probe(self, queue_index: int = 0, timeout: float | None = None) -> float:
        """Send one message (retrying until it is accepted); return when it was accepted."""
        self._probes += 1
        mid = (PROBE_BASE + self._probes) * len(self.queues) + queue_index  # on that queue
        deadline = now() + (timeout or self.scale.timeout)
        while True:
            try:
                self.send(mid)
            except Exception as exc:  # noqa: BLE001 - retried until the deadline
                self.ledger.record_send_failure(mid, exc)
                if now() >= deadline:
                    raise
                time.sleep(0.05)
                continue
            self.ledger.record_sent(mid)
            return now()

    def consumer_channels(self) -> list[Any]:
        """The channels the worker's consumers use right now (dramatiq's consumer threads)."""
        threads = list(self.worker.consumers.values())
        consumers = [getattr(thread, "consumer", None) for thread in threads]
        return [c.channel for c in consumers if getattr(c, "channel", None) is not None]

    def begin(self) -> Window:
        """A fault starts now: remember which channels are the old ones."""
        window = Window(now(), 0.0)
        window.old = self.ledger.keys_of(self.consumer_channels())
        return window

    def recover(self, window: Window, queue_index: int | None = None,
                timeout: float | None = None) -> Window:
        """Measure recovery from ``window`` (begun with :meth:`begin`; ``end`` is the moment
        the fault ended, now if not set)."""
        if not window.end:
            window.end = now()
        timeout = timeout or self.scale.timeout / 2
        queue = None if queue_index is None else self.queues[queue_index]
        old = self.ledger.channels_before(window.start, queue) | window.old
        accepted = self.probe(queue_index or 0, timeout)
        window.producer = accepted - window.end
        first = self.ledger.first_processing(window.end, old, queue, timeout)
        window.consumer = None if first is None else max(0.0, first - window.end)
        self.windows.append(window)
        return window

    def finish(self, fault: str, *, extra_queues: tuple[str, ...] = ()) -> FaultResult:
        """Wait until everything sent was processed and the queues are empty on the server,
        then stop the worker, close the broker and return the result."""
        scale = self.scale
        result = FaultResult(fault)
        deadline = now() + scale.timeout
        try:
            for senders in self.senders:
                if not senders.join(max(1.0, deadline - now())):
                    result.problems.append("senders did not finish")
                    senders.stop()
                if senders.unsent:
                    result.problems.append(f"{len(senders.unsent)} ids could not be sent")
            if not self.ledger.wait_all_sent_processed(max(1.0, deadline - now())):
                result.problems.append("not every sent message was processed in time")
            names = [q for queue in self.queues for q in (queue, f"{queue}.DQ")]
            dead_names = [f"{q}.XQ" for q in self.queues]
            left = wait_queues_empty(self.ctx.vhost, names + dead_names,
                                     max(5.0, deadline - now()), only=names)
            if any(left[n] for n in names):
                result.problems.append(f"messages still on the server: {left}")
            result.dead_lettered = sum(left[n] for n in dead_names)
            names = [self.consumer_name, self.producer_name]
            listing = wait_one_connection_each(self.ctx.vhost, names)
            for name in names:
                count = len(listing.get(name, []))
                if count != 1:
                    result.problems.append(f"{count} server connections named {name} "
                                           "(expected exactly 1)")
        finally:
            self.close(result)
        sent, processed, lost, duplicates = self.ledger.summary()
        result.sent, result.processed, result.lost = sent, processed, lost
        result.duplicates = duplicates
        result.lost_ids = self.ledger.lost_ids()
        result.windows = list(self.windows)
        result.send_retries = self.ledger.send_retries
        result.duration = now() - self.started
        for window in self.windows:
            if window.consumer is None:
                result.problems.append("the worker did not consume again after a fault")
        if self.watch is not None:
            result.unexpected_logs = list(self.watch.unexpected)
            result.leaks = list(self.watch.leaks)
        return result

    def close(self, result: FaultResult | None = None) -> None:
        for senders in self.senders:
            senders.stop()
        try:
            run_bounded(lambda: self.worker.stop(timeout=20_000), 40, "worker.stop()")
        except AssertionError as exc:
            if result is not None:
                result.problems.append(str(exc))
        try:
            run_bounded(self.broker.close, 20, "broker.close()")
        except AssertionError as exc:
            if result is not None:
                result.problems.append(str(exc))


@contextlib.contextmanager
def watching(ctx: Context) -> Iterator[LogWatch]:
    watch = LogWatch(secret_forms(ctx.secret) if ctx.secret else None,
                     debug=ctx.secret is not None).install()
    try:
        yield watch
    finally:
        watch.remove()


def _ids(count: int) -> list[int]:
    return list(range(count))


# ------------------------------------------------------------------------------------ cases


def close_all_connections_case(ctx: Context, times: int = 3) -> FaultResult:
    """``rabbitmqctl close_all_connections -p VHOST`` ``times`` times while the worker is busy."""
    started = now()
    with watching(ctx) as watch:
        lw = LoadedWorker(ctx, watch=watch).start()
        try:
            total = ctx.scale.messages
            lw.stream(_ids(total))
            for number in range(times):
                lw.wait_processed(total * (number + 1) // (times + 2))
                window = lw.begin()
                rabbit_admin.close_all_connections(f"reliability fault {number + 1}",
                                                   vhost=ctx.vhost)
                lw.recover(window)
        except BaseException:
            lw.close()
            raise
        result = lw.finish(f"server closes all connections ({times}x)")
    result.duration = now() - started
    return result


def server_restart_case(ctx: Context, down: float = 3.0) -> FaultResult:
    """``rabbitmqctl stop_app``, ``down`` seconds, ``start_app`` while the worker is busy.

    Restarts the whole node: every client of the server is disconnected. The server is left
    running (start_app in a finally)."""
    started = now()
    with watching(ctx) as watch:
        lw = LoadedWorker(ctx, watch=watch, connect_timeout=3).start()
        try:
            total = ctx.scale.messages
            lw.stream(_ids(total))
            lw.wait_processed(total // 3)
            window = lw.begin()
            with server_stopped():
                time.sleep(down)
            lw.recover(window)
        except BaseException:
            lw.close()
            raise
        result = lw.finish("server restart (stop_app, start_app)")
    result.notes.append(f"server down for {window.end - window.start:.1f} s "
                        f"(stop_app, {down:.0f} s, start_app, await_startup)")
    result.duration = now() - started
    return result


def silent_network_case(ctx: Context, silence: float | None = None,
                        heartbeat: float = 2.0) -> FaultResult:
    """The network path goes silent (nothing forwarded, nothing closed) for ``silence`` seconds
    (default 4 heartbeat intervals) while the worker is busy, then comes back."""
    silence = silence if silence is not None else 4 * heartbeat
    started = now()
    with watching(ctx) as watch, FaultProxy() as proxy:
        lw = LoadedWorker(ctx, url=ctx.url_via(proxy.port), heartbeat=heartbeat,
                          connect_timeout=3, watch=watch).start()
        try:
            total = ctx.scale.messages
            lw.stream(_ids(total))
            lw.wait_processed(total // 3)
            window = lw.begin()
            start = window.start
            proxy.silence()
            time.sleep(silence)
            proxy.restore()
            window.end = now()
            lost_at = watch.first("AMQP connection to", since=start)
            window.detection = None if lost_at is None else lost_at - start
            detected = watch.count("lost", since=start)
            lw.recover(window)
        except BaseException:
            lw.close()
            raise
        result = lw.finish(f"network silent for {silence:.0f} s (heartbeat {heartbeat:g} s)")
    if window.detection is None:
        result.problems.append("the lost connection was never detected")
    else:
        result.notes.append(f"loss detected after {window.detection:.1f} s "
                            f"({detected} connection(s) reported lost)")
        if window.detection > 2 * heartbeat + 2:
            result.problems.append(f"detection took {window.detection:.1f} s, more than two "
                                   f"heartbeat intervals ({2 * heartbeat:g} s) plus 2 s")
    result.duration = now() - started
    return result


def network_reset_case(ctx: Context, resets: int = 3) -> FaultResult:
    """The proxy aborts every connection (TCP RST) ``resets`` times while ``burst_senders``
    threads publish as fast as they can (and the worker consumes through the same path)."""
    started = now()
    with watching(ctx) as watch, FaultProxy() as proxy:
        lw = LoadedWorker(ctx, url=ctx.url_via(proxy.port), connect_timeout=3,
                          watch=watch).start()
        try:
            total = ctx.scale.messages
            senders = lw.stream(_ids(total), threads=ctx.scale.burst_senders, rate=None)
            for number in range(resets):
                target = total * (number + 1) // (resets + 1)
                while senders.issued < target and not senders.stopped.is_set():
                    time.sleep(0.002)
                window = lw.begin()
                proxy.reset()
                lw.recover(window)
        except BaseException:
            lw.close()
            raise
        result = lw.finish(f"network reset mid-publish ({resets}x, "
                           f"{ctx.scale.burst_senders} sending threads)")
    result.duration = now() - started
    return result


def channel_close_case(ctx: Context, queues: int = 3) -> FaultResult:
    """The server closes one consumer's channel (406 PRECONDITION_FAILED, provoked by acking
    an unknown delivery tag on it, as a double ack would) while the consumers of the other
    queues, on the same connection, keep running."""
    started = now()
    with watching(ctx) as watch:
        lw = LoadedWorker(ctx, queues=queues, watch=watch).start()
        try:
            total = ctx.scale.messages
            lw.stream(_ids(total))
            lw.wait_processed(total // 3)
            ports_before = connection_ports(lw.consumer_name, ctx.vhost)
            victim = lw.worker.consumers[lw.queues[0]].consumer
            window = lw.begin()
            victim.channel.basic_ack(2**40)
            lw.recover(window, queue_index=0)
            ports_after = connection_ports(lw.consumer_name, ctx.vhost)
        except BaseException:
            lw.close()
            raise
        result = lw.finish(f"server closes one consumer channel (of {queues})")
    log = lw.ledger.log
    others = set(lw.queues[1:])
    recovered_at = window.end + (window.consumer or 0.0)
    meanwhile = sum(1 for t, _, q, _ in log if q in others and window.start <= t <= recovered_at)
    result.notes.append(f"{meanwhile} messages of the other queues processed while the "
                        "closed consumer recovered")
    if meanwhile == 0:
        result.problems.append("the other consumers stopped while one channel was closed")
    for queue in others:
        keys = {key for _, _, q, key in log if q == queue}
        if len(keys) != 1:
            result.problems.append(f"the consumer of {queue} changed channel {len(keys) - 1} "
                                   "times: it was disturbed by the other channel's close")
    if ports_before != ports_after or len(ports_before) != 1:
        result.problems.append(f"the consumer connection was replaced ({ports_before} -> "
                               f"{ports_after}): only the channel should have closed")
    result.duration = now() - started
    return result


# ------------------------------------------------------------------------------- CLI worker


def cli_broker() -> None:
    """Entry point for ``dramatiq stress.fault_scenarios:cli_broker`` (the SIGTERM case).

    Environment: FAULT_URL, FAULT_QUEUE, FAULT_NAME (connection name prefix), FAULT_RECORDS
    (file every processing is appended to as ``id pid time``), FAULT_WORK_MS.
    """
    env = os.environ
    records = env["FAULT_RECORDS"]
    work_s = float(env.get("FAULT_WORK_MS", "20")) / 1000
    broker = KombuBroker(url=env["FAULT_URL"],
                         connection_name=f"{env['FAULT_NAME']}-{os.getpid()}")
    dramatiq.set_broker(broker)

    def append(line: str) -> None:
        fd = os.open(records, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line.encode())
        finally:
            os.close(fd)

    class Boot(Middleware):
        def after_worker_boot(self, broker: Any, worker: Any) -> None:
            append(f"boot {os.getpid()} {time.time():.6f}\n")

    broker.add_middleware(Boot())

    def work(mid: int) -> None:
        time.sleep(work_s)
        append(f"{mid} {os.getpid()} {time.time():.6f}\n")

    dramatiq.actor(work, broker=broker, actor_name=f"{ACTOR_PREFIX}_0",
                   queue_name=env["FAULT_QUEUE"], max_retries=0)


class RecordsFile:
    """Reads what the CLI workers appended to the records file into a ledger."""

    def __init__(self, path: Path, ledger: Ledger, queue: str) -> None:
        self.path = path
        self.ledger = ledger
        self.queue = queue
        self.offset = 0
        self.boots: list[tuple[int, float]] = []
        self._lock = threading.Lock()

    def poll(self) -> None:
        with self._lock:
            if not self.path.exists():
                return
            with self.path.open("rb") as handle:
                handle.seek(self.offset)
                data = handle.read()
            end = data.rfind(b"\n") + 1
            self.offset += end
            for line in data[:end].decode().splitlines():
                first, pid, at = line.split()
                if first == "boot":
                    self.boots.append((int(pid), float(at)))
                else:
                    self.ledger.record_processed(int(first), self.queue, int(pid), float(at))

    def follow(self, stop: threading.Event) -> threading.Thread:
        def run() -> None:
            while not stop.wait(0.05):
                self.poll()

        thread = threading.Thread(target=run, name="fault-records", daemon=True)
        thread.start()
        return thread


class CliWorker:
    """One run of ``dramatiq stress.fault_scenarios:cli_broker -p P -t T -Q queue``."""

    def __init__(self, ctx: Context, queue: str, name: str, records: Path, log: Path) -> None:
        environ = {
            **os.environ,
            "FAULT_URL": ctx.url, "FAULT_QUEUE": queue, "FAULT_NAME": name,
            "FAULT_RECORDS": str(records), "FAULT_WORK_MS": str(ctx.scale.work_ms),
            "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT),
                                                        os.environ.get("PYTHONPATH")])),
        }
        self.log = log
        self.started_at = time.time()
        with log.open("ab") as output:
            self.process = subprocess.Popen(
                [str(DRAMATIQ_CLI), "stress.fault_scenarios:cli_broker", "-p",
                 str(ctx.scale.cli_processes), "-t", str(ctx.scale.threads), "-Q", queue, "-v"],
                cwd=REPO_ROOT, env=environ, stdout=output, stderr=subprocess.STDOUT,
            )

    def terminate(self, timeout: float = 60) -> int:
        """SIGTERM, then wait for the exit code (SIGKILL after ``timeout``: code -9)."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            return -9


def worker_connection_names(vhost: str, prefix: str) -> list[str]:
    """Connection names of the CLI workers (``<prefix>-<pid>-<role>``) on the server."""
    return sorted(n for n in map(rabbit_admin.connection_name_of,
                                 rabbit_admin.find_connections(vhost=vhost))
                  if n and n.startswith(f"{prefix}-"))


def wait_for_no_connections(vhost: str, prefix: str, pids: set[int],
                            timeout: float) -> list[str]:
    """Wait until no connection of the processes ``pids`` is left; return those left."""
    return poll(lambda: [n for n in worker_connection_names(vhost, prefix)
                         if int(n[len(prefix) + 1:].split("-")[0]) in pids],
                lambda left: not left, timeout, 0.5)


def cli_sigterm_case(ctx: Context) -> FaultResult:
    """The ``dramatiq`` CLI (``cli_processes`` x ``threads``) is stopped with SIGTERM mid-run
    and started again; a producer in this process keeps sending meanwhile."""
    scale = ctx.scale
    started = now()
    tag = uuid.uuid4().hex[:6]
    queue, name = f"fq-cli-{tag}", f"faults-cli-{tag}"
    records = ctx.work_dir / f"{name}.records"
    logs = [ctx.work_dir / f"{name}-1.log", ctx.work_dir / f"{name}-2.log"]
    ledger = Ledger()
    reader = RecordsFile(records, ledger, queue)
    stop = threading.Event()
    follower = reader.follow(stop)
    result = FaultResult(f"worker stopped (SIGTERM to the dramatiq CLI) and restarted "
                         f"({scale.cli_processes} x {scale.threads} threads)")
    sender = KombuBroker(url=ctx.url, connection_name=f"faults-snd-{tag}")
    workers: list[CliWorker] = []
    total = scale.messages

    def send(mid: int) -> None:
        sender.enqueue(work_message(queue, mid, f"{ACTOR_PREFIX}_0"))

    def booted(count: int, timeout: float = 60) -> bool:
        deadline = now() + timeout
        while len(reader.boots) < count and now() < deadline:
            time.sleep(0.1)
        return len(reader.boots) >= count

    with watching(ctx) as watch:
        try:
            sender.declare_queue(queue, ensure=True)
            workers.append(CliWorker(ctx, queue, name, records, logs[0]))
            if not booted(scale.cli_processes):
                raise AssertionError(f"dramatiq did not boot:\n{logs[0].read_text()[-3000:]}")
            senders = Senders(send, _ids(total), scale.senders, scale.send_rate, ledger,
                              now() + scale.timeout).start()
            if not ledger.wait_processed(total // 3, scale.timeout):
                raise AssertionError(f"only {ledger.processed} processed before the SIGTERM")
            old_pids = {pid for pid, _ in reader.boots}
            t_term = time.time()
            code = workers[0].terminate()
            t_stopped = time.time()
            if code != 0:
                result.problems.append(f"dramatiq exited with {code} on SIGTERM")
            result.notes.append(f"graceful stop took {t_stopped - t_term:.1f} s")
            stale = wait_for_no_connections(ctx.vhost, name, old_pids, 15)
            if stale:
                result.problems.append(f"the stopped worker's connections stay open: {stale}")
            workers.append(CliWorker(ctx, queue, name, records, logs[1]))
            window = Window(t_term, t_stopped)
            if not booted(2 * scale.cli_processes):
                result.problems.append("the restarted dramatiq did not boot")
            first = ledger.first_processing(t_stopped, old_pids, queue, scale.timeout / 2)
            window.consumer = None if first is None else first - t_stopped
            window.producer = 0.0  # the producer (this process) was never interrupted
            result.windows.append(window)
            if not senders.join(scale.timeout):
                result.problems.append("senders did not finish")
            if not ledger.wait_all_sent_processed(scale.timeout):
                result.problems.append("not every sent message was processed in time")
            left = wait_queues_empty(ctx.vhost, [queue, f"{queue}.DQ"], 30)
            if any(left.values()):
                result.problems.append(f"messages still on the server: {left}")
            result.dead_lettered = sum(queue_messages(ctx.vhost, [f"{queue}.XQ"]).values())
            new_pids = {pid for pid, _ in reader.boots} - old_pids
            names = worker_connection_names(ctx.vhost, name)
            stale = [n for n in names if int(n[len(name) + 1:].split("-")[0]) in old_pids]
            if stale:
                result.problems.append(f"the stopped worker's connections stay open: {stale}")
            if len(names) > 2 * len(new_pids):
                result.problems.append(f"more than two connections per worker process: {names}")
            code = workers[1].terminate()
            if code != 0:
                result.problems.append(f"restarted dramatiq exited with {code} on SIGTERM")
        finally:
            for worker in workers:
                worker.terminate(30)
            stop.set()
            follower.join(5)
            reader.poll()
            with contextlib.suppress(Exception):
                run_bounded(sender.close, 20, "sender.close()")
        sent, processed, lost, duplicates = ledger.summary()
        result.sent, result.processed, result.lost, result.duplicates = (
            sent, processed, lost, duplicates)
        result.lost_ids = ledger.lost_ids()
        result.send_retries = ledger.send_retries
        result.unexpected_logs = list(watch.unexpected)
        result.leaks = list(watch.leaks)
    for log in logs:
        text = log.read_text(errors="replace") if log.exists() else ""
        if "Traceback" in text:
            start = text.index("Traceback")
            result.problems.append(f"traceback in {log.name}: {text[start:start + 1500]}")
        if ctx.secret:
            result.leaks += [f"{log.name} contains the password" for form in
                             secret_forms(ctx.secret) if form in text]
    result.duration = now() - started
    return result


FAULT_CASES: dict[str, Callable[[Context], FaultResult]] = {
    "close-all": close_all_connections_case,
    "restart": server_restart_case,
    "silent-network": silent_network_case,
    "network-reset": network_reset_case,
    "channel-close": channel_close_case,
    "sigterm": cli_sigterm_case,
}


# -------------------------------------------------------------------------------- hygiene


@dataclass
class Resources:
    threads: int
    fds: int
    connections: dict[str, int]
    channels: dict[str, int]
    #: Open descriptors by kind: "socket", "eventfd" (a thread's wake-up), "other".
    kinds: Counter[str] = field(default_factory=Counter)

    def row(self) -> list[str]:
        kinds = ", ".join(f"{k} {v}" for k, v in sorted(self.kinds.items()))
        return [str(self.threads), f"{self.fds} ({kinds})" if kinds else str(self.fds),
                ", ".join(f"{k.rsplit('-', 1)[1]}={v}" for k, v in self.connections.items()),
                ", ".join(f"{k.rsplit('-', 1)[1]}={v}" for k, v in self.channels.items())]


@dataclass
class HygieneResult:
    loops: int
    before: Resources
    after: Resources
    faults: Counter[str]
    result: FaultResult
    #: Threads that may publish at the same time (senders and the probe).
    publishers: int = 0

    @property
    def problems(self) -> list[str]:
        problems = list(self.result.problems)
        if self.result.lost:
            problems.append(f"{self.result.lost} messages lost")
        if self.after.threads > self.before.threads:
            problems.append(f"threads {self.before.threads} -> {self.after.threads}")
        if self.after.fds > self.before.fds:
            # A thread's wake-up descriptor lives as long as the thread or the last channel it
            # owned: each idle channel of the producer's pool may keep the one of the (ended)
            # sender thread that used it last. Sockets and anything else must not grow.
            wakeups = self.after.kinds["eventfd"] - self.before.kinds["eventfd"]
            rest = (self.after.fds - self.after.kinds["eventfd"]) - (
                self.before.fds - self.before.kinds["eventfd"])
            pool = sum(v for k, v in self.after.channels.items() if k.endswith("-producer"))
            if rest > 0 or wakeups > pool:
                problems.append(f"file descriptors {self.before.fds} -> {self.after.fds} "
                                f"({self.before.kinds} -> {self.after.kinds})")
        if self.after.connections != self.before.connections:
            problems.append(f"connections {self.before.connections} -> "
                            f"{self.after.connections}")
        for key, before in self.before.channels.items():
            after = self.after.channels.get(key, 0)
            if key.endswith("-consumer") and after != before:
                problems.append(f"consumer channels {before} -> {after}")
            # The producer's pool holds one channel per thread that published at the same
            # time since the last reconnect: bounded by the publishers, never growing.
            if key.endswith("-producer") and after > max(before, self.publishers):
                problems.append(f"producer channels {before} -> {after} "
                                f"({self.publishers} publishing threads)")
        return problems

    def table(self) -> str:
        rows = [["", "threads", "file descriptors", "server connections", "server channels"],
                ["---", "---:", "---:", "---", "---"],
                ["before", *self.before.row()], [f"after {self.loops} faults", *self.after.row()]]
        return "\n".join("| " + " | ".join(row) + " |" for row in rows)


def descriptor_kinds() -> Counter[str]:
    kinds: Counter[str] = Counter()
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        kinds["socket" if target.startswith("socket:") else
              "eventfd" if "eventfd" in target else "other"] += 1
    return kinds


def _settle(measure: Callable[[], int], limit: int, timeout: float = 10.0) -> int:
    def collected() -> int:
        gc.collect()
        return measure()

    return poll(collected, lambda value: value <= limit, timeout, 0.1)


def fault_loop(ctx: Context, loops: int, heartbeat: float = 2.0,
               progress: Callable[[str], None] | None = None) -> HygieneResult:
    """One worker (through a FaultProxy, two queues) goes through ``loops`` faults in turn:
    close all connections, reset the network, close one consumer's channel, silence the
    network for three heartbeat intervals. Threads, file descriptors, server connections
    and channels are measured at rest (after ``gc.collect()``) after a warm-up fault and
    again after the loops."""
    faults: Counter[str] = Counter()
    with watching(ctx) as watch, FaultProxy() as proxy:
        lw = LoadedWorker(ctx, url=ctx.url_via(proxy.port), queues=2, heartbeat=heartbeat,
                          connect_timeout=3, watch=watch).start()
        next_id = 0

        def burst(count: int) -> None:
            nonlocal next_id
            ids = list(range(next_id, next_id + count))
            next_id += count
            senders = lw.stream(ids, rate=None)
            if not senders.join(ctx.scale.timeout):
                raise AssertionError("senders hung")

        def inject(kind: str) -> None:
            window = lw.begin()
            if kind == "close-all":
                rabbit_admin.close_all_connections("reliability loop", vhost=ctx.vhost)
            elif kind == "network-reset":
                proxy.reset()
            elif kind == "channel-close":
                lw.worker.consumers[lw.queues[1]].consumer.channel.basic_ack(2**40)
            else:
                proxy.silence()
                time.sleep(3 * heartbeat)
                proxy.restore()
            lw.recover(window, queue_index=1 if kind == "channel-close" else None, timeout=60)
            faults[kind] += 1

        def at_rest() -> Resources:
            if not lw.ledger.wait_all_sent_processed(ctx.scale.timeout):
                raise AssertionError("messages were not processed")
            names = [q for queue in lw.queues for q in (queue, f"{queue}.DQ")]
            wait_queues_empty(ctx.vhost, names, 60)
            names = [lw.consumer_name, lw.producer_name]
            listing = wait_one_connection_each(ctx.vhost, names)
            connections = {n: len(listing.get(n, [])) for n in names}
            channels = {n: sum(int(row.get("channels") or 0) for row in listing.get(n, []))
                        for n in names}
            # Objects of failed connections (and ended sender threads) that sit in reference
            # cycles are the cyclic GC's to free; what is still open after it is a leak.
            gc.collect()
            return Resources(threading.active_count(), open_fds(), connections, channels,
                             descriptor_kinds())

        kinds = ["close-all", "network-reset", "channel-close", "silent-network"]
        try:
            burst(100)
            inject("close-all")  # warm-up: the reconnect path has run once
            burst(100)
            before = at_rest()
            for number in range(loops):
                kind = kinds[number % len(kinds)]
                processed = lw.ledger.processed
                senders = lw.stream(list(range(next_id, next_id + 200)), rate=400)
                next_id += 200
                lw.wait_processed(processed + 20)
                inject(kind)
                senders.join(ctx.scale.timeout)
                if progress is not None:
                    progress(f"loop {number + 1}/{loops}: {kind}, recovered in "
                             f"{fmt_seconds(lw.windows[-1].recovery)} s")
            burst(100)
            time.sleep(1.0)
            after = at_rest()
            # Threads and sockets of failed connections end asynchronously.
            after.threads = _settle(threading.active_count, before.threads)
            after.fds = _settle(open_fds, before.fds)
            after.kinds = descriptor_kinds()
        except BaseException:
            lw.close()
            raise
        result = lw.finish(f"fault loop ({loops}x)")
    return HygieneResult(loops, before, after, faults, result, ctx.scale.senders + 1)


# ---------------------------------------------------------------------------------- idle


@dataclass
class IdleResult:
    seconds: float
    heartbeat: float
    ports_before: dict[str, list[int]]
    ports_after: dict[str, list[int]]
    server_heartbeat: list[Any]
    lost_warnings: int
    latency_after: float | None
    send_after: float

    @property
    def problems(self) -> list[str]:
        problems = []
        if self.ports_after != self.ports_before:
            problems.append(f"connections changed while idle: {self.ports_before} -> "
                            f"{self.ports_after}")
        if any(len(p) != 1 for p in self.ports_after.values()):
            problems.append(f"expected one connection of each kind: {self.ports_after}")
        if self.lost_warnings:
            problems.append(f"{self.lost_warnings} 'connection lost' warnings while idle")
        if self.latency_after is None:
            problems.append("the message sent after the idle period was not processed")
        return problems


def idle_case(ctx: Context, seconds: float, heartbeat: float | None = None,
              progress: Callable[[str], None] | None = None) -> IdleResult:
    """A worker stays idle for ``seconds``: it must still hold the same two connections (no
    reconnect), and a message sent afterwards must be processed at once."""
    with watching(ctx) as watch:
        lw = LoadedWorker(ctx, heartbeat=heartbeat, threads=8, watch=watch).start()
        try:
            lw.probe()
            lw.wait_processed(1, 30)
            names = [lw.consumer_name, lw.producer_name]
            listing = wait_one_connection_each(ctx.vhost, names)
            before = {n: sorted(r["peer_port"] for r in listing.get(n, [])) for n in names}
            server_heartbeat = [r.get("timeout") for n in names for r in listing.get(n, [])]
            idle_start = now()
            deadline = idle_start + seconds
            while now() < deadline:
                time.sleep(min(30.0, max(0.0, deadline - now())))
                if progress is not None and now() < deadline:
                    progress(f"idle for {now() - idle_start:.0f} of {seconds:.0f} s")
            listing = connections_by_name(ctx.vhost)
            after = {n: sorted(r["peer_port"] for r in listing.get(n, [])) for n in names}
            lost = watch.count("lost", since=idle_start) + watch.count(
                "connection error", since=idle_start)
            t0 = now()
            lw.probe(timeout=30)
            send_after = now() - t0
            ok = lw.ledger.wait_processed(2, 10)
            latency = now() - t0 if ok else None
        finally:
            lw.close()
    return IdleResult(seconds, heartbeat if heartbeat is not None else 60, before, after,
                      server_heartbeat, lost, latency, send_after)
