"""``make retrain ARCHIVE=a.hdf5 [b.hdf5 ...]``: train the draft offline from one or more archives.

Episodes keep the split recorded in each archive (``mask/train`` / ``mask/valid``), so validation is on
whole held-out episodes, the same ones the online trainer held out. Same optimizer, schedule and
checkpoint format (docs/DESIGN.md §5.5) as online training; writes ``draft_best.pt``, ``draft_last.pt``, a
training-curve plot and ``summary.json`` into the run dir.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from common.archive import ArchiveError, archive_meta, check_archive
from common.cli import config_to_dict, parse_config
from common.draft import DEFAULT_FORWARD, FORWARD_HELP, FORWARDS, coarse_targets, load_checkpoint
from common.logs import progress_bar, setup_logging
from common.shapes import RFSQShape
from common.shutdown import stop_on_signals
from trainer.learner import Learner, OptimConfig
from trainer.pairs import load_split
from trainer.plots import plot_curves

log = logging.getLogger("trainer.retrain")


@dataclass
class RetrainConfig:
    """Train the draft from HDF5 archives written by the online trainer."""

    archives: list[Path] = field(default_factory=list, metadata={"help": "archive files (HDF5)"})
    run_dir: Path = field(default=Path("runs/default/retrain"), metadata={"help": "output folder"})
    epochs: int = field(default=20, metadata={"help": "passes over the training episodes"})
    batch_size: int = field(default=32, metadata={"help": "batch size"})
    lr: float = field(default=1e-4, metadata={"help": "AdamW learning rate"})
    weight_decay: float = field(default=1e-5, metadata={"help": "AdamW weight decay"})
    grad_clip: float = field(default=1.0, metadata={"help": "gradient-norm clip"})
    warmup_steps: int = field(default=1000, metadata={"help": "linear warmup updates"})
    draft_hidden_dim: int = field(default=512, metadata={"help": "draft model width"})
    draft_forward: str = field(default=DEFAULT_FORWARD, metadata={"help": FORWARD_HELP, "choices": FORWARDS})
    init_checkpoint: Path | None = field(default=None, metadata={"help": "start from this draft checkpoint"})
    num_coarse_layers: int | None = field(
        default=None, metadata={"help": "layers the draft predicts (none: the archive's K; up to L = 8)"}
    )
    threads: int = field(default=2, metadata={"help": "torch CPU threads"})
    device: str = field(default="auto", metadata={"help": "cpu, cuda or auto"})
    seed: int = field(default=0, metadata={"help": "random seed"})

    def __post_init__(self) -> None:
        self.archives = [Path(a) for a in self.archives]
        if not self.archives:
            raise ValueError("give at least one archive with --archives")
        for a in self.archives:
            if not a.is_file():
                raise ValueError(
                    f"archive {a} does not exist (make train and make demo write archive.hdf5 into their run "
                    "folder; runs/default/latest is the newest)"
                )
            try:
                check_archive(a)
            except ArchiveError as exc:
                raise ValueError(str(exc)) from None
        if self.epochs <= 0 or self.batch_size <= 0:
            raise ValueError(f"epochs ({self.epochs}) and batch_size ({self.batch_size}) must be > 0")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device must be auto, cpu or cuda, got {self.device!r}")
        self.run_dir = Path(self.run_dir)


@dataclass
class Splits:
    """The archives' samples as the trainer split them: hidden [N, D] float32, targets [N, K, S] uint8."""

    h_train: np.ndarray
    y_train: np.ndarray
    train_keys: list[str]  # episode keys ("archive:demo_N")
    h_val: np.ndarray
    y_val: np.ndarray | None  # None: no held-out episodes
    val_keys: list[str]


