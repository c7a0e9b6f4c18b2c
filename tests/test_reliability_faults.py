"""KombuBroker through the failures a production RabbitMQ sees, under load, losing nothing.

Each case runs a real dramatiq Worker (or the real ``dramatiq`` CLI) on the real RabbitMQ while
senders stream messages that each carry an id, injects one fault and checks that every sent id
was processed at least once, that the worker consumed again after the fault, how long that
took, and how many duplicates the at-least-once delivery produced (reported, not limited).

All cases connect as a dedicated user whose password is distinctive, with DEBUG logging on:
the password must appear in no log line (nor in the CLI's output).

The scenarios live in ``stress.fault_scenarios``; ``python -m stress.faults`` runs them at full
scale (64 threads, a few thousand messages) and prints the README table.

The server restart case restarts the whole RabbitMQ node (every client of it is disconnected).
It runs by default; ``RELIABILITY_RESTART=0`` skips it on a server other people use.
"""

from __future__ import annotations

import os

import pytest

from stress.fault_scenarios.channel_close import channel_close_case
from stress.fault_scenarios.cli_sigterm import cli_sigterm_case
from stress.fault_scenarios.connection_close import close_all_connections_case
from stress.fault_scenarios.context import PYTEST_SCALE, Context
from stress.fault_scenarios.credentials import secret_user, url_with
from stress.fault_scenarios.network import network_reset_case, silent_network_case
from stress.fault_scenarios.results import FaultResult, details_table, markdown_table
from stress.fault_scenarios.server_restart import rabbitmq_running, server_restart_case

pytestmark = pytest.mark.timeout(240)

#: The server restart case runs unless RELIABILITY_RESTART=0.
RESTART_ENABLED = os.environ.get("RELIABILITY_RESTART", "1") != "0"


@pytest.fixture(scope="module")
def ctx(amqp_url_base, vhost, tmp_path_factory):
    with secret_user(vhost) as (user, password):
        yield Context(url_with(amqp_url_base, vhost, user, password), vhost,
                         PYTEST_SCALE, secret=password,
                         work_dir=tmp_path_factory.mktemp("faults"))


def check(result: FaultResult) -> None:
    """Every sent message processed, the worker back, nothing unexpected logged or leaked."""
    print("\n" + markdown_table([result]) + "\n" + details_table([result]))
    assert result.sent >= PYTEST_SCALE.messages, result.explain()
    assert result.lost == 0, result.explain()
    assert result.processed >= result.sent, result.explain()
    assert result.recovery is not None, result.explain()
    assert result.problems == [], result.explain()
    assert result.leaks == [], result.explain()
    assert result.unexpected_logs == [], result.explain()
    assert result.dead_lettered == 0, result.explain()


def test_server_closes_every_connection_three_times(ctx):
    result = close_all_connections_case(ctx, times=3)
    check(result)
    assert len(result.windows) == 3
    # The consumer is back after dramatiq's 3 s restart delay, not much later.
    assert result.recovery < 10, result.explain()


@pytest.mark.skipif(not RESTART_ENABLED, reason="RELIABILITY_RESTART=0: the server restart "
                    "case disconnects every client of the RabbitMQ node")
def test_server_restart(ctx):
    result = server_restart_case(ctx)
    assert rabbitmq_running()
    check(result)
    assert result.recovery < 15, result.explain()


def test_network_goes_silent_then_comes_back(ctx):
    result = silent_network_case(ctx, heartbeat=2.0)
    check(result)
    window = result.windows[0]
    # Detected through heartbeats: two intervals (4 s) plus the reader's tick.
    assert window.detection is not None and 3.5 <= window.detection <= 6.0, result.explain()
    assert result.recovery < 10, result.explain()


def test_network_resets_while_many_threads_publish(ctx):
    result = network_reset_case(ctx, resets=3)
    check(result)
    assert len(result.windows) == 3
    assert result.recovery < 10, result.explain()


def test_server_closes_one_consumer_channel_others_keep_running(ctx):
    result = channel_close_case(ctx, queues=3)
    check(result)
    assert result.recovery < 10, result.explain()


def test_cli_worker_sigterm_mid_run_then_restarted(ctx):
    result = cli_sigterm_case(ctx)
    check(result)
    # A graceful stop acks what it finished and returns the rest: nothing runs twice.
    assert result.duplicates == 0, result.explain()
    assert result.recovery < 30, result.explain()
