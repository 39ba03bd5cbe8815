"""The wire messages, each declared once (docs/DESIGN.md §7.2, §7.4).

A message kind is one dataclass. Its annotations are the field types on the wire; the metadata of a
field, set with :func:`rule`, says what the decoder checks beyond the type: the wire key when it is
not the field name, an id pattern, integer bounds, allowed values, or, for an array, its dtypes,
shape rule and value check. :mod:`common.wire.codec` encodes and decodes every kind from
:data:`SCHEMA`, which is compiled from these declarations at import.

Annotation -> wire type: ``str``, ``int``, ``bool`` as such (a bool is never an int here); ``float``
takes an int or a float, finite; ``dict[...]`` a map; ``np.ndarray`` an array descriptor (§7.3); a
nested declared dataclass (``RawObservation``) a map of its arrays; ``X | None`` adds nil.
"""

from __future__ import annotations

import re
import time
import types
import typing
from collections.abc import Callable
from dataclasses import MISSING, dataclass, field, fields, is_dataclass
from typing import Any, ClassVar

import numpy as np

from common.shapes import DEFAULT_SHAPE, RFSQShape

SCHEMA_VERSION = 1
STATUSES = ("success", "failed", "errored", "incomplete")
_ID_RE = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")
_DTYPE_RE = re.compile(r"^[<>|=]?[A-Za-z][A-Za-z0-9]{0,15}$")  # "<f4", "|u1", "float32"; no "(2,)f4", "f4,u1"
_INLINE_MAX = 1024  # arrays up to this many bytes are inlined in the header frame
_INT_MAX = 2**62  # upper bound of every count and sequence number


# ----------------------------------------------------------------------------------------------- errors
class WireError(ValueError):
    """A message that must be rejected. ``reason`` is a stable label used in counters and logs."""

    reason: ClassVar[str] = "malformed"


class TruncatedError(WireError):
    reason = "truncated"


class OversizeError(WireError):
    reason = "oversized"


class VersionError(WireError):
    reason = "version"


class SchemaError(WireError):
    reason = "schema"


class DtypeError(WireError):
    reason = "dtype"


class ShapeError(WireError):
    reason = "shape"


class NonFiniteError(WireError):
    reason = "non_finite"


class TokenRangeError(WireError):
    reason = "token_range"


# ----------------------------------------------------------------------------------------------- limits
@dataclass(frozen=True)
class WireLimits:
    """Hard limits checked before anything is allocated. ``shape`` fixes the codes/actions shapes."""

    shape: RFSQShape = DEFAULT_SHAPE
    max_frames: int = 8
    max_header_bytes: int = 64 * 1024
    max_frame_bytes: int = 4 * 1024 * 1024
    max_hidden_dim: int = 16384
    max_image_side: int = 512
    max_str_len: int = 4096
    max_abs_action: float = 1e3

    @property
    def max_message_bytes(self) -> int:
        return self.max_header_bytes + (self.max_frames - 1) * self.max_frame_bytes


DEFAULT_LIMITS = WireLimits()

Bound = int | str  # a number, or the name of a WireLimits attribute read at decode time


def _limit(bound: Bound, limits: WireLimits) -> int:
    return getattr(limits, bound) if isinstance(bound, str) else bound


# ------------------------------------------------------------------------------------------------ rules
@dataclass(frozen=True)
class Exact:
    """Shape rule: exactly the receiver's ``RFSQShape.<attr>`` (``codes_shape``, ``chunk_shape``)."""

    attr: str

    def check(self, name: str, shape: tuple[int, ...], limits: WireLimits) -> None:
        expected = tuple(getattr(limits.shape, self.attr))
        if shape != expected:
            raise ShapeError(f"{name}: shape {list(shape)} != expected {list(expected)}")


@dataclass(frozen=True)
class Dims:
    """Shape rule: one inclusive (lo, hi) range per axis; ``label`` is how the shape reads in errors."""

    label: str
    ranges: tuple[tuple[Bound, Bound], ...]

    def check(self, name: str, shape: tuple[int, ...], limits: WireLimits) -> None:
        ranges = [(_limit(lo, limits), _limit(hi, limits)) for lo, hi in self.ranges]
        if len(shape) != len(ranges) or not all(lo <= n <= hi for n, (lo, hi) in zip(shape, ranges)):
            sizes = ", ".join(str(lo) if lo == hi else f"{lo}..{hi}" for lo, hi in ranges)
            raise ShapeError(f"{name}: shape {list(shape)} must be {self.label} with sizes {sizes}")


