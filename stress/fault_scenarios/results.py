"""What a fault case returns (counts, recovery windows, problems) and its report tables."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from stress.fault_scenarios.ledger import Ledger
from stress.fault_scenarios.log_watch import LogWatch


@dataclass
class Window:
    """One fault: when it began and ended, and how long recovery took."""

    start: float
    end: float
    producer: float | None = None
    consumer: float | None = None
    detection: float | None = None
    #: Keys of the channels the consumers used when the fault began.
    old: set[Any] = field(default_factory=set)

    @property
    def recovery(self) -> float | None:
        if self.producer is None or self.consumer is None:
            return None
        return max(self.producer, self.consumer)


@dataclass
class FaultResult:
    fault: str
    sent: int = 0
    processed: int = 0
    lost: int = 0
    duplicates: int = 0
    windows: list[Window] = field(default_factory=list)
    send_retries: int = 0
    dead_lettered: int = 0
    #: Problems that fail the case besides lost messages (unrecovered fault, leak, hang...).
    problems: list[str] = field(default_factory=list)
    #: Facts worth reporting (detection times, connection counts...).
    notes: list[str] = field(default_factory=list)
    lost_ids: list[int] = field(default_factory=list)
    unexpected_logs: list[str] = field(default_factory=list)
    leaks: list[str] = field(default_factory=list)
    duration: float = 0.0

    def count(self, ledger: Ledger, watch: LogWatch | None) -> None:
        """Take the counts of ``ledger`` and what ``watch`` caught in the logs."""
        self.sent, self.processed, self.lost, self.duplicates = ledger.summary()
        self.lost_ids = ledger.lost_ids()
        self.send_retries = ledger.send_retries
        if watch is not None:
            self.unexpected_logs = list(watch.unexpected)
            self.leaks = list(watch.leaks)

    @property
    def recovery(self) -> float | None:
        """The slowest recovery of the case (None if a fault never recovered)."""
        values = [w.recovery for w in self.windows]
        if not values or any(v is None for v in values):
            return None
        return max(v for v in values if v is not None)

    @property
    def ok(self) -> bool:
        return (self.lost == 0 and not self.problems and not self.leaks
                and not self.unexpected_logs and self.recovery is not None)

    def explain(self) -> str:
        lines = [f"{self.fault}: sent={self.sent} processed={self.processed} lost={self.lost} "
                 f"duplicates={self.duplicates} recovery={fmt_seconds(self.recovery)} "
                 f"windows={[(w.producer, w.consumer, w.detection) for w in self.windows]}"]
        lines += [f"problem: {p}" for p in self.problems]
        lines += [f"note: {n}" for n in self.notes]
        if self.lost_ids:
            lines.append(f"lost ids (first 20): {self.lost_ids[:20]}")
        lines += [f"unexpected log: {u}" for u in self.unexpected_logs[:5]]
        lines += [f"secret leaked: {leak}" for leak in self.leaks[:5]]
        return "\n".join(lines)


def fmt_seconds(value: float | None) -> str:
    return "not recovered" if value is None else f"{value:.1f}"


def markdown_table(results: list[FaultResult]) -> str:
    rows = [["fault", "sent", "processed", "lost", "duplicates", "recovery time (s)"],
            ["---", "---:", "---:", "---:", "---:", "---:"]]
    for r in results:
        windows = [w.recovery for w in r.windows]
        recovery = fmt_seconds(r.recovery)
        if len(windows) > 1 and r.recovery is not None:
            recovery = f"{recovery} (max of {len(windows)})"
        rows.append([r.fault, str(r.sent), str(r.processed), str(r.lost), str(r.duplicates),
                     recovery])
    return "\n".join("| " + " | ".join(row) + " |" for row in rows)


def details_table(results: list[FaultResult]) -> str:
    rows = [["fault", "send retries", "dead-lettered", "duration (s)", "notes"],
            ["---", "---:", "---:", "---:", "---"]]
    for r in results:
        rows.append([r.fault, str(r.send_retries), str(r.dead_lettered),
                     f"{r.duration:.0f}", "; ".join(r.notes + r.problems)])
    return "\n".join("| " + " | ".join(row) + " |" for row in rows)
