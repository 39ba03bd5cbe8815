"""Generic encode and decode of the messages declared in :mod:`common.wire.schema` (docs/DESIGN.md §7.3, §7.4).

:func:`encode` walks a message's declared fields; :func:`decode` checks a header against the declaration
of its kind, in a fixed order (limits, header, version, kind, field set and types, ids and sequence
number, arrays and nested maps, frame references, bounds and choices), and builds the dataclass.
"""

from __future__ import annotations

import math
from typing import Any

import msgpack
import numpy as np

from common.wire.schema import (
    _DTYPE_RE,
    _ID_RE,
    _INLINE_MAX,
    DEFAULT_LIMITS,
    MESSAGES,
    SCHEMA,
    SCHEMA_VERSION,
    Array,
    DtypeError,
    Message,
    NonFiniteError,
    OversizeError,
    SchemaError,
    ShapeError,
    TruncatedError,
    VersionError,
    WireError,
    WireField,
    WireLimits,
    _limit,
)


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


def _encode_fields(obj: Any, frames: list[Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for f in SCHEMA[type(obj)]:
        value = getattr(obj, f.name)
        if f.rule.array is not None and isinstance(value, np.ndarray):
            value = _encode_array(value, frames)
        elif f.struct is not None and value is not None:
            value = _encode_fields(value, frames)
        out[f.key] = value
    return out


def encode(msg: Message) -> list[Any]:
    """Message -> list of frames (bytes or buffers) for ``socket.send_multipart(..., copy=False)``."""
    frames: list[Any] = [b""]
    header = {"v": SCHEMA_VERSION, "kind": msg.kind, **_encode_fields(msg, frames)}
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


def _check_int(name: str, value: int, lo: int, hi: int) -> None:
    if isinstance(value, bool) or not lo <= value <= hi:
        raise SchemaError(f"{name}={value!r} out of range [{lo}, {hi}]")


def _array_dtype(name: str, dtype_s: str, dtypes: tuple[str, ...]) -> np.dtype:
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
    return dtype


def _array_buffer(name: str, desc: dict[str, Any], frames: list[Any], used: set[int]) -> Any:
    if ("data" in desc) == ("frame" in desc):
        raise SchemaError(f"{name}: array descriptor needs exactly one of data, frame")
    if "data" in desc:
        if not isinstance(desc["data"], bytes):
            raise SchemaError(f"{name}: inline data must be bin")
        return desc["data"]
    idx = desc["frame"]
    if not isinstance(idx, int) or isinstance(idx, bool) or idx < 1:
        raise SchemaError(f"{name}: frame index {idx!r} must be an int >= 1")
    if idx >= len(frames):
        raise TruncatedError(f"{name}: refers to frame {idx} but the message has {len(frames)} frames")
    if idx in used:
        raise SchemaError(f"{name}: frame {idx} referenced twice")
    used.add(idx)
    return frames[idx]


def _decode_array(
    name: str, desc: Any, frames: list[Any], used: set[int], spec: Array, limits: WireLimits
) -> np.ndarray:
    if not isinstance(desc, dict) or set(desc) - {"dtype", "shape", "data", "frame"}:
        raise SchemaError(f"{name}: array descriptor must be a map with dtype, shape and data or frame")
    dtype_s, shape = desc.get("dtype"), desc.get("shape")
    if not isinstance(dtype_s, str) or not isinstance(shape, list):
        raise SchemaError(f"{name}: array descriptor needs dtype (str) and shape (list)")
    dtype = _array_dtype(name, dtype_s, spec.dtypes)
    if not all(isinstance(s, int) and not isinstance(s, bool) and 0 <= s <= 1 << 20 for s in shape):
        raise ShapeError(f"{name}: shape {shape!r} must be a list of non-negative ints")
    spec.shape.check(name, tuple(shape), limits)  # raises ShapeError before anything is allocated
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes > limits.max_frame_bytes:
        raise OversizeError(f"{name}: declared {nbytes} bytes, limit {limits.max_frame_bytes}")
    buf = _array_buffer(name, desc, frames, used)
    if len(buf) != nbytes:
        cls = TruncatedError if len(buf) < nbytes else ShapeError
        raise cls(f"{name}: buffer has {len(buf)} bytes, {dtype.name}{list(shape)} needs {nbytes}")
    arr = np.frombuffer(buf, dtype=dtype).reshape(shape)
    if dtype.kind == "f" and not np.isfinite(arr).all():
        raise NonFiniteError(f"{name}: contains NaN or Inf")
    if spec.values is not None:
        spec.values(name, arr, limits)
    return arr


def _decode_struct(
    cls: type, name: str, obj: dict[str, Any], frames: list[Any], used: set[int], limits: WireLimits
) -> Any:
    """A nested map of arrays (a sample's ``obs``) -> its dataclass."""
    spec = SCHEMA[cls]
    if set(obj) != {f.key for f in spec}:
        keys = ", ".join(f.key for f in spec)
        raise SchemaError(f"{name} must have exactly {keys}; got {sorted(map(str, obj))}")
    values = {}
    for f in spec:
        values[f.name] = _decode_array(f"{name}.{f.key}", obj[f.key], frames, used, f.rule.array, limits)
    return cls(**values)


def _check_types(kind: str, h: dict[str, Any], spec: tuple[WireField, ...]) -> None:
    present, keys = set(h) - {"v", "kind"}, {f.key for f in spec}
    if present != keys:
        missing, extra = sorted(keys - present), sorted(map(str, present - keys))
        raise SchemaError(f"{kind}: missing fields {missing}, unexpected fields {extra}")
    for f in spec:
        value = h[f.key]
        if not isinstance(value, f.types) or (isinstance(value, bool) and bool not in f.types):
            raise SchemaError(
                f"{kind}.{f.key}: expected {'/'.join(t.__name__ for t in f.types)}, got {type(value).__name__}"
            )
        if isinstance(value, float) and not math.isfinite(value):
            raise NonFiniteError(f"{kind}.{f.key} is not finite")


def _check_scalars(
    kind: str, h: dict[str, Any], spec: tuple[WireField, ...], limits: WireLimits, early: bool
) -> None:
    """Ids and early bounds (``early``), or the other bounds and the choices."""
    for f in spec:
        r, value = f.rule, h[f.key]
        if early and r.ident and not _ID_RE.match(value):
            raise SchemaError(f"{f.key}={value[:80]!r} must match {_ID_RE.pattern}")
        if r.bounds is not None and r.early == early:
            _check_int(f.key, value, _limit(r.bounds[0], limits), _limit(r.bounds[1], limits))
        if not early and r.choices and value not in r.choices:
            raise SchemaError(f"{kind}.{f.key} {value[:40]!r} not in {r.choices}")


def _decode_value(
    kind: str, f: WireField, value: Any, frames: list[Any], used: set[int], limits: WireLimits
) -> Any:
    if f.rule.array is not None:
        return _decode_array(f.key, value, frames, used, f.rule.array, limits)
    if f.struct is not None and value is not None:
        return _decode_struct(f.struct, f.key, value, frames, used, limits)
    if f.rule.check is not None:
        f.rule.check(f"{kind}.{f.key}", value, limits)
    return float(value) if f.as_float else value


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
    if not isinstance(kind, str) or kind not in MESSAGES:  # a list or map kind is unhashable
        raise SchemaError(f"unknown kind {str(kind)[:40]!r}; expected one of {sorted(MESSAGES)}")
    cls = MESSAGES[kind]
    spec = SCHEMA[cls]
    _check_types(kind, h, spec)
    _check_scalars(kind, h, spec, limits, early=True)
    if all(f.rule.array is None and f.struct is None for f in spec) and len(frames) != 1:
        raise SchemaError(f"{kind} carries no arrays but has {len(frames)} frames")
    used: set[int] = set()
    values = {f.name: _decode_value(kind, f, h[f.key], frames, used, limits) for f in spec}
    if len(used) != len(frames) - 1:
        raise SchemaError(f"message has {len(frames) - 1} buffer frames but {len(used)} are referenced")
    _check_scalars(kind, h, spec, limits, early=False)
    return cls(**values)
