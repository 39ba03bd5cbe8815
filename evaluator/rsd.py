"""The RSD engine: baseline and residual speculative decoding over any :class:`LayerwisePolicy` (docs/DESIGN.md §9).

Baseline, one chunk: prefix pass, then D block passes (layer l's codes feed block l+1), D = the
policy's ``decode_layers`` (<= L; layers D..L-1 at the centre level). Truncated decoding: the same with
k < D layers (a lossy baseline every lossy RSD arm is compared against).

RSD, one chunk:
1. prefix pass -> KV cache and hidden state h [B, D];
2. draft: h -> proposals D_0..D_{K-1} [B, K, T, H] and per-layer confidences [B, K];
   confidence gating keeps the leading k layers whose confidence reaches a threshold (k <= D-1);
3. verify: one pass over blocks [Q, D_0..D_{k-1}] -> M_0..M_k;
4. accept the longest prefix j <= k of layers with agree(D_l, M_l):
   strict = the whole layer equal (lossless: output identical to the baseline),
   relaxed(tau) = token agreement >= tau > 0, or decoded-action deviation <= epsilon (verified, lossy),
   substitute = every proposed layer, unchecked: draft substitution, NOT speculative decoding (the
   old "relaxed tau = 0", whose rule ``agreement >= 0`` could never reject);
5. output layers 0..j are M_0..M_j; the cache keeps blocks 0..j; layers j+1..D-1 are decoded one
   block per pass as in the baseline, layers D..L-1 are at the centre level.

Passes: baseline 1 + D; truncated 1 + k; RSD 1 + 1 + (D - j - 1) (the draft is not a pass of the
policy; its latency is measured and included in the chunk latency).

With a batch of several observations, one j is used for the whole batch (the smallest one): the
cache is truncated for all rows at once. Evaluation uses a batch of one.

Axes: B batch, K drafted layers, k proposed layers (<= K), T chunk_len, H action_hidden_dim,
G grid_size, L num_layers, A action_dim, D hidden.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from common.draft import DEFAULT_FORWARD, load_checkpoint
from common.policy import LayerwisePolicy, Observation, PrefixState, fill_center

MODES = ("strict", "relaxed", "substitute")


@dataclass(frozen=True)
class AcceptanceConfig:
    """How a drafted layer is judged against the policy's own prediction of that layer."""

    mode: str = "strict"
    #: relaxed mode: accept a layer when at least this fraction (> 0) of its T*H tokens agree
    tau: float = 1.0
    #: relaxed mode: also accept a layer whose decoded actions move by at most this much (max |Δ|
    #: over the chunk, in the env's [-1, 1] action space); None disables this criterion
    epsilon: float | None = None

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"acceptance mode must be one of {MODES}, got {self.mode!r}")
        if not 0.0 <= self.tau <= 1.0:
            raise ValueError(f"tau must be in [0, 1], got {self.tau}")
        if self.epsilon is not None and self.epsilon < 0:
            raise ValueError(f"epsilon must be >= 0 or None, got {self.epsilon}")
        if self.mode == "relaxed" and self.tau <= 0:
            raise ValueError(
                "relaxed(tau) needs tau > 0: with tau = 0 every drafted layer is accepted unchecked, which "
                "is draft substitution (mode 'substitute'), not speculative decoding"
            )

    @property
    def verified(self) -> bool:
        """Whether a drafted layer can be rejected (False only for draft substitution)."""
        return self.mode != "substitute"

    @property
    def lossless(self) -> bool:
        return self.mode == "strict"

    def label(self) -> str:
        if self.mode == "strict":
            return "strict (lossless speculative decoding)"
        if self.mode == "relaxed":
            eps = "" if self.epsilon is None else f", ε={self.epsilon:g}"
            return f"relaxed(τ={self.tau:g}{eps}) (verified, lossy speculative decoding)"
        return "draft substitution (UNVERIFIED: drafted layers taken unchecked; not speculative decoding)"


STRICT = AcceptanceConfig()


