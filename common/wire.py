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

:func:`decode` validates everything before it builds an array and raises one :class:`WireError`
subclass per kind of malformed input; ``err.reason`` is a short stable label for counters.
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass, field
from typing import Any, ClassVar

import msgpack
import numpy as np

from common.shapes import DEFAULT_SHAPE, RFSQShape

SCHEMA_VERSION = 1
STATUSES = ("success", "failed", "errored", "incomplete")
_ID_RE = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")
_DTYPE_RE = re.compile(r"^[<>|=]?[A-Za-z][A-Za-z0-9]{0,15}$")  # "<f4", "|u1", "float32"; no "(2,)f4", "f4,u1"
_INLINE_MAX = 1024  # arrays up to this many bytes are inlined in the header frame


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


# --------------------------------------------------------------------------------------------- messages
@dataclass
class Hello:
    producer_id: str
    session: str
    seq: int  # next data sequence number
    backbone_id: str
    hidden_dim: int
    shape: dict[str, int]
    codec_sha256: str = ""
    config_json: str = "{}"
    sent_at: float = field(default_factory=time.time)
    kind: ClassVar[str] = "hello"


@dataclass
class RawObservation:
    """Optional raw observation carried by a sample, for re-extracting features with another backbone.

    agentview, wrist: [h, w, 3] uint8; proprio: [P] float32
    """

    agentview: np.ndarray
    wrist: np.ndarray
    proprio: np.ndarray


@dataclass
class Sample:
    producer_id: str
    session: str
    seq: int
    suite: str
    task_id: int
    episode_id: int
    step: int
    hidden: np.ndarray  # [D] float16 or float32
    codes: np.ndarray  # [T, H, L] uint8, values < G
    actions: np.ndarray  # [T, A] float32
    obs: RawObservation | None = None
    sent_at: float = field(default_factory=time.time)
    kind: ClassVar[str] = "sample"


@dataclass
class EpisodeEnd:
    producer_id: str
    session: str
    seq: int
    suite: str
    task_id: int
    episode_id: int
    status: str  # one of STATUSES
    num_samples: int
    num_steps: int
    error: str = ""
    sent_at: float = field(default_factory=time.time)
    kind: ClassVar[str] = "episode_end"


@dataclass
class Heartbeat:
    producer_id: str
    session: str
    seq: int  # next data sequence number (= data messages sent so far)
    sent_at: float = field(default_factory=time.time)
    kind: ClassVar[str] = "heartbeat"


@dataclass
class Bye:
    producer_id: str
    session: str
    seq: int  # next data sequence number
    samples_sent: int
    episodes_sent: int
    sent_at: float = field(default_factory=time.time)
    kind: ClassVar[str] = "bye"


@dataclass
class Ack:
    """Trainer -> producer: every data message with ``seq <= archived_seq`` of ``producer_session`` is on disk."""

    trainer_session: str
    producer_id: str
    producer_session: str
    archived_seq: int
    known: bool = True  # False: this trainer has no hello from that session (it restarted): hello again
    error: str = ""  # non-empty: the trainer refuses this producer (e.g. another backbone); stop
    sent_at: float = field(default_factory=time.time)
    kind: ClassVar[str] = "ack"


Message = Hello | Sample | EpisodeEnd | Heartbeat | Bye | Ack
DATA_KINDS = ("sample", "episode_end")

