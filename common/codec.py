"""RFSQ action codec: residual finite scalar quantization of action chunks (docs/DESIGN.md §4).

Axes: B batch, T chunk_len, A action_dim, H action_hidden_dim, L num_layers, G grid_size.

    actions [B, T, A] --normalize--> [-1, 1] --encoder A→64→H, tanh--> z [B, T, H]
    z --L residual layers, layer l on the grid s_l·linspace(-1, 1, G), s_l = (G-1)^-l--> codes [B, T, H, L]
    codes[..., :k] --sum of the first k layers' levels--> ẑ --decoder H→64→A--> actions [B, T, A]

With G = 7 the grid spacing of layer l is s_l/3, so its rounding error is at most s_l/6 = s_{l+1}:
the residual always fits the next layer's grid and every layer carries information.
Training uses straight-through gradients and quantize dropout (decode from a random prefix of
layers), so that the first k layers alone give a usable action.

The action normalization statistics (per-dimension low/high, e.g. the 1st/99th percentiles of the
training data) are buffers of the module and travel with its weights.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from common.shapes import DEFAULT_SHAPE, RFSQShape

WEIGHTS_FILE = "codec.safetensors"
CONFIG_FILE = "codec.json"
CODEC_FORMAT_VERSION = 1


class RFSQCodec(nn.Module):
    """Per-step MLP autoencoder with a residual FSQ bottleneck of ``num_layers`` layers."""

    def __init__(
        self, *, shape: RFSQShape = DEFAULT_SHAPE, mlp_hidden: int = 64, quantize_dropout: float = 0.5
    ):
        super().__init__()
        if mlp_hidden <= 0:
            raise ValueError(f"mlp_hidden must be positive, got {mlp_hidden}")
        if not 0.0 <= quantize_dropout <= 1.0:
            raise ValueError(f"quantize_dropout must be in [0, 1], got {quantize_dropout}")
        self.shape = shape
        self.mlp_hidden = mlp_hidden
        self.quantize_dropout = quantize_dropout
        A, H, G, L = shape.action_dim, shape.action_hidden_dim, shape.grid_size, shape.num_layers
        self.encoder = nn.Sequential(nn.Linear(A, mlp_hidden), nn.GELU(), nn.Linear(mlp_hidden, H))
        self.decoder = nn.Sequential(nn.Linear(H, mlp_hidden), nn.GELU(), nn.Linear(mlp_hidden, A))
        # Normalization statistics: part of the checkpoint.
        self.register_buffer("action_low", -torch.ones(A))
        self.register_buffer("action_high", torch.ones(A))
        # Derived constants: not persisted.
        self.register_buffer(
            "scales", torch.tensor([float(G - 1) ** -l for l in range(L)]), persistent=False
        )  # [L]
        self.register_buffer("levels", torch.linspace(-1.0, 1.0, G), persistent=False)  # [G]

    # ----------------------------------------------------------------------------- normalization
    def set_normalization(self, actions: np.ndarray | torch.Tensor, q: float = 0.01) -> None:
        """Set per-dimension low/high from data ([N, A] or [N, T, A]) as the q / 1-q quantiles."""
        a = torch.as_tensor(np.asarray(actions), dtype=torch.float32).reshape(-1, self.shape.action_dim)
        if a.shape[0] == 0 or not torch.isfinite(a).all():
            raise ValueError("normalization data must be non-empty and finite")
        low = torch.quantile(a, q, dim=0)
        high = torch.quantile(a, 1.0 - q, dim=0)
        degenerate = (high - low) < 1e-6
        low = torch.where(degenerate, low - 1.0, low)
        high = torch.where(degenerate, high + 1.0, high)
        self.action_low.copy_(low)
        self.action_high.copy_(high)

    def set_bounds(self, low: np.ndarray | torch.Tensor, high: np.ndarray | torch.Tensor) -> None:
        """Set per-dimension low/high directly (e.g. a backbone's own q01/q99 statistics)."""
        lo = torch.as_tensor(np.asarray(low), dtype=torch.float32)
        hi = torch.as_tensor(np.asarray(high), dtype=torch.float32)
        A = self.shape.action_dim
        if (
            lo.shape != (A,)
            or hi.shape != (A,)
            or not (torch.isfinite(lo).all() and torch.isfinite(hi).all())
        ):
            raise ValueError(f"bounds must be finite [{A}] arrays, got {list(lo.shape)} and {list(hi.shape)}")
        if not bool((hi - lo > 1e-6).all()):
            raise ValueError(f"every high must exceed its low: {hi.tolist()} vs {lo.tolist()}")
        self.action_low.copy_(lo.to(self.action_low.device))
        self.action_high.copy_(hi.to(self.action_high.device))

    def clamped(self, actions: np.ndarray | torch.Tensor) -> np.ndarray:
        """[..., A] actions -> [..., A] bool: the values :meth:`normalize` clamps (outside [low, high])."""
        a = torch.as_tensor(np.asarray(actions), dtype=torch.float32)
        low, high = self.action_low.cpu(), self.action_high.cpu()
        return ((a < low) | (a > high)).numpy()

    def normalize(self, actions: torch.Tensor) -> torch.Tensor:
        span = self.action_high - self.action_low
        return (2.0 * (actions - self.action_low) / span - 1.0).clamp(-1.0, 1.0)

    def unnormalize(self, actions: torch.Tensor) -> torch.Tensor:
        return (actions + 1.0) * 0.5 * (self.action_high - self.action_low) + self.action_low

    # ----------------------------------------------------------------------------- quantization
    def _quantize_layer(self, residual: torch.Tensor, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Nearest level of layer ``layer``'s grid. residual [..., H] -> (values, ids) [..., H]."""
        G = self.shape.grid_size
        s = self.scales[layer]
        ids = torch.round((residual / s).clamp(-1.0, 1.0) * (G - 1) / 2 + (G - 1) / 2).long()  # [..., H]
        values = s * self.levels[ids]
        return values, ids

    def quantize(self, z: torch.Tensor, num_layers: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """z [B, T, H] -> (ẑ from the first ``num_layers`` layers [B, T, H], codes [B, T, H, L]).

        ẑ carries straight-through gradients to z. Codes of all L layers are always returned.
        """
        L = self.shape.num_layers
        k = L if num_layers is None else num_layers
        residual = z
        quantized = torch.zeros_like(z)
        codes = []
        for layer in range(L):
            values, ids = self._quantize_layer(residual.detach(), layer)
            if layer < k:
                quantized = quantized + values
            residual = residual - values
            codes.append(ids)
        z_hat = z + (quantized - z).detach()
        return z_hat, torch.stack(codes, dim=-1)  # [B, T, H], [B, T, H, L]

    def codes_to_latent(self, codes: torch.Tensor) -> torch.Tensor:
        """codes [..., H, k] (k <= L, first k layers) -> latent [..., H]."""
        k = codes.shape[-1]
        if k < 1 or k > self.shape.num_layers:
            raise ValueError(f"codes must hold 1..{self.shape.num_layers} layers, got {k}")
        if codes.min() < 0 or codes.max() >= self.shape.grid_size:
            raise ValueError(f"code ids must be in 0..{self.shape.grid_size - 1}")
        values = self.levels[codes.long()] * self.scales[:k]  # [..., H, k]
        return values.sum(dim=-1)

    # ----------------------------------------------------------------------------- public API
    def encode(self, actions: torch.Tensor) -> torch.Tensor:
        """actions [B, T, A] (env space) -> codes [B, T, H, L] long."""
        self._check_actions(actions)
        z = torch.tanh(self.encoder(self.normalize(actions.float())))  # [B, T, H]
        _, codes = self.quantize(z)
        return codes

    def decode(self, codes: torch.Tensor, num_layers: int | None = None) -> torch.Tensor:
        """codes [B, T, H, k] -> actions [B, T, A] (env space), from the first ``num_layers`` layers."""
        if num_layers is not None:
            codes = codes[..., :num_layers]
        z_hat = self.codes_to_latent(codes)  # [B, T, H]
        return self.unnormalize(self.decoder(z_hat))

    def forward(self, actions: torch.Tensor, num_layers: int | None = None) -> dict[str, torch.Tensor]:
        """Training pass. Returns normalized target, reconstruction (normalized space) and codes.

        In training mode with quantize dropout, each batch element decodes from a random prefix
        of 1..L layers with probability ``quantize_dropout``.
        """
        self._check_actions(actions)
        target = self.normalize(actions.float())  # [B, T, A]
        z = torch.tanh(self.encoder(target))  # [B, T, H]
        L = self.shape.num_layers
        if num_layers is None and self.training and self.quantize_dropout > 0:
            B = z.shape[0]
            k = torch.full((B,), L, device=z.device)
            drop = torch.rand(B, device=z.device) < self.quantize_dropout
            k = torch.where(drop, torch.randint(1, L + 1, (B,), device=z.device), k)  # [B]
            _, codes = self.quantize(z)
            values = self.levels[codes] * self.scales  # [B, T, H, L]
            mask = (torch.arange(L, device=z.device)[None, :] < k[:, None]).float()  # [B, L]
            quantized = (values * mask[:, None, None, :]).sum(-1)  # [B, T, H]
            z_hat = z + (quantized - z).detach()
        else:
            z_hat, codes = self.quantize(z, num_layers)
        recon = self.decoder(z_hat)  # [B, T, A] normalized space
        return {"target": target, "recon": recon, "codes": codes, "latent": z}

    def loss(self, actions: torch.Tensor) -> torch.Tensor:
        out = self.forward(actions)
        return F.mse_loss(out["recon"], out["target"])

    def _check_actions(self, actions: torch.Tensor) -> None:
        T, A = self.shape.chunk_len, self.shape.action_dim
        if actions.dim() != 3 or actions.shape[1:] != (T, A):
            raise ValueError(f"actions must have shape [B, {T}, {A}], got {list(actions.shape)}")
        if not torch.isfinite(actions).all():
            raise ValueError("actions contain NaN or Inf")

    def config(self) -> dict[str, Any]:
        return {
            "format_version": CODEC_FORMAT_VERSION,
            "shape": self.shape.to_dict(),
            "mlp_hidden": self.mlp_hidden,
            "quantize_dropout": self.quantize_dropout,
        }

    @property
    def sha256(self) -> str:
        """Hash of the weights (normalization included): the codec's provenance id in archives."""
        h = hashlib.sha256()
        for name, tensor in sorted(self.state_dict().items()):
            h.update(name.encode())
            h.update(tensor.detach().cpu().contiguous().float().numpy().tobytes())
        return h.hexdigest()


# --------------------------------------------------------------------------------- save / load
def save_codec(codec: RFSQCodec, out_dir: str | Path, extra: dict[str, Any] | None = None) -> Path:
    """Write ``codec.safetensors`` and ``codec.json`` (config + ``extra``, e.g. metrics) to ``out_dir``."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in codec.state_dict().items()}
    save_file(state, str(out / WEIGHTS_FILE))
    meta = {**codec.config(), "sha256": codec.sha256, **(extra or {})}
    (out / CONFIG_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return out


def load_codec(path: str | Path, device: str | torch.device = "cpu") -> RFSQCodec:
    """Load a codec saved by :func:`save_codec` (a directory, or the path of its .safetensors file)."""
    from safetensors.torch import load_file

    path = Path(path)
    folder = path.parent if path.suffix == ".safetensors" else path
    cfg_path, weights_path = folder / CONFIG_FILE, folder / WEIGHTS_FILE
    if not weights_path.is_file() or not cfg_path.is_file():
        raise FileNotFoundError(
            f"no codec at {folder}: expected {WEIGHTS_FILE} and {CONFIG_FILE} "
            "(train one with `make train-codec` or use the shipped assets/codec)"
        )
    meta = json.loads(cfg_path.read_text())
    if meta.get("format_version") != CODEC_FORMAT_VERSION:
        raise ValueError(
            f"codec at {folder} has format_version {meta.get('format_version')!r}, expected {CODEC_FORMAT_VERSION}"
        )
    codec = RFSQCodec(
        shape=RFSQShape(**meta["shape"]),
        mlp_hidden=int(meta["mlp_hidden"]),
        quantize_dropout=float(meta.get("quantize_dropout", 0.0)),
    )
    codec.load_state_dict(load_file(str(weights_path)))
    codec.eval()
    return codec.to(device)


# --------------------------------------------------------------------------------- data helpers
def action_chunks(episode_actions: np.ndarray, chunk_len: int) -> np.ndarray:
    """[N, A] actions of one episode -> [N, T, A] chunks starting at every step.

    Chunks running past the end repeat the last action (the robot holds its last command).
    """
    a = np.asarray(episode_actions, dtype=np.float32)
    if a.ndim != 2 or a.shape[0] == 0:
        raise ValueError(f"episode actions must be a non-empty [N, A] array, got shape {a.shape}")
    N = a.shape[0]
    idx = np.minimum(np.arange(N)[:, None] + np.arange(chunk_len)[None, :], N - 1)  # [N, T]
    return a[idx]


def code_entropy(codes: torch.Tensor | np.ndarray, grid_size: int) -> list[float]:
    """Per-layer entropy in bits of code usage. codes [..., L] -> list of L floats (max log2 G)."""
    c = torch.as_tensor(np.asarray(codes)).long()
    L = c.shape[-1]
    flat = c.reshape(-1, L)
    out = []
    for layer in range(L):
        counts = torch.bincount(flat[:, layer], minlength=grid_size).double()
        p = counts / counts.sum()
        p = p[p > 0]
        out.append(float(-(p * p.log2()).sum()))
    return out


@torch.no_grad()
def reconstruction_report(codec: RFSQCodec, chunks: torch.Tensor, batch_size: int = 4096) -> dict[str, Any]:
    """Reconstruction error per prefix length k = 1..L and per-layer code entropy on ``chunks`` [N, T, A].

    mse_norm[k-1]: MSE in normalized [-1, 1] space; mae_env[k-1]: mean absolute error in env space
    over the 6 arm dimensions (the gripper is binary and reported apart as sign agreement).
    """
    codec.eval()
    L = codec.shape.num_layers
    mse = torch.zeros(L, dtype=torch.float64)
    mae_arm = torch.zeros(L, dtype=torch.float64)
    grip_agree = torch.zeros(L, dtype=torch.float64)
    all_codes = []
    n = 0
    for start in range(0, chunks.shape[0], batch_size):
        a = chunks[start : start + batch_size].float()
        codes = codec.encode(a)
        all_codes.append(codes)
        target = codec.normalize(a)
        for k in range(1, L + 1):
            rec = codec.decode(codes, num_layers=k)
            mse[k - 1] += F.mse_loss(codec.normalize(rec), target, reduction="sum").double() / (
                a.shape[1] * a.shape[2]
            )
            mae_arm[k - 1] += (rec[..., :6] - a[..., :6]).abs().mean(dim=(1, 2)).sum().double()
            grip_agree[k - 1] += (
                (torch.sign(rec[..., 6]) == torch.sign(a[..., 6])).float().mean(1).sum().double()
            )
        n += a.shape[0]
    codes = torch.cat(all_codes)
    return {
        "num_chunks": n,
        "mse_norm": (mse / n).tolist(),
        "mae_arm_env": (mae_arm / n).tolist(),
        "gripper_sign_agreement": (grip_agree / n).tolist(),
        "layer_entropy_bits": code_entropy(codes, codec.shape.grid_size),
        "max_entropy_bits": math.log2(codec.shape.grid_size),
    }
