"""Behaviour-clone the embedded VLA on demonstrations (teacher forcing across RFSQ layers).

    python -m trainer.train_vla --demos data/demos/libero_spatial_expert.hdf5 --out-dir runs/vla
    python -m trainer.train_vla --demos FILE --pack-to runs/vla/packed.npz --jpeg-quality 90   # pack only
    python -m trainer.train_vla --packed runs/vla/packed.npz --device cuda --out-dir runs/vla_gpu

Targets are the codes of the shipped RFSQ codec (``--codec-dir``) of the action chunk starting at
every step of every demonstration. One training step runs the prefix (images, instruction, proprio)
and all L decoding blocks in one forward pass with the block attention mask, and minimises the
cross-entropy of every layer's tokens plus ``--aux-weight`` times the cross-entropy of an auxiliary
head that predicts the coarse layers 0..K-1 from the last-prompt-token hidden state (the draft
model's input). Whole episodes are held out (every ``--val-every``-th, the codec's split) for
per-layer accuracy, teacher-forced and free-running (sequential decoding with the KV cache).

A packed dataset (``--pack-to``) holds the downsampled images (raw or JPEG), proprio, actions and
instructions in one ``.npz``: small enough to train on another machine without h5py or LIBERO.

Outputs in ``--out-dir``: ``config.json`` + ``model.safetensors`` (lowest held-out action error of
free-running decoding, see :func:`trainer.vla_eval.action_score`),
``metrics.json`` (curves and final held-out figures), ``training.png``.

Modules: configuration :mod:`trainer.vla_config`, data :mod:`trainer.vla_data` (formats in
:mod:`common.demos`, :mod:`common.packed`), objective :mod:`trainer.vla_loss`, held-out figures
:mod:`trainer.vla_eval`, plot :func:`trainer.plots.plot_vla_training`; this module builds the model
and runs the loop.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from common.cli import config_to_dict, parse_config
from common.codec import RFSQCodec, load_codec
from common.init_states import require_checked
from common.logs import setup_logging
from common.packed import pack
from common.vla.embedded import (
    EmbeddedVLA,
    EmbeddedVLAConfig,
    load_embedded_vla,
    save_embedded_vla,
)
from common.vla.tokenizer import InstructionTokenizer
from trainer.plots import plot_vla_training
from trainer.vla_config import VLATrainConfig
from trainer.vla_data import Batches, DemoTargets, OnPolicyFrames, demo_targets, load_frames, load_onpolicy
from trainer.vla_eval import evaluate, evaluate_onpolicy, fmt_floats, select_score
from trainer.vla_loss import autocast, losses

log = logging.getLogger("trainer.train_vla")


def build_model(
    cfg: VLATrainConfig, data: dict[str, Any], train_mask: np.ndarray, codec_sha: str
) -> EmbeddedVLA:
    """The weights of ``--init-from`` (trained with the same codec), or a new model whose vocabulary and
    proprio normalisation come from the training frames."""
    if cfg.init_from is not None:
        model, _ = load_embedded_vla(cfg.init_from)
        if model.config.codec_sha256 and model.config.codec_sha256 != codec_sha:
            raise ValueError(f"--init-from {cfg.init_from} was trained with another codec")
        return model
    tok = InstructionTokenizer.build(data["instruction_of_episode"].tolist())
    pr = data["proprio"][train_mask]
    max_text = max(len(tok.encode(t)) for t in data["instruction_of_episode"].tolist())
    mcfg = EmbeddedVLAConfig(
        image_size=cfg.image_size,
        vision_hidden_sizes=list(cfg.vision_hidden_sizes),
        vision_depths=[1] * len(cfg.vision_hidden_sizes),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        max_text_len=max(32, max_text),
        proprio_mean=pr.mean(0).astype(float).tolist(),
        proprio_std=np.maximum(pr.std(0), 1e-3).astype(float).tolist(),
        words=tok.words,
        codec_sha256=codec_sha,
    )
    return EmbeddedVLA(mcfg)


@dataclass
class Run:
    """Everything a training step, an evaluation or a checkpoint needs."""

    cfg: VLATrainConfig
    model: EmbeddedVLA
    codec: RFSQCodec
    batches: Batches
    train_idx: torch.Tensor  # [n] demonstration frames trained on
    val_idx: torch.Tensor  # [m] held-out demonstration frames
    actions: torch.Tensor  # [N, T, A] chunk targets of every frame
    onpolicy: OnPolicyFrames | None
    out_dir: Path
    init_check: dict[str, str]


def lr_at(cfg: VLATrainConfig, step: int, total: int | None = None) -> float:
    """Linear warmup to ``cfg.lr``, then cosine decay to 5% of it at step ``total`` (default
    ``cfg.steps``; with ``--max-minutes``, the steps that fit in the time, see :func:`fitted_total`)."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    total = cfg.steps if total is None else total
    p = min(1.0, (step - cfg.warmup) / max(1, total - cfg.warmup))
    return cfg.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * p)))


