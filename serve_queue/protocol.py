"""The Celery task-message codec: broker deliveries in, ``TaskMessage`` out, and back.

- ``decode``: protocol v2 (headers + ``[args, kwargs, embed]``), protocol v1 (all in a body dict,
  empty headers) and the hybrid (v2 headers with a v1-style dict body holding ``args``).
- ``encode_task``: a protocol v2 message as Celery 5.7's ``apply_async``/``send_task`` builds it.
- ``encode_retry`` / ``encode_followup``: what a Celery worker re-publishes for ``self.retry()``,
  a link callback or the next step of a chain.
- ``dumps`` / ``loads``: kombu serialization (JSON ``__type__`` markers for datetime, Decimal,
  UUID, bytes) behind serve_queue's accept list and error tree.

Wire format: ``shared/docs/celery-wire-format.md`` §2-4, §8.7, §8.8. Naive datetimes, on the wire
or in options, are UTC; every datetime handed out is aware UTC.
"""

from __future__ import annotations

import bz2
import json
import lzma
import math
import os
import socket
import zlib
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta, timezone
from typing import Any, Final, TypeVar, cast

from kombu import compression as kombu_compression
from kombu import serialization as kombu_serialization
from kombu.exceptions import SerializerNotInstalled
from kombu.utils import json as kombu_json

from serve_queue.config import DEFAULT_ACCEPT, DEFAULT_MAX_DECOMPRESSED
from serve_queue.errors import ContentDisallowed, DecodeError, EncodeError
from serve_queue.types import Delivery, OutgoingMessage

__all__ = ["SendOptions", "TaskMessage", "decode", "dumps", "encode_followup", "encode_retry",
           "encode_task", "loads", "new_task_id"]

_T = TypeVar("_T")
UTC: Final = timezone.utc
JSON_CONTENT_TYPE: Final = "application/json"

# kombu's functions carry no annotations: typed once here.
_json_loads = cast(Callable[[Any], Any], kombu_json.loads)
_json_dumps = cast(Callable[[Any], str], kombu_json.dumps)
_kombu_loads = cast(Callable[..., Any], kombu_serialization.loads)
_kombu_dumps = cast(Callable[[Any, str], tuple[str, str, Any]], kombu_serialization.dumps)
_compress = cast(Callable[[bytes, str], tuple[bytes, str]], kombu_compression.compress)
_decompress = cast(Callable[[Any, str], bytes], kombu_compression.decompress)
_TYPE_TO_NAME: Final = cast(Mapping[str, str], kombu_serialization.registry.type_to_name)
#: kombu's JSON decoding (its object_hook turns the markers back into objects), with the decoder
#: built once instead of on every call as ``kombu.utils.json.loads`` does. It keeps no state.
_JSON_DECODER: Final = json.JSONDecoder(object_hook=kombu_json.object_hook)

#: Headers a retry recomputes; every other one (custom headers included) is carried over.
_RECOMPUTED: Final = frozenset({"lang", "task", "id", "eta", "expires", "group", "group_index",
                                "retries", "root_id", "parent_id", "compression"})
#: Headers brokers add by themselves (kombu's Redis restore, RabbitMQ dead-lettering).
_TRANSPORT_HEADERS: Final = frozenset({"redelivered", "x-death", "x-first-death-exchange",
                                       "x-first-death-queue", "x-first-death-reason",
                                       "x-last-death-exchange", "x-last-death-queue",
                                       "x-last-death-reason"})


@dataclass(slots=True)
class TaskMessage:
    """A decoded task message, whatever protocol version it arrived in.

    Treat it as read-only. It is not a frozen dataclass only because building a frozen one
    of 23 fields costs several microseconds per message on the consumer's hot path.
    """

    id: str
    name: str  # headers["task"] (v2) / body["task"] (v1)
    args: list[Any]
    kwargs: dict[str, Any]
    headers: dict[str, Any]  # as received; for v1 and hybrid: the equivalent v2 headers
    properties: dict[str, Any]  # correlation_id, reply_to, priority, ... as received
    content_type: str  # the serializer's content type (compression is undone)
    protocol: int  # 1 or 2
    eta: datetime | None
    expires: datetime | None
    retries: int
    time_limit: float | None  # hard; the ``timelimit`` header is [hard, soft]
    soft_time_limit: float | None
    ignore_result: bool
    root_id: str | None
    parent_id: str | None
    group_id: str | None
    group_index: int | None
    callbacks: list[dict[str, Any]] | None  # link signatures
    errbacks: list[dict[str, Any]] | None
    chain: list[dict[str, Any]] | None  # remaining steps, reversed: the next one is the last
    chord: dict[str, Any] | None
    compression: str | None = None  # the ``compression`` header (a MIME type)


