"""Wire schema: every kind round-trips; each kind of malformed input is rejected with its own error."""

from __future__ import annotations

import dataclasses
import hashlib

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

    monkeypatch.setattr(wire.codec, "_decode_array", boom)
    err = expect(wire.WireError, to_bytes(wire.encode(make_sample())))
    assert err.reason == "malformed" and "RuntimeError" in str(err)


# ------------------------------------------------------------------ the byte format is pinned
# sha256 of every frame, recorded from the hand-written encoder before the messages were declared once
# (docs/DESIGN.md §7.3); a change here means producers and trainers of different versions disagree
T0 = 1_700_000_000.25
PINNED = {
    "hello": ["69cc43da2c7e2959a420e0425fbda44557cd1aba9c73d6d103ab4d62218e63ab"],
    "sample_inline": ["9adb4579530da93be5ae23b06b165dff79651c81f721dd9f9712a989b2065329"],
    "sample_frames_obs": [
        "92548d17da6739e09fb73f8a514d837063dec879bc97e1c727b6c2061d353758",
        "1b6052fdce0460d821e615f424b03c9273a69d5d7fbbf343b99b0b066fef314f",
        "5f24b2f16026ec7d0450a5a08283d3cfd47302fe859f579ed79fe7d2663b73f9",
    ],
    "episode_end": ["8f33651af43808563c565cf785a8faf1dd7547e2cda88c7eaa52d890b8005a82"],
    "heartbeat": ["4d1f9c15780d2164fab4cab16deada0af6905d7b73e28afeefe244530159d5d4"],
    "bye": ["cadfac183efd644e5243931e0bd8fd3f721c0841142502b12a5b3477f6846bfa"],
    "ack": ["fa3b95e90a8f14ca6901a50036e7f16b633ce2832fd8b709943ca4d00aefa68c"],
}


def _fixed_arrays(d: int, dtype) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    hidden = ((np.arange(d) % 17 - 8) / 4).astype(dtype)  # [D]
    codes = (np.arange(np.prod(SH.codes_shape)) % SH.grid_size).astype(np.uint8).reshape(SH.codes_shape)
    actions = np.linspace(-1, 1, np.prod(SH.chunk_shape)).astype(np.float32).reshape(SH.chunk_shape)
    return hidden, codes, actions


def pinned_messages() -> dict[str, wire.Message]:
    """One message of each kind with fixed contents (no RNG, fixed sent_at), both array placements."""
    h, c, a = _fixed_arrays(8, np.float16)  # every array inline
    big_h, big_c, big_a = _fixed_arrays(4096, np.float32)  # hidden out of band
    obs = wire.RawObservation(
        agentview=(np.arange(32 * 32 * 3) % 251).astype(np.uint8).reshape(32, 32, 3),  # out of band
        wrist=(np.arange(16 * 16 * 3) % 13).astype(np.uint8).reshape(16, 16, 3),  # inline
        proprio=np.linspace(-2, 2, 8).astype(np.float32),
    )
    return {
        "hello": wire.Hello(
            "p0", "s1", 0, "embedded-vla@abc", 256, SH.to_dict(), "f" * 64, '{"a": 1}', sent_at=T0
        ),
        "sample_inline": wire.Sample("p0", "s1", 3, "libero_spatial", 1, 2, 16, h, c, a, sent_at=T0),
        "sample_frames_obs": wire.Sample(
            "p0", "s1", 4, "libero_spatial", 9, 0, 0, big_h, big_c, big_a, obs, sent_at=T0
        ),
        "episode_end": wire.EpisodeEnd(
            "p0", "s1", 5, "libero_spatial", 1, 2, "errored", 4, 33, "RuntimeError: boom", sent_at=T0
        ),
        "heartbeat": wire.Heartbeat("p0", "s1", 12, sent_at=T0),
        "bye": wire.Bye("p0", "s1", 12, 10, 2, sent_at=T0),
        "ack": wire.Ack("t1", "p0", "s1", -1, False, "refused", sent_at=T0),
    }


@pytest.mark.parametrize("name", sorted(PINNED))
def test_encoding_is_byte_identical_to_the_pinned_format(name):
    msg = pinned_messages()[name]
    frames = to_bytes(wire.encode(msg))
    assert [hashlib.sha256(f).hexdigest() for f in frames] == PINNED[name]
    out = wire.decode(frames)
    assert type(out) is type(msg)
    assert to_bytes(wire.encode(out)) == frames  # decode gives back exactly what was sent


# ------------------------------------------------------------------ the declarations drive the decoder
def test_checks_run_in_the_declared_order():
    """With two faults, the one checked first decides the error: ids and seq before arrays, arrays
    before the other bounds, hello's shape before hidden_dim."""
    msg = make_sample()
    msg.seq, msg.hidden = -1, np.full(64, np.nan, np.float16)
    expect(wire.SchemaError, to_bytes(wire.encode(msg)))  # seq first
    msg.seq, msg.task_id = 0, -1
    expect(wire.NonFiniteError, to_bytes(wire.encode(msg)))  # the array before task_id
    hello = wire.Hello("p0", "s1", 0, "b", 0, {**SH.to_dict(), "grid_size": 5})
    expect(wire.ShapeError, to_bytes(wire.encode(hello)))
    expect(wire.SchemaError, [to_bytes(wire.encode(hello))[0], b"x"])  # stray frame before the shape


def test_every_kind_is_declared_once_with_its_wire_keys():
    keys = {kind: [f.key for f in wire.schema.SCHEMA[cls]] for kind, cls in wire.MESSAGES.items()}
    assert keys["ack"] == [
        "trainer_session",
        "pid",
        "producer_session",
        "archived_seq",
        "known",
        "error",
        "sent_at",
    ]
    assert keys["sample"][:3] == ["pid", "session", "seq"] and "producer_id" not in keys["sample"]
    for kind, frames in _good_frames().items():
        assert list(header(frames))[2:] == keys[kind]  # the encoder writes the declared fields in order


def test_a_declaration_the_codec_cannot_handle_is_refused_at_import():
    @dataclasses.dataclass
    class NoRule:
        x: np.ndarray  # an array without its Array rule

    @dataclasses.dataclass
    class BadBounds:
        x: str = wire.schema.rule(bounds=(0, 1))

    @dataclasses.dataclass
    class IdentInt:
        x: int = wire.schema.rule(ident=True)

    @dataclasses.dataclass
    class NoWireForm:
        x: list[int] = dataclasses.field(default_factory=list)

    for cls in (NoRule, BadBounds, IdentInt, NoWireForm):
        with pytest.raises(TypeError):
            wire.schema._compile(cls)
