"""VLA policy backends (docs/DESIGN.md §6.2): ``load_policy(name, device)`` returns a ready policy.

    from common.vla import load_policy
    policy = load_policy("embedded", device="cpu")   # shipped weights in assets/embedded_vla
    out = policy.act([obs])[0]                        # hidden [D], codes [T, H, L] uint8, actions [T, A]

``name="embedded"`` is the default, CPU-friendly backend (:mod:`common.vla.embedded`). It loads
trained weights and never falls back to random ones: without weights it raises, unless the caller
passes ``allow_random=True`` explicitly (plumbing tests only; the policy's ``backbone_id`` then says
``random``).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from common.policy import ChunkPolicy

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_EMBEDDED_DIR = REPO_ROOT / "assets" / "embedded_vla"
DEFAULT_CODEC_DIR = REPO_ROOT / "assets" / "codec"

BACKENDS = ("embedded", "openvla-oft")


def load_policy(
    name: str = "embedded",
    device: str | torch.device = "cpu",
    weights_dir: str | Path | None = None,
    codec_dir: str | Path | None = None,
    allow_random: bool = False,
    random_weights: bool = False,
    seed: int = 0,
    decode_layers: int | None = None,
) -> ChunkPolicy:
    """Build a policy backend.

    name:         ``embedded`` (the small VLA trained in this project)
    weights_dir:  folder with ``config.json`` + ``model.safetensors`` (default: assets/embedded_vla)
    codec_dir:    folder of the RFSQ codec the policy was trained with (default: assets/codec)
    allow_random: build a random-initialized policy when no weights exist (never silently)
    random_weights: the trained policy's architecture and codec with freshly initialized weights
                  (``seed``): the random-weight baseline of closed-loop evaluations
    decode_layers: layers the embedded VLA decodes sequentially (None: as its config.json says; the
                  shipped weights decode their 3 informative layers, the rest at the centre level)
    """
    if name == "openvla-oft":  # GPU data source (common/vla/openvla_oft.py); weights_dir: hub id or folder
        from common.vla.openvla_oft import DEFAULT_MODEL_ID, load_openvla_oft

        return load_openvla_oft(str(weights_dir or DEFAULT_MODEL_ID), device=str(device), codec_dir=codec_dir)
    if name != "embedded":
        raise ValueError(f"unknown policy backend {name!r}; available: {', '.join(BACKENDS)}")
    if random_weights:
        policy = _random_embedded(device, weights_dir, codec_dir, seed)
    else:
        policy = _load_embedded(device, weights_dir, codec_dir, allow_random)
    if decode_layers is not None:
        policy.decode_layers = decode_layers
    return policy


def _random_embedded(
    device: str | torch.device, weights_dir: str | Path | None, codec_dir: str | Path | None, seed: int
) -> ChunkPolicy:
    import json

    from common.codec import load_codec
    from common.vla.embedded import CONFIG_FILE, EmbeddedVLA, EmbeddedVLAConfig, EmbeddedVLAPolicy

    wdir = Path(weights_dir) if weights_dir is not None else DEFAULT_EMBEDDED_DIR
    cfg_path = wdir / CONFIG_FILE
    if not cfg_path.is_file():
        raise FileNotFoundError(f"random_weights=True needs the architecture config {cfg_path}")
    config = EmbeddedVLAConfig.from_dict(json.loads(cfg_path.read_text())["model"])
    torch.manual_seed(seed)
    model = EmbeddedVLA(config)
    codec = load_codec(Path(codec_dir) if codec_dir is not None else DEFAULT_CODEC_DIR)
    log.warning("embedded VLA with RANDOM weights (seed %d): a baseline, not a trained policy", seed)
    return EmbeddedVLAPolicy(model, codec, device=device, backbone_id=f"embedded-vla@random-seed{seed}")


def _load_embedded(
    device: str | torch.device,
    weights_dir: str | Path | None,
    codec_dir: str | Path | None,
    allow_random: bool,
) -> ChunkPolicy:
    from common.codec import RFSQCodec, load_codec
    from common.vla.embedded import (
        CONFIG_FILE,
        EmbeddedVLA,
        EmbeddedVLAConfig,
        EmbeddedVLAPolicy,
        load_embedded_vla,
    )

    wdir = Path(weights_dir) if weights_dir is not None else DEFAULT_EMBEDDED_DIR
    cdir = Path(codec_dir) if codec_dir is not None else DEFAULT_CODEC_DIR
    if (wdir / CONFIG_FILE).is_file() or not allow_random:
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

    log.warning("building a RANDOM-WEIGHT embedded VLA (allow_random=True): for plumbing tests only")
    model = EmbeddedVLA(EmbeddedVLAConfig())
    try:
        codec = load_codec(cdir)
        codec_id = codec.sha256[:12]
    except FileNotFoundError:
        codec = RFSQCodec()
        codec_id = "random"
    return EmbeddedVLAPolicy(model, codec, device=device, backbone_id=f"embedded-vla@random-codec-{codec_id}")