@dataclass(frozen=True, slots=True)
class SendOptions:
    """Everything ``send_task``/``apply_async`` can say about one message; defaults: send_task's."""

    task_id: str | None = None
    countdown: float | None = None  # becomes eta = now + countdown
    eta: datetime | None = None
    expires: float | datetime | None = None  # seconds from now, or an absolute time
    priority: int | None = None
    headers: Mapping[str, Any] | None = None  # merged at the top level of the headers
    serializer: str = "json"
    compression: str | None = None  # "zlib", "bzip2", ... or a MIME type
    retries: int = 0
    root_id: str | None = None
    parent_id: str | None = None
    group_id: str | None = None
    group_index: int | None = None
    ignore_result: bool | None = None
    time_limit: float | None = None
    soft_time_limit: float | None = None
    callbacks: list[dict[str, Any]] | None = None
    errbacks: list[dict[str, Any]] | None = None
    chain: list[dict[str, Any]] | None = None
    chord: dict[str, Any] | None = None
    reply_to: str | None = None
    shadow: str | None = None
    stamped_headers: list[str] | None = None
    stamps: Mapping[str, Any] | None = None
    replaced_task_nesting: int = 0


# ------------------------------------------------------------------------------------ decode


def decode(
    delivery: Delivery,
    accept: Collection[str] = DEFAULT_ACCEPT,
    max_decompressed: int = DEFAULT_MAX_DECOMPRESSED,
) -> TaskMessage:
    """Decode a delivery into a ``TaskMessage``.

    ``accept`` holds serializer names (``"json"``, ``"pickle"``, ...) and/or content types.
    A compressed body may expand to at most ``max_decompressed`` bytes (a decompression bomb
    is refused before it is held in memory). Raises ``ContentDisallowed`` for a content type
    not accepted and ``DecodeError`` for anything else; never any other exception, whatever
    the bytes.
    """
    try:
        return _decode(delivery, accept, max_decompressed)
    except DecodeError:
        raise
    except Exception as exc:  # whatever is wrong with a message, it is a DecodeError
        raise DecodeError(f"malformed message: {_describe(exc)}") from exc


def _decode(delivery: Delivery, accept: Collection[str], max_decompressed: int) -> TaskMessage:
    if delivery.envelope_error is not None:
        raise DecodeError(f"envelope: {delivery.envelope_error}")
    headers = delivery.headers
    if type(headers) is not dict and not isinstance(headers, Mapping):
        raise DecodeError(f"envelope: headers must be a mapping, got {type(headers).__name__}")
    compression = _field(headers, "compression", str)
    _require_accepted(delivery.content_type, accept)
    data = delivery.body
    if compression is not None:
        data = _decompress_body(delivery.body, compression, max_decompressed)
    body = _deserialize(data, delivery.content_type, delivery.content_encoding)
    if "task" in headers:
        if isinstance(body, dict):  # hybrid: v2 headers, v1-style body
            if "args" not in body:
                raise DecodeError("malformed body: a dict body needs 'args' (hybrid v1 body)")
            headers = _v1_headers(body, headers, override=True)
            return _build(headers, body["args"], body.get("kwargs"), _v1_embed(body), delivery, 2)
        if type(body) not in (list, tuple) or len(body) != 3:
            raise DecodeError(f"malformed body: expected [args, kwargs, embed], got {_short(body)}")
        args, kwargs, embed = body
        if embed is not None and type(embed) is not dict and not isinstance(embed, Mapping):
            raise DecodeError(f"malformed body: embed must be a mapping, got {_short(embed)}")
        return _build(dict(headers), args, kwargs, embed or {}, delivery, 2)
    if isinstance(body, dict) and "task" in body:
        headers = _v1_headers(body, headers, override=False)
        args, kwargs = body.get("args", ()), body.get("kwargs")
        return _build(headers, args, kwargs, _v1_embed(body), delivery, 1)
    raise DecodeError("no task header and body is not a protocol v1 task")


