"""KombuBroker side by side with dramatiq's RabbitmqBroker: the command line of the ``bench``
workload (stress/workloads/brokers.py says what each case does).

Enqueue from 1, 8 and 64 threads, a worker draining 5000 preloaded messages with 8 and 64
threads, "send the next" with 8, 50, 300 and 900 worker threads; every case in a fresh process,
the brokers interleaved, the set repeated (``--repeat``); medians and min–max in
``stress/results/bench.md`` (raw runs in ``bench.json``), plots in ``bench-throughput.png``,
``bench-connections.png``, ``bench-p99.png``. ``--quick`` is a smoke run whose report goes to
``stress/results/quick/``.

    python -m stress.bench [--repeat 3] [--quick] [--duration 15] [--brokers kombu,rabbitmq]
    python -m stress.bench --cluster     # on the local 3-node cluster (stress/cluster_faults.py):
                                         # KombuBroker on quorum and on classic queues,
                                         # RabbitmqBroker on classic; writes bench-cluster.md
"""

from __future__ import annotations

import argparse
import sys

from stress import runner
from stress.cluster_faults import cluster_bench_defaults
from stress.common import choice_list, int_list
from stress.workloads import brokers

MODULE = "stress.bench"


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=f"python -m {MODULE}", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=None, help="repeats (default 3; quick 1)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: few threads, short cases, one repeat (< 1 min)")
    parser.add_argument("--brokers", default=None,
                        help="comma-separated subset of kombu,rabbitmq (--cluster: and "
                             "kombu-quorum; default all)")
    parser.add_argument("--cluster", action="store_true",
                        help="run on the local 3-node cluster (started if needed): "
                             "send-the-next at 50 and 300 threads, enqueue at 64")
    parser.add_argument("--enqueue-threads", type=int_list, default=None,
                        help="default 1,8,64")
    parser.add_argument("--enqueue-messages", type=int, default=None, help="default 3000")
    parser.add_argument("--drain-threads", type=int_list, default=None, help="default 8,64")
    parser.add_argument("--drain-messages", type=int, default=None, help="default 5000")
    parser.add_argument("--chain-threads", type=int_list, default=None,
                        help="default 8,50,300,900")
    parser.add_argument("--duration", type=float, default=None,
                        help="seconds per send-the-next case (default 15)")
    parser.add_argument("--workloads", default="enqueue,drain,chain",
                        help="comma-separated subset of enqueue,drain,chain")
    parser.add_argument("--force-over-socket-limit", dest="force", action="store_true",
                        help="run cases even when they exceed the server's spare sockets")
    parser.add_argument("--output", default=None, help="markdown output file (default "
                        "stress/results/bench.md; --cluster: bench-cluster.md)")
    args = parser.parse_args(argv)
    if args.cluster:
        cluster_bench_defaults(args)
    try:
        args.brokers = choice_list(args.brokers or "kombu,rabbitmq", brokers.SETUP_LABELS,
                                   "--brokers")
        args.workloads = choice_list(args.workloads, brokers.SERIES, "--workloads")
    except argparse.ArgumentTypeError as exc:
        parser.error(str(exc))
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    return runner.run_options(brokers, parse_args(argv),
                              command=" ".join(["python -m", MODULE, *argv]))


if __name__ == "__main__":
    sys.exit(main())
