"""`make eval`: RSD vs baseline decoding of the embedded VLA on LIBERO (docs/DESIGN.md §9, §10).

    python -m evaluator.eval --draft runs/default/latest/draft_best.pt --out-dir runs/default/latest/eval
    python -m evaluator.eval --draft CKPT --out-dir DIR --no-closed-loop      # `make bench`: latency only

Two parts, one report:

1. **Open loop, one process, same observations.** LIBERO episodes run with the baseline's actions;
   at every query the same observation is decoded by every arm: the baseline, RSD strict, RSD
   relaxed, and the sweep arms (relaxed with other tau, confidence-gated proposal lengths). The arm
   order rotates from one query to the next, the first queries are warm-up, torch's thread count
   is fixed. Per arm: chunk latency (median, p90, ratio to the baseline), the distribution of
   accepted layers j, passes, the action deviation from the baseline's chunk; for the draft:
   token and whole-layer accuracy per layer against the policy's own codes.
2. **Closed loop.** Success rate of the baseline, RSD strict and RSD relaxed, each acting on its
   own in the same (task, initial state) episodes, in worker processes (evaluator/rollout.py).

Writes ``eval.json`` (everything, machine-readable), ``report.md`` and PNG plots to ``--out-dir``.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import statistics
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch

from common.cli import config_to_dict, parse_config
from common.draft import DEFAULT_FORWARD, FORWARD_HELP, FORWARDS, load_checkpoint
from common.logs import progress_bar, setup_logging
from common.policy import LayerwisePolicy, Observation
from evaluator.rsd import AcceptanceConfig, ChunkResult, DraftProposer, RSDConfig, RSDEngine

log = logging.getLogger("evaluator.eval")

POLICIES = ("embedded", "twin-tiny")


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
        default_factory=lambda: ["baseline", "rsd_strict", "rsd_relaxed"],
        metadata={"help": "arms run closed loop (any of baseline, rsd_strict, rsd_relaxed)"},
    )
    max_steps: int | None = field(
        default=None,
        metadata={
            "help": "env steps (actions executed, after the settle steps) per episode, open and closed "
            "loop; not policy queries (none: the suite's limit, 220 for libero_spatial)"
        },
    )
    image_size: int = field(default=128, metadata={"help": "camera image size rendered by the env"})
    tau: float = field(default=0.8, metadata={"help": "relaxed arm: minimum token agreement per layer"})
    epsilon: float | None = field(
        default=None, metadata={"help": "relaxed arm: also accept layers whose action change is <= this"}
    )
    confidence_threshold: float = field(
        default=0.0, metadata={"help": "strict/relaxed arms: propose only layers this confident (0: all)"}
    )
    max_proposals: int | None = field(default=None, metadata={"help": "cap on proposed layers (none: K)"})
    sweep_tau: list[float] = field(
        default_factory=lambda: [0.9, 0.6, 0.0],
        metadata={"help": "extra relaxed arms (open loop only; 0 accepts every proposed layer)"},
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
            if not 0.0 <= t <= 1.0:
                raise ValueError(f"tau values must be in [0, 1], got {t}")
        for c in [self.confidence_threshold, *self.sweep_confidence]:
            if not 0.0 <= c <= 1.0:
                raise ValueError(f"confidence thresholds must be in [0, 1], got {c}")
        bad = set(self.closed_loop_arms) - {"baseline", "rsd_strict", "rsd_relaxed"}
        if bad or not self.closed_loop_arms:
            raise ValueError(
                f"closed_loop_arms must be among baseline, rsd_strict, rsd_relaxed, got {self.closed_loop_arms}"
            )
        if any(m < 1 for m in self.sweep_max_proposals):
            raise ValueError(f"sweep_max_proposals must be >= 1, got {self.sweep_max_proposals}")
        if self.warmup < 0 or self.torch_threads < 1 or self.workers < 1:
            raise ValueError("warmup must be >= 0, torch_threads and workers >= 1")
        if not self.tasks or not self.init_states:
            raise ValueError("tasks and init_states must be non-empty")
        if self.closed_loop and self.policy != "embedded":
            raise ValueError("closed-loop success needs --policy embedded (the twin is not a trained policy)")

    def arms(self, num_drafted: int) -> dict[str, RSDConfig | None]:
        """Arm name -> RSD config (None: the baseline). The first three are the main arms."""
        gate, cap = self.confidence_threshold, self.max_proposals
        arms: dict[str, RSDConfig | None] = {
            "baseline": None,
            "rsd_strict": RSDConfig(AcceptanceConfig("strict"), cap, gate),
            "rsd_relaxed": RSDConfig(AcceptanceConfig("relaxed", self.tau, self.epsilon), cap, gate),
        }
        for t in self.sweep_tau:
            arms.setdefault(
                f"relaxed_tau{t:g}", RSDConfig(AcceptanceConfig("relaxed", t, self.epsilon), cap, gate)
            )
        relaxed = AcceptanceConfig("relaxed", self.tau, self.epsilon)
        for c in self.sweep_confidence:
            arms.setdefault(f"relaxed_conf{c:g}", RSDConfig(relaxed, cap, c, confidence_kind="token"))
        for m in self.sweep_max_proposals:
            if m < num_drafted:
                arms.setdefault(f"strict_k{m}", RSDConfig(AcceptanceConfig("strict"), m, 0.0))
        return arms


# ------------------------------------------------------------------------------------------ loading
def load_eval_policy(
    name: str,
    weights_dir: str | None = None,
    codec_dir: str | None = None,
    allow_random: bool = False,
    device: str = "cpu",
) -> LayerwisePolicy:
    if name == "twin-tiny":
        from evaluator.twin import TwinPolicy, tiny_config

        return TwinPolicy(tiny_config(), device=device, seed=0)
    from common.vla import load_policy

    policy = load_policy(
        name, device=device, weights_dir=weights_dir, codec_dir=codec_dir, allow_random=allow_random
    )
    if not isinstance(policy, LayerwisePolicy):
        raise ValueError(f"policy {name!r} does not decode layer by layer; RSD needs a LayerwisePolicy")
    return policy


def load_draft(
    path: str | Path, policy: LayerwisePolicy, forward: str = DEFAULT_FORWARD
) -> tuple[DraftProposer, dict[str, Any]]:
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


# ------------------------------------------------------------------------------------------ open loop
@dataclass
class ArmLog:
    """Per-chunk records of one arm."""

    latency_ms: list[float] = field(default_factory=list)
    passes: list[int] = field(default_factory=list)
    proposed: list[int] = field(default_factory=list)
    accepted: list[int] = field(default_factory=list)
    dev_max: list[float] = field(default_factory=list)  # max |a - a_baseline| over the chunk
    dev_mean: list[float] = field(default_factory=list)
    identical: list[bool] = field(default_factory=list)  # codes equal to the baseline's
    stage_ms: dict[str, list[float]] = field(default_factory=dict)


class OpenLoopRecorder:
    """Decodes each observation with every arm (rotating order) and records everything."""

    def __init__(
        self, policy: LayerwisePolicy, proposer: DraftProposer, arms: dict[str, RSDConfig | None], warmup: int
    ):
        self.policy = policy
        self.engines = {
            name: RSDEngine(policy, None if c is None else proposer, c) for name, c in arms.items()
        }
        self.arms = dict(arms)
        self.logs = {name: ArmLog() for name in arms}
        self.K = proposer.num_layers
        self.draft_correct: list[np.ndarray] = []  # per chunk [K] token accuracy vs the baseline
        self.draft_exact: list[np.ndarray] = []  # per chunk [K] whole layer right
        self.draft_conf: list[np.ndarray] = []  # per chunk [K] layer confidence
        self.draft_token_conf: list[np.ndarray] = []  # per chunk [K] mean token confidence
        self.warmup = warmup
        self.queries = 0

    def decode(self, obs: Observation) -> ChunkResult:
        """All arms on ``obs``; returns the baseline's result."""
        names = list(self.engines)
        shift = self.queries % len(names)
        order = names[shift:] + names[:shift]
        results: dict[str, ChunkResult] = {}
        for name in order:
            eng = self.engines[name]
            results[name] = eng.baseline([obs]) if self.arms[name] is None else eng.rsd([obs])
        self.queries += 1
        if self.queries > self.warmup:
            self._record(results)
        return results["baseline"]

    def _record(self, results: dict[str, ChunkResult]) -> None:
        base = results["baseline"]
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
            lg.identical.append(bool(torch.equal(r.codes, base.codes)))
            for k, v in st.stage_s.items():
                lg.stage_ms.setdefault(k, []).append(1e3 * v)
        strict = results.get("rsd_strict")
        if strict is not None and strict.draft is not None:
            K = strict.draft.codes.shape[1]
            drafted = strict.draft.codes[0].cpu()  # [K, T, H]
            truth = base.codes[0].permute(2, 0, 1)[:K].cpu()  # [K, T, H]
            eq = drafted == truth
            self.draft_correct.append(eq.float().mean(dim=(1, 2)).numpy())
            self.draft_exact.append(eq.flatten(1).all(-1).float().numpy())
            self.draft_conf.append(strict.draft.confidence[0].float().cpu().numpy())
            tc = strict.draft.token_confidence
            self.draft_token_conf.append(
                (strict.draft.confidence if tc is None else tc)[0].float().cpu().numpy()
            )

    @property
    def chunks(self) -> int:
        return len(self.logs["baseline"].latency_ms)


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values, dtype=np.float64), q)) if values else float("nan")


