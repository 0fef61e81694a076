"""What crosses the network: topic names, protocol ids, frames and messages.

Gossip carries small messages only: a block *announcement* (its header and
the proposer's signature, a few hundred bytes) here, and the voting
messages (p2p/voting_node.py). Bodies (slice weights) travel over the
request/response sync protocol, one request per stream, in length-prefixed
frames of at most `MAX_FRAME_BYTES`.
Every limit here is the same on every node.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from chain.blocks import Block, Header
from chain.crypto import SIGNATURE_BYTES
from chain.encoding import MAX_MESSAGE_BYTES, DecodeError, Fields, pack, unpack

MAX_FRAME_BYTES = 4 << 20
"""Largest frame on a sync stream (py-libp2p's reader fails above ~6 MiB)."""
MAX_RESPONSE_BYTES = 4 * MAX_MESSAGE_BYTES
"""Largest sync response, over all its frames."""
MAX_GOSSIP_BYTES = 64 << 10
"""Largest gossip message; announcements and voting messages are far smaller."""
MAX_BLOCKS_PER_REQUEST = 32
"""Blocks a `blocks` request may ask for."""
MAX_SMALL_OBJECTS = 8
"""Objects in a response head (3), a request (at most 4) or a status (6)."""
MAX_ANNOUNCEMENT_OBJECTS = 16
"""Objects in an announcement: its array, the header's array and 8 fields, the signature."""


def block_topic(chain_id: str) -> str:
    return f"/potchain/{chain_id}/blocks/1"


def sync_protocol(chain_id: str) -> str:
    return f"/potchain/{chain_id}/sync/1"


class ProtocolError(Exception):
    """A peer broke the wire protocol (bad frame, bad message, too large)."""


class Stream(Protocol):
    """The part of a libp2p stream the frame functions use."""

    async def read(self, n: int | None = None) -> bytes: ...
    async def write(self, data: bytes) -> None: ...


# --- frames -------------------------------------------------------------------


def encode_varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


async def read_exactly(stream: Stream, count: int) -> bytes:
    """`count` bytes, however the transport splits them; ProtocolError on EOF."""
    parts = bytearray()
    while len(parts) < count:
        data = await stream.read(count - len(parts))
        if not data:
            raise ProtocolError(f"stream ended after {len(parts)} of {count} bytes")
        parts += data
    return bytes(parts)


async def read_frame(stream: Stream) -> bytes:
    """One varint-length-prefixed frame of at most MAX_FRAME_BYTES."""
    length = 0
    for shift in range(0, 35, 7):
        byte = (await read_exactly(stream, 1))[0]
        length |= (byte & 0x7F) << shift
        if not byte & 0x80:
            break
    else:
        raise ProtocolError("frame length: varint too long")
    if length > MAX_FRAME_BYTES:
        raise ProtocolError(f"frame length: {length} bytes, limit {MAX_FRAME_BYTES}")
    return await read_exactly(stream, length)


async def write_frame(stream: Stream, data: bytes) -> None:
    if len(data) > MAX_FRAME_BYTES:
        raise ValueError(f"frame of {len(data)} bytes exceeds {MAX_FRAME_BYTES}")
    await stream.write(encode_varint(len(data)) + data)


# --- sync requests and responses ---------------------------------------------------

OK, NOT_FOUND, ERROR = 0, 1, 2
"""Response status codes."""


async def write_response(stream: Stream, status: int, payload: bytes) -> None:
    """A response: [status, length] in one frame, then the payload in frames."""
    if len(payload) > MAX_RESPONSE_BYTES:
        raise ValueError(f"response of {len(payload)} bytes exceeds {MAX_RESPONSE_BYTES}")
    await write_frame(stream, pack([status, len(payload)]))
    for start in range(0, len(payload), MAX_FRAME_BYTES):
        await write_frame(stream, payload[start : start + MAX_FRAME_BYTES])


async def read_response(stream: Stream) -> tuple[int, bytes]:
    try:
        head = Fields(
            unpack(await read_frame(stream), "response", 64, MAX_SMALL_OBJECTS),
            "response",
            ("status", "length"),
        )
        status, length = head.integer("status", 0, 2), head.integer("length", 0, MAX_RESPONSE_BYTES)
    except DecodeError as error:
        raise ProtocolError(str(error)) from None
    payload = bytearray()
    while len(payload) < length:
        payload += await read_frame(stream)
        if len(payload) > length:
            raise ProtocolError(f"response: {len(payload)} bytes, announced {length}")
    return status, bytes(payload)


@dataclass(frozen=True)
class Request:
    """A sync request: `method` and its arguments.

    - status: no arguments; answers StatusMessage.
    - headers [start_height, count]: canonical headers (encoded header fields) from a height (count <= 32).
    - blocks [start_height, count]: canonical blocks from a height (count <= 32).
    - block [hash]: one block by hash.
    - slice [hash]: one slice's content (int16 values) by its SHA-256.
    - chunk [hex digest]: a dataset chunk file by its content hash.
    - decided [start_height, count]: decided blocks from a height, each as
      [block, commit certificate, [training blocks it names]] (count <= 32).
    """

    method: str
    arguments: tuple[Any, ...] = ()

    def encode(self) -> bytes:
        return pack([self.method, *self.arguments])


METHODS = {"status": 0, "headers": 2, "blocks": 2, "block": 1, "slice": 1, "chunk": 1, "decided": 2}


def decode_request(data: bytes) -> Request:
    value = unpack(data, "request", 4096, MAX_SMALL_OBJECTS)
    if not isinstance(value, list) or not value or not isinstance(value[0], str):
        raise DecodeError("request: not [method, arguments...]")
    method, arguments = value[0], tuple(value[1:])
    if method not in METHODS:
        raise DecodeError(f"request: unknown method {method!r}")
    if len(arguments) != METHODS[method]:
        raise DecodeError(f"request {method}: {len(arguments)} arguments, want {METHODS[method]}")
    if method in ("headers", "blocks", "decided"):
        start, count = arguments
        if not (isinstance(start, int) and isinstance(count, int) and start >= 0 and 0 < count <= 32):
            raise DecodeError(f"request {method}: want [start >= 0, 0 < count <= 32]")
    if method in ("block", "slice") and not (isinstance(arguments[0], bytes) and len(arguments[0]) == 32):
        raise DecodeError(f"request {method}: want a 32-byte hash")
    if method == "chunk" and not (isinstance(arguments[0], str) and len(arguments[0]) == 64):
        raise DecodeError("request chunk: want a 64-character hex digest")
    return Request(method, arguments)


@dataclass(frozen=True)
class StatusMessage:
    """A peer's view of the chain."""

    genesis_hash: bytes
    head_height: int
    head_hash: bytes
    checkpoint_height: int
    """Height of its finalized block: on the decided chain, its head's."""
    checkpoint_hash: bytes
    """Hash of its finalized block (the head's)."""

    def encode(self) -> bytes:
        return pack([self.genesis_hash, self.head_height, self.head_hash, self.checkpoint_height, self.checkpoint_hash])

    @classmethod
    def decode(cls, data: bytes) -> StatusMessage:
        names = ("genesis_hash", "head_height", "head_hash", "checkpoint_height", "checkpoint_hash")
        f = Fields(unpack(data, "status", 4096, MAX_SMALL_OBJECTS), "status", names)
        return cls(
            f.binary("genesis_hash", 32),
            f.integer("head_height"),
            f.binary("head_hash", 32),
            f.integer("checkpoint_height"),
            f.binary("checkpoint_hash", 32),
        )


def decode_block_list(data: bytes) -> list[bytes]:
    value = unpack(data, "blocks", MAX_RESPONSE_BYTES, 1 + MAX_BLOCKS_PER_REQUEST)
    if not isinstance(value, list) or len(value) > MAX_BLOCKS_PER_REQUEST:
        raise DecodeError("blocks: not a list of at most 32 blocks")
    if not all(isinstance(item, bytes) for item in value):
        raise DecodeError("blocks: an item is not bytes")
    return value


# --- gossip messages -----------------------------------------------------------------


@dataclass(frozen=True)
class Announcement:
    """A new block: its header and the proposer's signature (the body is fetched by hash)."""

    header: Header
    signature: bytes

    @property
    def block_hash(self) -> bytes:
        return self.header.hash

    def encode(self) -> bytes:
        return pack([self.header.fields(), self.signature])

    @classmethod
    def of(cls, block: Block) -> Announcement:
        return cls(block.header, block.signature)

    @classmethod
    def decode(cls, data: bytes) -> Announcement:
        value = unpack(data, "announcement", MAX_GOSSIP_BYTES, MAX_ANNOUNCEMENT_OBJECTS)
        f = Fields(value, "announcement", ("header", "signature"))
        return cls(Header.from_fields(f.raw("header")), f.binary("signature", SIGNATURE_BYTES))
