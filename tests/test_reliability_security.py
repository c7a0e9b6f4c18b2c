"""Security: credentials never leak, and amqps:// verifies the server by default.

* The password (of a dedicated user, distinctive, with characters that need URL quoting)
  appears in no log line (DEBUG, through connection faults), no exception message or
  traceback, no ``repr()``/``str()`` of the broker, its settings or its connections, and
  nowhere in what the server shows about the connection (its name included).
* ``amqps://`` verifies the server's certificate and its host name by default; turning that
  off takes an explicit option (``ssl={"cert_reqs": ssl.CERT_NONE}``) and logs a warning.
  TLS is served by a TLS-terminating proxy in front of the real RabbitMQ, with a throw-away
  CA (``transport_helpers.make_tls_files``).
"""

from __future__ import annotations

import logging
import ssl
import time
import traceback
import uuid

import dramatiq
import pytest
from dramatiq import Message
from dramatiq.errors import ConnectionClosed

from broker_helpers import Recorder, run_bounded
from dramatiq_kombu_broker import KombuBroker
from dramatiq_kombu_broker.broker import MAX_ENQUEUE_ATTEMPTS
from kombu_pyamqp_threadsafe.tls import TLSSocket
from stress import rabbit_admin
from stress.fault_scenarios.connection_close import close_all_connections_case
from stress.fault_scenarios.context import Context, Scale
from stress.fault_scenarios.credentials import secret_forms, secret_user, url_with
from stress.fault_scenarios.fault_proxy import FaultProxy
from stress.fault_scenarios.log_watch import LogWatch
from stress.fault_scenarios.server_state import wait_one_connection_each
from transport_helpers import have_openssl, make_server_cert, make_tls_files, server_tls_context


@pytest.fixture(scope="module")
def secret(vhost):
    """(user, password, forms of the password to look for)."""
    with secret_user(vhost) as (user, password):
        yield user, password, secret_forms(password)


@pytest.fixture
def secret_url(secret, amqp_url_base, vhost):
    user, password, _ = secret
    return url_with(amqp_url_base, vhost, user, password)


def leaked(forms: list[str], *texts: str) -> list[str]:
    return [text for text in texts if any(form in text for form in forms)]


def error_texts(exc: BaseException) -> list[str]:
    """Everything an exception can print: str, repr, its chain, the formatted traceback."""
    texts = ["".join(traceback.format_exception(exc))]
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        texts += [str(exc), repr(exc), repr(getattr(exc, "args", ()))]
        exc = exc.__cause__ or exc.__context__
    return texts


def _message(queue: str) -> Message:
    return Message(queue_name=queue, actor_name="fault_work_0", args=(1,), kwargs={},
                   options={})


# -------------------------------------------------------------------------------- credentials


def test_log_watch_catches_a_planted_password(secret):
    """The log check of these tests can fail: a line with the password is caught."""
    _, password, forms = secret
    watch = LogWatch(forms, debug=True).install()
    try:
        logging.getLogger("dramatiq_kombu_broker").debug("url is %s", f"amqp://u:{password}@h")
        try:
            raise RuntimeError(password)
        except RuntimeError:
            logging.getLogger("kombu").warning("failed", exc_info=True)
    finally:
        watch.remove()
    assert len(watch.leaks) == 2


def test_repr_of_broker_settings_and_connections_masks_the_password(secret, secret_url):
    _, password, forms = secret
    other = secret_url.replace("127.0.0.1", "localhost")
    for url in (secret_url, [secret_url, other], f"{secret_url};{other}"):
        broker = KombuBroker(url=url, connection_name=f"sec-{uuid.uuid4().hex[:6]}")
        try:
            texts = [repr(broker), str(broker), repr(broker.settings), str(broker.settings),
                     repr(broker.consumer_connection), str(broker.consumer_connection),
                     repr(broker.producer_connection), broker.producer_connection.as_uri()]
            assert leaked(forms, *texts) == [], texts
            assert "***" in repr(broker)
        finally:
            broker.close()
    # Connected: the py-amqp connections and channels too.
    broker = KombuBroker(url=secret_url, connection_name=f"sec-{uuid.uuid4().hex[:6]}")
    try:
        queue = f"sec-{uuid.uuid4().hex[:6]}"
        broker.declare_queue(queue, ensure=True)
        broker.enqueue(_message(queue))
        producer = broker.producer_connection
        texts = [repr(broker), repr(producer), repr(producer.connection),
                 repr(producer.connection.transport), repr(producer.default_channel)]
        assert leaked(forms, *texts) == [], texts
    finally:
        broker.close()


@pytest.mark.timeout(120)
def test_logs_through_connection_faults_never_contain_the_password(secret, secret_url, vhost):
    """DEBUG logging of dramatiq, kombu, py-amqp and both packages while the server closes
    every connection (reconnects, consumer restarts, dropped acks)."""
    _, password, forms = secret
    scale = Scale(messages=300, threads=8, senders=2, send_rate=150.0, burst_senders=4,
                     work_ms=20.0, timeout=90.0)
    ctx = Context(secret_url, vhost, scale, secret=password)
    result = close_all_connections_case(ctx, times=1)
    assert result.lost == 0, result.explain()
    assert result.leaks == [], result.explain()


