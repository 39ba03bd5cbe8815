"""The scripted expert's success rate in the real LIBERO simulator (an experiment, not part of the product).

    MUJOCO_GL=egl .venv/bin/python -m tools.expert_eval --suite libero_spatial --tasks 0-9 \\
        --init-states 0-4 --workers 1 --out runs/expert_eval_libero_spatial.json

Figures: docs/bench/libero.md. The expert is ``producer/expert.py``.
"""

from __future__ import annotations

import json
import logging
import multiprocessing as mp
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from common.cli import config_to_dict, parse_config
from common.init_states import parse_init
from common.logs import setup_logging
from producer.expert import (
    SUPPORTED_SUITES,
    EpisodeResult,
    env_config,
    run_episode,
    validate_episode_selection,
    worker_env,
)
from producer.suites import list_tasks

log = logging.getLogger("producer.expert")


@dataclass
class ExpertEvalConfig:
    """Measure the scripted expert's success rate in the real LIBERO simulator."""

    suite: str = field(default="libero_spatial", metadata={"help": f"suite, one of {SUPPORTED_SUITES}"})
    tasks: str = field(default="0-9", metadata={"help": "task ids, e.g. 0-9 or 0,4,7"})
    init_states: str = field(
        default="0-4",
        metadata={"help": "benchmark init states (e.g. 0-4, of 0..49) or fresh seeds (fresh:0-99)"},
    )
    workers: int = field(default=2, metadata={"help": "parallel worker processes"})
    seed: int = field(default=0, metadata={"help": "environment seed"})
    max_steps: int | None = field(default=None, metadata={"help": "step limit (none: the suite's)"})
    out: Path = field(
        default=Path("runs/expert_eval.json"), metadata={"help": "where to write the JSON results"}
    )
    action_noise: float = field(
        default=0.0,
        metadata={
            "help": "std of a Gaussian bias on the executed translation actions, redrawn every 8 steps "
            "(as producer.demos)"
        },
    )

    def __post_init__(self) -> None:
        self.task_ids, self.init_ids = validate_episode_selection(
            self.suite, self.tasks, self.init_states, self.workers
        )


def _eval_worker(args: tuple[str, int, int | str, int, int | None, float]) -> EpisodeResult:
    suite, task_id, init_state, seed, max_steps, noise = args
    setup_logging()
    cfg = env_config(suite, task_id, init_state, seed=seed, max_steps=max_steps)
    result, _ = run_episode(worker_env(cfg), init_state, action_noise=noise)
    log.info("task %d init %s: %s in %d steps, %d recoveries", task_id, init_state, result.success, result.steps,
             result.recoveries)  # fmt: skip
    return result


def main(argv: list[str] | None = None) -> int:
    cfg = parse_config(ExpertEvalConfig, argv, prog="python -m tools.expert_eval")
    setup_logging("expert-eval")
    logging.getLogger("producer.expert").setLevel(logging.WARNING)  # the progress bar says enough
    jobs = [
        (cfg.suite, t, i, cfg.seed, cfg.max_steps, cfg.action_noise)
        for t in cfg.task_ids
        for i in cfg.init_ids
    ]
    t0 = time.perf_counter()
    results: list[EpisodeResult] = []
    # One rasterizer thread per worker: the workers already fill the cores (images are identical).
    os.environ.setdefault("LP_NUM_THREADS", "1")
    ctx = mp.get_context("spawn")
    with ctx.Pool(cfg.workers) as pool:
        bar = tqdm(pool.imap(_eval_worker, jobs), total=len(jobs), desc="expert episodes")
        for result in bar:
            results.append(result)
            bar.set_postfix(success=f"{sum(r.success for r in results)}/{len(results)}")
    wall = time.perf_counter() - t0
    results.sort(key=lambda r: (r.task_id, parse_init(r.init_state)))

    names = {t.task_id: t.instruction for t in list_tasks(cfg.suite)}
    per_task = {}
    print(f"{'task':>4}  {'success':>9}  {'mean steps':>10}  instruction")
    for t in cfg.task_ids:
        rs = [r for r in results if r.task_id == t]
        ok = sum(r.success for r in rs)
        steps = float(np.mean([r.steps for r in rs if r.success])) if ok else float("nan")
        per_task[t] = {"success": ok, "episodes": len(rs), "rate": ok / len(rs), "mean_steps_success": steps,
                       "recoveries": sum(r.recoveries for r in rs),
                       "recovered_successes": sum(r.success and r.recoveries > 0 for r in rs)}  # fmt: skip
        print(f"{t:>4}  {ok:>4}/{len(rs):<4}  {steps:>10.1f}  {names[t]}")
    total_ok = sum(r.success for r in results)
    rate = total_ok / len(results)
    ep_seconds = float(np.mean([r.seconds for r in results]))
    rec = sum(r.recoveries > 0 for r in results)
    print(
        f"episodes with a re-plan after a miss: {rec} ({sum(r.success and r.recoveries > 0 for r in results)} "
        "of them succeeded)"
    )
    print(f"overall: {total_ok}/{len(results)} = {rate:.1%}  ({wall:.0f} s wall, "
          f"{ep_seconds:.1f} s per episode in a worker, {cfg.workers} workers)")  # fmt: skip
    cfg.out.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "config": {k: v for k, v in config_to_dict(cfg).items()},
        "overall": {"success": total_ok, "episodes": len(results), "rate": rate},
        "per_task": per_task,
        "wall_seconds": wall,
        "mean_episode_seconds": ep_seconds,
        "episodes": [r.__dict__ for r in results],
    }
    cfg.out.write_text(json.dumps(report, indent=2))
    print(f"wrote {cfg.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
