"""End to end over a real socket: two producer processes (real LIBERO, short episodes) feed one trainer
process; every sample sent is archived exactly once, the accounting matches, the checkpoint loads and
retraining from the archive works. One producer's policy raises in its first episode
(``tests/raising_producer.py``): that episode is ``errored`` and the producer carries on.

The producers use ``--allow-random-policy``: if no trained embedded VLA is installed in assets/, a
random-weight one stands in (plumbing only; the test checks delivery, not policy quality).
"""

from __future__ import annotations

import json
import math
import time

import numpy as np
import pytest

from common.archive import archive_meta, episode_attrs, iter_episodes
from common.draft import load_checkpoint
from tests.stream_helpers import (
    FAST_TRAINER_ARGS,
    finish,
    kill_all,
    producer_args,
    producer_summary,
    spawn,
    start_trainer,
)
from trainer.pairs import load_keyed

pytestmark = pytest.mark.sim


def test_two_producers_one_trainer(tmp_path):
    run = tmp_path / "run"
    trainer, endpoint = start_trainer(
        run,
        tmp_path / "trainer.log",
        ["--exit-after-byes", "2", *FAST_TRAINER_ARGS, "--valid-every", "3"],
    )
    p1 = p2 = None
    try:
        p1 = spawn(  # p1 also streams observing queries between its replans
            "producer.produce",
            producer_args(endpoint, "p1", 0, 2, 16, "--sample-every", "2"),
            tmp_path / "p1.log",
        )
        p2 = spawn(  # p2's policy raises in its second query (episode 0): tests/raising_producer.py
            "tests.raising_producer", producer_args(endpoint, "p2", 1, 2, 16), tmp_path / "p2.log"
        )
        out1 = finish(p1, tmp_path / "p1.log", 240)
        out2 = finish(p2, tmp_path / "p2.log", 240)
        finish(trainer, tmp_path / "trainer.log", 120)
    finally:
        kill_all(p1, p2, trainer)
    assert p1.returncode == 0, out1[-2000:]
    assert p2.returncode == 0, out2[-2000:]
    assert trainer.returncode == 0
    sums = {"p1": producer_summary(out1), "p2": producer_summary(out2)}
    assert sums["p2"]["episodes"]["errored"] == 1 and sum(sums["p2"]["episodes"].values()) == 2
    assert "episode 0 (task 1) errored: InjectedError" in out2, out2[-2000:]

    # accounting: sent == received == accepted == archived, nothing rejected, no gaps, nothing resent
    summary = json.loads((run / "summary.json").read_text())
    for pid, s in sums.items():
        t = summary["producers"][pid]
        assert s["unacked"] == 0 and s["resent"] == 0
        assert (
            s["samples_sent"] == t["reported_sent"] == t["samples_received"] == t["accepted"] == t["archived"]
        )
        assert t["rejected"] == {} and t["gaps"] == 0 and t["episodes_archived"] == s["episodes_sent"] == 2
    assert summary["rejected_unattributed"] == {}

    # the archive holds every sample exactly once
    archive = run / "archive.hdf5"
    seen: dict[str, list[int]] = {"p1": [], "p2": []}
    statuses: dict[str, list[str]] = {"p1": [], "p2": []}
    for ep in iter_episodes(archive):
        pid = ep.attrs["producer_id"]
        seen[pid].extend(ep.seqs.tolist())
        statuses[pid].append(ep.attrs["status"])
        assert ep.hidden.shape[0] == ep.codes.shape[0] == ep.attrs["num_samples"]
        assert np.isfinite(ep.hidden).all()
    for pid, s in sums.items():
        assert len(seen[pid]) == s["samples_sent"] == len(set(seen[pid]))
    # p1's observing queries: every 2nd step between the acting queries at multiples of replan = 8
    producers = json.loads(archive_meta(archive)["producers"])
    n_valid_acting = n_valid = n_train = 0  # per split: the acting queries held out, all queries
    for ep in iter_episodes(archive):
        if ep.attrs["producer_id"] == "p1":
            assert (ep.steps % 2 == 0).all() and (np.diff(ep.steps) == 2).all() and len(ep.steps) > 2
            assert (ep.acting(producers) == (ep.steps % 8 == 0)).all() and not ep.acting(producers).all()
        else:
            assert ep.acting(producers).all() and (ep.steps % 8 == 0).all()
        if ep.attrs["split"] == "valid":
            n_valid_acting += int((ep.steps % 8 == 0).sum())
            n_valid += len(ep.steps)
        else:
            n_train += len(ep.steps)
    # keyed loading: every query of the training episodes, the acting queries of the held-out ones
    sp = load_keyed([archive])
    assert (len(sp.train_hidden), len(sp.valid_hidden), len(sp.valid_all_hidden)) == (
        n_train,
        n_valid_acting,
        n_valid,
    )
    assert statuses["p2"][0] == "errored" and statuses["p2"][1] in ("success", "failed")
    assert {a["split"] for a in episode_attrs(archive)} == {"train", "valid"}

    # the checkpoint loads (weights_only) and carries val_accuracy
    model, ckpt = load_checkpoint(run / "draft_best.pt")
    assert math.isfinite(ckpt["val_accuracy"]) and 0 <= ckpt["val_accuracy"] <= 1
    assert ckpt["config"]["model"]["input_dim"] == model.input_dim
    assert (run / "training_curve.png").is_file()

    # retraining from the archive works and writes the same checkpoint format
    retrain = spawn(
        "trainer.retrain",
        [
            "--archives",
            str(archive),
            "--run-dir",
            str(tmp_path / "retrain"),
            "--epochs",
            "2",
            "--threads",
            "1",
        ],
        tmp_path / "retrain.log",
    )
    out = finish(retrain, tmp_path / "retrain.log", 120)
    assert retrain.returncode == 0, out[-2000:]
    _, ckpt2 = load_checkpoint(tmp_path / "retrain" / "draft_best.pt")
    assert ckpt2["epoch"] >= 1 and math.isfinite(ckpt2["val_accuracy"])


