"""Helpers for the multi-process streaming tests: start trainer / producer processes, read their logs."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


# Trainer flags that make a tiny run train and validate within seconds (tests only).
FAST_TRAINER_ARGS = [
    "--min-size", "2", "--warmup-steps", "5", "--val-interval", "5", "--samples-per-insert", "8",
    "--error-buffer", "200", "--batch-size", "8",
]  # fmt: skip


def env() -> dict[str, str]:
    e = dict(os.environ)
    e.setdefault("MUJOCO_GL", "egl")
    e.setdefault("PYOPENGL_PLATFORM", "egl")
    e.setdefault("LIBERO_CONFIG_PATH", str(REPO / ".venv" / "libero-config"))
    e["TOKENIZERS_PARALLELISM"] = "false"
    e["PYTHONUNBUFFERED"] = "1"
    return e


def spawn(module: str, args: list[str], log: Path) -> subprocess.Popen:
    """Start ``python -m module args`` with stdout+stderr to ``log``."""
    fh = open(log, "w")  # noqa: SIM115 - closed when the process is reaped by the caller's test
    return subprocess.Popen(
        [sys.executable, "-m", module, *args], cwd=REPO, env=env(), stdout=fh, stderr=subprocess.STDOUT
    )


def start_trainer(
    run_dir: Path, log: Path, extra: list[str], endpoint: str = "tcp://127.0.0.1:*"
) -> tuple[subprocess.Popen, str]:
    proc = spawn("trainer.online", ["--endpoint", endpoint, "--run-dir", str(run_dir), *extra], log)
    m = wait_for(log, r"listening on (tcp://127\.0\.0\.1:\d+)", proc, timeout=60)
    return proc, m.group(1)


def wait_for(
    log: Path, pattern: str, proc: subprocess.Popen | None = None, timeout: float = 60, count: int = 1
):
    """Wait until ``pattern`` has matched ``count`` times in the log; returns the last match."""
    rx = re.compile(pattern)
    deadline = time.time() + timeout
    while time.time() < deadline:
        text = log.read_text(errors="replace") if log.exists() else ""
        matches = list(rx.finditer(text))
        if len(matches) >= count:
            return matches[count - 1]
        if proc is not None and proc.poll() is not None:
            raise AssertionError(
                f"{log.name}: process exited ({proc.returncode}) before {pattern!r}:\n{text[-3000:]}"
            )
        time.sleep(0.2)
    raise AssertionError(
        f"{log.name}: no {pattern!r} within {timeout}s:\n{(log.read_text(errors='replace'))[-3000:]}"
    )


def finish(proc: subprocess.Popen, log: Path, timeout: float) -> str:
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise AssertionError(
            f"{log.name} did not finish in {timeout}s:\n{log.read_text(errors='replace')[-3000:]}"
        ) from None
    return log.read_text(errors="replace")


def producer_summary(text: str) -> dict:
    m = re.search(r"SUMMARY_JSON (\{.*\})", text)
    assert m, text[-3000:]
    return json.loads(m.group(1))


def producer_args(
    endpoint: str, pid: str, task: int, episodes: int, max_steps: int, *extra: str
) -> list[str]:
    return [
        "--endpoint",
        endpoint,
        "--producer-id",
        pid,
        "--tasks",
        str(task),
        "--episodes-per-task",
        str(episodes),
        "--max-steps",
        str(max_steps),
        "--allow-random-policy",
        "--image-size",
        "64",
        "--flush-timeout-s",
        "60",
        *extra,
    ]


def kill_all(*procs: subprocess.Popen) -> None:
    for p in procs:
        if p is not None and p.poll() is None:
            p.kill()
            p.wait()


def streamed_episode(policy, producer_id, task, episode, split, steps, rng, num_steps=None, obs_side=0):
    """An archive EpisodeRecord as the trainer assembles it: one random sample per query step in
    ``steps`` (hidden state, codes, zero actions; with ``obs_side`` > 0 also random observations)."""
    import numpy as np

    from common.archive import EpisodeRecord

    n = len(steps)
    ep = EpisodeRecord(producer_id, "s0", "libero_spatial", task, episode, split, status="success",
                       num_steps=8 * n if num_steps is None else num_steps)  # fmt: skip
    for j, step in enumerate(steps):
        ep.hidden.append(rng.standard_normal(policy.hidden_dim).astype(np.float32))
        ep.codes.append(rng.integers(0, 7, policy.shape.codes_shape, dtype=np.uint8))
        ep.actions.append(np.zeros(policy.shape.chunk_shape, np.float32))
        ep.steps.append(step)
        ep.seqs.append(10 * episode + j)
        ep.sent_at.append(time.time())
        ep.received_at.append(time.time())
        if obs_side:
            ep.obs.append(
                (
                    rng.integers(0, 256, (obs_side, obs_side, 3), dtype=np.uint8),
                    rng.integers(0, 256, (obs_side, obs_side, 3), dtype=np.uint8),
                    rng.standard_normal(8).astype(np.float32),
                )
            )
    ep.end_seq = 10 * episode + n
    return ep
