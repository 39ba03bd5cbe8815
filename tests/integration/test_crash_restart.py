"""Crashes and restarts with real processes over a real socket (real LIBERO producer, short episodes).

1. ``kill -9`` the trainer mid-stream: the archive opens and holds every episode flushed before.
2. Restart it in the same run dir: it resumes from ``draft_last.pt`` and refills the replay buffer from
   the archive; the producer reconnects on its own, says hello again and resends what was not archived.
3. ``kill -9`` the producer mid-episode: the trainer closes that episode as ``incomplete`` and goes on.
4. SIGTERM the trainer: clean exit, summary printed, checkpoint written.
Across all of it, every data message the producer handed over is archived exactly once (no sequence
number missing, none twice).
"""

from __future__ import annotations

import math
import os
import re
import signal
import socket
import time

import pytest

from common.archive import episode_attrs, iter_episodes
from common.draft import load_checkpoint
from tests.stream_helpers import (
    FAST_TRAINER_ARGS,
    finish,
    kill_all,
    producer_args,
    spawn,
    start_trainer,
    wait_for,
)

pytestmark = pytest.mark.sim

TRAINER_ARGS = [*FAST_TRAINER_ARGS, "--valid-every", "4", "--producer-timeout-s", "4"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def open_episodes(log) -> list[int]:
    """Episode ids of p1 that the trainer has started but not archived (from the trainer log)."""
    text = log.read_text()
    started = [int(e) for e in re.findall(r"episode (\d+) of p1 started", text)]
    archived = {int(e) for e in re.findall(r"episode (\d+) of p1, \d+ samples", text)}
    return [e for e in started if e not in archived]


def kill_during_open_episode(log, proc, timeout: float = 120) -> int:
    """SIGKILL the producer while the trainer holds one of its episodes open; returns that episode id.

    The producer is frozen (SIGSTOP) before the log is read, so the episode cannot end between the
    check and the kill (messages already in flight land during the pause)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, "producer exited before an episode could be interrupted"
        os.kill(proc.pid, signal.SIGSTOP)
        time.sleep(0.5)
        open_eps = open_episodes(log)
        if open_eps:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            return open_eps[-1]
        os.kill(proc.pid, signal.SIGCONT)
        time.sleep(0.3)
    raise AssertionError("no open episode to interrupt")


def test_trainer_kill9_restart_and_producer_kill9(tmp_path):
    run = tmp_path / "run"
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    log_a, log_b, log_p = tmp_path / "trainer_a.log", tmp_path / "trainer_b.log", tmp_path / "producer.log"
    trainer_a, _ = start_trainer(run, log_a, TRAINER_ARGS, endpoint=endpoint)
    producer = trainer_b = None
    try:
        producer = spawn("producer.produce", producer_args(endpoint, "p1", 0, 8, 16), log_p)
        wait_for(log_a, r"archived demo_2", trainer_a, timeout=150)
        wait_for(log_a, r"update \d+: val acc", trainer_a, timeout=60)
        # 1. kill -9 the trainer mid-stream
        os.kill(trainer_a.pid, signal.SIGKILL)
        trainer_a.wait()
        before = episode_attrs(run / "archive.hdf5")
        assert len(before) >= 3 and all(a["complete"] for a in before)
        assert (run / "draft_last.pt").is_file()

        # 2. restart: resume + refill; the producer reconnects and resends
        trainer_b, _ = start_trainer(run, log_b, TRAINER_ARGS, endpoint=endpoint)
        text_b = log_b.read_text()
        assert "resumed from" in text_b and "refilled replay buffer from archive" in text_b
        wait_for(log_p, r"resending hello", producer, timeout=60)
        # 3. kill -9 the producer while an episode is open on the trainer (first sample in, more to come)
        wait_for(log_b, r"hello from p1", producer, timeout=60)
        killed_episode = kill_during_open_episode(log_b, producer)
        wait_for(
            log_b,
            r"archived demo_\d+: .* episode %d of p1, \d+ samples, incomplete" % killed_episode,
            trainer_b,
            timeout=30,
        )
        # 4. SIGTERM: clean shutdown
        trainer_b.send_signal(signal.SIGTERM)
        out = finish(trainer_b, log_b, 60)
    finally:
        kill_all(producer, trainer_a, trainer_b)
    assert trainer_b.returncode == 0, out[-2000:]
    assert "=== trainer summary" in out

    attrs = episode_attrs(run / "archive.hdf5")
    for a in before:  # everything flushed before the kill is still there, unchanged
        assert any(b["name"] == a["name"] and b["num_samples"] == a["num_samples"] for b in attrs)
    statuses = [a["status"] for a in attrs]
    assert "incomplete" in statuses
    sessions = {a["producer_session"] for a in attrs}
    assert len(sessions) == 1
    # exactly once, nothing lost: samples + episode ends cover 0..max seq with no gap and no repeat
    seqs: list[int] = []
    for ep in iter_episodes(run / "archive.hdf5"):
        seqs.extend(ep.seqs.tolist())
        if ep.attrs["status"] != "incomplete":
            seqs.append(ep.attrs["last_seq"])
    assert len(seqs) == len(set(seqs)), "a message was archived twice"
    assert sorted(seqs) == list(range(max(seqs) + 1)), "a message the producer handed over was lost"
    _, ckpt = load_checkpoint(run / "draft_last.pt")
    assert math.isfinite(ckpt["val_accuracy"]) and ckpt["config"]["updates"] > 0


@pytest.mark.slow
def test_soak_repeated_trainer_kills(tmp_path):
    """Overnight in miniature: kill -9 the trainer again and again while a producer streams.

    ``RSD_SOAK_KILLS`` (default 5) kills at random moments; at the end the producer finishes cleanly and
    every sample it sent is in the archive exactly once.
    """
    import random

    from tests.stream_helpers import producer_summary

    kills = int(os.environ.get("RSD_SOAK_KILLS", "5"))
    rng = random.Random(0)
    run = tmp_path / "run"
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    log_p = tmp_path / "producer.log"
    trainer, _ = start_trainer(run, tmp_path / "trainer_0.log", TRAINER_ARGS, endpoint=endpoint)
    producer = None
    try:
        producer = spawn("producer.produce", producer_args(endpoint, "soak", 0, 6 + 2 * kills, 16), log_p)
        wait_for(log_p, r"connected to trainer session", producer, timeout=150)
        for k in range(kills):
            time.sleep(rng.uniform(3, 12))
            os.kill(trainer.pid, signal.SIGKILL)
            trainer.wait()
            assert producer.poll() is None, "the producer must survive trainer crashes"
            episode_attrs(run / "archive.hdf5")  # opens after every crash
            args = TRAINER_ARGS + (["--exit-after-byes", "1"] if k == kills - 1 else [])
            trainer, _ = start_trainer(run, tmp_path / f"trainer_{k + 1}.log", args, endpoint=endpoint)
        out_p = finish(producer, log_p, 600)
        out_t = finish(trainer, tmp_path / f"trainer_{kills}.log", 120)
    finally:
        kill_all(producer, trainer)
    assert producer.returncode == 0, out_p[-2000:]
    assert trainer.returncode == 0, out_t[-2000:]
    s = producer_summary(out_p)
    assert s["unacked"] == 0
    sample_seqs = [q for ep in iter_episodes(run / "archive.hdf5") for q in ep.seqs.tolist()]
    assert len(sample_seqs) == len(set(sample_seqs)) == s["samples_sent"], "lost or duplicated samples"
    print(
        f"\nsoak: {kills} trainer kills survived; {s['samples_sent']} samples sent, {len(sample_seqs)} archived "
        f"exactly once, {s['resent']} resent after restarts, {s['trainer_sessions']} trainer sessions seen"
    )
