"""The benchmark runner and reporter: interleaving, medians, failures kept as data.

All but the last test are pure logic (the child-process ones run workload modules written
here, which touch no server); the last runs one tiny case of a real workload in a child process
against the real server.
"""

from __future__ import annotations

import json
import os
import textwrap
import types
from pathlib import Path
from typing import Any

import pytest

from stress import report, runner, workloads
from stress.workloads import brokers


def _workload(**extra: Any) -> types.ModuleType:
    module = types.ModuleType("fake_workload")
    module.__dict__.update({
        "NAME": "fake", "TITLE": "Fake", "COLUMNS": [("rate", "rate"), ("conns", "c")],
        "HEADLINE": "rate", "HIGHER_IS_BETTER": True, "AGGREGATE": {"conns": "max"},
        "cases": lambda quick: [], "run_case": lambda case: {}, **extra})
    return module


CASES = [{"setup": s, "label": label} for label in ("small", "big") for s in ("a", "b")]


def test_schedule_interleaves_setups_and_rotates_their_order() -> None:
    order = [(rep, CASES[i]["label"], CASES[i]["setup"])
             for rep, i in runner.schedule(CASES, repeat=2)]
    assert order == [(0, "small", "a"), (0, "small", "b"), (0, "big", "b"), (0, "big", "a"),
                     (1, "small", "b"), (1, "small", "a"), (1, "big", "a"), (1, "big", "b")]
    three = [{"setup": s, "label": "x"} for s in "abc"]
    firsts = [three[i]["setup"] for rep, i in runner.schedule(three, 3)][::3]
    assert firsts == ["a", "b", "c"]  # every setup goes first once in three repeats


def test_summary_takes_medians_of_successes_and_the_ratio_to_the_baseline() -> None:
    results = [
        runner.CaseRuns(CASES[0], [{"ok": True, "rate": 10, "conns": 1},
                                   {"ok": True, "rate": 30, "conns": 2},
                                   {"ok": True, "rate": 20, "conns": 1},
                                   {"ok": False, "rate": 1000, "conns": 9, "error": "boom"}]),
        runner.CaseRuns(CASES[1], [{"ok": True, "rate": 40, "conns": 5}]),
        runner.CaseRuns({**CASES[2], "baseline": True}, [{"ok": True, "rate": 8}]),
        runner.CaseRuns(CASES[3], [{"ok": False, "error": "down"}, {"ok": False}]),
    ]
    workload = _workload()
    rows = report.summarise(workload, results)
    assert rows[0].values == {"rate": 20, "conns": 9}  # median of successes; max over all
    assert rows[0].low_high == (10, 30)
    assert (rows[0].ratio, rows[1].ratio) == (1.0, 2.0)
    assert rows[2].ratio == 1.0 and rows[3].ratio is None and rows[3].values["rate"] is None
    assert report.status(workload, rows[0]) == "3/4 ok: boom"
    assert report.status(workload, rows[3]) == "FAILED 0/2: down"
    text = report.render(workload, rows, command="cmd", repeat=4)
    assert "| small | a     | 20   | 10–30" in text and "| 2.00x" in text


def test_a_failing_or_skipped_case_is_recorded_and_the_run_goes_on() -> None:
    launched: list[dict[str, Any]] = []

    def launch(module: str, case: dict[str, Any], timeout: float) -> dict[str, Any]:
        launched.append(case)
        if case["label"] == "small" and case["setup"] == "a":
            return {"ok": False, "error": "crashed"}
        return {"ok": True, "rate": 1}

    class Session:
        def __init__(self, cases: list[dict[str, Any]]) -> None:
            self.cases = cases

        def __enter__(self) -> dict[str, Any]:
            return {"url": "amqp://shared"}

        def __exit__(self, *exc: object) -> None:
            return None

    workload = _workload(session=Session,
                         skip=lambda case: "too big" if case["label"] == "big" else None)
    results = runner.execute(workload, CASES, repeat=2, launch=launch)
    assert [len(r.runs) for r in results] == [2, 2, 2, 2]
    assert results[0].runs == [{"ok": False, "error": "crashed"}] * 2
    assert results[1].runs == [{"ok": True, "rate": 1}] * 2
    assert results[2].runs[0] == {"ok": False, "skipped": True, "error": "skipped: too big"}
    assert len(launched) == 4 and all(c["url"] == "amqp://shared" for c in launched)
    assert all("url" not in r.case for r in results)  # the session's part is not the case's
    with pytest.raises(ValueError, match="case 1 of workload 'fake' lacks label"):
        runner.execute(workload, [CASES[0], {"setup": "a"}], repeat=1, launch=launch)


