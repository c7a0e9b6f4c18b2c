"""Many queues consumed at once: one dramatiq Worker on N queues (issue 16).

A dramatiq Worker runs a consumer thread for every queue it consumes and one for the queue's
delay queue (``q`` and ``q.DQ``), whatever ``worker_threads`` is: N queues are 2N consumers.
``RabbitmqBroker`` opens a connection for each of them (and one per thread that sends);
``KombuBroker`` gives each consumer a channel of its one consumer connection.

One actor per queue; the case sends ``messages`` spread evenly over the queues from the main
thread (untimed: it declares the queues, so RabbitmqBroker's consumer threads open no connection
of their own to declare them), then times a Worker from ``start()`` to the last message processed,
consumer start-up included. Every message carries an id: lost and duplicated ones are counted.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any

import dramatiq

from stress.broker_case import BrokerCase, broker_case, socket_shortage
from stress.common import fmt_rate, vhost_session
from stress.polling import poll
from stress.workload import Tracker

NAME = "many-queues"
TITLE = "Many queues consumed at once (a dramatiq Worker on N queues, 2 consumers each)"
COLUMNS = [
    ("seconds", "s to process all"),
    ("throughput", "msg/s"),
    ("cpu_ms_per_msg", "client CPU ms/msg"),
    ("consumers", "consumers"),
    ("connections", "peak connections"),
    ("server_connections", "server-side connections"),
    ("open_after_close", "left open after close"),
    ("lost", "lost"),
    ("duplicated", "duplicated"),
    ("send_failures", "failed sends"),
    ("rss_mb", "peak RSS MiB"),
]
HEADLINE = "seconds"
HIGHER_IS_BETTER = False
SETUP_LABELS = {"kombu": "KombuBroker", "rabbitmq": "RabbitmqBroker (pika)"}
FORMATS = {"seconds": lambda v: f"{v:.2f}", "throughput": fmt_rate,
           "cpu_ms_per_msg": lambda v: f"{v:.2f}", "rss_mb": lambda v: f"{v:.0f}"}
AGGREGATE = {"connections": "max", "server_connections": "max", "open_after_close": "max",
             "lost": "sum", "duplicated": "sum", "send_failures": "sum"}

#: dramatiq's default; the threads that process, not the consumers.
WORKER_THREADS = 8
#: worker_timeout (ms) of the Worker: how long a stopping consumer waits for its next message.
WORKER_TIMEOUT_MS = 100
#: How long the delay queues' consumers may take to connect after the last message processed.
ALL_UP_TIMEOUT_S = 30.0
#: Bound on the processing of one case.
PROCESS_TIMEOUT_S = {True: 60.0, False: 300.0}


def cases(quick: bool) -> list[dict[str, Any]]:
    queues, messages = (10, 200) if quick else (200, 4000)
    return [{"setup": setup, "label": f"{queues} queues", "queues": queues, "messages": messages,
             "worker_threads": WORKER_THREADS, "timeout": PROCESS_TIMEOUT_S[quick]}
            for setup in ("rabbitmq", "kombu")]


def connections_needed(case: dict[str, Any]) -> int:
    """RabbitmqBroker: one per consumer and the sending main thread; KombuBroker: two."""
    return 2 * case["queues"] + 1 if case["setup"] == "rabbitmq" else 2


def session(planned: list[dict[str, Any]]) -> contextlib.AbstractContextManager[dict[str, str]]:
    """One vhost for the whole run (each case its own connection and queue names)."""
    return vhost_session("mq")


def skip(case: dict[str, Any]) -> str | None:
    """Why not to run ``case`` now: the server cannot spare its connections."""
    return socket_shortage(connections_needed(case), case)


def notes(planned: list[dict[str, Any]]) -> list[str]:
    first = planned[0]
    return [
        f"{first['messages']:,} messages spread evenly over {first['queues']} queues, one actor "
        "per queue, sent from the main thread before the clock starts; then a "
        f"`dramatiq.Worker(worker_threads={first['worker_threads']})` is timed from `start()` "
        "to the last message processed (consumer start-up included). dramatiq consumes each "
        "queue and its delay queue: 2 consumers a queue.",
        "client CPU: user+system time of the case's process while the Worker processed, per "
        "message (steadier than wall time on a loaded machine). peak connections: TCP "
        "connections of the case's process to the AMQP port (psutil); server-side: the "
        "broker's connections by connection name (rabbitmqctl) once every consumer is up; "
        "left open: still listed 10 s after `broker.close()` (then force-closed). Both brokers "
        "`confirm_delivery=True`. A case needing more connections than the server can spare "
        "is skipped (stress/README.md, RabbitMQ's socket limit).",
    ]


def run_case(case: dict[str, Any]) -> dict[str, Any]:
    queues, total = int(case["queues"]), int(case["messages"])
    if queues < 1 or total < queues:
        raise ValueError(f"many-queues needs 1 <= queues <= messages, got {queues} and {total}")
    tracker = Tracker()
    result: dict[str, Any] = {"queues": queues, "consumers": 2 * queues, "messages": total}

    def mq_handle(mid: int) -> None:
        tracker.processed(mid, None, time.time())

    needed = connections_needed(case)
    with broker_case(case, "mq", connections_needed=needed) as bc:
        # The run's vhost is shared by its cases: queue names of this case's own.
        actors = [dramatiq.actor(actor_name=f"mq_handle_{k}",
                                 queue_name=f"{bc.connection_name}-{k}",
                                 broker=bc.broker, max_retries=0)(mq_handle)
                  for k in range(queues)]
        sent0 = time.perf_counter()
        for mid in range(total):
            try:
                actors[mid % queues].send(mid)
            except Exception as exc:  # noqa: BLE001 - counted as a failed send
                tracker.send_failed(mid, f"{type(exc).__name__}: {exc}")
            else:
                tracker.sent(mid)
        result["send_s"] = round(time.perf_counter() - sent0, 3)
        sent = tracker.n_sent
        worker = dramatiq.Worker(bc.broker, worker_threads=int(case["worker_threads"]),
                                 worker_timeout=WORKER_TIMEOUT_MS)
        started, cpu0 = time.perf_counter(), time.process_time()
        worker.start()
        try:
            processed = poll(lambda: tracker.n_processed, lambda n: n >= sent,
                             float(case["timeout"]), 0.01)
            elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu0
            # A queue's consumer is up once its messages were processed; a delay queue's has
            # nothing to process: wait (bounded) for every connection, then count on the server.
            result["connections_all_up"] = poll(lambda: _sample_sockets(bc), lambda n: n >= needed,
                                                ALL_UP_TIMEOUT_S, 0.1)
            result["server_connections_all_up"] = bc.count_server_connections()
        finally:
            stop0 = time.perf_counter()
            worker.stop(timeout=30_000)
            result["stop_s"] = round(time.perf_counter() - stop0, 3)
    result.update(bc.figures())
    comparison = tracker.comparison()
    result.update({key: comparison[key] for key in
                   ("sent", "processed", "lost", "duplicated", "unexpected", "send_failures",
                    "send_errors")})
    result["seconds"] = round(elapsed, 3)
    result["throughput"] = round(processed / elapsed, 1) if elapsed > 0 else None
    result["cpu_ms_per_msg"] = round(1000 * cpu / processed, 3) if processed else None
    if processed < sent:
        raise RuntimeError(f"processed {processed} of {sent} messages in {elapsed:.1f} s: {result}")
    return result


def _sample_sockets(bc: BrokerCase) -> int:
    bc.sampler.sample()
    return bc.sampler.sockets
