"""Canonical encoding: msgpack arrays in a fixed field order.

Every object is a msgpack array of its fields in declaration order; integers,
byte strings, text and nested arrays only (no maps, floats or ext types).
Decoding checks every size limit before msgpack allocates (the message's
bytes, then a scan of its structure that counts objects and nesting without
building any), every field's type and range, and that re-encoding gives back
the input bytes exactly, so each object has exactly one encoding. Every
failure raises `DecodeError`.
"""

from __future__ import annotations

import struct
from typing import Any

import msgpack

MAX_MESSAGE_BYTES = 16 << 20
"""Largest encoded object accepted, before any parsing."""
MAX_ARRAY_LENGTH = 4096
"""Most items in one array."""
MAX_TEXT_LENGTH = 256
"""Longest text, in bytes of UTF-8."""
MAX_OBJECTS = 1 << 16
"""Default budget of objects (integers, byte strings, texts, arrays, nil) in one
message: above the largest block (a decided block at every array limit holds about
9,000) and a state record (at most about 20,500). As Python objects a message
takes at most about 100 bytes an object beyond its byte strings' contents, so
this bounds what a decode allocates to about 6.5 MiB plus the message's size;
callers that expect less pass their own budget."""
MAX_NESTING = 16
"""Deepest nesting of arrays (the top-level array is 1); objects nest at most 7 deep."""

_FIXED_SIZES = {
    0xC0: 1, 0xC2: 1, 0xC3: 1,  # nil, false, true
    0xCA: 5, 0xCB: 9,  # float 32, 64 (decoded, then refused by the field checks)
    0xCC: 2, 0xCD: 3, 0xCE: 5, 0xCF: 9,  # uint 8, 16, 32, 64
    0xD0: 2, 0xD1: 3, 0xD2: 5, 0xD3: 9,  # int 8, 16, 32, 64
}  # fmt: skip
"""Encoded size of each msgpack type of fixed size, by its first byte (fixints aside)."""
_LENGTH_PREFIXED = {0xC4: (1, "B"), 0xC5: (2, ">H"), 0xC6: (4, ">I"), 0xD9: (1, "B"), 0xDA: (2, ">H"), 0xDB: (4, ">I")}
"""Byte strings (bin) and texts (str) with a length field: its size and struct format."""
_ARRAY_HEADERS = {0xDC: (2, ">H"), 0xDD: (4, ">I")}
"""Arrays with a count field: its size and struct format."""
_EXT_TYPES = frozenset({0xC7, 0xC8, 0xC9, 0xD4, 0xD5, 0xD6, 0xD7, 0xD8})
_MAP_TYPES = frozenset({0xDE, 0xDF})


class DecodeError(ValueError):
    """Bytes that are not the canonical encoding of the expected object."""


def _reject_ext(code: int, data: bytes) -> Any:
    raise DecodeError(f"ext type {code} is not allowed")


def pack(value: Any) -> bytes:
    """The canonical encoding of nested lists of int, bytes and str."""
    return msgpack.packb(value, use_bin_type=True, strict_types=True)  # type: ignore[no-any-return]


def _malformed(reason: str) -> DecodeError:
    return DecodeError(f"malformed msgpack ({reason})")


def scan(data: bytes, max_objects: int = MAX_OBJECTS, max_nesting: int = MAX_NESTING) -> int:
    """Check that `data` is exactly one msgpack object within the budgets, without
    building it; return how many objects it holds (an array counts, and so does
    each item). Raises DecodeError at the first object over `max_objects`, array
    nested deeper than `max_nesting`, array over MAX_ARRAY_LENGTH items, text over
    MAX_TEXT_LENGTH bytes, map, ext type, truncation or trailing byte.

    The cost is bounded by the budget, not by the message's size: byte strings and
    texts are skipped by their length, and the scan allocates only one counter per
    open array."""
    end = len(data)
    position = 0
    objects = 0
    remaining = 1  # objects still to read in the innermost open array; the top level holds one
    outer: list[int] = []  # the same for each enclosing array
    while True:
        if not remaining:
            if not outer:
                break
            remaining = outer.pop()
            continue
        remaining -= 1
        objects += 1
        if objects > max_objects:
            raise DecodeError(f"more than {max_objects} objects, limit {max_objects}")
        if position >= end:
            raise _malformed(f"truncated: {end} bytes, more needed")
        byte = data[position]
        count = -1
        if byte < 0x80 or byte >= 0xE0:  # positive and negative fixint
            position += 1
        elif byte < 0x90:
            raise DecodeError(f"a map at byte {position}: maps are not allowed")
        elif byte < 0xA0:  # fixarray
            count = byte & 0x0F
            position += 1
        elif byte < 0xC0:  # fixstr, at most 31 bytes
            position += 1 + (byte & 0x1F)
        elif byte in _FIXED_SIZES:
            position += _FIXED_SIZES[byte]
        elif byte in _LENGTH_PREFIXED:
            width, layout = _LENGTH_PREFIXED[byte]
            if position + 1 + width > end:
                raise _malformed(f"truncated: {end} bytes, more needed")
            (length,) = struct.unpack_from(layout, data, position + 1)
            if byte >= 0xD9 and length > MAX_TEXT_LENGTH:
                raise DecodeError(f"text of {length} bytes at byte {position}, limit {MAX_TEXT_LENGTH}")
            position += 1 + width + length
        elif byte in _ARRAY_HEADERS:
            width, layout = _ARRAY_HEADERS[byte]
            if position + 1 + width > end:
                raise _malformed(f"truncated: {end} bytes, more needed")
            (count,) = struct.unpack_from(layout, data, position + 1)
            position += 1 + width
        elif byte in _EXT_TYPES:
            raise DecodeError(f"an ext type at byte {position}: ext types are not allowed")
        elif byte in _MAP_TYPES:
            raise DecodeError(f"a map at byte {position}: maps are not allowed")
        else:
            raise _malformed(f"byte 0x{byte:02x} at {position} is no msgpack type")
        if count >= 0:
            if count > MAX_ARRAY_LENGTH:
                raise DecodeError(f"an array of {count} items, limit {MAX_ARRAY_LENGTH}")
            if len(outer) >= max_nesting:
                raise DecodeError(f"arrays nested more than {max_nesting} deep, limit {max_nesting}")
            if count > end - position:  # every item takes at least one byte
                raise _malformed(f"truncated: an array of {count} items in the last {end - position} bytes")
            outer.append(remaining)
            remaining = count
    if position > end:
        raise _malformed(f"truncated: {end} bytes, {position} needed")
    if position < end:
        raise _malformed(f"{end - position} bytes after the object")
    return objects


