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
free-running decoding, see :func:`action_score`),
``metrics.json`` (curves and final held-out figures), ``training.png``.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from common.cli import config_to_dict, parse_config
from common.codec import action_chunks, load_codec
from common.demos import read_demos
from common.init_states import require_checked
from common.logs import setup_logging
from common.packed import pack, unpack
from common.schedule import INIT_STATES, parse_range
from common.vla.embedded import (
    EmbeddedVLA,
    EmbeddedVLAConfig,
    EmbeddedVLAPolicy,
    load_embedded_vla,
    save_embedded_vla,
)
from common.vla.tokenizer import InstructionTokenizer

log = logging.getLogger("trainer.train_vla")


@dataclass
class VLATrainConfig:
    """Behaviour-clone the embedded VLA on demonstration HDF5 files."""

    demos: list[Path] = field(default_factory=list, metadata={"help": "demonstration HDF5 file(s)"})
    packed: Path | None = field(
        default=None, metadata={"help": "packed dataset (.npz from --pack-to) instead of --demos"}
    )
    pack_to: Path | None = field(default=None, metadata={"help": "write the packed dataset here and exit"})
    jpeg_quality: int = field(
        default=0, metadata={"help": "JPEG quality of packed wrist images (0: lossless)"}
    )
    frame_stride: int = field(default=1, metadata={"help": "use every N-th demo step as a training frame"})
    codec_dir: Path = field(
        default=Path("assets/codec"), metadata={"help": "RFSQ codec giving the target codes"}
    )
    out_dir: Path = field(
        default=Path("runs/vla"), metadata={"help": "where to write weights, metrics, plots"}
    )
    init_from: Path | None = field(
        default=None, metadata={"help": "start from these weights (a weights dir)"}
    )
    image_size: int = field(default=64, metadata={"help": "side of the downsampled camera images"})
    hidden_size: int = field(default=256, metadata={"help": "language-model hidden size D"})
    intermediate_size: int = field(default=768, metadata={"help": "language-model MLP size"})
    num_hidden_layers: int = field(default=4, metadata={"help": "language-model layers"})
    num_attention_heads: int = field(default=4, metadata={"help": "language-model attention heads"})
    vision_hidden_sizes: list[int] = field(
        default_factory=lambda: [32, 64, 128], metadata={"help": "ResNet stage widths"}
    )
    steps: int = field(default=3000, metadata={"help": "optimizer steps"})
    batch_size: int = field(default=64, metadata={"help": "samples per step"})
    lr: float = field(default=5e-4, metadata={"help": "AdamW peak learning rate (warmup, cosine decay)"})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay"})
    warmup: int = field(default=200, metadata={"help": "linear warmup steps"})
    fine_weight: float = field(default=0.5, metadata={"help": "loss weight of the fine layers K..L-1"})
    consistency_weight: float = field(
        default=0.0,
        metadata={
            "help": "pull the decoder's coarse layers toward the aux head's (hidden-state) distributions"
        },
    )
    aux_weight: float = field(
        default=1.0, metadata={"help": "weight of the coarse-code loss on the hidden state"}
    )
    shift: int = field(default=4, metadata={"help": "random-shift augmentation in pixels (0: off)"})
    onpolicy: Path | None = field(
        default=None,
        metadata={"help": "the policy's own closed-loop frames (.npz of `trainer.pack_onpolicy`): each step "
                  "adds a batch of them, trained with the same loss on the policy's own codes (no expert "
                  "labels: the consistency term carries over to the states the policy meets)"},
    )  # fmt: skip
    onpolicy_weight: float = field(default=1.0, metadata={"help": "weight of the on-policy batch's loss"})
    onpolicy_val_inits: str = field(
        default="40-49",
        metadata={"help": "initial states whose on-policy episodes are held out (evaluated, never trained)"},
    )
    val_every: int = field(
        default=10, metadata={"help": "every N-th episode is held out (the codec's split)"}
    )
    eval_interval: int = field(default=500, metadata={"help": "evaluate on held-out episodes every N steps"})
    free_running_samples: int = field(default=512, metadata={"help": "held-out samples decoded sequentially"})
    device: str = field(default="cpu", metadata={"help": "torch device (cpu, cuda)"})
    threads: int = field(default=2, metadata={"help": "torch CPU threads"})
    bf16: bool = field(default=True, metadata={"help": "bfloat16 autocast on CUDA"})
    seed: int = field(default=0, metadata={"help": "random seed"})
    select: str = field(
        default="action",
        metadata={
            "help": "checkpoint criterion: held-out free-running action error, or coarse-layer CE",
            "choices": ["action", "coarse"],
        },
    )
    max_minutes: float = field(
        default=0.0, metadata={"help": "stop training after this wall time (0: no limit)"}
    )
    save_dtype: str = field(
        default="float16", metadata={"help": "dtype of the saved weights", "choices": ["float16", "float32"]}
    )
    allow_benchmark_states: bool = field(
        default=False,
        metadata={"help": "LEGACY DATA ONLY: also train on data that starts from benchmark initial states "
                  "(the evaluation set) or does not record its starts (logged loudly)"},
    )  # fmt: skip

    def __post_init__(self) -> None:
        if not self.demos and self.packed is None:
            raise ValueError("give --demos FILE... or --packed FILE")
        for p in [*self.demos, *([self.packed] if self.packed else [])]:
            if not Path(p).is_file():
                raise ValueError(f"data file not found: {p}")
        if self.pack_to is not None and not self.demos:
            raise ValueError("--pack-to needs --demos")
        if not 0 <= self.jpeg_quality <= 100:
            raise ValueError(f"jpeg_quality must be in 0..100, got {self.jpeg_quality}")
        for name in ("steps", "batch_size", "eval_interval", "image_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.val_every < 2:
            raise ValueError(f"val_every must be >= 2, got {self.val_every}")
        if self.frame_stride < 1:
            raise ValueError(f"frame_stride must be >= 1, got {self.frame_stride}")
        if self.shift < 0 or self.shift >= self.image_size // 2:
            raise ValueError(f"shift must be in 0..{self.image_size // 2 - 1}, got {self.shift}")
        if self.onpolicy is not None and not Path(self.onpolicy).is_file():
            raise ValueError(f"on-policy file not found: {self.onpolicy}")
        if self.onpolicy_weight < 0:
            raise ValueError(f"onpolicy_weight must be >= 0, got {self.onpolicy_weight}")
        parse_range(self.onpolicy_val_inits, INIT_STATES, "initial state")


# ------------------------------------------------------------------------------------------ data
def frame_chunks(data: dict[str, Any], chunk_len: int) -> np.ndarray:
    """The action chunk starting at every training frame: [N, T, A] (past the end: last action repeated;
    frames with an expert label chunk, from DAgger, take that chunk)."""
    out = np.empty((len(data["episode"]), chunk_len, data["actions"].shape[1]), dtype=np.float32)
    for e in range(len(data["episode_names"])):
        rows = np.flatnonzero(data["episode"] == e)
        out[rows] = action_chunks(data["actions"][data["action_episode"] == e], chunk_len)[data["step"][rows]]
    if "label_chunks" in data:  # DAgger frames: the expert's own chunk from the visited state
        labelled = ~np.isnan(data["label_chunks"][:, 0, 0])
        if data["label_chunks"].shape[1] < chunk_len:
            raise ValueError(
                f"expert chunks of {data['label_chunks'].shape[1]} steps, the codec needs {chunk_len}"
            )
        out[labelled] = data["label_chunks"][labelled, :chunk_len]
    return out


# ------------------------------------------------------------------------------------------ model
def random_shift(x: torch.Tensor, pad: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Shift each image by a random integer offset in [-pad, pad] (edge padding). x [B, C, S, S]."""
    if pad == 0:
        return x
    b, _, s, _ = x.shape
    padded = F.pad(x, (pad, pad, pad, pad), mode="replicate")  # [B, C, S+2p, S+2p]
    off = torch.randint(0, 2 * pad + 1, (b, 2), device=x.device, generator=generator)  # [B, 2]
    ar = torch.arange(s, device=x.device)
    rows = (off[:, 0:1] + ar)[:, :, None].expand(b, s, s)  # [B, S, S]
    cols = (off[:, 1:2] + ar)[:, None, :].expand(b, s, s)  # [B, S, S]
    bidx = torch.arange(b, device=x.device)[:, None, None]
    return padded.permute(0, 2, 3, 1)[bidx, rows, cols].permute(0, 3, 1, 2)  # [B, C, S, S]


def build_model(
    cfg: VLATrainConfig, data: dict[str, Any], train_mask: np.ndarray, codec_sha: str
) -> EmbeddedVLA:
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


class Batches:
    """All samples as tensors on the training device; draws augmented batches."""

    def __init__(self, data: dict[str, Any], codes: torch.Tensor, model: EmbeddedVLA, device: torch.device):
        self.images = torch.from_numpy(data["images"]).to(device)  # [N, 2, S, S, 3] uint8
        self.proprio = torch.from_numpy(data["proprio"]).to(device)  # [N, 8]
        self.codes = codes.to(device)  # [N, T, H, L] uint8
        ids, valid = model.tokenize(data["instruction_of_episode"].tolist(), device)  # [E, Lt]
        ep = torch.from_numpy(data["episode"]).to(device)
        self.text_ids, self.text_valid = ids[ep], valid[ep]  # [N, Lt]
        self.device = device

    def get(self, idx: torch.Tensor, shift: int = 0) -> dict[str, torch.Tensor]:
        img = self.images[idx].float().div(127.5).sub(1.0)  # [B, 2, S, S, 3]
        img = img.permute(0, 1, 4, 2, 3)  # [B, 2, 3, S, S]
        if shift:
            b = img.shape[0]
            img = random_shift(img.flatten(0, 1), shift).view(b, 2, *img.shape[2:])
        return {
            "images": img,
            "proprio": self.proprio[idx],
            "text_ids": self.text_ids[idx],
            "text_valid": self.text_valid[idx],
            "codes": self.codes[idx].long(),
        }


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


def _free_run(
    model: EmbeddedVLA, policy: EmbeddedVLAPolicy, b: dict[str, torch.Tensor], cfg: VLATrainConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode a batch as at run time (prefix pass + L block passes with the KV cache): codes [B, T, H, L]
    and, per coarse layer, how far a linear readout of the hidden state (the aux head) already
    reproduces the decoded codes [B, K]."""
    with _autocast(cfg):
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
    codec: Any,
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
        with _autocast(cfg):
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
        codes, readout_agreement = _free_run(model, policy, b, cfg)
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
    model: EmbeddedVLA, batches: Batches, val_idx: torch.Tensor, codec: Any, cfg: VLATrainConfig
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
        codes, readout_agreement = _free_run(model, policy, b, cfg)
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


def _autocast(cfg: VLATrainConfig):
    enabled = cfg.bf16 and cfg.device.startswith("cuda")
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=enabled) if enabled else _Null()


class _Null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *a: object) -> None:
        return None


