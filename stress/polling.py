"""Waiting for the server (or a process) to reach a state, with a deadline.

The server reports some changes a moment late (a just-closed connection stays listed, a
published message is counted later), so a check polls. Every wait of the tests and harnesses
goes through :func:`poll`: it returns the last value seen, so a caller asserts on it and a
failure shows what was seen instead of a bare ``False``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def poll(measure: Callable[[], T], done: Callable[[T], object], timeout: float,
         interval: float = 0.05) -> T:
    """Call ``measure()`` every ``interval`` s until ``done(value)`` is true or ``timeout`` s
    have passed; return the last value."""
    deadline = time.monotonic() + timeout
    while True:
        value = measure()
        if done(value) or time.monotonic() >= deadline:
            return value
        time.sleep(interval)
