"""OpenVLA-OFT backend (``--vla openvla-oft``, docs/DESIGN.md §6.4): a GPU data source for draft training.

Runs in its own environment, ``.venv-oft`` (``make venv-oft``, docs/oft.md): CUDA torch 2.2, the
openvla-oft package and OFT's pins, including its transformers fork (4.40.1 with bidirectional
attention). The trainer stays in ``.venv``; the wire decouples the two processes.

One policy query is what OFT's own LIBERO evaluation does (``get_vla_action``), with two outputs kept:

* both camera images go through OFT's own preprocessing (``resize_image_for_policy`` to 224 px, then
  ``prepare_images_for_vla`` with the 0.9-area center crop), the processor runs once per image and the
  wrist pixels are concatenated to the primary ones ([1, 12, 224, 224]); proprio is normalized with the
  checkpoint's q01/q99 statistics;
* ``predict_action`` returns the un-normalized 8x7 chunk and ``actions_hidden_states`` [1, 56, 4096];
  its first row is the last-layer hidden state at the last prompt token (the appended token 29871),
  computed with the model's bidirectional attention over the whole sequence. That vector is the
  draft's input (not a second, prompt-only pass, which would give a different vector);
* the chunk is turned into the env's action convention (gripper binarized to sign(2g-1) and inverted,
  -1 open / +1 close, as OFT's evaluation does before ``env.step``) and encoded into RFSQ codes.

The codec's normalization is set from the checkpoint's own ``dataset_statistics.json`` (q01/q99 of the
unnorm key's arm dimensions; the binarized gripper keeps [-1, 1]) when the checkpoint ships it, so the
codec sees OFT's actions on OFT's own scale; values outside it are clamped and the trainer reports how
often, per dimension. ``make train-codec FROM_ARCHIVE=… NORM_STATS=…`` fits a codec on OFT's actions.

Every requirement is checked up front and each failure is one :class:`OpenVLAOFTUnavailable` naming the
fix: a CUDA GPU and a CUDA build of torch, the packages, the fork's bidirectional attention, a complete
checkpoint, a known unnorm key. The openvla-oft package picks its chunk constants from ``sys.argv``
("aloha" or "bridge" anywhere on the command line switches them); they are checked after import.
"""

from __future__ import annotations

import argparse
import importlib.util
import inspect
import json
import logging
import sys
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch

from common.codec import load_codec
from common.policy import ChunkPolicy, Observation, PolicyOutput
from common.shapes import RFSQShape
from common.vla.paths import DEFAULT_CODEC_DIR

log = logging.getLogger(__name__)

DEFAULT_MODEL_ID = "moojink/openvla-7b-oft-finetuned-libero-spatial"
#: unnorm keys of the official LIBERO checkpoints
UNNORM_KEYS = {
    "libero_spatial": "libero_spatial_no_noops",
    "libero_object": "libero_object_no_noops",
    "libero_goal": "libero_goal_no_noops",
    "libero_10": "libero_10_no_noops",
}
ENV_HINT = "build the OFT environment with `make venv-oft` and run the producer from it (`make produce-oft`)"
#: packages the inference path imports (openvla-oft's ``experiments`` module imports tensorflow)
REQUIRED_MODULES = ("prismatic", "experiments", "transformers", "timm", "tensorflow")
#: versions OpenVLA-OFT was trained and evaluated with (a mismatch is only a warning, as in OFT itself)
PINNED = {"transformers": "4.40.1", "tokenizers": "0.19.1", "timm": "0.9.10", "torch": "2.2.0"}
CHECKPOINT_FILES = ("config.json", "preprocessor_config.json", "tokenizer_config.json")

ImagePrep = Callable[[Observation], list]  # observation -> [primary, wrist] PIL images, 224 px


class OpenVLAOFTUnavailable(RuntimeError):
    """The OFT backend cannot run here; the message names what is missing and the fix."""


