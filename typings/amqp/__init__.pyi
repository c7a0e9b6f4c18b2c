# Typed stubs of the part of py-amqp 5.4 that this project and kombu's pyamqp transport use
# (py-amqp ships no types). Shared by mypy (mypy_path) and pyright (stubPath).
from .basic_message import Message as Message
from .channel import Channel as Channel
from .connection import Connection as Connection
from .exceptions import (
    AccessRefused as AccessRefused,
    AMQPError as AMQPError,
    AMQPNotImplementedError as AMQPNotImplementedError,
    ChannelError as ChannelError,
    ChannelNotOpen as ChannelNotOpen,
    ConnectionError as ConnectionError,
    ConnectionForced as ConnectionForced,
    ConsumerCancelled as ConsumerCancelled,
    ContentTooLarge as ContentTooLarge,
    FrameError as FrameError,
    FrameSyntaxError as FrameSyntaxError,
    InternalError as InternalError,
    InvalidCommand as InvalidCommand,
    InvalidPath as InvalidPath,
    IrrecoverableChannelError as IrrecoverableChannelError,
    IrrecoverableConnectionError as IrrecoverableConnectionError,
    NoConsumers as NoConsumers,
    NotAllowed as NotAllowed,
    NotFound as NotFound,
    PreconditionFailed as PreconditionFailed,
    RecoverableChannelError as RecoverableChannelError,
    RecoverableConnectionError as RecoverableConnectionError,
    ResourceError as ResourceError,
    ResourceLocked as ResourceLocked,
    UnexpectedFrame as UnexpectedFrame,
    error_for_code as error_for_code,
)
from .utils import promise as promise

__version__: str