def fitted_total(cfg: VLATrainConfig, step: int, elapsed_s: float) -> int:
    """The schedule's length under ``--max-minutes``: the steps that fit in the time at the rate so far
    (evaluations included), at most ``cfg.steps`` and never before the current step. A run stopped by
    the clock then ends its cosine decay instead of being cut off at a high learning rate."""
    if not cfg.max_minutes or step < 50:
        return cfg.steps
    fit = int(step * 60 * cfg.max_minutes / max(elapsed_s, 1e-9))
    return max(step + 1, min(cfg.steps, fit))


def make_optimizer(model: EmbeddedVLA, cfg: VLATrainConfig) -> torch.optim.Optimizer:
    """AdamW; no weight decay on embeddings, norms and biases."""
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "emb" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "emb" not in n)]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr,
        betas=(0.9, 0.95),
    )


def train_step(
    run: Run, opt: torch.optim.Optimizer, step: int, total: int | None = None
) -> dict[str, torch.Tensor]:
    """One optimizer step on a demonstration batch (+ an on-policy batch); returns the demo losses."""
    cfg, model = run.cfg, run.model
    for group in opt.param_groups:
        group["lr"] = lr_at(cfg, step, total)
    idx = run.train_idx[torch.randint(0, len(run.train_idx), (cfg.batch_size,), device=run.train_idx.device)]
    with autocast(cfg):
        r = losses(
            model, run.batches.get(idx, cfg.shift), cfg.aux_weight, cfg.fine_weight, cfg.consistency_weight
        )
    loss = r["loss"]
    on = run.onpolicy
    if on is not None and cfg.onpolicy_weight > 0:
        oidx = on.train_idx[
            torch.randint(0, len(on.train_idx), (cfg.batch_size,), device=on.train_idx.device)
        ]
        with autocast(cfg):
            ro = losses(
                model,
                on.batches.get(oidx, cfg.shift),
                cfg.aux_weight,
                cfg.fine_weight,
                cfg.consistency_weight,
            )
        loss = loss + cfg.onpolicy_weight * ro["loss"]
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    return r


def held_out(run: Run, model: EmbeddedVLA, with_onpolicy: bool = True) -> dict[str, Any]:
    """Held-out figures of ``model`` on the demonstration frames (and the on-policy frames)."""
    ev = evaluate(model, run.batches, run.val_idx, run.codec, run.actions, run.cfg)
    on = run.onpolicy
    if with_onpolicy and on is not None and len(on.val_idx):
        ev.update(evaluate_onpolicy(model, on.batches, on.val_idx, run.codec, run.cfg))
    return ev