@dataclass(frozen=True)
class RSDConfig:
    acceptance: AcceptanceConfig = STRICT
    #: propose at most this many layers (None: all the draft predicts, capped at L-1)
    max_proposals: int | None = None
    #: propose only the leading layers whose confidence is at least this; 0 proposes every drafted layer
    confidence_threshold: float = 0.0
    #: which confidence gates: "layer" = the draft's probability that the whole layer is right
    #: (product of token probabilities; fits strict acceptance), "token" = its expected token
    #: agreement (mean of token probabilities; fits relaxed acceptance with tau)
    confidence_kind: str = "layer"
    #: synchronize the device and time each stage (prefix, draft, verify, decode, actions)
    stage_timing: bool = True

    def __post_init__(self) -> None:
        if self.max_proposals is not None and self.max_proposals < 0:
            raise ValueError(f"max_proposals must be >= 0 or None, got {self.max_proposals}")
        if not 0.0 <= self.confidence_threshold <= 1.0:
            raise ValueError(f"confidence_threshold must be in [0, 1], got {self.confidence_threshold}")
        if self.confidence_kind not in ("layer", "token"):
            raise ValueError(f"confidence_kind must be 'layer' or 'token', got {self.confidence_kind!r}")


@dataclass
class Proposal:
    """codes [B, K, T, H] long (argmax); confidence [B, K]: P(whole layer right) by the draft;
    token_confidence [B, K]: the draft's expected fraction of right tokens (defaults to confidence)."""

    codes: torch.Tensor
    confidence: torch.Tensor
    token_confidence: torch.Tensor | None = None


class Proposer(Protocol):
    """Anything that drafts coarse layers from the policy's hidden state."""

    num_layers: int

    def propose(self, hidden: torch.Tensor) -> Proposal: ...


class DraftProposer:
    """Wraps :class:`common.draft.RFSQDraftModelWithProjection` (or anything with its ``propose``).

    A layer's confidence is the product of its tokens' argmax probabilities: the draft's own
    estimate that the whole layer is right, which is what strict acceptance asks for.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
    ):
        self.model = model.eval()
        if device is not None or dtype is not None:
            self.model.to(device=device, dtype=dtype)
        p = next(self.model.parameters())
        self.device, self.dtype = p.device, p.dtype
        self.num_layers = int(model.num_coarse_layers)

    @torch.no_grad()
    def propose(self, hidden: torch.Tensor) -> Proposal:
        ids, probs = self.model.propose(hidden.to(device=self.device, dtype=self.dtype))  # [B, K, T, H] x2
        conf = probs.clamp_min(1e-12).log().sum(dim=(2, 3)).exp()  # [B, K]
        return Proposal(codes=ids, confidence=conf, token_confidence=probs.mean(dim=(2, 3)))

    @torch.no_grad()
    def marginals(self, hidden: torch.Tensor, chunk_len: int) -> torch.Tensor:
        """The draft's per-token distributions [B, K, T, H, G] (analysis only: tree verification)."""
        logits = self.model(hidden.to(device=self.device, dtype=self.dtype))  # [B, K, T*H, G]
        B, K, _, G = logits.shape
        return logits.float().softmax(-1).view(B, K, chunk_len, -1, G)


def load_draft(
    path: str | Path, policy: LayerwisePolicy, forward: str = DEFAULT_FORWARD
) -> tuple[DraftProposer, dict[str, Any]]:
    """The draft checkpoint at ``path`` as a proposer for ``policy``, and what eval.json records of it.

    ValueError when the draft reads other hidden states or predicts another code shape than the policy's.
    """
    model, ckpt = load_checkpoint(path, forward=forward)
    if model.input_dim != policy.hidden_dim:
        raise ValueError(
            f"draft {path} reads hidden states of size {model.input_dim}, the policy's are {policy.hidden_dim}"
        )
    s = policy.shape
    if (model.chunk_len, model.action_hidden_dim, model.grid_size) != (
        s.chunk_len,
        s.action_hidden_dim,
        s.grid_size,
    ):
        raise ValueError(f"draft {path} predicts another code shape than the policy's {s}")
    info = {
        "path": str(path),
        "num_coarse_layers": model.num_coarse_layers,
        "forward": model.forward_name,
        "val_accuracy": ckpt["val_accuracy"],
        "epoch": ckpt["epoch"],
        "config": ckpt["config"],
    }
    return DraftProposer(model), info


