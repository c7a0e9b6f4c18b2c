"""Scenarios that tests/test_gevent_transport.py runs in a child process under gevent.

``python tests/gevent_child.py SCENARIO [AMQP_URL CONNECTION_NAME [CA_FILE]]`` patches the
process with ``monkey.patch_all()`` before anything else is imported, as ``dramatiq-gevent``
does (with ``GEVENT_CHILD_IMPORT_FIRST=1`` the transport is imported before the patch), runs
the scenario in greenlets and prints one JSON line of what it saw (the parent asserts on it).
Every wait inside is bounded, so a scenario that something blocks ends with an error, not a
hang; the parent bounds the whole child as well (a wait that blocks the OS thread would stop
the timers).
"""

import os

if os.environ.get("GEVENT_CHILD_IMPORT_FIRST"):
    # The transport imported before the patch: its module-level locks and thread-locals are
    # the real ones, and it must still pick the cooperative waits.
    import kombu_pyamqp_threadsafe  # noqa: F401

from gevent import monkey  # noqa: E402

monkey.patch_all()

import json  # noqa: E402 - everything below runs on the patched modules
import socket  # noqa: E402
import ssl  # noqa: E402
import sys  # noqa: E402
import uuid  # noqa: E402
from collections.abc import Callable  # noqa: E402
from contextlib import suppress  # noqa: E402
from time import monotonic  # noqa: E402
from typing import Any  # noqa: E402
from urllib.parse import urlsplit  # noqa: E402

import gevent  # noqa: E402
import psutil  # noqa: E402
from amqp.exceptions import NotFound  # noqa: E402
from gevent.event import Event  # noqa: E402
from gevent.socket import wait_read  # noqa: E402

import kombu_pyamqp_threadsafe as ts  # noqa: E402
from kombu_pyamqp_threadsafe.registry import registry  # noqa: E402

#: Greenlets that publish, and messages each.
PUBLISHERS = 200
PER_PUBLISHER = 5
#: Greenlets the short_lived scenario runs, and how many at a time.
SHORT_LIVED = 300
SHORT_LIVED_AT_ONCE = 10
#: Messages the broker scenario sends to its first actor.
BROKER_MESSAGES = 500
#: Actors the time_limits scenario interrupts, and messages it sends after them.
FLOODS = 20
MARKERS = 200
#: Messages each publisher of the native_threads scenario sends.
NATIVE_PER_PUBLISHER = 100
#: Greenlets of the write_batching scenario that publish at once.
BATCHING_PUBLISHERS = 50
#: Heartbeat interval of the silent_peer scenario (s).
SILENT_HEARTBEAT = 2
#: Heartbeat interval of the transport scenario's connection (s); it then idles past 2x this.
HEARTBEAT = 1
#: Bound of any one scenario step (s).
STEP_TIMEOUT = 30


def amqp_sockets(url: str) -> int:
    """This process's TCP connections to the port of ``url`` (counted by the kernel)."""
    port = urlsplit(url).port or 5672
    return sum(1 for conn in psutil.Process().net_connections("tcp")
               if conn.raddr and conn.raddr.port == port and conn.status == "ESTABLISHED")


def joined(greenlets: list[gevent.Greenlet], what: str) -> list[Any]:
    """Wait (bounded) for ``greenlets``; their values, or an error naming what did not end."""
    done = gevent.joinall(greenlets, timeout=STEP_TIMEOUT)
    if len(done) != len(greenlets):
        raise TimeoutError(f"{what}: {len(greenlets) - len(done)} greenlets still running")
    for greenlet in greenlets:
        if greenlet.exception is not None:
            raise greenlet.exception
    return [greenlet.value for greenlet in greenlets]


