"""kombu transports that use the shared connection, and the two ways to install them."""

from __future__ import annotations

import logging
import ssl
import threading
from typing import Any
from urllib.parse import quote

from amqp.exceptions import RecoverableConnectionError
from kombu import transport as kombu_transports
from kombu.transport import pyamqp
from kombu.utils.url import as_url, parse_url

from .channel import Channel
from .connection import Connection
from .registry import SharedConnection, registry

logger = logging.getLogger(__name__)

#: Heartbeat (seconds) of a connection whose client asks for none (kombu's default is 0).
DEFAULT_HEARTBEAT = 60.0


class Transport(pyamqp.Transport):
    """kombu's pyamqp transport on a connection many threads can share.

    Every kombu.Connection on it is a handle: handles with the same parameters in one process
    share one AMQP connection (registry.py).
    """

    _shared: SharedConnection | None = None
    _key: tuple[Any, ...] | None = None

    # Upstream: the connection class establish_connection() instantiates, with the client's
    # heartbeat; 0 (kombu's default, and what Celery's synchronous worker loop asks for, since
    # it cannot tick them) turns heartbeats off. Here the reader thread ticks them on every
    # connection, so 0 means DEFAULT_HEARTBEAT; transport_options={"heartbeat": 0} turns them
    # off.
    def Connection(self, **options: Any) -> Connection:  # type: ignore[override]  # noqa: N802
        client: Any = self.client
        if not options.get("heartbeat") and "heartbeat" not in (client.transport_options or {}):
            options["heartbeat"] = DEFAULT_HEARTBEAT
        return Connection(**options)

    # Upstream: may be driven by kombu's async event loop (celery's hub), which reads the
    # socket itself. The reader thread owns the socket here, so that loop cannot be used.
    implements = pyamqp.Transport.implements.extend(asynchronous=False)

    # Upstream: opens a socket for every kombu.Connection. Here the connection of the same
    # parameters already open in this process is shared (opened by the first handle).
    def establish_connection(self) -> Any:
        if self.client is None:
            raise TypeError("establish_connection() needs the kombu.Connection this transport "
                            "was made for (Transport(client))")
        # Computed once: the connect below changes the client's fields for its duration, and
        # other threads of this client may ask for the connection meanwhile.
        key = self._key
        if key is None:
            key = self._key = self.connection_key()
        entry, connection = registry.connect(self.client, key, self._open_connection)
        self._shared = entry
        return connection

    # Upstream: closes the socket. Here the socket closes with its last handle.
    def close_connection(self, connection: Any) -> None:
        last = self._release()
        if last is not None:
            last.close()

    # Upstream: drops the socket without closing it (after fork, after a connection error).
    # Here only this handle is dropped, unless it is the last one.
    def _collect(self, connection: Any) -> None:
        last = self._release()
        if last is not None:
            last.collect()

    def _release(self) -> Any:
        entry, self._shared = self._shared, None
        return registry.release(entry, self.client) if entry is not None else None

    def default_channel(self, connection: Any) -> Channel:
        """The calling thread's channel on the shared ``connection`` (upstream: one channel
        per kombu.Connection, used by whichever thread holds it)."""
        entry = self._shared
        if entry is None:
            # No connection (any more): another thread's collect() (kombu's ensure() after a
            # connection error) dropped it since the caller connected. A connection error, so
            # that retries connect again (RuntimeError was retried by nothing).
            raise RecoverableConnectionError(
                "default_channel: this connection was released (collect() or close() in "
                "another thread); connect again")
        return registry.thread_channel(entry, connection)

    def connection_key(self) -> tuple[Any, ...]:
        """What makes two kombu.Connections share a socket: every parameter of the socket.

        The heartbeat counts as given (0 and None differ): a Celery worker asks for 0 on its
        consuming and event connections and for nothing on the connections its tasks publish
        on, so those get a socket of their own, and flow control that blocks task publishers
        does not stop the worker's consumer.
        """
        client: Any = self.client
        defaults = self.default_connection_params
        hostname = client.hostname or defaults["hostname"]
        options = client.transport_options or {}
        return (
            "127.0.0.1" if hostname == "localhost" else hostname,
            client.port or defaults["port"], client.userid or defaults["userid"],
            client.password or defaults["password"], client.virtual_host or "/",
            repr(client.ssl), client.login_method or defaults["login_method"], client.insist,
            client.heartbeat, client.credential_provider,
            repr(sorted(options.items(), key=lambda item: str(item[0]))),
        )

    # Upstream: with ``ssl=True`` the server's certificate is checked but not its host name
    # (py-amqp checks the name only when server_hostname is given). Here amqps verifies both
    # by default; ``ssl={"cert_reqs": ssl.CERT_NONE}`` turns verification off, with a warning.
    def _open_connection(self) -> Any:
        conninfo: Any = self.client
        given, hostname = conninfo.ssl, conninfo.hostname
        if not given:
            return super().establish_connection()
        conninfo.ssl = verified_tls_options(given, hostname)
        try:
            return super().establish_connection()
        finally:
            # kombu rewrites "localhost" to "127.0.0.1" in place; the next connect must verify
            # the certificate against the name the application gave again.
            conninfo.ssl, conninfo.hostname = given, hostname

    def register_with_event_loop(self, connection: Any, loop: Any) -> None:
        raise NotImplementedError(
            "the thread-safe transport reads its socket in its own thread; "
            "it cannot be registered with an event loop"
        )


