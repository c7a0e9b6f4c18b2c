"""Run a call that may hang in the code under test, with a bound on how long it may take."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any


def run_bounded(fn: Callable[[], Any], timeout: float, what: str) -> Any:
    """Run ``fn`` in a daemon thread; raise AssertionError if it does not finish in time.

    A hang in the code under test then fails the test with a message instead of blocking the
    whole session until pytest-timeout kills it.
    """
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["result"] = fn()
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller
            box["error"] = exc

    thread = threading.Thread(target=target, daemon=True, name=f"bounded-{what}")
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise AssertionError(f"{what} did not finish within {timeout} s (hung)")
    if "error" in box:
        raise box["error"]
    return box.get("result")
