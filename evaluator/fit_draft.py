"""Fit a draft of any depth K offline on a policy's own (hidden state, codes) over demonstration frames.

    python -m evaluator.fit_draft --demos data/demos/libero_spatial_small.hdf5 --weights-dir runs/vla_small \
        --codec-dir runs/codec_small --num-coarse-layers 8 --out runs/drafts/draft_k8.pt

The streaming pipeline (`make produce` + `make train`) trains the draft on the policy's own closed-loop
states; this command is the quick offline route used by the evaluator for deeper drafts (K up to
L = 8, issue part 4) and when no streamed archive exists yet: every frame of the demonstrations is
run through the policy's baseline decoding (prefix pass + L block passes), and the draft learns to
map the prefix hidden state to the policy's own first K layers. Validation is on whole held-out
demonstrations. Same model, loss, optimizer and checkpoint format as the trainer
(trainer/learner.py, DESIGN §4).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch
from tqdm import tqdm

from common.cli import config_to_dict, parse_config
from common.logs import setup_logging
from common.policy import Observation
from evaluator.eval import load_eval_policy

log = logging.getLogger("evaluator.fit_draft")


@dataclass
class FitDraftConfig:
    """Fit a draft (any K) on the policy's own hidden states and codes over demonstration frames."""

    demos: list[Path] = field(metadata={"help": "demonstration HDF5 files (producer/demos.py layout)"})
    out: Path = field(metadata={"help": "draft checkpoint to write"})
    weights_dir: Path | None = field(default=None, metadata={"help": "embedded VLA weights (none: assets)"})
    codec_dir: Path | None = field(default=None, metadata={"help": "RFSQ codec (none: assets/codec)"})
    num_coarse_layers: int = field(default=3, metadata={"help": "K: layers the draft predicts (1..8)"})
    frame_stride: int = field(default=1, metadata={"help": "use every n-th frame of each demonstration"})
    val_fraction: float = field(default=0.15, metadata={"help": "fraction of demonstrations held out"})
    epochs: int = field(default=40, metadata={"help": "passes over the training frames"})
    batch_size: int = field(default=64, metadata={"help": "batch size"})
    lr: float = field(default=3e-4, metadata={"help": "AdamW learning rate"})
    draft_hidden_dim: int = field(default=512, metadata={"help": "draft model width"})
    cache: Path | None = field(default=None, metadata={"help": "npz cache of extracted (hidden, codes)"})
    threads: int = field(default=2, metadata={"help": "torch CPU threads"})
    seed: int = field(default=0, metadata={"help": "random seed"})

    def __post_init__(self) -> None:
        if not 1 <= self.num_coarse_layers <= 8:
            raise ValueError(f"num_coarse_layers must be in 1..8, got {self.num_coarse_layers}")
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1), got {self.val_fraction}")
        if self.frame_stride < 1 or self.epochs < 1 or self.batch_size < 1:
            raise ValueError("frame_stride, epochs and batch_size must be >= 1")
        for d in self.demos:
            if not Path(d).is_file():
                raise ValueError(f"demonstration file {d} does not exist")


def demo_observations(path: Path, stride: int) -> list[tuple[str, list[Observation]]]:
    """(episode key, observations) of every demonstration in ``path``."""
    out = []
    with h5py.File(path, "r") as f:
        for key in sorted(f["data"].keys(), key=lambda k: int(k.split("_")[-1])):
            g = f["data"][key]
            obs = g["obs"]
            n = int(g.attrs["num_samples"])
            instr = str(g.attrs["instruction"])
            av, wr = obs["agentview_rgb"][:n:stride], obs["eye_in_hand_rgb"][:n:stride]  # [n, h, w, 3]
            proprio = np.concatenate([obs["ee_states"][:n:stride], obs["gripper_states"][:n:stride]], axis=1)
            frames = [
                Observation(
                    agentview=av[i], wrist=wr[i], proprio=proprio[i].astype(np.float32), instruction=instr
                )
                for i in range(len(av))
            ]
            out.append((f"{path.name}:{key}", frames))
    return out