@pytest.fixture
def child_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A workload module importable by child processes, whose behaviour the case picks."""
    (tmp_path / "runner_probe.py").write_text(textwrap.dedent("""
        import os, time

        def run_case(case):
            if case["do"] == "raise":
                raise RuntimeError("no luck")
            if case["do"] == "hang":
                time.sleep(60)
            if case["do"] == "die":
                os._exit(3)
            return {"pid": os.getpid(), "echo": case["value"]}
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("PYTHONPATH", f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    return "runner_probe"


def test_child_process_results_and_failures(child_module: str) -> None:
    ok = runner.launch_child(child_module, {"do": "echo", "value": [1, "x"]}, timeout=60)
    assert ok["ok"] is True and ok["echo"] == [1, "x"] and ok["pid"] != os.getpid()
    raised = runner.launch_child(child_module, {"do": "raise"}, timeout=60)
    assert raised["ok"] is False and raised["error"] == "RuntimeError: no luck"
    assert "RuntimeError" in raised["traceback"]
    hung = runner.launch_child(child_module, {"do": "hang"}, timeout=3)
    assert hung["ok"] is False and hung["error"] == "timed out after 3 s"
    died = runner.launch_child(child_module, {"do": "die"}, timeout=60)
    assert died == {"ok": False, "error": "exit status 3, no result", "stderr": "",
                    "wall": died["wall"]}


def test_case_timeout_is_the_cases_own_bound_plus_a_grace() -> None:
    assert runner.case_timeout({"timeout": 10}, default=600) == 10 + runner.TIMEOUT_GRACE
    assert runner.case_timeout({}, default=600) == 600


def test_workloads_are_found_by_name_and_checked() -> None:
    known = workloads.discover()
    assert {"bench", "bench_transport", "bench_celery"} <= set(known)
    assert workloads.load("bench") is brokers
    with pytest.raises(ValueError, match="no workload called 'nope'; known: .*bench"):
        workloads.load("nope")
    with pytest.raises(ValueError, match="HEADLINE 'rate' is not one of its COLUMNS"):
        workloads.check(_workload(COLUMNS=[("x", "x")]))
    for module in known.values():
        for case in module.cases(True):
            assert {"setup", "label"} <= set(case)
            json.dumps(case)


def test_a_tiny_real_case_runs_in_a_child_and_is_reported(amqp_url_base: str,
                                                           tmp_path: Path) -> None:
    cases = brokers.cases(True, brokers=("kombu",), workloads=("enqueue",), enqueue_threads=[2],
                          enqueue_messages=20)
    results = runner.execute(brokers, cases, repeat=1)
    (run,) = results[0].runs
    assert run["ok"], run
    assert run["messages"] == 20 and run["connections"] == 1
    text, written = report.write(brokers, results, output=tmp_path / "bench.md", command="smoke",
                                 repeat=1)
    assert "| enqueue, 2 threads | KombuBroker |" in text and "1/1 ok" in text
    assert json.loads((tmp_path / "bench.json").read_text())["cases"][0]["runs"][0]["ok"]
    assert {p.name for p in written} >= {"bench.md", "bench.json", "bench-throughput.png"}


def test_bench_celery_latency_option_makes_a_case_per_delay_and_its_own_report(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from stress import bench_celery
    from stress.workloads import celery_publish

    calls: list[dict[str, Any]] = []
    monkeypatch.setattr(runner, "run", lambda workload, cases, **kw: calls.append(
        {"cases": cases, **kw}) or 0)
    assert bench_celery.main(["--threads", "1,50", "--latency-ms", "0,2.5", "--seconds", "1"]) == 0
    assert bench_celery.main(["--threads", "8"]) == 0
    delayed, direct = calls
    assert delayed["name"] == "bench_celery_latency" and direct["name"] is None
    assert [(c["label"], c["setup"], c["latency_ms"]) for c in delayed["cases"]] == [
        ("0 ms each way, 1", "default", 0), ("0 ms each way, 1", "shared", 0),
        ("0 ms each way, 50", "default", 0), ("0 ms each way, 50", "shared", 0),
        ("2.5 ms each way, 1", "default", 2.5), ("2.5 ms each way, 1", "shared", 2.5),
        ("2.5 ms each way, 50", "default", 2.5), ("2.5 ms each way, 50", "shared", 2.5)]
    assert [(c["label"], c["latency_ms"]) for c in direct["cases"]] == [("8 threads", None)] * 2
    # A child's case, after JSON: through its delay's proxy, or straight to the server.
    case = json.loads(json.dumps({**delayed["cases"][-1], "url": "amqp://u:p@rabbit:5672/v",
                                  "proxy_ports": {"0": 1111, "2.5": 2222}}))
    assert celery_publish.case_url(case) == "amqp://u:p@127.0.0.1:2222/v"
    assert celery_publish.case_url({**direct["cases"][0], "url": "amqp://rabbit/v"}) == (
        "amqp://rabbit/v")
