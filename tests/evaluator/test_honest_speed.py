"""Honest speed: the shipped VLA's decoded depth, exactness of strict RSD and truncation on the real
shipped weights, the frontier rule, and the tree-verification bound's arithmetic."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch

from common.draft import RFSQDraftModelWithProjection
from common.layer_info import DepthRule, depth_from_dirs, informative_depth, layer_information
from common.policy import Observation
from common.vla import DEFAULT_CODEC_DIR, DEFAULT_EMBEDDED_DIR, load_policy
from evaluator.frontier import frontier
from evaluator.lossless_bound import Timings7B, candidate_rank, hit_rates, strict_projection, tree_blocks
from evaluator.rsd import AcceptanceConfig, DraftProposer, RSDConfig, RSDEngine
from tools.strict_check import OracleDraft


@pytest.fixture(scope="module")
def shipped():
    torch.set_num_threads(1)
    return load_policy("embedded")


def obs(seed: int) -> Observation:
    rng = np.random.default_rng(seed)
    return Observation(
        agentview=rng.integers(0, 256, (128, 128, 3), dtype=np.uint8),
        wrist=rng.integers(0, 256, (128, 128, 3), dtype=np.uint8),
        proprio=(
            np.array([-0.07, 0.06, 1.06, 2.6, 0.08, 0.0, 0.02, -0.02]) + 0.02 * rng.standard_normal(8)
        ).astype(np.float32),
        instruction="pick up the black bowl between the plate and the ramekin and place it on the plate",
    )


def test_shipped_vla_decodes_its_informative_layers(shipped):
    meta = json.loads((DEFAULT_EMBEDDED_DIR / "config.json").read_text())
    depth, evidence, _ = depth_from_dirs(DEFAULT_EMBEDDED_DIR, DEFAULT_CODEC_DIR)
    assert shipped.decode_layers == meta["model"]["decode_layers"] == depth == 3
    # D = min(D_codec, D_policy): the shipped policy predicts the fourth layer (index 3) just above its
    # threshold (0.199 against 0.143 + 0.05), but the codec's error with 3 layers is already within 10 %
    # of its error with all 8
    assert meta["decode_layers_evidence"]["decode_layers"] == 3 and evidence["d_codec"] == 3
    assert evidence["d_policy"] >= 3 and depth == min(evidence["d_codec"], evidence["d_policy"])
    out = shipped.act([obs(0)])[0]
    assert out.codes.shape == (8, 16, 8)  # wire and archive keep the [T, H, L] shape
    assert (out.codes[..., 3:] == 3).all()  # the uninformative tail at the centre level, no pass
    assert load_policy("embedded", decode_layers=8).decode_layers == 8


def test_truncation_on_the_shipped_vla_reproduces_the_first_layers(shipped):
    eng = RSDEngine(shipped, None)
    for seed in range(2):
        o = [obs(seed)]
        full = eng.truncated(o, 8)
        for k in range(1, 9):
            t = eng.truncated(o, k)
            assert torch.equal(t.codes[..., :k], full.codes[..., :k]), k
            assert (t.codes[..., k:] == 3).all()
        assert torch.equal(eng.baseline(o).codes, eng.truncated(o, 3).codes)


@pytest.mark.parametrize("decode_layers", [3, 8])
def test_strict_rsd_equals_the_baseline_on_the_shipped_vla(shipped, decode_layers):
    """Codes and actions identical, for every accepted depth and for a real draft model."""
    shipped.decode_layers = decode_layers
    try:
        torch.manual_seed(0)
        draft = DraftProposer(RFSQDraftModelWithProjection(input_dim=shipped.hidden_dim, num_coarse_layers=3))
        for seed in range(2):
            o = [obs(10 + seed)]
            base = RSDEngine(shipped, None).baseline(o)
            accepted = set()
            for good in range(4):
                out = RSDEngine(shipped, OracleDraft(base.codes, good, 3)).rsd(o)
                accepted.add(out.stats.accepted)
                assert torch.equal(out.codes, base.codes) and torch.equal(out.actions, base.actions), good
            assert accepted == set(range(min(3, decode_layers - 1) + 1))  # every j was exercised
            out = RSDEngine(shipped, draft, RSDConfig(AcceptanceConfig("strict"))).rsd(o)
            assert torch.equal(out.codes, base.codes) and torch.equal(out.actions, base.actions)
    finally:
        shipped.decode_layers = 3


def test_informative_depth_rule():
    codec = {
        "shape": {"grid_size": 7},
        "metrics": {"validation": {"mse_norm": [1e-2, 1e-3, 1e-4, 9.5e-5, 9.4e-5]}},
    }
    vla = {"held_out": {"free_layer_acc": [0.9, 0.8, 0.6, 0.5, 0.15]}}
    info = layer_information(codec, vla)
    depth, ev = informative_depth(info)
    assert (ev["d_codec"], ev["d_policy"], depth) == (3, 4, 3)  # the codec needs 3; min of the two
    vla["held_out"]["free_layer_acc"] = [0.9, 0.17, 0.15, 0.15, 0.15]
    assert informative_depth(layer_information(codec, vla))[0] == 1  # the policy predicts layer 0 only
    assert informative_depth(info, DepthRule(codec_rel_tol=0.0))[0] == 4  # codec: 5 needed, policy: 4
    with pytest.raises(ValueError, match="free_layer_acc"):
        layer_information(codec, {})


def _arm(kind, speed, mean, p99):
    return {
        "kind": kind,
        "speedup_median": speed,
        "action_deviation": {"mean_abs": mean, "p99_abs": p99},
        "verified": kind != "substitution",
    }


def test_frontier_verdict():
    result = {
        "arms": {
            "baseline": _arm("baseline", 1.0, 0.0, 0.0),
            "truncate-k2": _arm("truncation", 1.5, 0.004, 0.02),
            "strict": _arm("strict", 0.9, 0.0, 0.0),
            "relaxed": _arm("relaxed", 1.3, 0.006, 0.03),  # slower and less faithful than truncate-k2
            "fast": _arm("relaxed", 1.6, 0.006, 0.03),  # faster than every truncation
            "draft-substitution": _arm("substitution", 1.4, 0.003, 0.01),  # more faithful than k2
        },
        "closed_loop": {
            "truncate-k2": {"success_rate": 0.5},
            "draft-substitution": {"success_rate": 0.6},
        },
    }
    rows = {r["arm"]: r for r in frontier(result)}
    assert rows["baseline"]["win"] is None and rows["truncate-k2"]["win"] is None
    assert not rows["strict"]["win"] and rows["strict"]["dominated_by"] == ["baseline"]
    assert not rows["relaxed"]["win"] and "truncate-k2" in rows["relaxed"]["verdict"]
    assert rows["fast"]["win"] and rows["draft-substitution"]["win"]
    result["closed_loop"]["truncate-k2"]["success_rate"] = 0.7
    result["arms"]["draft-substitution"] = _arm("substitution", 1.4, 0.005, 0.03)
    assert not {r["arm"]: r for r in frontier(result)}["draft-substitution"]["win"]
    # a 7B projection replaces the speeds; arms without one are left out
    rows = {
        r["arm"]: r for r in frontier(result, speeds={"baseline": 1.0, "truncate-k2": 1.2, "relaxed": 1.3})
    }
    assert set(rows) == {"baseline", "truncate-k2", "relaxed"} and rows["relaxed"]["win"]


def test_candidate_rank_is_the_exact_rank_under_independent_marginals():
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        probs = torch.rand(4, 3, generator=g).softmax(-1)  # 4 tokens, 3 levels: 81 whole layers
        truth = torch.randint(0, 3, (4,), generator=g)
        joint = {
            c: float(np.prod([probs[t, c[t]] for t in range(4)]))
            for c in itertools.product(range(3), repeat=4)
        }
        order = sorted(joint, key=joint.get, reverse=True)
        rank = order.index(tuple(truth.tolist())) + 1
        assert candidate_rank(probs, truth, 81) == rank
        assert candidate_rank(probs, truth, 10) == (rank if rank <= 10 else 0)
    assert candidate_rank(torch.eye(3)[[0, 1, 2]], torch.tensor([0, 1, 2]), 1) == 1


def test_hit_rates_and_strict_projection():
    ranks = np.array([[1, 1], [3, 1], [0, 2], [1, 0]])
    h = hit_rates(ranks.tolist(), 64)
    assert h["per_layer"]["1"] == [0.5, 0.5] and h["per_layer"]["4"] == [0.75, 0.75]
    assert h["first_two_layers"]["1x1"] == 0.25 and h["first_two_layers"]["4x2"] == 0.5
    assert tree_blocks((1, 1)) == 3 and tree_blocks((4, 2)) == 1 + 4 + 8
    t = Timings7B(3.0, 16.0, 4.5, 0.2, {1: 4.5, 3: 4.7, 13: 6.0}, "test")
    p = strict_projection(t, 3, ranks, (1, 1))
    assert p["p_j_at_least"] == [0.5, 0.25] and p["mean_j"] == 0.75
    base, rsd = 3 + 16 + 3 * 4.5, 3 + 16 + 0.2 + 4.7 + (2 - 0.75) * 4.5
    assert p["speedup"] == pytest.approx(base / rsd)
    assert p["speedup_if_all_accepted"] == pytest.approx(base / (3 + 16 + 0.2 + 4.7))
    fixed = 3 + 16 + 0.2 + 4.7
    assert p["mean_j_needed"] == pytest.approx(2 - (base / 1.3 - fixed) / 4.5)
    wide = strict_projection(t, 3, ranks, (4, 2))
    assert wide["verify_ms"] == 6.0 and wide["mean_j"] == pytest.approx(0.75 + 0.5)
    assert t.verify_ms(8) == pytest.approx(4.7 + 5 * 1.3 / 10)


def test_demo_summary_explains_columns_and_says_when_rsd_was_slower(capsys):
    from evaluator.demo import print_summary

    def arm(kind, speed, j=0.0, lossless=False, rsd=True):
        a = _arm(kind, speed, 0.0 if lossless else 0.004, 0.0 if lossless else 0.02)
        a.update(latency_ms={"median": 20 / speed}, mean_j=j, identical_fraction=1.0 if lossless else 0.0)
        a.update(lossless=lossless, rsd={"acceptance": {}} if rsd else None)
        return a

    ev = {
        "chunks": 10,
        "meta": {"decode_layers": 3},
        "arms": {
            "baseline": arm("baseline", 1.0, lossless=True, rsd=False),
            "strict": arm("strict", 0.87, 0.1, lossless=True),
            "relaxed": arm("relaxed", 1.1, 1.5),
            "draft-substitution": arm("substitution", 1.2, 2.0),
            "truncate-k2": arm("truncation", 1.4, rsd=False),
        },
    }
    ev["frontier"] = frontier(ev)
    print_summary({"run_dir": "/tmp/x", "eval": ev})
    out = capsys.readouterr().out
    assert "`strict` was SLOWER than ordinary decoding here (0.87x" in out
    assert "relaxed` was SLOWER" not in out
    assert "columns: speedup" in out and "UNVERIFIED" in out and "truncate-k2" in out
    line = next(x for x in out.splitlines() if x.strip().startswith("draft-substitution"))
    assert "UNVERIFIED" in line and "no win" in line  # truncate-k2 is faster and as faithful