def _v1_embed(body: Mapping[str, Any]) -> dict[str, Any]:
    return {"callbacks": body.get("callbacks"), "errbacks": body.get("errbacks"),
            "chain": None, "chord": body.get("chord")}


def _v1_headers(body: Mapping[str, Any], extra: Mapping[str, Any], *,
                override: bool) -> dict[str, Any]:
    """The v2 headers equivalent to a v1/hybrid body, merged with the message's own headers."""
    get = body.get
    headers = {
        "lang": get("lang", "py"), "task": get("task"), "id": get("id"), "shadow": get("shadow"),
        "eta": get("eta"), "expires": get("expires"), "group": get("group") or get("taskset"),
        "group_index": get("group_index"), "retries": get("retries", 0),
        "timelimit": get("timelimit", [None, None]), "root_id": get("root_id"),
        "parent_id": get("parent_id"), "argsrepr": get("argsrepr") or _repr(get("args", ())),
        "kwargsrepr": get("kwargsrepr") or _repr(get("kwargs", {})), "origin": get("origin"),
        "ignore_result": get("ignore_result"), "replaced_task_nesting": 0,
        "stamped_headers": None, "stamps": {},
    }
    for key, value in extra.items():
        if override or key not in headers:
            headers[key] = value
    return headers


def _build(headers: dict[str, Any], args: Any, kwargs: Any, embed: Mapping[str, Any],
           delivery: Delivery, protocol: int) -> TaskMessage:
    get = headers.get
    name, task_id = get("task"), get("id")
    if type(name) is not str or not name:
        raise DecodeError(f"malformed header 'task': expected a task name, got {_short(name)}")
    if type(task_id) is not str or not task_id:
        raise DecodeError(f"malformed header 'id': expected a task id, got {_short(task_id)}")
    retries, group_index = get("retries"), get("group_index")
    root_id, parent_id, group_id = get("root_id"), get("parent_id"), get("group")
    if not ((retries is None or type(retries) is int)
            and (group_index is None or type(group_index) is int)
            and (root_id is None or type(root_id) is str)
            and (parent_id is None or type(parent_id) is str)
            and (group_id is None or type(group_id) is str)):
        for key, kind in _TYPED_HEADERS:
            _field(headers, key, kind)  # raises the DecodeError naming the bad header
    hard, soft = _timelimit(get("timelimit"))
    eta, expires = get("eta"), get("expires")
    callbacks = errbacks = chain = chord = None
    if embed and (embed.get("callbacks") is not None or embed.get("errbacks") is not None
                  or embed.get("chain") is not None or embed.get("chord") is not None):
        callbacks, errbacks = _sigs(embed, "callbacks"), _sigs(embed, "errbacks")
        chain, chord = _sigs(embed, "chain"), _sig(embed, "chord")
    return TaskMessage(
        task_id, name, _args(args), _kwargs(kwargs), headers, dict(delivery.properties),
        delivery.content_type, protocol,
        None if eta is None else _time(headers, "eta"),
        None if expires is None else _time(headers, "expires"),
        retries or 0, hard, soft, _flag(get("ignore_result")), root_id, parent_id, group_id,
        group_index, callbacks, errbacks, chain, chord, get("compression"),
    )


#: optional headers whose type is checked (``_field``), with the type they must have
_TYPED_HEADERS: Final = (("retries", int), ("root_id", str), ("parent_id", str),
                         ("group", str), ("group_index", int))


def _args(value: Any) -> list[Any]:
    if type(value) in (list, tuple):
        return list(value) if type(value) is tuple else cast(list[Any], value)
    raise DecodeError(f"malformed body: args must be a list, got {_short(value)}")


def _kwargs(value: Any) -> dict[str, Any]:
    if value is None:
        return {}
    if type(value) is not dict:
        if not isinstance(value, Mapping):
            raise DecodeError(f"malformed body: kwargs must be a mapping, got {_short(value)}")
        value = dict(value)
    if value and not all(type(key) is str for key in value):
        raise DecodeError("malformed body: kwargs keys must be strings")
    return cast(dict[str, Any], value)


