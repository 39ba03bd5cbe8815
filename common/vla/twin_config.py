"""Shapes of the 7B timing twin (docs/DESIGN.md §6.5): Llama-2-7B's decoder with OFT-sized prefixes.

:class:`TwinConfig` (defaults: Llama-2-7B, a 280-token prefix), :func:`llama7b_config` (280 or 600
prefix tokens), :func:`tiny_config` (a CPU-test twin with the same code paths), the block-pass row
limit of the Triton products (:data:`SKINNY_MAX_ROWS`) and the memory floor of a pass. The model is
in :mod:`common.vla.twin_model`, the policy in :mod:`common.vla.twin`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from common.shapes import DEFAULT_SHAPE, RFSQShape

SKINNY_MAX_ROWS = 8  # rows up to which layer_step(skinny=True) uses the Triton products (block passes)


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


def memory_floor_s(num_bytes: int, bandwidth_bytes_per_s: float) -> float:
    """Seconds to stream ``num_bytes`` once at the measured bandwidth."""
    if bandwidth_bytes_per_s <= 0 or not math.isfinite(bandwidth_bytes_per_s):
        raise ValueError(f"bandwidth must be positive and finite, got {bandwidth_bytes_per_s}")
    return num_bytes / bandwidth_bytes_per_s
