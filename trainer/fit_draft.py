"""Fit a draft of any depth K offline on a policy's own (hidden state, codes) over demonstration frames.

    python -m trainer.fit_draft --demos data/demos/libero_spatial_expert.hdf5 --num-coarse-layers 3 \
        --out runs/drafts/draft_k3.pt
    # on a GPU machine without h5py: pack once with `python -m trainer.train_vla --demos FILE
    # --pack-to packed.npz --jpeg-quality 0`, then
    python -m trainer.fit_draft --packed packed.npz --augment 16 --device cuda --epochs 60 \
        --batch-size 256 --out runs/drafts/draft_k3.pt

The streaming pipeline (`make produce` + `make train`) trains the draft on the policy's own closed-loop
states; this command is the offline route (knowledge distillation from the policy into the draft) used
for deeper drafts (K up to L = 8) and when no streamed archive exists: every demonstration frame is
run through the policy's baseline decoding (prefix pass + L block passes, batched), and the draft learns
to map the prefix hidden state to the policy's own first K layers. ``--augment N`` adds N randomly
shifted views of every *training* frame (the shift augmentation the VLA was trained with), each run
through the policy for its own hidden state and codes: more distillation pairs from the same
demonstrations. Validation is on whole held-out demonstrations, never augmented. Same model, loss,
optimizer and checkpoint format as the trainer (trainer/learner.py, docs/DESIGN.md §5). The pairs
(demonstrations, closed-loop frames, streamed archives) are assembled in :mod:`trainer.distill_pairs`.
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

import numpy as np
import torch
from tqdm import tqdm

from common.cli import config_to_dict, parse_config
from common.draft import (
    DEFAULT_FORWARD,
    FORWARD_HELP,
    FORWARDS,
    coarse_targets,
    draft_loss,
    load_checkpoint,
)
from common.logs import setup_logging
from common.policy import LayerwisePolicy
from common.schedule import INIT_STATES, parse_range
from common.shapes import RFSQShape
from common.vla import load_policy
from trainer.distill_pairs import (
    Pairs,
    add_archives,
    add_observations,
    demo_split,
    extract,
    extract_demos,
    load_frames,
)
from trainer.learner import Learner, OptimConfig

log = logging.getLogger("trainer.fit_draft")

SOURCE = "trainer.fit_draft (offline, the policy's own codes on demonstration frames)"


@dataclass
class FitDraftConfig:
    """Fit a draft (any K) on the policy's own hidden states and codes over demonstration frames."""

    out: Path = field(metadata={"help": "draft checkpoint to write"})
    demos: list[Path] = field(
        default_factory=list, metadata={"help": "demonstration HDF5 files (producer/demos.py layout)"}
    )
    packed: Path | None = field(
        default=None,
        metadata={"help": "packed demonstrations (.npz of `trainer.train_vla --pack-to`) instead of --demos"},
    )
    archives: list[Path] = field(
        default_factory=list,
        metadata={"help": "streamed archives (`make train`) of the same policy: their training episodes join "
                  "the pairs and their held-out episodes (on-policy states) become the validation set"},
    )  # fmt: skip
    observations: Path | None = field(
        default=None,
        metadata={"help": "closed-loop frames (.npz of `trainer.pack_onpolicy`), relabeled by this policy: "
                  "training pairs, except the episodes of --val-inits (the validation set when no "
                  "--archives are given)"},
    )  # fmt: skip
    val_inits: str = field(
        default="",
        metadata={"help": "hold out the on-policy episodes starting from these initial states (for example "
                  "40-49) instead of the trainer's split, in --archives and --observations alike"},
    )  # fmt: skip
    weights_dir: Path | None = field(default=None, metadata={"help": "embedded VLA weights (none: assets)"})
    codec_dir: Path | None = field(default=None, metadata={"help": "RFSQ codec (none: assets/codec)"})
    num_coarse_layers: int = field(default=3, metadata={"help": "K: layers the draft predicts (1..8)"})
    frame_stride: int = field(default=1, metadata={"help": "use every n-th frame of each demonstration"})
    allow_benchmark_states: bool = field(
        default=False,
        metadata={"help": "LEGACY DATA ONLY: also fit on demonstrations that start from benchmark initial "
                  "states (the evaluation set) or do not record their starts (logged loudly)"},
    )  # fmt: skip
    val_fraction: float = field(default=0.15, metadata={"help": "fraction of demonstrations held out"})
    augment: int = field(
        default=0, metadata={"help": "extra randomly shifted views of every training frame (0: none)"}
    )
    shift: int = field(default=4, metadata={"help": "largest shift of an augmented view, in pixels"})
    epochs: int = field(default=40, metadata={"help": "passes over the training pairs"})
    batch_size: int = field(default=64, metadata={"help": "batch size"})
    lr: float = field(default=3e-4, metadata={"help": "AdamW learning rate"})
    draft_hidden_dim: int = field(default=512, metadata={"help": "draft model width"})
    draft_forward: str = field(default=DEFAULT_FORWARD, metadata={"help": FORWARD_HELP, "choices": FORWARDS})
    extract_batch: int = field(default=64, metadata={"help": "frames per batched policy pass"})
    device: str = field(default="auto", metadata={"help": "torch device: auto (cuda if present), cpu, cuda"})
    cache: Path | None = field(default=None, metadata={"help": "npz cache of extracted (hidden, codes)"})
    soft_weight: float = field(
        default=0.0,
        metadata={
            "help": "weight of the policy's own token probabilities in the loss (knowledge distillation)"
        },
    )
    bf16: bool = field(default=True, metadata={"help": "bfloat16 autocast on CUDA"})
    slim: bool = field(
        default=False,
        metadata={"help": "write the checkpoint without optimizer state (inference only, 3x smaller)"},
    )
    evaluate: Path | None = field(
        default=None,
        metadata={"help": "only score this draft checkpoint on its held-out demonstrations, decoded on this "
                  "machine; writes the figures to --out (JSON)"},
    )  # fmt: skip
    threads: int = field(default=2, metadata={"help": "torch CPU threads"})
    seed: int = field(default=0, metadata={"help": "random seed"})

    def __post_init__(self) -> None:
        if not 1 <= self.num_coarse_layers <= 8:
            raise ValueError(f"num_coarse_layers must be in 1..8, got {self.num_coarse_layers}")
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1), got {self.val_fraction}")
        if min(self.frame_stride, self.epochs, self.batch_size, self.extract_batch) < 1:
            raise ValueError("frame_stride, epochs, batch_size and extract_batch must be >= 1")
        if self.augment < 0 or self.shift < 0:
            raise ValueError("augment and shift must be >= 0")
        if not 0.0 <= self.soft_weight <= 1.0:
            raise ValueError(f"soft_weight must be in [0, 1], got {self.soft_weight}")
        if bool(self.demos) == (self.packed is not None):
            raise ValueError("give either --demos (HDF5) or --packed (npz), not both or neither")
        for what, files in (("demonstration", [*self.demos, *([self.packed] if self.packed else [])]),
                            ("archive", self.archives)):  # fmt: skip
            for d in files:
                if not Path(d).is_file():
                    raise ValueError(f"{what} file {d} does not exist")
        if self.observations is not None and not Path(self.observations).is_file():
            raise ValueError(f"observations file {self.observations} does not exist")
        if self.val_inits:
            parse_range(self.val_inits, INIT_STATES, "initial state")
        if self.evaluate is not None and not Path(self.evaluate).is_file():
            raise ValueError(f"draft checkpoint {self.evaluate} does not exist")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ValueError(f"device must be auto, cpu or cuda[:n], got {self.device!r}")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device cuda given but torch sees no CUDA device")
    return torch.device(name)


