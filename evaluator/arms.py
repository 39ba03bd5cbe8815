"""Decoding arms of an evaluation, each named for what it does (DESIGN §6).

| kind | name(s) | what it does | output |
|---|---|---|---|
| baseline | ``baseline`` | the policy's own decoding: D layers sequentially (D = its ``decode_layers``) | reference |
| truncation | ``truncate-k1`` … ``truncate-kL`` | the first k layers, the rest at the centre level; no draft | lossy, no check |
| strict | ``strict``, ``strict-kN`` | speculative decoding, a drafted layer kept only if it equals the policy's | **lossless** |
| relaxed | ``relaxed``, ``relaxed-tauX``, ``relaxed-confX`` | speculative decoding, a drafted layer kept if ≥ τ > 0 of its tokens agree | verified, lossy |
| substitution | ``draft-substitution`` | every drafted layer taken as context unchecked (the old "relaxed τ = 0") | **unverified**, lossy; not speculative decoding |

``truncate-kD`` decodes exactly what the baseline decodes (a timing-noise check); ``truncate-kL`` is
the full L-layer decoding. A lossy arm is judged against the truncations on the speed/fidelity
frontier (evaluator/frontier.py).
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import Any

from common.policy import Observation
from evaluator.rsd import AcceptanceConfig, ChunkResult, RSDConfig, RSDEngine

KINDS = ("baseline", "truncation", "strict", "relaxed", "substitution")
SUBSTITUTION = "draft-substitution"
FIXED_NAMES = ("baseline", "strict", "relaxed", SUBSTITUTION)
_TRUNC = re.compile(r"^truncate-k([1-9][0-9]*)$")

DESCRIPTION = {
    "baseline": "the policy's own decoding (reference)",
    "truncation": "first k layers decoded, the rest at the centre level (lossy; no draft, no check)",
    "strict": "speculative decoding, strict: output identical to the baseline (lossless)",
    "relaxed": "speculative decoding, relaxed(τ > 0): verified, lossy",
    "substitution": "UNVERIFIED draft substitution: drafted layers used unchecked (not speculative decoding)",
}
_MODE_OF_KIND = {"strict": "strict", "relaxed": "relaxed", "substitution": "substitute"}


def truncation_layers(name: str) -> int | None:
    """k of a ``truncate-kK`` arm name, else None."""
    m = _TRUNC.match(name)
    return int(m.group(1)) if m else None


def is_known_name(name: str) -> bool:
    """Names a closed-loop arm may take before the arms are built (sweep names are open loop only)."""
    return name in FIXED_NAMES or truncation_layers(name) is not None


@dataclass(frozen=True)
class Arm:
    """One way of decoding a chunk. ``rsd`` for the drafted kinds; ``layers`` (k) for truncations."""

    name: str
    kind: str
    rsd: RSDConfig | None = None
    layers: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"arm kind must be one of {KINDS}, got {self.kind!r}")
        drafted = self.kind in _MODE_OF_KIND
        if drafted != (self.rsd is not None):
            raise ValueError(
                f"arm {self.name!r}: kind {self.kind} {'needs' if drafted else 'takes no'} RSD config"
            )
        if drafted and self.rsd.acceptance.mode != _MODE_OF_KIND[self.kind]:
            raise ValueError(
                f"arm {self.name!r} of kind {self.kind} has acceptance mode {self.rsd.acceptance.mode!r}"
            )
        if (self.kind == "truncation") != (self.layers is not None):
            raise ValueError(f"arm {self.name!r}: only truncations (and all of them) name their layers")

    @property
    def drafted(self) -> bool:
        return self.rsd is not None

    @property
    def lossless(self) -> bool:
        return self.kind in ("baseline", "strict")

    @property
    def verified(self) -> bool | None:
        """True for strict/relaxed, False for draft substitution, None where nothing is drafted."""
        return None if self.rsd is None else self.rsd.acceptance.verified

    @property
    def speculative(self) -> bool:
        return self.kind in ("strict", "relaxed")

    def label(self) -> str:
        if self.kind == "truncation":
            return f"truncated decoding, first {self.layers} layers (lossy, no check)"
        if self.rsd is None:
            return DESCRIPTION["baseline"]
        extra = []
        if self.rsd.max_proposals is not None:
            extra.append(f"at most {self.rsd.max_proposals} drafted layers")
        if self.rsd.confidence_threshold > 0:
            extra.append(f"{self.rsd.confidence_kind} confidence ≥ {self.rsd.confidence_threshold:g}")
        return self.rsd.acceptance.label() + (f"; {', '.join(extra)}" if extra else "")

    def decode(self, engine: RSDEngine, observations: list[Observation]) -> ChunkResult:
        if self.kind == "truncation":
            return engine.truncated(observations, self.layers)
        return engine.baseline(observations) if self.rsd is None else engine.rsd(observations)

    def describe(self) -> dict[str, Any]:
        """What eval.json records about the arm."""
        return {
            "kind": self.kind,
            "label": self.label(),
            "lossless": self.lossless,
            "verified": self.verified,
            "speculative_decoding": self.speculative,
            "layers": self.layers,
            "rsd": None
            if self.rsd is None
            else {**asdict(self.rsd), "acceptance": asdict(self.rsd.acceptance)},
        }

    def to_dict(self) -> dict[str, Any]:
        d = self.describe()
        return {"name": self.name, "kind": self.kind, "layers": self.layers, "rsd": d["rsd"]}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Arm:
        rsd = None
        if d.get("rsd") is not None:
            kw = dict(d["rsd"])
            kw["acceptance"] = AcceptanceConfig(**kw["acceptance"])
            rsd = RSDConfig(**kw)
        return cls(name=d["name"], kind=d["kind"], rsd=rsd, layers=d.get("layers"))


def build_arms(
    *,
    num_layers: int,
    num_drafted: int,
    decode_layers: int,
    tau: float,
    epsilon: float | None,
    confidence_threshold: float,
    max_proposals: int | None,
    sweep_tau: list[float],
    sweep_confidence: list[float],
    sweep_max_proposals: list[int],
    substitution: bool,
    truncations: bool,
) -> dict[str, Arm]:
    """Every arm of an evaluation, baseline first. Drafted arms propose at most D - 1 layers."""
    gate, cap = confidence_threshold, max_proposals
    relaxed = AcceptanceConfig("relaxed", tau, epsilon)
    arms = {
        "baseline": Arm("baseline", "baseline"),
        "strict": Arm("strict", "strict", RSDConfig(AcceptanceConfig("strict"), cap, gate)),
        "relaxed": Arm("relaxed", "relaxed", RSDConfig(relaxed, cap, gate)),
    }

    def add(arm: Arm) -> None:
        arms.setdefault(arm.name, arm)

    for t in sweep_tau:
        add(
            Arm(f"relaxed-tau{t:g}", "relaxed", RSDConfig(AcceptanceConfig("relaxed", t, epsilon), cap, gate))
        )
    for c in sweep_confidence:
        add(Arm(f"relaxed-conf{c:g}", "relaxed", RSDConfig(relaxed, cap, c, confidence_kind="token")))
    usable = min(num_drafted, decode_layers - 1)
    for m in sweep_max_proposals:
        if m < usable:
            add(Arm(f"strict-k{m}", "strict", RSDConfig(AcceptanceConfig("strict"), m, 0.0)))
    if substitution:
        add(Arm(SUBSTITUTION, "substitution", RSDConfig(AcceptanceConfig("substitute"), cap, 0.0)))
    if truncations:
        for k in range(1, num_layers + 1):
            add(Arm(f"truncate-k{k}", "truncation", layers=k))
    return arms
