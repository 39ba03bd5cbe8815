"""The closed loop of ``make eval``: the chosen decoding arms in the evaluation fleet (docs/DESIGN.md §10.4).

Each arm of evaluator/arms.py (baseline, truncation, strict, relaxed, draft substitution) becomes an
:class:`~evaluator.protocol.ArmSpec` that evaluator/fleet_arms.py rebuilds inside each worker, with the
arm's exact RSD configuration and the policy's decoded depth; :func:`evaluator.fleet.run_protocol` runs
them paired (same tasks, initial states and seeds), appends each episode to a results file as it
finishes (a rerun resumes; Ctrl-C keeps what finished), and reports Wilson intervals, per-task
successes and, against the baseline, the discordant pairs, the exact McNemar p-value and a
non-inferiority verdict. A run smaller than the standard protocol (10 tasks x initial states 0-49) says
so in its report.

eval.json's ``closed_loop`` block: one entry per arm (``success_rate``, ``successes``, ``episodes``,
``wilson95``, ``per_task``, ``mean_steps``, ``mean_act_ms``, the decoding counters, ``success`` per
episode in the order of ``episodes``, ``vs_baseline``), ``episodes`` ([task, initial state] pairs) and
``protocol`` (the fleet's whole summary, evaluator/protocol_report.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from evaluator.arms import Arm
from evaluator.episode import make_libero_env
from evaluator.fleet import run_protocol
from evaluator.fleet_worker import EnvFactory
from evaluator.protocol import ArmSpec
from evaluator.protocol_report import ProtocolResult

COUNTERS = (
    "mean_accepted",
    "mean_proposed",
    "mean_passes",
)  # per-chunk decoding counters (fleet_arms.RSDAct)


def arm_spec(
    arm: Arm,
    *,
    policy: str,
    draft: str | Path,
    weights_dir: str | Path | None = None,
    codec_dir: str | Path | None = None,
    allow_random: bool = False,
    decode_layers: int | None = None,
    draft_forward: str | None = None,
    execute: int | None = None,
) -> ArmSpec:
    """The fleet's recipe of ``arm``: its kind as the decoding, its RSD configuration as the parameters.

    Only drafted arms name the draft (its fingerprint then guards their results on resume)."""
    params: dict[str, Any] = {} if decode_layers is None else {"decode_layers": decode_layers}
    if execute is not None:  # re-plan every `execute` actions (evaluator/fleet_arms.py FirstActions)
        params["execute"] = execute
    if arm.kind == "truncation":
        params["layers"] = arm.layers
    if arm.rsd is not None:
        acc = arm.rsd.acceptance
        params.update(tau=acc.tau, epsilon=acc.epsilon, max_proposals=arm.rsd.max_proposals,
                      confidence_threshold=arm.rsd.confidence_threshold,
                      confidence_kind=arm.rsd.confidence_kind)  # fmt: skip
        if draft_forward is not None:
            params["draft_forward"] = draft_forward
    return ArmSpec(
        name=arm.name, backend=policy, weights=None if weights_dir is None else str(weights_dir),
        codec=None if codec_dir is None else str(codec_dir), draft=str(draft) if arm.drafted else None,
        decoding=arm.kind, params=params, allow_random=allow_random,
    )  # fmt: skip


def ordered(names: Sequence[str]) -> list[str]:
    """The closed-loop arms, the baseline first (the fleet's comparisons are against the first arm)."""
    return sorted(names, key=lambda n: n != "baseline")


def run_arms(
    specs: Sequence[ArmSpec],
    tasks: Sequence[int],
    init_states: Sequence[int],
    results_path: str | Path,
    *,
    env_base: dict[str, Any],
    workers: int = 2,
    torch_threads: int = 1,
    ray_address: str | None = None,
    env_factory: EnvFactory = make_libero_env,
    progress: bool = True,
) -> ProtocolResult:
    """Every arm on every (task, initial state) in the fleet; ``env_base``: suite, image_size, max_steps, seed."""
    return run_protocol(
        specs, tasks, init_states, workers, results_path, ray_address, env_base["seed"], env_base["max_steps"],
        suite=env_base["suite"], image_size=env_base["image_size"], env_factory=env_factory,
        torch_threads=torch_threads, progress=progress,
    )  # fmt: skip


def summarize(result: ProtocolResult, margin: float) -> dict[str, Any]:
    """eval.json's ``closed_loop`` block (see the module doc)."""
    s = result.summary(margin)
    p = result.protocol
    final, _, _ = result.outcome_map()
    episodes = [(t, i) for t in p.tasks for i in p.init_states]
    out: dict[str, Any] = {"episodes": [list(e) for e in episodes], "protocol": s}
    for name, a in s["arms"].items():
        recs = [final.get((name, t, i)) for t, i in episodes]
        done = [r for r in recs if r is not None]
        chunks = sum(r["extra"].get("chunks", 0) for r in done)
        out[name] = {
            "success_rate": a["success_rate"],
            "successes": a["successes"],
            "episodes": a["episodes"],
            "wilson95": a["wilson95"],
            "errored": a["errored"],
            "missing": a["missing"],
            "per_task": {
                t: {"success_rate": k / n if n else None, "successes": k, "episodes": n}
                for t, (k, n) in a["per_task"].items()
            },
            "mean_steps": a["mean_steps"],
            "mean_act_ms": 1000 * sum(r["act_s"] for r in done) / max(1, sum(r["queries"] for r in done)),
            "success": [None if r is None else r["status"] == "success" for r in recs],
            "backbone": a["backbone"],
            "vs_baseline": s["comparisons"].get(name),
            **{c: sum(r["extra"].get(c, 0.0) * r["extra"].get("chunks", 0) for r in done) / max(1, chunks)
               for c in COUNTERS},
        }  # fmt: skip
    return out