def transport(url: str, name: str, ca_file: str | None = None) -> dict[str, Any]:
    """Many greenlets on one KombuConnection: 200 publish with confirms while one consumes, one
    gets the NotFound of its passive declare, and the connection survives an idle period of
    2.5 heartbeats while a greenlet waits in drain_events without a timeout. With ``ca_file``
    the URL is amqps:// to a server whose certificate that CA signed for localhost."""
    tls: Any = False
    if ca_file:
        tls = {"ca_certs": ca_file, "cert_reqs": ssl.CERT_REQUIRED, "server_hostname": "localhost"}
    conn = ts.KombuConnection(url, heartbeat=HEARTBEAT, ssl=tls, transport_options={
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
        sockets_after_traffic = amqp_sockets(url)

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
            "sockets_after_idle": amqp_sockets(url),
        }
    finally:
        conn.default_channel.queue_delete(queue)
        conn.close()


def broker(url: str, name: str) -> dict[str, Any]:
    """KombuBroker under a plain dramatiq Worker with 200 worker greenlets: 500 messages of an
    actor that sends each on to a second actor (so 200 greenlets publish with confirms while
    the consumers drain), then the worker stops and the broker closes, both bounded."""
    import dramatiq

    from dramatiq_kombu_broker import KombuBroker

    kombu_broker = KombuBroker(url=url, connection_name=name)
    dramatiq.set_broker(kombu_broker)
    first_queue, second_queue = (f"gevent-{uuid.uuid4().hex[:8]}" for _ in range(2))
    finished: list[int] = []
    all_done = Event()

    @dramatiq.actor(broker=kombu_broker, queue_name=first_queue)
    def first(number: int) -> None:
        second.send(number)

    @dramatiq.actor(broker=kombu_broker, queue_name=second_queue)
    def second(number: int) -> None:
        finished.append(number)
        if len(finished) == BROKER_MESSAGES:
            all_done.set()

    worker = dramatiq.Worker(kombu_broker, worker_threads=PUBLISHERS, worker_timeout=100)
    worker.start()
    try:
        for number in range(BROKER_MESSAGES):
            first.send(number)
        all_done.wait(STEP_TIMEOUT)
        sockets = amqp_sockets(url)
    finally:
        stopper = gevent.spawn(worker.stop, timeout=10_000)
        stopped = bool(gevent.joinall([stopper], timeout=STEP_TIMEOUT))
    left = {queue: kombu_broker.get_queue_message_counts(queue)
            for queue in (first_queue, second_queue)}
    channel = kombu_broker.producer_connection.default_channel
    for queue in (first_queue, second_queue):
        for declared, _ in kombu_broker.settings.declarations(queue):
            channel.queue_delete(declared)
    kombu_broker.close()
    return {
        "sent": BROKER_MESSAGES,
        "finished": len(finished),
        "distinct": len(set(finished)),
        "sockets": sockets,
        "worker_stopped": stopped,
        "left": left,
        "sockets_after_close": amqp_sockets(url),
    }


def time_limits(url: str, name: str) -> dict[str, Any]:
    """dramatiq's time limit under gevent (a gevent.Timeout thrown into the greenlet at its
    next yield: a confirm wait, a reply wait, a write): 20 actors each publish without pause
    until their 100 ms limit interrupts them, on 50 worker greenlets; then 200 messages of
    another actor must all be processed over the same broker."""
    import dramatiq
    from dramatiq.middleware import TimeLimitExceeded

    from dramatiq_kombu_broker import KombuBroker

    kombu_broker = KombuBroker(url=url, connection_name=name)
    dramatiq.set_broker(kombu_broker)
    flood_queue, sink_queue, marker_queue = (f"gevent-{uuid.uuid4().hex[:8]}" for _ in range(3))
    interrupted: list[int] = []
    floods_done, markers_done = Event(), Event()
    markers: list[int] = []

    @dramatiq.actor(broker=kombu_broker, queue_name=sink_queue)
    def sink(number: int) -> None:
        pass

    @dramatiq.actor(broker=kombu_broker, queue_name=flood_queue, time_limit=100, max_retries=0)
    def flood(number: int) -> None:
        try:
            while True:
                sink.send(number)
        except TimeLimitExceeded:
            interrupted.append(number)
            if len(interrupted) == FLOODS:
                floods_done.set()
            raise

    @dramatiq.actor(broker=kombu_broker, queue_name=marker_queue)
    def marker(number: int) -> None:
        markers.append(number)
        if len(markers) == MARKERS:
            markers_done.set()

    worker = dramatiq.Worker(kombu_broker, worker_threads=50, worker_timeout=100)
    worker.start()
    try:
        for number in range(FLOODS):
            flood.send(number)
        floods_done.wait(STEP_TIMEOUT)
        for number in range(MARKERS):
            marker.send(number)
        markers_done.wait(STEP_TIMEOUT)
    finally:
        stopper = gevent.spawn(worker.stop, timeout=10_000)
        stopped = bool(gevent.joinall([stopper], timeout=STEP_TIMEOUT))
    channel = kombu_broker.producer_connection.default_channel
    for queue in (flood_queue, sink_queue, marker_queue):
        for declared, _ in kombu_broker.settings.declarations(queue):
            channel.queue_delete(declared)
    kombu_broker.close()
    return {
        "floods": FLOODS,
        "interrupted": len(interrupted),
        "markers": MARKERS,
        "markers_processed": len(set(markers)),
        "worker_stopped": stopped,
    }


def native_threads(url: str, name: str) -> dict[str, Any]:
    """Native threads beside the greenlets (gevent's thread pool, each thread with a hub of its
    own) publish with confirms on the same connection: 4 of each, 100 messages apiece."""
    conn = ts.KombuConnection(url, transport_options={
        "confirm_publish": True, "client_properties": {"connection_name": name}})
    queue = f"gevent-{uuid.uuid4().hex[:8]}"
    conn.ensure_connection(max_retries=3)
    conn.default_channel.queue_declare(queue, auto_delete=False)
    try:
        def publish() -> int:
            channel = conn.default_channel
            for _ in range(NATIVE_PER_PUBLISHER):
                channel.basic_publish(channel.prepare_message(b"n"), routing_key=queue,
                                      timeout=STEP_TIMEOUT)
            return NATIVE_PER_PUBLISHER

        pool = gevent.get_hub().threadpool
        publishers = [pool.spawn(publish) for _ in range(4)]
        publishers += [gevent.spawn(publish) for _ in range(4)]
        published = sum(joined(publishers, "publishers"))
        queued = conn.default_channel.queue_declare(queue, passive=True).message_count
        return {"published": published, "queued": queued}
    finally:
        conn.default_channel.queue_delete(queue)
        conn.close()


def silent_peer(url: str, name: str) -> dict[str, Any]:
    """The connection (through the parent's proxy) while the peer goes silent: a greenlet
    draining with no timeout, one waiting for a confirm and one writing 1 MB messages without
    confirms until its send blocks. Prints "ready", waits for the parent's line on stdin (the
    proxy has paused), then reports how long after it each greenlet got its error."""
    conn = ts.KombuConnection(url, heartbeat=SILENT_HEARTBEAT, transport_options={
        "confirm_publish": True, "client_properties": {"connection_name": name}})
    conn.ensure_connection(max_retries=3)
    arrived: list[str] = []
    all_ready, go = Event(), Event()

    def ready(who: str) -> None:
        arrived.append(who)
        if len(arrived) == 3:
            all_ready.set()
        go.wait()

    def drainer() -> None:
        channel = conn.channel()
        queue = channel.queue_declare("", exclusive=True).queue
        channel.basic_consume(queue, callback=lambda message: None, no_ack=True)
        ready("drainer")
        while True:
            channel.connection.drain_events(timeout=None)

    def confirm_waiter() -> None:
        channel = conn.channel()
        queue = channel.queue_declare("", exclusive=True).queue
        channel.basic_publish(channel.prepare_message(b"confirmed"), routing_key=queue)
        ready("confirm waiter")
        channel.basic_publish(channel.prepare_message(b"never confirmed"), routing_key=queue)

    def blocked_writer() -> None:
        channel = conn.channel()
        queue = channel.queue_declare("", exclusive=True).queue
        message = channel.prepare_message(b"x" * (1024 * 1024))
        ready("blocked writer")
        while True:
            channel._basic_publish(message, exchange="", routing_key=queue)

    def timed(work: Callable[[], None]) -> tuple[str, float, bool]:
        try:
            work()
        except Exception as exc:  # noqa: BLE001 - the error is what is reported
            recoverable = isinstance(exc, conn.recoverable_connection_errors)
            return type(exc).__name__, monotonic() - paused_at, recoverable
        return "returned", monotonic() - paused_at, False

    paused_at = monotonic()
    greenlets = [gevent.spawn(timed, work) for work in (drainer, confirm_waiter, blocked_writer)]
    if not all_ready.wait(STEP_TIMEOUT):
        raise TimeoutError(f"only {arrived} ready")
    print("ready", flush=True)
    wait_read(sys.stdin.fileno(), STEP_TIMEOUT)
    sys.stdin.readline()
    paused_at = monotonic()
    go.set()
    outcomes = joined(greenlets, "greenlets after the peer went silent")
    conn.close()
    return {"heartbeat": SILENT_HEARTBEAT, "outcomes": outcomes}


def short_lived(url: str, name: str) -> dict[str, Any]:
    """Greenlets (gevent.spawn, as a pool or a WSGI server makes them) that each use their
    default channel once and end, 10 at a time, 300 in all."""
    conn = ts.KombuConnection(url, transport_options={
        "client_properties": {"connection_name": name}})
    queue = f"gevent-{uuid.uuid4().hex[:8]}"
    conn.ensure_connection(max_retries=3)
    conn.default_channel.queue_declare(queue, auto_delete=False)
    try:
        def use() -> None:
            conn.default_channel.queue_declare(queue, passive=True)

        for _ in range(SHORT_LIVED // SHORT_LIVED_AT_ONCE):
            joined([gevent.spawn(use) for _ in range(SHORT_LIVED_AT_ONCE)], "greenlets")
        channels = conn.connection.channels
        return {
            "greenlets": SHORT_LIVED,
            "at_once": SHORT_LIVED_AT_ONCE,
            "open_channels": sum(1 for channel_id, channel in channels.items()
                                 if channel_id and channel.is_open),
        }
    finally:
        conn.default_channel.queue_delete(queue)
        conn.close()


def fork(url: str, name: str) -> dict[str, Any]:
    """A fork while 10 greenlets publish with confirms on a shared connection. gevent's fork
    keeps every greenlet in the child, the reader's and the publishers' included: the child's
    inherited connection must fail (never touch the parent's socket), a new one serve it, and
    the parent's go on."""
    conn = ts.KombuConnection(url, transport_options={
        "confirm_publish": True, "client_properties": {"connection_name": name}})
    queue = f"gevent-{uuid.uuid4().hex[:8]}"
    conn.ensure_connection(max_retries=3)
    conn.default_channel.queue_declare(queue, auto_delete=False)
    stop, publishing = Event(), Event()

    def hammer() -> str:
        channel = conn.default_channel
        try:
            while not stop.is_set():
                channel.basic_publish(channel.prepare_message(b"h"), routing_key=queue,
                                      timeout=STEP_TIMEOUT)
                publishing.set()
        except Exception as exc:  # noqa: BLE001 - in the child: the inherited connection
            return type(exc).__name__
        return "stopped"

    hammers = [gevent.spawn(hammer) for _ in range(10)]
    if not publishing.wait(STEP_TIMEOUT):
        raise TimeoutError("the publishers did not start")
    report_r, report_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report through the pipe, never return
        code = 1
        try:
            os.close(report_r)
            result: dict[str, Any] = {}
            try:
                with gevent.Timeout(STEP_TIMEOUT):
                    result["inherited"] = joined(hammers, "inherited publishers")
                    channel = conn.default_channel
                    channel.basic_publish(channel.prepare_message(b"from the child"),
                                          routing_key=queue, timeout=STEP_TIMEOUT)
                    result["child_connections"] = registry.connections()
                    result["child_sockets"] = amqp_sockets(url)
                    conn.close()
            except BaseException as exc:  # noqa: BLE001 - reported to the parent
                result["error"] = repr(exc)
            os.write(report_w, json.dumps(result).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(report_w)
    try:
        waited = os.waitpid(pid, 0)  # gevent's: only this greenlet waits
        report = json.loads(os.read(report_r, 65536) or b"{}")
        report["child_exit"] = waited[1]
        stop.set()
        report["parent_publishers"] = joined(hammers, "parent publishers")
        channel = conn.default_channel
        channel.basic_publish(channel.prepare_message(b"after the fork"), routing_key=queue,
                              timeout=STEP_TIMEOUT)
        report["parent_sockets"] = amqp_sockets(url)
        return report
    finally:
        os.close(report_r)
        conn.default_channel.queue_delete(queue)
        conn.close()


class Interrupt(BaseException):
    """Stands for gevent's Timeout / dramatiq's time limit, thrown into a greenlet at a yield."""


def write_batching(url: str, name: str) -> dict[str, Any]:
    """The writer under gevent, its sendmsg calls counted: 50 greenlets woken at once each
    publish one message with confirms; then a greenlet whose publish yields in the writer with
    the lock held gets an interrupt as it resumes there, while another greenlet has queued its
    message behind it meanwhile."""
    conn = ts.KombuConnection(url, transport_options={
        "confirm_publish": True, "client_properties": {"connection_name": name}})
    queue = f"gevent-{uuid.uuid4().hex[:8]}"
    conn.ensure_connection(max_retries=3)
    conn.default_channel.queue_declare(queue, auto_delete=False)
    writer = conn.connection._frame_writer
    sendmsg = writer._sendmsg
    calls = [0]

    def counting(buffers: Any, *args: Any) -> int:
        calls[0] += 1
        return sendmsg(buffers, *args)

    writer._sendmsg = counting
    ready_first_saved = getattr(writer, "_ready_first", None)
    arrived: list[str] = []
    all_ready, go = Event(), Event()

    def warmed_up(who: str, wanted: int) -> Any:
        """The caller's channel, with one confirmed publish done (Open, Confirm.Select)."""
        channel = conn.default_channel
        channel.basic_publish(channel.prepare_message(b"warm-up"), routing_key=queue,
                              timeout=STEP_TIMEOUT)
        arrived.append(who)
        if len(arrived) == wanted:
            all_ready.set()
        return channel

    def publish(index: int) -> None:
        channel = warmed_up(str(index), BATCHING_PUBLISHERS)
        if not go.wait(STEP_TIMEOUT):
            raise TimeoutError("no go")
        channel.basic_publish(channel.prepare_message(b"%d" % index), routing_key=queue,
                              timeout=STEP_TIMEOUT)

    try:
        publishers = [gevent.spawn(publish, index) for index in range(BATCHING_PUBLISHERS)]
        if not all_ready.wait(STEP_TIMEOUT):
            raise TimeoutError(f"only {len(arrived)} publishers ready")
        before = calls[0]
        go.set()
        joined(publishers, "publishers")
        batch_calls = calls[0] - before

        arrived.clear()
        all_ready.clear()
        go.clear()
        interrupted_here: list[bool] = []
        behind_go = Event()

        def interrupted() -> dict[str, Any]:
            channel = warmed_up("interrupted", 2)
            if not go.wait(STEP_TIMEOUT):
                raise TimeoutError("no go")
            ready_first = getattr(writer, "_ready_first", None)
            me = gevent.getcurrent()

            def yield_then_interrupt() -> None:
                assert ready_first is not None
                ready_first()
                if gevent.getcurrent() is me and not interrupted_here:
                    interrupted_here.append(True)
                    raise Interrupt

            if ready_first is not None:
                writer._ready_first = yield_then_interrupt
            behind_go.set()  # runs once this greenlet yields: in the writer, or after it
            try:
                channel.basic_publish(channel.prepare_message(b"interrupted"),
                                      routing_key=queue, timeout=STEP_TIMEOUT)
                outcome = "returned"
            except Interrupt:
                outcome = "Interrupt"
            free = writer.lock.acquire(blocking=False)
            if free:
                writer.lock.release()
            return {"outcome": outcome, "in_writer": bool(interrupted_here),
                    "queued_after": len(writer._queued), "lock_free_after": free}

        def behind() -> int:
            channel = warmed_up("behind", 2)
            if not behind_go.wait(STEP_TIMEOUT):
                raise TimeoutError("no go")
            queued = len(writer._queued)  # the interrupted greenlet's message, in its yield
            channel.basic_publish(channel.prepare_message(b"behind"), routing_key=queue,
                                  timeout=STEP_TIMEOUT)
            return queued

        pair = [gevent.spawn(interrupted), gevent.spawn(behind)]
        if not all_ready.wait(STEP_TIMEOUT):
            raise TimeoutError(f"only {arrived} ready")
        go.set()
        first, queued_behind = joined(pair, "interrupted and behind")
        if ready_first_saved is not None:
            writer._ready_first = ready_first_saved
        expected = 2 * BATCHING_PUBLISHERS + 4
        deadline = monotonic() + STEP_TIMEOUT
        channel = conn.default_channel
        count = channel.queue_declare(queue, passive=True).message_count
        while count < expected and monotonic() < deadline:
            gevent.sleep(0.05)  # the server counting the unconfirmed interrupted publish
            count = channel.queue_declare(queue, passive=True).message_count
        return {"publishers": BATCHING_PUBLISHERS, "batch_sendmsg": batch_calls,
                "interrupted": first, "queued_while_yielding": queued_behind,
                "expected": expected, "queued": count,
                "connection_alive": conn.connection._failure is None}
    finally:
        conn.default_channel.queue_delete(queue)
        conn.close()


def tls_read_nowait() -> dict[str, Any]:
    """The reader's TLS read when less than a record has arrived: it must say so at once
    (SSLWantReadError, and the reader polls again, heartbeat ticks included), not wait for
    the rest."""
    from kombu_pyamqp_threadsafe.tls import TLSSocket

    ours, theirs = socket.socketpair()
    tls = TLSSocket(ours, ssl.create_default_context(), server_hostname="localhost")
    outcome = "returned"
    try:
        with gevent.Timeout(STEP_TIMEOUT / 10):
            tls.recv_into(bytearray(1024))
    except ssl.SSLWantReadError:
        outcome = "SSLWantReadError"
    except gevent.Timeout:
        outcome = "waited"
    finally:
        ours.close()
        theirs.close()
    return {"outcome": outcome}


def pool_release() -> dict[str, Any]:
    """A channel pool's release() under gevent, without a server: 200 greenlets each give back
    a lease (no channel: nothing to close) at once. Reports how often a release let another
    greenlet run (greenlet switches while it ran; its lock is held for part of it) and how
    many leases are left."""
    import greenlet

    from kombu_pyamqp_threadsafe.pool import ChannelPool, PooledChannel, _Slot

    pool = ChannelPool(connection=None)
    leases = [PooledChannel(pool, _Slot(None)) for _ in range(200)]
    pool._leases.update(leases)
    switched: list[int] = []
    start = Event()

    def give_back(lease: PooledChannel) -> None:
        start.wait()
        switches = 0

        def count(event: str, args: Any) -> None:
            nonlocal switches
            switches += 1

        previous = greenlet.settrace(count)
        try:
            lease.release()
        finally:
            greenlet.settrace(previous)
        switched.append(switches)

    greenlets = [gevent.spawn(give_back, lease) for lease in leases]
    gevent.sleep(0)
    start.set()
    joined(greenlets, "releasing greenlets")
    return {"releases": len(switched), "releases_that_yielded": sum(1 for n in switched if n),
            "in_use": pool.in_use}


SCENARIOS: dict[str, Callable[..., dict[str, Any]]] = {
    "transport": transport, "broker": broker, "short_lived": short_lived,
    "tls_read_nowait": tls_read_nowait, "fork": fork, "time_limits": time_limits,
    "native_threads": native_threads, "silent_peer": silent_peer,
    "write_batching": write_batching, "pool_release": pool_release}


def main() -> None:
    scenario, *args = sys.argv[1:]
    result = gevent.spawn(SCENARIOS[scenario], *args)
    result.join(timeout=4 * STEP_TIMEOUT)
    if not result.ready():
        raise SystemExit(f"scenario {scenario} did not end within {4 * STEP_TIMEOUT} s")
    print(json.dumps(result.get()))


if __name__ == "__main__":
    main()
