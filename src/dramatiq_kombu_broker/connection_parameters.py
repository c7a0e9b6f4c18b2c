"""RabbitmqBroker's connection arguments (pika's), mapped onto AMQP URLs and broker settings.

``RabbitmqBroker`` takes a URL, a failover list of pika ``ConnectionParameters`` dicts, or pika's
keyword parameters. Each form is turned here into the URLs the transport connects to and the
tuning values (heartbeat, timeouts, attempts, client properties, TLS) the broker settings keep
once for every node. A value that has no meaning on this transport raises ``ValueError`` naming
the parameter, never a silent drop.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import parse_qsl, quote, urlsplit, urlunsplit

#: pika keyword parameters taken by the constructor; with ``url`` or ``parameters`` they raise
#: RuntimeError, as RabbitmqBroker does. (``heartbeat`` is also KombuBroker's own option and
#: may be combined with a URL.)
PIKA_KEYWORDS = (
    "host", "port", "virtual_host", "credentials", "connection_attempts", "retry_delay",
    "socket_timeout", "blocked_connection_timeout", "ssl_options", "client_properties",
)
#: pika parameters in a ``parameters`` dict (PIKA_KEYWORDS plus heartbeat).
PARAMETER_KEYS = frozenset((*PIKA_KEYWORDS, "heartbeat"))
#: pika ConnectionParameters this transport has no equivalent for.
UNSUPPORTED = {
    "channel_max": "the transport uses the server's channel_max",
    "frame_max": "the transport uses py-amqp's frame size",
    "locale": "py-amqp always announces en_US",
    "stack_timeout": "use socket_timeout (connect_timeout): it bounds the TCP and AMQP handshake",
    "tcp_options": "pass socket options with transport_options={'socket_settings': ...}",
    "backpressure_detection": "pika removed it; connection.blocked is always announced",
}
#: pika URL query parameters and the keyword each one is.
URL_QUERY_KEYS = ("heartbeat", "connection_attempts", "retry_delay", "socket_timeout",
                  "blocked_connection_timeout")
PIKA_DEFAULT_HOST = "localhost"


def reject_mixing(url: Any, parameters: Any, keywords: Mapping[str, Any]) -> None:
    """RabbitmqBroker's rule: a URL, a parameters list, or keyword parameters, one of them."""
    given = sorted(name for name, value in keywords.items() if value is not None)
    if url is not None and (parameters is not None or given):
        names = ", ".join((["parameters"] if parameters is not None else []) + given)
        raise RuntimeError(f"the 'url' argument cannot be used in conjunction with pika "
                           f"parameters ({names})")
    if parameters is not None and given:
        raise RuntimeError(f"the 'parameters' argument cannot be used in conjunction with "
                           f"other pika parameters ({', '.join(given)})")


def url_from_parameters(values: Mapping[str, Any], where: str) -> tuple[str, dict[str, Any]]:
    """One pika ConnectionParameters (a dict, or the keyword arguments) as an AMQP URL plus its
    tuning values keyed by pika name. ``where`` prefixes the parameter names in errors."""
    for key in values:
        if key in UNSUPPORTED:
            raise ValueError(f"{where}{key} is not supported by KombuBroker: {UNSUPPORTED[key]}")
        if key not in PARAMETER_KEYS:
            raise ValueError(f"{where}{key} is not a pika connection parameter KombuBroker knows")
    tls = _tls(values.get("ssl_options"), f"{where}ssl_options")
    host = values.get("host") or PIKA_DEFAULT_HOST
    if not isinstance(host, str) or any(c in host for c in "/@?#") :
        raise ValueError(f"{where}host must be a host name or address, got {host!r}")
    port = values.get("port")
    if port is None:
        port = 5671 if tls is not None else 5672
    if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
        raise ValueError(f"{where}port must be an integer from 1 to 65535, got {port!r}")
    virtual_host = values.get("virtual_host", "/")
    if not isinstance(virtual_host, str):
        raise ValueError(f"{where}virtual_host must be a string, got {virtual_host!r}")
    user, password = _credentials(values.get("credentials"), f"{where}credentials")
    netloc_host = f"[{host}]" if ":" in host else host
    url = (f"{'amqps' if tls is not None else 'amqp'}://{quote(user, safe='')}:"
           f"{quote(password, safe='')}@{netloc_host}:{port}/{quote(virtual_host, safe='')}")
    tuning = {key: values[key] for key in URL_QUERY_KEYS if values.get(key) is not None}
    if values.get("client_properties") is not None:
        tuning["client_properties"] = values["client_properties"]
    if tls is not None:
        tuning["ssl_options"] = tls
    return url, tuning


