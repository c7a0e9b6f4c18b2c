"""Stress tests and benchmarks against a real RabbitMQ (``make stress``, ``make bench``).

- ``python -m stress.bench_transport``: raw publish throughput and latency of the thread-safe
  transport (one shared ``KombuConnection``) versus one plain ``kombu.Connection`` per thread.
- ``python -m stress.run``: the 900-thread dramatiq stress test on ``KombuBroker`` (lost and
  duplicated messages are counted by id), in-process or under the ``dramatiq`` CLI (``--cli``).
- ``python -m stress.bench``: ``KombuBroker`` side by side with dramatiq's ``RabbitmqBroker``.
- ``python -m stress.runner``: runs any benchmark workload of ``stress/workloads/`` (``--all``
  for every one, as ``make bench`` does) and ``stress.report`` writes its results.
- ``python -m stress.faults``: the fault scenarios of ``stress/fault_scenarios/`` (one module a
  family of faults), which ``tests/test_reliability_*.py`` run at a small scale.

Every run works in its own vhost ``stress-<hex>`` (created and deleted with ``rabbitmqctl``).
Results go to ``stress/results/``.
"""
