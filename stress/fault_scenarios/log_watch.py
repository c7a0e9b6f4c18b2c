"""Every log record of the process during a scenario: warnings with their time, unexpected
errors, and lines that leak the password."""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Iterator

from stress.fault_scenarios.context import Context
from stress.fault_scenarios.credentials import secret_forms
from stress.polling import poll

now = time.monotonic


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
        return poll(lambda: self.lines(fragment, since), bool, timeout)


@contextlib.contextmanager
def watching(ctx: Context) -> Iterator[LogWatch]:
    watch = LogWatch(secret_forms(ctx.secret) if ctx.secret else None,
                     debug=ctx.secret is not None).install()
    try:
        yield watch
    finally:
        watch.remove()
