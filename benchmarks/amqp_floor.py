"""What the RabbitMQ node itself can do on this machine: the ceiling any AMQP client meets.

A bare AMQP 0-9-1 client (handshake frames built with pamqp, nothing else of a client
library) that moves the same Celery-shaped messages as the other sides, doing as little as a
client possibly can:

- ``publish``: one message marshalled once, its frames written in batches of 200, with
  publisher confirms (waiting for the broker's ``basic.ack`` of the last one, at most 2,000
  unconfirmed), as our ``send_task`` publishes;
- the consumer process (``python -m benchmarks.amqp_floor --broker URL --ready-file F``):
  consumes the ``celery`` queue with prefetch 100 (our consumer's concurrency), reads only the
  delivery tag of each delivery and acks every 50 with one ``basic.ack(multiple)``: no header,
  no body decoded, no task run.

Neither is a usable client (no heartbeats, no error handling, no reconnects): they only show
how far the broker lets any client go, so a target above them cannot be met by client work.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import struct
import time
from collections.abc import Callable
from pathlib import Path
from urllib.parse import unquote, urlsplit

from pamqp import commands, frame
from pamqp.base import Frame
from pamqp.body import ContentBody
from pamqp.header import ContentHeader

from serve_queue.protocol import SendOptions, encode_task

CHANNEL = 1
_DELIVER = (60, 60)  # basic.deliver's class and method ids


class _Wire(asyncio.Protocol):
    """Frames in and out of one socket; a ``fast`` hook sees the bytes once the handshake
    is done."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.frames: asyncio.Queue[object] = asyncio.Queue()
        self.fast: Callable[[bytearray], None] | None = None
        self.lost = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.lost.done():
            self.lost.set_result(exc)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if self.fast is not None:
            self.fast(self.buffer)
            return
        while len(self.buffer) >= 8:
            size = struct.unpack_from(">I", self.buffer, 3)[0]
            if len(self.buffer) < size + 8:
                break
            _, _, value = frame.unmarshal(bytes(self.buffer[: size + 8]))
            del self.buffer[: size + 8]
            self.frames.put_nowait(value)

    def send(self, value: Frame, channel: int = CHANNEL) -> None:
        assert self.transport is not None
        self.transport.write(frame.marshal(value, channel))

    async def call(self, value: Frame, channel: int = CHANNEL) -> object:
        self.send(value, channel)
        return await self.frames.get()


async def connect(url: str) -> _Wire:
    """An open connection with channel 1 open (PLAIN login, no heartbeats)."""
    parts = urlsplit(url)
    loop = asyncio.get_running_loop()
    _, wire = await loop.create_connection(_Wire, parts.hostname or "127.0.0.1", parts.port or 5672)
    assert wire.transport is not None
    wire.transport.write(b"AMQP\x00\x00\x09\x01")
    await wire.frames.get()  # connection.start
    user, password = unquote(parts.username or "guest"), unquote(parts.password or "guest")
    login = commands.Connection.StartOk(
        client_properties={}, mechanism="PLAIN", response=f"\0{user}\0{password}"
    )
    tune = await wire.call(login, 0)
    assert isinstance(tune, commands.Connection.Tune)
    wire.send(commands.Connection.TuneOk(tune.channel_max, tune.frame_max, 0), 0)
    vhost = unquote(parts.path[1:]) if len(parts.path) > 1 else "/"
    await wire.call(commands.Connection.Open(virtual_host=vhost), 0)
    await wire.call(commands.Channel.Open())
    return wire


def _frames(queue: str) -> bytes:
    message = encode_task("bench.noop", [0], {}, SendOptions(), origin="gen0@bench")
    props = commands.Basic.Properties(
        content_type=message.content_type,
        content_encoding=message.content_encoding,
        headers=dict(message.headers),
        delivery_mode=2,
        priority=0,
        correlation_id=str(message.headers["id"]),
    )
    return b"".join(
        frame.marshal(value, CHANNEL)
        for value in (
            commands.Basic.Publish(exchange=queue, routing_key=queue),
            ContentHeader(0, len(message.body), props),
            ContentBody(message.body),
        )
    )


async def publish(url: str, queue: str, count: int) -> float:
    """Seconds to publish ``count`` messages to ``queue``'s exchange, all confirmed."""
    wire = await connect(url)
    await wire.call(commands.Confirm.Select())
    one = _frames(queue)
    confirmed = [0]
    progress = asyncio.Event()
    done = asyncio.get_running_loop().create_future()

    def on_bytes(buffer: bytearray) -> None:  # only basic.ack frames arrive from here on
        pos = 0
        while len(buffer) - pos >= 8:
            end = pos + 8 + int.from_bytes(buffer[pos + 3 : pos + 7], "big")
            if end > len(buffer):
                break
            if buffer[pos] == 1 and struct.unpack_from(">HH", buffer, pos + 7) == (60, 80):
                confirmed[0] = int.from_bytes(buffer[pos + 11 : pos + 19], "big")
                progress.set()
                if confirmed[0] >= count and not done.done():
                    done.set_result(None)
            pos = end
        del buffer[:pos]

    wire.fast = on_bytes
    assert wire.transport is not None
    started = time.perf_counter()
    for sent in range(0, count, 200):
        wire.transport.write(one * min(200, count - sent))
        while confirmed[0] < sent - 2_000:
            progress.clear()
            await progress.wait()
        await asyncio.sleep(0)
    await done
    elapsed = time.perf_counter() - started
    wire.transport.close()
    return elapsed


async def consume(url: str, queue: str, prefetch: int, ready_file: str) -> None:
    """Take deliveries from ``queue`` until SIGTERM, acking every ``prefetch // 2``."""
    wire = await connect(url)
    await wire.call(commands.Basic.Qos(prefetch_count=prefetch))
    every, unacked, last = max(1, prefetch // 2), [0], [0]

    def on_bytes(buffer: bytearray) -> None:
        pos = 0
        while len(buffer) - pos >= 8:
            end = pos + 8 + int.from_bytes(buffer[pos + 3 : pos + 7], "big")
            if end > len(buffer):
                break
            kind = buffer[pos]
            if kind == 1 and struct.unpack_from(">HH", buffer, pos + 7) == _DELIVER:
                at = pos + 11
                at += 1 + buffer[at]  # the consumer tag
                last[0] = int.from_bytes(buffer[at : at + 8], "big")
            elif kind == 3:  # a body frame: the delivery is complete (bodies fit one frame)
                unacked[0] += 1
                if unacked[0] >= every:
                    wire.send(commands.Basic.Ack(last[0], multiple=True))
                    unacked[0] = 0
            pos = end
        del buffer[:pos]

    wire.fast = on_bytes
    wire.send(commands.Basic.Consume(queue=queue, consumer_tag="floor"))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await asyncio.to_thread(Path(ready_file).write_text, "ready")
    await asyncio.wait(
        [asyncio.ensure_future(stop.wait()), wire.lost], return_when=asyncio.FIRST_COMPLETED
    )
    if unacked[0]:
        wire.send(commands.Basic.Ack(last[0], multiple=True))
    assert wire.transport is not None
    wire.transport.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--broker", required=True)
    parser.add_argument("--queue", default="celery")
    parser.add_argument("--prefetch", type=int, default=100)
    parser.add_argument("--ready-file", required=True)
    args = parser.parse_args()
    asyncio.run(consume(args.broker, args.queue, args.prefetch, args.ready_file))


if __name__ == "__main__":
    main()
