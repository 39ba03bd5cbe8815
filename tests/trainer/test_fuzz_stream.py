"""Fuzzing the trainer's socket (hypothesis): bad input is rejected and counted, good samples all kept.

A real trainer (receiver + learner threads, ROUTER socket on 127.0.0.1, HDF5 archive) runs in this
process; the test talks to it through a real DEALER socket. Every hypothesis example is one producer
session: hello, good samples interleaved with malformed messages of every kind (random bytes,
truncated msgpack, wrong schema or version, wrong dtypes or shapes, NaN/Inf, absurd sizes,
out-of-range tokens, duplicated and replayed sequence numbers), then episode_end. The trainer must
stay up, accept exactly the good samples, reject each bad message once and archive none of them.
``RSD_FUZZ_EXAMPLES`` raises the number of live sessions (default 25), ``RSD_FUZZ_DECODE_EXAMPLES`` the
number of decoder-level examples per property (default 300).
"""

from __future__ import annotations

import itertools
import os
import threading
import time

import msgpack
import numpy as np
import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from common import wire
from common.archive import iter_episodes
from common.shapes import DEFAULT_SHAPE
from trainer.online import Trainer, TrainerConfig

SH = DEFAULT_SHAPE
D = 16
EXAMPLES = int(os.environ.get("RSD_FUZZ_EXAMPLES", "25"))
DECODE_EXAMPLES = int(os.environ.get("RSD_FUZZ_DECODE_EXAMPLES", "300"))
FUZZED = {"bad": 0, "good": 0, "sessions": 0}


# ------------------------------------------------------------------------ decoder-level properties
def good_sample(seq: int, pid: str = "fz", session: str = "s", rng_seed: int = 0) -> wire.Sample:
    rng = np.random.default_rng(rng_seed + seq)
    return wire.Sample(
        producer_id=pid,
        session=session,
        seq=seq,
        suite="libero_spatial",
        task_id=0,
        episode_id=0,
        step=8 * seq,
        hidden=rng.standard_normal(D).astype(np.float32),  # [D]
        codes=rng.integers(0, SH.grid_size, SH.codes_shape, dtype=np.uint8),  # [T, H, L]
        actions=rng.uniform(-1, 1, SH.chunk_shape).astype(np.float32),  # [T, A]
    )


def decode_or_reject(frames: list[bytes]) -> None:
    try:
        msg = wire.decode(frames)
    except wire.WireError as exc:
        assert exc.reason and str(exc)
        return
    assert msg.kind in ("hello", "sample", "episode_end", "heartbeat", "bye", "ack")


@settings(max_examples=DECODE_EXAMPLES, deadline=None)
@given(st.lists(st.binary(max_size=600), min_size=0, max_size=5))
def test_decoder_never_crashes_on_random_frames(frames):
    decode_or_reject(frames)


@settings(max_examples=DECODE_EXAMPLES, deadline=None)
@given(st.data())
def test_decoder_never_crashes_on_mutated_messages(data):
    frames = [bytes(f) for f in wire.encode(good_sample(0))]
    head = bytearray(frames[0])
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(head) - 1))
        head[i] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(head)))
    decode_or_reject([bytes(head[:cut]), *frames[1:]])


# any value msgpack can carry, containers (unhashable) included
MSGPACK_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats()
    | st.text(max_size=8)
    | st.binary(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=6,
)
# dtype strings built from the pieces numpy's parser reacts to (",", "(", "[", ":", ...) and plain text
DTYPE_STRINGS = st.one_of(
    st.text(max_size=12),
    st.lists(
        st.sampled_from(["f4", "<f2", "u1", "i8", "V", "S", "U", "O", "M8", ",", "(", ")", "[", "]", "2",
                         ":", "'", " ", ">", "|", "=", "-1", "99999999999999999999"]),
        max_size=8,
    ).map("".join),
)  # fmt: skip


def good_messages() -> dict[str, list[bytes]]:
    """One valid message of every kind, as frames (the sample with a raw observation)."""
    rng = np.random.default_rng(0)
    obs = wire.RawObservation(
        agentview=rng.integers(0, 255, (8, 8, 3), dtype=np.uint8),
        wrist=rng.integers(0, 255, (8, 8, 3), dtype=np.uint8),
        proprio=rng.standard_normal(8).astype(np.float32),
    )
    sample = good_sample(0)
    sample.obs = obs
    msgs = [
        sample,
        wire.Hello("fz", "s", 0, "fuzz-backbone", D, SH.to_dict()),
        wire.EpisodeEnd("fz", "s", 1, "libero_spatial", 0, 0, "success", 1, 8),
        wire.Heartbeat("fz", "s", 1),
        wire.Bye("fz", "s", 2, 1, 1),
        wire.Ack("t", "fz", "s", 1),
    ]
    return {m.kind: [bytes(f) for f in wire.encode(m)] for m in msgs}


