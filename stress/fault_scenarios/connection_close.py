"""The server closes every connection of the vhost, several times, while the worker is busy."""

from __future__ import annotations

import time

from stress import rabbit_admin
from stress.fault_scenarios.context import Context
from stress.fault_scenarios.harness import LoadedWorker
from stress.fault_scenarios.log_watch import watching
from stress.fault_scenarios.results import FaultResult

now = time.monotonic


def close_all_connections_case(ctx: Context, times: int = 3) -> FaultResult:
    """``rabbitmqctl close_all_connections -p VHOST`` ``times`` times while the worker is busy."""
    started = now()
    with watching(ctx) as watch:
        lw = LoadedWorker(ctx, watch=watch).start()
        with lw.closing_on_error():
            total = ctx.scale.messages
            lw.stream(list(range(total)))
            for number in range(times):
                lw.wait_processed(total * (number + 1) // (times + 2))
                window = lw.begin()
                rabbit_admin.close_all_connections(f"reliability fault {number + 1}",
                                                   vhost=ctx.vhost)
                lw.recover(window)
        result = lw.finish(f"server closes all connections ({times}x)")
    result.duration = now() - started
    return result
