"""Helpers shared by the stress and benchmark harnesses.

- a dedicated vhost per run (``stress-<tag>-<hex>``), deleted at the end, so queues and connection
  counts never mix with other test sessions on the same server;
- samplers: this process's RSS, thread count and TCP connections to the AMQP ports (every node
  of a failover list; psutil, exact and cheap), and the server-side connection count
  (``rabbitmqctl``, slow: poll every few s);
- percentiles, formatting and markdown tables (``stress.runner`` runs the benchmark cases).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import signal
import sys
import threading
import time
import uuid
from collections.abc import Collection, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

import psutil

from stress import rabbit_admin

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO_ROOT / "stress" / "results"


# ------------------------------------------------------------------------------------ URLs, vhost


def url_for_vhost(url: str, vhost: str) -> str:
    """``url`` with its path replaced by ``vhost`` (URL-quoted)."""
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path="/" + quote(vhost, safe="")))


def url_at(url: str, port: int, host: str = "127.0.0.1") -> str:
    """``url`` with its host and port replaced (a proxy in front of its server)."""
    parts = urlsplit(url)
    credentials = parts.netloc.rpartition("@")[0]
    netloc = f"{credentials}@{host}:{port}" if credentials else f"{host}:{port}"
    return urlunsplit(parts._replace(netloc=netloc))


def amqp_ports(url: str) -> frozenset[int]:
    """The AMQP ports of ``url``: of every URL of a ``;``-separated failover list (a cluster's
    nodes), so the connections a broker holds are counted on whichever node they sit."""
    ports: set[int] = set()
    for part in url.split(";"):
        parts = urlsplit(part.strip())
        ports.add(parts.port or (5671 if parts.scheme in ("amqps", "pyamqps") else 5672))
    return frozenset(ports)


def _raise_system_exit(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


@contextlib.contextmanager
def dedicated_vhost(tag: str, *, keep: bool = False) -> Iterator[str]:
    """Create vhost ``stress-<tag>-<hex>`` (guest has full rights) and delete it at exit.

    SIGTERM is turned into SystemExit meanwhile so that the vhost is deleted on ``kill`` too.
    Deleting a vhost closes its connections and deletes its queues.
    """
    name = f"stress-{tag}-{uuid.uuid4().hex[:8]}"
    rabbit_admin.add_vhost(name, user="guest")
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _raise_system_exit)
    try:
        yield name
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        if not keep:
            try:
                rabbit_admin.delete_vhost(name)
            except rabbit_admin.RabbitmqctlError as exc:
                print(f"warning: could not delete vhost {name}: {exc}", file=sys.stderr)


@contextlib.contextmanager
def vhost_session(tag: str) -> Iterator[dict[str, str]]:
    """A :func:`dedicated_vhost` for a whole benchmark run: ``{"vhost": ..., "url": ...}``
    (the URL of ``AMQP_URL``'s server for it), as a workload's ``session`` yields it."""
    with dedicated_vhost(tag) as vhost:
        yield {"vhost": vhost, "url": url_for_vhost(rabbit_admin.amqp_url(), vhost)}


def server_sockets() -> dict[str, int] | None:
    """The server's socket budget: ``{"sockets_limit": ..., "sockets_used": ...}`` (or None).

    RabbitMQ 3.x refuses to go on with handshakes once ``sockets_used`` reaches the limit, which
    stalls every client of the server, not just ours: cases that would open many connections
    check this first.
    """
    try:
        out = rabbit_admin.rabbitmqctl("status", "--formatter", "json", timeout=60)
        fds = json.loads(out).get("file_descriptors") or {}
        return {"sockets_limit": int(fds["sockets_limit"]),
                "sockets_used": int(fds["sockets_used"])}
    except (rabbit_admin.RabbitmqctlError, ValueError, KeyError, TypeError):
        return None


SOCKET_RESERVE = 100


def socket_headroom(reserve: int = SOCKET_RESERVE) -> tuple[int, str] | None:
    """How many more connections we may open without starving other clients, and a note
    saying why (None: unknown)."""
    info = server_sockets()
    if info is None:
        return None
    spare = info["sockets_limit"] - info["sockets_used"] - reserve
    return spare, (f"server socket limit {info['sockets_limit']}, {info['sockets_used']} in use, "
                   f"{reserve} kept for other clients")


# -------------------------------------------------------------------------------------- samplers


def count_amqp_sockets(proc: psutil.Process, ports: Collection[int]) -> int:
    """TCP connections of ``proc`` whose remote port is one of ``ports`` (held, whatever their
    state)."""
    try:
        conns = proc.net_connections(kind="tcp")
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return 0
    return sum(1 for c in conns if c.raddr and c.raddr.port in ports)


class ProcessSampler:
    """Samples RSS, threads and AMQP sockets of a process (and optionally its children).

    ``peak_*`` are maxima over the samples (summed over the processes of one sample).
    """

    def __init__(self, ports: Collection[int], *, pid: int | None = None, interval: float = 0.5,
                 children: bool = False) -> None:
        self.ports = ports
        self.proc = psutil.Process(pid or os.getpid())
        self.interval = interval
        self.children = children
        self.rss = self.peak_rss = 0
        self.threads = self.peak_threads = 0
        self.sockets = self.peak_sockets = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="process-sampler", daemon=True)

    def start(self) -> ProcessSampler:
        self.sample()
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sample()

    def sample(self) -> None:
        procs = [self.proc]
        if self.children:
            with contextlib.suppress(psutil.Error):
                procs += self.proc.children(recursive=True)
        rss = threads = sockets = 0
        for proc in procs:
            try:
                with proc.oneshot():
                    rss += proc.memory_info().rss
                    threads += proc.num_threads()
            except psutil.Error:
                continue
            sockets += count_amqp_sockets(proc, self.ports)
        self.rss, self.threads, self.sockets = rss, threads, sockets
        self.peak_rss = max(self.peak_rss, rss)
        self.peak_threads = max(self.peak_threads, threads)
        self.peak_sockets = max(self.peak_sockets, sockets)
        self.samples += 1

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            with contextlib.suppress(Exception):
                self.sample()


class ServerConnectionPoller:
    """Polls ``rabbitmqctl list_connections`` (slow, ~1 s a call) in a background thread.

    Counts the connections of ``vhost`` whose client ``connection_name`` starts with ``prefix``
    (``prefix`` None: every connection of the vhost).
    """

    def __init__(self, vhost: str, prefix: str | None, interval: float = 3.0) -> None:
        self.vhost = vhost
        self.prefix = prefix
        self.interval = interval
        self.last: int | None = None
        self.peak = 0
        self.polls = 0
        self.errors = 0
        self.names: dict[str, int] = {}
        self.peak_names: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="server-conn-poller", daemon=True)

    def start(self) -> ServerConnectionPoller:
        self._thread.start()
        return self

    def stop(self, final_poll: bool = False) -> None:
        self._stop.set()
        self._thread.join(30)
        if final_poll:
            self.poll()

    def count_now(self) -> int:
        names: dict[str, int] = {}
        for conn in rabbit_admin.list_connections(self.vhost):
            name = rabbit_admin.connection_name_of(conn) or ""
            if self.prefix is None or name.startswith(self.prefix):
                names[name] = names.get(name, 0) + 1
        self.names = names
        return sum(names.values())

    def poll(self) -> None:
        try:
            count = self.count_now()
        except Exception:  # noqa: BLE001 - a failed poll is counted, never fatal
            self.errors += 1
            return
        self.last = count
        if count > self.peak or not self.peak_names:
            self.peak_names = dict(self.names)
        self.peak = max(self.peak, count)
        self.polls += 1

    def _run(self) -> None:
        while not self._stop.is_set():
            self.poll()
            self._stop.wait(self.interval)


# ------------------------------------------------------------------------- arguments, shares


def int_list(text: str) -> list[int]:
    """An argparse type: ``"1,8,64"`` -> ``[1, 8, 64]``."""
    return [int(x) for x in text.split(",") if x.strip()]


def float_list(text: str) -> list[float]:
    """An argparse type: ``"0,0.5,5"`` -> ``[0.0, 0.5, 5.0]``."""
    return [float(x) for x in text.split(",") if x.strip()]


def choice_list(text: str, choices: Iterable[str], option: str) -> tuple[str, ...]:
    """``"a,b"`` -> ``("a", "b")``, each one of ``choices`` (an ArgumentTypeError naming
    ``option`` and the choices otherwise)."""
    allowed = list(choices)
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    wrong = [n for n in names if n not in allowed]
    if wrong or not names:
        raise argparse.ArgumentTypeError(
            f"{option} takes a comma-separated subset of {','.join(allowed)}, not {text!r}")
    return names


def split(total: int, parts: int) -> list[int]:
    """``total`` split into ``parts`` near-equal non-negative integers."""
    base, extra = divmod(total, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


# ---------------------------------------------------------------------------------- statistics


def percentile(sorted_values: Sequence[float], p: float) -> float | None:
    """Nearest-rank percentile (``p`` in 0..100) of already sorted values; None when empty."""
    if not sorted_values:
        return None
    rank = max(1, math.ceil(p / 100 * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


def latency_summary(samples: list[float]) -> dict[str, float | None]:
    """p50/p95/p99/max of latencies in seconds."""
    samples.sort()
    return {
        "p50": percentile(samples, 50),
        "p95": percentile(samples, 95),
        "p99": percentile(samples, 99),
        "max": samples[-1] if samples else None,
    }


# ------------------------------------------------------------------------------------ formatting


def fmt_ms(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    ms = seconds * 1000
    if ms < 1:
        return f"{ms:.3f} ms"
    if ms < 100:
        return f"{ms:.2f} ms"
    return f"{ms:,.0f} ms"


def fmt_rate(rate: float | None) -> str:
    return "—" if rate is None else f"{rate:,.0f}"


def fmt_mib(nbytes: float | None) -> str:
    return "—" if nbytes is None else f"{nbytes / 2**20:,.0f} MiB"


def fmt_threads(count: int) -> str:
    return f"{count} thread" if count == 1 else f"{count} threads"


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]

    def line(row: Sequence[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |"

    out = [line(cells[0]), "| " + " | ".join("-" * w for w in widths) + " |"]
    out += [line(r) for r in cells[1:]]
    return "\n".join(out)


def machine_line() -> str:
    """One line describing where and when the figures were taken."""
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return (
        f"{time.strftime('%Y-%m-%d %H:%M:%S %Z')}; {os.cpu_count()} CPUs, "
        f"{psutil.virtual_memory().total / 2**30:.0f} GiB, load average {load} at the end; "
        f"Python {sys.version.split()[0]}"
    )


def write_result(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def short_error(result: dict[str, Any], limit: int = 80) -> str:
    text = str(result.get("error") or "failed").replace("|", "/").replace("\n", " ")
    return text if len(text) <= limit else text[: limit - 1] + "…"