ValueCheck = Callable[[str, np.ndarray, WireLimits], None]


@dataclass(frozen=True)
class Array:
    """An array field: allowed dtypes (little-endian), a shape rule checked before anything is
    allocated, and an optional check of the values after the generic finiteness check of floats."""

    dtypes: tuple[str, ...]
    shape: Exact | Dims
    values: ValueCheck | None = None


@dataclass(frozen=True)
class Rule:
    """What the decoder checks on one field beyond its type. Checks run in this order for a message:
    types of every field; ``ident`` and ``early`` bounds; arrays, nested maps and ``check`` in field
    order; every buffer frame referenced once; the other bounds and ``choices``."""

    key: str = ""  # wire key, when it is not the field name
    ident: bool = False  # an id: must match _ID_RE (stored as an attribute, never a path)
    bounds: tuple[Bound, Bound] | None = None  # inclusive int range
    early: bool = False  # bounds checked with the ids, before any array
    choices: tuple[str, ...] = ()
    array: Array | None = None
    check: Callable[[str, Any, WireLimits], None] | None = None  # any other rule: raises a WireError


def rule(*, default: Any = MISSING, default_factory: Any = MISSING, **kwargs: Any) -> Any:
    """A dataclass field carrying its wire :class:`Rule` (``kwargs``) in its metadata."""
    return field(default=default, default_factory=default_factory, metadata={"wire": Rule(**kwargs)})


def _pid() -> Any:
    return rule(key="pid", ident=True)


def _ident() -> Any:
    return rule(ident=True)


def _seq() -> Any:
    return rule(bounds=(0, _INT_MAX), early=True)


def _count(lo: Bound = 0, hi: Bound = _INT_MAX) -> Any:
    return rule(bounds=(lo, hi))


def _sent_at() -> Any:
    return field(default_factory=time.time)


def _token_ids(name: str, arr: np.ndarray, limits: WireLimits) -> None:
    grid = limits.shape.grid_size
    if arr.size and int(arr.max()) >= grid:
        raise TokenRangeError(f"{name}: token id {int(arr.max())} out of range 0..{grid - 1}")


def _bounded_actions(name: str, arr: np.ndarray, limits: WireLimits) -> None:
    if arr.size and float(np.abs(arr).max()) > limits.max_abs_action:
        raise SchemaError(f"{name}: |a| = {float(np.abs(arr).max()):.3g} above {limits.max_abs_action}")


def _receiver_shape(name: str, value: Any, limits: WireLimits) -> None:
    if value != limits.shape.to_dict():
        raise ShapeError(f"{name} {value!r} != this trainer's {limits.shape.to_dict()}")


_IMAGE = Array(("uint8",), Dims("[h, w, 3]", ((1, "max_image_side"), (1, "max_image_side"), (3, 3))))


# --------------------------------------------------------------------------------------------- messages
@dataclass
class Hello:
    producer_id: str = _pid()
    session: str = _ident()
    seq: int = _seq()  # next data sequence number
    backbone_id: str = rule()
    hidden_dim: int = _count(1, "max_hidden_dim")
    shape: dict[str, int] = rule(check=_receiver_shape)  # RFSQShape.to_dict(), must be the receiver's
    codec_sha256: str = ""
    config_json: str = "{}"
    sent_at: float = _sent_at()
    kind: ClassVar[str] = "hello"


@dataclass
class RawObservation:
    """Optional raw observation carried by a sample, for re-extracting features with another backbone.

    agentview, wrist: [h, w, 3] uint8; proprio: [P] float32
    """

    agentview: np.ndarray = rule(array=_IMAGE)
    wrist: np.ndarray = rule(array=_IMAGE)
    proprio: np.ndarray = rule(array=Array(("float32",), Dims("[P]", ((1, 64),))))


@dataclass
class Sample:
    producer_id: str = _pid()
    session: str = _ident()
    seq: int = _seq()
    suite: str = _ident()
    task_id: int = _count()
    episode_id: int = _count()
    step: int = _count()
    hidden: np.ndarray = rule(array=Array(("float16", "float32"), Dims("[D]", ((1, "max_hidden_dim"),))))
    codes: np.ndarray = rule(array=Array(("uint8",), Exact("codes_shape"), _token_ids))  # [T, H, L] < G
    actions: np.ndarray = rule(array=Array(("float32",), Exact("chunk_shape"), _bounded_actions))  # [T, A]
    obs: RawObservation | None = None
    sent_at: float = _sent_at()
    kind: ClassVar[str] = "sample"