# field name -> python type(s) expected after msgpack decoding (arrays are handled apart)
_I = (int,)
_F = (int, float)
_S = (str,)
_B = (bool,)
_FIELDS: dict[str, dict[str, tuple[type, ...]]] = {
    "hello": {
        "pid": _S,
        "session": _S,
        "seq": _I,
        "backbone_id": _S,
        "hidden_dim": _I,
        "shape": (dict,),
        "codec_sha256": _S,
        "config_json": _S,
        "sent_at": _F,
    },
    "sample": {
        "pid": _S,
        "session": _S,
        "seq": _I,
        "suite": _S,
        "task_id": _I,
        "episode_id": _I,
        "step": _I,
        "hidden": (dict,),
        "codes": (dict,),
        "actions": (dict,),
        "obs": (dict, type(None)),
        "sent_at": _F,
    },
    "episode_end": {
        "pid": _S,
        "session": _S,
        "seq": _I,
        "suite": _S,
        "task_id": _I,
        "episode_id": _I,
        "status": _S,
        "num_samples": _I,
        "num_steps": _I,
        "error": _S,
        "sent_at": _F,
    },
    "heartbeat": {"pid": _S, "session": _S, "seq": _I, "sent_at": _F},
    "bye": {"pid": _S, "session": _S, "seq": _I, "samples_sent": _I, "episodes_sent": _I, "sent_at": _F},
    "ack": {
        "trainer_session": _S,
        "pid": _S,
        "producer_session": _S,
        "archived_seq": _I,
        "known": _B,
        "error": _S,
        "sent_at": _F,
    },
}
_ALIASES = {"producer_id": "pid"}  # dataclass field -> wire key


# ---------------------------------------------------------------------------------------------- encode
def _encode_array(arr: np.ndarray, frames: list[Any]) -> dict[str, Any]:
    arr = np.ascontiguousarray(arr)
    desc: dict[str, Any] = {"dtype": arr.dtype.str, "shape": list(arr.shape)}
    if arr.nbytes <= _INLINE_MAX:
        desc["data"] = arr.tobytes()
    else:
        desc["frame"] = len(frames)
        frames.append(memoryview(arr).cast("B"))  # zero-copy: zmq sends straight from the array
    return desc


def encode(msg: Message) -> list[Any]:
    """Message -> list of frames (bytes or buffers) for ``socket.send_multipart(..., copy=False)``."""
    frames: list[Any] = [b""]
    header: dict[str, Any] = {"v": SCHEMA_VERSION, "kind": msg.kind}
    for name, value in vars(msg).items():
        key = _ALIASES.get(name, name)
        if isinstance(value, np.ndarray):
            value = _encode_array(value, frames)
        elif isinstance(value, RawObservation):
            value = {k: _encode_array(getattr(value, k), frames) for k in ("agentview", "wrist", "proprio")}
        header[key] = value
    frames[0] = msgpack.packb(header, use_bin_type=True)
    return frames


# ---------------------------------------------------------------------------------------------- decode
def _unpack_header(raw: bytes, limits: WireLimits) -> dict[str, Any]:
    if len(raw) > limits.max_header_bytes:
        raise OversizeError(f"header frame is {len(raw)} bytes, limit {limits.max_header_bytes}")
    if not raw:
        raise TruncatedError("empty header frame")
    try:
        obj = msgpack.unpackb(
            raw,
            raw=False,
            use_list=True,
            strict_map_key=True,
            max_str_len=limits.max_str_len,
            max_bin_len=_INLINE_MAX,
            max_array_len=16,
            max_map_len=32,
            max_ext_len=0,
        )
    except msgpack.ExtraData as exc:
        raise SchemaError(f"header frame has trailing bytes after the msgpack map: {exc}") from None
    except (msgpack.OutOfData, ValueError) as exc:  # ValueError: incomplete input, limits exceeded
        text = str(exc)
        if "incomplete" in text:
            raise TruncatedError(f"header frame ends early: {text}") from None
        if "exceeds max" in text:
            raise OversizeError(f"header frame declares too large a field: {text}") from None
        raise SchemaError(f"header frame is not valid msgpack: {text}") from None
    except Exception as exc:  # UnicodeDecodeError, StackError, FormatError, TypeError, ...
        raise SchemaError(f"header frame is not valid msgpack: {type(exc).__name__}: {exc}") from None
    if not isinstance(obj, dict):
        raise SchemaError(f"header must be a msgpack map, got {type(obj).__name__}")
    return obj


def _check_str(name: str, value: str, pattern: bool = False) -> None:
    if pattern and not _ID_RE.match(value):
        raise SchemaError(f"{name}={value[:80]!r} must match {_ID_RE.pattern}")