class SSLTransport(Transport):
    """The same over TLS (``amqps://``)."""

    def __init__(self, client: Any, **kwargs: Any) -> None:
        super().__init__(client, **kwargs)
        if not client.ssl:
            client.ssl = True


class SchemeTransport(Transport):
    """Target of the ``shared+<scheme>://`` URL form.

    kombu reads ``a+b://`` as transport ``a`` with the URL ``b://...`` left unparsed, so this
    transport parses it: ``shared+amqp://`` and ``shared+pyamqp://`` give plain AMQP,
    ``shared+amqps://`` gives TLS.
    """

    can_parse_url = True

    # Upstream (kombu.Connection): ``a+b://`` keeps ``a`` as uri_prefix, and info()/clone()
    # put it back in front of the hostname, so a parsed connection cloned to
    # "shared+127.0.0.1" and then to "shared+shared+127.0.0.1". Here the prefix is dropped
    # once the URL is parsed into the connection's fields, and the connection names the
    # concrete transport (``shared+amqp``/``shared+amqps``), which its copies keep.
    def __init__(self, client: Any, **kwargs: Any) -> None:
        hostname = client.hostname or ""
        if "://" in hostname:
            url = parse_url(hostname)
            scheme = url.pop("transport")
            if scheme not in ("amqp", "pyamqp", "amqps"):
                raise ValueError(f"shared+{scheme}:// is not an AMQP URL; use shared+amqp://, "
                                 "shared+pyamqp:// or shared+amqps://")
            for key in ("hostname", "port", "userid", "password", "virtual_host"):
                if url.get(key) is not None:
                    setattr(client, key, url[key])
            if scheme == "amqps" and not client.ssl:
                client.ssl = True
        if client.uri_prefix == "shared":
            client.uri_prefix = None
            client.transport_cls = "shared+amqps" if client.ssl else "shared+amqp"
        super().__init__(client, **kwargs)

    # Upstream: a transport that parses its own URL prints the hostname as its URI. Here the
    # connection's fields, as ``shared+amqp://`` (``shared+amqps://`` over TLS).
    def as_uri(self, uri: str, include_password: bool = False, mask: str = "**") -> str:
        client: Any = self.client
        scheme = "shared+amqps" if client.ssl else "shared+amqp"
        defaults = self.default_connection_params
        password: Any = client.password or defaults["password"]
        if not include_password:
            password = mask
        elif callable(password):
            password = password()
        return as_url(scheme, client.hostname or defaults["hostname"],
                      client.port or defaults["port"], client.userid or defaults["userid"],
                      password, quote(client.virtual_host or "/"), sanitize=not include_password,
                      mask=mask)


_PATH = "kombu_pyamqp_threadsafe.transport"
#: Guards the edits of kombu's transport alias table and its resolution cache.
_registry_lock = threading.Lock()


def _install(aliases: dict[str, str]) -> None:
    from . import kombu_hooks

    with _registry_lock:
        kombu_transports.TRANSPORT_ALIASES.update(aliases)
        for name in aliases:
            kombu_transports._transport_cache.pop(name, None)
    kombu_hooks.install()


def uses_shared_transport(connection: Any) -> bool:
    """Whether a kombu.Connection runs on this module's transports (without importing any)."""
    transport_cls = connection.transport_cls
    if isinstance(transport_cls, type):
        return issubclass(transport_cls, Transport)
    target = kombu_transports.TRANSPORT_ALIASES.get(transport_cls or "amqp")
    return isinstance(target, str) and target.startswith(_PATH + ":")


def monkeypatch_pyamqp_transport() -> None:
    """Make ``pyamqp://``, ``amqp://`` and ``amqps://`` thread-safe for this process.

    kombu connections created afterwards use the shared-connection transport. Calling it
    again changes nothing.
    """
    _install({
        "amqp": f"{_PATH}:Transport",
        "pyamqp": f"{_PATH}:Transport",
        "amqps": f"{_PATH}:SSLTransport",
    })


def add_shared_amqp_transport() -> None:
    """Register ``shared+pyamqp``, ``shared+amqp`` and ``shared+amqps``.

    Both forms work: ``kombu.Connection("shared+amqp://guest:guest@localhost//")`` and
    ``kombu.Connection("amqp://...", transport="shared+amqp")``.
    """
    _install({
        "shared": f"{_PATH}:SchemeTransport",
        "shared+amqp": f"{_PATH}:Transport",
        "shared+pyamqp": f"{_PATH}:Transport",
        "shared+amqps": f"{_PATH}:SSLTransport",
    })


def verified_tls_options(given: Any, hostname: str | None) -> dict[str, Any]:
    """py-amqp TLS options that verify the certificate and the host name unless told not to."""
    options = dict(given) if isinstance(given, dict) else {}
    if "context" in options:
        return options
    options.setdefault("cert_reqs", ssl.CERT_REQUIRED)
    if options["cert_reqs"] == ssl.CERT_NONE:
        logger.warning("TLS certificate verification is OFF for %s (ssl cert_reqs=CERT_NONE): "
                       "the connection can be intercepted", hostname)
    elif options.get("server_hostname") is None:
        options["server_hostname"] = hostname
    return options