def train(cfg: VLATrainConfig) -> dict[str, Any]:
    from tqdm import tqdm

    torch.manual_seed(cfg.seed)
    torch.set_num_threads(cfg.threads)
    device = torch.device(cfg.device)
    t0 = time.time()
    data = (
        unpack(cfg.packed)
        if cfg.packed is not None
        else read_demos(cfg.demos, cfg.image_size, cfg.frame_stride, cfg.allow_benchmark_states)
    )
    init_check = {"demos": require_checked(data.get("init_check"), cfg.allow_benchmark_states,
                                           f"demonstrations {cfg.packed or [str(p) for p in cfg.demos]}")}  # fmt: skip
    if cfg.pack_to is not None:
        pack(data, cfg.pack_to, cfg.jpeg_quality)
        return {"packed": str(cfg.pack_to)}
    if data["images"].shape[2] != cfg.image_size:
        raise ValueError(f"data images are {data['images'].shape[2]} px, --image-size is {cfg.image_size}")
    codec = load_codec(cfg.codec_dir)
    shape = codec.shape
    chunks = frame_chunks(data, shape.chunk_len)  # [N, T, A]
    with torch.no_grad():
        codes = torch.cat([codec.encode(torch.from_numpy(c)) for c in np.array_split(chunks, 64)]).to(
            torch.uint8
        )
    ep_ids = np.arange(len(data["episode_names"]))
    val_eps = ep_ids[ep_ids % cfg.val_every == cfg.val_every - 1]
    val_mask = np.isin(data["episode"], val_eps)
    train_mask = ~val_mask
    log.info(
        "%d frames: %d train, %d held out (%d episodes)",
        len(val_mask),
        train_mask.sum(),
        val_mask.sum(),
        len(val_eps),
    )

    model = build_model(cfg, data, train_mask, codec.sha256).to(device)
    codec = codec.to(device)
    n_params = sum(p.numel() for p in model.parameters())
    log.info(
        "model: %.2fM parameters, prefix %d image tokens/camera",
        n_params / 1e6,
        model.config.tokens_per_image,
    )
    batches = Batches(data, codes, model, device)
    train_idx = torch.from_numpy(np.flatnonzero(train_mask)).to(device)
    val_idx = torch.from_numpy(np.flatnonzero(val_mask)).to(device)
    on_batches = on_train = on_val = None
    if cfg.onpolicy is not None:
        on = unpack(cfg.onpolicy)
        init_check["onpolicy"] = require_checked(
            on.get("init_check"), cfg.allow_benchmark_states, f"on-policy frames {cfg.onpolicy}"
        )
        if on["images"].shape[2] != cfg.image_size:
            raise ValueError(
                f"{cfg.onpolicy} holds {on['images'].shape[2]}-px frames, --image-size is {cfg.image_size}"
            )
        on_val_mask = np.isin(
            on["init_of_episode"][on["episode"]],
            parse_range(cfg.onpolicy_val_inits, INIT_STATES, "initial state"),
        )
        on_batches = Batches(on, torch.from_numpy(on["codes"]), model, device)
        on_train = torch.from_numpy(np.flatnonzero(~on_val_mask)).to(device)
        on_val = torch.from_numpy(np.flatnonzero(on_val_mask)).to(device)
        log.info("on-policy frames of %s (policy %s): %d train, %d held out (initial states %s)",
                 cfg.onpolicy, on["backbone"], len(on_train), len(on_val), cfg.onpolicy_val_inits)  # fmt: skip
        if len(on_train) == 0:
            raise ValueError(f"{cfg.onpolicy}: every episode starts from a held-out initial state")
    actions_t = torch.from_numpy(chunks)

    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "emb" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "emb" not in n)]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr,
        betas=(0.9, 0.95),
    )

    def lr_at(step: int) -> float:
        if step < cfg.warmup:
            return cfg.lr * (step + 1) / cfg.warmup
        p = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
        return cfg.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * p)))

    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    curve: list[dict[str, Any]] = []
    evals: list[dict[str, Any]] = []
    best = float("inf")
    model.train()
    bar = tqdm(range(cfg.steps), desc="bc", unit="step", dynamic_ncols=True)
    run = {"loss": 0.0, "main": 0.0, "aux": 0.0, "acc0": 0.0}
    t_train = time.time()
    for step in bar:
        if cfg.max_minutes and time.time() - t_train > 60 * cfg.max_minutes and step % cfg.eval_interval:
            log.warning("--max-minutes %.1f reached at step %d: stopping early", cfg.max_minutes, step)
            ev = evaluate(model, batches, val_idx, codec, actions_t, cfg)
            ev["step"] = step
            evals.append(ev)
            if select_score(ev, cfg.select) < best:
                save_embedded_vla(
                    model,
                    out_dir,
                    extra={"train": config_to_dict(cfg), "held_out": ev, "init_check": init_check},
                    dtype=getattr(torch, cfg.save_dtype),
                )
            break
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        idx = train_idx[torch.randint(0, len(train_idx), (cfg.batch_size,), device=device)]
        with _autocast(cfg):
            r = losses(
                model, batches.get(idx, cfg.shift), cfg.aux_weight, cfg.fine_weight, cfg.consistency_weight
            )
        loss = r["loss"]
        if on_batches is not None and cfg.onpolicy_weight > 0:
            oidx = on_train[torch.randint(0, len(on_train), (cfg.batch_size,), device=device)]
            with _autocast(cfg):
                ro = losses(
                    model,
                    on_batches.get(oidx, cfg.shift),
                    cfg.aux_weight,
                    cfg.fine_weight,
                    cfg.consistency_weight,
                )
            loss = loss + cfg.onpolicy_weight * ro["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        for key in ("loss", "main", "aux"):
            v = float(r[key].detach())
            run[key] = 0.98 * run[key] + 0.02 * v if step else v
        if step % 25 == 0 or step == cfg.steps - 1:
            acc = r["layer_acc"].tolist()
            curve.append(
                {
                    "step": step,
                    "loss": float(r["loss"].detach()),
                    "main": float(r["main"]),
                    "aux": float(r["aux"]),
                    "layer_acc": acc,
                    "aux_acc": r["aux_acc"].tolist(),
                    "lr": lr_at(step),
                }
            )
            bar.set_postfix(loss=f"{run['loss']:.3f}", acc0=f"{acc[0]:.3f}", acc2=f"{acc[2]:.3f}")
        if (step + 1) % cfg.eval_interval == 0 or step == cfg.steps - 1:
            ev = evaluate(model, batches, val_idx, codec, actions_t, cfg)
            if on_batches is not None and len(on_val):
                ev.update(evaluate_onpolicy(model, on_batches, on_val, codec, cfg))
                log.info(
                    "step %d on-policy held-out: readout/decoder agreement %s, same codes as streamed %s, "
                    "arm change %.4f",
                    step + 1,
                    _fmt(ev["onpolicy_aux_agreement"]),
                    _fmt(ev["onpolicy_same_codes"][:3]),
                    ev["onpolicy_arm_change"],
                )
            ev["step"] = step + 1
            evals.append(ev)
            log.info(
                "step %d held-out: CE %.4f coarse CE %.4f layer acc %s aux acc %s free acc %s "
                "aux/decoder agreement %s arm MAE %.4f grip %.3f",
                step + 1,
                ev["main"],
                ev["coarse"],
                _fmt(ev["layer_acc"]),
                _fmt(ev["aux_acc"]),
                _fmt(ev["free_layer_acc"]),
                _fmt(ev["free_aux_agreement"]),
                ev["free_arm_mae"],
                ev["free_gripper_agreement"],
            )
            if select_score(ev, cfg.select) < best:
                best = select_score(ev, cfg.select)
                save_embedded_vla(
                    model,
                    out_dir,
                    extra={"train": config_to_dict(cfg), "held_out": ev, "init_check": init_check},
                    dtype=getattr(torch, cfg.save_dtype),
                )
            model.train()
    # the figures of the weights as shipped (saved dtype, loaded back)
    shipped, _ = load_embedded_vla(out_dir)
    shipped_ev = evaluate(shipped.to(device), batches, val_idx, codec, actions_t, cfg)
    if on_batches is not None and len(on_val):
        shipped_ev.update(evaluate_onpolicy(shipped, on_batches, on_val, codec, cfg))
    log.info(
        "shipped weights held-out: layer acc %s aux acc %s free acc %s arm MAE %.4f grip %.3f",
        _fmt(shipped_ev["layer_acc"]),
        _fmt(shipped_ev["aux_acc"]),
        _fmt(shipped_ev["free_layer_acc"]),
        shipped_ev["free_arm_mae"],
        shipped_ev["free_gripper_agreement"],
    )
    metrics = {
        "config": config_to_dict(cfg),
        "init_check": init_check,
        "shipped_held_out": shipped_ev,
        "num_params": n_params,
        "frames": {"train": int(train_mask.sum()), "held_out": int(val_mask.sum())},
        "episodes": {"train": int(len(ep_ids) - len(val_eps)), "held_out": int(len(val_eps))},
        "curve": curve,
        "evals": evals,
        "best_held_out": min(evals, key=lambda e: select_score(e, cfg.select)),
        "wall_s": time.time() - t0,
        "device": str(device) + (f" ({torch.cuda.get_device_name()})" if device.type == "cuda" else ""),
    }
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=1))
    plot_metrics(metrics, out_dir / "training.png")
    return metrics


