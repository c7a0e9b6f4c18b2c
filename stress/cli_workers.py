"""The real dramatiq CLI (``dramatiq`` or ``dramatiq-gevent``) as a child process.

A worker that hangs must never outlive its run: :meth:`CliWorkers.stop` sends SIGTERM (the
CLI's own stop: every worker process stops its Worker and closes its broker), waits a bounded
time, then kills the process group, and says which of the two happened.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO, Any

from stress.polling import poll

REPO_ROOT = Path(__file__).resolve().parent.parent


def dramatiq_command(gevent: bool = False) -> list[str]:
    """The argv prefix of the CLI: ``python -m dramatiq``, or the ``dramatiq-gevent`` script
    (gevent's ``monkey.patch_all()`` before dramatiq's own ``main``) of this interpreter."""
    if not gevent:
        return [sys.executable, "-m", "dramatiq"]
    script = Path(sys.executable).with_name("dramatiq-gevent")
    found = str(script) if script.exists() else shutil.which("dramatiq-gevent")
    if found is None:
        raise RuntimeError("dramatiq-gevent not found beside this Python nor on PATH: "
                           "install dramatiq with gevent (pip install gevent)")
    return [sys.executable, found]


def pythonpath(*paths: Path | str) -> str:
    """``PYTHONPATH`` for a child: ``paths`` (the repository root by default), then the
    parent's own."""
    parts = [str(p) for p in (paths or (REPO_ROOT,))]
    return os.pathsep.join([*parts, *filter(None, [os.environ.get("PYTHONPATH")])])


class CliWorkers:
    """``dramatiq[-gevent] MODULE -p P -t T [-Q queue ...]`` with its output in ``log_path``.

    Use as a context manager: leaving it stops the CLI (SIGTERM, then SIGKILL after
    ``stop_timeout``) if the caller has not already.
    """

    def __init__(self, module: str, *, processes: int, threads: int, log_path: Path,
                 queues: Sequence[str] = (), env: Mapping[str, str] | None = None,
                 gevent: bool = False, shutdown_timeout_ms: int | None = None,
                 extra_args: Sequence[str] = (), cwd: Path = REPO_ROOT) -> None:
        self.cmd = [*dramatiq_command(gevent), module, "--processes", str(processes),
                    "--threads", str(threads)]
        for queue in queues:
            self.cmd += ["--queues", queue]
        if shutdown_timeout_ms is not None:
            self.cmd += ["--worker-shutdown-timeout", str(shutdown_timeout_ms)]
        self.cmd += list(extra_args)
        self.env = {**os.environ, "PYTHONPATH": pythonpath(), **(env or {})}
        self.log_path = log_path
        self.cwd = cwd
        self.proc: subprocess.Popen[bytes] | None = None
        #: Seconds from SIGTERM to exit, None until a stop; ``killed`` when it had to be killed.
        self.stop_seconds: float | None = None
        self.killed = False
        self._log: IO[Any] | None = None

    @property
    def pid(self) -> int:
        if self.proc is None:
            raise RuntimeError("the CLI was not started")
        return self.proc.pid

    def start(self) -> CliWorkers:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        # A session of its own: the kill reaches the worker processes the CLI forked.
        self.proc = subprocess.Popen(self.cmd, cwd=self.cwd, env=self.env, stdout=self._log,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     start_new_session=True)
        return self

    def exit_status(self) -> int | None:
        """The CLI's exit status if it has ended, else None."""
        return None if self.proc is None else self.proc.poll()

    def worker_pids(self) -> list[int]:
        """The worker processes the CLI forked (its children), as the system lists them now."""
        import psutil

        with contextlib.suppress(psutil.Error):
            return sorted(p.pid for p in psutil.Process(self.pid).children())
        return []

    def wait_for_workers(self, count: int, timeout: float) -> list[int]:
        """The worker pids once ``count`` of them are up (or whatever is there at timeout)."""
        return poll(self.worker_pids, lambda pids: len(pids) >= count, timeout, 0.1)

    def stop(self, timeout: float) -> int | None:
        """SIGTERM, wait at most ``timeout`` s, else SIGKILL the CLI and the worker processes
        it forked (its process group); the exit status (None when it had to be killed)."""
        proc = self.proc
        if proc is None:
            return None
        if proc.poll() is None:
            started = time.monotonic()
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
                self.stop_seconds = time.monotonic() - started
            except subprocess.TimeoutExpired:
                self.killed = True
                # The group's leader is not reaped yet, so its id still names this group.
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        if self._log is not None:
            self._log.close()
            self._log = None
        return None if self.killed else proc.returncode

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def __enter__(self) -> CliWorkers:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop(timeout=30)
