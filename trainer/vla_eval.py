"""Held-out figures of VLA behaviour cloning: teacher-forced loss and per-layer accuracy, free-running
decoding exactly as at run time (prefix pass + L block passes with the KV cache) with its action error,
the on-policy frames' figures, and the checkpoint criterion."""

from __future__ import annotations

from typing import Any

import torch

from common.codec import RFSQCodec
from common.vla.embedded import EmbeddedVLA, EmbeddedVLAPolicy
from trainer.vla_config import VLATrainConfig
from trainer.vla_data import Batches
from trainer.vla_loss import autocast, losses


def free_run(
    model: EmbeddedVLA, policy: EmbeddedVLAPolicy, b: dict[str, torch.Tensor], cfg: VLATrainConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode a batch as at run time (prefix pass + L block passes with the KV cache): codes [B, T, H, L]
    and, per coarse layer, how far a linear readout of the hidden state (the aux head) already
    reproduces the decoded codes [B, K]."""
    with autocast(cfg):
        state = model.prefix_pass(b["images"], b["proprio"], b["text_ids"], b["text_valid"])
        codes = policy.decode_sequential(state, num_layers=model.shape.num_layers)  # [B, T, H, L], all
        k = model.shape.num_coarse_layers
        aux = model.aux_head(state.hidden).view(len(codes), k, *codes.shape[1:3], -1)  # [B, K, T, H, G]
    return codes, (aux.argmax(-1) == codes[..., :k].permute(0, 3, 1, 2)).float().mean(dim=(2, 3))


@torch.no_grad()
def evaluate(
    model: EmbeddedVLA,
    batches: Batches,
    val_idx: torch.Tensor,
    codec: RFSQCodec,
    actions: torch.Tensor,
    cfg: VLATrainConfig,
) -> dict[str, Any]:
    """Held-out figures: teacher-forced loss and per-layer accuracy, aux accuracy, and free-running
    sequential decoding (KV cache) on a subset: per-layer accuracy and action error."""
    model.eval()
    tot: dict[str, Any] = {
        "main": 0.0,
        "coarse": 0.0,
        "layer_ce": 0.0,
        "aux": 0.0,
        "cons": 0.0,
        "layer_acc": 0.0,
        "aux_acc": 0.0,
    }
    n = 0
    for start in range(0, len(val_idx), 256):
        idx = val_idx[start : start + 256]
        with autocast(cfg):
            r = losses(model, batches.get(idx), cfg.aux_weight, cfg.fine_weight, cfg.consistency_weight)
        for key in tot:
            tot[key] = tot[key] + r[key].float() * len(idx)
        n += len(idx)
    res = {key: (v / n).tolist() for key, v in tot.items()}
    # free running: prefix pass + L block passes with the KV cache, exactly as at run time
    policy = EmbeddedVLAPolicy(model, codec, device=batches.device)
    g = torch.Generator().manual_seed(0)
    sub = val_idx[torch.randperm(len(val_idx), generator=g)[: cfg.free_running_samples].to(val_idx.device)]
    accs, arm_err, grip_ok, agree = [], [], [], []
    for start in range(0, len(sub), 256):
        idx = sub[start : start + 256]
        b = batches.get(idx)
        codes, readout_agreement = free_run(model, policy, b, cfg)
        agree.append(readout_agreement)
        accs.append((codes == b["codes"]).float().mean(dim=(1, 2)))  # [B, L]
        pred = policy.codes_to_actions(codes)  # [B, T, A]
        gt = actions[idx.cpu()].to(pred.device)  # [B, T, A]
        arm_err.append((pred[..., :6] - gt[..., :6]).abs().mean(dim=(1, 2)))
        grip_ok.append((torch.sign(pred[..., 6]) == torch.sign(gt[..., 6])).float().mean(1))
    res["free_layer_acc"] = torch.cat(accs).mean(0).tolist()
    res["free_aux_agreement"] = torch.cat(agree).mean(0).tolist()
    res["free_arm_mae"] = float(torch.cat(arm_err).mean())
    res["free_gripper_agreement"] = float(torch.cat(grip_ok).mean())
    model.train()
    return res


@torch.no_grad()
def evaluate_onpolicy(
    model: EmbeddedVLA, batches: Batches, val_idx: torch.Tensor, codec: RFSQCodec, cfg: VLATrainConfig
) -> dict[str, Any]:
    """Held-out on-policy frames (no expert labels): free-running decoding, per coarse layer, against
    the linear readout of the hidden state (what a draft can predict) and against the codes the
    streaming policy decoded on them (how far the behaviour moved), plus the action change."""
    model.eval()
    policy = EmbeddedVLAPolicy(model, codec, device=batches.device)
    agree, same, moved = [], [], []
    for start in range(0, len(val_idx), 256):
        idx = val_idx[start : start + 256]
        b = batches.get(idx)
        codes, readout_agreement = free_run(model, policy, b, cfg)
        agree.append(readout_agreement)
        same.append((codes == b["codes"]).float().mean(dim=(1, 2)))  # [B, L]
        a_new, a_old = policy.codes_to_actions(codes), policy.codes_to_actions(b["codes"])  # [B, T, A]
        moved.append((a_new[..., :6] - a_old[..., :6]).abs().mean(dim=(1, 2)))
    model.train()
    return {
        "onpolicy_frames": int(len(val_idx)),
        "onpolicy_aux_agreement": torch.cat(agree).mean(0).tolist(),
        "onpolicy_same_codes": torch.cat(same).mean(0).tolist(),
        "onpolicy_arm_change": float(torch.cat(moved).mean()),
    }


def action_score(ev: dict[str, Any]) -> float:
    """Checkpoint criterion: held-out free-running action error (arm MAE in env units plus 0.1 x the
    gripper-sign disagreement). Cross-entropy is not used: it rises with over-confidence while the
    decoded actions keep improving."""
    return ev["free_arm_mae"] + 0.1 * (1.0 - ev["free_gripper_agreement"])


def select_score(ev: dict[str, Any], select: str) -> float:
    """The checkpoint criterion named by ``--select`` (lower is better)."""
    return action_score(ev) if select == "action" else ev["coarse"]


def fmt_floats(xs: list[float]) -> str:
    return "[" + " ".join(f"{x:.3f}" for x in xs) + "]"