GOOD = good_messages()


def field_paths(h: dict, prefix: tuple = ()) -> list[tuple]:
    """Every key of the header, and of the maps inside it (array descriptors, obs), as paths."""
    out = []
    for k, v in h.items():
        out.append((*prefix, k))
        if isinstance(v, dict):
            out.extend(field_paths(v, (*prefix, k)))
    return out


def replaced(h: dict, path: tuple, value) -> dict:
    if len(path) == 1:
        return {**h, path[0]: value}
    return {**h, path[0]: replaced(h[path[0]], path[1:], value)}


@settings(max_examples=DECODE_EXAMPLES, deadline=None)
@given(st.data())
def test_decoder_rejects_any_value_in_any_field(data):
    kind = data.draw(st.sampled_from(sorted(GOOD)), label="kind")
    frames = GOOD[kind]
    h = msgpack.unpackb(frames[0], raw=False)
    path = data.draw(st.sampled_from(field_paths(h)), label="field")
    value = data.draw(MSGPACK_VALUES, label="value")
    decode_or_reject([msgpack.packb(replaced(h, path, value), use_bin_type=True), *frames[1:]])


@settings(max_examples=DECODE_EXAMPLES, deadline=None)
@given(st.sampled_from(["hidden", "codes", "actions", "obs.agentview", "obs.proprio"]), DTYPE_STRINGS)
def test_decoder_rejects_arbitrary_dtype_strings(field, dtype):
    frames = GOOD["sample"]
    h = msgpack.unpackb(frames[0], raw=False)
    good_dtype = h[field]["dtype"] if "." not in field else h["obs"][field[4:]]["dtype"]
    msg = [msgpack.packb(replaced(h, (*field.split("."), "dtype"), dtype), use_bin_type=True), *frames[1:]]
    try:
        wire.decode(msg)
    except wire.WireError as exc:
        try:
            parsed = np.dtype(dtype)
        except Exception:  # numpy cannot parse it: that is what the rejection says
            assert exc.reason == "dtype", (dtype, exc)
        else:
            assert parsed != np.dtype(good_dtype) or exc.reason == "dtype", (dtype, exc)
    else:
        assert np.dtype(dtype) == np.dtype(good_dtype), dtype


@settings(max_examples=DECODE_EXAMPLES, deadline=None)
@given(st.one_of(st.booleans(), st.floats(), st.integers(-(2**63), 2**64 - 1), MSGPACK_VALUES))
def test_decoder_accepts_only_the_int_version(version):
    frames = GOOD["heartbeat"]
    h = msgpack.unpackb(frames[0], raw=False)
    msg = [msgpack.packb({**h, "v": version}, use_bin_type=True)]
    if type(version) is int and version == wire.SCHEMA_VERSION:
        assert wire.decode(msg).kind == "heartbeat"
    else:
        with pytest.raises(wire.VersionError):
            wire.decode(msg)