def _check_int(name: str, value: int, lo: int, hi: int = 2**62) -> None:
    if isinstance(value, bool) or not lo <= value <= hi:
        raise SchemaError(f"{name}={value!r} out of range [{lo}, {hi}]")


def _decode_array(
    name: str,
    desc: Any,
    frames: list[Any],
    used: set[int],
    dtypes: tuple[str, ...],
    shape_check: Any,
    limits: WireLimits,
) -> np.ndarray:
    if not isinstance(desc, dict) or set(desc) - {"dtype", "shape", "data", "frame"}:
        raise SchemaError(f"{name}: array descriptor must be a map with dtype, shape and data or frame")
    dtype_s, shape = desc.get("dtype"), desc.get("shape")
    if not isinstance(dtype_s, str) or not isinstance(shape, list):
        raise SchemaError(f"{name}: array descriptor needs dtype (str) and shape (list)")
    try:  # numpy parses "f4,,", "(2," as Python and raises SyntaxError, ValueError, TypeError, ...
        if not _DTYPE_RE.match(dtype_s):
            raise ValueError("not a simple dtype")
        dtype = np.dtype(dtype_s)
    except Exception:
        raise DtypeError(f"{name}: unknown dtype {dtype_s[:32]!r}; expected one of {dtypes}") from None
    if dtype.name not in dtypes or dtype.byteorder == ">":
        raise DtypeError(
            f"{name}: dtype {dtype_s[:32]!r} not allowed; expected one of {dtypes} (little-endian)"
        )
    if not all(isinstance(s, int) and not isinstance(s, bool) and 0 <= s <= 1 << 20 for s in shape):
        raise ShapeError(f"{name}: shape {shape!r} must be a list of non-negative ints")
    shape_check(name, tuple(shape))  # raises ShapeError before anything is allocated
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes > limits.max_frame_bytes:
        raise OversizeError(f"{name}: declared {nbytes} bytes, limit {limits.max_frame_bytes}")
    if ("data" in desc) == ("frame" in desc):
        raise SchemaError(f"{name}: array descriptor needs exactly one of data, frame")
    if "data" in desc:
        buf = desc["data"]
        if not isinstance(buf, bytes):
            raise SchemaError(f"{name}: inline data must be bin")
    else:
        idx = desc["frame"]
        if not isinstance(idx, int) or isinstance(idx, bool) or idx < 1:
            raise SchemaError(f"{name}: frame index {idx!r} must be an int >= 1")
        if idx >= len(frames):
            raise TruncatedError(f"{name}: refers to frame {idx} but the message has {len(frames)} frames")
        if idx in used:
            raise SchemaError(f"{name}: frame {idx} referenced twice")
        used.add(idx)
        buf = frames[idx]
    if len(buf) != nbytes:
        cls = TruncatedError if len(buf) < nbytes else ShapeError
        raise cls(f"{name}: buffer has {len(buf)} bytes, {dtype.name}{list(shape)} needs {nbytes}")
    arr = np.frombuffer(buf, dtype=dtype).reshape(shape)
    if dtype.kind == "f" and not np.isfinite(arr).all():
        raise NonFiniteError(f"{name}: contains NaN or Inf")
    return arr


def _exact(expected: tuple[int, ...]):
    def check(name: str, shape: tuple[int, ...]) -> None:
        if shape != expected:
            raise ShapeError(f"{name}: shape {list(shape)} != expected {list(expected)}")

    return check