@torch.no_grad()
def extract(
    policy, episodes: list[tuple[str, list[Observation]]]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """hidden [N, D] float32, codes [N, T, H, L] uint8, episode index [N] of every frame."""
    hs, cs, es = [], [], []
    total = sum(len(f) for _, f in episodes)
    bar = tqdm(total=total, desc="policy frames", unit="frame", dynamic_ncols=True)
    for e, (_, frames) in enumerate(episodes):
        for obs in frames:
            state = policy.prefix([obs])
            codes = policy.decode_sequential(state)  # [1, T, H, L]
            hs.append(state.hidden[0].float().cpu().numpy())
            cs.append(codes[0].to(torch.uint8).cpu().numpy())
            es.append(e)
            bar.update(1)
    bar.close()
    return np.stack(hs), np.stack(cs), np.asarray(es)


def fit(cfg: FitDraftConfig) -> dict[str, Any]:
    from trainer.learner import Learner, OptimConfig
    from trainer.retrain import targets_from_codes

    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    policy = load_eval_policy(
        "embedded",
        str(cfg.weights_dir) if cfg.weights_dir else None,
        str(cfg.codec_dir) if cfg.codec_dir else None,
    )
    if cfg.cache is not None and cfg.cache.is_file():
        z = np.load(cfg.cache)
        hidden, codes, ep, names = z["hidden"], z["codes"], z["episode"], list(z["names"])
        if str(z["backbone"]) != policy.backbone_id:
            raise ValueError(f"cache {cfg.cache} was made with {z['backbone']}, not {policy.backbone_id}")
    else:
        episodes = [e for d in cfg.demos for e in demo_observations(Path(d), cfg.frame_stride)]
        names = [k for k, _ in episodes]
        hidden, codes, ep = extract(policy, episodes)
        if cfg.cache is not None:
            cfg.cache.parent.mkdir(parents=True, exist_ok=True)
            np.savez(
                cfg.cache,
                hidden=hidden,
                codes=codes,
                episode=ep,
                names=np.asarray(names),
                backbone=policy.backbone_id,
            )
    n_ep = len(names)
    n_val = max(1, int(round(cfg.val_fraction * n_ep)))
    val_eps = set(rng.permutation(n_ep)[:n_val].tolist())
    is_val = np.isin(ep, list(val_eps))
    K = cfg.num_coarse_layers
    shape = dataclasses.replace(policy.shape, num_coarse_layers=K)
    y = targets_from_codes(codes, K)  # [N, K, T*H]
    h_tr, y_tr, h_va, y_va = hidden[~is_val], y[~is_val], hidden[is_val], y[is_val]
    log.info("frames: %d train, %d validation (%d held-out demonstrations)", len(h_tr), len(h_va), n_val)
    steps = math.ceil(len(h_tr) / cfg.batch_size) * cfg.epochs
    optim = OptimConfig(
        lr=cfg.lr,
        warmup_steps=max(1, steps // 20),
        total_steps=steps,
        batch_size=cfg.batch_size,
        draft_hidden_dim=cfg.draft_hidden_dim,
    )
    learner = Learner(hidden.shape[1], shape, optim)
    run_config = {
        "run": config_to_dict(cfg),
        "source": "evaluator.fit_draft (offline, the policy's own codes on demonstration frames)",
        "backbone_id": policy.backbone_id,
        "train_frames": int(len(h_tr)),
        "valid_frames": int(len(h_va)),
        "valid_episodes": sorted(names[i] for i in val_eps),
        "optim": vars(optim),
    }
    best, best_res, t0 = -1.0, None, time.time()
    bar = tqdm(range(cfg.epochs), desc=f"draft K={K}", unit="epoch", dynamic_ncols=True)
    for epoch in bar:
        order = rng.permutation(len(h_tr))
        losses = [
            learner.train_step(h_tr[order[i : i + cfg.batch_size]], y_tr[order[i : i + cfg.batch_size]])[
                "loss"
            ]
            for i in range(0, len(order), cfg.batch_size)
        ]
        res = learner.validate(h_va, y_va)
        if res.accuracy > best:
            best, best_res = res.accuracy, res
            learner.best_val = best
            learner.save(cfg.out, epoch + 1, res.accuracy, run_config)
        bar.set_postfix(loss=f"{np.mean(losses):.3f}", val_acc=f"{res.accuracy:.3f}")
    bar.close()
    summary = {
        "checkpoint": str(cfg.out),
        "best_val_accuracy": best,
        "val_acc_per_layer": best_res.acc_per_layer,
        "val_layer_exact": best_res.layer_exact,
        "train_frames": int(len(h_tr)),
        "valid_frames": int(len(h_va)),
        "elapsed_s": time.time() - t0,
    }
    cfg.out.with_suffix(".json").write_text(json.dumps(summary, indent=1))
    log.info("K=%d: best val token accuracy %.3f; per layer %s; whole layer %s", K, best,
             [round(a, 3) for a in best_res.acc_per_layer], [round(a, 3) for a in best_res.layer_exact])  # fmt: skip
    return summary


def main(argv: list[str] | None = None) -> None:
    setup_logging("fit_draft")
    cfg = parse_config(FitDraftConfig, argv, prog="python -m evaluator.fit_draft")
    fit(cfg)


if __name__ == "__main__":
    main()
