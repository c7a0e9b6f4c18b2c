"""``sendmsg`` calls per message of KombuBroker under ``dramatiq-gevent``, source trees compared.

    python -m stress.gevent_writes [--greenlets N] [--messages M] [--rounds R] SRC [SRC ...]

Runs the kombu case of ``stress/workloads/gevent_send_next.py`` (one worker process, N
greenlets, send-the-next with confirms) once per round for each ``SRC`` (a directory holding
``kombu_pyamqp_threadsafe``, put first on the worker's ``PYTHONPATH``: this tree's ``src`` and
an older one exported with ``git archive``, say), alternated and rotated from round to round,
and prints one JSON line per run: msg/s, worker CPU per message, and the calls of every
``FrameWriter``'s ``sendmsg`` in the worker per message processed.

The worker counts them itself: this module is also its actor module. Imported by the CLI, it
wraps the ``sendmsg`` of every writer made afterwards, writes its counts to
``$GEVENT_WRITES_OUT/<pid>.json`` twice a second, and then imports ``stress.actors``.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

#: Where a worker process importing this module writes its counts (set by the driver).
OUT_VARIABLE = "GEVENT_WRITES_OUT"


def _count_writes(out: str) -> None:
    """In the worker: count every writer's sendmsg calls and the methods it queued."""
    from kombu_pyamqp_threadsafe import frames

    writers: list[dict[str, Any]] = []
    made = frames.FrameWriter.__init__

    def init(self: Any, connection: Any, transport: Any) -> None:
        made(self, connection, transport)
        counts = {"calls": 0, "writer": self}
        writers.append(counts)
        sendmsg = self._sendmsg
        if sendmsg is not None:
            def counting(buffers: Any, *args: Any) -> int:
                counts["calls"] += 1
                return int(sendmsg(buffers, *args))

            self._sendmsg = counting

    frames.FrameWriter.__init__ = init  # type: ignore[method-assign]
    path = Path(out) / f"{os.getpid()}.json"

    def dump() -> None:
        while True:
            time.sleep(0.5)
            data = [{"calls": w["calls"], "methods": sum(w["writer"].sent.values())}
                    for w in writers]
            path.with_suffix(".tmp").write_text(json.dumps(data))
            path.with_suffix(".tmp").replace(path)

    threading.Thread(target=dump, name="gevent-writes-dump", daemon=True).start()


def _run(src: str, greenlets: int, messages: int) -> dict[str, Any]:
    """One kombu case with ``src`` first on the worker's path; its figures and counts."""
    from stress.workloads import gevent_send_next as workload

    cli_workers = workload.CliWorkers
    with tempfile.TemporaryDirectory(prefix="gevent-writes-") as out:
        saved = {key: os.environ.get(key) for key in ("PYTHONPATH", OUT_VARIABLE)}
        os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [src, saved["PYTHONPATH"]]))
        os.environ[OUT_VARIABLE] = out
        workload.CliWorkers = lambda module, **kwargs: cli_workers("stress.gevent_writes", **kwargs)
        try:
            load = os.getloadavg()
            result = workload.run_case({"setup": "kombu", "greenlets": greenlets,
                                        "messages": messages})
        finally:
            workload.CliWorkers = cli_workers
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
        counts = [entry for path in Path(out).glob("*.json")
                  for entry in json.loads(path.read_text())]
    calls = sum(entry["calls"] for entry in counts)
    return {"src": src, "load": [round(x, 2) for x in load],
            "msg_s": round(result["throughput"] or 0),
            "cpu_us_per_msg": round(result["cpu_us_per_msg"] or 0),
            "sendmsg": calls, "methods": sum(entry["methods"] for entry in counts),
            "sendmsg_per_msg": round(calls / messages, 3), "lost": result["lost"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--greenlets", type=int, default=500)
    parser.add_argument("--messages", type=int, default=8000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("src", nargs="+")
    args = parser.parse_args()
    for round_ in range(args.rounds):
        turn = round_ % len(args.src)
        for src in args.src[turn:] + args.src[:turn]:
            try:
                line = {"round": round_, **_run(src, args.greenlets, args.messages)}
            except Exception as exc:  # noqa: BLE001 - reported, and the next run goes on
                line = {"round": round_, "src": src, "error": repr(exc)[:300]}
            print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
else:
    _out = os.environ.get(OUT_VARIABLE)
    if _out:  # imported as the CLI's actor module
        _count_writes(_out)
        from stress.actors import *  # noqa: F403 - the actors the worker runs
