"""Shared fixtures. Everything talks to the REAL RabbitMQ at ``AMQP_URL``: there are no mocks.
(Pure-logic tests, which use none of the server fixtures, run without one.)

Each test session works in a fresh vhost ``test-<uuid8>`` (created and deleted with rabbitmqctl),
so tests never see queues or connections of other sessions except through ``--global`` helpers.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from contextlib import suppress
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

import amqp
import pytest

from broker_helpers import BrokerEnv
from cluster_helpers import cluster_vhost, rabbit_cluster  # noqa: F401 - session fixtures
from stress import rabbit_admin
from transport_helpers import kombu_connection

_UNREACHABLE_HINT = (
    "Start one with `make rabbitmq` (scripts/ensure-rabbitmq), `docker compose up -d rabbitmq`, "
    "or `apt-get install rabbitmq-server`, or point AMQP_URL at a running server."
)


#: Fixtures through which a test reaches RabbitMQ (``item.fixturenames`` is the closure, so
#: ``amqp_url``, ``env``, ``connect``... count through ``amqp_url_base`` and ``vhost``).
SERVER_FIXTURES = frozenset({"amqp_url_base", "vhost", "server_connections"})


def pytest_collection_finish(session: pytest.Session) -> None:
    """Fail the whole run (exit code 1, never a skip) when RabbitMQ or rabbitmqctl is missing.

    Checked only when a collected test uses the server, so that the pure-logic tests
    (``pytest tests/test_mailbox.py``) run on a machine without RabbitMQ.
    """
    if session.config.option.collectonly:
        return
    if any(SERVER_FIXTURES.intersection(getattr(item, "fixturenames", ()))
           for item in session.items):
        _require_server()


def _require_server() -> None:
    url = rabbit_admin.amqp_url()
    kwargs = rabbit_admin.amqp_connect_kwargs(url)
    conn = amqp.Connection(connect_timeout=5, **kwargs)
    try:
        conn.connect()
    except Exception as exc:
        conn.collect()
        pytest.exit(
            f"RabbitMQ does not answer at {kwargs['host']} (AMQP_URL={url}): "
            f"{type(exc).__name__}: {exc}. {_UNREACHABLE_HINT}",
            returncode=1,
        )
    conn.close()
    try:
        rabbit_admin.rabbitmqctl("list_vhosts", timeout=60)
    except rabbit_admin.RabbitmqctlError as exc:
        pytest.exit(f"rabbitmqctl does not work, and the tests need it: {exc}", returncode=1)


@pytest.fixture(scope="session")
def amqp_url_base() -> str:
    """The server to test against: ``AMQP_URL``, default ``amqp://guest:guest@127.0.0.1:5672/``."""
    return rabbit_admin.amqp_url()


@pytest.fixture(scope="session")
def vhost() -> Iterator[str]:
    """A fresh vhost ``test-<uuid8>`` with full permissions for guest, deleted at session end."""
    name = f"test-{uuid.uuid4().hex[:8]}"
    rabbit_admin.add_vhost(name, user="guest")
    try:
        yield name
    finally:
        rabbit_admin.delete_vhost(name)


@pytest.fixture(scope="session")
def amqp_url(amqp_url_base: str, vhost: str) -> str:
    """``amqp_url_base`` with its path replaced by the (URL-quoted) session vhost."""
    parts = urlsplit(amqp_url_base)
    return urlunsplit(parts._replace(path="/" + quote(vhost, safe="")))


@pytest.fixture
def amqp_connect_kwargs(amqp_url: str) -> dict:
    """``amqp.Connection(**amqp_connect_kwargs)`` connects to the session vhost."""
    return rabbit_admin.amqp_connect_kwargs(amqp_url)


@pytest.fixture
def queue_name() -> str:
    """A unique queue name ``q-<uuid8>``."""
    return f"q-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def connection_name(request: pytest.FixtureRequest) -> str:
    """A unique client ``connection_name`` (client_properties) for this test."""
    return f"t-{request.node.name[:40]}-{uuid.uuid4().hex[:8]}"


class ServerConnections:
    """Counts server-side connections by the ``connection_name`` in their client_properties.

    ``count(name)`` asks the server once; ``count.wait(name, expected, timeout)`` polls until the
    count equals ``expected`` (a just-closed connection can stay listed for a moment) and returns
    the last count seen.
    """

    def __call__(self, connection_name: str, *, vhost: str | None = None) -> int:
        return rabbit_admin.count_connections(connection_name, vhost=vhost)

    def wait(
        self, connection_name: str, expected: int, timeout: float = 10, *, vhost: str | None = None
    ) -> int:
        return rabbit_admin.wait_for_connections(connection_name, expected, timeout, vhost=vhost)


@pytest.fixture
def server_connections() -> ServerConnections:
    return ServerConnections()


@pytest.fixture
def env(amqp_url: str, vhost: str, connection_name: str) -> Iterator[BrokerEnv]:
    """A BrokerEnv (brokers and workers made through it are stopped and closed at teardown)."""
    env = BrokerEnv(amqp_url, vhost, connection_name)
    try:
        yield env
    finally:
        env.close()


@pytest.fixture
def connect(amqp_url: str, connection_name: str) -> Iterator[Callable[..., Any]]:
    """``connect(url=None, name=connection_name, **kwargs)`` -> a connected KombuConnection
    (to the session vhost by default), closed at teardown."""
    made = []

    def factory(url: str | None = None, name: str = connection_name, **kwargs: Any) -> Any:
        conn = kombu_connection(url or amqp_url, name, **kwargs)
        made.append(conn)
        conn.ensure_connection(max_retries=3)
        return conn

    yield factory
    for conn in made:
        with suppress(Exception):
            conn.close()
