"""Where a fault scenario runs (URL, vhost, the secret to look for) and how big it is."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit


@dataclass(frozen=True)
class Scale:
    """How big a scenario is. The pytest suite uses a small one, the script the full one."""

    messages: int = 3000
    threads: int = 64
    #: Threads that stream the messages (paced at ``send_rate`` in total).
    senders: int = 8
    send_rate: float = 300.0
    #: Threads that publish as fast as they can in the network-reset case.
    burst_senders: int = 64
    #: Time each message takes in the actor (so the worker holds many messages at a time).
    work_ms: float = 40.0
    #: Upper bound of one case (a hang fails the case instead of blocking forever).
    timeout: float = 240.0
    #: ``dramatiq`` CLI worker processes in the SIGTERM case.
    cli_processes: int = 2


PYTEST_SCALE = Scale(messages=1200, threads=32, senders=4, send_rate=200.0, burst_senders=32,
                     work_ms=40.0, timeout=150.0, cli_processes=1)
SCRIPT_SCALE = Scale()


@dataclass
class Context:
    """Where a scenario runs: ``url`` has the credentials and the vhost."""

    url: str
    vhost: str
    scale: Scale = PYTEST_SCALE
    #: A password that must never appear in any log line, error or repr (None: not checked).
    secret: str | None = None
    #: Where the CLI case writes its logs and records.
    work_dir: Path = field(default_factory=lambda: Path(tempfile.gettempdir()))

    def url_via(self, port: int, host: str = "127.0.0.1") -> str:
        """``url`` pointed at ``host:port`` (a proxy), same credentials and vhost."""
        parts = urlsplit(self.url)
        credentials = parts.netloc.rpartition("@")[0]
        netloc = f"{credentials}@{host}:{port}" if credentials else f"{host}:{port}"
        return urlunsplit(parts._replace(netloc=netloc))
