"""Bounded retries of broker operations across reconnects."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

from amqp.exceptions import AMQPError
from dramatiq.errors import ConnectionClosed

from kombu_pyamqp_threadsafe import PublishBlockedError

T = TypeVar("T")

#: Reply codes no retry can fix: access refused, precondition failed (for example a message
#: over the server's size limit), vhost not found / not allowed.
FATAL_REPLY_CODES = frozenset({403, 406, 530})
FIRST_BACKOFF = 0.1


def connection_closed(exc: BaseException, server: str) -> ConnectionClosed:
    """dramatiq's ConnectionClosed for ``exc``, naming the (masked) server it came from."""
    return ConnectionClosed(f"{exc} (AMQP server {server})")


def retrying(action: Callable[[], T], attempts: int, budget: float, server: Callable[[], str],
             on_error: Callable[[BaseException], None] | None = None) -> T:
    """Run ``action`` until it succeeds, at most ``attempts`` times within ``budget`` seconds.

    Connection and channel errors are retried after a short, doubling pause (the next attempt
    reconnects). The last error, or one no retry can fix, is raised as ConnectionClosed naming
    ``server()``.
    """
    deadline = time.monotonic() + budget
    pause = FIRST_BACKOFF
    for attempt in range(1, attempts + 1):
        try:
            return action()
        except (AMQPError, OSError) as exc:
            if on_error is not None:
                on_error(exc)
            remaining = deadline - time.monotonic()
            # Blocked past blocked_timeout: every attempt would wait as long again.
            fatal = (getattr(exc, "reply_code", None) in FATAL_REPLY_CODES
                     or isinstance(exc, PublishBlockedError))
            if fatal or attempt == attempts or remaining <= 0:
                raise connection_closed(exc, server()) from None
            time.sleep(min(pause, remaining))
            pause *= 2
    raise AssertionError("attempts must be at least 1")