def log_held_out(step: int, ev: dict[str, Any]) -> None:
    if "onpolicy_frames" in ev:
        log.info(
            "step %d on-policy held-out: readout/decoder agreement %s, same codes as streamed %s, "
            "arm change %.4f",
            step,
            fmt_floats(ev["onpolicy_aux_agreement"]),
            fmt_floats(ev["onpolicy_same_codes"][:3]),
            ev["onpolicy_arm_change"],
        )
    log.info(
        "step %d held-out: CE %.4f coarse CE %.4f layer acc %s aux acc %s free acc %s "
        "aux/decoder agreement %s arm MAE %.4f grip %.3f",
        step,
        ev["main"],
        ev["coarse"],
        fmt_floats(ev["layer_acc"]),
        fmt_floats(ev["aux_acc"]),
        fmt_floats(ev["free_layer_acc"]),
        fmt_floats(ev["free_aux_agreement"]),
        ev["free_arm_mae"],
        ev["free_gripper_agreement"],
    )


def save(run: Run, ev: dict[str, Any]) -> None:
    """Write the current weights with their held-out figures (``config.json`` + ``model.safetensors``)."""
    save_embedded_vla(
        run.model,
        run.out_dir,
        extra={"train": config_to_dict(run.cfg), "held_out": ev, "init_check": run.init_check},
        dtype=getattr(torch, run.cfg.save_dtype),
    )


def curve_point(
    cfg: VLATrainConfig, step: int, r: dict[str, torch.Tensor], total: int | None = None
) -> dict[str, Any]:
    return {
        "step": step,
        "loss": float(r["loss"].detach()),
        "main": float(r["main"]),
        "aux": float(r["aux"]),
        "layer_acc": r["layer_acc"].tolist(),
        "aux_acc": r["aux_acc"].tolist(),
        "lr": lr_at(cfg, step, total),
    }


