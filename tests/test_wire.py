"""Wire schema: every kind round-trips; each kind of malformed input is rejected with its own error."""

from __future__ import annotations

import msgpack
import numpy as np
import pytest

from common import wire
from common.shapes import DEFAULT_SHAPE

SH = DEFAULT_SHAPE


def make_sample(seq: int = 0, d: int = 64, dtype=np.float16, obs: bool = False) -> wire.Sample:
    rng = np.random.default_rng(seq)
    raw = None
    if obs:
        raw = wire.RawObservation(
            agentview=rng.integers(0, 255, (32, 32, 3), dtype=np.uint8),
            wrist=rng.integers(0, 255, (32, 32, 3), dtype=np.uint8),
            proprio=rng.standard_normal(8).astype(np.float32),
        )
    return wire.Sample(
        producer_id="p0",
        session="s1",
        seq=seq,
        suite="libero_spatial",
        task_id=3,
        episode_id=7,
        step=16,
        hidden=rng.standard_normal(d).astype(dtype),  # [D]
        codes=rng.integers(0, SH.grid_size, SH.codes_shape, dtype=np.uint8),  # [T, H, L]
        actions=rng.uniform(-1, 1, SH.chunk_shape).astype(np.float32),  # [T, A]
        obs=raw,
    )


def header(frames: list) -> dict:
    return msgpack.unpackb(bytes(frames[0]), raw=False)


def repack(h: dict, frames: list) -> list:
    return [msgpack.packb(h, use_bin_type=True), *frames[1:]]


def to_bytes(frames: list) -> list[bytes]:
    return [bytes(f) for f in frames]


@pytest.mark.parametrize(
    "d,dtype,obs", [(64, np.float16, False), (4096, np.float32, False), (4096, np.float16, True)]
)
def test_sample_round_trip(d, dtype, obs):
    msg = make_sample(d=d, dtype=dtype, obs=obs)
    out = wire.decode(to_bytes(wire.encode(msg)))
    assert isinstance(out, wire.Sample)
    assert out.hidden.dtype == np.dtype(dtype) and out.hidden.shape == (d,)
    np.testing.assert_array_equal(out.hidden, msg.hidden)
    np.testing.assert_array_equal(out.codes, msg.codes)
    np.testing.assert_array_equal(out.actions, msg.actions)
    assert (out.suite, out.task_id, out.episode_id, out.step, out.seq) == ("libero_spatial", 3, 7, 16, 0)
    if obs:
        np.testing.assert_array_equal(out.obs.agentview, msg.obs.agentview)
        np.testing.assert_array_equal(out.obs.proprio, msg.obs.proprio)
    else:
        assert out.obs is None


@pytest.mark.parametrize(
    "msg",
    [
        wire.Hello("p0", "s1", 0, "embedded-vla@abc", 256, SH.to_dict(), "f" * 64, '{"a": 1}'),
        wire.EpisodeEnd("p0", "s1", 5, "libero_spatial", 1, 2, "errored", 4, 33, "RuntimeError: boom"),
        wire.Heartbeat("p0", "s1", 12),
        wire.Bye("p0", "s1", 12, 10, 2),
        wire.Ack("t1", "p0", "s1", -1, False, "refused"),
    ],
)
def test_control_round_trip(msg):
    out = wire.decode(to_bytes(wire.encode(msg)))
    assert out == msg


def test_large_arrays_travel_out_of_band():
    frames = wire.encode(make_sample(d=4096, dtype=np.float32))
    assert len(frames) == 2  # hidden as a raw frame; codes (1 KiB) and actions inline
    assert header(frames)["hidden"]["frame"] == 1


def expect(exc: type[wire.WireError], frames: list) -> wire.WireError:
    with pytest.raises(exc) as info:
        wire.decode(frames)
    assert str(info.value)  # every rejection says what was wrong
    return info.value


def test_truncated():
    frames = to_bytes(wire.encode(make_sample(d=4096)))
    expect(wire.TruncatedError, [frames[0][:-5], frames[1]])  # header cut short
    expect(wire.TruncatedError, [frames[0]])  # buffer frame missing
    expect(wire.TruncatedError, [frames[0], frames[1][:-2]])  # buffer cut short
    expect(wire.TruncatedError, [])


