"""KombuBroker's options, checked once at construction so a mistake names its argument."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from kombu_pyamqp_threadsafe import KombuConnection

from .connection_parameters import (
    merge_tuning,
    parameters_list,
    reject_mixing,
    split_url_query,
    url_from_parameters,
)
from .reconnect import failover_order
from .topology import CLASSIC, check_queue_options, declarations

DEFAULT_URL = "amqp://guest:guest@127.0.0.1:5672/"
SCHEMES = ("amqp", "amqps", "pyamqp")
#: Longest accepted delay: a year. A delayed message waits unacked on a consumer, so a longer
#: one is almost certainly a unit mistake (seconds for milliseconds).
DEFAULT_MAX_DELAY_MS = 366 * 24 * 3600 * 1000


@dataclass(frozen=True)
class BrokerSettings:
    urls: list[str] = field(repr=False)  # they hold passwords; masked_url is the printable form
    confirm_delivery: bool = True
    max_priority: int | None = None
    heartbeat: float = 60
    connection_name: str | None = None
    prefetch: int | None = None
    delay_prefetch: int | None = None
    queue_arguments: dict[str, Any] = field(default_factory=dict)
    connect_timeout: float = 10
    ssl: Any = None
    transport_options: dict[str, Any] = field(default_factory=dict)
    max_delay: int = DEFAULT_MAX_DELAY_MS
    #: Connection attempts per (re)connect, and seconds between them (pika's names). One
    #: attempt, as every connect made so far; 0.1 s, the first pause of the broker's retries.
    connection_attempts: int = 1
    retry_delay: float = 0.1
    #: Longest wait of a publish while the server blocks publishing (KombuBroker's
    #: blocked_timeout, or pika's blocked_connection_timeout); always bounded.
    blocked_timeout: float = 30.0
    #: Longest wait of a publish for its confirm; then it is retried (a possible duplicate).
    #: A healthy node confirms in milliseconds, a loaded one within a second or two; a hung
    #: queue leader holds the confirm until the cluster declares its node down (net_ticktime,
    #: 60 s by default) or it resumes. 10 s, the connect budget: a send then fails within about
    #: 20 s, below the usual 30-60 s request timeouts, instead of hanging.
    confirm_timeout: float = 10.0
    queue_type: str = CLASSIC
    delivery_limit: int | None = None

    @classmethod
    def from_arguments(cls, *, url: str | list[str] | None = None,
                       parameters: Sequence[Mapping[str, Any]] | None = None,
                       pika: Mapping[str, Any] | None = None, **options: Any) -> BrokerSettings:
        """Settings from KombuBroker's arguments: ``url`` or ``parameters`` or the ``pika``
        keyword parameters (None values are "not given"), plus KombuBroker's own ``options``."""
        pika = {name: value for name, value in (pika or {}).items() if value is not None}
        unknown = set(options) - set(cls.__dataclass_fields__)
        if unknown:
            raise TypeError(f"KombuBroker got unexpected argument(s): {', '.join(sorted(unknown))}")
        reject_mixing(url, parameters, pika)
        tuning: dict[str, Any] = {}
        if url is not None:
            urls = []
            for part in _parse_urls(url):
                stripped, query = split_url_query(part, "url")
                merge_tuning(tuning, query, "url query parameter ")
                urls.append(stripped)
        elif parameters is not None:
            urls = []
            for index, values in enumerate(parameters_list(parameters)):
                where = f"parameters[{index}]."
                address, values_tuning = url_from_parameters(values, where)
                merge_tuning(tuning, values_tuning, where)
                urls.append(address)
        elif pika:
            address, tuning = url_from_parameters(pika, "")
            urls = [address]
        else:
            urls = [DEFAULT_URL]
        options = {name: value for name, value in options.items() if value is not None}
        _apply_tuning(options, tuning)
        settings = cls(urls=urls, **options)
        settings._check()
        return settings

    def _check(self) -> None:
        if not isinstance(self.confirm_delivery, bool):
            raise ValueError(
                f"confirm_delivery must be True or False, got {self.confirm_delivery!r}"
            )
        if self.max_priority is not None and not (
            isinstance(self.max_priority, int) and 0 < self.max_priority <= 255
        ):
            raise ValueError(
                f"max_priority must be an integer from 1 to 255, got {self.max_priority!r}"
            )
        for name in ("heartbeat", "connect_timeout", "retry_delay"):
            _check_seconds(name, getattr(self, name), zero_ok=True)
        _check_seconds("confirm_timeout", self.confirm_timeout)
        _check_seconds("blocked_timeout (blocked_connection_timeout)", self.blocked_timeout)
        if isinstance(self.connection_attempts, bool) or not (
            isinstance(self.connection_attempts, int) and self.connection_attempts >= 1
        ):
            raise ValueError(f"connection_attempts must be an integer >= 1, "
                             f"got {self.connection_attempts!r}")
        for name in ("prefetch", "delay_prefetch"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, int) and 0 < value <= 65535):
                raise ValueError(f"{name} must be an integer from 1 to 65535, got {value!r}")
        if not isinstance(self.queue_arguments, dict):
            raise ValueError(f"queue_arguments must be a dict, got {self.queue_arguments!r}")
        if not isinstance(self.transport_options, dict):
            raise ValueError(f"transport_options must be a dict, got {self.transport_options!r}")
        if self.connection_name is not None and not isinstance(self.connection_name, str):
            raise ValueError(f"connection_name must be a string, got {self.connection_name!r}")
        if not (isinstance(self.max_delay, int) and self.max_delay > 0):
            raise ValueError(f"max_delay must be a positive number of milliseconds, "
                             f"got {self.max_delay!r}")
        check_queue_options(self.queue_type, self.max_priority, self.delivery_limit,
                            self.queue_arguments)

    @property
    def masked_url(self) -> str:
        """The URL(s) with passwords masked, for logs and repr()."""
        return ";".join(mask_url(url) for url in self.urls)

    def declarations(self, canonical: str) -> list[tuple[str, dict[str, Any]]]:
        """``(name, arguments)`` of ``q``, ``q.DQ`` and ``q.XQ`` for the canonical name."""
        return declarations(canonical, self.max_priority, self.queue_arguments,
                            self.queue_type, self.delivery_limit)

    def check_delay(self, delay: Any) -> None:
        if isinstance(delay, bool) or not isinstance(delay, (int, float)) or delay < 0:
            raise ValueError(f"delay must be a number of milliseconds >= 0, got {delay!r}")
        if delay > self.max_delay:
            raise ValueError(
                f"delay of {delay} ms is longer than max_delay ({self.max_delay} ms, "
                f"about {self.max_delay // 86400000} days); delays are in milliseconds"
            )

    def connection(self, role: str, confirm_publish: bool) -> KombuConnection:
        """A new (not yet connected) connection for ``role`` ("consumer" or "producer")."""
        name = self.connection_name or f"dramatiq-kombu-{os.getpid()}"
        options = dict(self.transport_options)
        options["client_properties"] = {
            **options.get("client_properties", {}), "connection_name": f"{name}-{role}",
        }
        options["confirm_publish"] = confirm_publish
        # Each connection starts on a random node of a failover list, so the workers of a
        # cluster spread over its nodes; KombuConnection then goes node after node.
        urls = failover_order(self.urls)
        options["blocked_timeout"] = self.blocked_timeout
        url: str | list[str] = urls if len(urls) > 1 else urls[0]
        # No pool limit: each publishing thread keeps a channel (the broker's
        # _with_producer_channel), so the bound is the server's channel_max, whose error says so.
        return KombuConnection(url, heartbeat=self.heartbeat, connect_timeout=self.connect_timeout,
                               ssl=self.ssl or False, transport_options=options,
                               channel_pool_limit=None)


