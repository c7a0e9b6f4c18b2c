"""kombu transports that use the shared connection, and the two ways to install them."""

from __future__ import annotations

import logging
import ssl
import threading
from typing import Any

from kombu import transport as kombu_transports
from kombu.transport import pyamqp
from kombu.utils.url import parse_url

from .connection import Connection

logger = logging.getLogger(__name__)


class Transport(pyamqp.Transport):
    """kombu's pyamqp transport on a connection many threads can share."""

    Connection = Connection

    # Upstream: may be driven by kombu's async event loop (celery's hub), which reads the
    # socket itself. The reader thread owns the socket here, so that loop cannot be used.
    implements = pyamqp.Transport.implements.extend(asynchronous=False)

    # Upstream: with ``ssl=True`` the server's certificate is checked but not its host name
    # (py-amqp checks the name only when server_hostname is given). Here amqps verifies both
    # by default; ``ssl={"cert_reqs": ssl.CERT_NONE}`` turns verification off, with a warning.
    def establish_connection(self) -> Any:
        conninfo = self.client
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
        super().__init__(client, **kwargs)


_PATH = "kombu_pyamqp_threadsafe.transport"
#: Guards the edits of kombu's transport alias table and its resolution cache.
_registry_lock = threading.Lock()


def _install(aliases: dict[str, str]) -> None:
    with _registry_lock:
        kombu_transports.TRANSPORT_ALIASES.update(aliases)
        for name in aliases:
            kombu_transports._transport_cache.pop(name, None)


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
