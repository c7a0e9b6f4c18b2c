"""Resource hygiene: one worker through many faults in turn; threads, descriptors, server
connections and channels at rest before and after."""

from __future__ import annotations

import gc
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from stress import rabbit_admin
from stress.fault_scenarios.context import Context
from stress.fault_scenarios.fault_proxy import FaultProxy
from stress.fault_scenarios.harness import LoadedWorker
from stress.fault_scenarios.log_watch import watching
from stress.fault_scenarios.results import FaultResult, fmt_seconds
from stress.fault_scenarios.server_state import wait_one_connection_each, wait_queues_empty
from stress.polling import poll
from stress.resources import descriptor_kinds, open_fds


@dataclass
class Resources:
    threads: int
    fds: int
    connections: dict[str, int]
    channels: dict[str, int]
    #: Open descriptors by kind: "socket", "eventfd" (a thread's wake-up), "other".
    kinds: Counter[str] = field(default_factory=Counter)

    def row(self) -> list[str]:
        kinds = ", ".join(f"{k} {v}" for k, v in sorted(self.kinds.items()))
        return [str(self.threads), f"{self.fds} ({kinds})" if kinds else str(self.fds),
                ", ".join(f"{k.rsplit('-', 1)[1]}={v}" for k, v in self.connections.items()),
                ", ".join(f"{k.rsplit('-', 1)[1]}={v}" for k, v in self.channels.items())]


@dataclass
class HygieneResult:
    loops: int
    before: Resources
    after: Resources
    faults: Counter[str]
    result: FaultResult
    #: Threads that may publish at the same time (senders and the probe).
    publishers: int = 0

    @property
    def problems(self) -> list[str]:
        problems = list(self.result.problems)
        if self.result.lost:
            problems.append(f"{self.result.lost} messages lost")
        if self.after.threads > self.before.threads:
            problems.append(f"threads {self.before.threads} -> {self.after.threads}")
        if self.after.fds > self.before.fds:
            # A thread's wake-up descriptor lives as long as the thread or the last channel it
            # owned: each idle channel of the producer's pool may keep the one of the (ended)
            # sender thread that used it last. Sockets and anything else must not grow.
            wakeups = self.after.kinds["eventfd"] - self.before.kinds["eventfd"]
            rest = (self.after.fds - self.after.kinds["eventfd"]) - (
                self.before.fds - self.before.kinds["eventfd"])
            pool = sum(v for k, v in self.after.channels.items() if k.endswith("-producer"))
            if rest > 0 or wakeups > pool:
                problems.append(f"file descriptors {self.before.fds} -> {self.after.fds} "
                                f"({self.before.kinds} -> {self.after.kinds})")
        if self.after.connections != self.before.connections:
            problems.append(f"connections {self.before.connections} -> "
                            f"{self.after.connections}")
        for key, before in self.before.channels.items():
            after = self.after.channels.get(key, 0)
            if key.endswith("-consumer") and after != before:
                problems.append(f"consumer channels {before} -> {after}")
            # The producer's pool holds one channel per thread that published at the same
            # time since the last reconnect: bounded by the publishers, never growing.
            if key.endswith("-producer") and after > max(before, self.publishers):
                problems.append(f"producer channels {before} -> {after} "
                                f"({self.publishers} publishing threads)")
        return problems

    def table(self) -> str:
        rows = [["", "threads", "file descriptors", "server connections", "server channels"],
                ["---", "---:", "---:", "---", "---"],
                ["before", *self.before.row()], [f"after {self.loops} faults", *self.after.row()]]
        return "\n".join("| " + " | ".join(row) + " |" for row in rows)


def _settle(measure: Callable[[], int], limit: int, timeout: float = 10.0) -> int:
    def collected() -> int:
        gc.collect()
        return measure()

    return poll(collected, lambda value: value <= limit, timeout, 0.1)


def fault_loop(ctx: Context, loops: int, heartbeat: float = 2.0,
               progress: Callable[[str], None] | None = None) -> HygieneResult:
    """One worker (through a FaultProxy, two queues) goes through ``loops`` faults in turn:
    close all connections, reset the network, close one consumer's channel, silence the
    network for three heartbeat intervals. Threads, file descriptors, server connections
    and channels are measured at rest (after ``gc.collect()``) after a warm-up fault and
    again after the loops."""
    faults: Counter[str] = Counter()
    with watching(ctx) as watch, FaultProxy() as proxy:
        lw = LoadedWorker(ctx, url=ctx.url_via(proxy.port), queues=2, heartbeat=heartbeat,
                          connect_timeout=3, watch=watch).start()
        next_id = 0

        def burst(count: int) -> None:
            nonlocal next_id
            ids = list(range(next_id, next_id + count))
            next_id += count
            senders = lw.stream(ids, rate=None)
            if not senders.join(ctx.scale.timeout):
                raise AssertionError("senders hung")

        def inject(kind: str) -> None:
            window = lw.begin()
            if kind == "close-all":
                rabbit_admin.close_all_connections("reliability loop", vhost=ctx.vhost)
            elif kind == "network-reset":
                proxy.reset()
            elif kind == "channel-close":
                lw.worker.consumers[lw.queues[1]].consumer.channel.basic_ack(2**40)
            else:
                proxy.silence()
                time.sleep(3 * heartbeat)
                proxy.restore()
            lw.recover(window, queue_index=1 if kind == "channel-close" else None, timeout=60)
            faults[kind] += 1

        def at_rest() -> Resources:
            if not lw.ledger.wait_all_sent_processed(ctx.scale.timeout):
                raise AssertionError("messages were not processed")
            names = [q for queue in lw.queues for q in (queue, f"{queue}.DQ")]
            wait_queues_empty(ctx.vhost, names, 60)
            names = [lw.consumer_name, lw.producer_name]
            listing = wait_one_connection_each(ctx.vhost, names)
            connections = {n: len(listing.get(n, [])) for n in names}
            channels = {n: sum(int(row.get("channels") or 0) for row in listing.get(n, []))
                        for n in names}
            # Objects of failed connections (and ended sender threads) that sit in reference
            # cycles are the cyclic GC's to free; what is still open after it is a leak.
            gc.collect()
            return Resources(threading.active_count(), open_fds(), connections, channels,
                             descriptor_kinds())

        kinds = ["close-all", "network-reset", "channel-close", "silent-network"]
        with lw.closing_on_error():
            burst(100)
            inject("close-all")  # warm-up: the reconnect path has run once
            burst(100)
            before = at_rest()
            for number in range(loops):
                kind = kinds[number % len(kinds)]
                processed = lw.ledger.processed
                senders = lw.stream(list(range(next_id, next_id + 200)), rate=400)
                next_id += 200
                lw.wait_processed(processed + 20)
                inject(kind)
                senders.join(ctx.scale.timeout)
                if progress is not None:
                    progress(f"loop {number + 1}/{loops}: {kind}, recovered in "
                             f"{fmt_seconds(lw.windows[-1].recovery)} s")
            burst(100)
            time.sleep(1.0)
            after = at_rest()
            # Threads and sockets of failed connections end asynchronously.
            after.threads = _settle(threading.active_count, before.threads)
            after.fds = _settle(open_fds, before.fds)
            after.kinds = descriptor_kinds()
        result = lw.finish(f"fault loop ({loops}x)")
    return HygieneResult(loops, before, after, faults, result, ctx.scale.senders + 1)