def fit(run: Run) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The training loop: evaluates every ``eval_interval`` steps and keeps the best weights by
    ``--select``; stops early at ``--max-minutes``. Returns the training curve and the evaluations."""
    cfg, model = run.cfg, run.model
    opt = make_optimizer(model, cfg)
    run.out_dir.mkdir(parents=True, exist_ok=True)
    curve: list[dict[str, Any]] = []
    evals: list[dict[str, Any]] = []
    best = float("inf")
    model.train()
    bar = tqdm(range(cfg.steps), desc="bc", unit="step", dynamic_ncols=True)
    smooth = {"loss": 0.0, "main": 0.0, "aux": 0.0}
    t_train = time.time()
    total = cfg.steps
    for step in bar:
        if cfg.max_minutes and step % 50 == 0:
            total = fitted_total(cfg, step, time.time() - t_train)
        if step >= total or (cfg.max_minutes and time.time() - t_train > 60 * cfg.max_minutes):
            log.warning("--max-minutes %.1f: stopping at step %d (schedule fitted to %d steps)", cfg.max_minutes,
                        step, total)  # fmt: skip
            if not evals or evals[-1]["step"] != step:
                ev = held_out(run, model, with_onpolicy=False)
                ev["step"] = step
                evals.append(ev)
                if select_score(ev, cfg.select) < best:
                    save(run, ev)
            break
        r = train_step(run, opt, step, total)
        for key in smooth:
            v = float(r[key].detach())
            smooth[key] = 0.98 * smooth[key] + 0.02 * v if step else v
        if step % 25 == 0 or step == cfg.steps - 1:
            curve.append(curve_point(cfg, step, r, total))
            acc = curve[-1]["layer_acc"]
            bar.set_postfix(loss=f"{smooth['loss']:.3f}", acc0=f"{acc[0]:.3f}", acc2=f"{acc[2]:.3f}")
        if (step + 1) % cfg.eval_interval == 0 or step == cfg.steps - 1:
            ev = held_out(run, model)
            ev["step"] = step + 1
            evals.append(ev)
            log_held_out(step + 1, ev)
            if select_score(ev, cfg.select) < best:
                best = select_score(ev, cfg.select)
                save(run, ev)
            model.train()
    return curve, evals


def prepare(cfg: VLATrainConfig, data: dict[str, Any], init_check: dict[str, str]) -> tuple[Run, DemoTargets]:
    """Codec targets, held-out split, model, batches and on-policy frames of a training run."""
    if data["images"].shape[2] != cfg.image_size:
        raise ValueError(f"data images are {data['images'].shape[2]} px, --image-size is {cfg.image_size}")
    device = torch.device(cfg.device)
    codec = load_codec(cfg.codec_dir)
    targets = demo_targets(data, codec, cfg.val_every)
    model = build_model(cfg, data, targets.train_mask, codec.sha256).to(device)
    codec = codec.to(device)
    log.info(
        "model: %.2fM parameters, prefix %d image tokens/camera",
        sum(p.numel() for p in model.parameters()) / 1e6,
        model.config.tokens_per_image,
    )
    batches = Batches(data, targets.codes, model, device)
    train_idx = torch.from_numpy(np.flatnonzero(targets.train_mask)).to(device)
    val_idx = torch.from_numpy(np.flatnonzero(targets.val_mask)).to(device)
    onpolicy = None
    if cfg.onpolicy is not None:
        onpolicy = load_onpolicy(cfg, model, device)
        init_check["onpolicy"] = onpolicy.init_check
    actions = torch.from_numpy(targets.chunks)
    run = Run(
        cfg, model, codec, batches, train_idx, val_idx, actions, onpolicy, Path(cfg.out_dir), init_check
    )
    return run, targets


def train(cfg: VLATrainConfig) -> dict[str, Any]:
    """Behaviour-clone (or, with ``--pack-to``, only pack the data); returns the metrics written."""
    torch.manual_seed(cfg.seed)
    torch.set_num_threads(cfg.threads)
    t0 = time.time()
    data = load_frames(cfg)
    init_check = {"demos": require_checked(data.get("init_check"), cfg.allow_benchmark_states,
                                           f"demonstrations {cfg.packed or [str(p) for p in cfg.demos]}")}  # fmt: skip
    if cfg.pack_to is not None:
        pack(data, cfg.pack_to, cfg.jpeg_quality)
        return {"packed": str(cfg.pack_to)}
    run, targets = prepare(cfg, data, init_check)
    curve, evals = fit(run)
    # the figures of the weights as shipped (saved dtype, loaded back)
    shipped, _ = load_embedded_vla(run.out_dir)
    shipped_ev = held_out(run, shipped.to(run.batches.device))
    log.info(
        "shipped weights held-out: layer acc %s aux acc %s free acc %s arm MAE %.4f grip %.3f",
        fmt_floats(shipped_ev["layer_acc"]),
        fmt_floats(shipped_ev["aux_acc"]),
        fmt_floats(shipped_ev["free_layer_acc"]),
        shipped_ev["free_arm_mae"],
        shipped_ev["free_gripper_agreement"],
    )
    device = run.batches.device
    metrics = {
        "config": config_to_dict(cfg),
        "init_check": init_check,
        "shipped_held_out": shipped_ev,
        "num_params": sum(p.numel() for p in run.model.parameters()),
        "frames": {"train": int(targets.train_mask.sum()), "held_out": int(targets.val_mask.sum())},
        "episodes": {
            "train": targets.num_episodes - targets.num_val_episodes,
            "held_out": targets.num_val_episodes,
        },
        "curve": curve,
        "evals": evals,
        "best_held_out": min(evals, key=lambda e: select_score(e, cfg.select)),
        "wall_s": time.time() - t0,
        "device": str(device) + (f" ({torch.cuda.get_device_name()})" if device.type == "cuda" else ""),
    }
    (run.out_dir / "metrics.json").write_text(json.dumps(metrics, indent=1))
    plot_vla_training(metrics, run.out_dir / "training.png")
    return metrics


def main(argv: list[str] | None = None) -> None:
    setup_logging("train_vla")
    cfg = parse_config(VLATrainConfig, argv, prog="python -m trainer.train_vla")
    train(cfg)


if __name__ == "__main__":
    main()
