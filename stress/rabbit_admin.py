"""Small helpers that administer the real RabbitMQ through ``rabbitmqctl``.

Every call spawns ``rabbitmqctl`` (an Erlang VM), which takes about 0.5-1 s: fine for tests,
too slow for hot loops.

Facts about ``rabbitmqctl --formatter json`` on RabbitMQ 3.10 (checked on the real server):

* The output is one JSON array, one object per row: ``[\\n{...}\\n,{...}\\n]\\n``; an empty list
  is ``[\\n]\\n``.
* AMQP tables (``client_properties``, queue ``arguments``) are lists of ``[key, type, value]``
  triples, nested tables too, e.g.
  ``[["product","longstr","py-amqp"],["connection_name","longstr","x"],
  ["capabilities","table",[["connection.blocked","bool",true], ...]]]``.
  The helpers below turn them into plain dicts.
* A connection's ``name`` is ``"<peer host>:<peer port> -> <host>:<port>"``, not the client's
  ``connection_name`` (that one is only in ``client_properties``).
* ``close_all_connections REASON`` without ``-p`` only closes the connections of vhost ``/``;
  ``--global`` closes those of every vhost.
* A connection that was just closed can still be listed for a short moment, and one that was just
  force-closed too: use :func:`wait_for_connections` rather than a single count.

``RABBITMQCTL`` in the environment overrides the command (split like a shell would), e.g.
``RABBITMQCTL='docker compose exec -T rabbitmq rabbitmqctl'``.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
from collections.abc import Iterable
from typing import Any
from urllib.parse import unquote, urlsplit

from dramatiq_kombu_broker.settings import DEFAULT_URL
from stress.polling import poll

#: The server of the tests and harnesses unless ``AMQP_URL`` names another: KombuBroker's default.
DEFAULT_AMQP_URL = DEFAULT_URL

CONNECTION_COLUMNS = (
    "name",
    "client_properties",
    "vhost",
    "peer_port",
    "user",
    "pid",
    "channels",
    "state",
    "timeout",
)
CHANNEL_COLUMNS = (
    "name",
    "vhost",
    "number",
    "connection",
    "consumer_count",
    "prefetch_count",
    "messages_unacknowledged",
    "confirm",
)
QUEUE_COLUMNS = (
    "name",
    "messages",
    "messages_ready",
    "messages_unacknowledged",
    "consumers",
    "durable",
    "arguments",
)

# Places rabbitmqctl lives when /usr/sbin is not on PATH (Debian installs it there).
_FALLBACK_PATHS = ("/usr/sbin/rabbitmqctl", "/usr/local/sbin/rabbitmqctl", "/sbin/rabbitmqctl")


class RabbitmqctlError(RuntimeError):
    """rabbitmqctl is missing, failed, or timed out."""


def rabbitmqctl_command() -> list[str]:
    """The argv prefix used to run rabbitmqctl."""
    override = os.environ.get("RABBITMQCTL")
    if override:
        return shlex.split(override)
    found = shutil.which("rabbitmqctl")
    if found:
        return [found]
    for path in _FALLBACK_PATHS:
        if os.access(path, os.X_OK):
            return [path]
    raise RabbitmqctlError(
        "rabbitmqctl not found on PATH nor in /usr/sbin; the tests administer RabbitMQ with it. "
        "Install rabbitmq-server on this machine, or set RABBITMQCTL to a command that runs it "
        "(e.g. RABBITMQCTL='docker compose exec -T rabbitmq rabbitmqctl')."
    )


def rabbitmqctl(*args: str, timeout: float = 60) -> str:
    """Run ``rabbitmqctl ARGS`` and return its stdout; raise RabbitmqctlError on failure."""
    argv = [*rabbitmqctl_command(), *args]
    try:
        proc = subprocess.run(
            argv, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL
        )
    except subprocess.TimeoutExpired as exc:
        raise RabbitmqctlError(f"{shlex.join(argv)} timed out after {timeout} s") from exc
    except OSError as exc:
        raise RabbitmqctlError(f"cannot run {shlex.join(argv)}: {exc}") from exc
    if proc.returncode != 0:
        raise RabbitmqctlError(
            f"{shlex.join(argv)} exited with {proc.returncode}\n"
            f"stdout: {proc.stdout.strip()}\nstderr: {proc.stderr.strip()}"
        )
    return proc.stdout


def _json_rows(*args: str, timeout: float = 60) -> list[dict[str, Any]]:
    out = rabbitmqctl(*args, "--formatter", "json", timeout=timeout)
    text = out.strip()
    if not text:
        return []
    rows = json.loads(text)
    if not isinstance(rows, list):
        raise RabbitmqctlError(f"unexpected rabbitmqctl JSON output: {text[:500]}")
    return rows


def table_to_dict(table: Any) -> dict[str, Any]:
    """Turn an AMQP table as printed by rabbitmqctl (``[[key, type, value], ...]``) into a dict.

    Nested tables become nested dicts. Anything that is not such a list (an empty string, which
    rabbitmqctl prints for a connection still in its handshake, or an already-decoded dict) is
    handled leniently.
    """
    if isinstance(table, dict):
        return table
    result: dict[str, Any] = {}
    if not isinstance(table, list):
        return result
    for item in table:
        if isinstance(item, list) and len(item) == 3:
            key, kind, value = item
            result[key] = table_to_dict(value) if kind == "table" else value
        elif isinstance(item, list) and len(item) == 2:
            result[item[0]] = item[1]
    return result


# --------------------------------------------------------------------------------------- vhosts


def list_vhosts() -> list[str]:
    return [row["name"] for row in _json_rows("list_vhosts", "name")]


def set_permissions(
    vhost: str, user: str = "guest", configure: str = ".*", write: str = ".*", read: str = ".*"
) -> None:
    rabbitmqctl("set_permissions", "-p", vhost, user, configure, write, read)


def add_vhost(name: str, *, user: str | None = "guest") -> None:
    """Create vhost ``name`` and, unless ``user`` is None, give ``user`` full permissions on it."""
    rabbitmqctl("add_vhost", name)
    if user is not None:
        set_permissions(name, user)


def delete_vhost(name: str, *, missing_ok: bool = True) -> None:
    """Delete vhost ``name`` (its queues and connections go with it)."""
    try:
        rabbitmqctl("delete_vhost", name)
    except RabbitmqctlError:
        if missing_ok and name not in list_vhosts():
            return
        raise


# ---------------------------------------------------------------------------------- connections


def list_connections(vhost: str | None = None) -> list[dict[str, Any]]:
    """Server-side AMQP connections, optionally only those of ``vhost``.

    Each dict has the keys of CONNECTION_COLUMNS; ``client_properties`` is decoded into a dict
    (so ``conn["client_properties"].get("connection_name")`` is the client's name).
    """
    rows = _json_rows("list_connections", *CONNECTION_COLUMNS)
    result = []
    for row in rows:
        if vhost is not None and row.get("vhost") != vhost:
            continue
        row["client_properties"] = table_to_dict(row.get("client_properties"))
        result.append(row)
    return result


def connection_name_of(conn: dict[str, Any]) -> str | None:
    """The ``connection_name`` a client put in its client_properties, if any."""
    props = conn.get("client_properties") or {}
    return props.get("connection_name") if isinstance(props, dict) else None


def find_connections(
    connection_name: str | None = None,
    vhost: str | None = None,
    peer_ports: Iterable[int] | None = None,
) -> list[dict[str, Any]]:
    """Connections matching every filter given (None means "any")."""
    ports = None if peer_ports is None else {int(p) for p in peer_ports}
    return [
        conn
        for conn in list_connections(vhost)
        if (connection_name is None or connection_name_of(conn) == connection_name)
        and (ports is None or conn.get("peer_port") in ports)
    ]


def count_connections(
    connection_name: str | None = None,
    vhost: str | None = None,
    peer_ports: Iterable[int] | None = None,
) -> int:
    """How many server-side connections match every filter given (None means "any")."""
    return len(find_connections(connection_name, vhost=vhost, peer_ports=peer_ports))


def wait_for_connections(
    connection_name: str | None,
    expected: int,
    timeout: float = 10,
    *,
    vhost: str | None = None,
    peer_ports: Iterable[int] | None = None,
    interval: float = 0.2,
) -> int:
    """Poll the server until ``count_connections(...) == expected`` or ``timeout`` s pass.

    Returns the last count seen (``expected`` on success), so callers ``assert`` on it.
    """
    ports = None if peer_ports is None else list(peer_ports)
    return poll(lambda: count_connections(connection_name, vhost=vhost, peer_ports=ports),
                lambda count: count == expected, timeout, interval)


def close_connections(
    reason: str = "closed by test",
    connection_name: str | None = None,
    vhost: str | None = None,
    peer_ports: Iterable[int] | None = None,
) -> int:
    """Force-close the connections matching every filter given; returns how many were closed.
    With no filter at all this closes every connection on the node: pass one.

    rabbitmqctl 3.10's ``close_connection`` wants the connection's Erlang pid as the table
    output prints it (``<rabbit@host.N.N.N>``); the server-side name and the JSON ``#PID<...>``
    form are rejected with ``invalid_pid_syntax``.
    """
    matching = find_connections(connection_name, vhost=vhost, peer_ports=peer_ports)
    wanted = {(conn["vhost"], conn["peer_port"]) for conn in matching}
    out = rabbitmqctl("list_connections", "-q", "--no-table-headers", "pid", "peer_port", "vhost")
    closed = 0
    for line in out.splitlines():
        fields = line.split("\t")
        if len(fields) != 3 or not fields[1].isdigit():
            continue
        if (fields[2], int(fields[1])) in wanted:
            try:
                rabbitmqctl("close_connection", fields[0], reason)
            except RabbitmqctlError:
                continue  # it went away on its own in the meantime
            closed += 1
    return closed


def close_all_connections(reason: str = "closed by test", vhost: str | None = None) -> int:
    """Force-close all connections of ``vhost``, or of every vhost when ``vhost`` is None.

    Plain ``rabbitmqctl close_all_connections REASON`` only covers vhost ``/``, so this passes
    ``-p VHOST`` or ``--global``. Returns the number rabbitmqctl reports as closed.
    The server may still list them for a moment afterwards.
    """
    scope = ["--global"] if vhost is None else ["-p", vhost]
    out = rabbitmqctl("close_all_connections", *scope, reason)
    for line in out.splitlines():
        words = line.split()
        if len(words) >= 2 and words[0] == "Closed" and words[1].isdigit():
            return int(words[1])
    return 0


# ------------------------------------------------------------------------------------- channels


def channel_details(vhost: str | None = None) -> list[dict[str, Any]]:
    """Server-side channels (keys of CHANNEL_COLUMNS), optionally only those of ``vhost``.

    ``connection`` is the owning connection's Erlang pid, the ``pid`` of list_connections().
    """
    rows = _json_rows("list_channels", *CHANNEL_COLUMNS)
    return [row for row in rows if vhost is None or row.get("vhost") == vhost]


def list_channels(vhost: str | None = None) -> int:
    """How many channels are open on the server, optionally only in ``vhost``."""
    return len(channel_details(vhost))


def count_channels(vhost: str | None = None, connection_name: str | None = None) -> int:
    """Channels in ``vhost`` (None: any) whose connection has ``connection_name`` (None: any)."""
    channels = channel_details(vhost)
    if connection_name is None:
        return len(channels)
    pids = {conn["pid"] for conn in find_connections(connection_name, vhost=vhost)}
    return sum(1 for ch in channels if ch.get("connection") in pids)


# --------------------------------------------------------------------------------------- queues


def queue_details(vhost: str) -> dict[str, dict[str, Any]]:
    """name -> row (keys of QUEUE_COLUMNS, ``arguments`` decoded into a dict) for ``vhost``."""
    rows = _json_rows("list_queues", "-p", vhost, *QUEUE_COLUMNS)
    result = {}
    for row in rows:
        row["arguments"] = table_to_dict(row.get("arguments"))
        result[row["name"]] = row
    return result


def list_queues(vhost: str) -> dict[str, tuple[int, dict[str, Any]]]:
    """name -> (messages, arguments) for the queues of ``vhost``.

    ``messages`` counts ready plus unacknowledged messages; ``arguments`` is a dict such as
    ``{"x-dead-letter-exchange": "", "x-dead-letter-routing-key": "q.XQ", "x-max-priority": 10}``.
    """
    return {
        name: (int(row.get("messages") or 0), row["arguments"])
        for name, row in queue_details(vhost).items()
    }


# ---------------------------------------------------------------------------------------- URLs


def amqp_url() -> str:
    """The server to use: ``AMQP_URL``, or :data:`DEFAULT_AMQP_URL` when it is unset or empty."""
    return os.environ.get("AMQP_URL") or DEFAULT_AMQP_URL


def amqp_connect_kwargs(url: str) -> dict[str, Any]:
    """Keyword arguments for ``amqp.Connection`` from an ``amqp://user:pass@host:port/vhost`` URL.

    An empty path or ``/`` means vhost ``/``; otherwise the path (URL-unquoted, without its leading
    slash) is the vhost, as kombu reads it.
    """
    parts = urlsplit(url)
    host = parts.hostname or "127.0.0.1"
    if ":" in host:  # IPv6 literal
        host = f"[{host}]"
    port = parts.port or (5671 if parts.scheme in ("amqps", "pyamqps") else 5672)
    path = parts.path[1:] if parts.path.startswith("/") else parts.path
    return {
        "host": f"{host}:{port}",
        "userid": unquote(parts.username) if parts.username else "guest",
        "password": unquote(parts.password) if parts.password else "guest",
        "virtual_host": unquote(path) if path else "/",
    }