@dataclass
class ChunkStats:
    mode: str  # "baseline", "truncate" or "rsd"
    passes: int  # forward passes of the policy's language model
    proposed: int  # k: drafted layers sent to verification
    accepted: int  # j: drafted layers accepted
    latency_s: float  # whole chunk, observation in -> actions out
    stage_s: dict[str, float] = field(default_factory=dict)
    agreement: list[float] = field(default_factory=list)  # token agreement of each proposed layer


@dataclass
class ChunkResult:
    codes: torch.Tensor  # [B, T, H, L] long
    actions: torch.Tensor  # [B, T, A] float
    hidden: torch.Tensor  # [B, D]
    stats: ChunkStats
    draft: Proposal | None = None  # everything the draft predicted (all K layers)


def _synchronizer(device: torch.device) -> Callable[[], None]:
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def accepted_prefix(
    drafted: torch.Tensor,
    main: torch.Tensor,
    acceptance: AcceptanceConfig,
    deviation: Callable[[int], torch.Tensor] | None = None,
) -> tuple[int, list[float]]:
    """Length j of the accepted prefix and the token agreement of every proposed layer.

    drafted [B, k, T, H], main [B, >=k, T, H] long. ``deviation(l)`` -> [B] action deviation of
    layer l (relaxed mode with epsilon only; called lazily).
    """
    k = drafted.shape[1]
    if k == 0:
        return 0, []
    equal = drafted == main[:, :k]  # [B, k, T, H]
    agreement = equal.float().mean(dim=(2, 3))  # [B, k]
    if acceptance.mode == "substitute":
        return k, agreement.min(0).values.tolist()  # unverified: every proposed layer is taken
    if acceptance.mode == "strict":
        ok = equal.flatten(2).all(-1)  # [B, k]
    else:
        ok = agreement >= acceptance.tau  # [B, k]
    ok_rows = ok.all(0).tolist()  # one j for the whole batch
    agree = agreement.min(0).values.tolist()
    j = 0
    for layer in range(k):
        good = ok_rows[layer]
        if (
            not good
            and acceptance.mode == "relaxed"
            and acceptance.epsilon is not None
            and deviation is not None
        ):
            good = bool((deviation(layer) <= acceptance.epsilon).all())
        if not good:
            break
        j += 1
    return j, agree


