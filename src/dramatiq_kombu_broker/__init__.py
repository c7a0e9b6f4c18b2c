"""KombuBroker: a dramatiq broker that holds two RabbitMQ connections per process."""

from .broker import KombuBroker
from .errors import QueueArgumentsMismatch

__all__ = ["KombuBroker", "QueueArgumentsMismatch"]