def _decode_sample(h: dict[str, Any], frames: list[Any], limits: WireLimits) -> Sample:
    used: set[int] = set()
    sh = limits.shape

    def hidden_shape(name: str, shape: tuple[int, ...]) -> None:
        if len(shape) != 1 or not 1 <= shape[0] <= limits.max_hidden_dim:
            raise ShapeError(
                f"{name}: shape {list(shape)} must be [D] with 1 <= D <= {limits.max_hidden_dim}"
            )

    def image_shape(name: str, shape: tuple[int, ...]) -> None:
        m = limits.max_image_side
        if len(shape) != 3 or shape[2] != 3 or not (1 <= shape[0] <= m and 1 <= shape[1] <= m):
            raise ShapeError(f"{name}: shape {list(shape)} must be [h, w, 3] with sides in 1..{m}")

    def proprio_shape(name: str, shape: tuple[int, ...]) -> None:
        if len(shape) != 1 or not 1 <= shape[0] <= 64:
            raise ShapeError(f"{name}: shape {list(shape)} must be [P] with 1 <= P <= 64")

    hidden = _decode_array("hidden", h["hidden"], frames, used, ("float16", "float32"), hidden_shape, limits)
    codes = _decode_array("codes", h["codes"], frames, used, ("uint8",), _exact(sh.codes_shape), limits)
    if codes.size and int(codes.max()) >= sh.grid_size:
        raise TokenRangeError(f"codes: token id {int(codes.max())} out of range 0..{sh.grid_size - 1}")
    actions = _decode_array(
        "actions", h["actions"], frames, used, ("float32",), _exact(sh.chunk_shape), limits
    )
    if actions.size and float(np.abs(actions).max()) > limits.max_abs_action:
        raise SchemaError(f"actions: |a| = {float(np.abs(actions).max()):.3g} above {limits.max_abs_action}")
    obs = None
    if h["obs"] is not None:
        o = h["obs"]
        if set(o) != {"agentview", "wrist", "proprio"}:
            raise SchemaError(f"obs must have exactly agentview, wrist, proprio; got {sorted(map(str, o))}")
        obs = RawObservation(
            agentview=_decode_array(
                "obs.agentview", o["agentview"], frames, used, ("uint8",), image_shape, limits
            ),
            wrist=_decode_array("obs.wrist", o["wrist"], frames, used, ("uint8",), image_shape, limits),
            proprio=_decode_array(
                "obs.proprio", o["proprio"], frames, used, ("float32",), proprio_shape, limits
            ),
        )
    if len(used) != len(frames) - 1:
        raise SchemaError(f"message has {len(frames) - 1} buffer frames but {len(used)} are referenced")
    for name in ("task_id", "episode_id", "step"):
        _check_int(name, h[name], 0)
    return Sample(
        producer_id=h["pid"],
        session=h["session"],
        seq=h["seq"],
        suite=h["suite"],
        task_id=h["task_id"],
        episode_id=h["episode_id"],
        step=h["step"],
        hidden=hidden,
        codes=codes,
        actions=actions,
        obs=obs,
        sent_at=float(h["sent_at"]),
    )


def decode(frames: list[Any], limits: WireLimits = DEFAULT_LIMITS) -> Message:
    """Frames -> a validated message. Raises a :class:`WireError` subclass on any malformed input.

    Nothing else escapes: an exception that no check foresaw becomes a plain :class:`WireError`
    (reason ``malformed``), so a receive loop that catches ``WireError`` survives every input.
    """
    try:
        return _decode(frames, limits)
    except WireError:
        raise
    except Exception as exc:
        raise WireError(f"undecodable message: {type(exc).__name__}: {str(exc)[:200]}") from exc