# ------------------------------------------------------------------------ the live trainer
@pytest.fixture(scope="module")
def live(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("fuzz_run")
    cfg = TrainerConfig(
        endpoint="tcp://127.0.0.1:*",
        run_dir=run_dir,
        min_size=4,
        warmup_steps=5,
        val_interval=25,
        samples_per_insert=4,
        error_buffer=400,
        batch_size=8,
        draft_hidden_dim=64,
        valid_every=5,
    )
    trainer = Trainer(cfg)
    thread = threading.Thread(target=trainer.run, daemon=True)
    thread.start()
    assert trainer.bound.wait(10)
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(trainer.bound_endpoint)
    yield trainer, thread, sock
    sock.close()
    ctx.term()
    trainer.stop.set()
    thread.join(30)


def rejected_total(trainer: Trainer) -> int:
    return sum(trainer.delivery.unattributed.values()) + sum(
        sum(s.rejected.values()) for s in trainer.delivery.stats.values()
    )


BAD_KINDS = st.one_of(
    st.tuples(st.just("random"), st.lists(st.binary(max_size=300), min_size=1, max_size=3)),
    st.tuples(st.just("truncate"), st.floats(0.0, 0.99)),
    st.tuples(
        st.just("version"),
        st.one_of(
            st.integers(-5, 1000).filter(lambda v: v != 1),
            st.text(max_size=3),
            st.booleans(),  # True == 1 in Python, but not a schema version
            st.floats(),  # 1.0 neither
            MSGPACK_VALUES.filter(lambda v: type(v) is not int),
        ),
    ),
    st.tuples(
        st.just("kind"),
        st.one_of(
            st.text(max_size=12).filter(lambda k: k not in wire.MESSAGES),
            MSGPACK_VALUES.filter(lambda k: not isinstance(k, str)),
        ),  # lists and maps: unhashable
    ),  # fmt: skip
    st.tuples(
        st.just("field"),
        st.sampled_from(sorted(msgpack.unpackb(GOOD["sample"][0], raw=False))),  # every field of a sample
        MSGPACK_VALUES,
    ),
    st.tuples(
        st.just("dtype"),
        st.sampled_from(["hidden", "codes", "actions"]),
        st.one_of(
            st.sampled_from(["<f8", "<i4", "|i1", ">f4", "O", "V8", "<c8", "S3", "garbage", "<M8"]),
            DTYPE_STRINGS,
        ),
    ),
    st.tuples(st.just("wrong_dim")),  # decodes, but its hidden size is not the hello's: the trainer rejects
    st.tuples(
        st.just("shape"),
        st.sampled_from(["hidden", "codes", "actions"]),
        st.lists(st.integers(0, 70), min_size=0, max_size=4),
    ),
    st.tuples(
        st.just("nonfinite"),
        st.sampled_from(["hidden", "actions"]),
        st.sampled_from([np.nan, np.inf, -np.inf]),
    ),
    st.tuples(st.just("absurd"), st.sampled_from(["hidden", "codes", "actions"])),
    st.tuples(st.just("token"), st.integers(SH.grid_size, 255)),
    st.tuples(st.just("duplicate")),
    st.tuples(st.just("replay")),
    st.tuples(st.just("no_hello")),
)


def make_bad(
    recipe: tuple, pid: str, session: str, sent: list[list[bytes]], fresh_seq: int
) -> list[bytes] | None:
    """A malformed message from a recipe, or None if this recipe cannot apply now."""
    kind = recipe[0]
    base = [bytes(f) for f in wire.encode(good_sample(fresh_seq, pid, session, rng_seed=7))]
    head = msgpack.unpackb(base[0], raw=False)

    def repack(h):
        return [msgpack.packb(h, use_bin_type=True), *base[1:]]

    if kind == "random":
        return list(recipe[1])
    if kind == "truncate":
        return [base[0][: int(len(base[0]) * recipe[1])], *base[1:]]
    if kind == "version":
        return repack({**head, "v": recipe[1]})
    if kind == "kind":
        return repack({**head, "kind": recipe[1]})
    if kind == "field":
        return repack({**head, recipe[1]: recipe[2]})
    if kind == "dtype":
        head[recipe[1]]["dtype"] = recipe[2]
        return repack(head)
    if kind == "shape":
        head[recipe[1]]["shape"] = recipe[2]
        return repack(head)
    if kind == "absurd":
        head[recipe[1]]["shape"] = [1 << 20] * len(head[recipe[1]]["shape"])  # terabytes declared
        return repack(head)
    if kind == "nonfinite":
        msg = good_sample(fresh_seq, pid, session, rng_seed=7)
        arr = getattr(msg, recipe[1]).copy()
        arr.flat[0] = recipe[2]
        setattr(msg, recipe[1], arr)
        return [bytes(f) for f in wire.encode(msg)]
    if kind == "token":
        msg = good_sample(fresh_seq, pid, session, rng_seed=7)
        msg.codes.flat[5] = recipe[1]
        return [bytes(f) for f in wire.encode(msg)]
    if kind == "duplicate":
        return list(sent[-1]) if sent else None
    if kind == "replay":
        return list(sent[0]) if len(sent) >= 2 else None
    if kind == "no_hello":
        return [bytes(f) for f in wire.encode(good_sample(fresh_seq, pid, "nohello" + session, rng_seed=7))]
    if kind == "wrong_dim":
        msg = good_sample(fresh_seq, pid, session, rng_seed=7)
        msg.hidden = np.zeros(D + 1, np.float32)
        return [bytes(f) for f in wire.encode(msg)]
    raise AssertionError(kind)


TRAINER_REJECTS = (
    "duplicate",
    "replay",
    "no_hello",
    "wrong_dim",
)  # valid on the wire, refused by the trainer


def with_seq(frames: list[bytes], seq: int | None) -> list[bytes]:
    """The same message claiming another sequence number (a rejected message must not move the
    per-producer sequence accounting, whatever seq it claims)."""
    if seq is None or not frames:
        return frames
    try:
        h = msgpack.unpackb(frames[0], raw=False)
    except Exception:
        return frames
    if not isinstance(h, dict) or "seq" not in h:
        return frames
    return [msgpack.packb({**h, "seq": seq}, use_bin_type=True), *frames[1:]]


_ids = itertools.count()


def wait_ack(sock: zmq.Socket, session: str, seq: int, timeout: float = 20.0) -> wire.Ack:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if sock.poll(200):
            ack = wire.decode(sock.recv_multipart())
            if isinstance(ack, wire.Ack) and ack.producer_session == session and ack.archived_seq >= seq:
                return ack
    raise AssertionError(f"no ack for seq {seq} of session {session}")


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    bad=st.lists(
        st.tuples(BAD_KINDS, st.integers(0, 5), st.one_of(st.none(), st.integers(0, 2**62))),
        min_size=1,
        max_size=8,
    ),
    n_good=st.integers(1, 5),
)
def test_live_trainer_rejects_bad_and_keeps_good(live, bad, n_good):
    trainer, thread, sock = live
    i = next(_ids)
    pid, session = f"fz{i}", f"sess{i}"
    sock.send_multipart(wire.encode(wire.Hello(pid, session, 0, "fuzz-backbone", D, SH.to_dict())))
    wait_ack(sock, session, -1)
    rejected_before = rejected_total(trainer)
    sent: list[list[bytes]] = []
    n_bad = 0
    for seq in range(n_good + 1):
        for recipe, pos, claimed_seq in bad:
            if pos != seq:
                continue
            frames = make_bad(recipe, pid, session, sent, seq)
            if frames is None:
                continue
            if recipe[0] not in ("duplicate", "replay"):
                frames = with_seq(frames, claimed_seq)
            if recipe[0] not in TRAINER_REJECTS:
                try:  # the odd mutation that happens to be valid is not a bad message
                    wire.decode(frames)
                    continue
                except wire.WireError:
                    pass
            sock.send_multipart(frames)
            n_bad += 1
        if seq < n_good:
            frames = [bytes(f) for f in wire.encode(good_sample(seq, pid, session))]
            sock.send_multipart(frames)
            sent.append(frames)
    end = wire.EpisodeEnd(pid, session, n_good, "libero_spatial", 0, 0, "success", n_good, 8 * n_good)
    sock.send_multipart(wire.encode(end))
    wait_ack(sock, session, n_good)
    st_ = trainer.delivery.stats[pid]
    assert thread.is_alive()
    assert st_.accepted == n_good and st_.archived == n_good and st_.samples_received == n_good
    assert rejected_total(trainer) - rejected_before == n_bad
    assert st_.gaps == 0
    FUZZED["bad"] += n_bad
    FUZZED["good"] += n_good
    FUZZED["sessions"] += 1


