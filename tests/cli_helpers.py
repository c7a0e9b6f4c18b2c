"""Helpers for the tests that run the real dramatiq CLI (``dramatiq`` or ``dramatiq-gevent``).

* :class:`Results`: the ``record`` messages the CLI's actors publish to a results queue, read
  with ``basic_get`` on a connection of the test's own.
* :func:`cli_environment`: what a CLI child needs to import the repository's modules.
* :func:`connection_ports`: the server-side connections of one name prefix, by name.
* :func:`example_work`: examples/app.py's ``work`` actor, for the test to send with.
* :func:`seeded_example`: examples/app.py's queues of a test's own, ``count`` items sent.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dramatiq

from broker_helpers import BrokerEnv, raw_channel, unique
from stress import rabbit_admin
from stress.cli_workers import pythonpath

ROOT = Path(__file__).resolve().parent.parent
TESTS = ROOT / "tests"


def example_work(broker: Any, queue: str, results_queue: str) -> Any:
    """``work``, examples/app.py's first actor, declared on the test's ``broker`` to send with
    (the CLI's workers process it, never the test), with both of the app's queues declared."""

    @dramatiq.actor(broker=broker, queue_name=queue, actor_name="work")
    def work(item: int) -> None:
        raise AssertionError("processed by the CLI workers only")

    broker.declare_queue(results_queue, ensure=True)
    broker.declare_queue(queue, ensure=True)
    return work


@dataclass(frozen=True)
class ExampleApp:
    """examples/app.py configured for one test: its queues, its connection name, the
    environment of a CLI child that runs it, and the test's broker that sent the items."""

    queue: str
    results_queue: str
    name: str
    environ: dict[str, str]
    sender: Any
    work: Any


def seeded_example(env: BrokerEnv, amqp_url: str, prefix: str, count: int) -> ExampleApp:
    """examples/app.py's queues named ``prefix...``, with ``work(0)`` to ``work(count - 1)``
    sent before any CLI starts (``count`` 0: the test sends through ``work`` itself)."""
    queue, name = unique(prefix), unique(f"{prefix}-app")
    results_queue = f"{queue}-results"
    sender = env.broker()
    work = example_work(sender, queue, results_queue)
    for item in range(count):
        work.send(item)
    environ = cli_environment(amqp_url, EXAMPLE_QUEUE=queue, EXAMPLE_RESULTS_QUEUE=results_queue,
                              EXAMPLE_CONNECTION_NAME=name)
    return ExampleApp(queue, results_queue, name, environ, sender, work)


class Results:
    """Reads the ``record`` messages the CLI's actors publish to the results queue."""

    def __init__(self, amqp_url: str, queue: str) -> None:
        self.amqp_url = amqp_url
        self.queue = queue
        self.records: list[list[Any]] = []

    def drain(self) -> list[list[Any]]:
        with raw_channel(self.amqp_url) as channel:
            while True:
                message = channel.basic_get(self.queue, no_ack=True)
                if message is None:
                    break
                self.records.append(json.loads(message.body)["args"])
        return self.records

    def of_kind(self, kind: str) -> list[list[Any]]:
        return [values[1:] for values in self.records if values[0] == kind]

    def wait(self, predicate: Callable[[Results], bool], timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while not predicate(self):
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.2)
            self.drain()
        return True


def cli_environment(amqp_url: str, **extra: str) -> dict[str, str]:
    """Environment of a CLI child: the repository and tests/ importable, ``AMQP_URL`` set."""
    return {**os.environ, "AMQP_URL": amqp_url, "PYTHONPATH": pythonpath(ROOT, TESTS), **extra}


def connection_ports(prefix: str, vhost: str) -> dict[str, list[int]]:
    """``{connection_name: [peer ports]}`` of the server's connections named ``prefix...``:
    the same port before and after means the same connection, never reopened."""
    found: dict[str, list[int]] = {}
    for conn in rabbit_admin.list_connections(vhost):
        name = rabbit_admin.connection_name_of(conn) or ""
        if name.startswith(prefix):
            found.setdefault(name, []).append(conn["peer_port"])
    return {name: sorted(ports) for name, ports in sorted(found.items())}
