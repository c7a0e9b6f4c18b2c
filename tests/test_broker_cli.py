"""examples/app.py under the real ``dramatiq`` CLI, against the real RabbitMQ.

Two worker processes with eight threads each: every process holds exactly two connections,
processes what the test sends, and exits cleanly (code 0) on SIGTERM.
"""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

from broker_helpers import connections_named, wait_until
from cli_helpers import ROOT, Results, seeded_example

DRAMATIQ = Path(sys.executable).with_name("dramatiq")


def test_example_app_under_the_dramatiq_cli(env, amqp_url, vhost, tmp_path):
    app = seeded_example(env, amqp_url, "ex", 0)
    queue, name, sender, work = app.queue, app.name, app.sender, app.work

    log = tmp_path / "dramatiq.log"
    with log.open("wb") as output:
        process = subprocess.Popen(
            [str(DRAMATIQ), "examples.app", "-p", "2", "-t", "8", "--queues", queue],
            cwd=ROOT, env=app.environ, stdout=output, stderr=subprocess.STDOUT,
        )
    try:
        results = Results(amqp_url, app.results_queue)
        booted = results.wait(lambda r: len(r.of_kind("boot")) >= 2, timeout=60)
        assert booted, log.read_text()[-3000:]
        pids = sorted(pid for [pid] in results.of_kind("boot"))
        assert len(set(pids)) == 2 and process.pid not in pids

        for item in range(60):
            work.send(item)
        done = results.wait(lambda r: {v[0] for v in r.of_kind("done")} >= set(range(60)),
                            timeout=60)
        assert done, (sorted(v[0] for v in results.of_kind("done")), log.read_text()[-3000:])
        assert {v[1] for v in results.of_kind("done")} <= set(pids)

        sender.join(queue, timeout=15_000)
        assert sender.get_queue_message_counts(queue) == (0, 0, 0)

        # Exactly two connections per worker process, and nothing else under the name.
        expected = sorted(f"{name}-{pid}-{role}" for pid in pids
                          for role in ("consumer", "producer"))
        seen = wait_until(lambda: (lambda names: names if names == expected else None)(
            connections_named(name, vhost)), timeout=15, interval=0.5)
        assert seen == expected, connections_named(name, vhost)
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
        try:
            code = process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            raise AssertionError(
                f"dramatiq did not exit on SIGTERM:\n{log.read_text()[-3000:]}"
            ) from None
    assert code == 0, log.read_text()[-3000:]
    assert wait_until(lambda: connections_named(name, vhost) == [], timeout=15), (
        connections_named(name, vhost))
    text = log.read_text()
    assert "Traceback" not in text, text[-3000:]