def split_url_query(url: str, where: str) -> tuple[str, dict[str, Any]]:
    """``url`` without pika's query parameters (``?heartbeat=30&...``), and those parameters."""
    parts = urlsplit(url)
    if not parts.query:
        return url, {}
    tuning: dict[str, Any] = {}
    for key, text in parse_qsl(parts.query, keep_blank_values=True):
        if key not in URL_QUERY_KEYS:
            raise ValueError(f"{where} query parameter {key!r} is not supported by KombuBroker "
                             f"(supported: {', '.join(URL_QUERY_KEYS)})")
        try:
            tuning[key] = int(text) if key == "connection_attempts" else float(text)
        except ValueError:
            raise ValueError(f"{where} query parameter {key} must be a number, "
                             f"got {text!r}") from None
    return urlunsplit(parts._replace(query="")), tuning


def _credentials(credentials: Any, where: str) -> tuple[str, str]:
    if credentials is None:
        return "guest", "guest"
    if isinstance(credentials, (tuple, list)):
        if len(credentials) == 2 and all(isinstance(part, str) for part in credentials):
            return credentials[0], credentials[1]
        raise ValueError(f"{where} must be a (user, password) pair of strings or a pika "
                         f"PlainCredentials")
    # pika.PlainCredentials, recognised by its fields so pika need not be installed.
    user, password = getattr(credentials, "username", None), getattr(credentials, "password", None)
    if type(credentials).__name__ == "PlainCredentials" and isinstance(user, str) \
            and isinstance(password, str):
        return user, password
    raise ValueError(f"{where} must be a (user, password) pair or a pika PlainCredentials, got "
                     f"{type(credentials).__name__} (only PLAIN authentication maps)")


def _tls(ssl_options: Any, where: str) -> dict[str, Any] | None:
    """py-amqp TLS options for pika's ``ssl_options`` (None: plain TCP)."""
    if ssl_options is None:
        return None
    if ssl_options is True:
        return {}
    if isinstance(ssl_options, Mapping):
        return dict(ssl_options)
    if type(ssl_options).__name__ == "SSLOptions":
        raise ValueError(
            f"{where}: a pika SSLOptions carries an ssl.SSLContext, which py-amqp cannot use; "
            f"pass ssl_options (or ssl) as py-amqp's dict instead, e.g. {{'ca_certs': ..., "
            f"'certfile': ..., 'keyfile': ..., 'server_hostname': ...}}"
        )
    raise ValueError(f"{where} must be True or a dict of py-amqp TLS options, got "
                     f"{type(ssl_options).__name__}")


def merge_tuning(merged: dict[str, Any], tuning: Mapping[str, Any], where: str) -> None:
    """Add ``tuning`` into ``merged``; a value given twice must be the same everywhere (the
    broker keeps one per connection setting, for every node of a failover list)."""
    for key, value in tuning.items():
        if key in merged and merged[key] != value:
            raise ValueError(f"{where}{key} is {value!r} here but {merged[key]!r} elsewhere: "
                             f"KombuBroker uses one {key} for every node")
        merged[key] = value


def parameters_list(parameters: Any) -> Sequence[Mapping[str, Any]]:
    if isinstance(parameters, (str, bytes, Mapping)) or not isinstance(parameters, Sequence) \
            or not parameters or not all(isinstance(item, Mapping) for item in parameters):
        raise ValueError("parameters must be a non-empty list of dicts of pika connection "
                         "parameters")
    return parameters