def summarize_arm(lg: ArmLog, base: ArmLog, max_j: int) -> dict[str, Any]:
    med, base_med = statistics.median(lg.latency_ms), statistics.median(base.latency_ms)
    hist = np.bincount(np.asarray(lg.accepted, dtype=np.int64), minlength=max_j + 1)[: max_j + 1]
    return {
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
            "max_abs_mean": float(np.mean(lg.dev_max)),
            "max_abs_p90": percentile(lg.dev_max, 90),
            "max_abs_max": float(np.max(lg.dev_max)),
            "mean_abs_mean": float(np.mean(lg.dev_mean)),
        },
        "stage_ms_median": {k: statistics.median(v) for k, v in lg.stage_ms.items()},
    }


def summarize_open_loop(rec: OpenLoopRecorder) -> dict[str, Any]:
    if rec.chunks == 0:
        raise ValueError("no chunks were measured (increase episodes or lower --warmup)")
    base = rec.logs["baseline"]

    def max_j(cfg: RSDConfig | None) -> int:  # the largest j this arm can accept
        m = min(rec.K, rec.policy.shape.num_layers - 1)
        return m if cfg is None or cfg.max_proposals is None else min(m, cfg.max_proposals)

    arms = {name: summarize_arm(lg, base, max_j(rec.arms[name])) for name, lg in rec.logs.items()}
    out: dict[str, Any] = {
        "chunks": rec.chunks,
        "arms": arms,
        "rsd": {m: arms[f"rsd_{m}"] for m in ("strict", "relaxed") if f"rsd_{m}" in arms},
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
        }
    return out


