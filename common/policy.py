"""The policy interface every VLA backend implements (docs/DESIGN.md §6.1, §9).

A policy sees an :class:`Observation` and produces one action chunk per query. Backends whose
language model decodes RFSQ layers one block per pass (the embedded VLA, the 7B timing twin)
implement :class:`LayerwisePolicy`, which the RSD engine in ``evaluator/`` drives:

    state = policy.prefix([obs])                # one pass over image + text, KV cache, hidden [B, D]
    logits = policy.decode_block(state, None)   # block 0: W learned queries -> logits of layer 0
    logits = policy.decode_block(state, codes0) # block l: embeddings of layer l-1 -> logits of layer l
    logits = policy.verify(state, drafted)      # blocks [Q, D_0..D_{k-1}] in ONE pass -> k+1 layers
    policy.truncate(state, num_blocks)          # keep the KV cache of the accepted blocks only

Blocks are W = T positions wide (one position per action step; each position reads out its H
tokens through G-way heads). Attention is full inside a block and causal across blocks.

Backends that emit a continuous chunk in one pass (OpenVLA-OFT) implement :class:`ChunkPolicy`
only: they are data sources for draft training, not targets for speculative decoding.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from common.shapes import RFSQShape


@dataclass
class Observation:
    """One observation exactly as a policy sees it (images already upright).

    agentview: [h, w, 3] uint8 third-person camera
    wrist:     [h, w, 3] uint8 eye-in-hand camera
    proprio:   [8] float32   eef pos (3), eef axis-angle (3), gripper qpos (2)
    instruction: natural-language task description
    """

    agentview: np.ndarray
    wrist: np.ndarray
    proprio: np.ndarray
    instruction: str


@dataclass
class PolicyOutput:
    """What one policy query yields, for streaming and evaluation.

    hidden:  [D] float32   last-layer hidden state at the last prompt token
    codes:   [T, H, L] uint8 RFSQ codes of the chunk (None for backends without a codec)
    actions: [T, A] float32 action chunk in the env's action space ([-1, 1], gripper -1 open / +1 close)
    """

    hidden: np.ndarray
    codes: np.ndarray | None
    actions: np.ndarray
    info: dict[str, Any] = field(default_factory=dict)


class ChunkPolicy(abc.ABC):
    """Any backend: one observation in, hidden state + codes + action chunk out."""

    #: stable identifier of the backbone, written to archives (e.g. "embedded-vla@<sha>")
    backbone_id: str
    #: size D of the hidden state
    hidden_dim: int
    shape: RFSQShape

    @abc.abstractmethod
    def act(self, observations: list[Observation]) -> list[PolicyOutput]:
        """Query the policy on a batch of observations (batch of one is the common case)."""


@dataclass
class PrefixState:
    """Decoding state after the prefix pass; owned and mutated by the backend.

    hidden: [B, D] last-layer hidden state at the last prompt token (draft input)
    cache:  backend-specific KV cache
    prefix_len: number of cached prefix positions
    num_blocks: number of decoded blocks currently in the cache
    """

    hidden: torch.Tensor
    cache: Any
    prefix_len: int
    num_blocks: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


class LayerwisePolicy(ChunkPolicy):
    """A backend whose language model decodes RFSQ layers block by block (docs/DESIGN.md §9.1-§9.2).

    ``decode_layers`` (D <= L) is how many layers the policy decodes sequentially; layers D..L-1 are
    set to the centre level (the zero of every layer's grid) without a pass, so codes keep their
    [T, H, L] shape on the wire and in archives. D = L decodes every layer.
    """

    _decode_layers: int | None = None

    @property
    def decode_layers(self) -> int:
        return self.shape.num_layers if self._decode_layers is None else self._decode_layers

    @decode_layers.setter
    def decode_layers(self, value: int | None) -> None:
        L = self.shape.num_layers
        if value is not None and not (isinstance(value, int) and 1 <= value <= L):
            raise ValueError(f"decode_layers must be an int in 1..{L} (or None: all {L}), got {value!r}")
        self._decode_layers = value

    @abc.abstractmethod
    def prefix(self, observations: list[Observation]) -> PrefixState:
        """Run the prefix pass (images + text) once; return the KV cache and the hidden state."""

    @abc.abstractmethod
    def decode_block(self, state: PrefixState, prev_codes: torch.Tensor | None) -> torch.Tensor:
        """Feed one block and return logits of the next layer.

        prev_codes: None for block 0 (learned queries), else [B, T, H] long codes of layer l-1.
        returns:    [B, T, H, G] logits of layer l = state.num_blocks (before the call).
        Appends the block to the cache and increments ``state.num_blocks``.
        """

    @abc.abstractmethod
    def verify(self, state: PrefixState, drafted: torch.Tensor) -> torch.Tensor:
        """Feed blocks [Q, D_0, …, D_{k-1}] in one pass (requires ``state.num_blocks == 0``).

        drafted: [B, k, T, H] long drafted codes of layers 0..k-1.
        returns: [B, k+1, T, H, G] logits of layers 0..k (M_0..M_k).
        Appends all k+1 blocks to the cache (``state.num_blocks = k+1``); call :meth:`truncate`
        to drop the blocks past the accepted prefix.
        """

    @abc.abstractmethod
    def truncate(self, state: PrefixState, num_blocks: int) -> None:
        """Keep only the first ``num_blocks`` decoded blocks in the cache."""

    @abc.abstractmethod
    def codes_to_actions(self, codes: torch.Tensor) -> torch.Tensor:
        """[B, T, H, L] long codes -> [B, T, A] float actions in the env's action space."""

    def decode_sequential(
        self,
        state: PrefixState,
        logits_out: list[torch.Tensor] | None = None,
        num_layers: int | None = None,
    ) -> torch.Tensor:
        """Baseline: one block pass per decoded layer after the prefix. Returns [B, T, H, L] long codes.

        num_layers: layers decoded (default :attr:`decode_layers`); the later layers are at the
        centre level. logits_out: if given, each decoded layer's logits [B, T, H, G] are appended.
        """
        n = self.decode_layers if num_layers is None else num_layers
        if not 1 <= n <= self.shape.num_layers:
            raise ValueError(f"num_layers must be in 1..{self.shape.num_layers}, got {n}")
        codes: list[torch.Tensor] = []
        prev = None
        for _ in range(n):
            logits = self.decode_block(state, prev)  # [B, T, H, G]
            if logits_out is not None:
                logits_out.append(logits)
            prev = logits.argmax(-1)
            codes.append(prev)
        return fill_center(torch.stack(codes, dim=-1), self.shape.num_layers, self.shape.grid_size)


def fill_center(codes: torch.Tensor, num_layers: int, grid_size: int) -> torch.Tensor:
    """codes [B, T, H, l] (first l layers) -> [B, T, H, L] with the centre level (G // 2) in later layers."""
    B, T, H, l = codes.shape
    if l == num_layers:
        return codes
    rest = torch.full((B, T, H, num_layers - l), grid_size // 2, dtype=codes.dtype, device=codes.device)
    return torch.cat([codes, rest], dim=-1)
