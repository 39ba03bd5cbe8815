"""Trainer accounting and reporting: per-producer counters, the progress line, the final summary."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from common.logs import progress_bar


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
        if t.accepted_total != self.n:
            self.bar.update(t.accepted_total - self.n)
            self.n = t.accepted_total
        val = t.last_val["val_accuracy"] if t.last_val else float("nan")
        self.bar.set_postfix(
            episodes=t.archive.num_episodes,
            updates=t.learner.updates if t.learner else 0,
            val_acc=f"{val:.3f}",
            refresh=False,
        )

    def close(self) -> None:
        self.bar.close()


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
