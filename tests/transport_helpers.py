"""Shared helpers for the ``test_transport_*`` suites (real RabbitMQ, no mocks).

* :class:`Proxy` (from ``stress.tcp_proxy``): a TCP proxy on 127.0.0.1 in front of the server
  that can stop forwarding (a silent peer) or cut every connection; with an ``ssl.SSLContext``
  it terminates TLS.
* :func:`make_tls_files`: a throw-away CA and a ``localhost`` server certificate (openssl CLI);
  :func:`make_server_cert`: another server certificate signed by that CA.
* :class:`Worker`: a daemon thread that records its result, its exception and when it raised.
* :func:`reap_child`: lets a forked child end and reaps it, with a deadline.
* :func:`open_fds` (from ``stress.resources``) / :func:`settled` /
  :func:`assert_cycles_leak_nothing`: leak accounting.
"""

from __future__ import annotations

import os
import shutil
import signal
import ssl
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote

from amqp import spec
from amqp.serialization import dumps

import kombu_pyamqp_threadsafe as ts

# Re-exported for the tests: the fault scenarios of stress/ use them too.
from stress.polling import poll
from stress.resources import open_fds as open_fds
from stress.tcp_proxy import Proxy as Proxy


def kombu_connection(url: str, name: str, **kwargs: Any) -> ts.KombuConnection:
    """A KombuConnection that the server lists under client connection_name ``name``."""
    options = dict(kwargs.pop("transport_options", None) or {})
    properties = dict(options.get("client_properties") or {})
    properties["connection_name"] = name
    options["client_properties"] = properties
    return ts.KombuConnection(url, transport_options=options, **kwargs)


def url_for(vhost: str, port: int = 5672, scheme: str = "amqp", host: str = "127.0.0.1") -> str:
    return f"{scheme}://guest:guest@{host}:{port}/{quote(vhost, safe='')}"


def provoke_server_close(conn: ts.KombuConnection) -> None:
    """Make the server close the connection (Connection.Close, 504 CHANNEL_ERROR) by sending a
    second channel.open on an open channel. Fast, unlike rabbitmqctl."""
    channel = conn.default_channel
    conn.connection.frame_writer(1, channel.channel_id, spec.Channel.Open, dumps("s", ("",)),
                                 None)


def message_count(channel: Any, queue_name: str) -> int:
    return channel.queue_declare(queue=queue_name, passive=True).message_count


def wait_message_count(channel: Any, queue_name: str, expected: int, timeout: float = 5.0) -> int:
    """The queue's ready count once it equals ``expected`` (or the last one seen): RabbitMQ
    counts a message some time after its (unconfirmed) publish, even on the same channel."""
    return poll(lambda: message_count(channel, queue_name), lambda count: count == expected,
                timeout, 0.02)


# ------------------------------------------------------------------------------------- threads


class Worker(threading.Thread):
    """Runs ``fn(*args)`` in a daemon thread; keeps ``result``, ``error`` and ``error_at``."""

    def __init__(self, fn: Callable[..., Any], *args: Any, name: str | None = None) -> None:
        super().__init__(daemon=True, name=name)
        self._fn = fn
        self._args = args
        self.result: Any = None
        self.error: BaseException | None = None
        self.error_at: float | None = None

    def run(self) -> None:
        try:
            self.result = self._fn(*self._args)
        except BaseException as exc:  # noqa: BLE001 - the test inspects it
            self.error_at = time.monotonic()
            self.error = exc


def start_all(workers: list[Worker]) -> list[Worker]:
    for worker in workers:
        worker.start()
    return workers


def join_all(workers: list[threading.Thread], timeout: float) -> list[threading.Thread]:
    """Join every thread within ``timeout`` seconds in total; return those still running."""
    deadline = time.monotonic() + timeout
    for worker in workers:
        worker.join(max(0.0, deadline - time.monotonic()))
    return [worker for worker in workers if worker.is_alive()]


