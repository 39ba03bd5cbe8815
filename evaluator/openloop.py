"""Open loop of `make eval`: every arm decodes the same observation in one process (DESIGN §6).

LIBERO episodes run with the baseline's actions; at every query the observation is decoded by every
arm (evaluator/arms.py), in an order that rotates from one query to the next; the first queries are
warm-up. Per arm and chunk: latency, passes, proposed and accepted layers, |Δa| against the baseline
(every action component) and against the full L-layer decoding (``truncate-kL``, when measured),
whether the codes equal the baseline's. For the draft (outside the timed calls): token and
whole-layer accuracy per layer against the policy's own codes, and the rank of the policy's exact
layer among the draft's most probable whole-layer candidates (tree verification, evaluator/lossless_bound.py).
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from common.logs import progress_bar
from common.policy import LayerwisePolicy, Observation
from evaluator.arms import Arm
from evaluator.episode import run_episode
from evaluator.lossless_bound import TREE_MAX_CANDIDATES, candidate_rank, hit_rates
from evaluator.rsd import ChunkResult, DraftProposer, RSDConfig, RSDEngine


@dataclass
class ArmLog:
    """Per-chunk records of one arm."""

    latency_ms: list[float] = field(default_factory=list)
    passes: list[int] = field(default_factory=list)
    proposed: list[int] = field(default_factory=list)
    accepted: list[int] = field(default_factory=list)
    dev_max: list[float] = field(default_factory=list)  # max |a - a_baseline| over the chunk
    dev_mean: list[float] = field(default_factory=list)  # mean |a - a_baseline| over the chunk
    dev_all: list[np.ndarray] = field(default_factory=list)  # every |a - a_baseline| [T*A] float32
    dev_full_mean: list[float] = field(default_factory=list)  # mean |a - a_full| (full L-layer decoding)
    identical: list[bool] = field(default_factory=list)  # codes equal to the baseline's
    stage_ms: dict[str, list[float]] = field(default_factory=dict)


class OpenLoopRecorder:
    """Decodes each observation with every arm (rotating order) and records everything."""

    def __init__(
        self,
        policy: LayerwisePolicy,
        proposer: DraftProposer,
        arms: dict[str, Arm],
        warmup: int,
        tree_candidates: int = TREE_MAX_CANDIDATES,
    ):
        if "baseline" not in arms:
            raise ValueError("the arms must include the baseline")
        self.policy = policy
        self.arms = dict(arms)
        self.engines = {
            name: RSDEngine(policy, proposer if arm.drafted else None, arm.rsd or RSDConfig())
            for name, arm in arms.items()
        }
        self.proposer = proposer
        self.logs = {name: ArmLog() for name in arms}
        self.K = proposer.num_layers
        self.full_name = f"truncate-k{policy.shape.num_layers}"
        self.draft_correct: list[np.ndarray] = []  # per chunk [K] token accuracy vs the policy's codes
        self.draft_exact: list[np.ndarray] = []  # per chunk [K] whole layer right
        self.draft_conf: list[np.ndarray] = []  # per chunk [K] layer confidence
        self.draft_token_conf: list[np.ndarray] = []  # per chunk [K] mean token confidence
        self.tree_ranks: list[list[int]] = []  # per chunk [K] rank of the exact layer (0: > candidates)
        self.tree_candidates = tree_candidates
        self.warmup = warmup
        self.queries = 0

    def decode(self, obs: Observation) -> ChunkResult:
        """All arms on ``obs``; returns the baseline's result."""
        names = list(self.engines)
        shift = self.queries % len(names)
        order = names[shift:] + names[:shift]
        results = {name: self.arms[name].decode(self.engines[name], [obs]) for name in order}
        self.queries += 1
        if self.queries > self.warmup:
            self._record(results)
        return results["baseline"]

    def _record(self, results: dict[str, ChunkResult]) -> None:
        base = results["baseline"]
        full = results.get(self.full_name)
        for name, r in results.items():
            lg = self.logs[name]
            st = r.stats
            lg.latency_ms.append(1e3 * st.latency_s)
            lg.passes.append(st.passes)
            lg.proposed.append(st.proposed)
            lg.accepted.append(st.accepted)
            diff = (r.actions.float() - base.actions.float()).abs()  # [1, T, A]
            lg.dev_max.append(float(diff.max()))
            lg.dev_mean.append(float(diff.mean()))
            lg.dev_all.append(diff.flatten().cpu().numpy().astype(np.float32))
            if full is not None:
                lg.dev_full_mean.append(float((r.actions.float() - full.actions.float()).abs().mean()))
            lg.identical.append(bool(torch.equal(r.codes, base.codes)))
            for k, v in st.stage_s.items():
                lg.stage_ms.setdefault(k, []).append(1e3 * v)
        drafted = next((r for n, r in results.items() if self.arms[n].kind == "strict"), None)
        if drafted is not None and drafted.draft is not None:
            self._record_draft(drafted, (full or base).codes, base.hidden)

    def _record_draft(self, result: ChunkResult, reference: torch.Tensor, hidden: torch.Tensor) -> None:
        """Draft vs the policy's own codes (the full decoding's where measured: layers >= D too)."""
        K = result.draft.codes.shape[1]
        drafted = result.draft.codes[0].cpu()  # [K, T, H]
        truth = reference[0].permute(2, 0, 1)[:K].cpu()  # [K, T, H]
        eq = drafted == truth
        self.draft_correct.append(eq.float().mean(dim=(1, 2)).numpy())
        self.draft_exact.append(eq.flatten(1).all(-1).float().numpy())
        self.draft_conf.append(result.draft.confidence[0].float().cpu().numpy())
        tc = result.draft.token_confidence
        self.draft_token_conf.append((result.draft.confidence if tc is None else tc)[0].float().cpu().numpy())
        if hasattr(self.proposer, "marginals") and self.tree_candidates > 0:
            probs = self.proposer.marginals(hidden, self.policy.shape.chunk_len)[0].cpu()  # [K, T, H, G]
            self.tree_ranks.append(
                [
                    candidate_rank(probs[k].flatten(0, 1), truth[k].flatten(), self.tree_candidates)
                    for k in range(K)
                ]
            )

    @property
    def chunks(self) -> int:
        return len(self.logs["baseline"].latency_ms)