def _sigs(embed: Mapping[str, Any], key: str) -> list[dict[str, Any]] | None:
    value = embed.get(key)
    if value is None:
        return None
    if type(value) not in (list, tuple) or not all(isinstance(sig, dict) for sig in value):
        raise DecodeError(f"malformed body: {key} must be a list of signatures: {_short(value)}")
    return list(value)


def _sig(embed: Mapping[str, Any], key: str) -> dict[str, Any] | None:
    value = embed.get(key)
    if value is None or isinstance(value, dict):
        return value
    raise DecodeError(f"malformed body: {key} must be a signature, got {_short(value)}")


def _time(headers: Mapping[str, Any], key: str) -> datetime | None:
    value = headers.get(key)
    if value is None:
        return None
    if type(value) is str:
        try:
            value = datetime.fromisoformat(value)
        except ValueError as exc:
            raise DecodeError(f"malformed header {key!r}: {exc}") from None
    elif not isinstance(value, datetime):
        raise DecodeError(f"malformed header {key!r}: not an ISO 8601 time: {_short(value)}")
    return _utc(value)


def _timelimit(value: Any) -> tuple[float | None, float | None]:
    if value is None:
        return None, None
    if type(value) not in (list, tuple) or len(value) != 2:
        raise DecodeError(f"malformed header 'timelimit': not [hard, soft]: {_short(value)}")
    return _limit(value[0]), _limit(value[1])


def _limit(value: Any) -> float | None:
    """Seconds; 0 and null both mean "no limit", as in Celery."""
    if value is None or (type(value) in (int, float) and value == 0):
        return None
    if type(value) in (int, float) and value > 0 and math.isfinite(value):
        return cast(float, value)  # an int stays an int, so a re-publish writes it back as is
    raise DecodeError(f"malformed header 'timelimit': not a time limit: {_short(value)}")


def _flag(value: Any) -> bool:
    if value is None or type(value) in (bool, int):
        return bool(value)
    raise DecodeError(f"malformed header 'ignore_result': expected a boolean, got {_short(value)}")


def _field(headers: Mapping[str, Any], key: str, kind: type[_T]) -> _T | None:
    """``headers[key]`` if it is exactly a ``kind`` (a bool is no int here), None if null/absent."""
    value = headers.get(key)
    if value is None or type(value) is kind:
        return value
    raise DecodeError(f"malformed header {key!r}: expected {kind.__name__}, got {_short(value)}")


# ----------------------------------------------------------------------------- serialization


def dumps(obj: Any, serializer: str = "json") -> tuple[bytes, str, str]:
    """Serialize with kombu: ``(data, content_type, content_encoding)``; ``EncodeError`` if not."""
    try:
        if serializer == "json":
            try:  # plain JSON types: byte-identical to kombu's output, from the C encoder
                text = json.dumps(obj)
            except TypeError:  # datetime, Decimal, UUID, bytes...: kombu's type markers
                text = _json_dumps(obj)
            return text.encode(), JSON_CONTENT_TYPE, "utf-8"
        content_type, encoding, payload = _kombu_dumps(obj, serializer)
    except SerializerNotInstalled:
        raise EncodeError(f"no serializer named {serializer!r} is installed") from None
    except Exception as exc:
        raise EncodeError(f"cannot serialize with {serializer}: {_describe(exc)}") from exc
    data = payload.encode() if isinstance(payload, str) else bytes(payload)
    return data, content_type, encoding


def loads(data: bytes, content_type: str, content_encoding: str,
          accept: Collection[str] = DEFAULT_ACCEPT) -> Any:
    """Deserialize with kombu; ``ContentDisallowed`` unless ``accept`` allows the content type."""
    _require_accepted(content_type, accept)
    return _deserialize(data, content_type, content_encoding)


def _require_accepted(content_type: Any, accept: Collection[str]) -> None:
    if type(content_type) is not str or not content_type:
        raise DecodeError("undecodable body: the message has no content type")
    accept = (accept,) if isinstance(accept, str) else accept
    name = None if content_type in accept else _TYPE_TO_NAME.get(content_type)
    if content_type in accept or (name is not None and name in accept):
        return
    alias = f" ({name})" if name else ""
    raise ContentDisallowed(f"content type {content_type}{alias} is not accepted; allow it with "
                            f"accept_content={[*accept, name or content_type]!r}")