def test_archive_holds_exactly_the_good_samples(live):
    trainer, thread, _ = live
    assert thread.is_alive()
    by_pid: dict[str, list[int]] = {}
    for ep in iter_episodes(trainer.archive.path):
        by_pid.setdefault(ep.attrs["producer_id"], []).extend(ep.seqs.tolist())
        for h in ep.hidden:
            assert np.isfinite(h).all()
    assert FUZZED["sessions"] > 0
    for pid, seqs in by_pid.items():
        assert seqs == list(range(len(seqs))), pid  # in order, exactly once, nothing bad archived
    assert sum(len(s) for s in by_pid.values()) == FUZZED["good"]
    print(
        f"\nfuzzed {FUZZED['bad']} bad messages among {FUZZED['good']} good samples in {FUZZED['sessions']} sessions;"
        f" trainer rejections by reason: {_reasons(trainer)}"
    )


def _reasons(trainer: Trainer) -> dict[str, int]:
    out = dict(trainer.delivery.unattributed)
    for s in trainer.delivery.stats.values():
        for k, v in s.rejected.items():
            out[k] = out.get(k, 0) + v
    return out


# ------------------------------------------------------------------------ the receive path, no socket
class _Sock:
    """Stands in for the ROUTER socket: collects what the trainer sends back."""

    def __init__(self) -> None:
        self.sent: list[list] = []

    def send_multipart(self, frames, flags: int = 0) -> None:
        self.sent.append(frames)