def load_layerwise_policy(cfg: FitDraftConfig, device: torch.device) -> LayerwisePolicy:
    """The embedded VLA (``--weights-dir``, ``--codec-dir``; shipped assets by default), never random."""
    policy = load_policy(
        "embedded",
        device=str(device),
        weights_dir=str(cfg.weights_dir) if cfg.weights_dir else None,
        codec_dir=str(cfg.codec_dir) if cfg.codec_dir else None,
    )
    if not isinstance(policy, LayerwisePolicy):
        raise ValueError(
            "policy 'embedded' does not decode layer by layer; distillation needs a LayerwisePolicy"
        )
    return policy


def evaluate(cfg: FitDraftConfig, policy: LayerwisePolicy, device: torch.device) -> dict[str, Any]:
    """Token accuracy per layer of a draft on the held-out demonstrations named in its checkpoint, with
    the codes decoded by the policy on this machine (for example a draft fitted on a GPU, scored on
    the CPU the evaluator runs on)."""
    model, ckpt = load_checkpoint(cfg.evaluate, map_location=device, forward=cfg.draft_forward)
    names = ckpt["config"].get("valid_episodes")
    if not names:
        raise ValueError(
            f"{cfg.evaluate} names no held-out demonstrations (not written by trainer.fit_draft)"
        )
    if ckpt["config"].get("backbone_id") != policy.backbone_id:
        raise ValueError(
            f"{cfg.evaluate} was fitted on {ckpt['config'].get('backbone_id')}, not {policy.backbone_id}"
        )
    data = load_frames(cfg, policy.model.config.image_size)
    known = [str(n) for n in data["episode_names"]]
    missing = sorted(set(names) - set(known))
    if missing:
        raise ValueError(f"held-out demonstrations {missing[:3]} are not in the given demonstration file")
    rows = np.flatnonzero(np.isin(data["episode"], [known.index(n) for n in names]))
    hidden, codes, _ = extract(policy, data, rows, batch=cfg.extract_batch, desc="held-out frames")
    K = model.num_coarse_layers
    y = torch.from_numpy(coarse_targets(codes, K)).long()  # [N, K, S]
    with torch.no_grad():
        logits = torch.cat([model(torch.from_numpy(hidden[i : i + 256]).to(device)).cpu()
                            for i in range(0, len(hidden), 256)])  # fmt: skip
        _, m = draft_loss(logits, y)
    out = {
        "checkpoint": str(cfg.evaluate),
        "decoded_on": str(device),
        "valid_frames": int(len(rows)),
        "valid_episodes": len(names),
        "val_accuracy": m["accuracy"],
        "val_acc_per_layer": m["acc_per_layer"],
        "val_layer_exact": m["layer_exact"],
        "checkpoint_val_accuracy": float(ckpt["val_accuracy"]),
    }
    cfg.out.parent.mkdir(parents=True, exist_ok=True)
    cfg.out.write_text(json.dumps(out, indent=1))
    log.info("%s on %d held-out frames decoded on %s: token accuracy %.3f, per layer %s, whole layer %s",
             cfg.evaluate, len(rows), device, out["val_accuracy"],
             [round(a, 3) for a in out["val_acc_per_layer"]], [round(a, 3) for a in out["val_layer_exact"]])  # fmt: skip
    return out