def _deserialize(data: Any, content_type: str, content_encoding: Any) -> Any:
    try:
        if content_type == JSON_CONTENT_TYPE:
            if type(data) is not bytes:
                return _json_loads(data)
            # kombu's object_hook only changes dicts keyed "__type__": text that cannot spell
            # that key (not even \u-escaped) decodes the same without it, at C speed
            if b"__type__" in data or b"\\u" in data:
                return _JSON_DECODER.decode(data.decode())
            return json.loads(data.decode())
        return _kombu_loads(data, content_type, content_encoding, accept=(content_type,))
    except Exception as exc:
        raise DecodeError(f"undecodable body: {_describe(exc)}") from exc


#: kombu's built-in codecs (by content type and alias), decompressed here in bounded steps
_STREAMING: Final[Mapping[str, Callable[[], Any]]] = {
    **dict.fromkeys(("application/x-gzip", "gzip", "zlib"), zlib.decompressobj),
    **dict.fromkeys(("application/x-bz2", "bzip2", "bzip"), bz2.BZ2Decompressor),
    **dict.fromkeys(("application/x-lzma", "lzma", "xz"), lzma.LZMADecompressor),
}


def _decompress_body(data: Any, compression: str, limit: int) -> bytes:
    try:
        out = _bounded_decompress(bytes(data), compression, limit)
    except DecodeError:
        raise
    except KeyError:
        raise DecodeError(f"undecodable body: unknown compression {compression!r}") from None
    except Exception as exc:
        reason = f"cannot decompress ({compression}): {_describe(exc)}"
        raise DecodeError(f"undecodable body: {reason}") from exc
    if len(out) > limit:
        raise DecodeError(
            f"undecodable body: {compression} body expands to more than {limit:,} bytes "
            "(the consumer's max_decompressed_bytes)"
        )
    return out


def _bounded_decompress(data: bytes, compression: str, limit: int) -> bytes:
    """``data`` decompressed, stopping once it passes ``limit`` bytes (the caller refuses that
    result). Codecs other than kombu's built-in three (brotli, zstd, ... when installed) have
    no bounded API in kombu: they are decompressed whole and checked afterwards."""
    make = _STREAMING.get(compression)
    if make is None:
        return _decompress(data, compression)
    parts: list[bytes] = []
    total, rest = 0, data
    while True:  # one pass per stream (bzip2 and xz bodies may hold several, concatenated)
        decompressor = make()
        try:
            chunk = decompressor.decompress(rest, limit - total + 1)
        except (OSError, lzma.LZMAError):
            if parts:  # bytes after a whole stream that start no other are ignored, as
                break  # bz2.decompress and lzma.decompress (kombu's decoders) ignore them
            raise
        parts.append(chunk)
        total += len(chunk)
        if total > limit:
            break
        if not decompressor.eof:
            raise DecodeError(
                f"undecodable body: cannot decompress ({compression}): the data ends before "
                "the end of its stream"
            )
        rest = decompressor.unused_data
        if not rest or make is zlib.decompressobj:  # zlib, like zlib.decompress: one stream
            break
    return b"".join(parts)


# ------------------------------------------------------------------------------------ encode


def encode_task(name: str, args: Sequence[Any], kwargs: Mapping[str, Any], options: SendOptions,
                *, origin: str, now: datetime | None = None) -> OutgoingMessage:
    """A protocol v2 message for ``name(*args, **kwargs)`` as Celery 5.7's apply_async builds it.

    A fresh uuid4 id unless ``options.task_id``. ``EncodeError`` for invalid options or
    arguments the serializer cannot encode.
    """
    try:
        hard, soft = options.time_limit, options.soft_time_limit
        if type(name) is not str or not name:
            raise EncodeError(f"a task name must be a non-empty string, got {_short(name)}")
        if hard and soft and soft > hard:
            raise EncodeError(f"soft_time_limit ({soft}) must not exceed time_limit ({hard})")
        return _encode(name, args, kwargs, options, origin, None if now is None else _utc(now))
    except (TypeError, ValueError, OverflowError, AttributeError) as exc:
        raise EncodeError(f"cannot build a message for {name!r}: {_describe(exc)}") from exc


