"""Fit the RFSQ action codec on action chunks from demonstration HDF5 files or streamed archives.

    python -m trainer.train_codec --demos data/demos/libero_spatial_expert.hdf5 --out-dir assets/codec
    python -m trainer.train_codec --archives runs/oft/archive.hdf5 \
        --norm-stats CKPT/dataset_statistics.json --out-dir runs/oft/codec      # OpenVLA-OFT's own chunks

From archives the chunks are the backbone's own ([n, T, A] per episode, env convention); with
``--norm-stats`` the normalization is the checkpoint's q01/q99 of ``--unnorm-key`` (arm dimensions; the
binarized gripper keeps [-1, 1]), as the OFT backend sets it, instead of the data's own quantiles.

Reads ``data/demo_*/actions`` ([N, A] per episode, robomimic/LIBERO layout), cuts a chunk of T
actions at every step, holds out whole episodes for validation, trains with quantize dropout and
reports the reconstruction error per number of decoded layers k = 1..L and the per-layer code
entropy on the held-out chunks. Files with episodes that start from a benchmark initial state (the
evaluation set) or do not record their starts are refused unless ``--allow-benchmark-states``. Writes the codec (safetensors + JSON with config, data provenance
and metrics) and a plot of the training curve and of the error per k.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from common.archive import iter_episodes
from common.cli import config_to_dict, parse_config
from common.codec import RFSQCodec, action_chunks, reconstruction_report, save_codec
from common.demos import read_episode_actions
from common.init_states import check_demo_files
from common.logs import setup_logging
from common.shapes import RFSQShape
from common.vla.openvla_oft import fit_codec_to_stats
from trainer.plots import plot_codec_training

log = logging.getLogger("trainer.train_codec")


@dataclass
class CodecTrainConfig:
    """Fit the RFSQ action codec on demonstration action chunks."""

    demos: list[Path] = field(default_factory=list, metadata={"help": "demonstration HDF5 file(s)"})
    archives: list[Path] = field(
        default_factory=list,
        metadata={"help": "streamed archive(s) instead: fit on the backbone's own chunks"},
    )
    norm_stats: Path | None = field(
        default=None, metadata={"help": "a checkpoint's dataset_statistics.json: normalize with its q01/q99"}
    )
    unnorm_key: str = field(default="libero_spatial_no_noops", metadata={"help": "key in --norm-stats"})
    out_dir: Path = field(default=Path("assets/codec"), metadata={"help": "where to write the codec"})
    steps: int = field(default=4000, metadata={"help": "optimizer steps"})
    batch_size: int = field(default=512, metadata={"help": "chunks per step"})
    lr: float = field(default=2e-3, metadata={"help": "AdamW learning rate (cosine decay)"})
    mlp_hidden: int = field(default=64, metadata={"help": "encoder/decoder MLP width"})
    quantize_dropout: float = field(
        default=0.5, metadata={"help": "probability of decoding from a random layer prefix"}
    )
    val_every: int = field(default=10, metadata={"help": "every N-th episode is held out for validation"})
    seed: int = field(default=0, metadata={"help": "random seed"})
    threads: int = field(default=2, metadata={"help": "torch CPU threads"})
    allow_benchmark_states: bool = field(
        default=False,
        metadata={"help": "LEGACY DATA ONLY: also fit on demonstrations that start from benchmark initial "
                  "states (the evaluation set) or do not record their starts (logged loudly)"},
    )  # fmt: skip

    def __post_init__(self) -> None:
        if bool(self.demos) == bool(self.archives):
            raise ValueError("pass either --demos or --archives (one or more HDF5 files)")
        for p in [*self.demos, *self.archives]:
            if not Path(p).is_file():
                raise ValueError(f"file not found: {p}")
        if self.norm_stats is not None and not Path(self.norm_stats).is_file():
            raise ValueError(f"--norm-stats file not found: {self.norm_stats}")
        if self.steps <= 0 or self.batch_size <= 0:
            raise ValueError(f"steps and batch_size must be positive, got {self.steps}, {self.batch_size}")
        if self.val_every < 2:
            raise ValueError(f"val_every must be >= 2, got {self.val_every}")


def load_archive_chunks(paths: list[Path], shape: RFSQShape) -> tuple[list[np.ndarray], str]:
    """Every archived episode's action chunks [n, T, A] (episodes without samples skipped) + data hash."""
    episodes: list[np.ndarray] = []
    digest = hashlib.sha256()
    for path in paths:
        for ep in iter_episodes(path):
            a = np.asarray(ep.actions, np.float32)
            if not len(a):
                continue
            if a.shape[1:] != shape.chunk_shape or not np.isfinite(a).all():
                raise ValueError(f"{path} {ep.name}: actions must be finite {list(shape.chunk_shape)} chunks")
            episodes.append(a)
            digest.update(a.tobytes())
    if not episodes:
        raise ValueError(f"no samples in {[str(p) for p in paths]}")
    return episodes, digest.hexdigest()


