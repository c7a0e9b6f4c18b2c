"""Fault scenarios for KombuBroker under load, against the real RabbitMQ (no mocks).

Run by ``python -m stress.faults`` (the full scale, and the table in the README) and by
``tests/test_reliability_*.py`` (small scale). Each scenario runs a real ``dramatiq.Worker`` (or the
real ``dramatiq`` CLI) on a KombuBroker, streams messages that each carry a unique integer id,
injects one kind of fault, and returns a :class:`~stress.fault_scenarios.results.FaultResult`:

* ``sent``: ids whose send returned (a send that raised is retried by the sender, as an
  application would, and counted in ``send_retries``);
* ``processed``: distinct ids the actor completed; ``lost`` = sent ids never processed;
* ``duplicates``: completions beyond the first of an id (at-least-once delivery);
* ``recovery``: per fault, seconds from the moment the fault ended (the server reachable
  again) until the broker works again end to end: the larger of (a) the first send started
  after that moment has returned, and (b) the worker completed a message delivered on a
  channel opened after the fault began (a new consumer, not a message it had buffered).

The run ends only when every sent id was processed and the server holds no message of the
queues any more (ready or unacknowledged), so no redelivery, and no duplicate, can follow.

The scenarios, one module a family (each takes a :class:`~.context.Context`):

* ``connection_close``: the server closes every connection;
* ``server_restart``: the server restarts (stop_app/start_app, guarded by the callers);
* ``network``: the network goes silent (a proxy stops forwarding) and comes back; the network
  resets connections while many threads publish;
* ``channel_close``: the server closes one consumer's channel;
* ``cli_sigterm``: the worker (the ``dramatiq`` CLI) gets SIGTERM and is started again;
* ``hygiene``: many faults in turn on one worker, resources before vs after;
* ``idle``: a worker left idle keeps its connections.

What they are built of: ``context`` (where, how big), ``credentials`` (the throw-away user),
``ledger`` (sent and processed ids), ``senders``, ``log_watch``, ``fault_proxy``,
``server_state`` (queues and connections on the server), ``harness`` (the loaded worker) and
``results`` (what a case returns, its tables).
"""
