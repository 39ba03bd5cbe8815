"""Trainer side of the OpenVLA-OFT stream: hidden size fixed up front, codec clamping counted."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest

from common import wire
from common.shapes import DEFAULT_SHAPE as SH
from trainer.online import Trainer, TrainerConfig


class FakeSocket:
    """Collects the acks the trainer sends (Trainer.handle without ZeroMQ)."""

    def __init__(self):
        self.acks: list[wire.Ack] = []

    def send_multipart(self, parts, flags=0):
        self.acks.append(wire.decode(parts[1:]))


def hello(pid: str, dim: int, bounds: dict | None = None) -> wire.Hello:
    cfg = {"producer": {"vla": "openvla-oft"}, "env_args": {}}
    if bounds is not None:
        cfg["codec_bounds"] = bounds
    return wire.Hello(pid, "s1", 0, f"backbone-{dim}", dim, SH.to_dict(), "", json.dumps(cfg))


def sample(pid: str, seq: int, dim: int, actions: np.ndarray) -> wire.Sample:
    rng = np.random.default_rng(seq)
    return wire.Sample(
        producer_id=pid, session="s1", seq=seq, suite="libero_spatial", task_id=0, episode_id=0, step=8 * seq,
        hidden=rng.standard_normal(dim).astype(np.float32),
        codes=rng.integers(0, SH.grid_size, SH.codes_shape, dtype=np.uint8),
        actions=actions.astype(np.float32),
    )  # fmt: skip


def send(trainer: Trainer, sock: FakeSocket, msg) -> None:
    trainer.delivery.handle(sock, b"id", [bytes(f) for f in wire.encode(msg)])


def make_trainer(tmp_path, **kw) -> Trainer:
    cfg = TrainerConfig(endpoint="tcp://127.0.0.1:*", run_dir=tmp_path, draft_hidden_dim=16, min_size=4, **kw)
    return Trainer(cfg)


def test_input_dim_refuses_a_mismatched_producer_at_hello_and_records_nothing(tmp_path):
    trainer = make_trainer(tmp_path, input_dim=4096)
    assert (
        trainer.learning.learner is not None and trainer.learning.learner.input_dim == 4096
    )  # built before any hello
    sock = FakeSocket()
    send(trainer, sock, hello("small", 64))
    assert "hidden size 64 != this run's 4096" in sock.acks[-1].error
    assert trainer.delivery.stats["small"].rejected == {"backbone_mismatch": 1}
    # the refused hello left no provenance behind: the right producer is still welcome
    send(trainer, sock, hello("oft", 4096))
    assert sock.acks[-1].error == "" and trainer.archive.meta["backbone_id"] == "backbone-4096"


def test_a_running_trainer_refuses_another_hidden_size(tmp_path):
    trainer = make_trainer(tmp_path)
    sock = FakeSocket()
    send(trainer, sock, hello("oft", 4096))
    send(trainer, sock, hello("other", 512))
    assert sock.acks[0].error == "" and "hidden size 512 != this run's 4096" in sock.acks[1].error


def test_input_dim_must_match_the_archive_on_restart(tmp_path):
    trainer = make_trainer(tmp_path)
    send(trainer, FakeSocket(), hello("oft", 32))
    with pytest.raises(ValueError, match="--input-dim 4096 != the archive's hidden_dim 32"):
        make_trainer(tmp_path, input_dim=4096)


def test_clamped_fraction_per_dimension_in_summary_and_archive(tmp_path):
    trainer = make_trainer(tmp_path)
    sock = FakeSocket()
    bounds = {"low": [-1.0] * 7, "high": [1.0] * 7}
    send(trainer, sock, hello("oft", 32, bounds))
    a = np.zeros(SH.chunk_shape, np.float32)  # [8, 7]
    a[:2, 0] = 1.5  # 2 of 8 values of dim 0 above the bound
    a[0, 3] = -2.0  # 1 of 8 values of dim 3 below it
    send(trainer, sock, sample("oft", 0, 32, a))
    send(trainer, sock, sample("oft", 1, 32, np.zeros(SH.chunk_shape)))
    send(trainer, sock, wire.EpisodeEnd("oft", "s1", 2, "libero_spatial", 0, 0, "failed", 2, 16))
    frac = trainer.summary()["action_clamping"]["fraction"]
    assert frac == pytest.approx([2 / 16, 0, 0, 1 / 16, 0, 0, 0])
    with h5py.File(tmp_path / "archive.hdf5", "r") as f:
        stored = json.loads(f["data"].attrs["action_clamping"])
    assert stored["clamped"] == [2, 0, 0, 1, 0, 0, 0] and stored["values_per_dim"] == 16
    # a restarted trainer continues the counts of the run
    assert make_trainer(tmp_path).clamp.to_dict()["clamped"] == [2, 0, 0, 1, 0, 0, 0]


def test_producer_without_bounds_is_not_counted(tmp_path):
    trainer = make_trainer(tmp_path)
    sock = FakeSocket()
    send(trainer, sock, hello("old", 32))
    send(trainer, sock, sample("old", 0, 32, np.full(SH.chunk_shape, 5.0)))
    send(trainer, sock, wire.EpisodeEnd("old", "s1", 1, "libero_spatial", 0, 0, "failed", 1, 8))
    assert trainer.summary()["action_clamping"]["values_per_dim"] == 0
