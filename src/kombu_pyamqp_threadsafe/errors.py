"""Errors raised by the thread-safe transport.

They subclass py-amqp's hierarchy so kombu classifies them as it classifies py-amqp's own:
a lost connection is recoverable (``ensure()`` reconnects), a connection the application
closed is not (nothing retries into a closed connection).
"""

from __future__ import annotations

from amqp.exceptions import (
    IrrecoverableConnectionError,
    RecoverableChannelError,
    RecoverableConnectionError,
)


class ConnectionLostError(RecoverableConnectionError):
    """The shared connection died under this thread (server close, socket error, heartbeats)."""


class ConnectionClosedError(IrrecoverableConnectionError):
    """The application closed the shared connection while this thread was using it."""


class ChannelOwnershipError(RuntimeError):
    """A thread called a method that waits for a reply on a channel another thread owns.

    Replies are delivered to the owning thread only, so letting a second thread wait would
    steal or lose them. Methods without a reply (acks, nacks, rejects, publishes without
    confirms) may be sent from any thread.
    """


class ChannelTakenOverError(RecoverableChannelError):
    """Another thread closed (or adopted) the channel this thread was waiting on, so the
    reply or confirm it waited for will not reach it."""


class ConfirmsOutOfStepError(RecoverableChannelError):
    """An earlier publish with confirms on this channel was interrupted, so whether the
    server counted its delivery tag is unknown; the channel was closed (open another)."""


class ChannelPoolLimitError(RuntimeError):
    """The channel pool gave out ``limit`` channels and none came back in time."""


class Failure:
    """Why a shared connection stopped, raised afresh in every thread that touches it.

    One exception object must not be raised in many threads at once (each raise rewrites
    its traceback), so each caller gets a new instance chained to the original cause.
    """

    def __init__(self, error_type: type[Exception], message: str, cause: BaseException | None):
        self.error_type = error_type
        self.message = message
        self.cause = cause

    def for_caller(self) -> Exception:
        error = self.error_type(self.message)
        error.__cause__ = self.cause
        return error
