"""Draft model: VLA hidden state -> coarse RFSQ layers in one shot (docs/DESIGN.md §5, exact contract).

Axes: B batch, D input_dim, C hidden_dim, K num_coarse_layers, T chunk_len, H action_hidden_dim,
G grid_size. The draft predicts the first K layers of the policy's codes, each as T*H tokens
flattened in (T, H) order.

The plan's forward (``forward="plan"``, the default, :class:`RFSQDraftModelWithProjection`)::

    hidden [B, D] --input_projection, unsqueeze(1)--> [B, 1, C] --+ position_encoding[:, :1],
    decoder_layer(x, x), output_norm--> [B, 1, C] --squeeze(1)--> [B, C] --every classification head
    reads that one vector--> stack(dim=1) --> logits [B, K, T*H, G]

The K-position variant (``forward="kpos"``, :class:`KPositionDraftModel`) copies the projection to K
positions with learned positions, lets them attend to each other and has head k read position k. Its
state dict has the same names and shapes, but the same weights give other logits: it is another model.
Checkpoints record which forward made them (``config["model"]["forward"]``) and
:func:`load_checkpoint` refuses one whose forward is not the one asked for. Checkpoints written before
the forward was recorded were all made by the K-position variant.

Module names and shapes follow the earlier draft models so that their state dicts keep loading.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

Codes = TypeVar("Codes", np.ndarray, torch.Tensor)

CHECKPOINT_KEYS = ("model_state_dict", "optimizer_state_dict", "epoch", "val_accuracy", "config")
MAX_POSITIONS = 256
FORWARDS = ("plan", "kpos")  # the plan's forward (DESIGN §4); the K-position variant
DEFAULT_FORWARD = "plan"
UNRECORDED_FORWARD = "kpos"  # what made the checkpoints that record no forward
FORWARD_HELP = (
    "draft forward: plan (DESIGN §4: one position, every head reads the same vector) or kpos "
    "(K learned positions, head k reads position k: another model with the same state dict names)"
)


class DraftTransformerDecoder(nn.Module):
    """One pre-norm transformer decoder layer whose memory is its own input."""

    def __init__(
        self, *, hidden_dim: int = 512, nhead: int = 8, dim_feedforward: int = 2048, dropout: float = 0.1
    ):
        super().__init__()
        self.decoder_layer = nn.TransformerDecoderLayer(
            d_model=hidden_dim,
            nhead=nhead,
            dim_feedforward=dim_feedforward,
            dropout=dropout,
            activation="gelu",
            batch_first=True,
            norm_first=True,
        )
        self.position_encoding = nn.Parameter(torch.zeros(1, MAX_POSITIONS, hidden_dim))
        nn.init.normal_(self.position_encoding, std=0.02)
        self.output_norm = nn.LayerNorm(hidden_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, S, C] -> [B, S, C]."""
        S = x.shape[1]
        if S > MAX_POSITIONS:
            raise ValueError(f"sequence of {S} positions exceeds the {MAX_POSITIONS} learned positions")
        x = x + self.position_encoding[:, :S]
        x = self.decoder_layer(x, x)
        return self.output_norm(x)


