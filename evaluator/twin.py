"""The 7B timing twin: OpenVLA-7B's language-model shapes with random weights (docs/DESIGN.md §6.5).

A Llama-2-7B decoder (hidden 4096, 32 layers, 32 heads, MLP 11008, RMSNorm, rotary positions,
SwiGLU) with the RFSQ layer decoder of docs/DESIGN.md §9.1 on top, implemented on plain ``torch`` (no other
package) so that it runs on any machine that has PyTorch, and fast enough to measure the passes
against their memory-bandwidth floor:

- a static, preallocated KV cache ``[layers, B, heads, S_max, head_dim]``; new keys and values are
  written with ``index_copy_`` at positions held in a device tensor, so every pass has fixed shapes;
- block-causal attention from a mask computed on the device from those positions (prefix causal,
  full inside a block, causal across blocks), over the whole cache: stale entries of truncated
  blocks are masked, so ``truncate`` is free;
- fused QKV and gate/up projections (one matrix product each);
- optional CUDA graphs: one graph per pass shape (prefix, block 0, block l > 0, verify of k drafted
  layers), replayed with the inputs copied into static buffers.

Timing does not depend on weight values; acceptance does, and comes from trained models (the
embedded VLA), never from this twin. The prefix stands for image + text tokens: a patch
embedding of the camera image(s) (a linear "vision stem", not a vision transformer: the vision
encoder costs the same in baseline and RSD decoding and is not part of what is compared), the
instruction's bytes and one proprio token.

Axes: B batch, P prefix_len, W block width (= T), N new positions in a pass, S S_max (cache length),
D hidden, I intermediate, nh heads, hd head_dim, T H G L as in common/shapes.py.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from common.codec import RFSQCodec
from common.policy import LayerwisePolicy, Observation, PolicyOutput, PrefixState
from common.shapes import DEFAULT_SHAPE, RFSQShape


@dataclass(frozen=True)
class TwinConfig:
    """Shapes of the twin. Defaults: Llama-2-7B (OpenVLA-7B's language model) with a ~280-token prefix."""

    hidden_size: int = 4096
    num_layers: int = 32
    num_heads: int = 32
    intermediate_size: int = 11008
    rms_eps: float = 1e-5
    rope_theta: float = 10000.0
    image_size: int = 224
    patch_size: int = 14
    num_images: int = 1
    text_len: int = 23
    batch_size: int = 1
    shape: RFSQShape = DEFAULT_SHAPE

    def __post_init__(self) -> None:
        for name in (
            "hidden_size",
            "num_layers",
            "num_heads",
            "intermediate_size",
            "image_size",
            "patch_size",
        ):
            if getattr(self, name) <= 0:
                raise ValueError(f"TwinConfig.{name} must be positive, got {getattr(self, name)}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if (self.hidden_size // self.num_heads) % 2:
            raise ValueError("head_dim must be even for rotary embeddings")
        if self.image_size % self.patch_size:
            raise ValueError(
                f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}"
            )
        if self.num_images not in (1, 2):
            raise ValueError(f"num_images must be 1 (agentview) or 2 (+ wrist), got {self.num_images}")
        if self.text_len < 1 or self.batch_size < 1:
            raise ValueError(f"text_len and batch_size must be >= 1, got {self.text_len}, {self.batch_size}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def patches_per_image(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def prefix_len(self) -> int:
        """Image patches + instruction tokens + one proprio token."""
        return self.num_images * self.patches_per_image + self.text_len + 1

    @property
    def block_width(self) -> int:
        return self.shape.chunk_len

    @property
    def max_len(self) -> int:
        """Cache length: prefix + L blocks, rounded up to a multiple of 16 (aligned attention masks)."""
        n = self.prefix_len + self.shape.num_layers * self.block_width
        return -(-n // 16) * 16

    def layer_params(self) -> int:
        """Parameters of the decoder layers (what every pass reads)."""
        D, I = self.hidden_size, self.intermediate_size
        return self.num_layers * (4 * D * D + 3 * D * I + 2 * D)


def llama7b_config(prefix_tokens: int = 280, **overrides) -> TwinConfig:
    """Llama-2-7B shapes with a prefix of 280 (one 224 px image) or 600 tokens (two images, as OpenVLA-OFT)."""
    if prefix_tokens == 280:
        return TwinConfig(num_images=1, text_len=23, **overrides)
    if prefix_tokens == 600:
        return TwinConfig(num_images=2, text_len=87, **overrides)
    raise ValueError(f"prefix_tokens must be 280 or 600, got {prefix_tokens}")


def tiny_config(**overrides) -> TwinConfig:
    """A few-hundred-kilobyte twin for CPU tests (same code paths as the 7B one)."""
    base = dict(
        hidden_size=64,
        num_layers=2,
        num_heads=4,
        intermediate_size=128,
        image_size=32,
        patch_size=8,
        num_images=1,
        text_len=7,
    )
    base.update(overrides)
    return TwinConfig(**base)


# ------------------------------------------------------------------------------------------ model
SKINNY_MAX_ROWS = 8  # rows up to which layer_step(skinny=True) uses the Triton products (block passes)


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
    math_attention: bool = False,
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
    (evaluator/twin_triton.py: one Triton kernel per product that streams the weight once, with the
    residual adds and the SwiGLU fused into it); needs ``import evaluator.twin_triton`` first.
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
    if math_attention:  # two batched products and a softmax that the compiler can fuse
        scores = torch.matmul(q, k_cache.transpose(-1, -2)) * hd**-0.5  # [B, nh, N, S]
        if mask is not None:
            scores = scores + mask
        if causal:
            scores = scores.masked_fill(
                torch.ones_like(scores[0, 0], dtype=torch.bool).triu(1), float("-inf")
            )
        attn = torch.matmul(scores.float().softmax(-1).to(q.dtype), v_cache)  # [B, nh, N, hd]
    else:
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
        self.math_attention = False
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

    def compile_layers(self, math_attention: bool = False, skinny: bool = False) -> None:
        """Compile the layer function (torch.compile, dynamic N) to fuse its elementwise work.

        ``math_attention`` spells attention as two matrix products and a softmax instead of
        scaled_dot_product_attention (whichever measures faster). ``skinny``: the weight products
        as the Triton kernels of evaluator/twin_triton.py (see :func:`layer_step`).
        """
        torch._dynamo.reset()  # a fresh cache for layer_step (earlier variants would count as recompiles)
        self.layer_fn = torch.compile(layer_step, dynamic=True, fullgraph=True)
        self.math_attention = math_attention
        self.use_skinny(skinny)

    def use_skinny(self, on: bool = True) -> None:
        """Run the weight products through the Triton kernels (imports evaluator.twin_triton)."""
        if on:
            import evaluator.twin_triton  # noqa: F401  (registers torch.ops.rsd_twin.skinny_linear)
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
                self.math_attention,
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


# ------------------------------------------------------------------------------------------ policy
class TwinPolicy(LayerwisePolicy):
    """The twin as a :class:`LayerwisePolicy` (static KV cache; CUDA graphs when ``cuda_graphs``)."""

    def __init__(
        self,
        cfg: TwinConfig,
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        cuda_graphs: bool = False,
        seed: int = 0,
        sliced_attention: bool = False,
        prefix_flash: bool = False,
    ):
        """sliced_attention: single-block passes attend to the filled part of the cache without a mask
        (one pass shape, and one CUDA graph, per block index) instead of masking the whole cache.
        prefix_flash: the prefix pass attends causally to its own P slots without a mask (flash kernel)."""
        self.cfg = cfg
        self.sliced_attention = sliced_attention
        self.prefix_flash = prefix_flash
        self.shape = cfg.shape
        self.hidden_dim = cfg.hidden_size
        self.device = torch.device(device)
        self.dtype = dtype
        if cuda_graphs and self.device.type != "cuda":
            raise ValueError(f"cuda_graphs needs a CUDA device, got {self.device}")
        self.cuda_graphs = cuda_graphs
        self.backbone_id = (
            f"twin-llama-d{cfg.hidden_size}-l{cfg.num_layers}-p{cfg.prefix_len}@random-seed{seed}"
        )
        torch.manual_seed(seed)
        with torch.device(self.device):
            self.model = TwinModel(cfg).to(dtype).eval()
            self.codec = RFSQCodec(shape=cfg.shape).eval()  # random weights: actions are for shape only
        self.model.requires_grad_(False)
        self.codec.requires_grad_(False)
        B, nh, S, hd = cfg.batch_size, cfg.num_heads, cfg.max_len, cfg.head_dim
        cache_shape = (cfg.num_layers, B, nh, S, hd)
        self.k_cache = torch.zeros(cache_shape, device=self.device, dtype=dtype)
        self.v_cache = torch.zeros(cache_shape, device=self.device, dtype=dtype)
        # Static inputs (graphs read these buffers; eager passes use them too).
        self._start = torch.zeros((), dtype=torch.long, device=self.device)
        self._first_block = torch.zeros((), dtype=torch.long, device=self.device)
        self._prefix_in = torch.zeros(B, cfg.prefix_len, cfg.hidden_size, device=self.device, dtype=dtype)
        self._codes_in: dict[int, torch.Tensor] = {}
        self._graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._pool = None

    # ---- sizes
    def weight_bytes(self) -> int:
        """Bytes of the decoder-layer weights every pass reads (the memory floor's numerator)."""
        return sum(p.numel() * p.element_size() for p in self.model.layers.parameters())

    def kv_bytes(self) -> int:
        """Bytes of the whole KV cache (every pass attends over all of it)."""
        return self.k_cache.numel() * self.k_cache.element_size() * 2

    # ---- static passes (fixed shapes; graph-capturable)
    def _codes_buffer(self, k: int) -> torch.Tensor:
        if k not in self._codes_in:
            s = self.shape
            self._codes_in[k] = torch.zeros(
                self.cfg.batch_size, k, s.chunk_len, s.action_hidden_dim, dtype=torch.long, device=self.device
            )
        return self._codes_in[k]

    def _pass_fn(self, key: tuple) -> Callable[[], torch.Tensor]:
        m = self.model
        if key[0] == "prefix":
            flash = key[1]
            kv_len = self.cfg.prefix_len if flash else None

            def run() -> torch.Tensor:
                h = m(self._prefix_in, self._start, self.k_cache, self.v_cache, kv_len, flash)  # [B, P, D]
                return h[:, -1].float()  # [B, D]

            return run
        _, with_query, k, kv_len = key
        codes = self._codes_buffer(k)

        def run() -> torch.Tensor:
            x = m.embed_blocks(codes, self._first_block, with_query)  # [B, N, D]
            h = m(x, self._start, self.k_cache, self.v_cache, kv_len)  # [B, N, D]
            return m.block_logits(h)  # [B, nb, T, H, G]

        return run

    @torch.no_grad()
    def _run(self, key: tuple) -> torch.Tensor:
        if not self.cuda_graphs:
            return self._pass_fn(key)()
        if key not in self._graphs:
            fn = self._pass_fn(key)
            stream = torch.cuda.Stream(self.device)
            stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(stream):
                for _ in range(2):  # warm-up outside the graph (allocator, kernels' first launch)
                    fn()
            torch.cuda.current_stream(self.device).wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pool):
                out = fn()
            self._pool = graph.pool()
            self._graphs[key] = (graph, out)
        graph, out = self._graphs[key]
        graph.replay()
        return out.clone()

    def reset_graphs(self) -> None:
        """Drop captured graphs (after switching the layer function)."""
        self._graphs.clear()
        self._pool = None
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()

    def capture_all(self, max_drafted: int) -> None:
        """Capture (or warm up) every pass shape up to ``max_drafted`` drafted layers."""
        state = self.prefix_from_embeds(torch.zeros_like(self._prefix_in))
        self.decode_block(state, None)
        for _ in range(1, self.shape.num_layers):  # one shape per block index with sliced attention
            self.decode_block(state, torch.zeros_like(self._codes_buffer(1)[:, 0]))
            if not self.sliced_attention:
                break
        for k in range(1, max_drafted + 1):
            self.truncate(state, 0)
            self.verify(state, torch.zeros_like(self._codes_buffer(k)))

    # ---- LayerwisePolicy
    def observations_to_inputs(self, observations: list[Observation]) -> tuple[torch.Tensor, ...]:
        cfg = self.cfg
        if len(observations) != cfg.batch_size:
            raise ValueError(
                f"the twin's cache holds a batch of {cfg.batch_size}, got {len(observations)} observations"
            )
        imgs, texts, props = [], [], []
        for obs in observations:
            views = [obs.agentview] + ([obs.wrist] if cfg.num_images == 2 else [])
            frames = []
            for v in views:
                t = (
                    torch.as_tensor(np.ascontiguousarray(v), device=self.device).permute(2, 0, 1).float()
                    / 255.0
                )
                frames.append(
                    F.interpolate(t[None], size=(cfg.image_size, cfg.image_size), mode="bilinear")[0]
                )
            imgs.append(torch.stack(frames))  # [n_img, 3, S, S]
            ids = list(obs.instruction.encode("utf-8")[: cfg.text_len])
            texts.append(ids + [0] * (cfg.text_len - len(ids)))
            props.append(torch.as_tensor(np.asarray(obs.proprio, dtype=np.float32), device=self.device))
        text_ids = torch.tensor(texts, dtype=torch.long, device=self.device)
        return torch.stack(imgs), text_ids, torch.stack(props)

    @torch.no_grad()
    def prefix(self, observations: list[Observation]) -> PrefixState:
        images, text_ids, proprio = self.observations_to_inputs(observations)
        return self.prefix_from_embeds(self.model.embed_prefix(images, text_ids, proprio))

    @torch.no_grad()
    def prefix_from_embeds(self, embeds: torch.Tensor) -> PrefixState:
        """embeds [B, P, D] (e.g. random tokens for timing) -> state after the prefix pass."""
        if tuple(embeds.shape) != tuple(self._prefix_in.shape):
            raise ValueError(
                f"prefix embeddings must be {list(self._prefix_in.shape)}, got {list(embeds.shape)}"
            )
        self._prefix_in.copy_(embeds)
        self._start.fill_(0)
        hidden = self._run(("prefix", self.prefix_flash))  # [B, D]
        return PrefixState(hidden=hidden, cache=None, prefix_len=self.cfg.prefix_len, num_blocks=0)

    def _kv_len(self, block: int) -> int | None:
        """Filled cache length after single block ``block`` (sliced attention), else None (masked)."""
        if not self.sliced_attention:
            return None
        return self.cfg.prefix_len + (block + 1) * self.cfg.block_width

    def _block_start(self, block: int) -> None:
        self._start.fill_(self.cfg.prefix_len + block * self.cfg.block_width)

    @torch.no_grad()
    def decode_block(self, state: PrefixState, prev_codes: torch.Tensor | None) -> torch.Tensor:
        nb = state.num_blocks
        if nb >= self.shape.num_layers:
            raise ValueError(f"all {self.shape.num_layers} layers are decoded already")
        self._block_start(nb)
        kv_len = self._kv_len(nb)
        if prev_codes is None:
            if nb != 0:
                raise ValueError("prev_codes=None (the query block) is only valid for block 0")
            logits = self._run(("blocks", True, 0, kv_len))
        else:
            if nb == 0:
                raise ValueError("block 0 takes the learned queries: pass prev_codes=None")
            self._codes_buffer(1).copy_(prev_codes[:, None])
            self._first_block.fill_(nb)
            logits = self._run(("blocks", False, 1, kv_len))
        state.num_blocks = nb + 1
        return logits[:, 0]  # [B, T, H, G]

    @torch.no_grad()
    def verify(self, state: PrefixState, drafted: torch.Tensor) -> torch.Tensor:
        if state.num_blocks != 0:
            raise ValueError(f"verify needs a fresh prefix state, got {state.num_blocks} decoded blocks")
        k = drafted.shape[1]
        if k + 1 > self.shape.num_layers:
            raise ValueError(f"at most {self.shape.num_layers - 1} drafted layers can be verified, got {k}")
        self._block_start(0)
        if k:
            self._codes_buffer(k).copy_(drafted)
        self._first_block.fill_(1)
        logits = self._run(("blocks", True, k, self._kv_len(0) if k == 0 else None))  # [B, k+1, T, H, G]
        state.num_blocks = k + 1
        return logits

    def truncate(self, state: PrefixState, num_blocks: int) -> None:
        if not 0 <= num_blocks <= state.num_blocks:
            raise ValueError(f"cannot truncate {state.num_blocks} blocks to {num_blocks}")
        state.num_blocks = num_blocks  # later blocks are masked by position; nothing to free

    @torch.no_grad()
    def codes_to_actions(self, codes: torch.Tensor) -> torch.Tensor:
        return self.codec.decode(codes.to(self.device)).clamp(-1.0, 1.0)

    @torch.no_grad()
    def act(self, observations: list[Observation]) -> list[PolicyOutput]:
        state = self.prefix(observations)
        codes = self.decode_sequential(state)  # [B, T, H, L]
        actions = self.codes_to_actions(codes)
        return [
            PolicyOutput(
                hidden=state.hidden[b].cpu().numpy(),
                codes=codes[b].to(torch.uint8).cpu().numpy(),
                actions=actions[b].float().cpu().numpy(),
            )
            for b in range(len(observations))
        ]


def memory_floor_s(num_bytes: int, bandwidth_bytes_per_s: float) -> float:
    """Seconds to stream ``num_bytes`` once at the measured bandwidth."""
    if bandwidth_bytes_per_s <= 0 or not math.isfinite(bandwidth_bytes_per_s):
        raise ValueError(f"bandwidth must be positive and finite, got {bandwidth_bytes_per_s}")
    return num_bytes / bandwidth_bytes_per_s
