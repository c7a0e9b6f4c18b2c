"""A kombu pyamqp channel that belongs to one thread.

The reader thread puts every method for this channel into the owner's inbox; the owner
dispatches it when it waits. A thread that is not the owner may send methods that have no
reply (acks, nacks, rejects, publishes without confirms) but may not wait for a reply.
"""

from __future__ import annotations

import logging
import threading
from contextlib import suppress
from time import monotonic
from typing import Any

from amqp import spec
from amqp.exceptions import AMQPError, MessageNacked, RecoverableConnectionError
from amqp.serialization import dumps
from kombu.transport import pyamqp

from .deadline import bounded
from .errors import ChannelOwnershipError, ChannelTakenOverError, ConfirmsOutOfStepError, Failure
from .flow import PublishBlockedError
from .inbox import RETIRED, Mailbox

logger = logging.getLogger(__name__)

#: How long close() waits without a reply for the server's Close-Ok before it forgets the
#: channel (upstream waits forever).
CLOSE_OK_TIMEOUT = 5.0


#: Methods without a reply: any thread may send them on any channel.
ANY_THREAD_METHODS = frozenset({spec.Basic.Ack, spec.Basic.Reject, spec.Basic.Nack,
                                spec.Basic.Publish})


class Channel(pyamqp.Channel):
    """kombu's pyamqp channel with an owner thread and per-message publisher confirms."""

    _mailbox: Mailbox
    #: A reply or a confirm on this channel timed out: close() then does not wait for the
    #: Close-Ok.
    _reply_timed_out = False
    #: Its open or close broke off (see _abandon): the reader collects it once the server is
    #: done with it.
    _abandoned = False

    def __init__(self, connection: Any, channel_id: int | None = None, *args: Any,
                 **kwargs: Any) -> None:
        # Set before the channel can receive anything: the reader posts to this mailbox.
        self._mailbox = Mailbox(self, connection._current_inbox())
        self._failure: Failure | None = None
        self._publish_seq = 0
        # True from the start of a publish with confirms until its delivery tag is counted: an
        # interrupt in between leaves it True (see basic_publish_confirm).
        self._publishing = False
        self._unconfirmed: dict[int, bool | None] = {}
        #: Confirmed publishes acked / nacked by the server (counted by the owner; stats.py).
        self.confirmed = self.nacked = 0
        #: What the connection's totals hold of those, and whether the channel was collected
        #: (both set by ChannelTotals.collect, under its lock).
        self.moved = (0, 0)
        self.collected = False
        self._totals = connection.channel_totals
        try:
            super().__init__(connection, channel_id, *args, **kwargs)
        except BaseException:
            # Otherwise the thread's inbox would keep the mailbox, and with it the channel.
            self._mailbox.retire()
            raise
        # Upstream gives every channel a queue.Queue, ``returned_messages``, that neither
        # py-amqp nor kombu ever fills (returned messages go to the basic_return event). With
        # its three Conditions it weighs about as much as the rest of a channel, paid once per
        # thread with a channel per thread (docs/architecture.md). Here it is an empty tuple.
        self.returned_messages = ()

    @property
    def owner(self) -> threading.Thread | None:
        """The thread that receives this channel's replies and deliveries (None once closed)."""
        return self._mailbox.owner.thread

    def adopt(self, wake_previous: bool = True) -> None:
        """Make the calling thread the owner (a pool hands the channel to a new thread).

        Methods not yet dispatched, and all that arrive from now on, go to the caller. The
        previous owner is woken so a wait of its own on this channel does not block on; the
        pool passes ``wake_previous=False``, since a lessee that gave the channel back waits on
        it no more (waking it would only cost a spurious wake-up per lease).
        """
        connection = self.connection
        if connection is None:
            return
        inbox = connection._current_inbox()
        previous = self._mailbox.move_to(inbox)
        if wake_previous and previous is not inbox:
            previous.wake()

    def _check_owner(self) -> None:
        connection = self.connection
        owner = self._mailbox.owner
        if owner is RETIRED:  # collected by another thread (its connection failed) meanwhile
            failure = self._failure
            raise (failure.for_caller() if failure is not None
                   else RecoverableConnectionError("channel already closed"))
        if connection is not None and owner is not connection._thread_inbox():
            raise ChannelOwnershipError(
                f"channel {self.channel_id} belongs to thread {owner.thread.name!r}; "
                f"thread {threading.current_thread().name!r} cannot wait for its replies "
                "(open a channel in this thread, or take one from the channel pool)"
            )

    def _check_still_owned(self, inbox: Any) -> None:
        """Between the rounds of a wait: a channel that another thread closed or adopted
        meanwhile will never bring this thread its reply; say so instead of sleeping on."""
        owner = self._mailbox.owner
        if owner is inbox:
            return
        self._raise_if_failed()
        closer = owner.thread
        what = (f"channel {self.channel_id} was taken over by thread {closer.name!r}"
                if closer is not None else "the channel was closed by another thread")
        raise ChannelTakenOverError(
            f"{what} while thread {threading.current_thread().name!r} waited on it")

    # Upstream: forgets callbacks and the channel id. Here also the undispatched methods.
    def collect(self) -> None:
        self._mailbox.retire()
        connection = self.connection
        if connection is not None:
            connection.channel_totals.collect(self)
        super().collect()

    def _raise_if_failed(self) -> None:
        """A channel whose connection failed raises why (upstream: "connection already closed")."""
        failure = self._failure
        if failure is not None and self.connection is None:
            raise failure.for_caller()

    # Upstream: any thread may send any method. Here a method that expects a reply is refused,
    # before anything is written, unless the calling thread owns the channel; while the server
    # blocks the connection it is written only once unblocked (up to blocked_timeout).
    def send_method(self, sig: Any, *args: Any, **kwargs: Any) -> Any:
        self._raise_if_failed()
        if sig not in ANY_THREAD_METHODS:
            self._check_owner()
            if kwargs.get("wait") is not None and self.connection is not None:
                # Its reply would not come while the server blocks the connection (flow.py). A
                # close does not wait (closing a pool would take blocked_timeout per channel):
                # while blocked it raises at once and the channel goes with its connection.
                self.connection.flow.wait_before_write(0.0 if sig == spec.Channel.Close else None)
        return super().send_method(sig, *args, **kwargs)

    # Upstream: before every publish drains the connection once (timeout=0) to notice a
    # connection.blocked notification, and sets the socket's timeout around the write. Here the
    # reader thread handles connection.blocked as it arrives, and a timeout bounds the wait
    # for the write lock when a publish has to wait for it (FrameWriter), so a publish is one
    # write; a blocked connection is waited out before writing, up to blocked_timeout (flow.py).
    # A collected channel raises why its connection stopped.
    def _basic_publish(self, msg: Any, exchange: str = "", routing_key: str = "",
                       mandatory: bool = False, immediate: bool = False,
                       timeout: float | None = None, confirm_timeout: float | None = None,
                       argsig: str = "Bssbb") -> Any:
        self._raise_if_failed()
        connection = self.connection
        if connection is None:
            raise RecoverableConnectionError("basic_publish: connection closed")
        connection.flow.wait_before_write(timeout)
        args = (0, exchange, routing_key, mandatory, immediate)
        if timeout is None:
            return self.send_method(spec.Basic.Publish, argsig, args, msg)
        transport = connection.transport
        if transport is None:  # torn down since the check above
            failure = connection._failure
            raise (failure.for_caller() if failure is not None
                   else RecoverableConnectionError("basic_publish: connection closed"))
        try:
            with transport.having_timeout(timeout):
                return self.send_method(spec.Basic.Publish, argsig, args, msg)
        except TimeoutError as exc:
            # As upstream (py-amqp#452): a publish that times out is a connection error.
            raise RecoverableConnectionError("basic_publish: timed out") from exc

    basic_publish = _basic_publish

    # Upstream: waits by draining the connection from any thread. Here only the owner may wait,
    # because replies are delivered to the owner's inbox.
    # While it waits, drain_events checks that the channel is still the caller's (another
    # thread may close it: the closer adopts it), so the wait ends instead of sleeping forever,
    # and while the server blocks the connection it waits at most blocked_timeout from the
    # start of the block. Inside replies_within() (deadline.py) the wait ends by its deadline.
    def wait(self, method: Any, callback: Any = None, timeout: float | None = None,
             returns_tuple: bool = False) -> Any:
        self._check_owner()
        connection = self.connection
        if connection is None:  # upstream raises "connection already closed"
            return super().wait(method, callback=callback, timeout=timeout,
                                returns_tuple=returns_tuple)
        closing = timeout is None and method == spec.Channel.CloseOk
        try:
            # Deliveries are not deferred while closing: they are dropped then.
            with connection.waiting_for_reply(self, defer=not self.is_closing):
                return super().wait(method, callback=callback,
                                    timeout=bounded(self._close_ok_timeout() if closing
                                                    else timeout),
                                    returns_tuple=returns_tuple)
        except TimeoutError:
            if not closing:  # a close that times out abandons the channel (see close())
                # The server holds this reply and may hold the Close-Ok as long.
                self._reply_timed_out = True
            raise
        except RecoverableConnectionError:
            if self.connection is None:  # upstream's "already closed": closed by whom?
                self._check_still_owned(connection._thread_inbox())
            raise

    def _close_ok_timeout(self) -> float:
        """CLOSE_OK_TIMEOUT, or 0 once a reply or a confirm timed out: the server that holds it
        (a hung queue leader) may hold the Close-Ok as long."""
        return 0.0 if self._reply_timed_out else CLOSE_OK_TIMEOUT

    # Upstream: opens in the calling thread, which waits for Open-Ok; the channel is in the
    # connection's channels from __init__ on, so one whose open breaks off stays there. Here
    # it is abandoned (see _abandon).
    def open(self) -> Any:
        connection = self.connection
        try:
            return super().open()
        except BaseException:
            if connection is not None:
                self._abandon(connection)
            raise

    # Upstream: closes from the calling thread, which then waits for CloseOk, without a timeout.
    # Here the closing thread first takes ownership so the CloseOk reaches it (dramatiq closes
    # consumers from the main thread while their own thread is blocked in drain_events), and
    # waits at most _close_ok_timeout() without a reply, then raises TimeoutError (an OSError).
    # A close that breaks off (that timeout, an interrupt) abandons the channel; so does one
    # the server's block refuses (the Close-Ok would come only after the alarm), which returns
    # as closed.
    def close(self, reply_code: int = 0, reply_text: str = "", method_sig: tuple[int, int] = (0, 0),
              argsig: str = "BsBB") -> Any:
        connection = self.connection
        if not self.is_open or connection is None:
            return super().close(reply_code, reply_text, method_sig, argsig)
        self.adopt()
        close_args = (reply_code, reply_text, method_sig[0], method_sig[1])
        transport = connection.transport
        try:
            if transport is None:  # torn down: upstream returns, having nothing to write
                return super().close(reply_code, reply_text, method_sig, argsig)
            # The Close-Ok's bound also bounds the Close's wait for the write lock (behind a
            # send stuck on a peer that stopped reading, with the queue full).
            with transport.having_timeout(bounded(self._close_ok_timeout())):
                return super().close(reply_code, reply_text, method_sig, argsig)
        except PublishBlockedError:
            self._abandon(connection, close_args)
            return None
        except BaseException:
            self._abandon(connection, close_args)
            raise

    def close_nowait(self) -> None:
        """Close without waiting for the Close-Ok, for a channel nobody waits on (a dropped
        pool lease's): it is abandoned at once (see _abandon)."""
        connection = self.connection
        if self.is_open and connection is not None:
            self._abandon(connection)

    # Upstream: a channel whose open or close breaks off stays in the connection's channels,
    # holding its id, and open on the server, held by nobody (close() forgets its connection
    # first, so nothing frees it later). Here it leaves its owner and, if the server has it
    # open, is closed on the wire; the reader collects it, freeing its id, when the server's
    # Close-Ok (or Close) comes, so the id is never reused while the server still has the
    # channel (connection._settle_abandoned). A channel the server never heard of (its Open
    # refused before the write) is collected at once.
    def _abandon(self, connection: Any, close_args: tuple[int, str, int, int] = (0, "", 0, 0),
                 ) -> None:
        channel_id = self.channel_id
        channels = connection.channels
        if (self._abandoned or channel_id is None or channels is None
                or channels.get(channel_id) is not self):
            return  # collected already: the server is done with it
        self._abandoned = True  # read by the reader before it posts to the mailbox
        self.is_open = False  # closed as far as its users go
        for method in self._mailbox.retire():  # a Close-Ok among them settles it
            connection._settle_abandoned(self, method[0])
        writer = connection.frame_writer
        state = writer.wire_state(channel_id) if connection._failure is None else None
        if state is None:
            connection._settle_abandoned(self, None)
        elif state == "open":
            # Only queued, and written if the socket takes it now (else by the lock's holder
            # or the reader's next tick): nobody waits for it, so neither does this thread,
            # for the write lock behind a stuck send either.
            with suppress(AMQPError, OSError):
                writer.queue_method(channel_id, spec.Channel.Close, dumps("BsBB", close_args))
                writer.write_nowait(False)

    # Upstream: when the server's Close crosses ours, answers it and keeps waiting for a Close-Ok
    # that RabbitMQ does not always send. Here the server's Close completes our close.
    def _on_close(self, reply_code: int, reply_text: str, class_id: int, method_id: int) -> None:
        if not self.is_closing:
            return super()._on_close(reply_code, reply_text, class_id, method_id)
        self.send_method(spec.Channel.CloseOk)
        pending = self._pending.pop(spec.Channel.CloseOk, None)
        self._on_close_ok()
        if pending is not None:
            pending(spec.Channel.CloseOk)
        return None

    # Upstream: logs a warning for every method that arrives while the channel closes (for
    # example deliveries already in flight). Those are expected; drop them quietly.
    # The method leaves the mailbox's hand only here, as late as Python code can tell
    # (Mailbox.take): an interrupt before this line has it dispatched by the next wait.
    def dispatch_method(self, method_sig: Any, payload: Any, content: Any) -> Any:
        dispatch = super().dispatch_method
        self._mailbox.dispatching(method_sig, payload, content)
        if self.is_closing and method_sig not in self._ALLOWED_METHODS_WHEN_CLOSING:
            logger.debug("channel %s closing: dropped %s", self.channel_id, method_sig)
            return None
        return dispatch(method_sig, payload, content)

    # Upstream: waits for "the next" basic.ack/basic.nack on the channel, whichever message it
    # confirms, so a late confirm of an earlier publish (one that was returned unroutable, or
    # interrupted) would complete the next publish before the broker has it. Here each publish
    # waits for the confirm of its own delivery tag.
    #
    # The server numbers every publish it receives; this channel counts a publish once
    # _basic_publish returns. An interrupt (dramatiq's TimeLimit) that lands in the writer
    # after the send, or in a message another thread writes for it, leaves the two counts
    # apart, and from then on every publish would take the confirm of the one before it. It
    # cannot be told from here whether the message left (an interrupt can land between any
    # two bytecodes, also of an except clause), so _publishing marks the stretch from the
    # first write to the counting: if a publish finds it still set, the earlier one was
    # interrupted, and the channel is closed with ConfirmsOutOfStepError (the pool, the
    # broker and default_channel then open a new one). Guessing the count instead would, when
    # wrong the other way, make a publish wait for a confirm that never comes. A publish the
    # server's block refused (PublishBlockedError, raised before the write) clears the flag:
    # KombuBroker keeps that channel, and its next publish must not close it as out of step.
    def basic_publish_confirm(self, *args: Any, **kwargs: Any) -> Any:
        confirm_timeout = kwargs.pop("confirm_timeout", None)
        self._check_owner()
        if self._publishing:
            self._close_out_of_step()
        self._publishing = True
        if not self._confirm_selected:
            self._confirm_selected = True
            self._publish_seq = 0
            self._unconfirmed.clear()
            self.events["basic_ack"].add(self._on_confirm_ack)
            self.events["basic_nack"].add(self._on_confirm_nack)
            self.confirm_select()
        try:
            result = self._basic_publish(*args, **kwargs)
        except PublishBlockedError:
            # Refused before anything was written (flow.py): the counts are still in step.
            self._publishing = False
            raise
        self._publish_seq += 1
        self._publishing = False
        seq = self._publish_seq
        self._unconfirmed[seq] = None
        try:
            self._wait_for_confirm(seq, confirm_timeout or kwargs.get("timeout"))
        finally:
            outcome = self._unconfirmed.pop(seq, None)
        if outcome:
            self.confirmed += 1
        elif outcome is False:
            self.nacked += 1
        if self.collected:  # its counts were moved to the totals before this one: move it too
            self._totals.collect(self)
        if outcome is False:
            raise MessageNacked(f"broker nacked message {seq} on channel {self.channel_id}")
        return result

    def _close_out_of_step(self) -> None:
        self._raise_if_failed()  # a connection that stopped says so first
        channel_id = self.channel_id
        with suppress(AMQPError, OSError):
            self.close()
        raise ConfirmsOutOfStepError(
            f"an earlier publish on channel {channel_id} was interrupted, so its confirms "
            "would be out of step; the channel was closed (open another)"
        )

    def _wait_for_confirm(self, seq: int, timeout: float | None) -> None:
        """Until the confirm of ``seq``, at most ``timeout`` and the replies_within() deadline;
        with neither, woken by the connection's failure or by another thread closing the
        channel (drain_events checks the owner); while the server blocks the connection, at
        most until blocked_timeout after the block began (flow.py)."""
        deadline = None if timeout is None else monotonic() + timeout
        inbox = None
        while self._unconfirmed.get(seq) is None:
            connection = self.connection
            if connection is None:
                self._raise_if_failed()
                if inbox is not None:
                    self._check_still_owned(inbox)
                raise RecoverableConnectionError("channel closed while waiting for a confirm")
            inbox = connection._thread_inbox()
            remaining = bounded(None if deadline is None else max(0.0, deadline - monotonic()))
            try:
                with connection.waiting_for_reply(self):
                    connection.drain_events(timeout=remaining)
            except TimeoutError:
                # The server holds this confirm (a hung queue leader on another node, say):
                # it may hold the Close-Ok as long, so closing this channel does not wait.
                self._reply_timed_out = True
                raise

    def _on_confirm_ack(self, delivery_tag: int, multiple: bool) -> None:
        self._settle(delivery_tag, multiple, True)

    def _on_confirm_nack(self, delivery_tag: int, multiple: bool) -> None:
        self._settle(delivery_tag, multiple, False)

    def _settle(self, delivery_tag: int, multiple: bool, outcome: bool) -> None:
        unconfirmed = self._unconfirmed
        if multiple:
            for seq in [s for s, v in unconfirmed.items() if s <= delivery_tag and v is None]:
                unconfirmed[seq] = outcome
        elif delivery_tag in unconfirmed:
            unconfirmed[delivery_tag] = outcome

