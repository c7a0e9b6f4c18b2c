"""TLS for a socket that one reader thread and many writer threads share.

OpenSSL forbids using one ``SSL`` object from two threads at once, and CPython releases the GIL
inside ``SSLSocket.recv_into`` and ``SSLSocket.write``: a reader and a writer on one
``SSLSocket`` can corrupt the stream or crash. :class:`TLSSocket` keeps the TLS state in an
``ssl.SSLObject`` over two memory BIOs and does the socket I/O itself on the raw TCP socket:

- the TLS object and both BIOs are touched only under ``_tls_lock``, held for encrypting or
  decrypting and never across a socket call;
- ciphertext leaves the outgoing BIO only under that lock, into ``_unsent``, so ``_unsent``
  holds records in the order the TLS object made them, whoever made them (a writer's
  application data, or the reader's reply to a TLS 1.2 renegotiation);
- ``_unsent`` is sent from the left only by the holder of ``_send_lock``; writers (who hold the
  connection's write lock too) send blocking, the reader only without blocking;
- many messages are encrypted and sent in one ``sendmsg``, as on plain TCP.

Asynchronous exceptions (dramatiq's TimeLimit) land only between bytecodes. Taking each message
off the writer's queue and encrypting it happen in one C call (``deque.extend(map(write,
feed))``), so a message is either still queued or encrypted into the outgoing BIO; ciphertext
moves from the BIO to ``_unsent`` in one C call too; a thread interrupted after encrypting sends
``_unsent`` on its way out (else the next writer does). What cannot be told apart (a send
interrupted after ``sendmsg`` took a batch, in the main thread, where signals can cut a send
short; a fatal TLS error; a renegotiation's write that cannot be repeated) breaks the stream:
the socket is shut down and the connection fails, never half a record on the wire.
"""

from __future__ import annotations

import socket
import ssl
import threading
import time
from collections import deque
from collections.abc import Iterable
from contextlib import suppress
from itertools import islice, repeat, starmap, tee
from time import monotonic
from typing import Any

from .greenlets import sockets_are_cooperative, system_socket

#: The most plaintext one TLS record carries.
RECORD_SIZE = 16 * 1024
#: Bytes read from the raw socket at once.
RECV_SIZE = 64 * 1024
#: Buffers per ``sendmsg`` (Linux takes at most 1024).
MAX_IOV = 512
#: How long a write waits for a TLS 1.2 renegotiation to let it go on, when no bound is given.
RENEGOTIATION_TIMEOUT = 30.0
#: How often a write waiting out a renegotiation looks whether the reader has decrypted
#: since (a poll holds no lock an async exception could leak; renegotiations are rare).
RENEGOTIATION_POLL = 0.05

_EOF_ERRORS = (ssl.SSLZeroReturnError, ssl.SSLEOFError)


