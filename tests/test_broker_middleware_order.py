"""``before_enqueue`` runs before the message is encoded, as in RabbitmqBroker.

A middleware that writes into ``message.options`` there (trace ids, tenant tags,
``broker_priority``) changes what is sent: the worker, a raw get from the queue and the AMQP
priority all see it, for immediate and delayed sends. RabbitmqBroker emits the hook once per
publish attempt, and so does KombuBroker. dramatiq's own middleware write their options before
``enqueue`` (Retries in after_process_message, pipelines at composition time) and none uses
``before_enqueue`` (dramatiq 2.2.1); their options get through too.
"""

from __future__ import annotations

import json
import threading

import dramatiq
from dramatiq.middleware import CurrentMessage, Middleware

from broker_helpers import Recorder, raw_channel, unique, wait_until
from transport_helpers import provoke_server_close


class Tagging(Middleware):
    """Writes a tag and a priority into each message at before_enqueue; counts the calls."""

    def __init__(self, priority: int | None = None) -> None:
        self.priority = priority
        self.calls = 0
        self.lock = threading.Lock()  # guards calls
        self.fail_next_publish = None  # set by a test: a callable run once at before_enqueue

    def before_enqueue(self, broker, message, delay):
        with self.lock:
            self.calls += 1
            calls = self.calls
        message.options["trace_id"] = f"trace-{message.message_id}"
        message.options["attempt"] = calls
        if self.priority is not None:
            message.options["broker_priority"] = self.priority
        hook, self.fail_next_publish = self.fail_next_publish, None
        if hook is not None:
            hook()


def _raw_get(amqp_url: str, queue: str):
    with raw_channel(amqp_url) as channel:
        return wait_until(lambda: channel.basic_get(queue, no_ack=True), timeout=10)


def test_options_written_at_before_enqueue_are_sent(env, amqp_url):
    broker = env.broker(max_priority=10)
    tagging = Tagging(priority=7)
    broker.add_middleware(tagging)
    queue = unique()

    @dramatiq.actor(broker=broker, queue_name=queue)
    def task():
        pass

    sent = task.send()
    assert sent.options["trace_id"] == f"trace-{sent.message_id}"  # what enqueue returns
    delivery = _raw_get(amqp_url, queue)
    assert delivery is not None
    assert json.loads(delivery.body)["options"]["trace_id"] == f"trace-{sent.message_id}"
    assert delivery.properties["priority"] == 7  # broker_priority set in the hook is used

    delayed = task.send_with_options(delay=10)
    delivery = _raw_get(amqp_url, f"{queue}.DQ")
    options = json.loads(delivery.body)["options"]
    assert options["trace_id"] == f"trace-{delayed.message_id}"
    assert "eta" in options  # the hook saw the delayed copy, and the eta was kept


def test_worker_sees_options_written_at_before_enqueue(env):
    broker = env.broker()
    broker.add_middleware(Tagging())
    broker.add_middleware(CurrentMessage())
    queue = unique()
    seen = Recorder()

    @dramatiq.actor(broker=broker, queue_name=queue)
    def task():
        message = CurrentMessage.get_current_message()
        seen.add((message.message_id, message.options.get("trace_id")))

    env.worker(broker, threads=2)
    sent = [task.send() for _ in range(3)]
    assert seen.wait(3, timeout=20), seen.snapshot()
    assert sorted(seen.snapshot()) == sorted((m.message_id, f"trace-{m.message_id}")
                                             for m in sent)


def test_before_enqueue_runs_again_for_each_publish_attempt(env, amqp_url):
    """As RabbitmqBroker: the hook runs once per attempt, and the retried publish sends what
    the last run wrote."""
    broker = env.broker()
    tagging = Tagging()
    broker.add_middleware(tagging)
    queue = unique()

    @dramatiq.actor(broker=broker, queue_name=queue)
    def task():
        pass

    task.send()  # opens the producer connection
    # The server closes the connection before it reads the publish that follows.
    tagging.fail_next_publish = lambda: provoke_server_close(broker.producer_connection)
    sent = task.send()
    assert sent.options["attempt"] >= 3  # first send, then at least two attempts of this one
    with raw_channel(amqp_url) as channel:
        bodies = []
        while (delivery := channel.basic_get(queue, no_ack=True)) is not None:
            bodies.append(json.loads(delivery.body))
    ours = [body["options"]["attempt"] for body in bodies if body["message_id"] == sent.message_id]
    # The retry sent what the last run of the hook wrote. The failed attempt may have reached
    # the queue too (its confirm was lost with the connection: at-least-once), with its own.
    assert ours[-1] == sent.options["attempt"]
    assert ours == sorted(set(ours)) and ours[0] >= 2, ours


def test_retries_middleware_options_reach_the_retried_message(env):
    """Retries writes retries/traceback into the options before it re-enqueues the message."""
    broker = env.broker()
    broker.add_middleware(CurrentMessage())
    queue = unique()
    seen = Recorder()

    @dramatiq.actor(broker=broker, queue_name=queue, max_retries=2, min_backoff=10,
                    max_backoff=20)
    def flaky():
        options = CurrentMessage.get_current_message().options
        seen.add((options.get("retries", 0), "traceback" in options))
        if options.get("retries", 0) < 2:
            raise RuntimeError("again")

    env.worker(broker, threads=2)
    flaky.send()
    assert seen.wait(3, timeout=20), seen.snapshot()
    assert seen.snapshot() == [(0, False), (1, True), (2, True)]


def test_pipeline_target_written_before_enqueue_is_sent(env):
    broker = env.broker()
    queue = unique()
    seen = Recorder()

    @dramatiq.actor(broker=broker, queue_name=queue)
    def add(x, y):
        return x + y

    @dramatiq.actor(broker=broker, queue_name=queue)
    def record(value):
        seen.add(value)

    env.worker(broker, threads=2)
    dramatiq.pipeline([add.message(1, 2), add.message(10), record.message()],
                      broker=broker).run()
    assert seen.wait(1, timeout=20), seen.snapshot()
    assert seen.snapshot() == [13]
