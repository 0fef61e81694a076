"""Canonical encoding: msgpack arrays in a fixed field order.

Every object is a msgpack array of its fields in declaration order; integers,
byte strings, text and nested arrays only (no maps, floats or ext types).
Decoding checks every size limit before msgpack allocates, every field's
type and range, and that re-encoding gives back the input bytes exactly, so
each object has exactly one encoding. Every failure raises `DecodeError`.
"""

from __future__ import annotations

from typing import Any

import msgpack

MAX_MESSAGE_BYTES = 16 << 20
"""Largest encoded object accepted, before any parsing."""
MAX_ARRAY_LENGTH = 4096
MAX_TEXT_LENGTH = 256


class DecodeError(ValueError):
    """Bytes that are not the canonical encoding of the expected object."""


def _reject_ext(code: int, data: bytes) -> Any:
    raise DecodeError(f"ext type {code} is not allowed")


def pack(value: Any) -> bytes:
    """The canonical encoding of nested lists of int, bytes and str."""
    return msgpack.packb(value, use_bin_type=True, strict_types=True)  # type: ignore[no-any-return]


def unpack(data: bytes, what: str, max_bytes: int = MAX_MESSAGE_BYTES) -> Any:
    """Decode canonical msgpack, with limits checked before allocation."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise DecodeError(f"{what}: expected bytes, got {type(data).__name__}")
    if len(data) > max_bytes:
        raise DecodeError(f"{what}: {len(data)} bytes, limit {max_bytes}")
    try:
        value = msgpack.unpackb(
            bytes(data),
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
        canonical = pack(value) == bytes(data)
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
