import socket
from collections.abc import Callable
from typing import Any, NoReturn

from .abstract_channel import AbstractChannel
from .channel import Channel as _Channel
from .spec import method_t

class Connection(AbstractChannel):
    Channel: type[_Channel]
    connection_errors: tuple[type[BaseException], ...]
    channel_errors: tuple[type[BaseException], ...]
    recoverable_connection_errors: tuple[type[BaseException], ...]
    recoverable_channel_errors: tuple[type[BaseException], ...]
    heartbeat: float | None
    client_heartbeat: float | None
    server_heartbeat: float | None
    last_heartbeat_sent: float
    last_heartbeat_received: float
    bytes_sent: int
    bytes_recv: int
    authentication: tuple[Any, ...]
    client_properties: dict[str, Any]
    locale: str
    host: str
    virtual_host: str
    # Instances of the connection's Channel class (a subclass chooses it), by channel id;
    # None once the connection is collected.
    channels: dict[int, Any] | None
    # Negotiated in the handshake (the constructor's value, possibly None, before it).
    channel_max: int
    frame_max: int
    confirm_publish: bool
    ssl: Any
    read_timeout: float | None
    write_timeout: float | None
    socket_settings: dict[int, int] | None
    on_blocked: Callable[[str], Any] | None
    on_unblocked: Callable[[], Any] | None
    version_major: int
    version_minor: int
    server_properties: dict[str, Any]
    mechanisms: list[bytes]
    locales: list[str]
    connect_timeout: float | None
    # What Transport() returned (a subclass chooses the class); None before connect() and
    # after collect().
    _transport: Any
    # What frame_writer_cls built (a subclass chooses the class); None before connect().
    _frame_writer: Any
    _used_channel_ids: Any
    # How each incoming method's arguments are read, by method signature.
    _METHODS: dict[tuple[int, int], method_t]
    def __init__(self, host: str = "localhost:5672", userid: str = "guest",
                 password: str = "guest", login_method: str | None = None,
                 login_response: Any = None, authentication: Any = (),
                 virtual_host: str = "/", locale: str = "en_US",
                 client_properties: dict[str, Any] | None = None, ssl: Any = False,
                 connect_timeout: float | None = None, channel_max: int | None = None,
                 frame_max: int | None = None, heartbeat: float = 0, on_open: Any = None,
                 on_blocked: Callable[[str], Any] | None = None,
                 on_unblocked: Callable[[], Any] | None = None, confirm_publish: bool = False,
                 on_tune_ok: Any = None, read_timeout: float | None = None,
                 write_timeout: float | None = None,
                 socket_settings: dict[int, int] | None = None, frame_handler: Any = ...,
                 frame_writer: Any = ..., **kwargs: Any) -> None: ...
    def __enter__(self) -> Connection: ...
    def __exit__(self, *eargs: object) -> None: ...
    def then(self, on_success: Any, on_error: Any = None) -> Any: ...
    def connect(self, callback: Callable[[], Any] | None = None) -> Any: ...
    # _transport and _frame_writer, connecting first when not connected yet.
    @property
    def transport(self) -> Any: ...
    @transport.setter
    def transport(self, transport: Any) -> None: ...
    @property
    def frame_writer(self) -> Any: ...
    @frame_writer.setter
    def frame_writer(self, frame_writer: Any) -> None: ...
    def Transport(self, host: str, connect_timeout: float | None, ssl: Any = False,  # noqa: N802
                  read_timeout: float | None = None, write_timeout: float | None = None,
                  socket_settings: Any = None, **kwargs: Any) -> Any: ...
    @property
    def connected(self) -> bool: ...
    def collect(self) -> None: ...
    def _get_free_channel_id(self) -> int: ...
    def _claim_channel_id(self, channel_id: int) -> int: ...
    def channel(self, channel_id: int | None = None, callback: Any = None) -> Any: ...
    def is_alive(self) -> None: ...
    def drain_events(self, timeout: float | None = None) -> None: ...
    def blocking_read(self, timeout: float | None = None) -> Any: ...
    def on_inbound_method(self, channel_id: int, method_sig: tuple[int, int],
                          payload: bytes | memoryview, content: Any) -> Any: ...
    def close(self, reply_code: int = 0, reply_text: str = "",
              method_sig: tuple[int, int] = (0, 0), argsig: str = "BsBB") -> Any: ...
    def _on_close(self, reply_code: int, reply_text: str, class_id: int,
                  method_id: int) -> NoReturn: ...
    def _on_close_ok(self) -> None: ...
    def _on_blocked(self) -> Any: ...
    def _on_unblocked(self) -> Any: ...
    def send_heartbeat(self) -> None: ...
    def heartbeat_tick(self, rate: int = 2) -> None: ...
    @property
    def sock(self) -> socket.socket | None: ...
    @property
    def server_capabilities(self) -> dict[str, Any]: ...
