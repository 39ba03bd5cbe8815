"""``make eval-vla``: closed-loop success of the embedded VLA in LIBERO under the standard protocol.

    python -m evaluator.rollout                                   # libero_spatial 10 tasks x init 0-49 (500 episodes)
    python -m evaluator.rollout --tasks 0-1 --init-states 0-2     # a smaller run (the report says it is not standard)
    python -m evaluator.rollout --random-weights --out runs/eval_vla/random.json   # random-weight baseline
    python -m evaluator.rollout --ray-address auto --workers 32   # on a Ray cluster (see README)

Episodes run in the evaluation fleet (:mod:`evaluator.fleet`): one simulator per worker process, each
finished episode appended to ``--results`` (JSON lines) at once; running the same command again resumes
where it stopped (Ctrl-C keeps every finished episode). Writes the report to ``--out`` (JSON) and
beside it as markdown (``.md``): success with its Wilson 95 % interval, per-task successes, errored
episodes (crashes, never counted as failures).

The RSD arms of ``make eval`` run closed loop in the same fleet (evaluator/closed_loop.py). One episode:
:mod:`evaluator.episode`.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import sys
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from common.cli import config_to_dict, parse_config
from common.logs import setup_logging
from common.schedule import INIT_STATES, parse_range
from evaluator.fleet import run_protocol
from evaluator.protocol import ArmSpec, ProtocolMismatch
from evaluator.stats import DEFAULT_MARGIN
from producer.env import SUITES

log = logging.getLogger("evaluator.rollout")


@dataclass
class RolloutConfig:
    """Closed-loop success of the embedded VLA (or its random-weight baseline) in LIBERO, standard protocol."""

    suite: str = field(default="libero_spatial", metadata={"help": "LIBERO suite"})
    tasks: str = field(default="0-9", metadata={"help": "task ids, e.g. 0-9 or 0,3,5 (standard: all)"})
    init_states: str = field(
        default="0-49", metadata={"help": "initial states per task, e.g. 0-49 or 0-4 (standard: 0-49)"}
    )
    workers: int = field(default=2, metadata={"help": "episode worker processes (or Ray actors)"})
    ray_address: str | None = field(
        default=None,
        metadata={
            "help": "run the workers as Ray actors: local, auto (a `ray start` cluster here) or HOST:PORT"
        },
    )
    weights_dir: Path | None = field(
        default=None, metadata={"help": "policy weights (none: assets/embedded_vla)"}
    )
    codec_dir: Path | None = field(default=None, metadata={"help": "codec (none: assets/codec)"})
    random_weights: bool = field(
        default=False, metadata={"help": "evaluate the architecture with random weights"}
    )
    seed: int = field(default=0, metadata={"help": "seed of the env, the episodes and the random weights"})
    image_size: int = field(default=128, metadata={"help": "camera image size rendered by the env"})
    max_steps: int | None = field(
        default=None, metadata={"help": "policy steps per episode (none: suite limit, the standard)"}
    )
    execute: int | None = field(
        default=None,
        metadata={"help": "actions executed per policy query before it re-plans (none: the whole chunk)"},
    )
    retries: int = field(default=1, metadata={"help": "re-runs of an errored (crashed) episode"})
    margin: float = field(default=DEFAULT_MARGIN, metadata={"help": "non-inferiority margin (fraction)"})
    torch_threads: int = field(default=1, metadata={"help": "torch threads per worker"})
    out: Path = field(default=Path("runs/eval_vla/rollout.json"), metadata={"help": "JSON report (+ .md)"})
    results: Path | None = field(
        default=None, metadata={"help": "per-episode results, JSON lines (none: --out with .jsonl)"}
    )
    progress: bool = field(default=True, metadata={"help": "show a progress bar"})
    task_ids: list[int] = field(init=False, default_factory=list)
    init_state_ids: list[int] = field(init=False, default_factory=list)

    def __post_init__(self) -> None:
        if self.suite not in SUITES:
            raise ValueError(f"unknown suite {self.suite!r}; valid suites: {list(SUITES)}")
        self.task_ids = parse_range(self.tasks, SUITES[self.suite], "task id")
        self.init_state_ids = parse_range(self.init_states, INIT_STATES, "initial state")
        if self.workers < 1 or self.torch_threads < 1 or self.retries < 0:
            raise ValueError("workers and torch_threads must be >= 1, retries >= 0")
        if not 0 < self.margin < 1:
            raise ValueError(f"margin must be a fraction in (0, 1), got {self.margin}")
        if self.execute is not None and self.execute < 1:
            raise ValueError(f"execute must be >= 1 (actions per query), got {self.execute}")
        if self.results is None:
            self.results = self.out.with_suffix(".jsonl")


def main(argv: list[str] | None = None) -> int:
    setup_logging("rollout")
    cfg = parse_config(RolloutConfig, argv, prog="python -m evaluator.rollout")
    arm = ArmSpec(
        name="random" if cfg.random_weights else "policy",
        weights=str(cfg.weights_dir) if cfg.weights_dir else None,
        codec=str(cfg.codec_dir) if cfg.codec_dir else None,
        random_weights=cfg.random_weights,
        seed=cfg.seed,
        params={} if cfg.execute is None else {"execute": cfg.execute},
    )
    try:
        result = run_protocol(
            [arm], cfg.task_ids, cfg.init_state_ids, cfg.workers, cfg.results, cfg.ray_address, cfg.seed,
            cfg.max_steps, suite=cfg.suite, image_size=cfg.image_size, retries=cfg.retries,
            torch_threads=cfg.torch_threads, progress=cfg.progress,
        )  # fmt: skip
    except (ProtocolMismatch, ValueError) as exc:
        log.error("%s", exc)
        return 2
    except RuntimeError as exc:
        log.error("stopped: %s (finished episodes are kept in %s)", exc, cfg.results)
        return 1
    report = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
        "machine": f"{platform.node()} {os.cpu_count()} CPUs, no GPU",
        "command": " ".join(["python -m evaluator.rollout", *(sys.argv[1:] if argv is None else argv)]),
        "config": config_to_dict(cfg),
        **result.summary(cfg.margin),
    }
    cfg.out.parent.mkdir(parents=True, exist_ok=True)
    cfg.out.write_text(json.dumps(report, indent=1))
    cfg.out.with_suffix(".md").write_text(result.markdown(cfg.margin))
    a = report["arms"][arm.name]
    lo, hi = a["wilson95"]
    log.info(
        "%s (%s): success %d/%d (Wilson 95%% %.1f-%.1f%%), %d errored, %d missing; %s -> %s",
        ", ".join(a["backbone"]) or arm.name, report["protocol"]["description"], a["successes"],
        a["episodes"], 100 * lo, 100 * hi, a["errored"], a["missing"],
        "complete" if result.complete else "INCOMPLETE (run again to resume)", cfg.out,
    )  # fmt: skip
    for t, (k, n) in a["per_task"].items():
        log.info("  task %s: %d/%d", t, k, n)
    if result.interrupted:
        return 130
    return 0 if result.complete else 1


if __name__ == "__main__":
    raise SystemExit(main())
