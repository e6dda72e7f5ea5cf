"""msgpack codec: messages <-> ZeroMQ multipart frames, numpy arrays without copies.

Wire format (PROTOCOL_VERSION 3):
    frame 0      msgpack map {"v": version, "t": wire type, "f": {header fields},
                              "a": [[field, dtype, shape], ...]}
    frame 1..k   one raw buffer per entry of "a", in order: a little-endian C-contiguous array
                 (dtype is numpy's dtype.str, e.g. "<f4") or a bytes payload (dtype "bytes").

Guarantees:
- `encode` copies no array or payload: out-of-band frames are memoryviews of the message's own
  buffers, so they must not be mutated until ZeroMQ has sent them.
- `decode` copies no array or payload either: arrays are read-only `np.frombuffer` views of
  the received frames, payloads read-only memoryviews.
- `decode` either returns a message that passed full schema validation or raises a
  `ProtocolError` subclass, whatever the input (garbage, truncation, wrong frame count, msgpack
  bombs, deep nesting, other versions); the total size is checked before anything is parsed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import msgpack
import numpy as np
import zmq

from protocol.errors import (
    ArrayMismatch,
    FieldTypeError,
    MalformedFrame,
    MissingField,
    OversizeMessage,
    ProtocolError,
    UnexpectedField,
    UnknownMessageType,
    VersionMismatch,
)
from protocol.messages import (
    LIST_LEN,
    MESSAGE_TYPES,
    PROTOCOL_VERSION,
    TEXT_LEN,
    Array,
    Message,
)

DEFAULT_MAX_MESSAGE_BYTES = 256 << 20
BYTES_DTYPE = "bytes"
Frame = bytes | bytearray | memoryview | zmq.Frame

# Unpack limits bound what a hostile header can make msgpack allocate: no string beyond the
# longest text field (UTF-8 may take 4 bytes a character), no bin or ext at all, short maps.
_UNPACK_LIMITS: dict[str, int] = {
    "max_str_len": 4 * TEXT_LEN,
    "max_bin_len": 0,
    "max_ext_len": 0,
    "max_array_len": LIST_LEN,
    "max_map_len": 64,
}
_HEADER_KEYS = frozenset(("v", "t", "f", "a"))


@dataclass(frozen=True, slots=True)
class _Layout:
    """Per message type, precomputed: header field names and out-of-band fields."""

    inline: tuple[str, ...]
    inline_set: frozenset[str]
    # name -> (wire dtype, item size, numpy dtype or None for a bytes payload), schema order
    buffers: dict[str, tuple[str, int, np.dtype[Any] | None]]


def _layout(cls: type[Message]) -> _Layout:
    buffers: dict[str, tuple[str, int, np.dtype[Any] | None]] = {}
    for name, spec in cls.SCHEMA:
        if isinstance(spec, Array):
            buffers[name] = (spec.dtype.str, spec.dtype.itemsize, spec.dtype)
        elif spec.out_of_band:
            buffers[name] = (BYTES_DTYPE, 1, None)
    inline = tuple(n for n, s in cls.SCHEMA if not s.out_of_band)
    return _Layout(inline, frozenset(inline), buffers)


_LAYOUTS: dict[type[Message], _Layout] = {c: _layout(c) for c in MESSAGE_TYPES.values()}


def encode(
    msg: Message, *, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
) -> list[bytes | memoryview]:
    """Frames for `msg` (validated when it was built; see the module docstring on mutation)."""
    layout = _LAYOUTS.get(type(msg))
    if layout is None:
        raise UnknownMessageType(f"cannot encode {type(msg).__name__}: not a registered message")
    frames: list[bytes | memoryview] = [b""]
    descriptors: list[list[Any]] = []
    total = 0
    for name, (dtype, itemsize, _) in layout.buffers.items():
        v = getattr(msg, name)
        try:
            buf = memoryview(v).cast("B")
        except TypeError:  # only C-contiguous views cast: send a strided array by value
            buf = memoryview(np.ascontiguousarray(v)).cast("B")
        descriptors.append([name, dtype, [buf.nbytes // itemsize]])
        frames.append(buf)
        total += buf.nbytes
    # NamedTuple records pack as msgpack arrays as they are.
    fields = {name: getattr(msg, name) for name in layout.inline}
    frames[0] = header = msgpack.packb(
        {"v": PROTOCOL_VERSION, "t": msg.TYPE, "f": fields, "a": descriptors}, use_bin_type=True)
    total += len(header)
    if total > max_message_bytes:
        raise OversizeMessage(f"{total} bytes exceed the {max_message_bytes}-byte limit",
                              msg_type=msg.TYPE)
    return frames


def decode(frames: Sequence[Frame], *, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
           ) -> Message:
    """Rebuild and validate a message from its frames, or raise a `ProtocolError`."""
    try:
        return _decode(frames, max_message_bytes)
    except ProtocolError:
        raise
    except Exception as e:  # a hostile peer must never crash a service: keep the error typed
        raise MalformedFrame(f"undecodable message ({type(e).__name__}: {str(e)[:200]})") from e


_SINGLE_BUFFER = (bytes, bytearray, memoryview, zmq.Frame, str)


def _as_buffer(frame: object, i: int) -> memoryview:
    """A read-only byte view of one frame (so arrays built over it are read-only too)."""
    if isinstance(frame, zmq.Frame):
        return frame.buffer.toreadonly()  # always 1-D unsigned bytes
    if isinstance(frame, bytes | bytearray):
        return memoryview(frame).toreadonly()
    if isinstance(frame, memoryview):
        if not frame.c_contiguous:
            raise MalformedFrame(f"frame {i} is not a contiguous buffer")
        return (frame if frame.format == "B" and frame.ndim == 1 else frame.cast("B")).toreadonly()
    raise MalformedFrame(f"frame {i} is a {type(frame).__name__}, not a buffer")


def _decode(frames: Sequence[Frame], max_message_bytes: int) -> Message:
    if isinstance(frames, _SINGLE_BUFFER):
        raise MalformedFrame("expected a sequence of frames, got a single buffer")
    bufs = [_as_buffer(f, i) for i, f in enumerate(frames)]
    if not bufs:
        raise MalformedFrame("empty message: no header frame")
    total = 0
    for b in bufs:
        total += b.nbytes
    if total > max_message_bytes:
        raise OversizeMessage(f"{total} bytes exceed the {max_message_bytes}-byte limit")

    try:
        header = msgpack.unpackb(bufs[0], raw=False, use_list=True, strict_map_key=True,
                                 **_UNPACK_LIMITS)
    except Exception as e:  # msgpack raises a zoo of types (ValueError, StackError, ...)
        raise MalformedFrame(f"header is not valid msgpack ({type(e).__name__}: "
                             f"{str(e)[:200]})") from e
    if not isinstance(header, dict):
        raise MalformedFrame(f"header is a {type(header).__name__}, not a map")
    # The version is checked first: a future version may change everything else.
    v = header.get("v")
    if type(v) is not int:
        raise MalformedFrame(f"header has no integer protocol version (got {v!r:.40})")
    if v != PROTOCOL_VERSION:
        raise VersionMismatch(f"peer speaks protocol version {v}, we speak {PROTOCOL_VERSION}")
    if header.keys() != _HEADER_KEYS:
        raise MalformedFrame(f"header keys {sorted(map(repr, header))} != {sorted(_HEADER_KEYS)}")
    t, f, a = header["t"], header["f"], header["a"]
    cls = MESSAGE_TYPES.get(t) if type(t) is str else None
    if cls is None:
        raise UnknownMessageType(f"unknown message type {t!r:.80}")
    if not isinstance(f, dict):
        raise MalformedFrame(f"field map is a {type(f).__name__}", msg_type=t)
    if not isinstance(a, list):
        raise MalformedFrame(f"buffer list is a {type(a).__name__}", msg_type=t)
    layout = _LAYOUTS[cls]

    if f.keys() != layout.inline_set:
        for key in f:
            if key in layout.buffers:
                raise FieldTypeError("must travel as its own frame, not in the header",
                                     msg_type=t, field=key)
            if key not in layout.inline_set:
                raise UnexpectedField("not in the schema", msg_type=t, field=str(key)[:80])
        missing = next(n for n in layout.inline if n not in f)
        raise MissingField("missing from the header", msg_type=t, field=missing)
    kwargs: dict[str, Any] = dict(f)

    if len(bufs) != 1 + len(a):
        raise MalformedFrame(f"header declares {len(a)} buffer frame(s), got {len(bufs) - 1}",
                             msg_type=t)
    for i, entry in enumerate(a, start=1):
        if not (type(entry) is list and len(entry) == 3 and type(entry[0]) is str):
            raise MalformedFrame(f"bad buffer descriptor {entry!r:.80}", msg_type=t)
        name, dtype, shape = entry
        want = layout.buffers.get(name)
        if want is None:
            raise UnexpectedField("not an array or bytes field of the schema", msg_type=t,
                                  field=name[:80])
        if name in kwargs:
            raise MalformedFrame("buffer declared twice", msg_type=t, field=name)
        want_dtype, itemsize, np_dtype = want
        if dtype != want_dtype:
            raise ArrayMismatch(f"expected dtype {want_dtype!r}, got {dtype!r:.40}", msg_type=t,
                                field=name)
        if not (type(shape) is list and len(shape) == 1 and type(shape[0]) is int
                and shape[0] >= 0):
            raise ArrayMismatch(f"expected a 1-D shape, got {shape!r:.80}", msg_type=t,
                                field=name)
        buf = bufs[i]
        if buf.nbytes != shape[0] * itemsize:
            raise MalformedFrame(f"frame holds {buf.nbytes} bytes, header declares "
                                 f"{shape[0] * itemsize}", msg_type=t, field=name)
        kwargs[name] = buf if np_dtype is None else np.frombuffer(buf, dtype=np_dtype)
    if len(kwargs) != len(layout.inline) + len(layout.buffers):
        missing = next(n for n in layout.buffers if n not in kwargs)
        raise MissingField("no buffer frame declared", msg_type=t, field=missing)
    return cls(**kwargs)  # runs the schema and cross-field validation
