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
from common.shapes import DEFAULT_SHAPE
from trainer.archive import iter_episodes
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
    return sum(trainer.unattributed.values()) + sum(sum(s.rejected.values()) for s in trainer.stats.values())


BAD_KINDS = st.one_of(
    st.tuples(st.just("random"), st.lists(st.binary(max_size=300), min_size=1, max_size=3)),
    st.tuples(st.just("truncate"), st.floats(0.0, 0.99)),
    st.tuples(
        st.just("version"), st.one_of(st.integers(-5, 1000).filter(lambda v: v != 1), st.text(max_size=3))
    ),
    st.tuples(st.just("kind"), st.text(max_size=12).filter(lambda k: k not in wire._FIELDS)),
    st.tuples(
        st.just("field"),
        st.sampled_from(["step", "task_id", "suite", "pid", "seq", "hidden", "codes"]),
        st.one_of(
            st.none(),
            st.text(max_size=8),
            st.floats(),
            st.binary(max_size=8),
            st.lists(st.integers(-(2**63), 2**64 - 1), max_size=3),  # what msgpack can encode
        ),
    ),
    st.tuples(
        st.just("dtype"),
        st.sampled_from(["hidden", "codes", "actions"]),
        st.sampled_from(["<f8", "<i4", "|i1", ">f4", "O", "V8", "<c8", "S3", "garbage", "<M8"]),
    ),
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
    raise AssertionError(kind)


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
    bad=st.lists(st.tuples(BAD_KINDS, st.integers(0, 5)), min_size=1, max_size=8), n_good=st.integers(1, 5)
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
        for recipe, pos in bad:
            if pos != seq:
                continue
            frames = make_bad(recipe, pid, session, sent, seq)
            if frames is None:
                continue
            if recipe[0] not in ("duplicate", "replay", "no_hello"):
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
    st_ = trainer.stats[pid]
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
    out = dict(trainer.unattributed)
    for s in trainer.stats.values():
        for k, v in s.rejected.items():
            out[k] = out.get(k, 0) + v
    return out
