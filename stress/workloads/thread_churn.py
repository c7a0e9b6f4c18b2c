"""Thread churn: many short-lived threads, each sending one message and ending (issue 16).

A thread-per-request server (``socketserver.ThreadingMixIn``, a WSGI server's handler threads)
sends from threads that live for one request. ``RabbitmqBroker`` keeps a connection per thread
that sent, in a thread-local that its set of connections keeps alive after the thread ended: the
connections stay open until ``broker.close()``. ``KombuBroker``'s threads share its producer
connection and give their channel back to the pool when they end.

At most ``CONCURRENT`` request threads are alive at once; the main thread starts the next as one
ends. Timed: from the first thread's start to the last one's end. Then counted: failed sends,
the broker's connections and the vhost's channels still open (the broker not closed yet), and
the messages in the queue against the sends that returned (``lost``).

Bounds, so that the ``RabbitmqBroker`` case cannot stall the shared server (RabbitMQ 3.x stops
answering handshakes at its socket limit, 832 sockets with ``ulimit -n`` 1024): it runs with as
many threads as the server can spare keeping ``SOCKET_RESERVE`` sockets for other clients
(``threads_run`` says how many; skipped below ``MIN_SHARE`` of them; ``STRESS_OVER_SOCKET_LIMIT=1``
runs them all), no new thread starts after ``deadline_s``, and ``broker.close()`` plus a
force-close of the vhost's connections (:mod:`stress.broker_case`) end what it left open.
"""

from __future__ import annotations

import contextlib
import threading
import time
from typing import Any

import dramatiq

from stress import rabbit_admin
from stress.broker_case import (
    CHECK_ABOVE,
    FORCE_ENV,
    NotEnoughSockets,
    broker_case,
    forced_over_socket_limit,
)
from stress.common import fmt_rate, socket_headroom, vhost_session
from stress.polling import poll

NAME = "thread-churn"
TITLE = "Thread churn: short-lived threads sending one message each (thread-per-request server)"
COLUMNS = [
    ("threads_run", "threads"),
    ("seconds", "s"),
    ("throughput", "sends/s"),
    ("cpu_ms_per_send", "client CPU ms/send"),
    ("failed", "failed sends"),
    ("connections", "peak connections"),
    ("open_after", "connections open after"),
    ("channels_after", "channels open after"),
    ("lost", "lost"),
    ("rss_mb", "peak RSS MiB"),
]
HEADLINE = "throughput"
HIGHER_IS_BETTER = True
SETUP_LABELS = {"kombu": "KombuBroker", "rabbitmq": "RabbitmqBroker (pika)"}
FORMATS = {"seconds": lambda v: f"{v:.2f}", "throughput": fmt_rate,
           "cpu_ms_per_send": lambda v: f"{v:.2f}", "rss_mb": lambda v: f"{v:.0f}"}
AGGREGATE = {"connections": "max", "open_after": "max", "channels_after": "max",
             "failed": "sum", "lost": "sum"}

#: Request threads alive at once.
CONCURRENT = 8
#: Sockets of the server the RabbitmqBroker case leaves to other clients: its connections stay
#: open for the whole case, and the server is shared.
SOCKET_RESERVE = 300
#: A RabbitmqBroker case capped below this share of its threads is skipped.
MIN_SHARE = 0.25
#: How long the sent messages may take to show in the server's queue count.
COUNT_GRACE_S = 15.0


def cases(quick: bool) -> list[dict[str, Any]]:
    threads = 50 if quick else 1000
    deadline = 60.0 if quick else 300.0
    # "timeout" (the runner's bound on the child): the deadline, the last sends, the counting.
    return [{"setup": setup, "label": f"{threads:,} threads", "threads": threads,
             "concurrent": CONCURRENT, "deadline_s": deadline, "timeout": deadline + 60}
            for setup in ("rabbitmq", "kombu")]


def threads_to_run(case: dict[str, Any]) -> tuple[int, str | None]:
    """How many threads the case may run, and why fewer than asked (None: all of them).

    RabbitmqBroker holds a connection per thread that sent, plus the one of the main thread.
    """
    wanted = int(case["threads"])
    if (case["setup"] != "rabbitmq" or wanted + 1 <= CHECK_ABOVE
            or forced_over_socket_limit(case)):
        return wanted, None
    headroom = socket_headroom(SOCKET_RESERVE)
    if headroom is None or wanted + 1 <= headroom[0]:
        return wanted, None
    allowed = max(0, headroom[0] - 1)
    return allowed, f"capped from {wanted} to {allowed} threads: {headroom[1]}"


def session(planned: list[dict[str, Any]]) -> contextlib.AbstractContextManager[dict[str, str]]:
    """One vhost for the whole run (each case its own connection and queue names)."""
    return vhost_session("churn")


def too_few(case: dict[str, Any], threads: int, capped: str | None) -> str | None:
    """Why ``threads`` (capped from the case's) are too few for a rate that means something."""
    if threads < int(case["threads"]) * MIN_SHARE:
        return f"{capped}: fewer than {MIN_SHARE:.0%} of the threads"
    return None