def test_oversized():
    frames = to_bytes(wire.encode(make_sample(d=4096)))
    limits = wire.WireLimits(max_frame_bytes=1024)
    with pytest.raises(wire.OversizeError):
        wire.decode(frames, limits)
    expect(wire.OversizeError, [frames[0]] + [b"x"] * 20)  # too many frames
    h = header(frames)
    h["hidden"] = {"dtype": "<f4", "shape": [16384, 16384], "frame": 1}  # absurd declared size
    expect(wire.ShapeError, repack(h, frames))
    h["hidden"] = {"dtype": "<f4", "shape": [16384], "frame": 1}
    big = wire.WireLimits(max_frame_bytes=32 * 1024)
    with pytest.raises(wire.OversizeError):
        wire.decode(repack(h, frames), big)
    # a string over the limit is refused by the unpacker; one declared at 2 GB with no bytes behind it
    # is refused as truncated, before anything is allocated
    expect(wire.OversizeError, [msgpack.packb({"v": 1, "kind": "x" * 5000})])
    expect(wire.TruncatedError, [b"\x81\xa1v\xdb\x7f\xff\xff\xff"])


def test_wrong_version():
    frames = to_bytes(wire.encode(make_sample()))
    h = header(frames)
    h["v"] = 99
    err = expect(wire.VersionError, repack(h, frames))
    assert "99" in str(err)
    del h["v"]
    expect(wire.VersionError, repack(h, frames))


def test_wrong_schema():
    frames = to_bytes(wire.encode(make_sample()))
    h = header(frames)
    expect(wire.SchemaError, repack({**h, "kind": "shell"}, frames))
    expect(wire.SchemaError, repack({k: v for k, v in h.items() if k != "step"}, frames))
    expect(wire.SchemaError, repack({**h, "extra": 1}, frames))
    expect(wire.SchemaError, repack({**h, "step": "3"}, frames))
    expect(wire.SchemaError, repack({**h, "pid": "../../etc/passwd"}, frames))
    expect(wire.SchemaError, [msgpack.packb([1, 2, 3])])
    expect(wire.SchemaError, [b"\xc1"])  # never-used msgpack byte


def test_wrong_dtype():
    for field, dtype in [("hidden", np.float64), ("codes", np.int64), ("actions", np.float16)]:
        msg = make_sample()
        setattr(msg, field, getattr(msg, field).astype(dtype))
        expect(wire.DtypeError, to_bytes(wire.encode(msg)))
    h = header(to_bytes(wire.encode(make_sample())))
    h["codes"]["dtype"] = "O"  # object arrays would need pickle
    expect(wire.DtypeError, repack(h, [b""]))


def test_wrong_shape():
    msg = make_sample()
    msg.codes = msg.codes[:, :, :4]
    expect(wire.ShapeError, to_bytes(wire.encode(msg)))
    msg = make_sample()
    msg.actions = np.zeros((8, 6), np.float32)
    expect(wire.ShapeError, to_bytes(wire.encode(msg)))
    msg = make_sample()
    msg.hidden = np.zeros((2, 32), np.float16)
    expect(wire.ShapeError, to_bytes(wire.encode(msg)))
    hello = wire.Hello("p0", "s1", 0, "b", 64, {**SH.to_dict(), "grid_size": 5})
    expect(wire.ShapeError, to_bytes(wire.encode(hello)))


@pytest.mark.parametrize("field", ["hidden", "actions"])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite(field, bad):
    msg = make_sample()
    arr = getattr(msg, field).copy()
    arr.flat[3] = bad
    setattr(msg, field, arr)
    expect(wire.NonFiniteError, to_bytes(wire.encode(msg)))


def test_token_out_of_range():
    msg = make_sample()
    msg.codes[2, 5, 1] = SH.grid_size  # 7 is not a token id
    err = expect(wire.TokenRangeError, to_bytes(wire.encode(msg)))
    assert "0..6" in str(err)


