"""Real RabbitMQ resource alarms for flow-control tests, always undone.

An alarm is server-wide: it blocks every publisher of every vhost, other sessions' tests too.
So an alarm window is short (a few seconds), one at a time on this machine (a file lock), and
the server's previous limits are read first and restored in a ``finally``, whatever happens.
A limit that already looks like an alarm (someone else's window) is waited out, never taken
as the value to restore; a watchdog restores the limits after MAX_WINDOW seconds even if the
test hangs inside the window.
"""

from __future__ import annotations

import fcntl
import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from stress import rabbit_admin

LOCK_PATH = "/tmp/kombu-pyamqp-threadsafe-rabbitmq-alarm.lock"
#: Below this relative watermark (or with a disk limit above the free space) an alarm is on.
ALARM_WATERMARK = 0.01
#: A watermark far below any node's memory use: the memory alarm goes off at once.
MEMORY_ALARM_WATERMARK = "0.000001"
#: How long the server may take to raise the alarm (its disk monitor checks periodically).
ALARM_RAISED_WITHIN = 10.0
#: The longest an alarm stays on, even if the test hangs inside its window.
MAX_WINDOW = 20.0
#: How long to wait for another alarm window (ours or a neighbour's) to end first.
WAIT_FOR_OTHERS = 60.0


def server_limits() -> dict[str, Any]:
    status = json.loads(rabbit_admin.rabbitmqctl("status", "--formatter", "json"))
    return {
        "watermark": status["vm_memory_high_watermark_setting"],
        "disk_free_limit": status["disk_free_limit"],
        "disk_free": status["disk_free"],
        "alarms": status.get("alarms") or [],
    }


def _looks_alarmed(limits: dict[str, Any]) -> bool:
    relative = limits["watermark"].get("relative")
    return bool(limits["alarms"]) or (relative is not None and relative < ALARM_WATERMARK) or (
        limits["disk_free_limit"] >= limits["disk_free"])


def _wait_for_alarm(timeout: float = ALARM_RAISED_WITHIN) -> None:
    deadline = time.monotonic() + timeout
    while not server_limits()["alarms"]:
        if time.monotonic() > deadline:
            raise RuntimeError(f"the server raised no alarm within {timeout} s")


def _watermark_args(setting: dict[str, Any]) -> list[str]:
    if "relative" in setting:
        return [repr(float(setting["relative"]))]
    return ["absolute", str(int(setting["absolute"]))]


@contextmanager
def resource_alarm(kind: str) -> Iterator[dict[str, Any]]:
    """Raise a memory (``kind="memory"``) or disk (``"disk"``) alarm for the ``with`` block.

    Yields the limits it will restore. Serialised between processes of this machine.
    """
    with open(LOCK_PATH, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            deadline = time.monotonic() + WAIT_FOR_OTHERS
            limits = server_limits()
            while _looks_alarmed(limits):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the server is already in an alarm: {limits}")
                time.sleep(1)
                limits = server_limits()
            def restore() -> None:  # idempotent: the watchdog may have done it already
                if kind == "memory":
                    rabbit_admin.rabbitmqctl("set_vm_memory_high_watermark",
                                             *_watermark_args(limits["watermark"]))
                else:
                    rabbit_admin.rabbitmqctl("set_disk_free_limit",
                                             str(limits["disk_free_limit"]))

            watchdog = threading.Timer(MAX_WINDOW, restore)
            watchdog.daemon = True
            if kind not in ("memory", "disk"):
                raise ValueError(f"unknown alarm kind {kind!r}")
            try:
                watchdog.start()
                if kind == "memory":
                    rabbit_admin.rabbitmqctl("set_vm_memory_high_watermark",
                                             MEMORY_ALARM_WATERMARK)
                else:
                    huge = str(limits["disk_free"] * 1000)
                    rabbit_admin.rabbitmqctl("set_disk_free_limit", huge)
                _wait_for_alarm()
                yield limits
            finally:
                watchdog.cancel()
                watchdog.join()  # if it fired, let it finish first
                restore()
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
