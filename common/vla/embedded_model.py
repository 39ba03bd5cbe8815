"""The embedded small VLA's network (docs/DESIGN.md §6.3): two tiny ResNet camera encoders and a small
Llama that decodes RFSQ layers. The policy around it, its files and its loading: common/vla/embedded.py.

Everything is built from ``transformers`` model classes with local configs; nothing is downloaded.

Sequence layout (one row of the batch; P prefix positions, then L blocks of W = T positions):

    [pad … pad, BOS, words…]  [agentview: N_img]  [wrist: N_img]  [proprio]  [ACT] | Q | B_1 | … | B_{L-1}
     text (left-padded)         image tokens                                  ^      block 0 = learned queries
                                                                              last prompt token: hidden [D]

Attention: the prefix is bidirectional over its valid (non-pad) positions; block b sees the valid
prefix, blocks < b and all of itself (full inside a block, causal across blocks). The prefix never
sees blocks, so the prefix KV cache is the same whether blocks follow or not. Left padding keeps the
relative positions of real tokens fixed, and RoPE depends on relative positions only, so a prompt
padded in a batch and the same prompt alone give the same outputs.

Block l > 0 embeds layer l-1's codes: per action step t, ``sum_h code_emb[h, codes[t, h]]`` plus a
layer embedding and a step embedding. Each block position t reads out its H tokens of layer l through
the layer's head ``Linear(D, H*G)``.

An auxiliary head (training only) predicts the coarse layers 0..K-1 from the last-prompt-token hidden
state, so that this vector, the draft model's input, carries the coarse codes.

Axis legend: B batch, P prefix length, W block width (= T), T chunk_len, H action_hidden_dim,
L num RFSQ layers, G grid size, D hidden size, S image side.
"""

from __future__ import annotations

import dataclasses
import inspect
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers import DynamicCache, LlamaConfig, LlamaModel, ResNetConfig, ResNetModel

from common.policy import PrefixState
from common.shapes import RFSQShape
from common.vla.tokenizer import InstructionTokenizer

NUM_CAMERAS = 2  # agentview, wrist


@dataclass
class EmbeddedVLAConfig:
    """Everything needed to rebuild the embedded VLA (stored as config.json next to the weights)."""

    image_size: int = 64
    vision_embedding_size: int = 32
    vision_hidden_sizes: list[int] = field(default_factory=lambda: [32, 64, 128])
    vision_depths: list[int] = field(default_factory=lambda: [1, 1, 1])
    hidden_size: int = 256
    intermediate_size: int = 768
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    max_text_len: int = 32
    proprio_dim: int = 8
    proprio_mean: list[float] = field(default_factory=lambda: [0.0] * 8)
    proprio_std: list[float] = field(default_factory=lambda: [1.0] * 8)
    words: list[str] = field(default_factory=list)
    chunk_len: int = 8
    action_dim: int = 7
    action_hidden_dim: int = 16
    num_layers: int = 8
    grid_size: int = 7
    num_coarse_layers: int = 3
    codec_sha256: str = ""
    #: layers decoded sequentially at run time (None: all num_layers); the later layers are set to the
    #: centre level without a pass. Chosen from the layer information (common/layer_info.py).
    decode_layers: int | None = None

    def __post_init__(self) -> None:
        if self.image_size < 16 or self.image_size % 16:
            raise ValueError(f"image_size must be a positive multiple of 16, got {self.image_size}")
        if len(self.vision_hidden_sizes) != len(self.vision_depths):
            raise ValueError(
                f"vision_hidden_sizes {self.vision_hidden_sizes} and vision_depths {self.vision_depths} "
                "must have the same length"
            )
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} must be divisible by num_attention_heads {self.num_attention_heads}"
            )
        if len(self.proprio_mean) != self.proprio_dim or len(self.proprio_std) != self.proprio_dim:
            raise ValueError(f"proprio_mean/std must have {self.proprio_dim} entries")
        if min(self.proprio_std) <= 0:
            raise ValueError(f"proprio_std must be positive, got {self.proprio_std}")
        _ = self.shape  # validates the RFSQ shape
        if self.decode_layers is not None and not 1 <= self.decode_layers <= self.num_layers:
            raise ValueError(
                f"decode_layers must be in 1..{self.num_layers} or None, got {self.decode_layers}"
            )

    @property
    def shape(self) -> RFSQShape:
        return RFSQShape(
            chunk_len=self.chunk_len,
            action_dim=self.action_dim,
            action_hidden_dim=self.action_hidden_dim,
            num_layers=self.num_layers,
            grid_size=self.grid_size,
            num_coarse_layers=self.num_coarse_layers,
        )

    @property
    def tokens_per_image(self) -> int:
        side = self.image_size // 4 // 2 ** (len(self.vision_hidden_sizes) - 1)
        return side * side

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EmbeddedVLAConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown EmbeddedVLAConfig keys {sorted(unknown)}")
        return cls(**d)