def unpack(data: bytes, what: str, max_bytes: int = MAX_MESSAGE_BYTES, max_objects: int = MAX_OBJECTS) -> Any:
    """Decode canonical msgpack of at most `max_bytes` bytes and `max_objects` objects,
    both checked before msgpack allocates (`scan`)."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise DecodeError(f"{what}: expected bytes, got {type(data).__name__}")
    if len(data) > max_bytes:
        raise DecodeError(f"{what}: {len(data)} bytes, limit {max_bytes}")
    data = bytes(data)
    try:
        scan(data, max_objects)
        value = msgpack.unpackb(
            data,
            raw=False,
            use_list=True,
            strict_map_key=True,
            ext_hook=_reject_ext,
            max_bin_len=max_bytes,
            max_str_len=MAX_TEXT_LENGTH,
            max_array_len=MAX_ARRAY_LENGTH,
            max_map_len=0,
            max_ext_len=0,
        )
    except DecodeError as error:
        raise DecodeError(f"{what}: {error}") from None
    except (ValueError, TypeError, OverflowError, RecursionError, msgpack.UnpackException) as error:
        raise DecodeError(f"{what}: malformed msgpack ({type(error).__name__}: {error})") from None
    try:
        canonical = pack(value) == data
    except (TypeError, ValueError, OverflowError):
        canonical = False
    if not canonical:
        raise DecodeError(f"{what}: not the canonical encoding")
    return value


class Fields:
    """Typed reads of one decoded array, naming the field in every error."""

    def __init__(self, value: Any, what: str, names: tuple[str, ...]) -> None:
        if not isinstance(value, list):
            raise DecodeError(f"{what}: expected an array, got {type(value).__name__}")
        if len(value) != len(names):
            raise DecodeError(f"{what}: {len(value)} fields, want {len(names)}")
        self.values = dict(zip(names, value, strict=True))
        self.what = what

    def integer(self, name: str, low: int = 0, high: int = 2**63 - 1) -> int:
        value = self.values[name]
        if isinstance(value, bool) or not isinstance(value, int):
            raise DecodeError(f"{self.what}.{name}: expected an integer, got {type(value).__name__}")
        if not low <= value <= high:
            raise DecodeError(f"{self.what}.{name}: {value} outside [{low}, {high}]")
        return value

    def binary(self, name: str, length: int | None = None, max_length: int | None = None) -> bytes:
        value = self.values[name]
        if not isinstance(value, bytes):
            raise DecodeError(f"{self.what}.{name}: expected bytes, got {type(value).__name__}")
        if length is not None and len(value) != length:
            raise DecodeError(f"{self.what}.{name}: {len(value)} bytes, want {length}")
        if max_length is not None and len(value) > max_length:
            raise DecodeError(f"{self.what}.{name}: {len(value)} bytes, limit {max_length}")
        return value

    def text(self, name: str) -> str:
        value = self.values[name]
        if not isinstance(value, str):
            raise DecodeError(f"{self.what}.{name}: expected text, got {type(value).__name__}")
        return value

    def array(self, name: str, max_length: int = MAX_ARRAY_LENGTH) -> list[Any]:
        value = self.values[name]
        if not isinstance(value, list):
            raise DecodeError(f"{self.what}.{name}: expected an array, got {type(value).__name__}")
        if len(value) > max_length:
            raise DecodeError(f"{self.what}.{name}: {len(value)} items, limit {max_length}")
        return value

    def raw(self, name: str) -> Any:
        return self.values[name]
