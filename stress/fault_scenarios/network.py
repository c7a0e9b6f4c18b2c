"""Network faults through a proxy: the path goes silent and comes back; every connection is
reset while many threads publish."""

from __future__ import annotations

import time

from stress.fault_scenarios.context import Context
from stress.fault_scenarios.fault_proxy import FaultProxy
from stress.fault_scenarios.harness import LoadedWorker
from stress.fault_scenarios.log_watch import watching
from stress.fault_scenarios.results import FaultResult

now = time.monotonic


def silent_network_case(ctx: Context, silence: float | None = None,
                        heartbeat: float = 2.0) -> FaultResult:
    """The network path goes silent (nothing forwarded, nothing closed) for ``silence`` seconds
    (default 4 heartbeat intervals) while the worker is busy, then comes back."""
    silence = silence if silence is not None else 4 * heartbeat
    started = now()
    with watching(ctx) as watch, FaultProxy() as proxy:
        lw = LoadedWorker(ctx, url=ctx.url_via(proxy.port), heartbeat=heartbeat,
                          connect_timeout=3, watch=watch).start()
        with lw.closing_on_error():
            total = ctx.scale.messages
            lw.stream(list(range(total)))
            lw.wait_processed(total // 3)
            window = lw.begin()
            start = window.start
            proxy.silence()
            time.sleep(silence)
            proxy.restore()
            window.end = now()
            lost_at = watch.first("AMQP connection to", since=start)
            window.detection = None if lost_at is None else lost_at - start
            detected = watch.count("lost", since=start)
            lw.recover(window)
        result = lw.finish(f"network silent for {silence:.0f} s (heartbeat {heartbeat:g} s)")
    if window.detection is None:
        result.problems.append("the lost connection was never detected")
    else:
        result.notes.append(f"loss detected after {window.detection:.1f} s "
                            f"({detected} connection(s) reported lost)")
        if window.detection > 2 * heartbeat + 2:
            result.problems.append(f"detection took {window.detection:.1f} s, more than two "
                                   f"heartbeat intervals ({2 * heartbeat:g} s) plus 2 s")
    result.duration = now() - started
    return result


def network_reset_case(ctx: Context, resets: int = 3) -> FaultResult:
    """The proxy aborts every connection (TCP RST) ``resets`` times while ``burst_senders``
    threads publish as fast as they can (and the worker consumes through the same path)."""
    started = now()
    with watching(ctx) as watch, FaultProxy() as proxy:
        lw = LoadedWorker(ctx, url=ctx.url_via(proxy.port), connect_timeout=3,
                          watch=watch).start()
        with lw.closing_on_error():
            total = ctx.scale.messages
            senders = lw.stream(list(range(total)), threads=ctx.scale.burst_senders, rate=None)
            for number in range(resets):
                target = total * (number + 1) // (resets + 1)
                while senders.issued < target and not senders.stopped.is_set():
                    time.sleep(0.002)
                window = lw.begin()
                proxy.reset()
                lw.recover(window)
        result = lw.finish(f"network reset mid-publish ({resets}x, "
                           f"{ctx.scale.burst_senders} sending threads)")
    result.duration = now() - started
    return result
