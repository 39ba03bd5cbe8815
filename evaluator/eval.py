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
2. **Closed loop** (evaluator/closed_loop.py). Success of the chosen arms, each acting on its own, in
   the evaluation fleet (evaluator/fleet.py): paired on the same (task, initial state) episodes and
   seeds, by default the standard protocol (every task x initial states 0-49; a smaller run says it
   is not), each episode appended to ``closed_loop.jsonl`` as it finishes (a rerun resumes; Ctrl-C
   keeps what finished), reported with Wilson intervals and, against the baseline, exact McNemar and
   a non-inferiority verdict (``closed_loop.md``, and in ``report.md``).

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
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from common.cli import config_to_dict, parse_config
from common.draft import DEFAULT_FORWARD, FORWARD_HELP, FORWARDS
from common.layer_info import depth_from_dirs
from common.logs import setup_logging
from common.policy import LayerwisePolicy
from common.vla import DEFAULT_CODEC_DIR, DEFAULT_EMBEDDED_DIR, backend, load_layerwise_policy
from evaluator import closed_loop
from evaluator.arms import Arm, build_arms, is_known_name
from evaluator.episode import make_libero_env
from evaluator.fleet_worker import EnvFactory
from evaluator.frontier import frontier
from evaluator.openloop import ArmLog, OpenLoopRecorder, run_open_loop, summarize_arm, summarize_open_loop
from evaluator.protocol import STANDARD_INIT_STATES, ArmSpec, Protocol, ProtocolMismatch
from evaluator.protocol_report import ProtocolResult, summary_markdown
from evaluator.report import write_report
from evaluator.rsd import load_draft
from evaluator.stats import DEFAULT_MARGIN

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
        default_factory=lambda: list(STANDARD_INIT_STATES),
        metadata={
            "help": "initial states of the closed-loop episodes (standard protocol: 0-49 of every task; a "
            "smaller run is reported as not the standard protocol)"
        },
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
    execute: int | None = field(
        default=None,
        metadata={
            "help": "closed loop: actions executed per query before every arm re-plans (none: the chunk)"
        },
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
    workers: int = field(default=2, metadata={"help": "closed-loop worker processes (or Ray actors)"})
    ray_address: str | None = field(
        default=None,
        metadata={"help": "run the closed-loop workers as Ray actors: local, auto or HOST:PORT (README)"},
    )
    closed_loop_results: Path | None = field(
        default=None,
        metadata={
            "help": "per-episode closed-loop results, JSON lines; a rerun resumes them (none: "
            "OUT_DIR/closed_loop.jsonl)"
        },
    )
    margin: float = field(
        default=DEFAULT_MARGIN, metadata={"help": "closed loop: non-inferiority margin (a fraction)"}
    )
    seed: int = field(default=0, metadata={"help": "environment seed"})

    def __post_init__(self) -> None:
        if not Path(self.draft).is_file():
            raise ValueError(
                f"no draft checkpoint at {self.draft}: train one first (make demo, or make train beside "
                "make produce), or name one: make eval CKPT=path/to/draft_best.pt"
            )
        if self.policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, got {self.policy!r}")
        if self.execute is not None and self.execute < 1:
            raise ValueError(f"execute must be >= 1 (actions per query), got {self.execute}")
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
        if not 0 < self.margin < 1:
            raise ValueError(f"margin must be a fraction in (0, 1), got {self.margin}")
        self.protocol()  # unknown tasks or initial states: a usage error before anything runs

    def protocol(self) -> Protocol:
        """The closed loop's tasks x initial states (the open loop's episodes take ``init_states``)."""
        return Protocol(self.suite, tuple(self.tasks), tuple(self.closed_loop_init_states), self.seed,
                        self.max_steps, self.image_size)  # fmt: skip

    def env_base(self) -> dict[str, Any]:
        """The EnvConfig fields every episode shares, open and closed loop."""
        return self.protocol().env_base()

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
def closed_loop_specs(cfg: EvalConfig, arms: dict[str, Arm], decode_layers: int | None) -> list[ArmSpec]:
    """The fleet's recipes of the closed-loop arms, baseline first (evaluator/closed_loop.py)."""
    common = dict(policy=cfg.policy, draft=cfg.draft, weights_dir=cfg.weights_dir, codec_dir=cfg.codec_dir,
                  allow_random=cfg.allow_random, decode_layers=decode_layers,
                  draft_forward=cfg.draft_forward, execute=cfg.execute)  # fmt: skip
    return [closed_loop.arm_spec(arms[name], **common) for name in closed_loop.ordered(cfg.closed_loop_arms)]


def run_closed_loop(
    cfg: EvalConfig,
    arms: dict[str, Arm],
    decode_layers: int | None = None,
    env_factory: EnvFactory = make_libero_env,
) -> tuple[dict[str, Any], ProtocolResult]:
    """The closed-loop arms in the evaluation fleet: (eval.json's ``closed_loop`` block, the fleet's result)."""
    result = closed_loop.run_arms(
        closed_loop_specs(cfg, arms, decode_layers), cfg.tasks, cfg.closed_loop_init_states,
        cfg.closed_loop_results or cfg.out_dir / "closed_loop.jsonl", env_base=cfg.env_base(),
        workers=cfg.workers, torch_threads=cfg.torch_threads, ray_address=cfg.ray_address,
        env_factory=env_factory,
    )  # fmt: skip
    return closed_loop.summarize(result, cfg.margin), result


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

    t0 = time.time()
    episodes = run_open_loop(
        rec, [(t, i) for t in cfg.tasks for i in cfg.init_states],
        lambda t, i: make_libero_env({**cfg.env_base(), "task_id": t, "init_state": i}), cfg.max_chunks,
    )  # fmt: skip
    result = build_result(cfg, policy, draft_info, rec, episodes, time.time() - t0)
    if cfg.closed_loop:
        write_outputs(result, cfg.out_dir)  # the open-loop part, readable while the closed loop runs
        result["closed_loop"], _ = run_closed_loop(cfg, arms, policy.decode_layers)
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
    try:
        result = evaluate(cfg)
    except ProtocolMismatch as exc:  # a results file of another run: a usage error, nothing lost
        log.error("%s", exc)
        raise SystemExit(2) from None
    except RuntimeError as exc:  # e.g. a policy no worker can build: finished episodes are kept
        log.error("stopped: %s", exc)
        raise SystemExit(1) from None
    write_outputs(result, cfg.out_dir)
    status = (result.get("closed_loop") or {}).get("protocol", {})
    if status.get("interrupted"):
        raise SystemExit(130)
    if status and not status["complete"]:
        log.error("closed loop incomplete (errored episodes): run the same command again to retry them")
        raise SystemExit(1)


def write_outputs(result: dict[str, Any], out_dir: Path) -> Path:
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
        log_closed_loop(result["closed_loop"], out_dir)
    log.info("wrote %s and report.md", path)
    return path


def log_closed_loop(cl: dict[str, Any], out_dir: Path) -> None:
    """Log the closed loop's rates and verdicts and write its own report, ``closed_loop.md``."""
    s = cl.get("protocol")
    if s is None:  # an eval.json written before the fleet ran the closed loop
        return
    (out_dir / "closed_loop.md").write_text(summary_markdown(s))
    log.info("closed loop: %s", s["protocol"]["description"])
    for name, a in s["arms"].items():
        c = s["comparisons"].get(name)
        vs = (
            ""
            if c is None
            else f"; vs baseline {100 * c['difference']:+.1f} points, McNemar p {c['mcnemar_p']:.3g}, {c['verdict']}"
        )
        lo, hi = a["wilson95"]
        log.info("  %-20s %d/%d (Wilson 95%% %.1f-%.1f%%)%s", name, a["successes"], a["episodes"], 100 * lo,
                 100 * hi, vs)  # fmt: skip


if __name__ == "__main__":
    main()
