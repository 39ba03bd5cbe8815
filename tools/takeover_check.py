"""Take-over consistency of the scripted expert: do DAgger labels agree with the demonstrations?

Along the expert's own episodes (every task, fresh starts), every 4th state is labelled as a DAgger round
labels a policy's state (``producer.dagger.expert_label``: a fresh expert takes over and acts for 8
steps) and compared with what the running expert did next. A label that disagrees there contradicts the
demonstrations it is trained beside.

    python -m tools.takeover_check --out runs/takeover.json
"""

from __future__ import annotations

import collections
import json
from pathlib import Path

import numpy as np

from common.cli import new_parser
from common.logs import setup_logging


def check(tasks: list[int], seeds: list[int], every: int = 4) -> list[dict]:
    from producer.dagger import expert_label
    from producer.env import EnvConfig, LiberoEnv
    from producer.expert import ScriptedExpert

    rows = []
    for task in tasks:
        with LiberoEnv(EnvConfig(task_id=task, image_size=16)) as env:
            for seed in seeds:
                env.reset(f"fresh:{seed}")
                expert = ScriptedExpert(env)
                taken, labels, done = [], {}, False
                while not done:
                    if env.num_steps % every == 0:
                        labels[env.num_steps] = (expert_label(env, 8), expert.phase_name)
                    taken.append(expert.act())
                    _, _, done, _ = env.step(taken[-1], observe=False)
                taken = np.array(taken)
                for t, (label, phase) in labels.items():
                    if t + 4 <= len(taken):
                        off = float(np.abs(label[:4, :3] - taken[t : t + 4, :3]).max())
                        rows.append({"task": task, "seed": seed, "step": t, "phase": phase, "arm_off": off})
        print(f"task {task}: {len(rows)} labels so far", flush=True)
    return rows


def summary(rows: list[dict], threshold: float = 0.5) -> dict:
    by = collections.defaultdict(lambda: [0, 0])
    for r in rows:
        by[r["phase"]][0] += r["arm_off"] > threshold
        by[r["phase"]][1] += 1
    off = sum(r["arm_off"] > threshold for r in rows)
    return {"labels": len(rows), "threshold": threshold, "disagreeing": off, "per_phase": dict(by)}


def main(argv: list[str] | None = None) -> int:
    p = new_parser(prog="python -m tools.takeover_check", description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", default="0-9", help="libero_spatial task ids, e.g. 0-9")
    p.add_argument("--seeds", default="5,6", help="fresh seeds, comma-separated")
    p.add_argument("--out", type=Path, default=Path("runs/takeover.json"), help="JSON report")
    args = p.parse_args(argv)
    setup_logging("takeover_check")
    from common.schedule import parse_range

    rows = check(parse_range(args.tasks, 10, "task id"), [int(s) for s in args.seeds.split(",")])
    report = {"summary": summary(rows), "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    s = report["summary"]
    print(
        f"{s['disagreeing']}/{s['labels']} labels off by > {s['threshold']} in the first 4 actions' "
        f"translation; per phase: {s['per_phase']}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