# ------------------------------------------------------------------------------ checks
def check_requirements(device: str) -> None:
    """GPU, CUDA torch, packages and the fork's bidirectional attention; raise naming the fix."""
    if not str(device).startswith("cuda"):
        raise OpenVLAOFTUnavailable(
            f"OpenVLA-OFT needs a CUDA GPU (about 16 GB); got --device {device}: pass --device cuda:0 "
            "(or use the embedded VLA on CPU)"
        )
    if torch.version.cuda is None:
        raise OpenVLAOFTUnavailable(
            f"this torch ({torch.__version__}, {sys.executable}) is a CPU-only build; {ENV_HINT}"
        )
    if not torch.cuda.is_available():
        raise OpenVLAOFTUnavailable(
            "OpenVLA-OFT needs a CUDA GPU (about 16 GB), and torch sees none on this machine "
            "(check nvidia-smi and CUDA_VISIBLE_DEVICES)"
        )
    missing = [m for m in REQUIRED_MODULES if importlib.util.find_spec(m) is None]
    if missing:
        raise OpenVLAOFTUnavailable(f"OpenVLA-OFT dependencies missing: {', '.join(missing)}; {ENV_HINT}")
    check_bidirectional_attention()


def check_bidirectional_attention() -> None:
    """Refuse a stock transformers: its Llama SDPA attention is causal, OFT was trained bidirectional."""
    from transformers.models.llama import modeling_llama

    sdpa = getattr(modeling_llama, "LlamaSdpaAttention", None)
    if sdpa is None or "is_causal=False" not in inspect.getsource(sdpa.forward):
        raise OpenVLAOFTUnavailable(
            f"transformers {_version('transformers')} is not OpenVLA-OFT's fork with bidirectional attention "
            f"(stock Llama attention is causal: a large success drop, moojink/openvla-oft #135); {ENV_HINT}"
        )


def check_constants() -> None:
    """openvla-oft picked its constants from sys.argv; this backend needs LIBERO's (8 x 7 chunks)."""
    from prismatic.vla import constants

    if (constants.NUM_ACTIONS_CHUNK, constants.ACTION_DIM, constants.PROPRIO_DIM) != (8, 7, 8):
        raise OpenVLAOFTUnavailable(
            f"openvla-oft chose {constants.ROBOT_PLATFORM} constants (chunk {constants.NUM_ACTIONS_CHUNK}, "
            f"action dim {constants.ACTION_DIM}) from the command line; LIBERO needs 8 x 7: keep 'aloha' and "
            "'bridge' out of the command line (paths included)"
        )


def check_checkpoint(model_id: str) -> None:
    """A local checkpoint folder must be complete; raise naming every missing file and the fix."""
    path = Path(model_id)
    if not path.is_dir():
        if model_id.startswith((".", "/", "~")):
            raise OpenVLAOFTUnavailable(
                f"checkpoint folder {model_id} does not exist; {_download_hint(model_id)}"
            )
        return  # a hub id: from_pretrained resolves it (errors are wrapped at load)
    missing = [f for f in CHECKPOINT_FILES if not (path / f).is_file()]
    index = path / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text()).get("weight_map", {}).values()))
        missing += [s for s in shards if not (path / s).is_file()]
    elif not (path / "model.safetensors").is_file():
        missing.append("model.safetensors or model.safetensors.index.json (+ shards)")
    for prefix in ("action_head", "proprio_projector"):
        if not list(path.glob(f"{prefix}--*_checkpoint.pt")):
            missing.append(f"{prefix}--<step>_checkpoint.pt")
    if missing:
        raise OpenVLAOFTUnavailable(
            f"checkpoint {path} is incomplete, missing: {', '.join(missing)}; {_download_hint(str(path))}"
        )
    if not (path / "dataset_statistics.json").is_file():
        log.warning("%s has no dataset_statistics.json: the norm_stats of its config.json are used", path)


def _download_hint(target: str) -> str:
    return (
        f"download it with `.venv-oft/bin/huggingface-cli download {DEFAULT_MODEL_ID} --local-dir {target}` "
        "(about 15 GB), or pass --model-id HUB_ID"
    )


def resolve_unnorm_key(norm_stats: dict[str, Any], suite: str, model_id: str) -> str:
    """The checkpoint's statistics key for a LIBERO suite; raise naming the keys it has."""
    if suite not in UNNORM_KEYS:
        raise OpenVLAOFTUnavailable(
            f"no OpenVLA-OFT unnorm key for suite {suite!r}: pass --suite one of {sorted(UNNORM_KEYS)}"
        )
    key = UNNORM_KEYS[suite]
    if key not in norm_stats:
        raise OpenVLAOFTUnavailable(
            f"{model_id} has no statistics for {key} (suite {suite}); it has {sorted(norm_stats)}: pass the "
            "--suite the checkpoint was fine-tuned on (e.g. libero_spatial for ...-libero-spatial)"
        )
    return key


