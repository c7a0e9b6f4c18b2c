from typing import Any

from .serialization import GenericContent

class Message(GenericContent):
    delivery_info: dict[str, Any]
    body: bytes | str
    channel: Any
    # Upstream's default is '' (a str), but a body is bytes as often: both are sent as they are
    # (a str encoded with content_encoding).
    def __init__(self, body: bytes | str = "", children: Any = None, channel: Any = None,
                 **properties: Any) -> None: ...
    @property
    def headers(self) -> dict[str, Any] | None: ...
    @property
    def delivery_tag(self) -> int | None: ...