def load_norm_bounds(path: Path, key: str) -> dict:
    stats = json.loads(Path(path).read_text())
    if key not in stats or "action" not in stats[key]:
        raise ValueError(f"{path} has no action statistics for {key!r}; it has {sorted(stats)}")
    return stats[key]["action"]


@dataclass
class CodecData:
    """Action chunks split by episode (every ``val_every``-th episode held out), with their provenance."""

    train_chunks: torch.Tensor  # [n, T, A]
    val_chunks: torch.Tensor  # [m, T, A]
    train_episodes: int
    val_episodes: int
    data_hash: str
    init_check: dict


def load_chunks(cfg: CodecTrainConfig, shape: RFSQShape) -> CodecData:
    """The chunks of ``--archives`` (the backbone's own) or of ``--demos`` (cut at every step; files with
    benchmark starts refused unless ``--allow-benchmark-states``)."""
    if cfg.archives:
        # stream archives (e.g. OpenVLA-OFT's): the producer's own episodes; their starts are not recorded
        init_check = {"check": "stream archive: starts not recorded", "counts": {}}
        episodes, data_hash = load_archive_chunks(cfg.archives, shape)
    else:
        init_check = check_demo_files(list(cfg.demos), cfg.allow_benchmark_states)  # refuses benchmark starts
        episodes, data_hash = read_episode_actions(cfg.demos)
    if episodes[0].shape[-1] != shape.action_dim:
        raise ValueError(f"actions have {episodes[0].shape[-1]} dims, the codec expects {shape.action_dim}")

    def chunks(i: int) -> np.ndarray:
        return episodes[i] if cfg.archives else action_chunks(episodes[i], shape.chunk_len)

    val_ids = [i for i in range(len(episodes)) if i % cfg.val_every == cfg.val_every - 1]
    if not val_ids:
        val_ids = [len(episodes) - 1]
    train_ids = [i for i in range(len(episodes)) if i not in set(val_ids)] or val_ids
    train_chunks = torch.from_numpy(np.concatenate([chunks(i) for i in train_ids]))
    val_chunks = torch.from_numpy(np.concatenate([chunks(i) for i in val_ids]))
    log.info(
        "episodes: %d train / %d validation; chunks: %d train / %d validation",
        len(train_ids),
        len(val_ids),
        len(train_chunks),
        len(val_chunks),
    )
    return CodecData(train_chunks, val_chunks, len(train_ids), len(val_ids), data_hash, init_check)