def _version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "missing"


# ------------------------------------------------------------------------------ codec fit
def fit_codec_to_stats(codec: Any, action_stats: dict[str, Any]) -> dict[str, list[float]]:
    """Normalize the codec with the checkpoint's q01/q99 action statistics (BOUNDS_Q99, as OFT).

    Normalized dimensions (mask True: the 6 arm dimensions) take [q01, q99]; the gripper (mask False)
    is binarized to -1/+1 before encoding, so it keeps [-1, 1]. Returns the bounds set.
    """
    q01 = np.asarray(action_stats["q01"], np.float32)
    q99 = np.asarray(action_stats["q99"], np.float32)
    mask = np.asarray(action_stats.get("mask", [True] * len(q01)), bool)
    A = codec.shape.action_dim
    if q01.shape != (A,) or q99.shape != (A,) or mask.shape != (A,):
        raise OpenVLAOFTUnavailable(f"action statistics must hold {A} values each, got {q01.shape}")
    low = np.where(mask, q01, -1.0).astype(np.float32)
    high = np.where(mask, q99, 1.0).astype(np.float32)
    degenerate = high - low < 1e-6
    low, high = np.where(degenerate, low - 1.0, low), np.where(degenerate, high + 1.0, high)
    codec.set_bounds(low, high)
    return {"low": low.tolist(), "high": high.tolist()}


# ------------------------------------------------------------------------------ images
def oft_image_prep(obs: Observation) -> list:
    """OFT's own preprocessing (TensorFlow): JPEG round trip + lanczos3 to 224 px, then 0.9-area crop."""
    from experiments.robot.openvla_utils import prepare_images_for_vla, resize_image_for_policy

    images = [resize_image_for_policy(np.asarray(im, np.uint8), 224) for im in (obs.agentview, obs.wrist)]
    return prepare_images_for_vla(images, SimpleNamespace(center_crop=True))  # [primary, wrist] PIL


def prepared_image_prep(obs: Observation) -> list:
    """Images already prepared by :func:`oft_image_prep` (224 px, cropped), e.g. replayed recordings."""
    from PIL import Image

    for im in (obs.agentview, obs.wrist):
        if np.asarray(im).shape != (224, 224, 3):
            raise ValueError(f"prepared images must be [224, 224, 3], got {np.asarray(im).shape}")
    return [Image.fromarray(np.asarray(im, np.uint8)).convert("RGB") for im in (obs.agentview, obs.wrist)]


