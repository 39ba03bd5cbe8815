"""The behaviour-cloning objective of the embedded VLA: cross-entropy of every RFSQ layer's tokens
(teacher forcing, all layers in one forward pass), the auxiliary coarse-code head on the last prompt
token's hidden state (the draft model's input), and the optional consistency term; bf16 autocast."""

from __future__ import annotations

import contextlib
from typing import Any

import torch
import torch.nn.functional as F

from common.vla.embedded import EmbeddedVLA
from trainer.vla_config import VLATrainConfig


def autocast(cfg: VLATrainConfig) -> Any:
    """bfloat16 autocast on CUDA with ``--bf16``; a no-op context otherwise."""
    enabled = cfg.bf16 and cfg.device.startswith("cuda")
    return (
        torch.autocast("cuda", dtype=torch.bfloat16, enabled=enabled) if enabled else contextlib.nullcontext()
    )


def losses(
    model: EmbeddedVLA,
    batch: dict[str, torch.Tensor],
    aux_weight: float,
    fine_weight: float = 1.0,
    consistency_weight: float = 0.0,
) -> dict[str, torch.Tensor]:
    """Cross-entropy per RFSQ layer (layers >= K weighted by ``fine_weight``) + aux coarse CE
    (+ ``consistency_weight`` x the cross-entropy from the aux head's distributions, held fixed, to the
    decoder's coarse-layer distributions: the decoder's coarse layers follow what the last prompt
    token's hidden state says, the state a draft model reads)."""
    out = model.forward_train(**batch)
    tgt = batch["codes"].permute(0, 3, 1, 2)  # [B, L, T, H]
    n_layers, g = out["logits"].shape[1], out["logits"].shape[-1]
    k = out["aux_logits"].shape[1]
    per_layer = (
        F.cross_entropy(
            out["logits"].float().flatten(0, 1).flatten(1, 2).transpose(1, 2),
            tgt.flatten(0, 1).flatten(1),
            reduction="none",
        )
        .view(tgt.shape[0], n_layers, -1)
        .mean(dim=(0, 2))
    )  # [L]
    weights = torch.ones(n_layers, device=per_layer.device)
    weights[k:] = fine_weight
    main = (per_layer * weights).sum() / weights.sum()
    aux = F.cross_entropy(out["aux_logits"].float().reshape(-1, g), tgt[:, :k].reshape(-1))
    aux_p = out["aux_logits"].detach().float().softmax(-1)  # [B, K, T, H, G]
    cons = -(aux_p * out["logits"][:, :k].float().log_softmax(-1)).sum(-1).mean()
    return {
        "loss": main + aux_weight * aux + (consistency_weight * cons if consistency_weight else 0.0),
        "cons": cons.detach(),
        "main": per_layer.mean().detach(),
        "coarse": per_layer[:k].mean().detach(),
        "layer_ce": per_layer.detach(),
        "aux": aux.detach(),
        "layer_acc": (out["logits"].argmax(-1) == tgt).float().mean(dim=(0, 2, 3)).detach(),  # [L]
        "aux_acc": (out["aux_logits"].argmax(-1) == tgt[:, :k]).float().mean(dim=(0, 2, 3)).detach(),  # [K]
    }
