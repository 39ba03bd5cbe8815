"""Training data of VLA behaviour cloning: the demonstration frames (HDF5 through :mod:`common.demos` or
packed through :mod:`common.packed`) with their target codes and held-out episodes, the policy's own
on-policy frames, and augmented batches on the training device."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from common.codec import RFSQCodec, action_chunks
from common.demos import read_demos
from common.init_states import require_checked
from common.packed import unpack
from common.schedule import INIT_STATES, parse_range
from common.vla.embedded import EmbeddedVLA
from trainer.vla_config import VLATrainConfig

log = logging.getLogger(__name__)


def load_frames(cfg: VLATrainConfig) -> dict[str, Any]:
    """The demonstration frames of ``cfg``: the packed file, or the HDF5 files (leak-checked on reading)."""
    if cfg.packed is not None:
        return unpack(cfg.packed)
    return read_demos(cfg.demos, cfg.image_size, cfg.frame_stride, cfg.allow_benchmark_states)


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


@dataclass
class DemoTargets:
    """What behaviour cloning learns from the demonstration frames, and which frames it holds out."""

    chunks: np.ndarray  # [N, T, A] action chunk of every frame
    codes: torch.Tensor  # [N, T, H, L] uint8: the codec's codes of the chunks
    train_mask: np.ndarray  # [N] bool
    val_mask: np.ndarray  # [N] bool: frames of every ``val_every``-th episode (the codec's split)
    num_episodes: int
    num_val_episodes: int


def demo_targets(data: dict[str, Any], codec: RFSQCodec, val_every: int) -> DemoTargets:
    """Chunk targets and their codes for every frame; whole episodes held out."""
    chunks = frame_chunks(data, codec.shape.chunk_len)  # [N, T, A]
    with torch.no_grad():
        codes = torch.cat([codec.encode(torch.from_numpy(c)) for c in np.array_split(chunks, 64)]).to(
            torch.uint8
        )
    ep_ids = np.arange(len(data["episode_names"]))
    val_eps = ep_ids[ep_ids % val_every == val_every - 1]
    if len(val_eps) == 0:
        raise ValueError(
            f"{len(ep_ids)} demonstration episode(s): none is held out with --val-every {val_every} (every "
            f"{val_every}th episode is); record more episodes or lower --val-every (at least 2)"
        )
    val_mask = np.isin(data["episode"], val_eps)
    train_mask = ~val_mask
    log.info(
        "%d frames: %d train, %d held out (%d episodes)",
        len(val_mask),
        train_mask.sum(),
        val_mask.sum(),
        len(val_eps),
    )
    return DemoTargets(chunks, codes, train_mask, val_mask, len(ep_ids), len(val_eps))


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


@dataclass
class OnPolicyFrames:
    """The policy's own closed-loop frames (``trainer.pack_onpolicy``), split by initial state."""

    batches: Batches
    train_idx: torch.Tensor  # [n] frame rows trained on
    val_idx: torch.Tensor  # [m] frame rows of held-out initial states
    init_check: str  # the leak check's outcome (``common.init_states.require_checked``)


def load_onpolicy(cfg: VLATrainConfig, model: EmbeddedVLA, device: torch.device) -> OnPolicyFrames:
    """Read ``cfg.onpolicy``; refuse frames without a passed leak check unless explicitly allowed."""
    on = unpack(cfg.onpolicy)
    init_check = require_checked(
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
    frames = OnPolicyFrames(
        Batches(on, torch.from_numpy(on["codes"]), model, device),
        torch.from_numpy(np.flatnonzero(~on_val_mask)).to(device),
        torch.from_numpy(np.flatnonzero(on_val_mask)).to(device),
        init_check,
    )
    log.info("on-policy frames of %s (policy %s): %d train, %d held out (initial states %s)",
             cfg.onpolicy, on["backbone"], len(frames.train_idx), len(frames.val_idx), cfg.onpolicy_val_inits)  # fmt: skip
    if len(frames.train_idx) == 0:
        raise ValueError(f"{cfg.onpolicy}: every episode starts from a held-out initial state")
    return frames
