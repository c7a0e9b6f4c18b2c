"""KombuBroker's options, checked once at construction so a mistake names its argument."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from kombu_pyamqp_threadsafe import KombuConnection

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
    blocked_timeout: float | None = 30.0

    @classmethod
    def from_arguments(cls, url: str | list[str] | None, **options: Any) -> BrokerSettings:
        unknown = set(options) - set(cls.__dataclass_fields__)
        if unknown:
            raise TypeError(f"KombuBroker got unexpected argument(s): {', '.join(sorted(unknown))}")
        settings = cls(urls=_parse_urls(url), **options)
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
        for name in ("heartbeat", "connect_timeout"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise ValueError(f"{name} must be a number of seconds >= 0, got {value!r}")
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
        timeout = self.blocked_timeout
        if timeout is not None and (isinstance(timeout, bool)
                                    or not isinstance(timeout, (int, float)) or timeout < 0):
            raise ValueError(f"blocked_timeout must be a number of seconds >= 0 or None, "
                             f"got {timeout!r}")
        if not (isinstance(self.max_delay, int) and self.max_delay > 0):
            raise ValueError(f"max_delay must be a positive number of milliseconds, "
                             f"got {self.max_delay!r}")

    @property
    def masked_url(self) -> str:
        """The URL(s) with passwords masked, for logs and repr()."""
        return ";".join(mask_url(url) for url in self.urls)

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
        options["blocked_timeout"] = self.blocked_timeout
        url: str | list[str] = self.urls if len(self.urls) > 1 else self.urls[0]
        # No pool limit: each publishing thread keeps a channel (the broker's
        # _with_producer_channel), so the bound is the server's channel_max, whose error says so.
        return KombuConnection(url, heartbeat=self.heartbeat, connect_timeout=self.connect_timeout,
                               ssl=self.ssl or False, transport_options=options,
                               channel_pool_limit=None)


def _parse_urls(url: str | list[str] | None) -> list[str]:
    if url is None:
        return [DEFAULT_URL]
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