def downsample_images(images: np.ndarray | torch.Tensor, size: int) -> torch.Tensor:
    """[N, h, w, 3] uint8 (upright camera frames) -> [N, size, size, 3] uint8 by area averaging.

    The single image-resizing function used for training data and at run time alike.
    """
    x = torch.as_tensor(np.asarray(images)) if not isinstance(images, torch.Tensor) else images
    if x.dtype != torch.uint8 or x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"expected [N, h, w, 3] uint8 images, got {tuple(x.shape)} {x.dtype}")
    if x.shape[1] == size and x.shape[2] == size:
        return x.contiguous()
    xf = x.permute(0, 3, 1, 2).float()  # [N, 3, h, w]
    xf = F.interpolate(xf, size=(size, size), mode="area")  # [N, 3, S, S]
    return xf.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()  # [N, S, S, 3]


def normalize_images(images: torch.Tensor) -> torch.Tensor:
    """[..., S, S, 3] uint8 -> [..., 3, S, S] float in [-1, 1]."""
    x = images.float().div(127.5).sub(1.0)
    return x.movedim(-1, -3)


def block_attention_mask(
    prefix_valid: torch.Tensor, num_blocks: int, block_width: int, num_query: int, dtype: torch.dtype
) -> torch.Tensor:
    """Additive 4D mask for the last ``num_query`` positions of [prefix | num_blocks blocks].

    prefix_valid: [B, P] bool (False = left padding)
    returns:      [B, 1, num_query, P + num_blocks*W] (0 where attended, dtype-min elsewhere)
    """
    b, p = prefix_valid.shape
    s = p + num_blocks * block_width
    dev = prefix_valid.device
    # block index of each position: -1 for the prefix, 0.. for the blocks
    blk = torch.full((s,), -1, dtype=torch.long, device=dev)
    blk[p:] = torch.arange(num_blocks, device=dev).repeat_interleave(block_width)
    q_blk = blk[s - num_query :]  # [q]
    # prefix queries see the prefix only; block queries see the prefix and blocks <= their own
    allowed = (blk[None, :] == -1) | ((q_blk[:, None] >= 0) & (blk[None, :] <= q_blk[:, None]))  # [q, s]
    key_valid = torch.ones(b, s, dtype=torch.bool, device=dev)
    key_valid[:, :p] = prefix_valid
    allowed = allowed[None] & key_valid[:, None, :]  # [B, q, s]
    mask = torch.zeros(b, 1, num_query, s, dtype=dtype, device=dev)
    return mask.masked_fill(~allowed[:, None], torch.finfo(dtype).min)


