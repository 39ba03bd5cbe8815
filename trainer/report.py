"""Trainer accounting and reporting: per-producer counters, the progress line, TensorBoard scalars, the
training history and curve, the final summary."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common.logs import progress_bar
from trainer.plots import plot_curves

log = logging.getLogger(__name__)


@dataclass
class ProducerStats:
    """What the trainer saw from one producer id (all its sessions)."""

    received: int = 0  # messages of any kind attributed to this producer
    samples_received: int = 0
    accepted: int = 0  # samples accepted (buffer/validation set + archive)
    archived: int = 0  # samples written to the archive
    episodes_archived: int = 0
    episodes_incomplete: int = 0
    episodes_errored: int = 0
    rejected: dict[str, int] = field(default_factory=dict)
    gaps: int = 0  # sequence numbers never seen
    gap_events: int = 0
    sessions: int = 0
    reported_sent: int | None = None  # samples_sent from the producer's bye
    reported_episodes: int | None = None

    def reject(self, reason: str) -> None:
        self.rejected[reason] = self.rejected.get(reason, 0) + 1


class Progress:
    """tqdm line: samples accepted, episodes archived, updates, validation accuracy."""

    def __init__(self, trainer: Any):
        self.t = trainer
        self.bar = progress_bar(desc="train", unit="sample", dynamic_ncols=True, mininterval=1.0)
        self.n = 0

    def update(self) -> None:
        t = self.t
        accepted, learning = t.delivery.accepted_total, t.learning
        if accepted != self.n:
            self.bar.update(accepted - self.n)
            self.n = accepted
        val = learning.last_val["val_accuracy"] if learning.last_val else float("nan")
        self.bar.set_postfix(
            episodes=t.archive.num_episodes,
            updates=learning.learner.updates if learning.learner else 0,
            val_acc=f"{val:.3f}",
            refresh=False,
        )

    def close(self) -> None:
        self.bar.close()


class Scalars:
    """TensorBoard scalars under ``run_dir/tb``; off (with a warning) where tensorboard is not installed."""

    def __init__(self) -> None:
        self.writer: Any = None

    def open(self, log_dir: Path) -> None:
        try:  # tensorboard is an optional dependency: train without it
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(log_dir))
        except Exception as exc:
            log.warning("TensorBoard logging off: %s", exc)
            self.writer = None

    def add(self, prefix: str, metrics: dict[str, Any], step: int) -> None:
        """Numbers as ``prefix/name``, lists (per layer) as ``prefix/name/L<i>``; anything else is skipped."""
        if self.writer is None:
            return
        for k, v in metrics.items():
            if isinstance(v, list):
                for i, x in enumerate(v):
                    self.writer.add_scalar(f"{prefix}/{k}/L{i}", x, step)
            elif isinstance(v, (int, float)):
                self.writer.add_scalar(f"{prefix}/{k}", v, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def save_history(history: list[dict[str, Any]], run_dir: Path, session: str) -> None:
    """Append this session's records to ``history.jsonl`` (kept across restarts of the same run) and plot
    the whole history to ``training_curve.png``."""
    hist_file = run_dir / "history.jsonl"
    with open(hist_file, "a") as fh:
        for h in history:
            fh.write(json.dumps({**h, "trainer_session": session}) + "\n")
    everything = [json.loads(line) for line in hist_file.read_text().splitlines() if line.strip()]
    if everything:
        try:
            plot_curves(everything, run_dir / "training_curve.png")
        except Exception as exc:
            log.warning("could not plot the training curve: %s", exc)


def build_summary(t: Any, in_archive: dict[str, int]) -> dict[str, Any]:
    """The trainer's summary (``summary.json``): ``t`` is the :class:`trainer.online.Trainer`,
    ``in_archive`` the samples per producer in the archive, all sessions (also those before a restart)."""
    d, learner = t.delivery, t.learning.learner
    elapsed = time.time() - t.t_start
    stream_s = time.time() - (d.first_sample_at or time.time())
    return {
        "trainer_session": t.session,
        "elapsed_s": elapsed,
        "producers": {
            pid: {**vars(st), "in_archive": in_archive.get(pid, 0)} for pid, st in sorted(d.stats.items())
        },
        "rejected_unattributed": dict(d.unattributed),
        "accepted_total": d.accepted_total,
        "archive": {
            "path": str(t.archive.path),
            "episodes": t.archive.num_episodes,
            "samples": t.archive.total,
            "removed_partial_on_open": t.archive.removed_partial,
        },
        "updates": learner.updates if learner else 0,
        "samples_per_s": d.accepted_total / stream_s if stream_s > 0 else 0.0,
        "updates_per_s": (learner.updates / elapsed) if learner else 0.0,
        "lag_s": d.lag_quantiles(),
        "rate_limiter": vars(t.learning.limiter.stats),
        "last_validation": t.learning.last_val,
        "best_val_accuracy": learner.best_val if learner else None,
        "action_clamping": t.clamp.to_dict(),
    }


def print_summary(summary: dict[str, Any]) -> None:
    lines = ["", "=== trainer summary (this trainer session; 'in archive' counts all sessions) ==="]
    lines.append(
        f"{'producer':<16}{'sent':>8}{'received':>10}{'accepted':>10}{'rejected':>10}{'archived':>10}{'gaps':>6}"
        f"{'in archive':>12}  episodes"
    )
    for pid, st in summary["producers"].items():
        sent = "?" if st["reported_sent"] is None else st["reported_sent"]
        rej = sum(st["rejected"].values())
        lines.append(
            f"{pid:<16}{sent!s:>8}{st['samples_received']:>10}{st['accepted']:>10}{rej:>10}{st['archived']:>10}"
            f"{st['gaps']:>6}{st['in_archive']:>12}  {st['episodes_archived']} ({st['episodes_incomplete']} incomplete, "
            f"{st['episodes_errored']} errored)" + (f"  rejected: {st['rejected']}" if rej else "")
        )
    if summary["rejected_unattributed"]:
        lines.append(f"rejected, producer unknown: {summary['rejected_unattributed']}")
    a = summary["archive"]
    lines.append(f"archive {a['path']}: {a['episodes']} episodes, {a['samples']} samples")
    lines.append(
        f"updates {summary['updates']}, {summary['samples_per_s']:.2f} samples/s, {summary['updates_per_s']:.2f} updates/s, "
        f"lag p50 {summary['lag_s']['p50'] * 1e3:.1f} ms"
    )
    clamp = summary.get("action_clamping") or {}
    if clamp.get("fraction"):
        lines.append(
            f"action values clamped by the codec, per dimension (of {clamp['values_per_dim']}): "
            + " ".join(f"{f:.4f}" for f in clamp["fraction"])
        )
    if summary["last_validation"]:
        v = summary["last_validation"]
        lines.append(
            f"val accuracy {v['val_accuracy']:.4f} per layer {[round(x, 4) for x in v['val_acc_per_layer']]}"
        )
    print("\n".join(lines), flush=True)
