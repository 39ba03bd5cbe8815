"""Draw fresh initial states and report how they compare to the benchmark states (no episodes run).

    python -m tools.fresh_probe --tasks 0-9 --init-states fresh:0-4 --out runs/fresh_probe.json

Per task: placements drawn per fresh start (redraws of overlapping placements), the distance of each
start to its nearest benchmark initial state (largest object-coordinate difference, the leak check's
metric) and the reset time.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from common.cli import config_to_dict, parse_config
from common.init_states import FRESH, benchmark_init_states, object_distances, parse_init, parse_inits
from common.logs import setup_logging
from common.schedule import parse_range
from producer.env import SUITES, EnvConfig, LiberoEnv

log = logging.getLogger(__name__)


@dataclass
class FreshProbeConfig:
    """Draw fresh initial states of some tasks and compare them to the benchmark states."""

    suite: str = field(default="libero_spatial", metadata={"help": f"suite, one of {list(SUITES)}"})
    tasks: str = field(default="0-9", metadata={"help": "task ids, e.g. 0-9"})
    init_states: str = field(default="fresh:0-4", metadata={"help": "fresh seeds, e.g. fresh:0-4"})
    seed: int = field(default=0, metadata={"help": "environment seed"})
    out: Path = field(default=Path("runs/fresh_probe.json"), metadata={"help": "JSON results"})

    def __post_init__(self) -> None:
        if self.suite not in SUITES:
            raise ValueError(f"unknown suite {self.suite!r}; valid suites: {list(SUITES)}")
        self.task_ids = parse_range(self.tasks, SUITES[self.suite], "task id")
        self.init_ids = parse_inits(self.init_states)
        if any(parse_init(i)[0] != FRESH for i in self.init_ids):
            raise ValueError(f"--init-states {self.init_states}: give fresh seeds (fresh:A-B)")


def main(argv: list[str] | None = None) -> int:
    cfg = parse_config(FreshProbeConfig, argv, prog="python -m tools.fresh_probe")
    setup_logging("fresh-probe")
    results = {}
    for task in cfg.task_ids:
        with LiberoEnv(EnvConfig(suite=cfg.suite, task_id=task, image_size=16, seed=cfg.seed)) as env:
            bench = benchmark_init_states(cfg.suite, env.task.name)
            draws, nearest, seconds = [], [], []
            for init in cfg.init_ids:
                t0 = time.perf_counter()
                env.reset(init)
                seconds.append(time.perf_counter() - t0)
                draws.append(env.fresh_attempts)
                nearest.append(
                    float(object_distances(env.initial_state, bench, env.object_qpos_index()).min())
                )
        results[task] = {"draws": draws, "nearest_benchmark_m": nearest, "reset_s": seconds}
        print(f"task {task}: {sum(draws)} draws for {len(draws)} starts; nearest benchmark state (mm) "
              f"{' '.join(f'{1000 * d:.1f}' for d in nearest)}; reset {min(seconds):.1f}-{max(seconds):.1f} s",
              flush=True)  # fmt: skip
    cfg.out.parent.mkdir(parents=True, exist_ok=True)
    cfg.out.write_text(json.dumps({"config": config_to_dict(cfg), "tasks": results}, indent=1))
    near = [d for r in results.values() for d in r["nearest_benchmark_m"]]
    print(f"nearest benchmark state over all starts: {1000 * min(near):.1f} mm; wrote {cfg.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
