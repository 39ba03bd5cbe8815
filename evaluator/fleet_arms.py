"""The default builder of an :class:`~evaluator.protocol.ArmSpec`: spec -> ``obs -> [T, A]`` act callable.

Decodings (``ArmSpec.decoding``):

* ``policy``   — the backend's own ``act`` (what ``make eval-vla`` measures);
* ``baseline`` — layer-by-layer decoding in the RSD engine without a draft (ordinary decoding of the
  policy's informative depth D);
* ``truncation`` — the first ``params["layers"]`` layers, the rest at the centre level (lossy, no draft);
* ``strict`` / ``relaxed`` — residual speculative decoding with the arm's draft (strict: lossless;
  relaxed: verified, lossy, τ > 0); ``params`` holds the :class:`~evaluator.rsd.RSDConfig` /
  :class:`~evaluator.rsd.AcceptanceConfig` fields ``tau``, ``epsilon``, ``max_proposals``,
  ``confidence_threshold``, ``confidence_kind``;
* ``substitution`` — UNVERIFIED draft substitution: drafted layers used unchecked (not speculative
  decoding; the arms of evaluator/arms.py name it ``draft-substitution``).

Every layer-wise decoding takes ``params["decode_layers"]`` (the policy's D; default: its config); drafted
ones ``params["draft_forward"]`` (the draft checkpoint's forward, common/draft.py; default: the plan's).

Policies and drafts are loaded once per worker process and shared by the arms that name the same
files. RSD act callables count chunks, accepted layers and passes; ``episode_extra()`` returns (and
resets) them for the episode's record.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import numpy as np

from common.draft import DEFAULT_FORWARD
from common.policy import Observation
from common.vla import load_policy
from evaluator.protocol import ArmSpec
from evaluator.rsd import AcceptanceConfig, RSDConfig, RSDEngine, load_draft

DECODINGS = ("policy", "baseline", "truncation", "strict", "relaxed", "substitution")
RSD_PARAMS = ("tau", "epsilon", "max_proposals", "confidence_threshold", "confidence_kind")
OTHER_PARAMS = ("layers", "decode_layers", "draft_forward", "execute")
_MODE = {"strict": "strict", "relaxed": "relaxed", "substitution": "substitute"}


@lru_cache(maxsize=4)
def _policy(backend: str, weights: str | None, codec: str | None, random_weights: bool, allow_random: bool,
            seed: int, device: str, layerwise: bool, decode_layers: int | None = None) -> Any:  # fmt: skip
    return load_policy(backend, device=device, weights_dir=weights, codec_dir=codec, allow_random=allow_random,
                       random_weights=random_weights, seed=seed, decode_layers=decode_layers,
                       layerwise=layerwise)  # fmt: skip


@lru_cache(maxsize=4)
def _draft(path: str, policy: Any, forward: str = DEFAULT_FORWARD) -> Any:
    return load_draft(path, policy, forward)[0]


def rsd_config(spec: ArmSpec) -> RSDConfig | None:
    """The RSD config of a strict / relaxed arm (None for the baseline); ValueError names bad params."""
    bad = set(spec.params) - set(RSD_PARAMS) - set(OTHER_PARAMS)
    if bad:
        valid = RSD_PARAMS + OTHER_PARAMS
        raise ValueError(f"arm {spec.name}: unknown decoding params {sorted(bad)}; valid: {valid}")
    if spec.decoding in ("baseline", "truncation"):
        return None
    p = spec.params
    tau = p.get("tau", 1.0 if spec.decoding != "substitution" else 0.0)
    acceptance = AcceptanceConfig(_MODE[spec.decoding], tau, p.get("epsilon"))
    return RSDConfig(
        acceptance,
        max_proposals=p.get("max_proposals"),
        confidence_threshold=p.get("confidence_threshold", 0.0),
        confidence_kind=p.get("confidence_kind", "layer"),
        stage_timing=False,
    )


class RSDAct:
    """Act callable of a baseline / strict / relaxed arm, with per-episode decoding counters."""

    def __init__(self, engine: RSDEngine, use_draft: bool, truncate: int | None = None) -> None:
        self.engine, self.use_draft, self.truncate = engine, use_draft, truncate
        self.backbone_id = engine.policy.backbone_id
        self._reset()

    def _reset(self) -> None:
        self.chunks = self.accepted = self.proposed = self.passes = 0

    def __call__(self, obs: Observation) -> np.ndarray:
        if self.truncate is not None:
            out = self.engine.truncated([obs], self.truncate)
        else:
            out = self.engine.rsd([obs]) if self.use_draft else self.engine.baseline([obs])
        self.chunks += 1
        self.accepted += out.stats.accepted
        self.proposed += out.stats.proposed
        self.passes += out.stats.passes
        return out.actions[0].float().cpu().numpy()  # [T, A]

    def episode_extra(self) -> dict[str, Any]:
        n = max(self.chunks, 1)
        extra = {
            "chunks": self.chunks,
            "mean_accepted": self.accepted / n,
            "mean_proposed": self.proposed / n,
            "mean_passes": self.passes / n,
        }
        self._reset()
        return extra


class FirstActions:
    """An act callable that hands the episode only the first ``k`` actions of every chunk, so the policy
    is queried again (re-plans) after ``k`` steps instead of after the whole chunk."""

    def __init__(self, act: Any, k: int) -> None:
        self.act, self.k = act, k
        self.backbone_id = getattr(act, "backbone_id", "")

    def __call__(self, obs: Observation) -> np.ndarray:
        out = self.act(obs)
        return np.asarray(getattr(out, "actions", out))[: self.k]

    def episode_extra(self) -> dict[str, Any]:
        return self.act.episode_extra() if hasattr(self.act, "episode_extra") else {}


def build_act(spec: ArmSpec) -> Any:
    """Build the arm's act callable (in a worker process); ``params["execute"]`` = k re-plans every k
    actions (default: the whole chunk runs open-loop)."""
    k = spec.params.get("execute")
    if k is None:
        return _build_act(spec)
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise ValueError(f"arm {spec.name}: params['execute'] must be an int >= 1, got {k!r}")
    return FirstActions(_build_act(spec), k)


def _build_act(spec: ArmSpec) -> Any:
    if spec.decoding not in DECODINGS:
        raise ValueError(f"arm {spec.name}: decoding must be one of {DECODINGS}, got {spec.decoding!r}")
    if spec.decoding == "policy":
        policy = _policy(spec.backend, spec.weights, spec.codec, spec.random_weights, spec.allow_random,
                         spec.seed, spec.device, False)  # fmt: skip

        def act(obs: Observation) -> np.ndarray:
            return policy.act([obs])[0].actions  # [T, A]

        act.backbone_id = policy.backbone_id  # type: ignore[attr-defined]
        return act
    if spec.random_weights:
        raise ValueError(f"arm {spec.name}: random_weights is only for decoding 'policy'")
    config = rsd_config(spec)
    policy = _policy(
        spec.backend, spec.weights, spec.codec, False, spec.allow_random, spec.seed, spec.device, True,
        spec.params.get("decode_layers"),
    )  # fmt: skip
    if config is None:
        truncate = spec.params.get("layers") if spec.decoding == "truncation" else None
        if spec.decoding == "truncation" and not isinstance(truncate, int):
            raise ValueError(f"arm {spec.name}: truncation needs params['layers'] (an int)")
        return RSDAct(RSDEngine(policy, None, RSDConfig(stage_timing=False)), False, truncate)
    if not spec.draft:
        raise ValueError(f"arm {spec.name}: decoding {spec.decoding!r} needs a draft checkpoint")
    draft = _draft(spec.draft, policy, spec.params.get("draft_forward", DEFAULT_FORWARD))
    return RSDAct(RSDEngine(policy, draft, config), use_draft=True)
