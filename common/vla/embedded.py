"""The embedded VLA backend (docs/DESIGN.md §6.3): the policy, its files, and how the registry loads it.

* :class:`EmbeddedVLAPolicy` — the :class:`~common.policy.LayerwisePolicy` around the network of
  :mod:`common.vla.embedded_model` (re-exported here: ``EmbeddedVLA``, ``EmbeddedVLAConfig``, the image
  helpers and the block attention mask) and an RFSQ codec;
* :func:`save_embedded_vla` / :func:`load_embedded_vla` — ``config.json`` + ``model.safetensors``
  (DESIGN §8.4); ``backbone_id = embedded-vla@<first 12 hex of the weights' sha256>``;
* :func:`load_embedded` — what ``common.vla.load_policy("embedded", …)`` runs: the trained weights
  and the codec they were trained with, never random weights unless asked for (``allow_random``:
  plumbing tests; ``random_weights``: the random-weight baseline of closed-loop evaluations).
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from transformers import DynamicCache

from common.codec import RFSQCodec, load_codec
from common.policy import LayerwisePolicy, Observation, PolicyOutput, PrefixState
from common.vla.embedded_model import (
    NUM_CAMERAS,
    EmbeddedVLA,
    EmbeddedVLAConfig,
    block_attention_mask,
    downsample_images,
    normalize_images,
)
from common.vla.paths import DEFAULT_CODEC_DIR, DEFAULT_EMBEDDED_DIR

__all__ = [
    "CONFIG_FILE",
    "NUM_CAMERAS",
    "WEIGHTS_FILE",
    "EmbeddedVLA",
    "EmbeddedVLAConfig",
    "EmbeddedVLAPolicy",
    "block_attention_mask",
    "crop_cache",
    "downsample_images",
    "file_sha256",
    "load_embedded",
    "load_embedded_vla",
    "normalize_images",
    "save_embedded_vla",
]

log = logging.getLogger(__name__)

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"


def crop_cache(cache: DynamicCache, length: int) -> None:
    """Keep the first ``length`` positions of every layer of ``cache``."""
    remove = cache.get_seq_length() - length
    if remove < 0:
        raise ValueError(f"cannot crop a cache of {cache.get_seq_length()} positions to {length}")
    if remove:
        cache.crop(-remove)  # negative = number of positions to drop (accepted by old and new versions)


class EmbeddedVLAPolicy(LayerwisePolicy):
    """:class:`LayerwisePolicy` around :class:`EmbeddedVLA` and an RFSQ codec."""

    def __init__(
        self, model: EmbeddedVLA, codec: Any, device: str | torch.device = "cpu", backbone_id: str = ""
    ):
        self.model = model.to(device).eval()
        self.codec = codec.to(device).eval() if hasattr(codec, "to") else codec
        self.device = torch.device(device)
        self.shape = model.shape
        self.hidden_dim = model.config.hidden_size
        self.backbone_id = backbone_id or "embedded-vla@untrained"
        self.decode_layers = model.config.decode_layers

    # ------------------------------------------------------------------ inputs
    def encode_observations(self, observations: list[Observation]) -> dict[str, torch.Tensor]:
        """Observations -> model inputs (images [B,2,3,S,S], proprio [B,8], text ids/valid [B,Lt])."""
        if not observations:
            raise ValueError("act/prefix needs at least one observation")
        size = self.model.config.image_size
        cams = []
        for obs in observations:
            for name in ("agentview", "wrist"):
                img = np.asarray(getattr(obs, name))
                if img.ndim != 3 or img.shape[-1] != 3 or img.dtype != np.uint8:
                    raise ValueError(
                        f"Observation.{name} must be [h, w, 3] uint8, got {img.shape} {img.dtype}"
                    )
            cams.append(downsample_images(np.stack([obs.agentview, obs.wrist]), size))  # [2, S, S, 3]
        dtype = self.model.queries.dtype
        images = normalize_images(torch.stack(cams).to(self.device)).to(dtype)  # [B, 2, 3, S, S]
        proprio = torch.as_tensor(np.stack([np.asarray(o.proprio, np.float32) for o in observations]))
        if proprio.shape[1] != self.model.config.proprio_dim:
            raise ValueError(
                f"proprio must have {self.model.config.proprio_dim} values, got {proprio.shape[1]}"
            )
        ids, valid = self.model.tokenize([o.instruction for o in observations], self.device)
        return {
            "images": images,
            "proprio": proprio.to(self.device, dtype),
            "text_ids": ids,
            "text_valid": valid,
        }

    # ------------------------------------------------------------------ LayerwisePolicy
    @torch.inference_mode()
    def prefix(self, observations: list[Observation]) -> PrefixState:
        return self.model.prefix_pass(**self.encode_observations(observations))

    @torch.inference_mode()
    def decode_block(self, state: PrefixState, prev_codes: torch.Tensor | None) -> torch.Tensor:
        layer = state.num_blocks
        if layer >= self.shape.num_layers:
            raise ValueError(f"all {self.shape.num_layers} layers are already decoded")
        b = state.hidden.shape[0]
        emb = self.model.embed_block(layer, None if layer == 0 else prev_codes.to(self.device).long(), b)
        return self.model.blocks_pass(state, emb, [layer])[:, 0]  # [B, T, H, G]

    @torch.inference_mode()
    def verify(self, state: PrefixState, drafted: torch.Tensor) -> torch.Tensor:
        if state.num_blocks != 0:
            raise ValueError(f"verify needs a state right after the prefix, got {state.num_blocks} blocks")
        k = drafted.shape[1]
        if not 0 <= k < self.shape.num_layers:
            raise ValueError(f"can verify 0..{self.shape.num_layers - 1} drafted layers, got {k}")
        b = state.hidden.shape[0]
        drafted = drafted.to(self.device).long()  # [B, k, T, H]
        m = self.model
        parts = [m.embed_block(0, None, b)[:, None]]  # [B, 1, T, D]
        if k:
            layers = torch.arange(1, k + 1, device=self.device)
            parts.append(
                m.embed_codes(drafted) + m.layer_emb[layers][None, :, None] + m.step_emb
            )  # [B, k, T, D]
        emb = torch.cat(parts, dim=1).flatten(1, 2)  # [B, (k+1)*W, D]
        return m.blocks_pass(state, emb, list(range(k + 1)))  # [B, k+1, T, H, G]

    def truncate(self, state: PrefixState, num_blocks: int) -> None:
        if not 0 <= num_blocks <= state.num_blocks:
            raise ValueError(f"num_blocks must be in 0..{state.num_blocks}, got {num_blocks}")
        crop_cache(state.cache, state.prefix_len + num_blocks * self.shape.chunk_len)
        state.num_blocks = num_blocks

    @torch.inference_mode()
    def codes_to_actions(self, codes: torch.Tensor) -> torch.Tensor:
        """[B, T, H, L] long -> [B, T, A] float: codec decode, clipped to [-1, 1], gripper to ±1."""
        actions = self.codec.decode(codes.to(self.device).long()).float().clamp(-1.0, 1.0)  # [B, T, A]
        grip = torch.where(actions[..., -1] > 0, 1.0, -1.0)
        return torch.cat([actions[..., :-1], grip[..., None]], dim=-1)

    # ------------------------------------------------------------------ ChunkPolicy
    @torch.inference_mode()
    def act(self, observations: list[Observation]) -> list[PolicyOutput]:
        state = self.prefix(observations)
        codes = self.decode_sequential(state)  # [B, T, H, L]
        actions = self.codes_to_actions(codes)  # [B, T, A]
        hidden = state.hidden.float().cpu().numpy()
        codes_np = codes.to(torch.uint8).cpu().numpy()
        actions_np = actions.cpu().numpy().astype(np.float32)
        return [
            PolicyOutput(hidden=hidden[i], codes=codes_np[i], actions=actions_np[i])
            for i in range(len(observations))
        ]


# --------------------------------------------------------------------------------------- files
def save_embedded_vla(
    model: EmbeddedVLA,
    out_dir: str | Path,
    extra: dict[str, Any] | None = None,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """Write ``config.json`` and ``model.safetensors`` into ``out_dir``.

    Floating-point tensors are stored as ``dtype`` (float16 halves the file; loading casts back to
    float32, and the shipped figures are measured with the weights as loaded).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {
        k: (v.detach().to(dtype) if v.is_floating_point() else v.detach()).cpu().contiguous()
        for k, v in model.state_dict().items()
    }
    save_file(state, str(out / WEIGHTS_FILE))
    meta = {"model": model.config.to_dict(), **(extra or {})}
    (out / CONFIG_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True))
    return out / WEIGHTS_FILE


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load_embedded_vla(weights_dir: str | Path) -> tuple[EmbeddedVLA, dict[str, Any]]:
    """Rebuild the model from ``config.json`` and load ``model.safetensors``; returns (model, meta)."""
    d = Path(weights_dir)
    cfg_path, w_path = d / CONFIG_FILE, d / WEIGHTS_FILE
    if not cfg_path.is_file() or not w_path.is_file():
        raise FileNotFoundError(
            f"no trained embedded VLA in {d} (expected {CONFIG_FILE} and {WEIGHTS_FILE}); train one with "
            "`python -m trainer.train_vla --demos FILE --out-dir DIR`, or pass allow_random=True for "
            "plumbing tests only"
        )
    meta = json.loads(cfg_path.read_text())
    model = EmbeddedVLA(EmbeddedVLAConfig.from_dict(meta["model"]))
    state = load_file(str(w_path))
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()})
    meta["weights_sha256"] = file_sha256(w_path)
    return model, meta