def percentile(values: list[float] | np.ndarray, q: float) -> float:
    v = np.asarray(values, dtype=np.float64)
    return float(np.percentile(v, q)) if v.size else float("nan")


def summarize_arm(lg: ArmLog, base: ArmLog, max_j: int, arm: Arm | None = None) -> dict[str, Any]:
    med, base_med = statistics.median(lg.latency_ms), statistics.median(base.latency_ms)
    hist = np.bincount(np.asarray(lg.accepted, dtype=np.int64), minlength=max_j + 1)[: max_j + 1]
    every = np.concatenate(lg.dev_all) if lg.dev_all else np.asarray(lg.dev_mean, dtype=np.float64)
    out = {
        "chunks": len(lg.latency_ms),
        "latency_ms": {
            "median": med,
            "p90": percentile(lg.latency_ms, 90),
            "mean": float(np.mean(lg.latency_ms)),
        },
        "speedup_median": base_med / med,
        "speedup_p90": percentile(base.latency_ms, 90) / percentile(lg.latency_ms, 90),
        "speedup_mean": float(np.mean(base.latency_ms) / np.mean(lg.latency_ms)),
        "j_histogram": hist.tolist(),
        "mean_j": float(np.mean(lg.accepted)),
        "mean_proposed": float(np.mean(lg.proposed)),
        "mean_passes": float(np.mean(lg.passes)),
        "identical_fraction": float(np.mean(lg.identical)),
        "action_deviation": {
            "mean_abs": float(np.mean(every)),  # over every action component of every chunk
            "p99_abs": percentile(every, 99),
            "max_abs_mean": float(np.mean(lg.dev_max)),  # per chunk max, averaged
            "max_abs_p90": percentile(lg.dev_max, 90),
            "max_abs_p99": percentile(lg.dev_max, 99),
            "max_abs_max": float(np.max(lg.dev_max)),
            "mean_abs_mean": float(np.mean(lg.dev_mean)),
        },
        "stage_ms_median": {k: statistics.median(v) for k, v in lg.stage_ms.items()},
    }
    if lg.dev_full_mean:
        out["vs_full_decoding"] = {"mean_abs": float(np.mean(lg.dev_full_mean))}
    if arm is not None:
        out.update(arm.describe())
    return out


def summarize_open_loop(rec: OpenLoopRecorder) -> dict[str, Any]:
    if rec.chunks == 0:
        raise ValueError("no chunks were measured (increase episodes or lower --warmup)")
    base = rec.logs["baseline"]

    def max_j(arm: Arm) -> int:  # the largest j this arm can accept
        if arm.rsd is None:
            return 0
        m = min(rec.K, rec.policy.decode_layers - 1)
        return m if arm.rsd.max_proposals is None else min(m, arm.rsd.max_proposals)

    arms = {
        name: summarize_arm(lg, base, max_j(rec.arms[name]), rec.arms[name]) for name, lg in rec.logs.items()
    }
    out: dict[str, Any] = {
        "chunks": rec.chunks,
        "arms": arms,
        "per_chunk": {
            name: {"latency_ms": lg.latency_ms, "accepted": lg.accepted} for name, lg in rec.logs.items()
        },
    }
    if rec.draft_correct:
        out["draft_accuracy"] = {
            "token_per_layer": np.mean(rec.draft_correct, axis=0).tolist(),
            "exact_per_layer": np.mean(rec.draft_exact, axis=0).tolist(),
            "confidence_per_layer_mean": np.mean(rec.draft_conf, axis=0).tolist(),
            "token_confidence_per_layer_mean": np.mean(rec.draft_token_conf, axis=0).tolist(),
            "reference": "full decoding" if rec.full_name in rec.logs else "baseline",
        }
    if rec.tree_ranks:
        out["tree_verification"] = {
            "max_candidates": rec.tree_candidates,
            "ranks": rec.tree_ranks,
            "hit_at": hit_rates(rec.tree_ranks, rec.tree_candidates),
        }
    return out


def run_open_loop(
    rec: OpenLoopRecorder,
    episodes: Iterable[tuple[int, int]],
    env_factory: Callable[[int, int], Any],
    max_chunks: int | None = None,
) -> list[dict[str, Any]]:
    """Drive LIBERO episodes with the baseline's actions; every query is decoded by every arm."""

    class Enough(Exception):
        pass

    def act(obs: Observation) -> np.ndarray:
        if max_chunks is not None and rec.chunks >= max_chunks:
            raise Enough
        return rec.decode(obs).actions[0].float().cpu().numpy()  # [T, A]

    results = []
    env, env_task = None, None
    jobs = list(episodes)
    bar = progress_bar(jobs, desc="open-loop episodes", unit="ep", dynamic_ncols=True)
    try:
        for task_id, init_state in bar:
            if env_task != task_id:
                if env is not None:
                    env.close()
                env, env_task = env_factory(task_id, init_state), task_id
            try:
                res = run_episode(env, act, init_state, task_id=task_id)
            except Enough:
                break
            results.append(asdict(res))
            bar.set_postfix(chunks=rec.chunks, success=f"{np.mean([r['success'] for r in results]):.2f}")
    finally:
        bar.close()
        if env is not None:
            env.close()
    return results
