"""The server restarts (stop_app, start_app) while the worker is busy. It disconnects every
client of the node: callers guard it, and the server is always started again."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

from stress import rabbit_admin
from stress.fault_scenarios.context import Context
from stress.fault_scenarios.harness import LoadedWorker
from stress.fault_scenarios.log_watch import watching
from stress.fault_scenarios.results import FaultResult

now = time.monotonic


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


def server_restart_case(ctx: Context, down: float = 3.0) -> FaultResult:
    """``rabbitmqctl stop_app``, ``down`` seconds, ``start_app`` while the worker is busy.

    Restarts the whole node: every client of the server is disconnected. The server is left
    running (start_app in a finally)."""
    started = now()
    with watching(ctx) as watch:
        lw = LoadedWorker(ctx, watch=watch, connect_timeout=3).start()
        with lw.closing_on_error():
            total = ctx.scale.messages
            lw.stream(list(range(total)))
            lw.wait_processed(total // 3)
            window = lw.begin()
            with server_stopped():
                time.sleep(down)
            lw.recover(window)
        result = lw.finish("server restart (stop_app, start_app)")
    result.notes.append(f"server down for {window.end - window.start:.1f} s "
                        f"(stop_app, {down:.0f} s, start_app, await_startup)")
    result.duration = now() - started
    return result