class RFSQDraftModelWithProjection(nn.Module):
    """The plan's draft (DESIGN §4): same weights, same logits as the plan's class."""

    forward_name: ClassVar[str] = "plan"

    def __init__(
        self,
        input_dim: int = 4096,
        hidden_dim: int = 512,
        num_coarse_layers: int = 3,
        chunk_len: int = 8,
        action_hidden_dim: int = 16,
        grid_size: int = 7,
    ):
        super().__init__()
        for name, value in dict(
            input_dim=input_dim,
            hidden_dim=hidden_dim,
            num_coarse_layers=num_coarse_layers,
            chunk_len=chunk_len,
            action_hidden_dim=action_hidden_dim,
            grid_size=grid_size,
        ).items():
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if hidden_dim % 8 != 0:
            raise ValueError(f"hidden_dim must be divisible by nhead=8, got {hidden_dim}")
        if num_coarse_layers > MAX_POSITIONS:
            raise ValueError(f"num_coarse_layers must be <= {MAX_POSITIONS}, got {num_coarse_layers}")
        self.input_dim = input_dim
        self.hidden_dim = hidden_dim
        self.num_coarse_layers = num_coarse_layers
        self.chunk_len = chunk_len
        self.action_hidden_dim = action_hidden_dim
        self.grid_size = grid_size
        self.tokens_per_layer = chunk_len * action_hidden_dim

        self.input_projection = nn.Linear(input_dim, hidden_dim)
        self.decoder = DraftTransformerDecoder(hidden_dim=hidden_dim)
        self.classification_heads = nn.ModuleList(
            [
                nn.Sequential(
                    nn.Linear(hidden_dim, hidden_dim // 2),
                    nn.GELU(),
                    nn.LayerNorm(hidden_dim // 2),
                    nn.Linear(hidden_dim // 2, self.tokens_per_layer * grid_size),
                )
                for _ in range(num_coarse_layers)
            ]
        )

    def model_config(self) -> dict[str, Any]:
        """What rebuilds this model (:func:`build_draft`): the forward's name and the constructor arguments."""
        return {
            "forward": self.forward_name,
            "input_dim": self.input_dim,
            "hidden_dim": self.hidden_dim,
            "num_coarse_layers": self.num_coarse_layers,
            "chunk_len": self.chunk_len,
            "action_hidden_dim": self.action_hidden_dim,
            "grid_size": self.grid_size,
        }

    def _check_input(self, hidden: torch.Tensor) -> None:
        if hidden.dim() != 2 or hidden.shape[1] != self.input_dim:
            raise ValueError(f"hidden must have shape [B, {self.input_dim}], got {list(hidden.shape)}")

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [B, D] -> logits [B, K, T*H, G], exactly as the plan writes it."""
        self._check_input(hidden)
        B, K = hidden.shape[0], self.num_coarse_layers
        x = self.input_projection(hidden).unsqueeze(1)  # [B, 1, C]: one position
        x = self.decoder(x).squeeze(1)  # [B, C]
        logits = torch.stack([head(x) for head in self.classification_heads], dim=1)  # [B, K, T*H*G]
        return logits.view(B, K, self.tokens_per_layer, self.grid_size)  # [B, K, T*H, G]

    @torch.no_grad()
    def propose(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Argmax proposals and their probabilities: ([B, K, T, H] long, [B, K, T, H] float)."""
        probs = self.forward(hidden).float().softmax(-1)  # [B, K, T*H, G]
        conf, ids = probs.max(-1)
        shape = (hidden.shape[0], self.num_coarse_layers, self.chunk_len, self.action_hidden_dim)
        return ids.view(shape), conf.view(shape)


class KPositionDraftModel(RFSQDraftModelWithProjection):
    """The K-position variant (``forward="kpos"``): not the plan's model, although its state dict loads
    into the plan's class. Kept to compare with and to load the checkpoints it made."""

    forward_name: ClassVar[str] = "kpos"

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [B, D] -> logits [B, K, T*H, G]; head k reads position k."""
        self._check_input(hidden)
        B, K = hidden.shape[0], self.num_coarse_layers
        x = self.input_projection(hidden)  # [B, C]
        x = x[:, None, :].expand(B, K, self.hidden_dim)  # [B, K, C]: one token per coarse layer
        x = self.decoder(x)  # [B, K, C]
        logits = torch.stack([head(x[:, k]) for k, head in enumerate(self.classification_heads)], dim=1)
        return logits.view(B, K, self.tokens_per_layer, self.grid_size)  # [B, K, T*H, G]


_DRAFTS: dict[str, type[RFSQDraftModelWithProjection]] = {
    "plan": RFSQDraftModelWithProjection,
    "kpos": KPositionDraftModel,
}


def check_forward(forward: Any) -> str:
    if forward not in FORWARDS:
        raise ValueError(f"draft forward must be one of {FORWARDS}, got {forward!r}")
    return forward


def build_draft(forward: str = DEFAULT_FORWARD, **model_args: Any) -> RFSQDraftModelWithProjection:
    """The draft of forward ``forward`` ("plan" or "kpos") with the constructor arguments ``model_args``."""
    return _DRAFTS[check_forward(forward)](**model_args)


# --------------------------------------------------------------------------------- loss / targets
def coarse_targets(codes: Codes, num_coarse_layers: int) -> Codes:
    """codes [N, T, H, L] -> the draft's targets [N, K, T*H]: the first K layers, layer-major, each
    layer's tokens flattened in (T, H) order (docs/DESIGN.md §3, the one place this layout is computed).

    A numpy array stays numpy and keeps its dtype (uint8 codes: compact uint8 targets for buffers);
    a tensor gives int64 targets (cross-entropy). ``N`` may be 0 (an episode archived without samples).
    """
    if codes.ndim != 4:
        raise ValueError(f"codes must be [N, T, H, L], got {list(codes.shape)}")
    n, t, h, layers = codes.shape
    if num_coarse_layers > layers:
        raise ValueError(f"cannot take {num_coarse_layers} coarse layers from codes with {layers} layers")
    if isinstance(codes, np.ndarray):
        out = np.ascontiguousarray(codes[..., :num_coarse_layers].transpose(0, 3, 1, 2))
        return out.reshape(n, num_coarse_layers, t * h)
    return codes[..., :num_coarse_layers].permute(0, 3, 1, 2).reshape(n, num_coarse_layers, t * h).long()


def draft_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    soft_targets: torch.Tensor | None = None,
    soft_weight: float = 0.0,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """Cross-entropy over all K*T*H coarse tokens, and token accuracy per layer.

    logits [B, K, N, G], targets [B, K, N] -> (loss, {"acc_per_layer": [K floats], "accuracy": float,
    "layer_exact": [K floats] (fraction of chunks whose whole layer is right)}).
    soft_targets [B, K, N, G]: the policy's own probabilities per token (knowledge distillation); the
    loss is then ``(1 - soft_weight) * CE(hard codes) + soft_weight * CE(soft_targets)``.
    """
    if logits.shape[:3] != targets.shape:
        raise ValueError(f"logits {list(logits.shape)} and targets {list(targets.shape)} disagree")
    G = logits.shape[-1]
    loss = F.cross_entropy(logits.float().reshape(-1, G), targets.reshape(-1))
    if soft_targets is not None and soft_weight > 0:
        if soft_targets.shape != logits.shape:
            raise ValueError(
                f"soft targets {list(soft_targets.shape)} and logits {list(logits.shape)} disagree"
            )
        soft = -(soft_targets.float() * F.log_softmax(logits.float(), dim=-1)).sum(-1).mean()
        loss = (1.0 - soft_weight) * loss + soft_weight * soft
    with torch.no_grad():
        correct = logits.argmax(-1) == targets  # [B, K, N]
        acc = correct.float().mean(dim=(0, 2))  # [K]
        exact = correct.all(dim=2).float().mean(dim=0)  # [K]
    return loss, {
        "acc_per_layer": acc.tolist(),
        "accuracy": float(acc.mean()),
        "layer_exact": exact.tolist(),
    }


# --------------------------------------------------------------------------------- checkpoints
def _plain(value: Any) -> Any:
    """Coerce config values into types that torch.load(weights_only=True) accepts."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    if hasattr(value, "item"):
        return value.item()
    return str(value)


def save_checkpoint(
    path: str | Path,
    model: RFSQDraftModelWithProjection,
    optimizer: torch.optim.Optimizer | None,
    epoch: int,
    val_accuracy: float,
    config: dict[str, Any],
) -> Path:
    """Write the checkpoint dict with exactly the keys of docs/DESIGN.md §5.5, atomically.

    ``config`` must rebuild the model: the model's constructor arguments are stored under
    ``config["model"]`` (added if missing), next to the run's own settings.
    """
    if not math.isfinite(float(val_accuracy)):
        raise ValueError(f"val_accuracy must be finite, got {val_accuracy!r}")
    config = {**_plain(config), "model": model.model_config()}
    ckpt = {
        "model_state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "optimizer_state_dict": optimizer.state_dict() if optimizer is not None else {},
        "epoch": int(epoch),
        "val_accuracy": float(val_accuracy),
        "config": config,
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(ckpt, tmp)
    tmp.replace(path)
    return path


def _forward_of(path: Path, model_cfg: dict[str, Any], forward: str) -> str:
    """The forward recorded in a checkpoint's config['model'], if it is the one asked for."""
    check_forward(forward)
    recorded = model_cfg.get("forward")
    if recorded is None:  # written before the forward was recorded: by the K-position variant
        if forward != UNRECORDED_FORWARD:
            raise ValueError(
                f"{path} records no draft forward: it was written before checkpoints recorded one, by the "
                f"K-position variant ({UNRECORDED_FORWARD!r}); its weights give other logits under the "
                f"{forward!r} forward. Load it with forward={UNRECORDED_FORWARD!r} (on the command "
                f"line: --draft-forward {UNRECORDED_FORWARD}) or fit a new draft"
            )
        return UNRECORDED_FORWARD
    if recorded not in FORWARDS:
        raise ValueError(f"{path}: unknown draft forward {recorded!r}; this code knows {FORWARDS}")
    if recorded != forward:
        raise ValueError(
            f"{path} holds a draft with the {recorded!r} forward, not the {forward!r} one asked for; the "
            f"same weights give other logits under another forward. Load it with forward={recorded!r} "
            f"(on the command line: --draft-forward {recorded})"
        )
    return recorded


def load_checkpoint(
    path: str | Path, map_location: str | torch.device = "cpu", forward: str = DEFAULT_FORWARD
) -> tuple[RFSQDraftModelWithProjection, dict[str, Any]]:
    """Load a draft checkpoint without pickle; returns (model in eval mode, the checkpoint dict).

    ``forward``: the forward the caller expects ("plan", the default, or "kpos"); a checkpoint made
    by the other one is refused (checkpoints that record no forward count as "kpos").
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no draft checkpoint at {path}")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # corrupted file, or one that needs pickle
        raise ValueError(f"{path} is not a loadable draft checkpoint: {exc}") from exc
    if not isinstance(ckpt, dict) or set(ckpt) != set(CHECKPOINT_KEYS):
        got = sorted(ckpt) if isinstance(ckpt, dict) else type(ckpt).__name__
        raise ValueError(f"{path}: checkpoint keys must be exactly {list(CHECKPOINT_KEYS)}, got {got}")
    model_cfg = ckpt["config"].get("model")
    if not isinstance(model_cfg, dict):
        raise ValueError(f"{path}: config has no 'model' section to rebuild the draft from")
    args = {k: v for k, v in model_cfg.items() if k != "forward"}
    model = build_draft(_forward_of(path, model_cfg, forward), **args)
    model.load_state_dict(ckpt["model_state_dict"])
    model.eval()
    return model.to(map_location), ckpt