def test_error_messages_never_contain_the_password(secret, amqp_url_base, vhost, secret_url):
    user, password, forms = secret
    cases = {
        "unknown vhost": url_with(amqp_url_base, f"missing-{uuid.uuid4().hex[:6]}", user,
                                     password),
        "wrong password": url_with(amqp_url_base, vhost, user, password + "x"),
        "connection refused": secret_url.replace(":5672", ":1"),
        "unknown host": secret_url.replace("127.0.0.1", "no-such-host.invalid"),
    }
    watch = LogWatch(forms, debug=True).install()
    try:
        for kind, url in cases.items():
            broker = KombuBroker(url=url, connect_timeout=2,
                                 connection_name=f"sec-{uuid.uuid4().hex[:6]}")
            try:
                with pytest.raises(ConnectionClosed) as info:
                    run_bounded(lambda b=broker: b.enqueue(_message("sec-q")), 30, kind)
            finally:
                broker.close()
            assert leaked(forms, *error_texts(info.value)) == [], (kind, info.value)
        for url in (secret_url.replace("amqp://", "amqp//"),
                    secret_url.replace(":5672", ":port")):
            with pytest.raises(ValueError) as info:
                KombuBroker(url=url)
            assert leaked(forms, *error_texts(info.value)) == [], info.value
    finally:
        watch.remove()
    assert watch.leaks == []


def test_server_shows_the_connection_name_and_no_password(secret, secret_url, vhost):
    user, password, forms = secret
    name = f"sec-{uuid.uuid4().hex[:6]}"
    broker = KombuBroker(url=secret_url, connection_name=name)
    try:
        queue = f"sec-{uuid.uuid4().hex[:6]}"
        broker.declare_queue(queue, ensure=True)
        broker.enqueue(_message(queue))
        consumer = broker.consume(queue)
        try:
            listing = wait_one_connection_each(vhost, [f"{name}-consumer",
                                                          f"{name}-producer"])
            assert sorted(n for n in listing if n.startswith(name)) == [
                f"{name}-consumer", f"{name}-producer"]
            everything = rabbit_admin.rabbitmqctl(
                "list_connections", "name", "user", "vhost", "client_properties",
                "auth_mechanism", "peer_host", "peer_port", "host", "port", "protocol",
                "--formatter", "json")
            assert leaked(forms, everything) == []
            assert user in everything  # the listing does show this user's connections
        finally:
            consumer.close()
    finally:
        broker.close()


# ---------------------------------------------------------------------------------------- TLS


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory):
    assert have_openssl(), "the TLS tests need the openssl CLI (apt-get install openssl)"
    directory = tmp_path_factory.mktemp("tls")
    files = make_tls_files(directory)
    files["other"] = make_server_cert(files, directory, ["not-this-host.example"])
    files["name-only"] = make_server_cert(files, directory, ["localhost"], stem="name-only")
    return files


@pytest.fixture(scope="module")
def tls_proxy(tls_files):
    """TLS with a certificate for localhost from the test CA."""
    with FaultProxy(tls=server_tls_context(tls_files)) as proxy:
        yield proxy


@pytest.fixture(scope="module")
def wrong_name_proxy(tls_files):
    """TLS with a certificate from the test CA, but for another host name."""
    with FaultProxy(tls=server_tls_context(tls_files["other"])) as proxy:
        yield proxy


def _amqps(vhost: str, port: int) -> str:
    return f"amqps://guest:guest@localhost:{port}/{vhost}"


def _tls_error(url: str, **options) -> ConnectionClosed:
    broker = KombuBroker(url=url, connect_timeout=3,
                         connection_name=f"tls-{uuid.uuid4().hex[:6]}", **options)
    try:
        with pytest.raises(ConnectionClosed) as info:
            # A bound far above the retry budget (connect_timeout): a handshake must not hang.
            run_bounded(lambda: broker.enqueue(_message("tls-q")), 30, "enqueue")
    finally:
        broker.close()
    return info.value


def _round_trip(url: str, verified: bool = True, **options) -> KombuBroker:
    """A worker on ``url`` processes a message sent on ``url``; returns the (closed) broker."""
    broker = KombuBroker(url=url, connect_timeout=5,
                         connection_name=f"tls-{uuid.uuid4().hex[:6]}", **options)
    queue = f"tls-{uuid.uuid4().hex[:6]}"
    seen = Recorder()

    @dramatiq.actor(broker=broker, queue_name=queue, actor_name="tls_actor")
    def tls_actor(value):
        seen.add(value)

    worker = dramatiq.Worker(broker, worker_threads=2, worker_timeout=100)
    worker.start()
    try:
        tls_actor.send("over tls")
        assert seen.wait(1, timeout=30)
        assert seen.snapshot() == ["over tls"]
        for connection in (broker.producer_connection, broker.consumer_connection):
            sock = connection.connection.transport.sock
            assert isinstance(sock, TLSSocket)
            # getpeercert() is empty unless the certificate was verified.
            assert bool(sock.getpeercert()) is verified
    finally:
        run_bounded(lambda: worker.stop(timeout=10_000), 30, "worker.stop()")
        broker.close()
    return broker


