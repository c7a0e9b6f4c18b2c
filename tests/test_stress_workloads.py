"""The quick KombuBroker cases of the issue-16 workloads run against the real server and report
sane figures: nothing lost, at most the broker's two connections, nothing left open; the Celery
publishers through the delaying proxy."""

from __future__ import annotations

from types import ModuleType
from typing import Any

from stress import runner
from stress.workloads import celery_publish, many_queues, thread_churn


def kombu_case(module: ModuleType) -> dict[str, Any]:
    cases: list[dict[str, Any]] = module.cases(quick=True)
    (case,) = [c for c in cases if c["setup"] == "kombu"]
    return case


def test_many_queues_kombu_consumes_every_queue_on_two_connections(amqp_url_base: str) -> None:
    case = kombu_case(many_queues)
    result = many_queues.run_case(case)
    assert result["consumers"] == 2 * case["queues"]
    assert (result["sent"], result["processed"]) == (case["messages"], case["messages"])
    assert (result["lost"], result["duplicated"], result["send_failures"]) == (0, 0, 0)
    assert 1 <= result["connections"] <= 2
    assert result["server_connections_all_up"] == 2
    assert result["open_after_close"] == 0
    assert result["seconds"] > 0 and result["throughput"] > 0
    assert result["rss_mb"] > 0


def test_thread_churn_kombu_keeps_one_connection_and_pooled_channels(amqp_url_base: str) -> None:
    case = kombu_case(thread_churn)
    result = thread_churn.run_case(case)
    assert (result["threads_run"], result["launched"]) == (case["threads"], case["threads"])
    assert (result["failed"], result["lost"]) == (0, 0)
    assert result["in_queue"] == case["threads"]
    assert 1 <= result["connections"] <= 2
    assert result["open_after"] == 1  # the producer connection, shared by every thread
    # Channels go back to the pool: bounded by the threads alive at once, not one per thread.
    assert result["channels_after"] <= 2 * case["concurrent"] < case["threads"]
    assert result["open_after_close"] == 0
    assert result["seconds"] > 0 and result["throughput"] > 0


def test_thread_churn_skips_a_case_capped_below_a_quarter_of_its_threads() -> None:
    case = {"setup": "rabbitmq", "threads": 1000}
    assert thread_churn.too_few(case, 1000, None) is None
    assert thread_churn.too_few(case, 250, "capped from 1000 to 250") is None
    why = thread_churn.too_few(case, 249, "capped from 1000 to 249")
    assert why is not None and why.startswith("capped from 1000 to 249")


def test_celery_publishers_through_the_delaying_proxy(amqp_url_base: str) -> None:
    """Both setups, each in its child process, through the run's 5 ms proxy: every delay()
    waits for a confirm, so for at least one round trip (10 ms); the shared setup holds one
    connection, the default one at most its pool's 10."""
    planned = celery_publish.cases(True, threads=[4], seconds=0.5, latency_ms=[5])
    results = runner.execute(celery_publish, planned, repeat=1)
    runs = {item.case["setup"]: item.runs[0] for item in results}
    assert all(run["ok"] for run in runs.values()), runs
    for run in runs.values():
        assert run["published"] > 0 and run["p50"] >= 2 * 0.005
    assert runs["shared"]["connections"] == 1
    assert 1 <= runs["default"]["connections"] <= 4