# --------------------------------------------------------------------------------------- the registry's loader
def load_embedded(
    device: str | torch.device = "cpu",
    weights_dir: str | Path | None = None,
    codec_dir: str | Path | None = None,
    allow_random: bool = False,
    random_weights: bool = False,
    seed: int = 0,
) -> EmbeddedVLAPolicy:
    """The embedded VLA of ``weights_dir`` (default: assets/embedded_vla) with its codec (default: assets/codec).

    allow_random:   build a random-initialized policy when no weights exist (never silently)
    random_weights: the trained policy's architecture and codec with freshly initialized weights
                    (``seed``): the random-weight baseline of closed-loop evaluations
    """
    wdir = Path(weights_dir) if weights_dir is not None else DEFAULT_EMBEDDED_DIR
    cdir = Path(codec_dir) if codec_dir is not None else DEFAULT_CODEC_DIR
    if random_weights:
        return _random_embedded(device, wdir, cdir, seed)
    if (wdir / CONFIG_FILE).is_file() or not allow_random:
        return _trained_embedded(device, wdir, cdir)
    log.warning("building a RANDOM-WEIGHT embedded VLA (allow_random=True): for plumbing tests only")
    model = EmbeddedVLA(EmbeddedVLAConfig())
    try:
        codec = load_codec(cdir)
        codec_id = codec.sha256[:12]
    except FileNotFoundError:
        codec = RFSQCodec()
        codec_id = "random"
    return EmbeddedVLAPolicy(model, codec, device=device, backbone_id=f"embedded-vla@random-codec-{codec_id}")


