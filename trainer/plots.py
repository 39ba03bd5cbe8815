"""Training-curve plot: training loss and validation accuracy per coarse layer against updates."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from matplotlib.figure import Figure


def plot_curves(history: list[dict[str, Any]], out: Path, title: str = "draft training") -> Path:
    """history: dicts with ``updates`` and either ``loss`` (training) or ``val_acc_per_layer``."""
    train = [h for h in history if "loss" in h]
    val = [h for h in history if "val_acc_per_layer" in h]
    fig = Figure(figsize=(10, 4))  # no pyplot: no GUI backend, no global figure state
    ax_loss, ax_acc = fig.subplots(1, 2)
    if train:
        ax_loss.plot([h["updates"] for h in train], [h["loss"] for h in train], lw=1)
    ax_loss.set(xlabel="updates", ylabel="training loss (cross-entropy)", title="loss")
    if val:
        xs = [h["updates"] for h in val]
        for k in range(len(val[0]["val_acc_per_layer"])):
            ax_acc.plot(xs, [h["val_acc_per_layer"][k] for h in val], marker="o", ms=3, label=f"L{k}")
        ax_acc.plot(xs, [h["val_accuracy"] for h in val], "k--", lw=1, label="mean")
        ax_acc.legend()
    ax_acc.set(xlabel="updates", ylabel="token accuracy", title="held-out episodes", ylim=(0, 1))
    fig.suptitle(title)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    return out