def build_codec(
    cfg: CodecTrainConfig, shape: RFSQShape, train_chunks: torch.Tensor
) -> tuple[RFSQCodec, list[float] | None]:
    """A new codec normalized by ``--norm-stats`` (returns the clamped fraction per dimension too) or by
    the training chunks' own quantiles."""
    codec = RFSQCodec(shape=shape, mlp_hidden=cfg.mlp_hidden, quantize_dropout=cfg.quantize_dropout)
    clamped = None
    if cfg.norm_stats is not None:
        bounds = fit_codec_to_stats(codec, load_norm_bounds(cfg.norm_stats, cfg.unnorm_key))
        clamped = codec.clamped(train_chunks).reshape(-1, shape.action_dim).mean(0).tolist()
        log.info(
            "normalization from %s[%s]: %s; clamped fraction per dim %s",
            cfg.norm_stats,
            cfg.unnorm_key,
            bounds,
            clamped,
        )
    else:
        codec.set_normalization(train_chunks[:, 0])
    return codec, clamped


def fit_codec(cfg: CodecTrainConfig, codec: RFSQCodec, train_chunks: torch.Tensor) -> list[tuple[int, float]]:
    """AdamW with cosine decay and quantize dropout; returns the training curve (step, loss)."""
    opt = torch.optim.AdamW(codec.parameters(), lr=cfg.lr, weight_decay=1e-5)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, cfg.steps) / cfg.steps))
    )
    curve: list[tuple[int, float]] = []
    gen = torch.Generator().manual_seed(cfg.seed)
    codec.train()
    bar = tqdm(range(cfg.steps), desc="codec", unit="step", dynamic_ncols=True)
    for step in bar:
        idx = torch.randint(0, len(train_chunks), (cfg.batch_size,), generator=gen)
        loss = codec.loss(train_chunks[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 50 == 0 or step == cfg.steps - 1:
            curve.append((step, float(loss)))
            bar.set_postfix(loss=f"{float(loss):.2e}")
    codec.eval()
    return curve


def train(cfg: CodecTrainConfig) -> dict:
    torch.manual_seed(cfg.seed)
    torch.set_num_threads(cfg.threads)
    shape = RFSQShape()
    data = load_chunks(cfg, shape)
    codec, clamped = build_codec(cfg, shape, data.train_chunks)
    t0 = time.time()
    curve = fit_codec(cfg, codec, data.train_chunks)
    report = reconstruction_report(codec, data.val_chunks)
    report_train = reconstruction_report(codec, data.train_chunks[: min(len(data.train_chunks), 20000)])
    metrics = {
        "validation": report,
        "train_subset": {k: report_train[k] for k in ("mse_norm", "layer_entropy_bits")},
        "train_seconds": round(time.time() - t0, 1),
        "final_train_loss": curve[-1][1],
    }
    extra = {
        "trained_on": {
            "files": [str(p) for p in [*cfg.demos, *cfg.archives]],
            "normalization": str(cfg.norm_stats or "data quantiles"),
            "clamped_fraction_per_dim": clamped,
            "data_sha256": data.data_hash,
            "episodes_train": data.train_episodes,
            "episodes_validation": data.val_episodes,
            "chunks_train": len(data.train_chunks),
            "init_check": data.init_check["check"],
            "init_sources": data.init_check["counts"],
        },
        "train_config": config_to_dict(cfg),
        "metrics": metrics,
    }
    out = save_codec(codec, cfg.out_dir, extra=extra)
    plot_codec_training(curve, report, out / "codec_training.png")
    log.info(
        "validation MSE (normalized) per k=1..%d: %s",
        shape.num_layers,
        ["%.2e" % v for v in report["mse_norm"]],
    )
    log.info(
        "per-layer code entropy (bits, max %.2f): %s",
        report["max_entropy_bits"],
        ["%.2f" % v for v in report["layer_entropy_bits"]],
    )
    log.info("codec written to %s (sha256 %s)", out, codec.sha256[:16])
    return {"out_dir": str(out), "sha256": codec.sha256, **metrics}


def main(argv: list[str] | None = None) -> None:
    setup_logging("train-codec")
    cfg = parse_config(CodecTrainConfig, argv)
    result = train(cfg)
    print(json.dumps({k: result[k] for k in ("out_dir", "sha256")}, indent=2))


if __name__ == "__main__":
    main()
