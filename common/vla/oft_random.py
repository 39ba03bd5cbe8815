"""OpenVLA-OFT with RANDOM weights, built from the openvla-oft code: for plumbing tests and timing only.

Nothing here is a trained policy: its actions and hidden states are noise with the real shapes. Two sizes:

* ``size="7b"``: the released checkpoints' architecture (``dinosiglip-vit-so-224px`` + ``llama2-7b-pure``:
  DINOv2 ViT-L/14-reg4 and SigLIP So400M/14 at 224 px, Llama-2 7B with its default 4096-d config),
  the L1 regression head (4096 -> 4096 -> 7) and the proprio projector (8 -> 4096), in bf16;
* ``size="tiny"``: the same classes with the same timm model ids, their width and depth shrunk through
  timm's keyword overrides (2 images x 256 patches, as in the 7B), a 2-layer 64-d Llama and a 64-d head.

``norm_stats`` are FABRICATED (plausible LIBERO ranges, not any dataset's): real runs read the
checkpoint's ``dataset_statistics.json``. The processor uses the image preprocessing of the released
``preprocessor_config.json`` (resize-naive, bicubic, 224 px; ImageNet statistics for DINOv2, 0.5 for
SigLIP) and either the Llama-2 ``tokenizer.model`` passed in, or a small word-level tokenizer.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

UNNORM_KEY = "libero_spatial_no_noops"
#: FABRICATED statistics in the layout of dataset_statistics.json (ranges resemble LIBERO's)
FAKE_ACTION_Q01 = [-0.75, -0.75, -0.94, -0.11, -0.16, -0.23, 0.0]
FAKE_ACTION_Q99 = [0.94, 0.86, 0.94, 0.13, 0.18, 0.24, 1.0]
FAKE_PROPRIO_Q01 = [-0.25, -0.3, 0.0, 2.7, -1.5, -0.6, 0.0, -0.04]
FAKE_PROPRIO_Q99 = [0.15, 0.3, 1.25, 3.4, 1.2, 0.4, 0.04, 0.0]
TINY_VIT = {"embed_dim": 32, "depth": 3, "num_heads": 2}
TINY_LLAMA = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "vocab_size": 32064,
}


def fake_norm_stats() -> dict[str, Any]:
    """FABRICATED norm_stats for :data:`UNNORM_KEY` (the layout of a checkpoint's dataset_statistics.json)."""

    def block(q01: list[float], q99: list[float], mask: list[bool]) -> dict[str, Any]:
        lo, hi = np.asarray(q01), np.asarray(q99)
        return {
            "q01": q01, "q99": q99, "min": (lo - 0.05).tolist(), "max": (hi + 0.05).tolist(),
            "mean": ((lo + hi) / 2).tolist(), "std": ((hi - lo) / 4).tolist(), "mask": mask,
        }  # fmt: skip

    return {
        UNNORM_KEY: {
            "action": block(FAKE_ACTION_Q01, FAKE_ACTION_Q99, [True] * 6 + [False]),
            "proprio": block(FAKE_PROPRIO_Q01, FAKE_PROPRIO_Q99, [True] * 8),
            "num_transitions": 0,
            "num_trajectories": 0,
        }
    }


@contextlib.contextmanager
def _shrunk_timm(overrides: dict[str, int] | None) -> Iterator[None]:
    """Within the block, timm.create_model builds the requested model ids with ``overrides``."""
    import timm

    original = timm.create_model
    if overrides:
        timm.create_model = lambda name, **kw: original(name, **{**kw, **overrides})
    try:
        yield
    finally:
        timm.create_model = original


def make_processor(tokenizer_model: str | Path | None = None) -> Any:
    """PrismaticProcessor with the released image settings; Llama-2 tokenizer if a tokenizer.model (or a
    folder saved from one) is given, else a small word-level tokenizer."""
    from prismatic.extern.hf.processing_prismatic import PrismaticImageProcessor, PrismaticProcessor

    image_processor = PrismaticImageProcessor(
        use_fused_vision_backbone=True,
        image_resize_strategy="resize-naive",
        input_sizes=[(3, 224, 224), (3, 224, 224)],
        interpolations=["bicubic", "bicubic"],
        means=[(0.485, 0.456, 0.406), (0.5, 0.5, 0.5)],
        stds=[(0.229, 0.224, 0.225), (0.5, 0.5, 0.5)],
    )
    return PrismaticProcessor(image_processor, _tokenizer(tokenizer_model))


def _tokenizer(tokenizer_model: str | Path | None) -> Any:
    if tokenizer_model is not None:
        from transformers import LlamaTokenizerFast

        if Path(tokenizer_model).is_dir():  # save_pretrained output: tokenizer.json, no sentencepiece
            return LlamaTokenizerFast.from_pretrained(str(tokenizer_model))
        tok = LlamaTokenizerFast(vocab_file=str(tokenizer_model), legacy=False)
        tok.add_special_tokens({"pad_token": "<PAD>"})  # as the released checkpoints (id 32000)
        return tok
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = sorted(set(re.findall(r"\w+|[^\w\s]", "In : What action should the robot take to ? Out")))
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{w: 100 + i for i, w in enumerate(words)}, "<PAD>": 32000}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<PAD>"
    )


def build_random_oft(
    size: str = "7b", device: str = "cuda:0", dtype: torch.dtype = torch.bfloat16, seed: int = 0
):
    """(vla, action_head, proprio_projector) with random weights on ``device`` (built there directly)."""
    from prismatic.extern.hf.configuration_prismatic import OpenVLAConfig
    from prismatic.extern.hf.modeling_prismatic import OpenVLAForActionPrediction
    from prismatic.models.action_heads import L1RegressionActionHead
    from prismatic.models.projectors import ProprioProjector

    if size not in ("7b", "tiny"):
        raise ValueError(f"size must be 7b or tiny, got {size!r}")
    tiny = size == "tiny"
    config = OpenVLAConfig(
        vision_backbone_id="dinosiglip-vit-so-224px",
        llm_backbone_id="llama2-7b-pure",
        arch_specifier="no-align+fused-gelu-mlp",
        image_resize_strategy="resize-naive",
        text_config=dict(TINY_LLAMA) if tiny else {"vocab_size": 32064, "pad_token_id": 32000},
        pad_to_multiple_of=64,
        norm_stats=fake_norm_stats(),
    )
    config._attn_implementation = "sdpa"  # what from_pretrained picks; the fork's sdpa is bidirectional
    torch.manual_seed(seed)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device), _shrunk_timm(TINY_VIT if tiny else None):
            vla = OpenVLAForActionPrediction(config)
            dim = vla.llm_dim
            head = L1RegressionActionHead(input_dim=dim, hidden_dim=dim, action_dim=7)
            projector = ProprioProjector(llm_dim=dim, proprio_dim=8)
    finally:
        torch.set_default_dtype(default)
    vla.vision_backbone.set_num_images_in_input(2)
    return vla.eval(), head.eval(), projector.eval()