def _trained_embedded(device: str | torch.device, wdir: Path, cdir: Path) -> EmbeddedVLAPolicy:
    model, meta = load_embedded_vla(wdir)  # raises FileNotFoundError with instructions
    codec = load_codec(cdir)
    want = model.config.codec_sha256
    if want and codec.sha256 != want:
        raise ValueError(
            f"codec at {cdir} (sha256 {codec.sha256[:12]}) is not the one the policy in {wdir} was "
            f"trained with (sha256 {want[:12]}); pass the matching codec_dir"
        )
    backbone_id = f"embedded-vla@{meta['weights_sha256'][:12]}"
    return EmbeddedVLAPolicy(model, codec, device=device, backbone_id=backbone_id)


def _random_embedded(device: str | torch.device, wdir: Path, cdir: Path, seed: int) -> EmbeddedVLAPolicy:
    cfg_path = wdir / CONFIG_FILE
    if not cfg_path.is_file():
        raise FileNotFoundError(f"random_weights=True needs the architecture config {cfg_path}")
    config = EmbeddedVLAConfig.from_dict(json.loads(cfg_path.read_text())["model"])
    torch.manual_seed(seed)
    model = EmbeddedVLA(config)
    codec = load_codec(cdir)
    log.warning("embedded VLA with RANDOM weights (seed %d): a baseline, not a trained policy", seed)
    return EmbeddedVLAPolicy(model, codec, device=device, backbone_id=f"embedded-vla@random-seed{seed}")
