"""The 7B timing twin's network (docs/DESIGN.md §6.5): a Llama decoder with the RFSQ layer decoder on top.

Plain ``torch`` (no other package), fast enough to measure passes against their memory-bandwidth floor:

- a static KV cache ``[layers, B, heads, S_max, head_dim]``; new keys and values are written with
  ``index_copy_`` at positions held in a device tensor, so every pass has fixed shapes;
- block-causal attention from a mask computed on the device from those positions (prefix causal,
  full inside a block, causal across blocks), over the whole cache: stale entries of truncated
  blocks are masked, so ``truncate`` is free; single-block passes may instead attend to the filled
  part of the cache without a mask (``kv_len``), and the prefix pass causally (flash kernel);
- fused QKV and gate/up projections (one matrix product each); the layer function optionally
  compiled (:meth:`TwinModel.compile_layers`) and its block-pass products optionally the Triton
  kernels of :mod:`common.vla.twin_triton` (``skinny``; imported only then: triton is optional).

The prefix stands for image + text tokens: a patch embedding of the camera image(s) (a linear "vision
stem"; the vision encoder's own cost is timed by :mod:`common.vla.twin_vision`), the instruction's
bytes and one proprio token.

Axes: B batch, P prefix_len, W block width (= T), N new positions in a pass, S S_max (cache length),
D hidden, I intermediate, nh heads, hd head_dim, T H G L as in common/shapes.py.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from common.vla.twin_config import SKINNY_MAX_ROWS, TwinConfig


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Llama RMSNorm (computed in float32, as transformers does). x [..., D]."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def layer_step(
    x: torch.Tensor,  # [B, N, D]
    input_norm: torch.Tensor,  # [D]
    wqkv: torch.Tensor,  # [3D, D]
    wo: torch.Tensor,  # [D, D]
    post_norm: torch.Tensor,  # [D]
    wgu: torch.Tensor,  # [2I, D]
    wdown: torch.Tensor,  # [D, I]
    cos: torch.Tensor,  # [N, hd]
    sin: torch.Tensor,  # [N, hd]
    positions: torch.Tensor,  # [N] long, cache slots of the new positions
    mask: torch.Tensor,  # [N, S] additive (0 attend, -inf not)
    k_cache: torch.Tensor,  # [B, nh, S, hd], written in place
    v_cache: torch.Tensor,  # [B, nh, S, hd], written in place
    eps: float,
    num_heads: int,
    kv_len: int | None = None,
    skinny: bool = False,
    causal: bool = False,
) -> torch.Tensor:
    """One Llama decoder layer (a free function, so that one compiled graph serves all layers).

    ``kv_len`` (with ``mask`` None): attend to cache slots 0..kv_len-1 without a mask. Exact for one
    block whose last slot is kv_len - 1 (it sees the prefix, the earlier blocks and itself in full),
    and lets scaled_dot_product_attention take its mask-free kernels. With ``causal`` (the prefix
    pass: N = kv_len new positions from slot 0) attention is causal, and SDPA takes its flash kernel.

    ``skinny``: in passes of at most SKINNY_MAX_ROWS rows (block passes), the four weight products run
    as ``torch.ops.rsd_twin.skinny_linear``
    (common/vla/twin_triton.py: one Triton kernel per product that streams the weight once, with the
    residual adds and the SwiGLU fused into it); needs ``import common.vla.twin_triton`` first.
    """
    B, N, D = x.shape
    hd = D // num_heads
    skinny = (
        skinny and B * N <= SKINNY_MAX_ROWS
    )  # wider passes (verify, prefix): cuBLAS, fused by the compiler
    h = rms_norm(x, input_norm, eps)
    if skinny:
        qkv = torch.ops.rsd_twin.skinny_linear(h.view(B * N, D), wqkv, None, False)  # [B*N, 3D]
    else:
        qkv = F.linear(h, wqkv)  # [B, N, 3D]
    qkv = qkv.view(B, N, 3, num_heads, hd)  # [B, N, 3, nh, hd]
    qk = qkv[:, :, :2]  # [B, N, 2, nh, hd]: rotary on q and k together
    qk = qk * cos[:, None, None, :] + rotate_half(qk) * sin[:, None, None, :]
    q, k = qk[:, :, 0].transpose(1, 2), qk[:, :, 1].transpose(1, 2)  # [B, nh, N, hd]
    v = qkv[:, :, 2].transpose(1, 2)  # [B, nh, N, hd]
    k_cache.index_copy_(2, positions, k)
    v_cache.index_copy_(2, positions, v)
    if kv_len is not None:
        k_cache, v_cache = k_cache[:, :, :kv_len], v_cache[:, :, :kv_len]  # [B, nh, kv_len, hd]
    attn = F.scaled_dot_product_attention(
        q, k_cache, v_cache, attn_mask=mask, is_causal=causal and mask is None
    )  # [B, nh, N, hd]
    attn = attn.transpose(1, 2).reshape(B, N, D)
    if skinny:  # residual adds and SwiGLU inside the product kernels
        op = torch.ops.rsd_twin.skinny_linear
        x = op(attn.view(B * N, D), wo, x.view(B * N, D), False)  # [B*N, D]
        gu = op(rms_norm(x, post_norm, eps), wgu, None, False)  # [B*N, 2I]
        return op(gu, wdown, x, True).view(B, N, D)
    x = x + F.linear(attn, wo)
    h = rms_norm(x, post_norm, eps)
    gate, up = F.linear(h, wgu).chunk(2, dim=-1)  # [B, N, I] each
    return x + F.linear(F.silu(gate) * up, wdown)


class TwinDecoderLayer(nn.Module):
    """One Llama decoder layer's weights (fused q/k/v and gate/up projections)."""

    def __init__(self, cfg: TwinConfig):
        super().__init__()
        D, I = cfg.hidden_size, cfg.intermediate_size
        self.input_norm = nn.Parameter(torch.ones(D))
        self.post_norm = nn.Parameter(torch.ones(D))
        self.wqkv = nn.Parameter(torch.empty(3 * D, D))  # rows: q, k, v projections
        self.wo = nn.Parameter(torch.empty(D, D))
        self.wgu = nn.Parameter(torch.empty(2 * I, D))  # rows: gate, up projections
        self.wdown = nn.Parameter(torch.empty(D, I))

    def weights(self) -> tuple[torch.Tensor, ...]:
        return self.input_norm, self.wqkv, self.wo, self.post_norm, self.wgu, self.wdown


