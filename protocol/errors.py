"""Typed protocol errors.

Guarantee: every way a message can be rejected, by the codec or by schema validation, is a
subclass of `ProtocolError`; each subclass has a short stable `code` (usable as a counter key
or as `Error.code` on the wire), and every error names the message type and field it concerns
when they are known, as `Type.field: detail`.
"""

from __future__ import annotations

from typing import ClassVar


class ProtocolError(Exception):
    """Base of all rejections. `peer` is the ROUTER identity of the sender, when known."""

    code: ClassVar[str] = "protocol_error"

    def __init__(self, detail: str, *, msg_type: str | None = None, field: str | None = None):
        self.detail = detail
        self.msg_type = msg_type
        self.field = field
        self.peer: bytes | None = None
        where = ".".join(p for p in (msg_type, field) if p)
        super().__init__(f"{where}: {detail}" if where else detail)


class UnknownMessageType(ProtocolError):
    code = "unknown_type"


class VersionMismatch(ProtocolError):
    code = "version_mismatch"


class MissingField(ProtocolError):
    code = "missing_field"


class UnexpectedField(ProtocolError):
    code = "unexpected_field"


class FieldTypeError(ProtocolError):
    code = "field_type"


class ArrayMismatch(ProtocolError):
    code = "array_mismatch"


class OversizeMessage(ProtocolError):
    code = "oversize"


class MalformedFrame(ProtocolError):
    code = "malformed"


class InvalidValue(ProtocolError):
    code = "invalid_value"


ERROR_CLASSES: tuple[type[ProtocolError], ...] = (
    UnknownMessageType,
    VersionMismatch,
    MissingField,
    UnexpectedField,
    FieldTypeError,
    ArrayMismatch,
    OversizeMessage,
    MalformedFrame,
    InvalidValue,
)
