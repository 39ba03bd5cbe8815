"""OpenVLA-OFT as a data source for draft training (docs/DESIGN.md §6.4): a :class:`ChunkPolicy` only.

    policy = load_openvla_oft("moojink/openvla-7b-oft-finetuned-libero-spatial", device="cuda:0")
    out = policy.act([obs])[0]     # hidden [4096] float32, codes [8, 16, 8] uint8, actions [8, 7] float32

What it does per query, following the model's own code (see /work/shared/OPENVLA_OFT_NOTES.md):

* inputs are prepared by the openvla-oft package's helpers (``experiments.robot.openvla_utils``):
  both images resized to 224 the way the LIBERO evaluation does (JPEG round trip + lanczos3), center
  crop (``center_crop=True``), third-person image first then wrist; proprio normalized with the
  checkpoint's statistics; prompt ``"In: What action should the robot take to {task}?\\nOut:"``;
* one ``vla.predict_action(...)`` call returns the un-normalized 8x7 chunk **and**
  ``actions_hidden_states`` [1, 56, 4096]; row 0 is the last-layer hidden state at the last prompt
  token, computed with the model's bidirectional attention: that is the draft's input (no second,
  prompt-only pass, which would give a different vector);
* the chunk is turned into the env's action convention (gripper binarized to sign(2g-1) and inverted,
  so -1 open / +1 close, as the OFT LIBERO evaluation does before ``env.step``) and encoded into RFSQ
  codes with the project's codec.

Requirements (checked up front, each with a clear error): a CUDA GPU (~16 GB), the weights (hub access
or a local folder), the openvla-oft package (``prismatic`` and ``experiments``) with its pinned
dependencies, including the transformers fork with bidirectional attention. None of this is installed on
the CPU machines of this project; everything is imported lazily, only when this backend is selected.
The checkpoint folder's name must keep "libero" on the command line: the openvla-oft package picks its
action-chunk constants from ``sys.argv`` (it does here, through ``--model-id ...libero...``).
"""

from __future__ import annotations

import importlib.util
import json
import logging
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

from common.policy import ChunkPolicy, Observation, PolicyOutput
from common.shapes import OPENVLA_HIDDEN_DIM, RFSQShape

log = logging.getLogger(__name__)

DEFAULT_MODEL_ID = "moojink/openvla-7b-oft-finetuned-libero-spatial"
#: unnorm keys of the official LIBERO checkpoints
UNNORM_KEYS = {
    "libero_spatial": "libero_spatial_no_noops",
    "libero_object": "libero_object_no_noops",
    "libero_goal": "libero_goal_no_noops",
    "libero_10": "libero_10_no_noops",
}
INSTALL_HINT = (
    "install the openvla-oft code and its pins on a GPU machine: `git clone https://github.com/moojink/openvla-oft "
    "&& pip install -e openvla-oft` (it pulls the transformers fork with bidirectional attention; a stock "
    "transformers silently gives causal attention and a large success drop)"
)


class OpenVLAOFTUnavailable(RuntimeError):
    """The OFT backend cannot run here (no GPU, no weights or missing dependencies)."""


def check_requirements(device: str) -> None:
    """Raise :class:`OpenVLAOFTUnavailable` naming what is missing (GPU first, then packages)."""
    import torch

    if not str(device).startswith("cuda"):
        raise OpenVLAOFTUnavailable(
            f"OpenVLA-OFT needs a CUDA GPU (about 16 GB); got --device {device}. Use the embedded VLA on CPU."
        )
    if not torch.cuda.is_available():
        raise OpenVLAOFTUnavailable(
            "OpenVLA-OFT needs a CUDA GPU (about 16 GB), and torch sees none on this machine"
        )
    missing = [
        m for m in ("prismatic", "experiments", "timm", "tensorflow") if importlib.util.find_spec(m) is None
    ]
    if missing:
        raise OpenVLAOFTUnavailable(f"OpenVLA-OFT dependencies missing: {', '.join(missing)}; {INSTALL_HINT}")


def _component_path(model_id: str, prefix: str) -> str:
    """Local path of ``{prefix}--<step>_checkpoint.pt`` in a checkpoint folder or hub repo."""
    local = Path(model_id)
    if local.is_dir():
        found = sorted(local.glob(f"{prefix}--*_checkpoint.pt"))
        if not found:
            raise OpenVLAOFTUnavailable(f"{local} has no {prefix}--*_checkpoint.pt")
        return str(found[-1])
    from huggingface_hub import HfApi, hf_hub_download

    try:
        names = [f for f in HfApi().list_repo_files(model_id) if f.startswith(f"{prefix}--")]
    except Exception as exc:
        raise OpenVLAOFTUnavailable(
            f"cannot reach the weights of {model_id} ({type(exc).__name__}: {exc}); pass --model-id /path/to/local/checkpoint"
        ) from exc
    if not names:
        raise OpenVLAOFTUnavailable(f"{model_id} has no {prefix}--*_checkpoint.pt")
    return hf_hub_download(model_id, sorted(names)[-1])


def _dataset_statistics(model_id: str) -> dict[str, Any] | None:
    local = Path(model_id) / "dataset_statistics.json"
    if Path(model_id).is_dir():
        return json.loads(local.read_text()) if local.is_file() else None
    from huggingface_hub import hf_hub_download

    try:
        return json.loads(Path(hf_hub_download(model_id, "dataset_statistics.json")).read_text())
    except Exception:  # not every checkpoint ships it; norm_stats from config.json are used then
        log.warning("%s has no dataset_statistics.json; using the norm_stats of its config", model_id)
        return None


