"""AMQP 0-9-1 frame encoding and decoding for a connection shared by many threads.

Writing: every frame of one method (method, content header, body frames) is encoded into a
single buffer and written with one ``sendall`` under the connection's write lock. One C call
per message means an asynchronous exception (dramatiq's TimeLimit, shutdown) can never land
between two frames of a message and leave the shared stream half-written; py-amqp's own
writer issues one ``write`` per body frame from a Python loop.

Reading: :class:`FrameBuffer` splits whatever ``recv`` returned into whole frames, so the
reader does one system call for many frames instead of three per frame.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from struct import Struct
from time import monotonic
from typing import Any

from amqp.exceptions import UnexpectedFrame

_HEADER = Struct(">BHI")
_METHOD_SIG = Struct(">HH")
_CONTENT_HEADER = Struct(">HHQ")
FRAME_END = b"\xce"
HEARTBEAT_FRAME = _HEADER.pack(8, 0, 0) + FRAME_END


def encode_method(
    frame_type: int,
    channel: int,
    method_sig: tuple[int, int] | None,
    args: bytes | str | None,
    content: Any,
    frame_max: int,
) -> bytes:
    """Encode one method (and its content, if any) as the bytes of all its frames."""
    if frame_type == 8:
        return HEARTBEAT_FRAME
    if isinstance(args, str):
        args = args.encode("utf-8")
    payload = _METHOD_SIG.pack(*method_sig) + (args or b"")
    parts = [_HEADER.pack(frame_type, channel, len(payload)), payload, FRAME_END]
    if content is not None:
        body = content.body
        if isinstance(body, str):
            encoding = content.properties.setdefault("content_encoding", "utf-8")
            body = body.encode(encoding)
        header = _CONTENT_HEADER.pack(method_sig[0], 0, len(body)) + content._serialize_properties()
        parts += (_HEADER.pack(2, channel, len(header)), header, FRAME_END)
        chunk = frame_max - 8
        view = memoryview(body)
        for start in range(0, len(body), chunk):
            piece = view[start : start + chunk]
            parts += (_HEADER.pack(3, channel, len(piece)), piece, FRAME_END)
    return b"".join(parts)


class FrameWriter:
    """The only path to the socket's outbound byte stream after the handshake."""

    def __init__(self, connection: Any, transport: Any) -> None:
        self._connection = connection
        self._transport = transport
        # Guards the socket's outbound byte stream: one message's frames are written whole.
        # Held across sendall (a blocking write), never across a read. An RLock because it
        # knows its owner, which lets a write release it exactly when it holds it.
        self.lock = threading.RLock()
        self.last_write = monotonic()

    def __call__(
        self,
        frame_type: int,
        channel: int,
        method_sig: tuple[int, int] | None,
        args: bytes | str | None,
        content: Any,
    ) -> None:
        connection = self._connection
        failure = connection._failure
        if failure is not None:
            raise failure.for_caller()
        data = encode_method(frame_type, channel, method_sig, args, content, connection.frame_max)
        timeouts = getattr(self._transport, "write_timeouts", None)
        timeout = getattr(timeouts, "value", None)
        lock = self.lock
        try:
            # Acquired inside the try: an asynchronous exception (dramatiq's TimeLimit) raised
            # as acquire() returns must still release the lock, or every thread would hang.
            if not lock.acquire(timeout=-1 if timeout is None else timeout):
                raise TimeoutError("timed out waiting to write to the shared connection")
            failure = connection._failure
            if failure is not None:
                raise failure.for_caller()
            try:
                self._transport.write(data)
            except OSError as exc:
                failure = connection._failure
                if failure is not None:  # the socket was shut because the connection stopped
                    raise failure.for_caller() from exc
                raise
            self.last_write = monotonic()
        finally:
            if lock._is_owned():
                lock.release()

    def try_write_heartbeat(self) -> bool:
        """Send a heartbeat unless another thread is writing (its bytes count as one)."""
        if not self.lock.acquire(blocking=False):
            return False
        try:
            self._transport.write(HEARTBEAT_FRAME)
            self.last_write = monotonic()
        finally:
            self.lock.release()
        return True


class FrameBuffer:
    """Accumulates received bytes and yields complete ``(type, channel, payload)`` frames."""

    def __init__(self, initial: bytes = b"") -> None:
        self._buf = bytearray(initial)

    def feed(self, data: bytes, on_frame: Callable[[tuple[int, int, bytes]], Any]) -> None:
        buf = self._buf
        buf += data
        offset = 0
        end = len(buf)
        while end - offset >= 7:
            frame_type, channel, size = _HEADER.unpack_from(buf, offset)
            frame_end = offset + 7 + size
            if frame_end >= end:
                break
            if buf[frame_end] != 0xCE:
                raise UnexpectedFrame(
                    f"Received frame_end {buf[frame_end]:#04x} while expecting 0xce"
                )
            on_frame((frame_type, channel, bytes(buf[offset + 7 : frame_end])))
            offset = frame_end + 1
        if offset:
            del buf[:offset]