class RSDEngine:
    """Decodes action chunks of a :class:`LayerwisePolicy`, with and without a draft."""

    def __init__(self, policy: LayerwisePolicy, proposer: Proposer | None, config: RSDConfig | None = None):
        self.policy = policy
        self.proposer = proposer
        self.config = config or RSDConfig()
        self.shape = policy.shape

    # ---- proposal length
    def proposal_length(self, proposal: Proposal) -> int:
        """k: how many leading drafted layers to verify (<= D-1; cap, then confidence gate)."""
        k = min(proposal.codes.shape[1], self.policy.decode_layers - 1)
        if self.config.max_proposals is not None:
            k = min(k, self.config.max_proposals)
        thr = self.config.confidence_threshold
        if thr > 0 and k > 0:
            conf = proposal.confidence
            if self.config.confidence_kind == "token" and proposal.token_confidence is not None:
                conf = proposal.token_confidence
            confident = (conf[:, :k] >= thr).all(0).tolist()  # [k]
            k = next((i for i, c in enumerate(confident) if not c), k)
        return k

    # ---- decoding after the prefix
    def decode_baseline(self, state: PrefixState, num_layers: int | None = None) -> torch.Tensor:
        """[B, T, H, L] codes with D block passes (``num_layers`` < D: truncated decoding)."""
        return self.policy.decode_sequential(state, num_layers=num_layers)

    def decode_rsd(
        self, state: PrefixState, proposal: Proposal
    ) -> tuple[torch.Tensor, int, int, list[float], float]:
        """Verify, accept, finish. Returns (codes [B, T, H, L], k, j, agreement, verify seconds)."""
        policy, s, acc = self.policy, self.shape, self.config.acceptance
        sync = _synchronizer(state.hidden.device)
        t0 = time.perf_counter()
        k = self.proposal_length(proposal)
        drafted = proposal.codes[:, :k].to(state.hidden.device).long()  # [B, k, T, H]
        main = policy.verify(state, drafted).argmax(-1)  # [B, k+1, T, H]

        deviation = None
        if acc.mode == "relaxed" and acc.epsilon is not None:

            def deviation(layer: int) -> torch.Tensor:  # [B] max |Δaction| from swapping M_l for D_l
                head = main[:, :layer].permute(0, 2, 3, 1)  # [B, T, H, layer]
                ours = torch.cat([head, main[:, layer, ..., None]], dim=-1)
                theirs = torch.cat([head, drafted[:, layer, ..., None]], dim=-1)
                a = policy.codes_to_actions(fill_center(ours, s.num_layers, s.grid_size))
                b = policy.codes_to_actions(fill_center(theirs, s.num_layers, s.grid_size))
                return (a - b).abs().flatten(1).max(-1).values

        j, agreement = accepted_prefix(drafted, main, acc, deviation)
        sync()
        t_verify = time.perf_counter() - t0
        policy.truncate(state, j + 1)
        layers = [main[:, layer] for layer in range(j + 1)]  # M_0..M_j
        for _ in range(j + 1, policy.decode_layers):
            layers.append(policy.decode_block(state, layers[-1]).argmax(-1))  # [B, T, H]
        codes = fill_center(torch.stack(layers, dim=-1), s.num_layers, s.grid_size)
        return codes, k, j, agreement, t_verify

    # ---- whole chunks
    @torch.no_grad()
    def baseline(self, observations: list[Observation]) -> ChunkResult:
        return self._chunk(observations, use_draft=False)

    @torch.no_grad()
    def truncated(self, observations: list[Observation], num_layers: int) -> ChunkResult:
        """Truncated decoding: the first ``num_layers`` layers, the rest at the centre level."""
        return self._chunk(observations, use_draft=False, num_layers=num_layers)

    @torch.no_grad()
    def rsd(self, observations: list[Observation]) -> ChunkResult:
        if self.proposer is None:
            raise ValueError("RSD decoding needs a proposer (draft model)")
        return self._chunk(observations, use_draft=True)

    def _chunk(
        self, observations: list[Observation], use_draft: bool, num_layers: int | None = None
    ) -> ChunkResult:
        policy, D = self.policy, self.policy.decode_layers
        timing = self.config.stage_timing
        stages: dict[str, float] = {}
        t_start = time.perf_counter()
        state = policy.prefix(observations)
        sync = _synchronizer(state.hidden.device)
        mark = t_start

        def lap(name: str) -> None:
            nonlocal mark
            if timing:
                sync()
                now = time.perf_counter()
                stages[name] = now - mark
                mark = now

        lap("prefix")
        proposal = None
        if use_draft:
            proposal = self.proposer.propose(state.hidden)
            lap("draft")
            codes, k, j, agreement, t_verify = self.decode_rsd(state, proposal)
            if timing:
                stages["verify"] = t_verify
            lap("decode")
            if timing:
                stages["decode"] -= t_verify
            passes = 1 + 1 + (D - j - 1)
        else:
            codes = self.decode_baseline(state, num_layers)
            lap("decode")
            k, j, agreement, passes = 0, 0, [], 1 + (D if num_layers is None else num_layers)
        actions = policy.codes_to_actions(codes)  # [B, T, A]
        sync()
        t_end = time.perf_counter()
        if timing:
            stages["actions"] = t_end - mark
        stats = ChunkStats(
            mode="rsd" if use_draft else ("baseline" if num_layers is None else "truncate"),
            passes=passes,
            proposed=k,
            accepted=j,
            latency_s=t_end - t_start,
            stage_s=stages,
            agreement=agreement,
        )
        return ChunkResult(codes=codes, actions=actions, hidden=state.hidden, stats=stats, draft=proposal)
