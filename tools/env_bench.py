"""Step throughput of a LIBERO environment with and without camera rendering.

MUJOCO_GL=egl python -m tools.env_bench --steps 40 --image-size 128
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

import numpy as np

from common.cli import parse_config
from common.logs import setup_logging
from producer.env import ACTION_DIM, SUITES, EnvConfig, LiberoEnv
from producer.libero_setup import ensure_libero


# ------------------------------------------------------------------------------------ benchmark
@dataclass
class EnvBenchConfig:
    """Measure LIBERO step throughput with and without camera rendering."""

    suite: str = field(default="libero_spatial", metadata={"help": f"suite, one of {list(SUITES)}"})
    task_id: int = field(default=0, metadata={"help": "task index"})
    image_size: int = field(default=128, metadata={"help": "camera image size"})
    steps: int = field(default=40, metadata={"help": "timed steps per mode"})
    chunk: int = field(default=8, metadata={"help": "observe every CHUNK steps in the open-loop mode"})
    seed: int = field(default=0, metadata={"help": "seed of the random actions"})

    def __post_init__(self) -> None:
        EnvConfig(suite=self.suite, task_id=self.task_id, image_size=self.image_size)
        if self.steps < 1 or self.chunk < 1:
            raise ValueError(f"steps {self.steps} and chunk {self.chunk} must be >= 1")


def main(argv: list[str] | None = None) -> int:
    """``python -m tools.env_bench``: steps/s of robosuite's every-step rendering vs on-demand."""
    bench = parse_config(EnvBenchConfig, argv, prog="python -m tools.env_bench")
    setup_logging("env-bench")
    ensure_libero()  # picks the GL backend (EGL, or OSMesa as the fallback)
    rng = np.random.default_rng(bench.seed)
    actions = rng.uniform(-0.3, 0.3, size=(bench.steps, ACTION_DIM))  # [steps, 7], small moves
    actions[:, 6] = -1.0
    modes = [
        ("robosuite renders every step", True, lambda i: True),
        ("on demand, observe every step", False, lambda i: True),
        (f"on demand, observe every {bench.chunk}th step", False, lambda i: i % bench.chunk == 0),
        ("on demand, no observation", False, lambda i: False),
    ]
    print(f"{bench.suite} task {bench.task_id}, {bench.image_size} px, {bench.steps} steps per mode, MUJOCO_GL="
          f"{os.environ.get('MUJOCO_GL')}, LP_NUM_THREADS={os.environ.get('LP_NUM_THREADS', 'default')}")  # fmt: skip
    for name, every, observe in modes:
        cfg = EnvConfig(
            suite=bench.suite, task_id=bench.task_id, image_size=bench.image_size, render_every_step=every
        )
        t0 = time.perf_counter()
        with LiberoEnv(cfg) as env:
            t1 = time.perf_counter()
            env.reset()
            t2 = time.perf_counter()
            for i, a in enumerate(actions):
                env.step(a, observe=observe(i))
            t3 = time.perf_counter()
        print(f"  {name:<40s} {bench.steps / (t3 - t2):6.1f} steps/s  ({1000 * (t3 - t2) / bench.steps:6.1f} ms/step; "
              f"build {t1 - t0:.1f} s, reset {t2 - t1:.1f} s)")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
