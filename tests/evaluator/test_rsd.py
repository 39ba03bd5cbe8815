"""RSD engine: strict decoding reproduces the baseline; relaxed with tau = 1 is strict; pass counts; gating.

The policy is the timing twin at a tiny size (a real Llama decoder with a static KV cache, random
weights; checked against transformers' LlamaModel in tests/common/test_twin.py). Random weights are fine
here: every claim tested is an identity between two decoding procedures of the same model.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from common.draft import RFSQDraftModelWithProjection
from common.policy import Observation
from common.vla.twin import TwinPolicy, tiny_config
from evaluator.rsd import (
    AcceptanceConfig,
    DraftProposer,
    Proposal,
    RSDConfig,
    RSDEngine,
    accepted_prefix,
)

L = 8


@pytest.fixture(scope="module")
def policy() -> TwinPolicy:
    torch.set_num_threads(1)
    return TwinPolicy(tiny_config(), seed=1)


def make_obs(seed: int) -> Observation:
    rng = np.random.default_rng(seed)
    return Observation(
        agentview=rng.integers(0, 256, (64, 64, 3), dtype=np.uint8),
        wrist=rng.integers(0, 256, (64, 64, 3), dtype=np.uint8),
        proprio=rng.standard_normal(8).astype(np.float32),
        instruction=f"pick up the black bowl number {seed}",
    )


class OracleProposer:
    """Proposes the baseline's own codes for the first ``good`` layers and a corrupted layer after.

    ``flip`` tokens of the first bad layer are changed (all tokens when ``flip`` is None).
    """

    def __init__(
        self, target: torch.Tensor, num_layers: int, good: int, flip: int | None = None, conf: float = 0.9
    ):
        codes = target.permute(0, 3, 1, 2)[:, :num_layers].clone()  # [B, K, T, H]
        if good < num_layers:
            bad = codes[:, good].flatten(1)
            n = bad.shape[1] if flip is None else flip
            bad[:, :n] = (bad[:, :n] + 1) % 7
            codes[:, good] = bad.view_as(codes[:, good])
        self.codes = codes
        self.num_layers = num_layers
        self.conf = torch.full(codes.shape[:2], conf)

    def propose(self, hidden: torch.Tensor) -> Proposal:
        return Proposal(codes=self.codes, confidence=self.conf)


def engine(policy, proposer, **kw) -> RSDEngine:
    acc = {k: kw.pop(k) for k in ("mode", "tau", "epsilon") if k in kw}
    return RSDEngine(policy, proposer, RSDConfig(acceptance=AcceptanceConfig(**acc), **kw))


@pytest.mark.parametrize("good", [0, 1, 2, 3])
def test_strict_equals_baseline_and_counts_passes(policy, good):
    obs = [make_obs(good)]
    base = engine(policy, None).baseline(obs)
    assert base.stats.passes == 1 + L
    prop = OracleProposer(base.codes, num_layers=3, good=good)
    out = engine(policy, prop).rsd(obs)
    assert out.stats.accepted == min(good, 3)
    assert out.stats.proposed == 3
    assert out.stats.passes == 1 + 1 + (L - out.stats.accepted - 1)
    assert torch.equal(out.codes, base.codes)
    assert torch.equal(out.actions, base.actions)


def test_strict_equals_baseline_with_real_draft_model(policy):
    torch.manual_seed(0)
    draft = RFSQDraftModelWithProjection(input_dim=policy.hidden_dim, hidden_dim=64, num_coarse_layers=3)
    eng = engine(policy, DraftProposer(draft))
    for seed in range(3):
        obs = [make_obs(100 + seed)]
        base, out = eng.baseline(obs), eng.rsd(obs)
        assert torch.equal(out.codes, base.codes)
        assert out.draft is not None and out.draft.codes.shape == (1, 3, 8, 16)
        assert 0.0 <= float(out.draft.confidence.max()) <= 1.0
        assert set(out.stats.stage_s) == {"prefix", "draft", "verify", "decode", "actions"}


@pytest.mark.parametrize("good,flip", [(0, 1), (1, 5), (2, None), (3, None)])
def test_relaxed_tau_one_equals_strict(policy, good, flip):
    obs = [make_obs(10 + good)]
    base = engine(policy, None).baseline(obs)
    prop = OracleProposer(base.codes, num_layers=3, good=good, flip=flip)
    strict = engine(policy, prop, mode="strict").rsd(obs)
    relaxed = engine(policy, prop, mode="relaxed", tau=1.0).rsd(obs)
    assert relaxed.stats.accepted == strict.stats.accepted
    assert torch.equal(relaxed.codes, strict.codes)
    assert torch.equal(relaxed.codes, base.codes)


def test_relaxed_accepts_near_miss_and_outputs_main_codes(policy):
    obs = [make_obs(20)]
    base = engine(policy, None).baseline(obs)
    prop = OracleProposer(base.codes, num_layers=3, good=1, flip=2)  # layer 1: 2 of 128 tokens wrong
    strict = engine(policy, prop, mode="strict").rsd(obs)
    relaxed = engine(policy, prop, mode="relaxed", tau=0.95).rsd(obs)
    assert strict.stats.accepted == 1
    assert relaxed.stats.accepted == 3
    assert relaxed.stats.passes == strict.stats.passes - 2
    assert relaxed.stats.agreement[1] == pytest.approx(126 / 128)
    # layers 0..1 come from the policy's own predictions M_0, M_1 (the draft's near miss is not output)
    assert torch.equal(relaxed.codes[..., :2], base.codes[..., :2])


def test_relaxed_epsilon_criterion(policy):
    obs = [make_obs(21)]
    base = engine(policy, None).baseline(obs)
    prop = OracleProposer(base.codes, num_layers=3, good=0)  # every token of layer 0 wrong
    none = engine(policy, prop, mode="relaxed", tau=1.0, epsilon=0.0).rsd(obs)
    loose = engine(policy, prop, mode="relaxed", tau=1.0, epsilon=10.0).rsd(obs)
    assert none.stats.accepted == 0
    assert torch.equal(none.codes, base.codes)
    assert loose.stats.accepted == 3


def test_confidence_gating_and_proposal_cap(policy):
    obs = [make_obs(30)]
    base = engine(policy, None).baseline(obs)
    prop = OracleProposer(base.codes, num_layers=8, good=8, conf=0.5)  # K = L: all layers right
    full = engine(policy, prop).rsd(obs)
    assert full.stats.proposed == L - 1  # layer L-1 has no block after it to verify
    assert full.stats.accepted == L - 1 and full.stats.passes == 2
    assert torch.equal(full.codes, base.codes)
    gated = engine(policy, prop, confidence_threshold=0.6).rsd(obs)
    assert gated.stats.proposed == 0 and gated.stats.passes == 1 + L
    assert torch.equal(gated.codes, base.codes)
    capped = engine(policy, prop, max_proposals=2).rsd(obs)
    assert capped.stats.proposed == 2 and capped.stats.accepted == 2


def test_accepted_prefix_counts_leading_layers_only():
    main = torch.zeros(1, 4, 2, 3, dtype=torch.long)
    drafted = main[:, :3].clone()
    drafted[0, 1, 0, 0] = 1  # layer 1 off by one token; layer 2 right again
    j, agree = accepted_prefix(drafted, main, AcceptanceConfig())
    assert j == 1
    assert agree == pytest.approx([1.0, 5 / 6, 1.0])
    j, _ = accepted_prefix(drafted, main, AcceptanceConfig(mode="relaxed", tau=0.8))
    assert j == 3


def test_config_validation():
    with pytest.raises(ValueError, match="mode"):
        AcceptanceConfig(mode="loose")
    with pytest.raises(ValueError, match="tau"):
        AcceptanceConfig(mode="relaxed", tau=1.5)
    with pytest.raises(ValueError, match="draft substitution"):  # tau = 0 could never reject a layer
        AcceptanceConfig(mode="relaxed", tau=0.0)
    assert not AcceptanceConfig(mode="substitute").verified and AcceptanceConfig().lossless
    assert "UNVERIFIED" in AcceptanceConfig(mode="substitute").label()
    with pytest.raises(ValueError, match="confidence_threshold"):
        RSDConfig(confidence_threshold=-0.1)


def test_token_confidence_gating(policy):
    obs = [make_obs(31)]
    base = engine(policy, None).baseline(obs)
    prop = OracleProposer(base.codes, num_layers=3, good=3, conf=1e-6)  # P(whole layer right) tiny
    prop_tokens = Proposal(
        codes=prop.codes, confidence=prop.conf, token_confidence=torch.tensor([[0.9, 0.8, 0.5]])
    )

    class Fixed:
        num_layers = 3

        def propose(self, hidden):
            return prop_tokens

    by_layer = engine(policy, Fixed(), confidence_threshold=0.7).rsd(obs)
    by_token = engine(policy, Fixed(), confidence_threshold=0.7, confidence_kind="token").rsd(obs)
    assert by_layer.stats.proposed == 0
    assert by_token.stats.proposed == 2 and by_token.stats.accepted == 2
    assert torch.equal(by_token.codes, base.codes)


def test_substitution_takes_every_layer_unchecked(policy):
    obs = [make_obs(40)]
    base = engine(policy, None).baseline(obs)
    prop = OracleProposer(base.codes, num_layers=3, good=0)  # every drafted layer wrong
    sub = engine(policy, prop, mode="substitute").rsd(obs)
    assert sub.stats.proposed == sub.stats.accepted == 3 and sub.stats.passes == 1 + 1 + (L - 4)
    assert sub.stats.agreement[0] < 0.05  # nothing was checked: a wholly wrong layer 0 was taken
    assert torch.equal(sub.codes[..., 0], base.codes[..., 0])  # M_0 is the policy's (its block sees no draft)
    assert not torch.equal(sub.codes, base.codes)


@pytest.mark.parametrize("k", range(1, L + 1))
def test_truncated_decoding_reproduces_the_baselines_first_layers(policy, k):
    obs = [make_obs(50 + k)]
    base = engine(policy, None).baseline(obs)
    trunc = engine(policy, None).truncated(obs, k)
    assert torch.equal(trunc.codes[..., :k], base.codes[..., :k])
    assert (trunc.codes[..., k:] == policy.shape.grid_size // 2).all()  # the centre level
    assert trunc.stats.passes == 1 + k and trunc.stats.mode == "truncate"
    if k == L:
        assert torch.equal(trunc.actions, base.actions)


@pytest.mark.parametrize("good", [0, 1, 2, 3])
def test_decode_layers_sets_the_baseline_and_rsd_stays_exact(policy, good):
    """With D < L decoded layers the baseline is the truncation at D, and strict RSD reproduces it."""
    obs = [make_obs(60 + good)]
    full = engine(policy, None).baseline(obs)
    policy.decode_layers = 3
    try:
        base = engine(policy, None).baseline(obs)
        assert base.stats.passes == 1 + 3 and base.codes.shape[-1] == L
        assert torch.equal(base.codes[..., :3], full.codes[..., :3])
        assert (base.codes[..., 3:] == policy.shape.grid_size // 2).all()
        out = engine(policy, OracleProposer(base.codes, num_layers=3, good=good)).rsd(obs)
        assert out.stats.proposed == 2  # at most D - 1 drafted layers
        assert out.stats.accepted == min(good, 2) and out.stats.passes == 2 + (3 - out.stats.accepted - 1)
        assert torch.equal(out.codes, base.codes) and torch.equal(out.actions, base.actions)
    finally:
        policy.decode_layers = None
    with pytest.raises(ValueError, match="decode_layers"):
        policy.decode_layers = L + 1