def archives_shape(cfg: RetrainConfig) -> tuple[RFSQShape, dict[str, Any]]:
    """The archives' common shape (with ``--num-coarse-layers``) and the first archive's attributes;
    ValueError if they disagree on shape or backbone."""
    metas = [archive_meta(a) for a in cfg.archives]
    shapes = {m["shape"] for m in metas}
    backbones = {m["backbone_id"] for m in metas}
    if len(shapes) != 1 or len(backbones) != 1:
        raise ValueError(
            f"archives disagree on shape {shapes} or backbone {backbones}; retrain one backbone at a time"
        )
    shape = RFSQShape(**json.loads(shapes.pop()))
    if cfg.num_coarse_layers is not None:  # deeper drafts (K up to L): the archives hold all L layers
        shape = dataclasses.replace(shape, num_coarse_layers=cfg.num_coarse_layers)
    return shape, metas[0]


def load_splits(cfg: RetrainConfig, k: int) -> Splits:
    h_train, c_train, k_train = load_split(cfg.archives, "train")
    h_val, c_val, k_val = load_split(cfg.archives, "valid")
    if len(h_train) == 0:
        raise ValueError(f"no training samples in {[str(a) for a in cfg.archives]}")
    y_val = coarse_targets(c_val, k) if len(h_val) else None
    return Splits(h_train, coarse_targets(c_train, k), k_train, h_val, y_val, k_val)


