"""Actor module for ``python -m stress.run --cli``: run under the real dramatiq CLI.

    dramatiq stress.actors --processes P --threads T -Q <STRESS_QUEUE>

The broker is built from environment variables (set by ``stress.run``):

- ``STRESS_BROKER``: ``kombu`` (KombuBroker, default) or ``rabbitmq`` (dramatiq's RabbitmqBroker)
- ``STRESS_URL``: AMQP URL, including the dedicated vhost
- ``STRESS_CONNECTION_NAME``: connection name given to the broker
- ``STRESS_QUEUE``: the queue of the hop actor
- ``STRESS_RESULTS_QUEUE``: where every processed id is reported (one message per hop, sent
  through the same broker, so a worker process still holds only its own connections)
- ``STRESS_DEADLINE``: wall-clock time after which no successor is sent (empty: none)
- ``STRESS_DELAY_EVERY``, ``STRESS_DELAY_MS``: send every Nth successor with that delay

Pass ``-Q STRESS_QUEUE`` so that the workers do not consume the results queue themselves.
"""

from __future__ import annotations

import json
import os
import time

import dramatiq
from dramatiq import Message

from stress import rabbit_admin
from stress.workload import SEND_ATTEMPTS, define_hop_actor, logger, make_broker

RESULT_ACTOR = "stress_result"

_env = os.environ
QUEUE = _env.get("STRESS_QUEUE", "stress")
RESULTS_QUEUE = _env.get("STRESS_RESULTS_QUEUE", "stress-results")
_deadline_text = _env.get("STRESS_DEADLINE", "")
DEADLINE = float(_deadline_text) if _deadline_text else None

broker = make_broker(
    _env.get("STRESS_BROKER", "kombu"),
    _env.get("STRESS_URL") or rabbit_admin.amqp_url(),
    _env.get("STRESS_CONNECTION_NAME", "stress-cli"),
)
dramatiq.set_broker(broker)


def _record(mid: int, latency: float, at: float, successor: int | None,
            error: str | None) -> None:
    """Report one processed message (and its successor) to the parent via the results queue."""
    payload = {"id": mid, "lat": latency, "at": at, "next": successor, "err": error,
               "pid": os.getpid()}
    message = Message(queue_name=RESULTS_QUEUE, actor_name=RESULT_ACTOR,
                      args=(json.dumps(payload),), kwargs={}, options={})
    for attempt in range(SEND_ATTEMPTS):
        try:
            broker.enqueue(message)
            return
        except Exception as exc:  # noqa: BLE001 - logged; the parent counts the id as lost
            logger.error("could not report %s (attempt %d): %s", mid, attempt + 1, exc)
            time.sleep(0.2 * (attempt + 1))


hop = define_hop_actor(broker, QUEUE, _record, lambda: DEADLINE,
                       delay_every=int(_env.get("STRESS_DELAY_EVERY") or 0),
                       delay_ms=int(_env.get("STRESS_DELAY_MS") or 0))