class TLSSocket:
    """The socket-like face of an ``SSLObject`` over a raw TCP socket, safe to share between
    one reading thread and writing threads that take turns (the connection's write lock).

    ``recv``/``recv_into``/``pending`` are for the one reading thread, ``sendmsg``/``sendall``
    for a writer holding the write lock (``sendmsg`` with ``MSG_DONTWAIT``, and ``shutdown``
    and ``close``, for anyone).
    """

    def __init__(self, sock: socket.socket, context: ssl.SSLContext, *,
                 server_hostname: str | None = None, server_side: bool = False,
                 timeout: float | None = None) -> None:
        self._sock = sock
        # Under gevent the reader's read that must not wait goes to the socket inside the
        # cooperative one, which would wait for the rest of a record.
        self._cooperative = sockets_are_cooperative()
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._tls = context.wrap_bio(self._incoming, self._outgoing, server_side=server_side,
                                     server_hostname=server_hostname)
        # The C object behind the SSLObject: called from C (map) it leaves no bytecode, so no
        # room for an asynchronous exception, between taking a message and encrypting it.
        self._ssl: Any = getattr(self._tls, "_sslobj", self._tls)
        # Guards the TLS object, both BIOs and the fields next to them: held only while
        # encrypting, decrypting or moving ciphertext, never across a socket call.
        self._tls_lock = threading.Lock()
        # Decrypting calls so far (written under _tls_lock; a renegotiating write polls it).
        self._reads = 0
        # Ciphertext taken from the outgoing BIO, in the order it was made, not yet sent
        # (appended under _tls_lock, taken from the left only under _send_lock).
        self._unsent: deque[bytes] = deque()
        # Guards the raw socket's outbound byte stream. Writers hold it across a blocking send
        # (they hold the connection's write lock as well, so they never wait for each other
        # here); the reader only tries it and sends without blocking.
        self._send_lock = threading.Lock()
        # Plaintext decrypted ahead when a read's buffer filled at a record boundary, so that
        # pending() is exact (reader only).
        self._spill = b""
        self._eof = False
        # Whether decrypted data waits (pending()), and whether the incoming BIO surely holds
        # no whole record (so a read goes to the socket first). Written under _tls_lock.
        self._ready = False
        self._starved = False
        self._broken: BaseException | None = None
        self._notified = False
        self._scratch = memoryview(bytearray(RECV_SIZE))
        self._renegotiation_timeout = timeout or RENEGOTIATION_TIMEOUT

    @classmethod
    def over(cls, wrapped: ssl.SSLSocket, timeout: float | None = None) -> TLSSocket:
        """Take over an ``SSLSocket`` that has not handshaken: its context, peer name and
        descriptor (so the options that built it, py-amqp's, stay the only ones)."""
        context, hostname, server_side = wrapped.context, wrapped.server_hostname, \
            wrapped.server_side
        family, kind, proto, previous = wrapped.family, wrapped.type, wrapped.proto, \
            wrapped.gettimeout()
        raw = socket.socket(family, kind, proto, fileno=wrapped.detach())
        raw.settimeout(previous)
        return cls(raw, context, server_hostname=hostname, server_side=server_side,
                   timeout=timeout)

    # -- handshake -------------------------------------------------------------------------

    def do_handshake(self, timeout: float | None = None) -> None:
        """Handshake through the BIO pair, within ``timeout`` seconds in all. Certificate and
        host name are verified here, as the context says."""
        deadline = None if timeout is None else monotonic() + timeout
        while True:
            with self._tls_lock:
                try:
                    self._ssl.do_handshake()
                    done = True
                except ssl.SSLWantReadError:
                    done = False
                finally:
                    self._unsent.extend(iter(self._outgoing.read, b""))
            self._bound(deadline)
            self._send_unsent()
            if done:
                return
            self._bound(deadline)
            received = self._raw_recv(0)
            with self._tls_lock:
                if received:
                    self._incoming.write(received)
                else:
                    self._incoming.write_eof()

    def _bound(self, deadline: float | None) -> None:
        if deadline is None:
            return
        remaining = deadline - monotonic()
        if remaining <= 0:
            raise TimeoutError("TLS handshake timed out")
        self._sock.settimeout(remaining)

    # -- reading (one thread) --------------------------------------------------------------

    def pending(self) -> int:
        """Nonzero when decrypted data (or the end of the stream) waits that no poll of the
        socket would announce. Set under the TLS lock by each decryption; read without it."""
        return int(self._ready)

    def recv_into(self, buffer: Any, nbytes: int = 0, flags: int = 0) -> int:
        """Decrypt into ``buffer`` what has arrived (0 at the end of the stream).

        Reads the raw socket at most once, without blocking (the caller polled it or saw
        ``pending()``); ``ssl.SSLWantReadError`` when only part of a record has arrived yet.
        """
        view = memoryview(buffer)
        if nbytes:
            view = view[:nbytes]
        got = None if self._starved else self._decrypt_into(view)
        if got is None:
            try:
                received = self._raw_recv(socket.MSG_DONTWAIT)
            except BlockingIOError:
                raise ssl.SSLWantReadError("part of a TLS record has arrived") from None
            got = self._decrypt_into(view, received)
            if got is None:
                raise ssl.SSLWantReadError("part of a TLS record has arrived")
        return got

    def recv(self, bufsize: int, flags: int = 0) -> bytes:
        """Blocking read of up to ``bufsize`` decrypted bytes (the handshake's, before the
        reader thread starts); the raw socket's timeout applies."""
        buffer = bytearray(bufsize)
        view = memoryview(buffer)
        got = self._decrypt_into(view)
        while got is None:
            got = self._decrypt_into(view, self._raw_recv(0))
        return bytes(buffer[:got])

    def _raw_recv(self, flags: int) -> memoryview:
        """One read of the raw socket (outside the TLS lock); empty at its end."""
        scratch = self._scratch
        sock = self._sock
        if flags and self._cooperative:
            sock = system_socket(sock)
        return scratch[: sock.recv_into(scratch, 0, flags)]

    def _decrypt_into(self, view: memoryview, received: memoryview | None = None) -> int | None:
        """Under the TLS lock, hand ``received`` ciphertext to the TLS object (empty: the TCP
        stream ended), then decrypt into ``view`` as much as has arrived: the byte count, 0 at
        the end of the stream, None when a whole record is still missing."""
        size = len(view)
        got: int | None = 0
        with self._tls_lock:
            try:
                if received is not None:
                    if received:
                        self._incoming.write(received)
                    else:
                        self._incoming.write_eof()
                got = self._read_into(view, size)
            finally:
                self._reads += 1
                produced = self._outgoing.pending
                if produced:
                    # TLS 1.2 renegotiation (or a TLS 1.3 reply) made records while reading.
                    self._unsent.extend(iter(self._outgoing.read, b""))
        if produced:
            self._send_unsent_nowait()
        return got

    def _read_into(self, view: memoryview, size: int) -> int | None:
        """Under the TLS lock: the decrypting loop of _decrypt_into; sets _ready and _starved."""
        if self._eof:
            return 0
        got = 0
        spill = self._spill
        if spill:
            got = min(size, len(spill))
            view[:got] = spill[:got]
            self._spill = spill = spill[got:]
            if spill:
                return got
        read = self._ssl.read
        try:
            while got < size:
                got += read(size - got, view[got:])
        except ssl.SSLWantReadError:
            # No whole record left: nothing is ready until the socket brings more.
            self._ready = False
            self._starved = True
            return got or None
        except _EOF_ERRORS:
            # close_notify (SSL_ERROR_ZERO_RETURN), or the TCP stream ended without it (read
            # as the end too, like upstream's suppress_ragged_eofs).
            self._eof = self._ready = True
            self._starved = False
            return got
        # The buffer is full. Look one record ahead, so pending() tells whether decrypted data
        # waits that no poll of the socket would announce.
        self._starved = False
        if not self._ssl.pending() and self._incoming.pending:
            try:
                self._spill = read(RECORD_SIZE)
            except ssl.SSLWantReadError:
                self._starved = True
            except _EOF_ERRORS:
                self._eof = True
        self._ready = self._eof or bool(self._spill) or self._ssl.pending() > 0
        return got

    # -- writing (the write lock's holder) -------------------------------------------------

    def sendmsg(self, buffers: Iterable[Any], ancdata: Any = (), flags: int = 0,
                address: Any = None) -> int:
        """Encrypt every buffer (taking each from ``buffers`` only as it is encrypted) and send
        them, after any ciphertext made before; the plaintext byte count, always all of it.

        Blocking, by the holder of the connection's write lock. With ``MSG_DONTWAIT`` it sends
        what the socket takes now and leaves the rest, in order, to the next write.
        """
        try:
            return self._encrypt(buffers)
        finally:
            # Also on an interrupt: what was encrypted goes out now, not with the next write.
            if flags & socket.MSG_DONTWAIT:
                self._send_unsent_nowait()
            else:
                self._send_unsent()

    def send(self, data: Any, flags: int = 0) -> int:
        return self.sendmsg((data,), (), flags)

    def sendall(self, data: Any) -> None:
        self.sendmsg((data,))

    def _encrypt(self, buffers: Iterable[Any]) -> int:
        broken = self._broken
        if broken is not None:
            raise BrokenPipeError(f"TLS stream broken: {broken!r}")
        counts: deque[int] = deque()
        taken, feed = tee(buffers)  # the renegotiation retry's copy (below)
        done = 0  # items of ``taken`` already accounted for
        retry = None
        deadline = None
        while True:
            with self._tls_lock:
                try:
                    write = self._ssl.write
                    if retry is not None:
                        counts.append(write(retry))
                        retry = None
                    counts.extend(map(write, feed))  # pops each message as it encrypts it
                    return sum(counts)
                except ssl.SSLWantReadError:
                    # A TLS 1.2 renegotiation: OpenSSL reads the peer's next handshake message
                    # before it writes again, and the failed write must be repeated with the
                    # same bytes.
                    if retry is None:
                        retry = next(islice(taken, len(counts) - done, None))
                        done = len(counts) + 1
                    seen = self._reads
                    # OpenSSL may have read records here: let the reader decrypt first.
                    self._starved = False
                    self._ready = True
                except BaseException as exc:
                    # Before the C call, or after it: every message is still queued or
                    # encrypted. An SSL error, or a write left to repeat, ends the stream.
                    if retry is not None or isinstance(exc, ssl.SSLError):
                        self._break(exc)
                    raise
                finally:
                    self._unsent.extend(iter(self._outgoing.read, b""))
            try:
                if deadline is None:
                    deadline = monotonic() + self._renegotiation_timeout
                self._send_unsent()
                # Polled, not a Condition over _tls_lock: an async exception landing in the
                # Python-level Condition just after it took the lock would leak it, and the
                # reader would hang on its next decrypt.
                while self._reads == seen:
                    left = deadline - monotonic()
                    if left <= 0:
                        raise TimeoutError("TLS renegotiation did not complete")
                    # time.sleep looked up at each call: gevent's monkey-patching replaces it.
                    time.sleep(min(RENEGOTIATION_POLL, left))
            except BaseException as exc:
                # The failed write was never repeated: the stream cannot go on.
                self._break(exc)
                raise

    def _send_unsent(self) -> None:
        """Send all of ``_unsent``, blocking. Lets the send lock go only with ``_unsent`` seen
        empty, and looks again after letting it go (the reader may have added records while
        it held it)."""
        unsent = self._unsent
        lock = self._send_lock
        while unsent:
            with lock:
                while unsent:
                    self._send_batch(0)

    def _send_unsent_nowait(self) -> None:
        """Send what the socket takes now of ``_unsent`` (the reader's way). If a writer holds
        the send lock, that writer sends it; what the socket does not take now goes with the
        next write (at the latest the next heartbeat)."""
        lock = self._send_lock
        if not lock.acquire(blocking=False):
            return
        try:
            while self._unsent and self._send_batch(socket.MSG_DONTWAIT):
                pass
        except OSError:
            pass  # the reader finds the broken connection on its next read
        finally:
            lock.release()

    def _send_batch(self, flags: int) -> bool:
        """Under the send lock: one ``sendmsg`` from the left of ``_unsent``; False when a
        non-blocking send would block. A remainder goes back to the front."""
        broken = self._broken
        if broken is not None:
            raise BrokenPipeError(f"TLS stream broken: {broken!r}")
        unsent = self._unsent
        first = unsent[0]
        kept, counted, feed = tee(starmap(unsent.popleft, repeat((), min(len(unsent), MAX_IOV))),
                                  3)
        sent: list[int] = []
        try:
            # Pops the batch as it sends it; the count is stored by the same C call, so an
            # interrupt landing as sendmsg returns finds it (as in FrameWriter._flush).
            sent.extend(map(self._sock.sendmsg, (feed,), ((),), (flags,)))
            total = sum(map(len, counted))
            if sent[0] < total:
                unsent.appendleft(b"".join(kept)[sent[0]:])
            return True
        except BlockingIOError:
            unsent.extendleft(reversed(list(kept)))  # nothing was sent (reader thread only)
            return False
        except BaseException as exc:
            left = not unsent or unsent[0] is not first
            if left and not self._sent_whole(exc, sent[0] if sent else None, kept):
                self._break(exc)
            raise

    @staticmethod
    def _sent_whole(exc: BaseException, sent: int | None, kept: Any) -> bool:
        """Whether a batch interrupted after leaving ``_unsent`` surely reached the kernel whole.

        ``sent`` is what ``sendmsg`` returned, None if it raised. A blocking send returns early
        for a signal in any thread (the same reasoning as FrameWriter's for plain TCP), so
        only the count tells a whole batch."""
        if isinstance(exc, OSError) or sent is None:
            return False
        return sent == sum(map(len, kept))

    def _break(self, exc: BaseException) -> None:
        """The outbound stream lost bytes or order: never write to it again; shutting the socket
        down makes the reader see the end and fail the connection."""
        if self._broken is None:
            self._broken = exc
        with suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)

    # -- closing ---------------------------------------------------------------------------

    def _close_notify(self) -> None:
        """Queue close_notify after everything written so far and send it if the socket takes
        it now; never blocks (the connection is going away)."""
        if self._notified or self._broken is not None:
            return
        self._notified = True
        with self._tls_lock:
            try:
                self._ssl.shutdown()
            except (ssl.SSLWantReadError, ssl.SSLError, ValueError):
                pass  # close_notify is queued; the peer's is not awaited
            finally:
                self._unsent.extend(iter(self._outgoing.read, b""))
        self._send_unsent_nowait()

    def shutdown(self, how: int) -> None:
        """Send close_notify (without blocking), then shut the TCP socket down."""
        self._close_notify()
        self._sock.shutdown(how)

    def unwrap(self) -> socket.socket:
        """Upstream's ``_shutdown_transport`` (an unshared connection): close_notify, then the
        raw socket."""
        self._close_notify()
        return self._sock

    def close(self) -> None:
        """Close the descriptor; no TLS (safe in a forked child)."""
        self._sock.close()

    # -- socket and TLS information --------------------------------------------------------

    def fileno(self) -> int:
        return self._sock.fileno()

    def gettimeout(self) -> float | None:
        return self._sock.gettimeout()

    def settimeout(self, timeout: float | None) -> None:
        self._sock.settimeout(timeout)

    def setsockopt(self, *args: Any) -> None:
        self._sock.setsockopt(*args)

    def getsockopt(self, *args: Any) -> Any:
        return self._sock.getsockopt(*args)

    def getsockname(self) -> Any:
        return self._sock.getsockname()

    def getpeername(self) -> Any:
        return self._sock.getpeername()

    def getpeercert(self, binary_form: bool = False) -> Any:
        with self._tls_lock:
            return self._tls.getpeercert(binary_form)

    def cipher(self) -> Any:
        with self._tls_lock:
            return self._tls.cipher()

    def version(self) -> str | None:
        with self._tls_lock:
            return self._tls.version()