def run_open_loop(
    rec: OpenLoopRecorder,
    episodes: Iterable[tuple[int, int]],
    env_factory: Callable[[int, int], Any],
    max_chunks: int | None = None,
) -> list[dict[str, Any]]:
    """Drive LIBERO episodes with the baseline's actions; every query is decoded by every arm."""
    from evaluator.rollout import run_episode

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


# ------------------------------------------------------------------------------------------ closed loop
@dataclass(frozen=True)
class RSDActFactory:
    """Picklable recipe for a rollout worker: policy + draft + one decoding arm -> act callable."""

    draft: str
    rsd: dict[str, Any] | None  # None: baseline; else RSDConfig fields (acceptance as a dict)
    policy: str = "embedded"
    weights_dir: str | None = None
    codec_dir: str | None = None
    allow_random: bool = False
    draft_forward: str = DEFAULT_FORWARD

    def __call__(self) -> Callable[[Observation], np.ndarray]:
        policy = load_eval_policy(self.policy, self.weights_dir, self.codec_dir, self.allow_random)
        proposer, _ = load_draft(self.draft, policy, self.draft_forward)
        if self.rsd is None:
            engine = RSDEngine(policy, None, RSDConfig(stage_timing=False))
        else:
            kw = dict(self.rsd)
            kw["acceptance"] = AcceptanceConfig(**kw["acceptance"])
            kw["stage_timing"] = False
            engine = RSDEngine(policy, proposer, RSDConfig(**kw))

        def act(obs: Observation) -> np.ndarray:
            out = engine.baseline([obs]) if self.rsd is None else engine.rsd([obs])
            return out.actions[0].float().cpu().numpy()

        act.backbone_id = policy.backbone_id  # type: ignore[attr-defined]
        return act


def run_closed_loop(cfg: EvalConfig, arms: dict[str, RSDConfig | None]) -> dict[str, Any]:
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
        c = arms[name]
        factory = RSDActFactory(
            draft=str(cfg.draft),
            rsd=None if c is None else {**asdict(c), "acceptance": asdict(c.acceptance)},
            policy=cfg.policy,
            weights_dir=str(cfg.weights_dir) if cfg.weights_dir else None,
            codec_dir=str(cfg.codec_dir) if cfg.codec_dir else None,
            allow_random=cfg.allow_random,
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
        cfg.policy,
        str(cfg.weights_dir) if cfg.weights_dir else None,
        str(cfg.codec_dir) if cfg.codec_dir else None,
        cfg.allow_random,
    )
    proposer, draft_info = load_draft(cfg.draft, policy, cfg.draft_forward)
    arms = cfg.arms(proposer.num_layers)
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
            "arms": {
                n: None if c is None else {**asdict(c), "acceptance": asdict(c.acceptance)}
                for n, c in rec.arms.items()
            },
            "open_loop_wall_s": wall_s,
        },
        **summarize_open_loop(rec),
        "open_loop_episodes": episodes,
    }


def main(argv: list[str] | None = None) -> None:
    setup_logging("eval")
    cfg = parse_config(EvalConfig, argv, prog="python -m evaluator.eval")
    os.environ.setdefault("MUJOCO_GL", "egl")
    result = evaluate(cfg)
    write_outputs(result, cfg.out_dir)


def write_outputs(result: dict[str, Any], out_dir: Path) -> Path:
    from evaluator.report import write_report

    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "eval.json"
    path.write_text(json.dumps(result, indent=1))
    write_report(result, out_dir)
    rsd = result["rsd"]
    log.info(
        "%d chunks: baseline %.1f ms median; strict %.1f ms (%.2fx, mean j %.2f); relaxed %.1f ms (%.2fx, mean j %.2f)",
        result["chunks"],
        result["arms"]["baseline"]["latency_ms"]["median"],
        rsd["strict"]["latency_ms"]["median"],
        rsd["strict"]["speedup_median"],
        rsd["strict"]["mean_j"],
        rsd["relaxed"]["latency_ms"]["median"],
        rsd["relaxed"]["speedup_median"],
        rsd["relaxed"]["mean_j"],
    )
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
