"""Draft learner shared by online training and offline retraining.

AdamW (lr 1e-4, weight decay 1e-5), gradient clipping at 1.0, linear warmup then cosine decay, bf16
autocast on CUDA; validation reports token accuracy per coarse layer; checkpoints follow docs/DESIGN.md §5.5
(via :func:`common.draft.save_checkpoint`, loadable with ``weights_only=True``).

Axes: B batch, D hidden size, K coarse layers, S = T*H tokens per layer, G grid size.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from common.draft import (
    DEFAULT_FORWARD,
    build_draft,
    check_forward,
    draft_loss,
    load_checkpoint,
    save_checkpoint,
)
from common.shapes import RFSQShape

log = logging.getLogger(__name__)


@dataclass
class OptimConfig:
    lr: float = 1e-4
    weight_decay: float = 1e-5
    grad_clip: float = 1.0
    warmup_steps: int = 1000
    total_steps: int = 20000
    min_lr_ratio: float = 0.05
    batch_size: int = 32
    draft_hidden_dim: int = 512
    draft_forward: str = DEFAULT_FORWARD  # "plan" (DESIGN §4) or "kpos" (common/draft.py)

    def __post_init__(self) -> None:
        check_forward(self.draft_forward)


def lr_factor(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warmup to 1, cosine to ``min_ratio`` at ``total``, constant after."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


@dataclass
class ValResult:
    loss: float
    accuracy: float
    acc_per_layer: list[float]
    layer_exact: list[float]
    num_samples: int


@dataclass
class Learner:
    input_dim: int
    shape: RFSQShape
    optim: OptimConfig
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    def __post_init__(self) -> None:
        s = self.shape
        self.model = build_draft(
            self.optim.draft_forward,
            input_dim=self.input_dim,
            hidden_dim=self.optim.draft_hidden_dim,
            num_coarse_layers=s.num_coarse_layers,
            chunk_len=s.chunk_len,
            action_hidden_dim=s.action_hidden_dim,
            grid_size=s.grid_size,
        ).to(self.device)
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(), lr=self.optim.lr, weight_decay=self.optim.weight_decay
        )
        o = self.optim
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: lr_factor(step, o.warmup_steps, o.total_steps, o.min_lr_ratio)
        )
        self.updates = 0
        self.best_val = -1.0
        self.autocast = self.device.type == "cuda"

    # ------------------------------------------------------------------ training
    def train_step(
        self,
        hidden: np.ndarray,
        targets: np.ndarray,
        soft_targets: np.ndarray | None = None,
        soft_weight: float = 0.0,
    ) -> dict[str, Any]:
        """hidden [B, D] float32, targets [B, K, S] uint8 -> loss and per-layer accuracy.

        soft_targets [B, K, S, G] (optional): the policy's probabilities, mixed in with ``soft_weight``.
        """
        self.model.train()
        h = torch.from_numpy(hidden).to(self.device)  # [B, D]
        y = torch.from_numpy(targets).to(self.device).long()  # [B, K, S]
        soft = torch.from_numpy(soft_targets).to(self.device) if soft_targets is not None else None
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            logits = self.model(h)  # [B, K, S, G]
        loss, metrics = draft_loss(logits, y, soft, soft_weight)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.optim.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.updates += 1
        return {
            "loss": float(loss.detach()),
            "grad_norm": float(grad_norm),
            "lr": self.scheduler.get_last_lr()[0],
            **metrics,
        }

    @torch.no_grad()
    def validate(self, hidden: np.ndarray, targets: np.ndarray, batch_size: int = 256) -> ValResult:
        """hidden [N, D], targets [N, K, S] -> token accuracy per layer over all N samples."""
        self.model.eval()
        n = len(hidden)
        K = self.shape.num_coarse_layers
        correct = np.zeros(K)
        exact = np.zeros(K)
        loss_sum = 0.0
        for i in range(0, n, batch_size):
            h = torch.from_numpy(hidden[i : i + batch_size]).to(self.device)  # [b, D]
            y = torch.from_numpy(targets[i : i + batch_size]).to(self.device).long()  # [b, K, S]
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
                logits = self.model(h)  # [b, K, S, G]
            loss, m = draft_loss(logits, y)
            b = len(h)
            loss_sum += float(loss) * b
            correct += np.asarray(m["acc_per_layer"]) * b
            exact += np.asarray(m["layer_exact"]) * b
        if n == 0:
            return ValResult(float("nan"), float("nan"), [float("nan")] * K, [float("nan")] * K, 0)
        acc = correct / n
        return ValResult(loss_sum / n, float(acc.mean()), acc.tolist(), (exact / n).tolist(), n)

    # ------------------------------------------------------------------ checkpoints
    def save(
        self,
        path: Path,
        epoch: int,
        val_accuracy: float,
        config: dict[str, Any],
        optimizer_state: bool = True,
    ) -> Path:
        """optimizer_state=False: an inference checkpoint (same keys, empty optimizer state, ~3x smaller)."""
        run = {**config, "updates": self.updates, "best_val_accuracy": max(self.best_val, val_accuracy)}
        run["scheduler_last_epoch"] = self.scheduler.last_epoch
        run["shape"] = self.shape.to_dict()
        optimizer = self.optimizer if optimizer_state else None
        return save_checkpoint(path, self.model, optimizer, epoch, val_accuracy, run)

    def load(self, path: Path) -> dict[str, Any]:
        """Resume model, optimizer and schedule from a checkpoint written by :meth:`save`."""
        model, ckpt = load_checkpoint(path, map_location=self.device, forward=self.optim.draft_forward)
        if model.model_config() != self.model.model_config():
            raise ValueError(f"{path}: model {model.model_config()} != expected {self.model.model_config()}")
        self.model.load_state_dict(model.state_dict())
        if ckpt["optimizer_state_dict"]:
            self.optimizer.load_state_dict(ckpt["optimizer_state_dict"])
        cfg = ckpt["config"]
        self.updates = int(cfg.get("updates", 0))
        self.best_val = float(cfg.get("best_val_accuracy", ckpt["val_accuracy"]))
        self.scheduler.last_epoch = int(cfg.get("scheduler_last_epoch", self.updates))
        for group, base in zip(self.optimizer.param_groups, self.scheduler.base_lrs, strict=True):
            group["lr"] = base * self.scheduler.lr_lambdas[0](self.scheduler.last_epoch)
        return ckpt