def _load_component(module: Any, path: str, device: str) -> Any:
    import torch

    state = torch.load(path, map_location="cpu", weights_only=True)
    state = {k.removeprefix("module."): v for k, v in state.items()}  # saved from DDP
    module.load_state_dict(state)
    return module.to(torch.bfloat16).to(device).eval()


class OpenVLAOFTPolicy(ChunkPolicy):
    """OpenVLA-OFT (L1 regression head, 2 images, proprio) -> hidden state, codes and env actions."""

    def __init__(
        self,
        vla: Any,
        processor: Any,
        action_head: Any,
        proprio_projector: Any,
        codec: Any,
        model_id: str,
        unnorm_key: str,
        device: str,
    ):
        self.vla, self.processor = vla, processor
        self.action_head, self.proprio_projector = action_head, proprio_projector
        self.codec = codec
        self.unnorm_key = unnorm_key
        self.device = device
        self.hidden_dim = OPENVLA_HIDDEN_DIM
        self.shape = codec.shape if hasattr(codec, "shape") else RFSQShape()
        self.backbone_id = f"openvla-oft@{model_id}"

    def act(self, observations: list[Observation]) -> list[PolicyOutput]:
        import torch
        from experiments.robot.openvla_utils import (
            normalize_proprio,
            prepare_images_for_vla,
            resize_image_for_policy,
        )

        outs = []
        for obs in observations:  # predict_action takes one observation (batch 1: bidirectional mask)
            images = [resize_image_for_policy(np.asarray(im), 224) for im in (obs.agentview, obs.wrist)]
            pil = prepare_images_for_vla(images, SimpleNamespace(center_crop=True))  # [primary, wrist] PIL
            prompt = f"In: What action should the robot take to {obs.instruction.lower()}?\nOut:"
            inputs = self.processor(prompt, pil[0]).to(self.device, dtype=torch.bfloat16)
            wrist = self.processor(prompt, pil[1])["pixel_values"].to(self.device, dtype=torch.bfloat16)
            inputs["pixel_values"] = torch.cat([inputs["pixel_values"], wrist], dim=1)  # [1, 12, 224, 224]
            proprio = normalize_proprio(
                np.asarray(obs.proprio), self.vla.norm_stats[self.unnorm_key]["proprio"]
            )
            with torch.inference_mode():
                actions, actions_hidden = self.vla.predict_action(
                    **inputs,
                    unnorm_key=self.unnorm_key,
                    do_sample=False,
                    proprio=proprio,
                    proprio_projector=self.proprio_projector,
                    action_head=self.action_head,
                    use_film=False,
                )
            hidden = actions_hidden[0, 0].float().cpu().numpy()  # [4096]: last prompt token
            chunk = np.asarray(actions, dtype=np.float32).copy()  # [8, 7], gripper in [0, 1] (1 = open)
            chunk[:, -1] = -np.sign(2 * chunk[:, -1] - 1)  # binarize + invert -> LIBERO: -1 open, +1 close
            with torch.no_grad():
                codes = self.codec.encode(torch.from_numpy(chunk)[None])[0]  # [T, H, L]
            outs.append(
                PolicyOutput(hidden=hidden, codes=codes.cpu().numpy().astype(np.uint8), actions=chunk)
            )
        return outs


def load_openvla_oft(
    model_id: str = DEFAULT_MODEL_ID,
    device: str = "cuda:0",
    codec_dir: str | Path | None = None,
    suite: str = "libero_spatial",
) -> OpenVLAOFTPolicy:
    """Load OpenVLA-OFT the way its LIBERO evaluation does; raise a clear error if it cannot run here."""
    check_requirements(device)
    import torch
    from prismatic.models.action_heads import L1RegressionActionHead
    from prismatic.models.projectors import ProprioProjector
    from transformers import AutoModelForVision2Seq, AutoProcessor

    from common.codec import load_codec
    from common.vla import DEFAULT_CODEC_DIR

    if suite not in UNNORM_KEYS:
        raise ValueError(f"no OpenVLA-OFT unnorm key for suite {suite!r}; known: {sorted(UNNORM_KEYS)}")
    codec = load_codec(codec_dir or DEFAULT_CODEC_DIR)
    try:
        vla = (
            AutoModelForVision2Seq.from_pretrained(
                model_id, torch_dtype=torch.bfloat16, low_cpu_mem_usage=True, trust_remote_code=True
            )
            .eval()
            .to(device)
        )
        processor = AutoProcessor.from_pretrained(model_id, trust_remote_code=True)
    except OSError as exc:
        raise OpenVLAOFTUnavailable(f"cannot load the weights of {model_id}: {exc}") from exc
    vla.vision_backbone.set_num_images_in_input(2)  # primary + wrist; otherwise the 1-image path runs
    stats = _dataset_statistics(model_id)
    if stats is not None:  # as the OFT loader does: the checkpoint's own statistics win
        vla.norm_stats = stats
    unnorm_key = UNNORM_KEYS[suite]
    if unnorm_key not in vla.norm_stats:
        raise OpenVLAOFTUnavailable(
            f"{model_id} has no statistics for {unnorm_key}: {sorted(vla.norm_stats)}"
        )
    action_head = _load_component(
        L1RegressionActionHead(input_dim=vla.llm_dim, hidden_dim=vla.llm_dim, action_dim=7),
        _component_path(model_id, "action_head"),
        device,
    )
    proprio_projector = _load_component(
        ProprioProjector(llm_dim=vla.llm_dim, proprio_dim=8),
        _component_path(model_id, "proprio_projector"),
        device,
    )
    log.info("loaded OpenVLA-OFT %s on %s", model_id, device)
    return OpenVLAOFTPolicy(
        vla, processor, action_head, proprio_projector, codec, model_id, unnorm_key, device
    )