def fit(cfg: FitDraftConfig) -> dict[str, Any]:
    """Extract the pairs, fit the draft, write the best checkpoint ``cfg.out`` and its summary (.json);
    with ``--evaluate`` only score a checkpoint (:func:`evaluate`)."""
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    device = resolve_device(cfg.device)
    if device.type == "cuda":  # full fp32 matmuls: the policy's codes must match its CPU decoding
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    policy = load_layerwise_policy(cfg, device)
    if cfg.evaluate is not None:
        return evaluate(cfg, policy, device)
    t0 = time.time()
    K = cfg.num_coarse_layers
    soft_layers = K if cfg.soft_weight > 0 else 0
    ex, val_eps = extract_demos(cfg, policy, device, rng, soft_layers)
    extract_s = time.time() - t0
    pairs = demo_split(ex, val_eps, K)
    val_inits = set(parse_range(cfg.val_inits, INIT_STATES, "initial state")) if cfg.val_inits else None
    if cfg.observations is not None:  # closed-loop frames, relabeled by this policy
        add_observations(cfg, policy, pairs, K, soft_layers, val_inits)
    if cfg.archives:  # on-policy pairs streamed by the producer: train on them, validate on their held-out
        add_archives(cfg, policy, pairs, K, val_inits)
    log.info(
        "pairs: %d train (%d demonstration frames x %d views + %d streamed); validation: %d %s; "
        "extraction %.0f s on %s",
        len(pairs.h_tr), pairs.demo_train_frames, cfg.augment + 1, pairs.n_streamed, len(pairs.h_va),
        "held-out streamed samples" if cfg.archives
        else "held-out on-policy frames" if cfg.observations else f"frames of {len(val_eps)} held-out demonstrations",
        extract_s, device,
    )  # fmt: skip
    shape = dataclasses.replace(policy.shape, num_coarse_layers=K)
    valid_episodes = [ex.names[i] for i in val_eps]
    learner, run_config = _learner(cfg, policy, shape, pairs, valid_episodes, device)
    t1 = time.time()
    best, history = _train(cfg, learner, run_config, pairs, rng)
    summary = _summary(cfg, device, best, pairs, extract_s, time.time() - t1, history)
    cfg.out.with_suffix(".json").write_text(json.dumps(summary, indent=1))
    log.info("K=%d: best val token accuracy %.3f; per layer %s; whole layer %s", K, summary["best_val_accuracy"],
             [round(a, 3) for a in summary["val_acc_per_layer"]], [round(a, 3) for a in summary["val_layer_exact"]])  # fmt: skip
    return summary