def test_bad_status_and_negative_ids():
    frames = to_bytes(wire.encode(wire.EpisodeEnd("p0", "s1", 0, "libero_spatial", 0, 0, "won", 0, 0)))
    expect(wire.SchemaError, frames)
    msg = make_sample()
    msg.seq = -1
    expect(wire.SchemaError, to_bytes(wire.encode(msg)))


def test_error_reasons_are_distinct():
    classes = [
        wire.TruncatedError,
        wire.OversizeError,
        wire.VersionError,
        wire.SchemaError,
        wire.DtypeError,
        wire.ShapeError,
        wire.NonFiniteError,
        wire.TokenRangeError,
    ]
    assert len({c.reason for c in classes}) == len(classes)


# ------------------------------------------------------------------ any decode failure is a WireError
def test_unhashable_kind_is_rejected():
    # 12 bytes that used to raise TypeError (unhashable) out of decode
    expect(wire.SchemaError, [msgpack.packb({"v": 1, "kind": [1]})])
    expect(wire.SchemaError, [msgpack.packb({"v": 1, "kind": {"a": 1}})])


def _good_frames() -> dict[str, list]:
    return {
        "sample": to_bytes(wire.encode(make_sample(obs=True))),
        "hello": to_bytes(wire.encode(wire.Hello("p0", "s1", 0, "b", 64, SH.to_dict()))),
        "episode_end": to_bytes(
            wire.encode(wire.EpisodeEnd("p0", "s1", 5, "libero_spatial", 1, 2, "success", 4, 33))
        ),
        "heartbeat": to_bytes(wire.encode(wire.Heartbeat("p0", "s1", 12))),
        "bye": to_bytes(wire.encode(wire.Bye("p0", "s1", 12, 10, 2))),
        "ack": to_bytes(wire.encode(wire.Ack("t1", "p0", "s1", -1, False, "refused"))),
    }


@pytest.mark.parametrize("unhashable", [[1], {"a": 1}, [[]], {"k": [1, {"x": 2}]}])
def test_unhashable_value_in_every_field_is_rejected(unhashable):
    for kind, frames in _good_frames().items():
        h = header(frames)
        for key in h:
            expect(wire.WireError, repack({**h, key: unhashable}, frames))
        for key in ("hidden", "codes", "actions") if kind == "sample" else ():  # inside array descriptors
            for sub in h[key]:
                expect(wire.WireError, repack({**h, key: {**h[key], sub: unhashable}}, frames))
        if kind == "sample":
            for sub in h["obs"]:
                expect(wire.WireError, repack({**h, "obs": {**h["obs"], sub: unhashable}}, frames))
            expect(
                wire.WireError,
                repack(
                    {**h, "obs": {**h["obs"], "agentview": {**h["obs"]["agentview"], "dtype": unhashable}}},
                    frames,
                ),
            )


@pytest.mark.parametrize(
    "dtype",
    [",", "f4,,", "(2,", "f4,(2,", "(,)f4", "[", "{", "i4:", "(2)(3)u1", "V-1", "U99999999999999999999"],
)
def test_dtype_strings_numpy_cannot_parse_are_rejected(dtype):
    frames = to_bytes(wire.encode(make_sample()))
    h = header(frames)
    for field in ("hidden", "codes", "actions"):
        expect(wire.DtypeError, repack({**h, field: {**h[field], "dtype": dtype}}, frames))


@pytest.mark.parametrize("version", [True, 1.0, False, 0.0, "1", b"\x01", [1], None])
def test_version_must_be_the_int_1(version):
    frames = to_bytes(wire.encode(make_sample()))
    err = expect(wire.VersionError, repack({**header(frames), "v": version}, frames))
    assert repr(version)[:10] in str(err)


def test_any_unexpected_exception_in_decode_becomes_a_counted_wire_error(monkeypatch):
    def boom(*args, **kwargs):
        raise RuntimeError("a bug in the decoder")

    monkeypatch.setattr(wire, "_decode_sample", boom)
    err = expect(wire.WireError, to_bytes(wire.encode(make_sample())))
    assert err.reason == "malformed" and "RuntimeError" in str(err)
