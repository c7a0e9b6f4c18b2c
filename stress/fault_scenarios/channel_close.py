"""The server closes one consumer's channel while the consumers of the other queues, on the same
connection, keep running."""

from __future__ import annotations

import time

from stress.fault_scenarios.context import Context
from stress.fault_scenarios.harness import LoadedWorker
from stress.fault_scenarios.log_watch import watching
from stress.fault_scenarios.results import FaultResult
from stress.fault_scenarios.server_state import connection_ports

now = time.monotonic

#: How long after the close the other queues must have processed something (s).
OTHERS_WINDOW = 1.0


def channel_close_case(ctx: Context, queues: int = 3) -> FaultResult:
    """The server closes one consumer's channel (406 PRECONDITION_FAILED, provoked by acking
    an unknown delivery tag on it, as a double ack would) while the consumers of the other
    queues, on the same connection, keep running."""
    started = now()
    with watching(ctx) as watch:
        lw = LoadedWorker(ctx, queues=queues, watch=watch).start()
        with lw.closing_on_error():
            total = ctx.scale.messages
            lw.stream(list(range(total)))
            lw.wait_processed(total // 3)
            ports_before = connection_ports(lw.consumer_name, ctx.vhost)
            victim = lw.worker.consumers[lw.queues[0]].consumer
            window = lw.begin()
            victim.channel.basic_ack(2**40)
            lw.recover(window, queue_index=0)
            ports_after = connection_ports(lw.consumer_name, ctx.vhost)
        result = lw.finish(f"server closes one consumer channel (of {queues})")
    log = lw.ledger.log
    others = set(lw.queues[1:])
    recovered_at = window.end + (window.consumer or 0.0)
    # The closed consumer recovers within tens of ms, shorter than the gaps between a loaded
    # machine's bursts of processing: the other queues are looked at for OTHERS_WINDOW at least.
    until = max(recovered_at, window.start + OTHERS_WINDOW)
    meanwhile = sum(1 for t, _, q, _ in log if q in others and window.start <= t <= until)
    result.notes.append(f"{meanwhile} messages of the other queues processed from the close "
                        f"until {until - window.start:.2f} s after it (the closed consumer "
                        f"recovered after {recovered_at - window.start:.2f} s)")
    if meanwhile == 0:
        result.problems.append("the other consumers stopped while one channel was closed")
    for queue in others:
        keys = {key for _, _, q, key in log if q == queue}
        if len(keys) != 1:
            result.problems.append(f"the consumer of {queue} changed channel {len(keys) - 1} "
                                   "times: it was disturbed by the other channel's close")
    if ports_before != ports_after or len(ports_before) != 1:
        result.problems.append(f"the consumer connection was replaced ({ports_before} -> "
                               f"{ports_after}): only the channel should have closed")
    result.duration = now() - started
    return result