def _lm_cache_kwarg(lm: LlamaModel) -> str:
    """transformers renamed ``past_key_values`` to ``cache``; use whichever this version takes."""
    params = inspect.signature(lm.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


class EmbeddedVLA(nn.Module):
    """The network: camera encoders, instruction/proprio embeddings, Llama LM, RFSQ block decoder."""

    def __init__(self, config: EmbeddedVLAConfig) -> None:
        super().__init__()
        self.config = config
        shape = config.shape
        d = config.hidden_size
        self.tokenizer = InstructionTokenizer(config.words)
        vision_cfg = ResNetConfig(
            num_channels=3,
            embedding_size=config.vision_embedding_size,
            hidden_sizes=list(config.vision_hidden_sizes),
            depths=list(config.vision_depths),
            layer_type="basic",
            hidden_act="relu",
            downsample_in_first_stage=False,
        )
        self.vision = nn.ModuleList([ResNetModel(vision_cfg) for _ in range(NUM_CAMERAS)])
        n_img = config.tokens_per_image
        self.image_proj = nn.ModuleList(
            [nn.Linear(config.vision_hidden_sizes[-1], d) for _ in range(NUM_CAMERAS)]
        )
        self.image_pos = nn.Parameter(torch.randn(NUM_CAMERAS, n_img, d) * 0.02)
        self.proprio_proj = nn.Sequential(nn.Linear(config.proprio_dim, d), nn.GELU(), nn.Linear(d, d))
        self.act_token = nn.Parameter(torch.randn(d) * 0.02)
        lm_cfg = LlamaConfig(
            vocab_size=self.tokenizer.vocab_size,
            hidden_size=d,
            intermediate_size=config.intermediate_size,
            num_hidden_layers=config.num_hidden_layers,
            num_attention_heads=config.num_attention_heads,
            num_key_value_heads=config.num_attention_heads,
            max_position_embeddings=1024,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=None,
            tie_word_embeddings=False,
        )
        lm_cfg._attn_implementation = "sdpa"
        self.lm = LlamaModel(lm_cfg)
        self._cache_kwarg = _lm_cache_kwarg(self.lm)
        # block decoder
        self.queries = nn.Parameter(torch.randn(shape.chunk_len, d) * 0.02)  # block 0
        self.code_emb = nn.Embedding(shape.action_hidden_dim * shape.grid_size, d)  # (h, code) -> [D]
        self.layer_emb = nn.Parameter(torch.randn(shape.num_layers, d) * 0.02)
        self.step_emb = nn.Parameter(torch.randn(shape.chunk_len, d) * 0.02)
        hg = shape.action_hidden_dim * shape.grid_size
        self.head_w = nn.Parameter(torch.randn(shape.num_layers, d, hg) * d**-0.5)
        self.head_b = nn.Parameter(torch.zeros(shape.num_layers, hg))
        # auxiliary coarse-code head on the last-prompt-token hidden state (training signal only)
        self.aux_head = nn.Linear(d, shape.num_coarse_layers * shape.tokens_per_layer * shape.grid_size)
        self.register_buffer(
            "proprio_mean", torch.tensor(config.proprio_mean, dtype=torch.float32), persistent=False
        )
        self.register_buffer(
            "proprio_std", torch.tensor(config.proprio_std, dtype=torch.float32), persistent=False
        )
        self.register_buffer(
            "_code_offsets",
            torch.arange(shape.action_hidden_dim) * shape.grid_size,
            persistent=False,
        )

    # ----------------------------------------------------------------------------------- inputs
    @property
    def shape(self) -> RFSQShape:
        return self.config.shape

    def tokenize(self, instructions: list[str], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """-> text ids [B, Lt] long, validity [B, Lt] bool (left-padded to the batch's longest)."""
        ids, mask = self.tokenizer.batch_encode(instructions, self.config.max_text_len)
        return torch.tensor(ids, device=device), torch.tensor(mask, device=device)

    def embed_prefix(
        self, images: torch.Tensor, proprio: torch.Tensor, text_ids: torch.Tensor, text_valid: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Embed the prompt.

        images:     [B, 2, 3, S, S] float in [-1, 1] (agentview, wrist)
        proprio:    [B, 8] float raw proprio
        text_ids:   [B, Lt] long, text_valid: [B, Lt] bool
        returns:    embeddings [B, P, D], validity [B, P] bool
        """
        b = images.shape[0]
        text = self.lm.embed_tokens(text_ids)  # [B, Lt, D]
        cams = []
        for c in range(NUM_CAMERAS):
            feat = self.vision[c](pixel_values=images[:, c]).last_hidden_state  # [B, C, s, s]
            feat = feat.flatten(2).transpose(1, 2)  # [B, N_img, C]
            cams.append(self.image_proj[c](feat) + self.image_pos[c])  # [B, N_img, D]
        prop = (proprio - self.proprio_mean) / self.proprio_std  # [B, 8]
        prop_tok = self.proprio_proj(prop)[:, None]  # [B, 1, D]
        act = self.act_token.expand(b, 1, -1)  # [B, 1, D]
        emb = torch.cat([text, *cams, prop_tok, act], dim=1)  # [B, P, D]
        n_rest = emb.shape[1] - text.shape[1]
        valid = torch.cat([text_valid, text_valid.new_ones(b, n_rest)], dim=1)  # [B, P]
        return emb, valid

    def embed_block(self, layer: int, prev_codes: torch.Tensor | None, batch: int) -> torch.Tensor:
        """Embeddings of block ``layer``: [B, W, D]. prev_codes: None for layer 0 else [B, T, H] long."""
        if layer == 0:
            if prev_codes is not None:
                raise ValueError("block 0 takes no codes (it is the learned queries)")
            return self.queries.expand(batch, -1, -1)
        if prev_codes is None:
            raise ValueError(f"block {layer} needs the codes of layer {layer - 1}")
        return self.embed_codes(prev_codes) + self.layer_emb[layer] + self.step_emb  # [B, T, D]

    def embed_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """[..., T, H] long codes -> [..., T, D] (sum over H of per-dimension code embeddings)."""
        g = self.shape.grid_size
        if codes.min() < 0 or codes.max() >= g:
            raise ValueError(f"codes must be in 0..{g - 1}, got range {int(codes.min())}..{int(codes.max())}")
        return self.code_emb(codes + self._code_offsets).sum(-2)  # [..., T, D]

    def read_out(self, hidden: torch.Tensor, layers: list[int]) -> torch.Tensor:
        """hidden [B, n*W, D] of n blocks at RFSQ layers ``layers`` -> logits [B, n, T, H, G]."""
        s = self.shape
        b = hidden.shape[0]
        h = hidden.view(b, len(layers), s.chunk_len, -1)  # [B, n, T, D]
        idx = torch.tensor(layers, device=hidden.device)
        logits = torch.einsum("bntd,nde->bnte", h, self.head_w[idx]) + self.head_b[idx][None, :, None]
        return logits.view(b, len(layers), s.chunk_len, s.action_hidden_dim, s.grid_size)

    # ----------------------------------------------------------------------------------- passes
    def _lm(
        self, emb: torch.Tensor, mask: torch.Tensor, start: int, cache: DynamicCache | None
    ) -> torch.Tensor:
        pos = torch.arange(start, start + emb.shape[1], device=emb.device)[None]  # [1, q]
        kwargs = {self._cache_kwarg: cache, "use_cache": cache is not None}
        out = self.lm(inputs_embeds=emb, attention_mask=mask, position_ids=pos, **kwargs)
        return out.last_hidden_state  # [B, q, D]

    def forward_train(
        self,
        images: torch.Tensor,
        proprio: torch.Tensor,
        text_ids: torch.Tensor,
        text_valid: torch.Tensor,
        codes: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        """Teacher forcing: prefix + all L blocks in one pass.

        codes:   [B, T, H, L] long target codes
        returns: logits [B, L, T, H, G], aux_logits [B, K, T, H, G], hidden [B, D]
        """
        s = self.shape
        b = images.shape[0]
        emb, valid = self.embed_prefix(images, proprio, text_ids, text_valid)  # [B, P, D]
        p = emb.shape[1]
        blocks = [self.embed_block(0, None, b)]
        prev = codes[..., : s.num_layers - 1].permute(0, 3, 1, 2)  # [B, L-1, T, H]
        blocks.append(
            self.embed_codes(prev) + self.layer_emb[1:, None] + self.step_emb  # [B, L-1, T, D]
        )
        blocks_emb = torch.cat([blocks[0][:, None], blocks[1]], dim=1).flatten(1, 2)  # [B, L*W, D]
        seq = torch.cat([emb, blocks_emb], dim=1)  # [B, P + L*W, D]
        mask = block_attention_mask(valid, s.num_layers, s.chunk_len, seq.shape[1], seq.dtype)
        out = self._lm(seq, mask, 0, None)  # [B, P + L*W, D]
        hidden = out[:, p - 1]  # [B, D]
        logits = self.read_out(out[:, p:], list(range(s.num_layers)))  # [B, L, T, H, G]
        aux = self.aux_head(hidden).view(
            b, s.num_coarse_layers, s.chunk_len, s.action_hidden_dim, s.grid_size
        )
        return {"logits": logits, "aux_logits": aux, "hidden": hidden}

    def prefix_pass(
        self, images: torch.Tensor, proprio: torch.Tensor, text_ids: torch.Tensor, text_valid: torch.Tensor
    ) -> PrefixState:
        """One pass over the prompt; returns the KV cache and the last-prompt-token hidden [B, D]."""
        emb, valid = self.embed_prefix(images, proprio, text_ids, text_valid)  # [B, P, D]
        p = emb.shape[1]
        cache = DynamicCache(config=self.lm.config)
        mask = block_attention_mask(valid, 0, self.shape.chunk_len, p, emb.dtype)
        out = self._lm(emb, mask, 0, cache)  # [B, P, D]
        return PrefixState(hidden=out[:, -1], cache=cache, prefix_len=p, num_blocks=0, extra={"valid": valid})

    def blocks_pass(self, state: PrefixState, blocks_emb: torch.Tensor, layers: list[int]) -> torch.Tensor:
        """Feed ``len(layers)`` new blocks after the cached ones; returns logits [B, n, T, H, G]."""
        w = self.shape.chunk_len
        n = len(layers)
        start = state.prefix_len + state.num_blocks * w
        if state.cache.get_seq_length() != start:
            raise RuntimeError(f"KV cache holds {state.cache.get_seq_length()} positions, expected {start}")
        mask = block_attention_mask(state.extra["valid"], state.num_blocks + n, w, n * w, blocks_emb.dtype)
        out = self._lm(blocks_emb, mask, start, state.cache)  # [B, n*W, D]
        state.num_blocks += n
        return self.read_out(out, layers)