def _encode(name: str, args: Sequence[Any], kwargs: Mapping[str, Any], options: SendOptions,
            origin: str, now: datetime | None) -> OutgoingMessage:
    task_id = options.task_id or new_task_id()
    if now is None and (options.countdown or options.expires is not None):
        now = datetime.now(UTC)
    eta = now + timedelta(seconds=options.countdown) if now and options.countdown else options.eta
    expires, expiration = (None, None) if now is None else _expiry(options.expires, now)
    stamps = dict(options.stamps or {})
    headers: dict[str, Any] = {
        "lang": "py", "task": name, "id": task_id, "shadow": options.shadow,
        "eta": None if eta is None else _utc(eta).isoformat(), "expires": expires,
        "group": options.group_id, "group_index": options.group_index, "retries": options.retries,
        "timelimit": [options.time_limit, options.soft_time_limit],
        "root_id": options.root_id or task_id, "parent_id": options.parent_id,
        "argsrepr": _repr(args), "kwargsrepr": _repr(kwargs), "origin": origin,
        "ignore_result": options.ignore_result,
        "replaced_task_nesting": options.replaced_task_nesting,
        "stamped_headers": options.stamped_headers or list(stamps) or None, "stamps": stamps,
    }
    headers.update(options.headers or {})
    properties: dict[str, Any] = {"correlation_id": task_id, "reply_to": options.reply_to or "",
                                  "delivery_mode": 2, "priority": options.priority or 0}
    if expiration is not None:
        properties["expiration"] = expiration
    embed = {"callbacks": options.callbacks, "errbacks": options.errbacks,
             "chain": options.chain, "chord": options.chord}
    data, content_type, encoding = dumps((list(args), dict(kwargs), embed), options.serializer)
    if options.compression:
        try:
            data, headers["compression"] = _compress(data, options.compression)
        except KeyError:
            raise EncodeError(f"unknown compression {options.compression!r}") from None
    return OutgoingMessage(data, content_type, encoding, headers, properties)


def new_task_id() -> str:
    """A random (version 4) UUID string, as ``str(uuid.uuid4())`` gives, in a third of the
    time: the same 122 random bits from ``os.urandom``, formatted without a ``UUID`` object."""
    h = os.urandom(16).hex()
    return (f"{h[:8]}-{h[8:12]}-4{h[13:16]}-{_VARIANT[int(h[16], 16) & 3]}{h[17:20]}-"
            f"{h[20:]}")


_VARIANT: Final = "89ab"


def encode_retry(message: TaskMessage, *, eta: datetime, now: datetime | None = None,
                 origin: str | None = None) -> OutgoingMessage:
    """The message a Celery worker re-publishes for ``self.retry()`` (wire format §8.7).

    Same id, args, kwargs, links, serializer and compression; ``retries + 1``, ``eta``,
    ``parent_id`` = its own id; every other header carried over (broker-added ones dropped);
    ``expiration`` = milliseconds left until ``expires``. Celery's stray ``origin`` *property*
    is not copied. ``origin`` is only used for a message that carries none.
    """
    carried = {key: value for key, value in message.headers.items()
               if key not in _RECOMPUTED and key not in _TRANSPORT_HEADERS}
    priority, reply_to = message.properties.get("priority"), message.properties.get("reply_to")
    options = SendOptions(
        task_id=message.id, eta=eta, expires=message.expires,
        priority=priority if type(priority) is int else None, headers=carried,
        serializer=_serializer_of(message.content_type), compression=message.compression,
        retries=message.retries + 1, root_id=message.root_id or message.id, parent_id=message.id,
        group_id=message.group_id, group_index=message.group_index, callbacks=message.callbacks,
        errbacks=message.errbacks, chain=message.chain, chord=message.chord,
        reply_to=reply_to if type(reply_to) is str else None,
    )
    return encode_task(message.name, message.args, message.kwargs, options,
                       origin=origin or f"gen{os.getpid()}@{socket.gethostname()}", now=now)