def test_slow_trainer_slows_the_producer_and_nothing_is_dropped(tmp_path):
    """Backpressure without LIBERO: the producer's real sender against a trainer held back by its rate limiter."""
    import threading

    from common import wire
    from common.shapes import DEFAULT_SHAPE as SH
    from producer.config import ProducerConfig
    from producer.sender import ReliableSender
    from trainer.online import Trainer, TrainerConfig

    cfg = TrainerConfig(
        endpoint="tcp://127.0.0.1:*", run_dir=tmp_path / "run", rcvhwm=4, min_size=8, batch_size=8,
        samples_per_insert=24, error_buffer=48, draft_hidden_dim=64, val_interval=1000, warmup_steps=5,
    )  # fmt: skip
    trainer = Trainer(cfg)
    thread = threading.Thread(target=trainer.run, daemon=True)
    thread.start()
    assert trainer.bound.wait(10)
    pcfg = ProducerConfig(endpoint=trainer.bound_endpoint, producer_id="fast", sndhwm=2, max_unacked=64)
    sender = ReliableSender(pcfg, threading.Event())
    d, n_eps, per_ep = 32, 6, 20
    sender.send_hello(wire.Hello("fast", sender.session, 0, "synthetic", d, SH.to_dict()))
    rng = np.random.default_rng(0)
    t0 = time.time()
    for ep in range(n_eps):
        for i in range(per_ep):
            sender.send_data(wire.Sample(
                "fast", sender.session, 0, "libero_spatial", 0, ep, 8 * i,
                rng.standard_normal(d).astype(np.float32),
                rng.integers(0, SH.grid_size, SH.codes_shape, dtype=np.uint8),
                rng.uniform(-1, 1, SH.chunk_shape).astype(np.float32),
            ))  # fmt: skip
        sender.send_data(
            wire.EpisodeEnd("fast", sender.session, 0, "libero_spatial", 0, ep, "failed", per_ep, 8 * per_ep)
        )
    assert sender.flush(60)
    elapsed = time.time() - t0
    sender.close()
    trainer.stop.set()
    thread.join(30)
    st = trainer.delivery.stats["fast"]
    assert st.accepted == st.archived == n_eps * per_ep and not st.rejected and st.gaps == 0
    assert trainer.learning.limiter.stats.insert_waits > 0  # the learner held the stream back ...
    assert sender.stats.hwm_waits > 0  # ... and the producer felt it through the high-water marks
    seqs = [s for e in iter_episodes(trainer.archive.path) for s in e.seqs.tolist()]
    assert len(seqs) == len(set(seqs)) == n_eps * per_ep
    print(
        f"\nbackpressure: {n_eps * per_ep} samples in {elapsed:.1f}s, producer blocked {sender.stats.blocked_s:.1f}s "
        f"({sender.stats.hwm_waits} waits at the high-water mark)"
    )
