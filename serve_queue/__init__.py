"""serve_queue: an asyncio-native, Celery-wire-compatible task consumer for Ray Serve.

``import serve_queue`` imports no broker client and not Ray: adapters and the Serve glue load
what they need when first used.
"""

from serve_queue.config import BrokerURL, ConsumerConfig, RetryPolicy, TaskOptions
from serve_queue.consumer import Consumer, Health
from serve_queue.errors import (
    BrokerError,
    BrokerUnavailable,
    ConfigurationError,
    ContentDisallowed,
    DecodeError,
    EncodeError,
    InvalidArguments,
    MessageError,
    MissingDependency,
    Reject,
    ResultBackendError,
    Retry,
    ServeQueueError,
    TaskFailed,
    TaskRevoked,
    TaskTimeout,
    UnknownTask,
)
from serve_queue.producer import AsyncResult, Producer
from serve_queue.registry import Registry, task
from serve_queue.serve import BacklogPolicy
from serve_queue.taskqueue import TaskQueue
from serve_queue.types import (
    Ack,
    BrokerAdapter,
    DeadLetter,
    Delivery,
    OutgoingMessage,
    QueueDepth,
    Requeue,
    ResultBackend,
)

__version__ = "0.1.0"

__all__ = [
    "Ack",
    "AsyncResult",
    "BacklogPolicy",
    "BrokerAdapter",
    "BrokerError",
    "BrokerURL",
    "BrokerUnavailable",
    "ConfigurationError",
    "Consumer",
    "ConsumerConfig",
    "ContentDisallowed",
    "DeadLetter",
    "DecodeError",
    "Delivery",
    "EncodeError",
    "Health",
    "InvalidArguments",
    "MessageError",
    "MissingDependency",
    "OutgoingMessage",
    "Producer",
    "QueueDepth",
    "Registry",
    "Reject",
    "Requeue",
    "ResultBackend",
    "ResultBackendError",
    "Retry",
    "RetryPolicy",
    "ServeQueueError",
    "TaskFailed",
    "TaskOptions",
    "TaskQueue",
    "TaskRevoked",
    "TaskTimeout",
    "UnknownTask",
    "task",
]