class TwinModel(nn.Module):
    """Llama decoder + prefix stem + RFSQ layer decoder (learned queries, code embeddings, heads)."""

    def __init__(self, cfg: TwinConfig):
        super().__init__()
        self.cfg = cfg
        D, s = cfg.hidden_size, cfg.shape
        patch_dim = cfg.patch_size * cfg.patch_size * 3
        self.patch_embed = nn.Linear(patch_dim, D)
        self.text_embed = nn.Embedding(256, D)  # instruction bytes
        self.proprio_embed = nn.Linear(8, D)
        self.layers = nn.ModuleList(TwinDecoderLayer(cfg) for _ in range(cfg.num_layers))
        self.final_norm = nn.Parameter(torch.ones(D))
        self.queries = nn.Parameter(torch.empty(cfg.block_width, D))  # block 0
        self.code_embed = nn.Parameter(torch.empty(s.action_hidden_dim, s.grid_size, D))  # per (h, code)
        self.layer_embed = nn.Parameter(torch.empty(s.num_layers, D))  # which layer a block predicts
        self.head = nn.Linear(D, s.action_hidden_dim * s.grid_size)  # per position: H tokens x G levels
        self.reset_parameters()
        self.register_buffer("rope_cos", torch.empty(0), persistent=False)
        self.register_buffer("rope_sin", torch.empty(0), persistent=False)
        self.ensure_positions(cfg.max_len)
        self.register_buffer("h_index", torch.arange(s.action_hidden_dim), persistent=False)
        self.layer_fn = layer_step
        self.prefix_fn: Callable | None = None  # the prefix pass's layer function (None: layer_fn)
        self.skinny = False

    def ensure_positions(self, n: int) -> None:
        """Rotary tables for positions 0..n-1 (more than max_len: wide tree-verify timing passes)."""
        if self.rope_cos.shape[0] >= n:
            return
        cfg = self.cfg
        dev = self.rope_cos.device
        inv_freq = 1.0 / (
            cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2, device=dev).float() / cfg.head_dim)
        )
        freqs = torch.outer(torch.arange(n, device=dev).float(), inv_freq)  # [S, hd/2]
        emb = torch.cat((freqs, freqs), dim=-1)  # [S, hd]
        self.rope_cos, self.rope_sin = emb.cos(), emb.sin()

    def compile_layers(self, skinny: bool = False) -> None:
        """Compile the layer function (torch.compile, dynamic N) to fuse its elementwise work.

        ``skinny``: the weight products as the Triton kernels of common/vla/twin_triton.py (see
        :func:`layer_step`).
        """
        torch._dynamo.reset()  # a fresh cache for layer_step (earlier variants would count as recompiles)
        self.layer_fn = torch.compile(layer_step, dynamic=True, fullgraph=True)
        self.use_skinny(skinny)

    def use_skinny(self, on: bool = True) -> None:
        """Run the weight products through the Triton kernels (imports common.vla.twin_triton: triton)."""
        if on:
            import common.vla.twin_triton  # noqa: F401  (heavy optional dependency; registers the op)
        self.skinny = on

    @torch.no_grad()
    def reset_parameters(self, std: float = 0.02) -> None:
        for name, p in self.named_parameters():
            if name.endswith("norm"):
                p.fill_(1.0)
            elif name.endswith("bias"):
                p.zero_()
            else:
                p.normal_(0.0, std)

    # ---- embeddings
    def embed_prefix(
        self, images: torch.Tensor, text_ids: torch.Tensor, proprio: torch.Tensor
    ) -> torch.Tensor:
        """images [B, n_img, 3, S_img, S_img] float in [0, 1], text_ids [B, text_len], proprio [B, 8] -> [B, P, D]."""
        p = self.cfg.patch_size
        B, n, C, S, _ = images.shape
        g = S // p
        patches = (
            images.reshape(B, n, C, g, p, g, p).permute(0, 1, 3, 5, 2, 4, 6).reshape(B, n * g * g, C * p * p)
        )
        x_img = self.patch_embed(patches.to(self.patch_embed.weight.dtype))  # [B, n*g*g, D]
        x_txt = self.text_embed(text_ids)  # [B, text_len, D]
        x_pro = self.proprio_embed(proprio.to(self.proprio_embed.weight.dtype))[:, None]  # [B, 1, D]
        return torch.cat([x_img, x_txt, x_pro], dim=1)

    def embed_blocks(self, codes: torch.Tensor, first_block: torch.Tensor, with_query: bool) -> torch.Tensor:
        """codes [B, k, T, H] long -> block inputs [B, (k + with_query) * W, D].

        Code block i predicts layer ``first_block + i`` (it holds the codes of the layer before).
        """
        B, k = codes.shape[:2]
        blocks = []
        if with_query:
            q = self.queries + self.layer_embed[0]  # [W, D]
            blocks.append(q.expand(B, 1, *q.shape))  # [B, 1, W, D]
        if k:
            emb = self.code_embed[self.h_index, codes].sum(-2)  # [B, k, T, D]
            idx = first_block + torch.arange(k, device=codes.device)  # [k]
            blocks.append(emb + self.layer_embed[idx][None, :, None, :])
        x = torch.cat(blocks, dim=1) if len(blocks) > 1 else blocks[0]  # [B, nb, W, D]
        return x.reshape(B, -1, x.shape[-1])

    # ---- the decoder
    def attention_mask(self, positions: torch.Tensor, num_keys: int | None = None) -> torch.Tensor:
        """Block-causal mask for new positions [N] over all S cache slots -> [N, S] bool."""
        P, W = self.cfg.prefix_len, self.cfg.block_width
        keys = torch.arange(
            self.cfg.max_len if num_keys is None else num_keys, device=positions.device
        )  # [S]

        def block_of(pos: torch.Tensor) -> torch.Tensor:  # -1 for the prefix
            return torch.where(
                pos < P, torch.full_like(pos, -1), torch.div(pos - P, W, rounding_mode="floor")
            )

        qb, kb = block_of(positions)[:, None], block_of(keys)[None, :]  # [N, 1], [1, S]
        same = qb == kb
        causal_in_prefix = keys[None, :] <= positions[:, None]
        return (kb < qb) | (same & ((qb >= 0) | causal_in_prefix))

    def forward(
        self,
        x: torch.Tensor,
        start: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        kv_len: int | None = None,
        causal: bool = False,
    ) -> torch.Tensor:
        """x [B, N, D] at cache slots start..start+N-1 (start: 0-dim long tensor) -> final-norm hidden [B, N, D].

        kv_len: for a single block ending at slot kv_len - 1, attend to slots < kv_len with no mask;
        with ``causal``, for the prefix (N = kv_len positions from slot 0): causal attention, no mask.
        The cache may be longer than ``cfg.max_len`` (wide tree passes): the mask covers all its slots.
        """
        N = x.shape[1]
        positions = start + torch.arange(N, device=x.device)  # [N]
        cos = self.rope_cos[positions].to(x.dtype)  # [N, hd]
        sin = self.rope_sin[positions].to(x.dtype)
        if kv_len is None:
            allowed = self.attention_mask(positions, k_cache.shape[-2])  # [N, S]
            mask = torch.zeros(allowed.shape, dtype=x.dtype, device=x.device).masked_fill(
                ~allowed, float("-inf")
            )
        elif causal:
            if N != kv_len:
                raise ValueError(f"a causal pass covers slots 0..{kv_len - 1}: N must be {kv_len}, got {N}")
            mask = None
        else:
            if N != self.cfg.block_width:
                raise ValueError(
                    f"kv_len serves single-block passes of {self.cfg.block_width} positions, got {N}"
                )
            mask = None
        eps, nh = self.cfg.rms_eps, self.cfg.num_heads
        fn = self.prefix_fn if (causal and self.prefix_fn is not None) else self.layer_fn
        for i, layer in enumerate(self.layers):
            x = fn(
                x,
                *layer.weights(),
                cos,
                sin,
                positions,
                mask,
                k_cache[i],
                v_cache[i],
                eps,
                nh,
                kv_len,
                self.skinny,
                causal,
            )
        return rms_norm(x, self.final_norm, self.cfg.rms_eps)

    def block_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [B, nb*W, D] -> logits [B, nb, T, H, G] (float32)."""
        s = self.cfg.shape
        B = hidden.shape[0]
        return self.head(hidden).float().view(B, -1, s.chunk_len, s.action_hidden_dim, s.grid_size)