def build_learner(cfg: RetrainConfig, shape: RFSQShape, data: Splits, device: torch.device) -> Learner:
    steps_per_epoch = math.ceil(len(data.h_train) / cfg.batch_size)
    optim = OptimConfig(
        lr=cfg.lr,
        weight_decay=cfg.weight_decay,
        grad_clip=cfg.grad_clip,
        warmup_steps=min(cfg.warmup_steps, max(1, steps_per_epoch * cfg.epochs // 10)),
        total_steps=steps_per_epoch * cfg.epochs,
        batch_size=cfg.batch_size,
        draft_hidden_dim=cfg.draft_hidden_dim,
        draft_forward=cfg.draft_forward,
    )
    learner = Learner(data.h_train.shape[1], shape, optim, device=device)
    if cfg.init_checkpoint is not None:
        model, _ = load_checkpoint(cfg.init_checkpoint, map_location=device, forward=cfg.draft_forward)
        learner.model.load_state_dict(model.state_dict())
    return learner


def retrain(cfg: RetrainConfig, stop: threading.Event | None = None) -> dict[str, Any]:
    """Train for ``cfg.epochs`` (or until ``stop`` is set: then the checkpoints of the epochs done are kept)."""
    stop = stop or threading.Event()
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    device = torch.device(
        "cuda"
        if cfg.device == "auto" and torch.cuda.is_available()
        else ("cpu" if cfg.device == "auto" else cfg.device)
    )
    shape, meta = archives_shape(cfg)
    data = load_splits(cfg, shape.num_coarse_layers)
    cfg.run_dir.mkdir(parents=True, exist_ok=True)  # only now: bad input leaves no empty folder behind
    log.info(
        "train: %d samples from %d episodes; validation: %d samples from %d held-out episodes",
        len(data.h_train),
        len(data.train_keys),
        len(data.h_val),
        len(data.val_keys),
    )
    learner = build_learner(cfg, shape, data, device)
    run_config = {
        "run": config_to_dict(cfg),
        "source": "retrain",
        "backbone_id": meta["backbone_id"],
        "codec_sha256": meta["codec_sha256"],
        "train_episodes": len(data.train_keys),
        "valid_episodes": len(data.val_keys),
        "optim": vars(learner.optim),
    }
    t0 = time.time()
    history, best, last_val = _epochs(cfg, learner, data, run_config, rng, stop)
    return _finish(cfg, learner, data, run_config, history, best, last_val, t0)


def _epochs(
    cfg: RetrainConfig,
    learner: Learner,
    data: Splits,
    run_config: dict[str, Any],
    rng: np.random.Generator,
    stop: threading.Event,
) -> tuple[list[dict[str, Any]], float, dict[str, Any] | None]:
    """Shuffled passes, validation and ``draft_best.pt`` after each; returns history, best accuracy
    (-1: none) and the last validation."""
    history: list[dict[str, Any]] = []
    best = -1.0
    last_val = None
    bar = progress_bar(range(cfg.epochs), desc="retrain", unit="epoch", dynamic_ncols=True)
    for epoch in bar:
        order = rng.permutation(len(data.h_train))
        losses = []
        for i in range(0, len(order), cfg.batch_size):
            if stop.is_set():
                break
            idx = order[i : i + cfg.batch_size]
            m = learner.train_step(data.h_train[idx], data.y_train[idx])  # [B, D], [B, K, S]
            losses.append(m["loss"])
        history.append({"updates": learner.updates, "loss": float(np.mean(losses))})
        acc = float("nan")
        if data.y_val is not None:
            r = learner.validate(data.h_val, data.y_val)
            last_val = {
                "updates": learner.updates,
                "epoch": epoch + 1,
                "val_accuracy": r.accuracy,
                "val_acc_per_layer": r.acc_per_layer,
                "val_layer_exact": r.layer_exact,
                "val_loss": r.loss,
            }
            history.append(last_val)
            if r.accuracy > best:
                best = r.accuracy
                learner.best_val = best
                learner.save(cfg.run_dir / "draft_best.pt", epoch + 1, r.accuracy, run_config)
            acc = r.accuracy
        bar.set_postfix(loss=f"{np.mean(losses):.4f}", val_acc=f"{acc:.4f}")
        if stop.is_set():
            log.info("stopped after epoch %d of %d", epoch + 1, cfg.epochs)
            break
    bar.close()
    return history, best, last_val


def _finish(
    cfg: RetrainConfig,
    learner: Learner,
    data: Splits,
    run_config: dict[str, Any],
    history: list[dict[str, Any]],
    best: float,
    last_val: dict[str, Any] | None,
    t0: float,
) -> dict[str, Any]:
    """``draft_last.pt`` (and ``draft_best.pt`` without held-out episodes), curve, ``summary.json``."""
    final_val = last_val["val_accuracy"] if last_val else 0.0
    if last_val is None:
        log.warning("no held-out episodes in the archives: val_accuracy of the checkpoint is 0.0 (unknown)")
    epochs_done = last_val["epoch"] if last_val else cfg.epochs
    learner.save(cfg.run_dir / "draft_last.pt", epochs_done, final_val, run_config)
    if last_val is None:
        learner.save(cfg.run_dir / "draft_best.pt", epochs_done, final_val, run_config)
    plot_curves(history, cfg.run_dir / "training_curve.png", title="draft retraining")
    summary = {
        "train_samples": len(data.h_train),
        "valid_samples": len(data.h_val),
        "train_episodes": len(data.train_keys),
        "valid_episodes": len(data.val_keys),
        "epochs": cfg.epochs,
        "updates": learner.updates,
        "best_val_accuracy": best if best >= 0 else None,
        "last_validation": last_val,
        "elapsed_s": time.time() - t0,
    }
    (cfg.run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    if last_val:
        print(
            f"retrain: best val accuracy {best:.4f}; last per layer {[round(a, 4) for a in last_val['val_acc_per_layer']]}"
        )
    print(
        f"retrain: wrote {cfg.run_dir}/ (draft_best.pt, draft_last.pt, training_curve.png, summary.json); "
        f"evaluate with: make eval CKPT={cfg.run_dir / 'draft_best.pt'}"
    )
    return summary


def main(argv: list[str] | None = None) -> int:
    cfg = parse_config(RetrainConfig, argv, prog="python -m trainer.retrain")
    setup_logging("retrain")
    with stop_on_signals(threading.Event(), log, "finishing the current batch, then saving") as stop:
        try:
            retrain(cfg, stop)
        except (ValueError, ArchiveError) as exc:  # archives that disagree, hold no training samples, ...
            log.error("%s", exc)
            return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