# ------------------------------------------------------------------------------ policy
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
        image_prep: ImagePrep = oft_image_prep,
    ):
        impl = vla.language_model.config._attn_implementation
        if impl != "sdpa":  # flash-attention and eager Llama attention are causal even in the fork
            raise OpenVLAOFTUnavailable(
                f"the OFT language model runs {impl} attention; only the fork's sdpa path is bidirectional: "
                "drop attn_implementation from the checkpoint's config.json"
            )
        if vla.vision_backbone.get_num_images_in_input() != 2:
            raise ValueError("call vla.vision_backbone.set_num_images_in_input(2): primary + wrist images")
        self.vla, self.processor = vla, processor
        self.action_head, self.proprio_projector = action_head, proprio_projector
        self.codec = codec
        self.unnorm_key = unnorm_key
        self.device = device
        self.image_prep = image_prep
        self.hidden_dim = int(vla.llm_dim)  # 4096 for the 7B checkpoints
        self.shape = codec.shape if hasattr(codec, "shape") else RFSQShape()
        self.backbone_id = f"openvla-oft@{model_id}"

    def query(self, obs: Observation) -> tuple[np.ndarray, np.ndarray]:
        """One ``predict_action`` call -> (hidden [D] at the last prompt token, chunk [8, 7] un-normalized)."""
        primary, wrist = self.image_prep(obs)
        prompt = f"In: What action should the robot take to {obs.instruction.lower()}?\nOut:"
        inputs = self.processor(prompt, primary).to(self.device, dtype=torch.bfloat16)
        wrist_px = self.processor(prompt, wrist)["pixel_values"].to(self.device, dtype=torch.bfloat16)
        inputs["pixel_values"] = torch.cat([inputs["pixel_values"], wrist_px], dim=1)  # [1, 12, 224, 224]
        from experiments.robot.openvla_utils import normalize_proprio

        proprio = normalize_proprio(np.asarray(obs.proprio), self.vla.norm_stats[self.unnorm_key]["proprio"])
        with torch.inference_mode():  # batch 1: the all-ones mask makes attention fully bidirectional
            actions, actions_hidden = self.vla.predict_action(
                **inputs,
                unnorm_key=self.unnorm_key,
                do_sample=False,
                proprio=proprio,
                proprio_projector=self.proprio_projector,
                action_head=self.action_head,
                use_film=False,
            )
        return actions_hidden[0, 0].float().cpu().numpy(), np.asarray(actions, dtype=np.float32)

    def act(self, observations: list[Observation]) -> list[PolicyOutput]:
        outs = []
        for obs in observations:  # predict_action takes one observation
            hidden, chunk = self.query(obs)
            chunk = chunk.copy()  # [8, 7], gripper in [0, 1] (1 = open)
            chunk[:, -1] = -np.sign(2 * chunk[:, -1] - 1)  # binarize + invert -> LIBERO: -1 open, +1 close
            with torch.no_grad():
                codes = self.codec.encode(torch.from_numpy(chunk)[None])[0]  # [T, H, L]
            outs.append(
                PolicyOutput(hidden=hidden, codes=codes.cpu().numpy().astype(np.uint8), actions=chunk)
            )
        return outs


# ------------------------------------------------------------------------------ loading
def load_openvla_oft(
    model_id: str = DEFAULT_MODEL_ID,
    device: str = "cuda:0",
    codec_dir: str | Path | None = None,
    suite: str = "libero_spatial",
    image_prep: ImagePrep = oft_image_prep,
) -> OpenVLAOFTPolicy:
    """Load OpenVLA-OFT the way its LIBERO evaluation does; raise a clear error if it cannot run here."""
    check_requirements(device)
    check_checkpoint(model_id)
    return build_from_checkpoint(model_id, device, codec_dir, suite, image_prep)


def build_from_checkpoint(
    model_id: str,
    device: str,
    codec_dir: str | Path | None = None,
    suite: str = "libero_spatial",
    image_prep: ImagePrep = oft_image_prep,
) -> OpenVLAOFTPolicy:
    """The loading half of :func:`load_openvla_oft`, without the device checks."""
    from prismatic.models.action_heads import L1RegressionActionHead
    from prismatic.models.projectors import ProprioProjector
    from transformers import AutoModelForVision2Seq, AutoProcessor

    check_constants()
    try:
        vla = AutoModelForVision2Seq.from_pretrained(
            model_id, torch_dtype=torch.bfloat16, low_cpu_mem_usage=True, trust_remote_code=True
        )
        processor = AutoProcessor.from_pretrained(model_id, trust_remote_code=True)
    except OSError as exc:
        raise OpenVLAOFTUnavailable(
            f"cannot load the weights of {model_id} ({exc}); {_download_hint('DIR')}"
        ) from exc
    vla = vla.eval().to(device)
    vla.vision_backbone.set_num_images_in_input(2)  # primary + wrist; otherwise the 1-image path runs
    stats = _dataset_statistics(model_id)
    if stats is not None:  # as the OFT loader does: the checkpoint's own statistics win
        vla.norm_stats = stats
    unnorm_key = resolve_unnorm_key(vla.norm_stats, suite, model_id)
    codec = load_codec(codec_dir or DEFAULT_CODEC_DIR)
    bounds = fit_codec_to_stats(codec, vla.norm_stats[unnorm_key]["action"])
    log.info("codec normalized with %s action q01/q99: %s (sha256 %s)", unnorm_key, bounds, codec.sha256[:12])
    llm_dim = vla.llm_dim
    action_head = _load_component(
        L1RegressionActionHead(input_dim=llm_dim, hidden_dim=llm_dim, action_dim=7),
        _component_path(model_id, "action_head"),
        device,
    )
    proprio_projector = _load_component(
        ProprioProjector(llm_dim=llm_dim, proprio_dim=8),
        _component_path(model_id, "proprio_projector"),
        device,
    )
    log.info("loaded OpenVLA-OFT %s on %s (unnorm key %s)", model_id, device, unnorm_key)
    return OpenVLAOFTPolicy(
        vla, processor, action_head, proprio_projector, codec, model_id, unnorm_key, device, image_prep
    )


