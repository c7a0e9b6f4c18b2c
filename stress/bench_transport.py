"""Publish throughput and latency, one shared KombuConnection against a connection per thread:
the command line of the ``bench_transport`` workload (stress/workloads/transport.py says what
each case does).

Confirms off and on, at 1, 10, 100 and 900 threads; every case in a fresh process, the two
variants interleaved, the set repeated; medians in ``stress/results/bench_transport.md`` (with
``--tls``: ``bench_transport_tls.md``), raw runs in the ``.json`` beside it. ``--quick`` is a
smoke run whose report goes to ``stress/results/quick/``.

    python -m stress.bench_transport [--repeat 3] [--threads 1,10,100,900] [--messages N]
    python -m stress.bench_transport --tls [...]
"""

from __future__ import annotations

import argparse
import sys

from stress import runner
from stress.common import choice_list, int_list
from stress.workloads import transport

MODULE = "stress.bench_transport"


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=f"python -m {MODULE}", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int_list, default=None,
                        help="comma-separated thread counts (default 1,10,100,900; quick 1,10)")
    parser.add_argument("--repeat", type=int, default=None, help="repeats (default 3; quick 1)")
    parser.add_argument("--quick", action="store_true", help="smoke run: small cases, one repeat")
    parser.add_argument("--messages", type=int, default=None,
                        help="messages per case without confirms (default 40000)")
    parser.add_argument("--messages-confirm", type=int, default=None,
                        help="messages per case with confirms (default 10000)")
    parser.add_argument("--body-size", type=int, default=128, help="body bytes (default 128)")
    parser.add_argument("--persistent", action="store_true",
                        help="delivery_mode 2 (default: transient, to measure the client)")
    parser.add_argument("--confirm", choices=["both", "on", "off"], default="both")
    parser.add_argument("--variants", default=("shared", "plain"),
                        type=lambda text: choice_list(text, transport.SETUP_LABELS, "--variants"),
                        help="comma-separated subset of shared,plain")
    parser.add_argument("--timeout", type=float, default=180, help="seconds per case (default 180)")
    parser.add_argument("--setup-timeout", type=float, default=60,
                        help="seconds to open connections/channels in a case (default 60)")
    parser.add_argument("--force-over-socket-limit", dest="force", action="store_true",
                        help="run plain cases even when they exceed the server's spare sockets")
    parser.add_argument("--tls", action="store_true",
                        help="amqps:// through a local socat TLS endpoint")
    parser.add_argument("--output", help="markdown output file (default bench_transport.md, "
                        "with --tls bench_transport_tls.md, in stress/results)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    return runner.run_options(transport, args, command=" ".join(["python -m", MODULE, *argv]),
                              name=f"{transport.NAME}_tls" if args.tls else None,
                              title=transport.TITLE + (" over TLS" if args.tls else ""))


if __name__ == "__main__":
    sys.exit(main())