@dataclass
class EpisodeEnd:
    producer_id: str = _pid()
    session: str = _ident()
    seq: int = _seq()
    suite: str = _ident()
    task_id: int = _count()
    episode_id: int = _count()
    status: str = rule(choices=STATUSES)
    num_samples: int = _count()
    num_steps: int = _count()
    error: str = ""
    sent_at: float = _sent_at()
    kind: ClassVar[str] = "episode_end"


@dataclass
class Heartbeat:
    producer_id: str = _pid()
    session: str = _ident()
    seq: int = _seq()  # next data sequence number (= data messages sent so far)
    sent_at: float = _sent_at()
    kind: ClassVar[str] = "heartbeat"


@dataclass
class Bye:
    producer_id: str = _pid()
    session: str = _ident()
    seq: int = _seq()  # next data sequence number
    samples_sent: int = _count()
    episodes_sent: int = _count()
    sent_at: float = _sent_at()
    kind: ClassVar[str] = "bye"


@dataclass
class Ack:
    """Trainer -> producer: every data message with ``seq <= archived_seq`` of ``producer_session`` is on disk."""

    trainer_session: str = _ident()
    producer_id: str = _pid()
    producer_session: str = _ident()
    archived_seq: int = _count(-1)  # -1: nothing archived yet
    known: bool = True  # False: this trainer has no hello from that session (it restarted): hello again
    error: str = ""  # non-empty: the trainer refuses this producer (e.g. another backbone); stop
    sent_at: float = _sent_at()
    kind: ClassVar[str] = "ack"


Message = Hello | Sample | EpisodeEnd | Heartbeat | Bye | Ack
DATA_KINDS = ("sample", "episode_end")
MESSAGES: dict[str, type[Message]] = {
    cls.kind: cls for cls in (Hello, Sample, EpisodeEnd, Heartbeat, Bye, Ack)
}


# ------------------------------------------------------------------------------- compiled declarations
@dataclass(frozen=True)
class WireField:
    """One declared field as the codec uses it."""

    name: str  # dataclass attribute
    key: str  # key in the msgpack map
    types: tuple[type, ...]  # Python types msgpack decodes a valid value to
    rule: Rule
    struct: type | None  # a nested declared dataclass (its fields are arrays)
    as_float: bool  # an int on the wire becomes a float


def _wire_types(hint: Any) -> tuple[type, ...]:
    if isinstance(hint, types.UnionType):
        return tuple(t for arg in typing.get_args(hint) for t in _wire_types(arg))
    if hint is float:
        return (int, float)
    if hint in (str, int, bool, type(None)):
        return (hint,)
    if hint is np.ndarray or is_dataclass(hint) or typing.get_origin(hint) is dict:
        return (dict,)  # an array descriptor or a map
    raise TypeError(f"{hint!r} has no wire form")


def _compile(cls: type, nested: bool = False) -> tuple[WireField, ...]:
    """The declared fields of ``cls`` in order; refuses a declaration the codec could not handle."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in fields(cls):
        hint, r = hints[f.name], f.metadata.get("wire", Rule())
        args = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
        struct = next((a for a in args if is_dataclass(a)), None)
        where = f"{cls.__name__}.{f.name}"
        if (hint is np.ndarray) != (r.array is not None):
            raise TypeError(f"{where}: an ndarray field needs an Array rule, and only one takes it")
        if nested and r.array is None:
            raise TypeError(f"{where}: a nested map holds arrays only")
        if (r.bounds is not None and hint is not int) or ((r.ident or r.choices) and hint is not str):
            raise TypeError(f"{where}: bounds need an int field, ident and choices a str field")
        out.append(WireField(f.name, r.key or f.name, _wire_types(hint), r, struct, hint is float))
    return tuple(out)


# kind's dataclass (and each nested one) -> its fields, in wire order
SCHEMA: dict[type, tuple[WireField, ...]] = {cls: _compile(cls) for cls in MESSAGES.values()}
SCHEMA.update(
    {f.struct: _compile(f.struct, nested=True) for fs in list(SCHEMA.values()) for f in fs if f.struct}
)
