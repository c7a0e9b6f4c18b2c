"""KombuBroker: a dramatiq broker that holds two RabbitMQ connections per process."""

try:
    import dramatiq  # noqa: F401 - only to name the missing extra before anything else fails
except ModuleNotFoundError as exc:
    if exc.name != "dramatiq":
        raise
    raise ImportError(
        "dramatiq_kombu_broker needs dramatiq, which the transport alone does not install: "
        "pip install 'kombu-pyamqp-threadsafe[dramatiq]'"
    ) from exc

from .broker import KombuBroker
from .errors import QueueArgumentsMismatch

__all__ = ["KombuBroker", "QueueArgumentsMismatch"]
