"""Pack the observations of streamed episodes (producer ``--send-obs``) for a machine without h5py.

    python -m trainer.pack_onpolicy --archives runs/stream_obs/archive.hdf5 --out runs/onpolicy_obs.npz

The policy's own closed-loop states are the states a draft meets at run time. Packed in the layout
of ``trainer.train_vla --pack-to`` (images at the policy's input size, per-episode delta + LZMA, wrist
optionally JPEG), plus what the stream knows about every frame: the policy's own codes, the episode's
task, initial state and outcome. ``trainer.train_vla --onpolicy`` fine-tunes the VLA on them (no expert
labels needed) and ``trainer.fit_draft --observations`` relabels them with any policy.
Trajectories are keyed by (task, initial state) across archives (``trainer.pairs.load_keyed``): of
several copies of one the first with observations is kept.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from common.archive import archive_meta, iter_episodes
from common.cli import parse_config
from common.libero_tasks import instruction
from common.logs import setup_logging
from common.packed import pack
from common.vla.embedded import downsample_images

log = logging.getLogger("trainer.pack_onpolicy")


@dataclass
class PackOnPolicyConfig:
    """Pack streamed observations (producer --send-obs) with the policy's own codes into one .npz."""

    archives: list[Path] = field(metadata={"help": "streamed archives whose episodes carry observations"})
    out: Path = field(metadata={"help": ".npz to write"})
    image_size: int = field(default=64, metadata={"help": "side of the stored images (the policy's input)"})
    jpeg_quality: int = field(default=0, metadata={"help": "JPEG quality of the wrist images (0: lossless)"})
    acting_only: bool = field(
        default=True, metadata={"help": "keep only the acting queries (not the observing ones)"}
    )

    def __post_init__(self) -> None:
        for a in self.archives:
            if not Path(a).is_file():
                raise ValueError(f"archive file {a} does not exist")
        if self.image_size <= 0 or not 0 <= self.jpeg_quality <= 100:
            raise ValueError("image_size must be positive and jpeg_quality in 0..100")


def read_onpolicy(cfg: PackOnPolicyConfig) -> dict[str, Any]:
    """Frames of every archived episode with observations, in the train_vla data layout plus
    ``codes`` [N, T, H, L] uint8, ``init_of_episode``, ``success_of_episode`` [E]."""
    images, proprio, episode, step, codes = [], [], [], [], []
    instr, task, init, success, names = [], [], [], [], []
    seen: set[tuple[str, int, int]] = set()
    backbones, skipped = set(), {"no observations": 0, "duplicate trajectory": 0, "no initial state": 0}
    for path in cfg.archives:
        meta = archive_meta(path)
        backbones.add(str(meta.get("backbone_id")))
        producers = json.loads(meta.get("producers", "{}"))
        for ep in tqdm(iter_episodes(path, with_obs=True), desc=f"read {Path(path).name}", unit="ep"):
            if ep.obs is None or len(ep.hidden) == 0:
                skipped["no observations"] += 1
                continue
            key = ep.init_key(producers)
            if key is None:
                skipped["no initial state"] += 1
                continue
            if key in seen:
                skipped["duplicate trajectory"] += 1
                continue
            seen.add(key)
            keep = np.flatnonzero(ep.acting(producers)) if cfg.acting_only else np.arange(len(ep.hidden))
            e = len(names)
            av = downsample_images(ep.obs["agentview"][keep], cfg.image_size)
            wr = downsample_images(ep.obs["wrist"][keep], cfg.image_size)
            images.append(np.stack([av.numpy(), wr.numpy()], axis=1))  # [n, 2, S, S, 3]
            proprio.append(ep.obs["proprio"][keep].astype(np.float32))
            episode.append(np.full(len(keep), e, np.int64))
            step.append((ep.steps[keep] if ep.steps is not None else keep).astype(np.int64))
            codes.append(ep.codes[keep])
            instr.append(instruction(key[0], key[1]))
            task.append(key[1])
            init.append(key[2])
            success.append(ep.attrs.get("status") == "success")
            names.append(f"{Path(path).name}:{ep.name}")
    if len(backbones) > 1:
        raise ValueError(f"archives of different policies {sorted(backbones)}: pack one policy at a time")
    if not names:
        raise ValueError(f"no episodes with observations in {cfg.archives} (stream with --send-obs)")
    log.info("%d episodes, %d frames; skipped %s", len(names), sum(map(len, episode)), skipped)
    return {
        "images": np.concatenate(images),
        "proprio": np.concatenate(proprio),
        "episode": np.concatenate(episode),
        "step": np.concatenate(step),
        "codes": np.concatenate(codes),
        "instruction_of_episode": np.array(instr),
        "task_of_episode": np.array(task, np.int64),
        "init_of_episode": np.array(init, np.int64),
        "success_of_episode": np.array(success),
        "episode_names": np.array(names),
        "backbone": np.array(next(iter(backbones))),
    }


def main(argv: list[str] | None = None) -> None:
    setup_logging("pack_onpolicy")
    cfg = parse_config(PackOnPolicyConfig, argv, prog="python -m trainer.pack_onpolicy")
    pack(read_onpolicy(cfg), cfg.out, cfg.jpeg_quality)


if __name__ == "__main__":
    main()