def action_score(ev: dict[str, Any]) -> float:
    """Checkpoint criterion: held-out free-running action error (arm MAE in env units plus 0.1 x the
    gripper-sign disagreement). Cross-entropy is not used: it rises with over-confidence while the
    decoded actions keep improving."""
    return ev["free_arm_mae"] + 0.1 * (1.0 - ev["free_gripper_agreement"])


def select_score(ev: dict[str, Any], select: str) -> float:
    return action_score(ev) if select == "action" else ev["coarse"]


def _fmt(xs: list[float]) -> str:
    return "[" + " ".join(f"{x:.3f}" for x in xs) + "]"


def plot_metrics(metrics: dict[str, Any], path: Path) -> None:
    """Loss curves and per-layer accuracy (train and held-out) as one PNG."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # the plot is a convenience; metrics.json holds the same numbers
        log.warning("matplotlib missing: no plot written")
        return
    curve, evals = metrics["curve"], metrics["evals"]
    fig, ax = plt.subplots(1, 3, figsize=(16, 4.5))
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
    cmap = plt.get_cmap("viridis")
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
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    setup_logging("train_vla")
    cfg = parse_config(VLATrainConfig, argv, prog="python -m trainer.train_vla")
    train(cfg)


if __name__ == "__main__":
    main()