def _is_number(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float))


def _check_seconds(name: str, value: Any, *, zero_ok: bool = False) -> None:
    """Refuse a duration that is not a finite number of seconds above 0 (or 0 too, with
    ``zero_ok``): a bound of 0 fails every wait at once, and ``inf`` is no bound (it overflows
    the waits it reaches, at first use instead of here)."""
    least = ">=" if zero_ok else ">"
    if not (_is_number(value) and math.isfinite(value) and (value > 0 or zero_ok and value == 0)):
        raise ValueError(f"{name} must be a finite number of seconds {least} 0, got {value!r}")


#: Where each pika tuning value goes in BrokerSettings.
_TUNING_FIELDS = {
    "heartbeat": "heartbeat",
    "connection_attempts": "connection_attempts",
    "retry_delay": "retry_delay",
    "socket_timeout": "connect_timeout",
    "blocked_connection_timeout": "blocked_timeout",
    "ssl_options": "ssl",
}


def _apply_tuning(options: dict[str, Any], tuning: dict[str, Any]) -> None:
    """Move pika's tuning values into ``options`` (BrokerSettings fields), refusing a value the
    broker's own arguments already set otherwise."""
    for key, value in tuning.items():
        if key == "client_properties":
            _apply_client_properties(options, value)
            continue
        target = _TUNING_FIELDS[key]
        if target in options and options[target] != value:
            raise ValueError(f"{key} is given twice, as {value!r} and as {target}="
                             f"{options[target]!r}")
        if key == "heartbeat" and callable(value):
            raise ValueError("heartbeat must be a number of seconds: pika's callable "
                             "negotiation hook does not map")
        options[target] = value


def _apply_client_properties(options: dict[str, Any], properties: Any) -> None:
    if not isinstance(properties, Mapping):
        raise ValueError(f"client_properties must be a dict, got {properties!r}")
    properties = dict(properties)
    if "capabilities" in properties:
        raise ValueError("client_properties['capabilities'] cannot be set: the transport "
                         "announces the capabilities it implements")
    name = properties.pop("connection_name", None)
    if name is not None:
        if options.get("connection_name", name) != name:
            raise ValueError(f"client_properties['connection_name'] ({name!r}) contradicts "
                             f"connection_name={options['connection_name']!r}")
        options["connection_name"] = name
    transport_options = dict(options.get("transport_options") or {})
    transport_options["client_properties"] = {
        **transport_options.get("client_properties", {}), **properties,
    }
    options["transport_options"] = transport_options


def _parse_urls(url: str | list[str]) -> list[str]:
    if isinstance(url, str):
        urls = [part.strip() for part in url.split(";") if part.strip()]
    elif isinstance(url, (list, tuple)) and all(isinstance(part, str) for part in url):
        urls = list(url)
    else:
        raise ValueError(f"url must be a string or a list of strings, got {type(url).__name__}")
    if not urls:
        raise ValueError("url is empty")
    for part in urls:
        _check_url(part)
    return urls


def mask_url(url: str) -> str:
    """``url`` with its password replaced by ``***``."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{parts.username}:***@{netloc}"))


def _check_url(url: str) -> None:
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number
    except ValueError as exc:
        raise ValueError(f"url is malformed ({exc}): {_mask_loosely(url)!r}") from None
    if parts.scheme not in SCHEMES or "://" not in url:
        raise ValueError(f"url must start with amqp://, amqps:// or pyamqp://, got "
                         f"{_mask_loosely(url)!r}")


def _mask_loosely(url: str) -> str:
    """Mask credentials of a URL that may not parse: drop everything before the last '@'."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        scheme, rest = "", url
    return f"{scheme}{sep}***@{rest.rpartition('@')[2]}" if "@" in rest else url
