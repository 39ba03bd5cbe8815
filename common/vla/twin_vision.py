"""Timing twin of OpenVLA's vision encoder: SigLIP + DINOv2 on each camera image, fused, projected.

OpenVLA(-OFT) runs every 224 px image through two ViTs side by side and concatenates their patch
features (Prismatic's "dinosiglip" backbone), then a 3-layer GELU MLP projects them to the language
model's width; OFT sends two images (third-person + wrist), i.e. 2 x 256 image tokens of the
600-token prefix. Shapes (random bf16 weights: timing only, like common/vla/twin.py):

- SigLIP ViT-SO400M/14 at 224 px: width 1152, 27 blocks, 16 heads, MLP 4304, 256 patches;
- DINOv2 ViT-L/14 with 4 registers: width 1024, 24 blocks, 16 heads, MLP 4096, LayerScale,
  256 patches + CLS + 4 registers;
- both read out at the second-to-last block (as OpenVLA's featurizer), so the last block is not run;
- projector 2176 -> 8704 -> 4096 -> 4096 (GELU between).

The patch embedding is a linear map of 14 x 14 x 3 patches (what the stride-14 convolution computes).
Axes: B images, N tokens, C width, P patches.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class ViTConfig:
    width: int
    depth: int
    heads: int
    mlp: int
    extra_tokens: int = 0  # CLS + registers (dropped from the output)
    layerscale: bool = False
    gelu_tanh: bool = False
    patch: int = 14
    image: int = 224

    @property
    def patches(self) -> int:
        return (self.image // self.patch) ** 2


SIGLIP_SO400M = ViTConfig(width=1152, depth=27, heads=16, mlp=4304, gelu_tanh=True)
DINOV2_L_REG4 = ViTConfig(width=1024, depth=24, heads=16, mlp=4096, extra_tokens=5, layerscale=True)


def tiny_vision() -> tuple[ViTConfig, ViTConfig, int]:
    """A CPU-test-sized pair of encoders and LLM width (same code paths)."""
    a = ViTConfig(width=32, depth=3, heads=2, mlp=64, gelu_tanh=True, patch=8, image=32)
    b = ViTConfig(width=16, depth=3, heads=2, mlp=32, extra_tokens=5, layerscale=True, patch=8, image=32)
    return a, b, 64


def vit_block(
    x: torch.Tensor,  # [B, N, C]
    ln1_w: torch.Tensor,
    ln1_b: torch.Tensor,
    qkv_w: torch.Tensor,  # [3C, C]
    qkv_b: torch.Tensor,
    proj_w: torch.Tensor,  # [C, C]
    proj_b: torch.Tensor,
    ln2_w: torch.Tensor,
    ln2_b: torch.Tensor,
    fc1_w: torch.Tensor,  # [M, C]
    fc1_b: torch.Tensor,
    fc2_w: torch.Tensor,  # [C, M]
    fc2_b: torch.Tensor,
    ls1: torch.Tensor | None,  # [C] LayerScale (DINOv2) or None
    ls2: torch.Tensor | None,
    heads: int,
    gelu_tanh: bool,
) -> torch.Tensor:
    """One pre-norm ViT block (a free function so that one compiled graph serves every block)."""
    B, N, C = x.shape
    h = F.layer_norm(x, (C,), ln1_w, ln1_b, 1e-6)
    q, k, v = (
        F.linear(h, qkv_w, qkv_b).view(B, N, 3, heads, C // heads).permute(2, 0, 3, 1, 4)
    )  # [B, nh, N, hd]
    a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, C)
    a = F.linear(a, proj_w, proj_b)
    x = x + (a * ls1 if ls1 is not None else a)
    h = F.layer_norm(x, (C,), ln2_w, ln2_b, 1e-6)
    h = F.linear(F.gelu(F.linear(h, fc1_w, fc1_b), approximate="tanh" if gelu_tanh else "none"), fc2_w, fc2_b)
    return x + (h * ls2 if ls2 is not None else h)


class ViT(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        C, M = cfg.width, cfg.mlp
        self.cfg = cfg
        self.patch_embed = nn.Linear(3 * cfg.patch * cfg.patch, C)
        self.extra = nn.Parameter(torch.zeros(1, cfg.extra_tokens, C)) if cfg.extra_tokens else None
        self.pos = nn.Parameter(torch.zeros(1, cfg.patches + cfg.extra_tokens, C))
        n = cfg.depth - 1  # read out at the second-to-last block
        self.blocks = nn.ParameterList()
        shapes = [(C,), (C,), (3 * C, C), (3 * C,), (C, C), (C,), (C,), (C,), (M, C), (M,), (C, M), (C,)]
        if cfg.layerscale:
            shapes += [(C,), (C,)]
        self.num_params = len(shapes)
        for _ in range(n):
            for s in shapes:
                self.blocks.append(nn.Parameter(torch.empty(s)))
        self.block_fn = vit_block
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        for p in self.parameters():
            if p.dim() == 1:
                p.fill_(1.0 if p.numel() else 0.0)
            else:
                p.normal_(0.0, 0.02)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images [B, 3, S, S] -> patch features [B, P, C] (extra tokens dropped)."""
        cfg, B = self.cfg, images.shape[0]
        p, g = cfg.patch, cfg.image // cfg.patch
        patches = images.reshape(B, 3, g, p, g, p).permute(0, 2, 4, 1, 3, 5).reshape(B, g * g, 3 * p * p)
        x = self.patch_embed(patches.to(self.patch_embed.weight.dtype))  # [B, P, C]
        if self.extra is not None:
            x = torch.cat([self.extra.expand(B, -1, -1), x], dim=1)
        x = x + self.pos
        n = self.num_params
        for i in range(0, len(self.blocks), n):
            w = list(self.blocks[i : i + n])
            ls = (w[12], w[13]) if cfg.layerscale else (None, None)
            x = self.block_fn(x, *w[:12], *ls, cfg.heads, cfg.gelu_tanh)
        return x[:, cfg.extra_tokens :]