def _learner(
    cfg: FitDraftConfig,
    policy: LayerwisePolicy,
    shape: RFSQShape,
    pairs: Pairs,
    valid_episodes: list[str],
    device: torch.device,
) -> tuple[Learner, dict[str, Any]]:
    """The draft learner (schedule over ``cfg.epochs`` passes) and what its checkpoints record."""
    steps = math.ceil(len(pairs.h_tr) / cfg.batch_size) * cfg.epochs
    optim = OptimConfig(
        lr=cfg.lr,
        warmup_steps=max(1, steps // 20),
        total_steps=steps,
        batch_size=cfg.batch_size,
        draft_hidden_dim=cfg.draft_hidden_dim,
        draft_forward=cfg.draft_forward,
    )
    learner = Learner(pairs.h_tr.shape[1], shape, optim, device=device)
    learner.autocast = learner.autocast and cfg.bf16
    run_config = {
        "run": config_to_dict(cfg),
        "source": SOURCE,
        "backbone_id": policy.backbone_id,
        "train_pairs": int(len(pairs.h_tr)),
        "valid_frames": int(len(pairs.h_va)),
        "valid_episodes": valid_episodes,
        "archives": [str(a) for a in cfg.archives],
        "streamed_train_pairs": pairs.n_streamed,
        "observations": str(cfg.observations) if cfg.observations else None,
        "observed_train_pairs": pairs.n_observed,
        "optim": vars(optim),
    }
    return learner, run_config


@dataclass
class Best:
    accuracy: float = -1.0
    epoch: int = 0
    result: Any = None  # trainer.learner.ValResult of the best epoch


def _train(
    cfg: FitDraftConfig, learner: Learner, run_config: dict[str, Any], pairs: Pairs, rng: np.random.Generator
) -> tuple[Best, list[dict[str, Any]]]:
    """``cfg.epochs`` shuffled passes; validate after each, save ``cfg.out`` whenever the accuracy improves."""
    best = Best()
    history: list[dict[str, Any]] = []
    bar = tqdm(range(cfg.epochs), desc=f"draft K={cfg.num_coarse_layers}", unit="epoch", dynamic_ncols=True)
    for epoch in bar:
        order = rng.permutation(len(pairs.h_tr))
        losses = []
        for i in range(0, len(order), cfg.batch_size):
            b = order[i : i + cfg.batch_size]
            s_b = pairs.s_tr[b] if pairs.s_tr is not None else None
            r = learner.train_step(pairs.h_tr[b], pairs.y_tr[b], s_b, cfg.soft_weight)
            losses.append(r["loss"])
        res = learner.validate(pairs.h_va, pairs.y_va)
        history.append(_epoch_record(learner, pairs, epoch, losses, res))
        if res.accuracy > best.accuracy:
            best = Best(res.accuracy, epoch + 1, res)
            learner.best_val = best.accuracy
            learner.save(cfg.out, epoch + 1, res.accuracy, run_config, optimizer_state=not cfg.slim)
        bar.set_postfix(loss=f"{np.mean(losses):.3f}", val_acc=f"{res.accuracy:.3f}")
    bar.close()
    return best, history


def _epoch_record(
    learner: Learner, pairs: Pairs, epoch: int, losses: list[float], res: Any
) -> dict[str, Any]:
    """One epoch of the history: losses, the validation set's accuracy per layer, and the other held-out sets."""
    rec: dict[str, Any] = {"epoch": epoch + 1, "train_loss": float(np.mean(losses)), "val_loss": res.loss,
                           "val_acc_per_layer": res.acc_per_layer}  # fmt: skip
    if pairs.h_va is not pairs.h_demo_va:  # the held-out demonstrations too, for demonstration-only fits
        rec["demo_val_acc_per_layer"] = learner.validate(pairs.h_demo_va, pairs.y_demo_va).acc_per_layer
    if pairs.h_all_va is not None:
        rec["val_all_queries_acc_per_layer"] = learner.validate(pairs.h_all_va, pairs.y_all_va).acc_per_layer
    if pairs.per_archive_va:
        rec["val_per_archive_acc_per_layer"] = {
            a: learner.validate(h, yy).acc_per_layer for a, (h, yy) in pairs.per_archive_va.items()
        }
    return rec


def _summary(
    cfg: FitDraftConfig,
    device: torch.device,
    best: Best,
    pairs: Pairs,
    extract_s: float,
    train_s: float,
    history: list[dict[str, Any]],
) -> dict[str, Any]:
    return {
        "checkpoint": str(cfg.out),
        "device": str(device),
        "best_val_accuracy": best.accuracy,
        "best_epoch": best.epoch,
        "val_acc_per_layer": best.result.acc_per_layer,
        "val_layer_exact": best.result.layer_exact,
        "train_pairs": int(len(pairs.h_tr)),
        "augment": cfg.augment,
        "valid_frames": int(len(pairs.h_va)),
        "validation": "held-out streamed episodes"
        if cfg.archives
        else "held-out on-policy frames"
        if cfg.observations
        else "held-out demonstrations",
        "val_inits": cfg.val_inits,
        "streamed_train_pairs": pairs.n_streamed,
        "observed_train_pairs": pairs.n_observed,
        "extract_s": extract_s,
        "train_s": train_s,
        "history": history,
    }


def main(argv: list[str] | None = None) -> None:
    setup_logging("fit_draft")
    cfg = parse_config(FitDraftConfig, argv, prog="python -m trainer.fit_draft")
    fit(cfg)


if __name__ == "__main__":
    main()