def _quiet_trainer(tmp_path) -> tuple[Trainer, _Sock]:
    cfg = TrainerConfig(
        endpoint="tcp://127.0.0.1:*", run_dir=tmp_path, min_size=4, warmup_steps=5, samples_per_insert=4,
        error_buffer=400, batch_size=8, draft_hidden_dim=64,
    )  # fmt: skip
    return Trainer(cfg), _Sock()


def _frames(msg) -> list[bytes]:
    return [bytes(f) for f in wire.encode(msg)]


def test_rejected_message_with_absurd_seq_leaves_gaps_and_expected_seq_alone(tmp_path):
    trainer, sock = _quiet_trainer(tmp_path)
    trainer.delivery.handle(sock, b"id", _frames(wire.Hello("rx", "s", 0, "b", D, SH.to_dict())))
    for seq in (2**40, 2**62, 3):
        bad = good_sample(0, "rx", "s")
        bad.seq = seq
        bad.hidden = np.zeros(D + 1, np.float32)  # decodes, but not the hello's D: rejected by the trainer
        trainer.delivery.handle(sock, b"id", _frames(bad))
    st_ = trainer.delivery.stats["rx"]
    assert st_.rejected == {"shape": 3}
    assert st_.gaps == 0 and st_.gap_events == 0 and trainer.delivery.producers["rx"].expected_seq == 0
    trainer.delivery.handle(sock, b"id", _frames(good_sample(0, "rx", "s")))
    assert st_.accepted == 1 and st_.gaps == 0 and trainer.delivery.producers["rx"].expected_seq == 1


def test_an_unexpected_decoder_exception_is_a_counted_rejection(tmp_path, monkeypatch):
    trainer, sock = _quiet_trainer(tmp_path)

    def defect(*args, **kwargs):
        raise KeyError("a decoder defect")

    monkeypatch.setattr(wire, "decode", defect)
    trainer.delivery.handle(sock, b"id", _frames(good_sample(0, "rx", "s")))
    trainer.delivery.handle(sock, b"id", [b"\x00"])
    assert (
        trainer.delivery.stats["rx"].rejected == {"malformed": 1}
        and trainer.delivery.stats["rx"].received == 1
    )
    assert trainer.delivery.unattributed == {"malformed": 1}


def test_the_issue_messages_are_counted_rejections(tmp_path):
    trainer, sock = _quiet_trainer(tmp_path)
    trainer.delivery.handle(
        sock, b"id", [msgpack.packb({"v": 1, "kind": [1]})]
    )  # 12 bytes that killed the trainer
    for dtype in (",", "f4,,", "(2,"):
        h = msgpack.unpackb(_frames(good_sample(0, "rx", "s"))[0], raw=False)
        h["hidden"]["dtype"] = dtype
        trainer.delivery.handle(sock, b"id", [msgpack.packb(h, use_bin_type=True)])
    for v in (True, 1.0):
        h = msgpack.unpackb(_frames(good_sample(0, "rx", "s"))[0], raw=False)
        trainer.delivery.handle(sock, b"id", [msgpack.packb({**h, "v": v}, use_bin_type=True)])
    assert trainer.delivery.unattributed == {"schema": 1}
    assert trainer.delivery.stats["rx"].rejected == {"dtype": 3, "version": 2}


def test_hello_with_deeply_nested_config_json_does_not_kill_the_trainer(tmp_path):
    trainer, sock = _quiet_trainer(tmp_path)
    deep = "[" * 4000  # json.loads raises RecursionError, not JSONDecodeError
    trainer.delivery.handle(
        sock, b"id", _frames(wire.Hello("rx", "s", 0, "b", D, SH.to_dict(), config_json=deep))
    )
    assert "rx" in trainer.delivery.producers and not trainer.delivery.stats["rx"].rejected
    assert wire.decode(sock.sent[-1][1:]).error == ""
