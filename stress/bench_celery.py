"""Celery publishers, kombu's ``amqp`` transport against the thread-safe one: the command line of
the ``bench_celery`` workload (stress/workloads/celery_publish.py says what each case does).

Every case in a fresh process, in a vhost of the run's own, the two setups interleaved; medians
of the repeats in ``stress/results/bench_celery.md`` (raw runs in ``bench_celery.json``; with
``--latency-ms``, ``bench_celery_latency.md`` and ``.json``).
``--quick`` is a smoke run whose report goes to ``stress/results/quick/``. ``--latency-ms``
puts a TCP proxy between the client and RabbitMQ that delays each direction by that many ms,
a case per delay (a network's round trips; by default the client talks to RabbitMQ directly).

    python -m stress.bench_celery [--threads 1,8,50,200] [--seconds 3] [--repeats 3]
        [--latency-ms 0,1,5] [--output PATH] [--quick]
"""

from __future__ import annotations

import argparse
import sys

from stress import runner
from stress.common import float_list, int_list
from stress.workloads import celery_publish

MODULE = "stress.bench_celery"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog=f"python -m {MODULE}", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int_list, default=None,
                        help="comma-separated thread counts (default 1,8,50,200; quick 1,8)")
    parser.add_argument("--seconds", type=float, default=None,
                        help="seconds of publishing per case (default 3; quick 1)")
    parser.add_argument("--repeats", "--repeat", dest="repeat", type=int, default=None,
                        help="repeats (default 3; quick 1)")
    parser.add_argument("--latency-ms", type=float_list, default=None,
                        help="comma-separated one-way delays in ms added in each direction by "
                             "a proxy, a case per delay (default: no proxy)")
    parser.add_argument("--output", default=None,
                        help="markdown output file (default bench_celery.md, with --latency-ms "
                             "bench_celery_latency.md, in stress/results)")
    parser.add_argument("--quick", action="store_true", help="smoke run: small cases, one repeat")
    args = parser.parse_args(argv)
    latency = args.latency_ms is not None
    return runner.run_options(celery_publish, args,
                              command=" ".join(["python -m", MODULE, *argv]),
                              name=f"{celery_publish.NAME}_latency" if latency else None,
                              title=celery_publish.TITLE + (", network delay" if latency else ""))


if __name__ == "__main__":
    sys.exit(main())
