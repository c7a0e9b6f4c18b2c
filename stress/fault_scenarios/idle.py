"""A worker left idle keeps its two connections and consumes at once afterwards."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from stress.fault_scenarios.context import Context
from stress.fault_scenarios.harness import LoadedWorker
from stress.fault_scenarios.log_watch import watching
from stress.fault_scenarios.server_state import connections_by_name, wait_one_connection_each

now = time.monotonic


@dataclass
class IdleResult:
    seconds: float
    heartbeat: float
    ports_before: dict[str, list[int]]
    ports_after: dict[str, list[int]]
    server_heartbeat: list[Any]
    lost_warnings: int
    latency_after: float | None
    send_after: float

    @property
    def problems(self) -> list[str]:
        problems = []
        if self.ports_after != self.ports_before:
            problems.append(f"connections changed while idle: {self.ports_before} -> "
                            f"{self.ports_after}")
        if any(len(p) != 1 for p in self.ports_after.values()):
            problems.append(f"expected one connection of each kind: {self.ports_after}")
        if self.lost_warnings:
            problems.append(f"{self.lost_warnings} 'connection lost' warnings while idle")
        if self.latency_after is None:
            problems.append("the message sent after the idle period was not processed")
        return problems


def idle_case(ctx: Context, seconds: float, heartbeat: float | None = None,
              progress: Callable[[str], None] | None = None) -> IdleResult:
    """A worker stays idle for ``seconds``: it must still hold the same two connections (no
    reconnect), and a message sent afterwards must be processed at once."""
    with watching(ctx) as watch:
        lw = LoadedWorker(ctx, heartbeat=heartbeat, threads=8, watch=watch).start()
        try:
            lw.probe()
            lw.wait_processed(1, 30)
            names = [lw.consumer_name, lw.producer_name]
            listing = wait_one_connection_each(ctx.vhost, names)
            before = {n: sorted(r["peer_port"] for r in listing.get(n, [])) for n in names}
            server_heartbeat = [r.get("timeout") for n in names for r in listing.get(n, [])]
            idle_start = now()
            deadline = idle_start + seconds
            while now() < deadline:
                time.sleep(min(30.0, max(0.0, deadline - now())))
                if progress is not None and now() < deadline:
                    progress(f"idle for {now() - idle_start:.0f} of {seconds:.0f} s")
            listing = connections_by_name(ctx.vhost)
            after = {n: sorted(r["peer_port"] for r in listing.get(n, [])) for n in names}
            lost = watch.count("lost", since=idle_start) + watch.count(
                "connection error", since=idle_start)
            t0 = now()
            lw.probe(timeout=30)
            send_after = now() - t0
            ok = lw.ledger.wait_processed(2, 10)
            latency = now() - t0 if ok else None
        finally:
            lw.close()
    return IdleResult(seconds, heartbeat if heartbeat is not None else 60, before, after,
                      server_heartbeat, lost, latency, send_after)
