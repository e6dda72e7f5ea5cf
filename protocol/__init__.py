"""The wire between allocator, actors and learner: message schemas, codec, socket helpers.

Components import each other only through this package.
"""

from protocol.codec import DEFAULT_MAX_MESSAGE_BYTES, decode, encode
from protocol.errors import (
    ArrayMismatch,
    FieldTypeError,
    InvalidValue,
    MalformedFrame,
    MissingField,
    OversizeMessage,
    ProtocolError,
    UnexpectedField,
    UnknownMessageType,
    VersionMismatch,
)
from protocol.messages import (
    MESSAGE_TYPES,
    PROTOCOL_VERSION,
    Error,
    Heartbeat,
    LearnerProgress,
    Message,
    NoWork,
    RolloutGroup,
    Sample,
    StatsReport,
    TensorMeta,
    WeightAck,
    WeightAnnounce,
    WeightChunk,
    WorkGrant,
    WorkRequest,
)

__all__ = [
    "DEFAULT_MAX_MESSAGE_BYTES", "MESSAGE_TYPES", "PROTOCOL_VERSION",
    "decode", "encode",
    "ArrayMismatch", "FieldTypeError", "InvalidValue", "MalformedFrame", "MissingField",
    "OversizeMessage", "ProtocolError", "UnexpectedField", "UnknownMessageType",
    "VersionMismatch",
    "Error", "Heartbeat", "LearnerProgress", "Message", "NoWork", "RolloutGroup", "Sample",
    "StatsReport", "TensorMeta", "WeightAck", "WeightAnnounce", "WeightChunk", "WorkGrant",
    "WorkRequest",
]
