"""`make eval`: RSD vs baseline decoding of the embedded VLA on LIBERO (docs/DESIGN.md §9, §10).

    python -m evaluator.eval --draft runs/default/latest/draft_best.pt --out-dir runs/default/latest/eval
    python -m evaluator.eval --draft CKPT --out-dir DIR --no-closed-loop      # `make bench`: latency only

Two parts, one report:

1. **Open loop, one process, same observations** (evaluator/openloop.py). LIBERO episodes run with
   the baseline's actions; at every query the same observation is decoded by every arm
   (evaluator/arms.py): the baseline (the policy's D informative layers), truncated decoding at every
   k = 1..L, ``strict`` (lossless), ``relaxed`` (verified, lossy, tau > 0), the unverified
   ``draft-substitution`` (labelled as such: not speculative decoding), and sweeps. The arm order
   rotates from one query to the next, the first queries are warm-up, torch's thread count is fixed.
   Per arm: chunk latency (median, p90, ratio to the baseline), accepted layers j, passes, |Δa| from
   the baseline's chunk (mean and p99 over every action component); for the draft: accuracy per
   layer and the tree-verification ranks (evaluator/lossless_bound.py).
2. **Closed loop.** Success rate of the chosen arms, each acting on its own in the same (task,
   initial state) episodes, in worker processes (evaluator/rollout.py).

The report puts every arm on the speed/fidelity frontier against the truncations (evaluator/frontier.py)
and records the layer information that sets D (common/layer_info.py).
Writes ``eval.json`` (everything, machine-readable), ``report.md`` and PNG plots to ``--out-dir``.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch

from common.cli import config_to_dict, parse_config
from common.draft import DEFAULT_FORWARD, FORWARD_HELP, FORWARDS
from common.layer_info import depth_from_dirs
from common.logs import setup_logging
from common.policy import LayerwisePolicy, Observation
from common.vla import DEFAULT_CODEC_DIR, DEFAULT_EMBEDDED_DIR, backend, load_layerwise_policy
from evaluator.arms import Arm, build_arms, is_known_name
from evaluator.frontier import frontier
from evaluator.openloop import ArmLog, OpenLoopRecorder, run_open_loop, summarize_arm, summarize_open_loop
from evaluator.rsd import RSDConfig, RSDEngine, load_draft

__all__ = [
    "ArmLog",
    "EvalConfig",
    "load_draft",
    "load_eval_policy",
    "OpenLoopRecorder",
    "run_open_loop",
    "summarize_arm",
    "summarize_open_loop",
]

log = logging.getLogger("evaluator.eval")

POLICIES = ("embedded", "twin-tiny")  # layer-wise backends of common/vla/registry.py that run on a CPU
load_eval_policy = load_layerwise_policy  # the policy RSD decodes, from the one backend registry


@dataclass
class EvalConfig:
    """Benchmark RSD against baseline decoding: speedup, acceptance, fidelity, closed-loop success."""

    draft: Path = field(metadata={"help": "draft checkpoint (common/draft.py format)"})
    out_dir: Path = field(metadata={"help": "where eval.json, report.md and the plots go"})
    closed_loop: bool = field(default=True, metadata={"help": "also measure closed-loop success rates"})
    draft_forward: str = field(default=DEFAULT_FORWARD, metadata={"help": FORWARD_HELP, "choices": FORWARDS})
    policy: str = field(
        default="embedded",
        metadata={
            "help": "policy backend (twin-tiny: random-weight plumbing check only)",
            "choices": POLICIES,
        },
    )
    weights_dir: Path | None = field(default=None, metadata={"help": "embedded VLA weights (none: assets)"})
    codec_dir: Path | None = field(default=None, metadata={"help": "RFSQ codec (none: assets/codec)"})
    allow_random: bool = field(
        default=False,
        metadata={"help": "accept a random-weight policy when no weights exist (plumbing only)"},
    )
    suite: str = field(default="libero_spatial", metadata={"help": "LIBERO suite"})
    tasks: list[int] = field(default_factory=lambda: list(range(10)), metadata={"help": "task ids"})
    init_states: list[int] = field(
        default_factory=lambda: [0], metadata={"help": "initial states of the open-loop (latency) episodes"}
    )
    closed_loop_init_states: list[int] = field(
        default_factory=lambda: [0, 1, 2, 3, 4],
        metadata={"help": "initial states of the closed-loop episodes"},
    )
    closed_loop_arms: list[str] = field(
        default_factory=lambda: ["baseline", "relaxed", "truncate-k2"],
        metadata={
            "help": "arms run closed loop: baseline, strict, relaxed, draft-substitution, truncate-kK (a truncation "
            "beside the lossy arm puts success on the frontier; strict equals the baseline by construction)"
        },
    )
    decode_layers: int | None = field(
        default=None,
        metadata={"help": "layers the policy decodes sequentially, the baseline (none: the policy's config)"},
    )
    max_steps: int | None = field(
        default=None,
        metadata={
            "help": "env steps (actions executed, after the settle steps) per episode, open and closed "
            "loop; not policy queries (none: the suite's limit, 220 for libero_spatial)"
        },
    )
    image_size: int = field(default=128, metadata={"help": "camera image size rendered by the env"})
    tau: float = field(
        default=0.8,
        metadata={"help": "relaxed arm: minimum token agreement per layer (> 0; 0 = --substitution)"},
    )
    epsilon: float | None = field(
        default=None, metadata={"help": "relaxed arm: also accept layers whose action change is <= this"}
    )
    confidence_threshold: float = field(
        default=0.0, metadata={"help": "strict/relaxed arms: propose only layers this confident (0: all)"}
    )
    max_proposals: int | None = field(default=None, metadata={"help": "cap on proposed layers (none: K)"})
    sweep_tau: list[float] = field(
        default_factory=lambda: [0.9, 0.6],
        metadata={"help": "extra relaxed arms, tau in (0, 1] (open loop only)"},
    )
    substitution: bool = field(
        default=True,
        metadata={"help": "also measure unverified draft substitution (every drafted layer taken unchecked)"},
    )
    truncations: bool = field(
        default=True, metadata={"help": "also measure truncated decoding at every k = 1..L (the frontier)"}
    )
    sweep_confidence: list[float] = field(
        default_factory=lambda: [0.7, 0.8],
        metadata={
            "help": "extra relaxed arms (tau of --tau) proposing only layers whose expected token agreement "
            "(the draft's mean token probability) reaches this (open loop only)"
        },
    )
    sweep_max_proposals: list[int] = field(
        default_factory=lambda: [3],
        metadata={"help": "extra strict arms proposing at most this many layers (open loop only)"},
    )
    warmup: int = field(default=3, metadata={"help": "warm-up queries (all arms) before measuring"})
    max_chunks: int | None = field(
        default=None, metadata={"help": "stop the open loop after this many chunks"}
    )
    torch_threads: int = field(default=1, metadata={"help": "torch threads (fixed for honest timing)"})
    workers: int = field(default=2, metadata={"help": "closed-loop worker processes"})
    seed: int = field(default=0, metadata={"help": "environment seed"})

    def __post_init__(self) -> None:
        if not Path(self.draft).is_file():
            raise ValueError(
                f"no draft checkpoint at {self.draft}: train one first (make demo, or make train beside "
                "make produce), or name one: make eval CKPT=path/to/draft_best.pt"
            )
        if self.policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, got {self.policy!r}")
        for t in [self.tau, *self.sweep_tau]:
            if not 0.0 < t <= 1.0:
                raise ValueError(
                    f"tau values must be in (0, 1], got {t}: tau = 0 verifies nothing (that is draft "
                    "substitution, measured by --substitution under its own name)"
                )
        for c in [self.confidence_threshold, *self.sweep_confidence]:
            if not 0.0 <= c <= 1.0:
                raise ValueError(f"confidence thresholds must be in [0, 1], got {c}")
        bad = [a for a in self.closed_loop_arms if not is_known_name(a)]
        if bad or not self.closed_loop_arms:
            raise ValueError(
                f"closed_loop_arms must be among baseline, strict, relaxed, draft-substitution, truncate-kK; "
                f"got {self.closed_loop_arms}"
            )
        if self.decode_layers is not None and self.decode_layers < 1:
            raise ValueError(f"decode_layers must be >= 1, got {self.decode_layers}")
        if any(m < 1 for m in self.sweep_max_proposals):
            raise ValueError(f"sweep_max_proposals must be >= 1, got {self.sweep_max_proposals}")
        if self.warmup < 0 or self.torch_threads < 1 or self.workers < 1:
            raise ValueError("warmup must be >= 0, torch_threads and workers >= 1")
        if not self.tasks or not self.init_states:
            raise ValueError("tasks and init_states must be non-empty")
        if self.closed_loop and not backend(self.policy).trained:
            raise ValueError("closed-loop success needs --policy embedded (the twin is not a trained policy)")

    def arms(self, num_drafted: int, num_layers: int = 8, decode_layers: int | None = None) -> dict[str, Arm]:
        """Arm name -> :class:`Arm`, baseline first (evaluator/arms.py)."""
        return build_arms(
            num_layers=num_layers,
            num_drafted=num_drafted,
            decode_layers=num_layers if decode_layers is None else decode_layers,
            tau=self.tau,
            epsilon=self.epsilon,
            confidence_threshold=self.confidence_threshold,
            max_proposals=self.max_proposals,
            sweep_tau=self.sweep_tau,
            sweep_confidence=self.sweep_confidence,
            sweep_max_proposals=self.sweep_max_proposals,
            substitution=self.substitution,
            truncations=self.truncations,
        )


# ------------------------------------------------------------------------------------------ closed loop
@dataclass(frozen=True)
class RSDActFactory:
    """Picklable recipe for a rollout worker: policy + draft + one decoding arm -> act callable.

    rsd None and truncate None: the baseline; truncate k: truncated decoding of k layers.
    """

    draft: str
    rsd: dict[str, Any] | None  # None: no draft; else RSDConfig fields (acceptance as a dict)
    policy: str = "embedded"
    weights_dir: str | None = None
    codec_dir: str | None = None
    allow_random: bool = False
    decode_layers: int | None = None  # the policy's D (None: its config)
    truncate: int | None = None
    draft_forward: str = DEFAULT_FORWARD

    def __call__(self) -> Callable[[Observation], np.ndarray]:
        policy = load_eval_policy(
            self.policy, weights_dir=self.weights_dir, codec_dir=self.codec_dir,
            allow_random=self.allow_random, decode_layers=self.decode_layers,
        )  # fmt: skip
        proposer, _ = load_draft(self.draft, policy, self.draft_forward)
        kind = "truncation" if self.truncate is not None else ("baseline" if self.rsd is None else None)
        if kind is None:
            kind = {"strict": "strict", "relaxed": "relaxed", "substitute": "substitution"}[
                self.rsd["acceptance"]["mode"]
            ]
        arm = Arm.from_dict({"name": "closed-loop", "kind": kind, "rsd": self.rsd, "layers": self.truncate})
        rsd = arm.rsd or RSDConfig()
        engine = RSDEngine(policy, proposer if arm.drafted else None, replace(rsd, stage_timing=False))

        def act(obs: Observation) -> np.ndarray:
            return arm.decode(engine, [obs]).actions[0].float().cpu().numpy()

        act.backbone_id = policy.backbone_id  # type: ignore[attr-defined]
        return act


def run_closed_loop(cfg: EvalConfig, arms: dict[str, Arm]) -> dict[str, Any]:
    from evaluator.rollout import run_episodes, summarize

    env_base = {
        "suite": cfg.suite,
        "image_size": cfg.image_size,
        "max_steps": cfg.max_steps,
        "seed": cfg.seed,
    }
    jobs = [(t, i) for t in cfg.tasks for i in cfg.closed_loop_init_states]
    out: dict[str, Any] = {}
    for name in cfg.closed_loop_arms:
        arm = arms[name]
        factory = RSDActFactory(
            draft=str(cfg.draft),
            rsd=arm.to_dict()["rsd"],
            policy=cfg.policy,
            weights_dir=str(cfg.weights_dir) if cfg.weights_dir else None,
            codec_dir=str(cfg.codec_dir) if cfg.codec_dir else None,
            allow_random=cfg.allow_random,
            decode_layers=cfg.decode_layers,
            truncate=arm.layers,
            draft_forward=cfg.draft_forward,
        )
        log.info("closed loop: %s on %d episodes", name, len(jobs))
        t0 = time.time()
        results, _ = run_episodes(
            jobs, env_base, factory, workers=cfg.workers, torch_threads=cfg.torch_threads
        )
        out[name] = {
            **summarize(results),
            "wall_s": time.time() - t0,
            "success": [r.success for r in results],
        }
        log.info("closed loop: %s success %.1f%%", name, 100 * out[name]["success_rate"])
    out["episodes"] = [list(j) for j in jobs]
    return out


# ------------------------------------------------------------------------------------------ main
def evaluate(cfg: EvalConfig) -> dict[str, Any]:
    torch.set_num_threads(cfg.torch_threads)
    torch.manual_seed(cfg.seed)
    policy = load_eval_policy(
        cfg.policy, weights_dir=cfg.weights_dir, codec_dir=cfg.codec_dir, allow_random=cfg.allow_random,
        decode_layers=cfg.decode_layers,
    )  # fmt: skip
    proposer, draft_info = load_draft(cfg.draft, policy, cfg.draft_forward)
    arms = cfg.arms(proposer.num_layers, policy.shape.num_layers, policy.decode_layers)
    missing = [a for a in cfg.closed_loop_arms if a not in arms]
    if cfg.closed_loop and missing:
        raise ValueError(f"closed-loop arms {missing} are not measured in this run (see --truncations)")
    rec = OpenLoopRecorder(policy, proposer, arms, cfg.warmup)

    def env_factory(task_id: int, init_state: int):
        from producer.env import EnvConfig, LiberoEnv

        return LiberoEnv(
            EnvConfig(
                suite=cfg.suite,
                task_id=task_id,
                init_state=init_state,
                image_size=cfg.image_size,
                max_steps=cfg.max_steps,
                seed=cfg.seed,
            )
        )

    t0 = time.time()
    episodes = run_open_loop(
        rec, [(t, i) for t in cfg.tasks for i in cfg.init_states], env_factory, cfg.max_chunks
    )
    result = build_result(cfg, policy, draft_info, rec, episodes, time.time() - t0)
    if cfg.closed_loop:
        write_outputs(result, cfg.out_dir)  # the open-loop part, readable while the closed loop runs
        result["closed_loop"] = run_closed_loop(cfg, arms)
    return result


def build_result(
    cfg: EvalConfig,
    policy: LayerwisePolicy,
    draft_info: dict[str, Any],
    rec: OpenLoopRecorder,
    episodes: list[dict[str, Any]],
    wall_s: float,
) -> dict[str, Any]:
    return {
        "meta": {
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
            "machine": f"{platform.node()}: {os.cpu_count()} CPUs, no GPU, torch threads {cfg.torch_threads}",
            "torch": torch.__version__,
            "policy": policy.backbone_id,
            "policy_random_weights": "random" in policy.backbone_id,
            "draft": draft_info,
            "config": config_to_dict(cfg),
            "decode_layers": policy.decode_layers,
            "num_layers": policy.shape.num_layers,
            "arms": {n: arm.describe() for n, arm in rec.arms.items()},
            "open_loop_wall_s": wall_s,
        },
        "layer_information": layer_information_of(cfg),
        **summarize_open_loop(rec),
        "open_loop_episodes": episodes,
    }


def layer_information_of(cfg: EvalConfig) -> dict[str, Any] | None:
    """The codec's and the VLA's recorded per-layer figures and the depth they give (embedded only)."""
    if cfg.policy != "embedded":
        return None
    wdir, cdir = cfg.weights_dir or DEFAULT_EMBEDDED_DIR, cfg.codec_dir or DEFAULT_CODEC_DIR
    try:
        depth, evidence, info = depth_from_dirs(wdir, cdir)
    except (OSError, ValueError, KeyError) as exc:
        log.warning("no layer information from %s and %s: %s", wdir, cdir, exc)
        return None
    return {**info, "informative_depth": depth, "evidence": evidence}


def main(argv: list[str] | None = None) -> None:
    setup_logging("eval")
    cfg = parse_config(EvalConfig, argv, prog="python -m evaluator.eval")
    os.environ.setdefault("MUJOCO_GL", "egl")
    result = evaluate(cfg)
    write_outputs(result, cfg.out_dir)


def write_outputs(result: dict[str, Any], out_dir: Path) -> Path:
    from evaluator.report import write_report

    out_dir.mkdir(parents=True, exist_ok=True)
    result["frontier"] = frontier(result)
    path = out_dir / "eval.json"
    path.write_text(json.dumps(result, indent=1))
    write_report(result, out_dir)
    log.info(
        "%d chunks, baseline %.1f ms median (%d layers decoded)",
        result["chunks"],
        result["arms"]["baseline"]["latency_ms"]["median"],
        result["meta"].get("decode_layers", 0),
    )
    for row in result["frontier"]:
        if row["win"] is not None:
            log.info(
                "%-20s %5.2fx  mean |da| %.4f  p99 %.4f  %s",
                row["arm"], row["speedup"], row["mean_abs"], row["p99_abs"], row["verdict"],
            )  # fmt: skip
    if "closed_loop" in result:
        cl = result["closed_loop"]
        log.info(
            "closed loop success: %s",
            ", ".join(f"{a} {v['success_rate']:.2f}" for a, v in cl.items() if isinstance(v, dict)),
        )
    log.info("wrote %s and report.md", path)
    return path


if __name__ == "__main__":
    main()