def encode_followup(signature: Mapping[str, Any], parent: TaskMessage, result: Any, *,
                    origin: str, chain: Sequence[Mapping[str, Any]] | None = None,
                    priority: int | None = None,
                    now: datetime | None = None) -> tuple[str | None, OutgoingMessage]:
    """The message for a link callback or the next chain step after ``parent`` returned ``result``.

    ``result`` goes first in the args unless the signature is immutable; ``parent_id`` is the
    parent's id, ``root_id`` inherited, ``options.task_id`` used. A chain step is
    ``signature=parent.chain[-1]`` with ``chain=parent.chain[:-1]``. Returns ``(queue, message)``
    where queue is the signature's ``options.queue`` (``None``: the caller's default).
    """
    subtask_type, name = signature.get("subtask_type"), signature.get("task")
    opts = signature.get("options") or {}
    if subtask_type or type(name) is not str or not name or not isinstance(opts, Mapping):
        raise EncodeError(f"cannot send this signature (plain task signatures only): "
                          f"{_short(signature)}")
    try:
        options = replace(
            _signature_options(opts), root_id=parent.root_id or parent.id, parent_id=parent.id,
            chain=None if chain is None else [dict(step) for step in chain],
            serializer=opts.get("serializer") or _serializer_of(parent.content_type),
            compression=opts.get("compression") or parent.compression,
            priority=opts.get("priority", priority),
        )
        args = tuple(signature.get("args") or ())
        kwargs = dict(signature.get("kwargs") or {})
    except (TypeError, ValueError) as exc:
        raise EncodeError(f"malformed signature for {name!r}: {_describe(exc)}") from exc
    if not signature.get("immutable"):
        args = (result, *args)
    queue = opts.get("queue")
    queue = queue.get("name") if isinstance(queue, Mapping) else queue
    message = encode_task(name, args, kwargs, options, origin=origin, now=now)
    return (queue if isinstance(queue, str) and queue else None), message


def _signature_options(opts: Mapping[str, Any]) -> SendOptions:
    """The SendOptions a signature's ``options`` ask for, with Celery's apply_async defaults."""
    stamped = opts.get("stamped_headers") or None
    link, link_error = opts.get("link"), opts.get("link_error")
    return SendOptions(
        task_id=opts.get("task_id"), countdown=opts.get("countdown"),
        eta=_parse_time(opts.get("eta")), expires=_parse_time(opts.get("expires")),
        headers=opts.get("headers"), group_id=opts.get("group_id"),
        group_index=opts.get("group_index"), ignore_result=bool(opts.get("ignore_result")),
        time_limit=opts.get("time_limit"), soft_time_limit=opts.get("soft_time_limit"),
        callbacks=[link] if isinstance(link, dict) else link,
        errbacks=[link_error] if isinstance(link_error, dict) else link_error,
        chord=opts.get("chord"), reply_to=opts.get("reply_to"), shadow=opts.get("shadow"),
        stamped_headers=stamped, stamps={key: opts.get(key) for key in stamped or ()},
    )


def _expiry(expires: float | datetime | None, now: datetime) -> tuple[str | None, str | None]:
    """The ``expires`` header and the ``expiration`` property (milliseconds left, a string)."""
    if expires is None:
        return None, None
    if isinstance(expires, datetime):
        at = _utc(expires)
        seconds = (at - now).total_seconds()
    else:
        seconds, at = expires, now + timedelta(seconds=expires)
    return at.isoformat(), str(max(int(seconds * 1000), 0))


def _serializer_of(content_type: str) -> str:
    name = _TYPE_TO_NAME.get(content_type)
    if name is None:
        raise EncodeError(f"no serializer is registered for content type {content_type!r}")
    return name


def _parse_time(value: Any) -> Any:
    return datetime.fromisoformat(value) if isinstance(value, str) else value


def _utc(value: datetime) -> datetime:
    if value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value if value.tzinfo is UTC else value.astimezone(UTC)


def _repr(value: Any, limit: int = 1024) -> str:
    """A display-only repr (``argsrepr``/``kwargsrepr``), cut at ``limit`` characters."""
    try:
        text = repr(value)
    except Exception:  # display only: a failing repr gets a placeholder
        return f"<unrepresentable {type(value).__name__}>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _short(value: Any) -> str:
    return _repr(value, 80)


def _describe(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}"
    return text if len(text) <= 300 else text[:297] + "..."
