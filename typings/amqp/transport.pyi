import socket
import ssl as _ssl
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

AMQP_PORT: int
EMPTY_BUFFER: bytes
SIGNED_INT_MAX: int
AMQP_PROTOCOL_HEADER: bytes
DEFAULT_SOCKET_SETTINGS: dict[int, int]

def to_host_port(host: str, default: int = ...) -> tuple[str, int]: ...

class _AbstractTransport:
    connected: bool
    # None before connect() and after close().
    sock: socket.socket | None
    host: str
    port: int
    connect_timeout: float | None
    read_timeout: float | None
    write_timeout: float | None
    socket_settings: dict[int, int] | None
    raise_on_initial_eintr: bool
    _read_buffer: bytes
    # Set by _setup_transport: the socket's sendall and recv (or the SSL object's read).
    _write: Callable[[bytes], None]
    _quick_recv: Callable[[int], bytes]
    def __init__(self, host: str, connect_timeout: float | None = None,
                 read_timeout: float | None = None, write_timeout: float | None = None,
                 socket_settings: dict[int, int] | None = None,
                 raise_on_initial_eintr: bool = True, **kwargs: Any) -> None: ...
    def connect(self) -> None: ...
    @contextmanager
    def having_timeout(self, timeout: float | None) -> Iterator[socket.socket | None]: ...
    def _setup_transport(self) -> None: ...
    def _shutdown_transport(self) -> None: ...
    def _read(self, n: int, initial: bool = False) -> bytes: ...
    def close(self) -> None: ...
    def read_frame(self, unpack: Any = ...) -> tuple[int, int, bytes]: ...
    def write(self, s: bytes) -> None: ...

class SSLTransport(_AbstractTransport):
    sslopts: dict[str, Any]
    def _wrap_socket(self, sock: socket.socket, context: dict[str, Any] | None = None,
                     **sslopts: Any) -> _ssl.SSLSocket: ...
    def __init__(self, host: str, connect_timeout: float | None = None,
                 ssl: dict[str, Any] | _ssl.SSLContext | bool | None = None,
                 **kwargs: Any) -> None: ...

class TCPTransport(_AbstractTransport): ...

def Transport(host: str, connect_timeout: float | None = None, ssl: Any = False,  # noqa: N802
              **kwargs: Any) -> _AbstractTransport: ...