def test_amqps_verifies_the_certificate_and_host_name_by_default(
        tls_files, tls_proxy, wrong_name_proxy, vhost, caplog):
    caplog.set_level(logging.WARNING)
    # Trusting the test CA is all it takes for the right server.
    _round_trip(_amqps(vhost, tls_proxy.port), ssl={"ca_certs": tls_files["ca"]})
    # No options at all (amqps:// alone, or ssl=True): the unknown CA is refused, promptly.
    for options in ({}, {"ssl": True}):
        accepted = tls_proxy.accepted
        error = _tls_error(_amqps(vhost, tls_proxy.port), **options)
        assert "CERTIFICATE_VERIFY_FAILED" in str(error), (options, error)
        # One connection per attempt of the one enqueue, then ConnectionClosed: no retry loop.
        assert 1 <= tls_proxy.accepted - accepted <= MAX_ENQUEUE_ATTEMPTS, (
            tls_proxy.accepted - accepted)
    # A trusted certificate for another host name is refused (host name checked by default,
    # also when cert_reqs is given without server_hostname).
    for options in ({"ca_certs": tls_files["ca"]},
                    {"ca_certs": tls_files["ca"], "cert_reqs": ssl.CERT_REQUIRED}):
        error = _tls_error(_amqps(vhost, wrong_name_proxy.port), ssl=options)
        assert "CERTIFICATE_VERIFY_FAILED" in str(error), (options, error)
        assert "mismatch" in str(error), error  # "Hostname mismatch"
    # None of that turned verification off, so nothing warned about it.
    assert [r for r in caplog.records if "verification is OFF" in r.getMessage()] == []


def test_amqps_worker_refuses_an_unverified_server(tls_proxy, vhost):
    """The consumer side verifies too: a worker logs the failure and never consumes."""
    broker = KombuBroker(url=_amqps(vhost, tls_proxy.port), connect_timeout=3,
                         connection_name=f"tls-{uuid.uuid4().hex[:6]}")
    dramatiq.actor(lambda: None, broker=broker, actor_name="tls_refused",
                   queue_name=f"tls-{uuid.uuid4().hex[:6]}")
    watch = LogWatch().install()
    worker = dramatiq.Worker(broker, worker_threads=1, worker_timeout=100)
    since = time.monotonic()
    try:
        worker.start()
        lines = watch.wait_for("Consumer encountered a connection error", since, 10)
        assert lines and "CERTIFICATE_VERIFY_FAILED" in lines[0], lines
    finally:
        run_bounded(lambda: worker.stop(timeout=10_000), 30, "worker.stop()")
        broker.close()
        watch.remove()


def test_turning_verification_off_takes_an_explicit_option_and_logs_a_warning(
        wrong_name_proxy, vhost, caplog):
    caplog.set_level(logging.WARNING)
    _round_trip(_amqps(vhost, wrong_name_proxy.port), verified=False,
                ssl={"cert_reqs": ssl.CERT_NONE})
    warnings = [r for r in caplog.records
                if r.levelno == logging.WARNING and "verification is OFF" in r.getMessage()]
    assert warnings, [r.getMessage() for r in caplog.records]
    assert "localhost" in warnings[0].getMessage()


def test_amqps_reconnects_with_the_host_name_it_first_verified(tls_files, vhost):
    """The host name checked on a reconnect is the one in the URL, as on the first connect.

    The server's certificate names ``localhost`` (no IP address in it, as certificates for
    host names usually have none). After the connection drops, the broker must reconnect.
    """
    with FaultProxy(tls=server_tls_context(tls_files["name-only"])) as proxy:
        broker = KombuBroker(url=_amqps(vhost, proxy.port), connect_timeout=3,
                             connection_name=f"tls-{uuid.uuid4().hex[:6]}",
                             ssl={"ca_certs": tls_files["ca"]})
        try:
            queue = f"tls-{uuid.uuid4().hex[:6]}"
            broker.declare_queue(queue, ensure=True)
            broker.enqueue(_message(queue))
            for attempt in range(2):
                proxy.kill()  # the network drops the connection
                connection = broker.producer_connection
                deadline = time.monotonic() + 10
                while connection.connected and time.monotonic() < deadline:
                    time.sleep(0.05)
                try:
                    broker.enqueue(_message(queue))
                except ConnectionClosed as exc:
                    raise AssertionError(f"reconnect {attempt + 1} failed: {exc}") from None
            assert broker.get_queue_message_counts(queue)[0] == 3
        finally:
            broker.close()
