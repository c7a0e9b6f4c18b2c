"""When and where a lost connection is tried again: pure logic, no sockets."""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Sequence

#: Attempts of one recovery in place before the consumer gives up and raises ConnectionClosed
#: (dramatiq's consumer thread then restarts it after its own fixed delay).
RECOVERY_ATTEMPTS = 8
#: Pause after the first failed attempt; it doubles after each further failure.
FIRST_DELAY = 0.1
#: Longest pause between two attempts.
MAX_DELAY = 2.0
#: Longest a recovery keeps trying, from the loss, before it gives up.
RECOVERY_BUDGET = 30.0


def failover_order(urls: Sequence[str], rng: random.Random | None = None) -> list[str]:
    """``urls`` rotated to start at a random one, the others following in their given order.

    Each process (each connection) starts on another node, so workers spread over a cluster;
    the connection then moves node after node, in the given order, on every failure.
    """
    if not urls:
        raise ValueError("no URL to connect to")
    start = (rng or random).randrange(len(urls))
    return [*urls[start:], *urls[:start]]


class RecoveryPolicy:
    """Bounded attempts with a doubling pause and a deadline, for one connection loss at a time.

    ``lost()`` starts a recovery; ``failed()`` says how long to wait before the next attempt,
    or None when the recovery must give up; ``succeeded()`` ends it. The first attempt after a
    loss is due at once (most losses are a closed connection to a server that is up).
    """

    def __init__(self, attempts: int = RECOVERY_ATTEMPTS, first_delay: float = FIRST_DELAY,
                 max_delay: float = MAX_DELAY, budget: float = RECOVERY_BUDGET,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if attempts < 1:
            raise ValueError(f"attempts must be at least 1, got {attempts!r}")
        self.attempts = attempts
        self.first_delay = first_delay
        self.max_delay = max_delay
        self.budget = budget
        self._clock = clock
        self.failures = 0
        self._deadline: float | None = None
        #: When the next attempt is due (clock time); meaningful while recovering.
        self.due = 0.0

    @property
    def recovering(self) -> bool:
        return self._deadline is not None

    def lost(self) -> None:
        """A loss: the first attempt is due now (a recovery in progress keeps its deadline)."""
        if self._deadline is None:
            now = self._clock()
            self._deadline = now + self.budget
            self.failures = 0
            self.due = now

    def failed(self) -> float | None:
        """An attempt failed: seconds until the next is due, or None to give up."""
        self.lost()
        assert self._deadline is not None
        now = self._clock()
        self.failures += 1
        remaining = self._deadline - now
        if self.failures >= self.attempts or remaining <= 0:
            self._deadline = None
            return None
        delay = min(self.first_delay * 2 ** (self.failures - 1), self.max_delay, remaining)
        self.due = now + delay
        return delay

    def wait(self) -> float:
        """Seconds until the next attempt is due (0 when it is due now)."""
        return max(0.0, self.due - self._clock())

    def succeeded(self) -> None:
        self._deadline = None
        self.failures = 0


def recovery_policy(connection_attempts: int, retry_delay: float, nodes: int) -> RecoveryPolicy:
    """The policy of a consumer's recovery, from pika's ``connection_attempts`` (per node of the
    failover list) and ``retry_delay`` (the first pause, doubling up to MAX_DELAY or itself).

    A recovery never gives up sooner than RECOVERY_ATTEMPTS within RECOVERY_BUDGET: pika's
    defaults (one attempt) would hand every short outage to dramatiq's fixed 3 s restart.
    """
    attempts = max(RECOVERY_ATTEMPTS, connection_attempts * nodes)
    max_delay = max(MAX_DELAY, retry_delay)
    return RecoveryPolicy(attempts=attempts, first_delay=retry_delay, max_delay=max_delay,
                          budget=max(RECOVERY_BUDGET, attempts * max_delay))
