"""Scenarios that tests/test_gevent_transport.py runs in a child process under gevent.

``python tests/gevent_child.py SCENARIO AMQP_URL CONNECTION_NAME`` patches the process with
``monkey.patch_all()`` before anything else is imported, as ``dramatiq-gevent`` does, runs the
scenario in greenlets and prints one JSON line of what it saw (the parent asserts on it). Every
wait inside is bounded, so a scenario that something blocks ends with an error, not a hang; the
parent bounds the whole child as well (a wait that blocks the OS thread would stop the timers).
"""

from gevent import monkey

monkey.patch_all()

import json  # noqa: E402 - everything below runs on the patched modules
import sys  # noqa: E402
import uuid  # noqa: E402
from collections.abc import Callable  # noqa: E402
from contextlib import suppress  # noqa: E402
from typing import Any  # noqa: E402

import gevent  # noqa: E402
import psutil  # noqa: E402
from amqp.exceptions import NotFound  # noqa: E402
from gevent.event import Event  # noqa: E402

import kombu_pyamqp_threadsafe as ts  # noqa: E402
from kombu_pyamqp_threadsafe.registry import registry  # noqa: E402

#: Greenlets that publish, and messages each.
PUBLISHERS = 200
PER_PUBLISHER = 5
#: Heartbeat interval of the transport scenario's connection (s); it then idles past 2x this.
HEARTBEAT = 1
#: Bound of any one scenario step (s).
STEP_TIMEOUT = 30


def amqp_sockets(url_port: int = 5672) -> int:
    """This process's TCP connections to the AMQP port (counted by the kernel, via psutil)."""
    return sum(1 for conn in psutil.Process().net_connections("tcp")
               if conn.raddr and conn.raddr.port == url_port and conn.status == "ESTABLISHED")


def joined(greenlets: list[gevent.Greenlet], what: str) -> list[Any]:
    """Wait (bounded) for ``greenlets``; their values, or an error naming what did not end."""
    done = gevent.joinall(greenlets, timeout=STEP_TIMEOUT)
    if len(done) != len(greenlets):
        raise TimeoutError(f"{what}: {len(greenlets) - len(done)} greenlets still running")
    for greenlet in greenlets:
        if greenlet.exception is not None:
            raise greenlet.exception
    return [greenlet.value for greenlet in greenlets]


def transport(url: str, name: str) -> dict[str, Any]:
    """Many greenlets on one KombuConnection: 200 publish with confirms while one consumes, one
    gets the NotFound of its passive declare, and the connection survives an idle period of
    2.5 heartbeats while a greenlet waits in drain_events without a timeout."""
    conn = ts.KombuConnection(url, heartbeat=HEARTBEAT, transport_options={
        "confirm_publish": True, "client_properties": {"connection_name": name}})
    queue = f"gevent-{uuid.uuid4().hex[:8]}"
    total = PUBLISHERS * PER_PUBLISHER
    received: list[bytes] = []
    all_in = Event()
    consuming = Event()
    conn.ensure_connection(max_retries=3)
    conn.default_channel.queue_declare(queue, auto_delete=False)
    try:
        def consume() -> None:
            channel = conn.default_channel
            channel.basic_qos(0, 100, False)

            def on_message(message: Any) -> None:
                received.append(message.body)
                channel.basic_ack(message.delivery_tag)
                if len(received) == total:
                    all_in.set()

            channel.basic_consume(queue, callback=on_message)
            consuming.set()
            while not all_in.is_set():
                with suppress(TimeoutError):
                    conn.drain_events(timeout=1)

        def publish(index: int) -> None:
            channel = conn.default_channel
            for number in range(PER_PUBLISHER):
                channel.basic_publish(channel.prepare_message(f"{index}:{number}".encode()),
                                      routing_key=queue, timeout=STEP_TIMEOUT)

        def declare_missing() -> str:
            try:
                conn.default_channel.queue_declare(f"missing-{queue}", passive=True)
            except NotFound as exc:
                return type(exc).__name__
            return "no error"

        consumer = gevent.spawn(consume)
        if not consuming.wait(STEP_TIMEOUT):
            raise TimeoutError("the consumer did not start")
        publishers = [gevent.spawn(publish, index) for index in range(PUBLISHERS)]
        missing = gevent.spawn(declare_missing)
        joined(publishers, "publishers")
        error = joined([missing], "passive declare")[0]
        joined([consumer], "consumer")
        sockets_after_traffic = amqp_sockets()

        # Idle past two heartbeat intervals while a greenlet waits with no timeout: only the
        # reader's heartbeats keep the connection up, and only if nothing blocks the thread.
        idle_woken = Event()

        def wait_forever() -> None:
            conn.drain_events()
            idle_woken.set()

        waiter = gevent.spawn(wait_forever)
        gevent.sleep(2.5 * HEARTBEAT)
        alive_after_idle = conn.connection.connected and conn.connection._failure is None
        channel = conn.default_channel
        channel.basic_publish(channel.prepare_message(b"after idle"), routing_key=queue,
                              timeout=STEP_TIMEOUT)
        waiter.kill(block=True, timeout=STEP_TIMEOUT)
        return {
            "published": total,
            "received": len(received),
            "distinct": len(set(received)),
            "passive_declare": error,
            "sockets": sockets_after_traffic,
            "registry_connections": registry.connections(),
            "heartbeat": conn.connection.heartbeat,
            "alive_after_idle": alive_after_idle,
            "sockets_after_idle": amqp_sockets(),
        }
    finally:
        conn.default_channel.queue_delete(queue)
        conn.close()


SCENARIOS: dict[str, Callable[[str, str], dict[str, Any]]] = {"transport": transport}


def main() -> None:
    scenario, url, name = sys.argv[1:4]
    result = gevent.spawn(SCENARIOS[scenario], url, name)
    result.join(timeout=4 * STEP_TIMEOUT)
    if not result.ready():
        raise SystemExit(f"scenario {scenario} did not end within {4 * STEP_TIMEOUT} s")
    print(json.dumps(result.get()))


if __name__ == "__main__":
    main()