def reap_child(pid: int, go: int, report: int, timeout: float = 30.0) -> int:
    """Let a forked child that waits for a byte on pipe ``go`` end, close the parent's ends of
    both pipes and reap the child within ``timeout`` s (killed after that, an AssertionError);
    returns its exit code."""
    try:
        os.write(go, b"x")
    finally:
        os.close(go)
        os.close(report)
    reaped, status = poll(lambda: os.waitpid(pid, os.WNOHANG), lambda r: r[0] == pid, timeout)
    if reaped != pid:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        raise AssertionError(f"the forked child {pid} did not end within {timeout} s")
    return os.waitstatus_to_exitcode(status)



# ------------------------------------------------------------------------------------ accounting


def settled(measure: Callable[[], int], limit: int, timeout: float = 5.0) -> int:
    """Poll ``measure()`` until it is <= ``limit`` (threads and sockets end asynchronously)."""
    return poll(measure, lambda value: value <= limit, timeout)


def assert_cycles_leak_nothing(cycle: Callable[[], Any], times: int = 100, slack: int = 2) -> int:
    """Run ``cycle`` once (objects made lazily exist from then on), then ``times`` times more:
    threads and open descriptors may grow by ``slack`` at most. Returns the thread count from
    before the ``times`` cycles."""
    cycle()
    threads_before = threading.active_count()
    fds_before = open_fds()
    for _ in range(times):
        cycle()
    threads = settled(threading.active_count, threads_before + slack)
    assert threads <= threads_before + slack, f"{threads - threads_before} more threads"
    fds = settled(open_fds, fds_before + slack)
    assert fds <= fds_before + slack, f"{fds - fds_before} more open descriptors"
    return threads_before


# ---------------------------------------------------------------------------------------- TLS


def have_openssl() -> bool:
    return shutil.which("openssl") is not None


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)


def _sign_server_cert(ca: dict[str, Path], directory: Path, stem: str, common_name: str,
                      alt_names: str) -> dict[str, str]:
    """A server certificate ``<stem>.pem`` (key ``<stem>.key``) for the subjectAltName
    ``alt_names``, signed by the CA ``ca`` (``{"pem": ..., "key": ...}``)."""
    key, csr, pem = (directory / f"{stem}.key", directory / f"{stem}.csr",
                     directory / f"{stem}.pem")
    ext = directory / f"{stem}.ext"
    ext.write_text(
        "basicConstraints=critical,CA:FALSE\n"
        "keyUsage=critical,digitalSignature,keyEncipherment\n"
        "extendedKeyUsage=serverAuth\n"
        f"subjectAltName={alt_names}\n"
        "subjectKeyIdentifier=hash\n"
        "authorityKeyIdentifier=keyid,issuer\n"
    )
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(csr),
             "-subj", f"/CN={common_name}")
    _openssl("x509", "-req", "-in", str(csr), "-CA", str(ca["pem"]), "-CAkey", str(ca["key"]),
             "-CAcreateserial", "-out", str(pem), "-days", "2", "-sha256",
             "-extfile", str(ext))
    return {"ca": str(ca["pem"]), "cert": str(pem), "key": str(key)}


def make_tls_files(directory: Path) -> dict[str, str]:
    """Write a self-signed CA and a server certificate for ``localhost`` / 127.0.0.1.

    Returns paths: ``ca`` (CA certificate), ``cert`` and ``key`` (server).
    """
    directory = Path(directory)
    ca = {"pem": directory / "ca.pem", "key": directory / "ca.key"}
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(ca["key"]),
             "-out", str(ca["pem"]), "-days", "2", "-subj", "/CN=kombu-pyamqp-threadsafe test CA",
             "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    return _sign_server_cert(ca, directory, "server", "localhost", "DNS:localhost,IP:127.0.0.1")


def make_server_cert(tls_files: dict[str, str], directory: Path, names: list[str],
                     stem: str = "other") -> dict[str, str]:
    """A server certificate for the DNS ``names`` only (no IP address) signed by the CA of
    :func:`make_tls_files`; files ``<stem>.pem`` and ``<stem>.key``."""
    ca = {"pem": Path(tls_files["ca"]), "key": Path(tls_files["ca"]).with_name("ca.key")}
    return _sign_server_cert(ca, Path(directory), stem, names[0],
                             ",".join(f"DNS:{n}" for n in names))


def server_tls_context(files: dict[str, str]) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(files["cert"], files["key"])
    return context