def _component_path(model_id: str, prefix: str) -> str:
    """Local path of ``{prefix}--<step>_checkpoint.pt`` in a checkpoint folder or hub repo."""
    local = Path(model_id)
    if local.is_dir():
        found = sorted(local.glob(f"{prefix}--*_checkpoint.pt"))
        if not found:
            raise OpenVLAOFTUnavailable(
                f"{local} has no {prefix}--*_checkpoint.pt; {_download_hint(str(local))}"
            )
        return str(found[-1])
    from huggingface_hub import HfApi, hf_hub_download

    try:
        names = [f for f in HfApi().list_repo_files(model_id) if f.startswith(f"{prefix}--")]
        if not names:
            raise OpenVLAOFTUnavailable(f"{model_id} has no {prefix}--*_checkpoint.pt")
        return hf_hub_download(model_id, sorted(names)[-1])
    except OpenVLAOFTUnavailable:
        raise
    except Exception as exc:
        raise OpenVLAOFTUnavailable(
            f"cannot fetch {prefix} of {model_id} ({type(exc).__name__}: {exc}); {_download_hint('DIR')}"
        ) from exc


def _dataset_statistics(model_id: str) -> dict[str, Any] | None:
    path = Path(model_id)
    if not path.is_dir():
        from huggingface_hub import hf_hub_download

        try:
            path = Path(hf_hub_download(model_id, "dataset_statistics.json")).parent
        except Exception:  # not every checkpoint ships it; norm_stats from config.json are used then
            log.warning("%s has no dataset_statistics.json; using the norm_stats of its config", model_id)
            return None
    stats_file = path / "dataset_statistics.json"
    return json.loads(stats_file.read_text()) if stats_file.is_file() else None


def _load_component(module: Any, path: str, device: str) -> Any:
    state = torch.load(path, map_location="cpu", weights_only=True)
    state = {k.removeprefix("module."): v for k, v in state.items()}  # saved from DDP
    try:
        module.load_state_dict(state)
    except RuntimeError as exc:
        raise OpenVLAOFTUnavailable(f"{path} does not fit {type(module).__name__}: {exc}") from exc
    return module.to(torch.bfloat16).to(device).eval()


# ------------------------------------------------------------------------------ environment report
def environment_report() -> dict[str, Any]:
    """Versions and checks of the OFT environment (``python -m common.vla.openvla_oft --check-env``)."""
    report: dict[str, Any] = {"python": sys.version.split()[0], "executable": sys.executable}
    for name in ("torch", "transformers", "tokenizers", "timm", "numpy", "tensorflow", "openvla-oft"):
        report[name] = _version(name)
    report["torch_cuda_build"] = torch.version.cuda
    report["cuda_available"] = torch.cuda.is_available()
    report["modules_missing"] = [m for m in REQUIRED_MODULES if importlib.util.find_spec(m) is None]
    try:
        check_bidirectional_attention()
        report["bidirectional_attention"] = True
    except (OpenVLAOFTUnavailable, ImportError) as exc:
        report["bidirectional_attention"] = str(exc)
    report["pins_differ"] = {k: report.get(k) for k, v in PINNED.items() if report.get(k) != v}
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m common.vla.openvla_oft",
        description="Check the OpenVLA-OFT producer environment (.venv-oft): versions, packages, the "
        "transformers fork's bidirectional attention, CUDA.",
        allow_abbrev=False,
    )
    parser.add_argument("--check-env", action="store_true", help="print the report; exit 1 if unusable")
    args = parser.parse_args(argv)
    report = environment_report()
    print(json.dumps(report, indent=2))
    if not args.check_env:
        return 0
    ok = not report["modules_missing"] and report["bidirectional_attention"] is True
    if torch.version.cuda is None:
        ok = False
        print(
            f"torch {torch.__version__} is a CPU-only build: the producer needs CUDA torch", file=sys.stderr
        )
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