def _decode(frames: list[Any], limits: WireLimits) -> Message:
    if not frames:
        raise TruncatedError("no frames")
    if len(frames) > limits.max_frames:
        raise OversizeError(f"{len(frames)} frames, limit {limits.max_frames}")
    frames = [f.buffer if hasattr(f, "buffer") else f for f in frames]  # zmq.Frame -> memoryview
    for i, f in enumerate(frames[1:], 1):
        if len(f) > limits.max_frame_bytes:
            raise OversizeError(f"frame {i} is {len(f)} bytes, limit {limits.max_frame_bytes}")
    h = _unpack_header(bytes(frames[0]), limits)
    version = h.get("v")
    if type(version) is not int or version != SCHEMA_VERSION:  # True == 1.0 == 1, but not a version
        raise VersionError(f"schema version {repr(version)[:40]} ({type(version).__name__}), "
                           f"this side speaks {SCHEMA_VERSION} (int)")  # fmt: skip
    kind = h.get("kind")
    if not isinstance(kind, str) or kind not in _FIELDS:  # a list or map kind is unhashable
        raise SchemaError(f"unknown kind {str(kind)[:40]!r}; expected one of {sorted(_FIELDS)}")
    spec = _FIELDS[kind]
    present = set(h) - {"v", "kind"}
    if present != set(spec):
        missing, extra = sorted(set(spec) - present), sorted(map(str, present - set(spec)))
        raise SchemaError(f"{kind}: missing fields {missing}, unexpected fields {extra}")
    for name, types in spec.items():
        value = h[name]
        if not isinstance(value, types) or (isinstance(value, bool) and types != _B):
            raise SchemaError(
                f"{kind}.{name}: expected {'/'.join(t.__name__ for t in types)}, got {type(value).__name__}"
            )
        if isinstance(value, float) and not math.isfinite(value):
            raise NonFiniteError(f"{kind}.{name} is not finite")
    _check_str("pid", h["pid"], pattern=True)
    for name in ("session", "trainer_session", "producer_session"):
        if name in h:
            _check_str(name, h[name], pattern=True)
    if kind != "ack":
        _check_int("seq", h["seq"], 0)
    if kind in ("sample", "episode_end"):
        _check_str("suite", h["suite"], pattern=True)
    if kind != "sample" and len(frames) != 1:
        raise SchemaError(f"{kind} carries no arrays but has {len(frames)} frames")

    if kind == "sample":
        return _decode_sample(h, frames, limits)
    if kind == "hello":
        shape = h["shape"]
        if shape != limits.shape.to_dict():
            raise ShapeError(f"hello.shape {shape!r} != this trainer's {limits.shape.to_dict()}")
        _check_int("hidden_dim", h["hidden_dim"], 1, limits.max_hidden_dim)
        return Hello(
            producer_id=h["pid"],
            session=h["session"],
            seq=h["seq"],
            backbone_id=h["backbone_id"],
            hidden_dim=h["hidden_dim"],
            shape=shape,
            codec_sha256=h["codec_sha256"],
            config_json=h["config_json"],
            sent_at=float(h["sent_at"]),
        )
    if kind == "episode_end":
        if h["status"] not in STATUSES:
            raise SchemaError(f"episode_end.status {h['status'][:40]!r} not in {STATUSES}")
        for name in ("task_id", "episode_id", "num_samples", "num_steps"):
            _check_int(name, h[name], 0)
        return EpisodeEnd(
            producer_id=h["pid"],
            session=h["session"],
            seq=h["seq"],
            suite=h["suite"],
            task_id=h["task_id"],
            episode_id=h["episode_id"],
            status=h["status"],
            num_samples=h["num_samples"],
            num_steps=h["num_steps"],
            error=h["error"],
            sent_at=float(h["sent_at"]),
        )
    if kind == "heartbeat":
        return Heartbeat(
            producer_id=h["pid"], session=h["session"], seq=h["seq"], sent_at=float(h["sent_at"])
        )
    if kind == "bye":
        _check_int("samples_sent", h["samples_sent"], 0)
        _check_int("episodes_sent", h["episodes_sent"], 0)
        return Bye(
            producer_id=h["pid"],
            session=h["session"],
            seq=h["seq"],
            samples_sent=h["samples_sent"],
            episodes_sent=h["episodes_sent"],
            sent_at=float(h["sent_at"]),
        )
    _check_int("archived_seq", h["archived_seq"], -1)
    return Ack(
        trainer_session=h["trainer_session"],
        producer_id=h["pid"],
        producer_session=h["producer_session"],
        archived_seq=h["archived_seq"],
        known=h["known"],
        error=h["error"],
        sent_at=float(h["sent_at"]),
    )
