"""Wire schema between producers and the trainer (docs/DESIGN.md §7): typed messages, msgpack, no pickle.

A message travels as a list of ZeroMQ frames::

    frame 0      msgpack map: {"v": SCHEMA_VERSION, "kind": ..., "pid": ..., "session": ..., "seq": ..., ...}
    frame 1..n   raw array buffers referenced from frame 0 as {"dtype", "shape", "frame": i}

Small arrays may instead be inlined as {"dtype", "shape", "data": <bin>}. Large buffers go out of band so
that neither side copies them through msgpack (zero-copy on send).

Kinds, producer -> trainer: ``hello`` (who I am, backbone, shapes, config), ``sample`` (one policy query),
``episode_end`` (status of one episode), ``heartbeat`` (liveness, how many data messages were sent),
``bye`` (clean shutdown with the producer's counts). Trainer -> producer: ``ack`` (highest sequence number
durably archived; a new trainer session id tells the producer to resend what is not acknowledged).

Sequence numbers count *data* messages (sample, episode_end) per producer session, from 0. Control
messages (hello, heartbeat, bye) carry the next data sequence number and never consume one.

Each kind is declared once, as a dataclass in :mod:`common.wire.schema` (field types and rules);
:mod:`common.wire.codec` encodes and decodes every kind from those declarations. :func:`decode`
validates everything before it builds an array and raises one :class:`WireError` subclass per kind
of malformed input; ``err.reason`` is a short stable label for counters.
"""

from common.wire import codec, schema
from common.wire.codec import decode, encode
from common.wire.schema import (
    _ID_RE,
    DATA_KINDS,
    DEFAULT_LIMITS,
    MESSAGES,
    SCHEMA_VERSION,
    STATUSES,
    Ack,
    Bye,
    DtypeError,
    EpisodeEnd,
    Heartbeat,
    Hello,
    Message,
    NonFiniteError,
    OversizeError,
    RawObservation,
    Sample,
    SchemaError,
    ShapeError,
    TokenRangeError,
    TruncatedError,
    VersionError,
    WireError,
    WireLimits,
)

__all__ = [
    "DATA_KINDS",
    "DEFAULT_LIMITS",
    "MESSAGES",
    "SCHEMA_VERSION",
    "STATUSES",
    "Ack",
    "Bye",
    "DtypeError",
    "EpisodeEnd",
    "Heartbeat",
    "Hello",
    "Message",
    "NonFiniteError",
    "OversizeError",
    "RawObservation",
    "Sample",
    "SchemaError",
    "ShapeError",
    "TokenRangeError",
    "TruncatedError",
    "VersionError",
    "WireError",
    "WireLimits",
    "_ID_RE",
    "codec",
    "decode",
    "encode",
    "schema",
]
