"""The ``dramatiq`` CLI worker gets SIGTERM mid-run and is started again, while a producer in
this process keeps sending; ``cli_broker`` builds the broker of the worker processes."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import dramatiq
from dramatiq.middleware import Middleware

from dramatiq_kombu_broker import KombuBroker
from stress import rabbit_admin
from stress.bounded import run_bounded
from stress.common import REPO_ROOT
from stress.fault_scenarios.context import Context
from stress.fault_scenarios.credentials import secret_forms
from stress.fault_scenarios.ledger import ACTOR_PREFIX, Ledger, work_message
from stress.fault_scenarios.log_watch import watching
from stress.fault_scenarios.results import FaultResult, Window
from stress.fault_scenarios.senders import Senders
from stress.fault_scenarios.server_state import queue_messages, wait_queues_empty
from stress.polling import poll

DRAMATIQ_CLI = Path(sys.executable).with_name("dramatiq")

now = time.monotonic


def cli_broker() -> None:
    """Entry point for ``dramatiq stress.fault_scenarios.cli_sigterm:cli_broker``.

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
    """One run of ``dramatiq stress.fault_scenarios.cli_sigterm:cli_broker -p P -t T -Q queue``."""

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
                [str(DRAMATIQ_CLI), "stress.fault_scenarios.cli_sigterm:cli_broker", "-p",
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


def names_of(pids: set[int], names: list[str], prefix: str) -> list[str]:
    """The connection names among ``names`` that belong to the processes ``pids``."""
    return [n for n in names if int(n[len(prefix) + 1:].split("-")[0]) in pids]


def wait_for_no_connections(vhost: str, prefix: str, pids: set[int],
                            timeout: float) -> list[str]:
    """Wait until no connection of the processes ``pids`` is left; return those left."""
    return poll(lambda: names_of(pids, worker_connection_names(vhost, prefix), prefix),
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
        return poll(lambda: len(reader.boots), lambda boots: boots >= count, timeout,
                    0.1) >= count

    with watching(ctx) as watch:
        try:
            sender.declare_queue(queue, ensure=True)
            workers.append(CliWorker(ctx, queue, name, records, logs[0]))
            if not booted(scale.cli_processes):
                raise AssertionError(f"dramatiq did not boot:\n{logs[0].read_text()[-3000:]}")
            senders = Senders(send, list(range(total)), scale.senders, scale.send_rate, ledger,
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
            stale = names_of(old_pids, names, name)
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
        result.count(ledger, watch)
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