class FusedVisionTwin(nn.Module):
    """SigLIP + DINOv2 features of each image, concatenated and projected: [B, 3, S, S] -> [B, P, D]."""

    def __init__(
        self, siglip: ViTConfig = SIGLIP_SO400M, dino: ViTConfig = DINOV2_L_REG4, llm_width: int = 4096
    ):
        super().__init__()
        if siglip.patches != dino.patches:
            raise ValueError(
                f"both encoders must give the same patches, got {siglip.patches} and {dino.patches}"
            )
        self.siglip, self.dino = ViT(siglip), ViT(dino)
        fused = siglip.width + dino.width
        self.projector = nn.Sequential(
            nn.Linear(fused, 4 * fused),
            nn.GELU(),
            nn.Linear(4 * fused, llm_width),
            nn.GELU(),
            nn.Linear(llm_width, llm_width),
        )

    def compile_blocks(self) -> None:
        """Compile the block function (one graph per encoder's shapes) to fuse norms, GELU, residuals."""
        fn = torch.compile(vit_block, dynamic=False, fullgraph=True)
        self.siglip.block_fn = self.dino.block_fn = fn

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        feats = torch.cat([self.dino(images), self.siglip(images)], dim=-1)  # [B, P, 2176]
        return self.projector(feats)  # [B, P, D]

    def param_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.parameters())

    def flops(self, images: int) -> float:
        """Forward FLOPs for ``images`` images (matrix products and attention)."""
        total = 0.0
        for vit in (self.siglip, self.dino):
            c, n = vit.cfg, vit.cfg.patches + vit.cfg.extra_tokens
            per_block = 2 * n * (4 * c.width * c.width + 2 * c.width * c.mlp) + 4 * n * n * c.width
            total += (c.depth - 1) * per_block + 2 * c.patches * 3 * c.patch**2 * c.width
        proj = sum(m.weight.numel() for m in self.projector if isinstance(m, nn.Linear))
        total += 2 * self.siglip.cfg.patches * proj
        return images * total


class GraphedVision:
    """The encoder on a fixed batch of images, replayed from one CUDA graph (eager on the CPU)."""

    def __init__(self, model: FusedVisionTwin, images: torch.Tensor, graphs: bool):
        self.model, self.images, self.graph = model, images, None
        with torch.no_grad():
            if not graphs:
                self.out = model(images)
                return
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(2):
                    model(images)
            torch.cuda.current_stream().wait_stream(stream)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.out = model(images)

    @torch.no_grad()
    def __call__(self) -> torch.Tensor:
        """-> [B, P, D] image tokens (a static buffer on the GPU)."""
        if self.graph is None:
            self.out = self.model(self.images)
        else:
            self.graph.replay()
        return self.out
