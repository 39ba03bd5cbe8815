"""Shape constants shared by every part of RSD (docs/DESIGN.md §3).

Axis legend used in shape comments throughout the code base:
    B  batch
    T  chunk_len           actions per chunk (8)
    A  action_dim          Δpos(3) Δrot(3) gripper(1) (7)
    H  action_hidden_dim   RFSQ latent dims per action step (16)
    L  num_layers          RFSQ residual layers (8)
    G  grid_size           levels per scalar, token ids 0..G-1 (7)
    K  num_coarse_layers   layers the draft predicts (3)
    D  input_dim           VLA hidden size (4096 for OpenVLA-7B)
"""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class RFSQShape:
    chunk_len: int = 8
    action_dim: int = 7
    action_hidden_dim: int = 16
    num_layers: int = 8
    grid_size: int = 7
    num_coarse_layers: int = 3

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"RFSQShape.{name} must be a positive int, got {value!r}")
        if self.grid_size < 2 or self.grid_size > 255:
            raise ValueError(f"RFSQShape.grid_size must be in 2..255 (codes are uint8), got {self.grid_size}")
        if self.grid_size % 2 == 0:
            raise ValueError(f"RFSQShape.grid_size must be odd so that 0 is a level, got {self.grid_size}")
        if self.num_coarse_layers > self.num_layers:
            raise ValueError(
                f"num_coarse_layers ({self.num_coarse_layers}) cannot exceed num_layers ({self.num_layers})"
            )

    @property
    def tokens_per_layer(self) -> int:
        """T*H: tokens in one RFSQ layer of one chunk (128 by default)."""
        return self.chunk_len * self.action_hidden_dim

    @property
    def codes_shape(self) -> tuple[int, int, int]:
        """Shape of the codes of one chunk: [T, H, L]."""
        return (self.chunk_len, self.action_hidden_dim, self.num_layers)

    @property
    def chunk_shape(self) -> tuple[int, int]:
        """Shape of one action chunk: [T, A]."""
        return (self.chunk_len, self.action_dim)

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


DEFAULT_SHAPE = RFSQShape()
OPENVLA_HIDDEN_DIM = 4096
