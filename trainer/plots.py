"""Training plots: draft training (loss and validation accuracy per coarse layer against updates), VLA
behaviour cloning, the RFSQ codec."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from matplotlib import colormaps
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


def plot_vla_training(metrics: dict[str, Any], path: Path) -> None:
    """VLA behaviour cloning (``trainer.train_vla``): loss curves and per-layer accuracy (train and
    held-out) as one PNG."""
    curve, evals = metrics["curve"], metrics["evals"]
    fig = Figure(figsize=(16, 4.5))
    ax = fig.subplots(1, 3)
    steps = [c["step"] for c in curve]
    ax[0].plot(steps, [c["main"] for c in curve], label="train CE (all layers)", alpha=0.7)
    ax[0].plot(steps, [c["aux"] for c in curve], label="train CE aux (coarse from hidden)", alpha=0.7)
    ax[0].plot([e["step"] for e in evals], [e["main"] for e in evals], "o-", label="held-out CE")
    ax[0].plot(
        [e["step"] for e in evals], [e["coarse"] for e in evals], "D-", label="held-out CE layers 0..K-1"
    )
    ax[0].plot([e["step"] for e in evals], [e["aux"] for e in evals], "s-", label="held-out CE aux")
    ax[0].set_xlabel("step")
    ax[0].set_ylabel("cross-entropy")
    ax[0].set_yscale("log")
    ax[0].legend()
    n_layers = len(curve[0]["layer_acc"])
    cmap = colormaps["viridis"]
    for layer in range(n_layers):
        ax[1].plot(
            steps, [c["layer_acc"][layer] for c in curve], color=cmap(layer / n_layers), label=f"L{layer}"
        )
    ax[1].set_title("train token accuracy per layer (teacher forced)")
    ax[1].set_xlabel("step")
    ax[1].legend(ncol=2, fontsize=8)
    last = evals[-1]
    x = np.arange(n_layers)
    ax[2].bar(x - 0.2, last["layer_acc"], 0.4, label="teacher forced")
    ax[2].bar(x + 0.2, last["free_layer_acc"], 0.4, label="free running (KV cache)")
    ax[2].plot(np.arange(len(last["aux_acc"])), last["aux_acc"], "k^", label="aux head (from hidden)")
    ax[2].set_xticks(x)
    ax[2].set_xlabel("RFSQ layer")
    ax[2].set_ylim(0, 1)
    ax[2].set_title(f"held-out accuracy at step {last['step']}")
    ax[2].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def plot_codec_training(curve: list[tuple[int, float]], report: dict[str, Any], path: Path) -> None:
    """RFSQ codec (``trainer.train_codec``): training loss, held-out reconstruction error per number of
    decoded layers, code entropy per layer."""
    fig = Figure(figsize=(14, 3.8))
    axes = fig.subplots(1, 3)
    steps, losses = zip(*curve)
    axes[0].semilogy(steps, losses)
    axes[0].set(title="training loss (MSE, normalized)", xlabel="step")
    ks = list(range(1, len(report["mse_norm"]) + 1))
    axes[1].semilogy(ks, report["mse_norm"], "o-")
    axes[1].set(title="held-out reconstruction MSE vs layers decoded", xlabel="k (layers decoded)")
    axes[2].bar(ks, report["layer_entropy_bits"])
    axes[2].axhline(report["max_entropy_bits"], color="gray", ls="--", lw=1)
    axes[2].set(title="code entropy per layer (bits)", xlabel="layer (1-based)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