def skip(case: dict[str, Any]) -> str | None:
    """Why not to run ``case`` now: the server has too few sockets to spare for it."""
    return too_few(case, *threads_to_run(case))


def notes(planned: list[dict[str, Any]]) -> list[str]:
    first = planned[0]
    return [
        f"{first['threads']:,} threads, each started, sending one message and ending, at most "
        f"{first['concurrent']} alive at once (a thread-per-request server); timed from the "
        "first start to the last end. Open after: the broker's connections (server-side, by "
        "connection name) and the vhost's channels once every thread has ended, the broker "
        "still open. lost: sends that returned against the messages in the queue. client CPU: "
        "user+system time of the case's process over the churn, per send.",
        f"RabbitmqBroker keeps a connection per thread that sent: its case runs only as many "
        f"threads as the server can spare keeping {SOCKET_RESERVE} sockets for other clients "
        "(the threads column; RabbitMQ 3.x stalls every client at its socket limit, "
        f"stress/README.md), skipped below {MIN_SHARE:.0%} of them, unless `{FORCE_ENV}=1`. "
        "Both brokers `confirm_delivery=True`.",
    ]


def row_note(runs: list[dict[str, Any]]) -> str:
    """Why a row ran fewer threads than its label says."""
    capped = [r["capped"] for r in runs if r.get("capped")]
    return f"{len(capped)} run(s) {capped[0]}" if capped else ""


def churn_request(index: int) -> None:
    """The actor the requests send to (never run: the case counts the queue's messages)."""


def _churn(actor: dramatiq.Actor[[int], None], threads: int, concurrent: int,
           deadline_s: float) -> dict[str, Any]:
    """Run ``threads`` request threads, at most ``concurrent`` alive; count what went wrong."""
    slots = threading.BoundedSemaphore(concurrent)
    lock = threading.Lock()  # guards failures and alive
    failures: list[str] = []
    ended = threading.Event()  # set while no request thread is alive
    ended.set()
    alive = [0]  # request threads started and not ended; guarded by lock

    def request(index: int) -> None:
        try:
            actor.send(index)
        except Exception as exc:  # noqa: BLE001 - a failed send is a figure
            with lock:
                failures.append(f"{type(exc).__name__}: {exc}")
        finally:
            with lock:
                alive[0] -= 1
                if not alive[0]:
                    ended.set()
            slots.release()

    started, cpu0 = time.perf_counter(), time.process_time()
    limit = started + deadline_s
    launched = 0
    for index in range(threads):
        if not slots.acquire(timeout=max(0.0, limit - time.perf_counter())):
            break
        with lock:
            alive[0] += 1
            ended.clear()
        threading.Thread(target=request, args=(index,), name=f"request-{index}",
                         daemon=True).start()
        launched += 1
    finished = ended.wait(max(0.0, limit - time.perf_counter()) + 30)
    elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu0
    with lock:
        errors = list(failures)
        still_alive = alive[0]
    if not finished:
        raise RuntimeError(f"{still_alive} request threads still sending {elapsed:.0f} s after "
                           f"the first started ({launched} of {threads} launched)")
    return {"launched": launched, "not_launched": threads - launched, "failed": len(errors),
            "errors": errors[:3], "seconds": round(elapsed, 3),
            "throughput": round(launched / elapsed, 1) if elapsed > 0 else None,
            "cpu_ms_per_send": round(1000 * cpu / launched, 3) if launched else None}


def run_case(case: dict[str, Any]) -> dict[str, Any]:
    threads, capped = threads_to_run(case)
    why = too_few(case, threads, capped)
    if why:
        raise NotEnoughSockets(why)
    result: dict[str, Any] = {"threads": int(case["threads"]), "threads_run": threads,
                              "capped": capped}
    with broker_case(case, "churn", connections_needed=2) as bc:
        queue = bc.connection_name  # the run's vhost is shared by its cases
        actor = dramatiq.actor(queue_name=queue, broker=bc.broker, max_retries=0)(churn_request)
        result.update(_churn(actor, threads, int(case["concurrent"]),
                             float(case["deadline_s"])))
        # Every request thread has ended; the broker is still open, as in a server that lives on.
        bc.sampler.sample()
        result["open_after"] = bc.count_server_connections()
        result["channels_after"] = bc.count_channels()
        delivered = result["launched"] - result["failed"]
        in_queue = poll(lambda: _messages(bc.vhost, queue), lambda n: n >= delivered,
                        COUNT_GRACE_S, 0.5)
        result["in_queue"] = in_queue
        result["lost"] = max(0, delivered - in_queue)
    result.update(bc.figures())
    return result


def _messages(vhost: str, queue: str) -> int:
    row = rabbit_admin.queue_details(vhost).get(queue)
    return int(row.get("messages") or 0) if row else 0
