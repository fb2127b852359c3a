"""Typed, frozen settings: broker URLs, consumer knobs and per-task options.

A URL with a password never shows it: ``BrokerURL`` keeps the secret in a ``SecretStr`` and
its ``str``/``repr`` (and so every log line and error message built from it) read
``redis://user:***@host:6379/0``.
"""

from __future__ import annotations

from typing import Literal
from urllib.parse import parse_qsl, quote, unquote, urlsplit

from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator

from serve_queue.errors import ConfigurationError

__all__ = [
    "AckPolicy",
    "BrokerURL",
    "ConsumerConfig",
    "RetryPolicy",
    "TaskOptions",
    "redact_url",
]

_FROZEN = ConfigDict(frozen=True, extra="forbid")

#: Serializers accepted when nothing else is said: JSON only (pickle/yaml/msgpack are opt-in).
DEFAULT_ACCEPT: tuple[str, ...] = ("json",)
#: how large a compressed task body may become once decompressed (64 MiB)
DEFAULT_MAX_DECOMPRESSED = 64 * 1024 * 1024


class BrokerURL(BaseModel):
    """A parsed broker or result-backend URL: ``scheme://[user[:password]@]host[:port][/path][?query]``.

    ``sqlite:///path/to.db`` keeps the path; ``redis://host:6379/0`` has ``path="0"`` (the DB).
    """

    model_config = _FROZEN

    scheme: str
    host: str | None = None
    port: int | None = None
    username: str | None = None
    password: SecretStr | None = None
    path: str = ""
    query: dict[str, str] = Field(default_factory=dict)

    @classmethod
    def parse(cls, url: str) -> BrokerURL:
        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError as exc:
            # the URL may hold a password: say what is wrong without echoing it
            raise ConfigurationError(f"cannot parse URL {redact_url(url)!r}: {exc}") from None
        if not parts.scheme:
            raise ConfigurationError(f"URL {redact_url(url)!r} has no scheme (e.g. redis://)")
        path = parts.path
        if parts.scheme != "sqlite":
            path = path.lstrip("/")
        return cls(
            scheme=parts.scheme.lower(),
            host=parts.hostname,
            port=port,
            username=unquote(parts.username) if parts.username else None,
            password=SecretStr(unquote(parts.password)) if parts.password is not None else None,
            path=path,
            query=dict(parse_qsl(parts.query)),
        )

    def render(self, *, reveal: bool = False) -> str:
        """The URL as text; the password is ``***`` unless ``reveal`` (for the client only)."""
        auth = ""
        if self.username is not None or self.password is not None:
            auth = quote(self.username or "", safe="")
            if self.password is not None:
                secret = self.password.get_secret_value() if reveal else "***"
                auth += ":" + (quote(secret, safe="") if reveal else secret)
            auth += "@"
        netloc = auth + (self.host or "")
        if self.port is not None:
            netloc += f":{self.port}"
        path = self.path
        if self.scheme != "sqlite" and path:
            path = "/" + path
        query = "&".join(f"{k}={v}" for k, v in self.query.items())
        return f"{self.scheme}://{netloc}{path}" + (f"?{query}" if query else "")

    def __str__(self) -> str:
        return self.render()

    def __repr__(self) -> str:
        return f"BrokerURL({self.render()!r})"


def redact_url(url: str) -> str:
    """Hide the password of any URL-looking text, without parsing it strictly."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    auth, at, host = rest.rpartition("@")
    if not at or ":" not in auth:
        return url
    user = auth.split(":", 1)[0]
    return f"{scheme}://{user}:***@{host}"


class RetryPolicy(BaseModel):
    """Bounded exponential backoff: ``max_retries`` attempts after the first, delays
    ``interval_start``, ``+ interval_step`` each time, capped at ``interval_max`` seconds."""

    model_config = _FROZEN

    max_retries: int = Field(default=5, ge=0)
    interval_start: float = Field(default=0.0, ge=0)
    interval_step: float = Field(default=0.2, ge=0)
    interval_max: float = Field(default=2.0, ge=0)

    def delays(self) -> list[float]:
        return [
            min(self.interval_start + i * self.interval_step, self.interval_max)
            for i in range(self.max_retries)
        ]


AckPolicy = Literal["late", "early"]


class TaskOptions(BaseModel):
    """Per-task options given to ``@task(...)``. Celery's names where Celery has one."""

    model_config = _FROZEN

    name: str = Field(min_length=1)
    max_retries: int | None = Field(default=3, ge=0)
    default_retry_delay: float = Field(default=180.0, ge=0)
    acks: AckPolicy | None = None  # None: the consumer's default
    acks_on_failure_or_timeout: bool | None = None  # None: the consumer's default
    time_limit: float | None = Field(default=None, gt=0)
    soft_time_limit: float | None = Field(default=None, gt=0)
    ignore_result: bool = False
    validate_args: bool = True

    @model_validator(mode="after")
    def _limits_in_order(self) -> TaskOptions:
        if (
            self.time_limit is not None
            and self.soft_time_limit is not None
            and self.soft_time_limit > self.time_limit
        ):
            raise ValueError("soft_time_limit must not exceed time_limit")
        return self


class ConsumerConfig(BaseModel):
    """How one consumer runs. Defaults are serve_queue's, which differ from Celery's where
    Celery's lose work: late acknowledgement is the default."""

    model_config = _FROZEN

    queues: tuple[str, ...] = ("celery",)
    concurrency: int = Field(default=100, ge=1)
    threads: int = Field(default=8, ge=1)
    prefetch: int | None = Field(default=None, ge=1)  # None: concurrency
    acks: AckPolicy = "late"
    acks_on_failure_or_timeout: bool = True
    accept_content: tuple[str, ...] = DEFAULT_ACCEPT
    #: a compressed body that would expand beyond this is dead-lettered as undecodable
    max_decompressed_bytes: int = Field(default=DEFAULT_MAX_DECOMPRESSED, ge=1)
    drain_timeout: float = Field(default=30.0, ge=0)
    #: lease renewed for running tasks; None: the adapter's visibility_timeout (else 60 s)
    lease_s: float | None = Field(default=None, gt=0)
    #: an ETA further away than this is parked on the broker instead of held in memory
    max_hold_s: float = Field(default=1.0, ge=0)
    #: store STARTED before a handler runs (Celery's task_track_started; one more write per task)
    track_started: bool = False
    store_errors_even_if_ignored: bool = False
    #: the broker may be unreachable this long before the consumer reports itself unhealthy
    health_grace_s: float = Field(default=30.0, ge=0)
    #: the event loop may lag this long before the consumer reports itself unhealthy
    max_loop_lag_s: float = Field(default=10.0, gt=0)
    hostname: str | None = None

    @property
    def effective_prefetch(self) -> int:
        return self.prefetch or self.concurrency
