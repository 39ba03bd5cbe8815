"""How a policy fails: closed-loop episodes with the task object tracked at every step, each failure
sorted into a kind, and a contact sheet of the third-person camera for each failed episode.

Kinds of failure (the episode ran to the step limit without the goal holding):

* ``never grasped``: the gripper never held the task's object (robosuite's two-pad grasp check);
* ``holding at the limit``: it held the object when time ran out (carrying, or hovering over the target);
* ``released off target``: it held the object, let go, and the goal does not hold (placed wrong or dropped).

Beside the kind: how many separate grasps there were, the highest lift of the object, and its final
distance in the plane to the goal's target object when that is an object of the scene.

    python -m tools.failure_probe --tasks 4,7 --init-states fresh:3100-3119 --out-dir runs/failures

Meant for fresh starts (``fresh:N``); benchmark initial states are refused unless
``--allow-benchmark-states``: designing the next training run from the benchmark's failures would tune it
on the evaluation set.
"""

from __future__ import annotations

import collections
import json
import multiprocessing as mp
from pathlib import Path
from typing import Any

import numpy as np

from common.cli import new_parser
from common.init_states import BENCHMARK, parse_init
from common.logs import setup_logging

SHEET_EVERY = 3  # a frame every 3rd policy query (24 env steps)


def classify(success: bool, grasped: list[bool]) -> str:
    """The kind of an episode from its per-step grasp flags (see the module docstring)."""
    if success:
        return "success"
    if not any(grasped):
        return "never grasped"
    if grasped[-1]:
        return "holding at the limit"
    return "released off target"


def grasp_count(grasped: list[bool]) -> int:
    """Separate grasps: rising edges of the per-step grasp flag."""
    g = [False, *grasped]
    return sum(1 for a, b in zip(g, g[1:], strict=False) if b and not a)


def _episodes(job: tuple[int, list[Any], str | None, str | None, str, int]) -> list[dict[str, Any]]:
    task, inits, weights, codec, sheet_dir, max_sheets = job
    from common.vla.embedded import load_embedded  # heavy imports in the worker
    from producer.env import EnvConfig, LiberoEnv

    policy = load_embedded("cpu", weights, codec)
    rows = []
    sheets = 0
    with LiberoEnv(EnvConfig(task_id=task)) as env:
        for init in inits:
            obs = env.reset(init)
            _, obj, *rest = env.goal_state[0]
            target = rest[0] if rest else None
            z0 = float(env.object_pos(obj)[2])
            grasped, lift, frames, done, success, queries = [], 0.0, [], False, False, 0
            while not done:
                if queries % SHEET_EVERY == 0:
                    frames.append(obs.agentview)
                actions = np.asarray(policy.act([obs])[0].actions, dtype=np.float32)
                queries += 1
                for i, a in enumerate(actions):
                    obs_i, _, done, info = env.step(a, observe=i == len(actions) - 1)
                    obs = obs_i if obs_i is not None else obs
                    grasped.append(env.is_grasped(obj))
                    lift = max(lift, float(env.object_pos(obj)[2]) - z0)
                    success = bool(info.get("success", False))
                    if done:
                        break
            row = {"task_id": task, "init_state": init, "success": success, "kind": classify(success, grasped),
                   "steps": len(grasped), "grasps": grasp_count(grasped), "max_lift_m": round(lift, 4),
                   "goal": env.goal_state[0], "instruction": obs.instruction}  # fmt: skip
            try:
                d = env.object_pos(obj)[:2] - env.object_pos(target)[:2] if target else None
                row["final_xy_to_target_m"] = None if d is None else round(float(np.linalg.norm(d)), 4)
            except ValueError:  # the target is a region, not an object
                row["final_xy_to_target_m"] = None
            if not success and sheets < max_sheets:
                frames.append(obs.agentview)
                row["sheet"] = _sheet(
                    frames, Path(sheet_dir) / f"task{task}_{str(init).replace(':', '')}.png", row
                )
                sheets += 1
            rows.append(row)
            print(
                f"task {task} {init}: {row['kind']} ({row['grasps']} grasps, {row['steps']} steps)",
                flush=True,
            )
    return rows


def _sheet(frames: list[np.ndarray], path: Path, row: dict[str, Any]) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(frames)
    cols = min(n, 8)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(2.4 * cols, 2.5 * rows + 0.6), squeeze=False)
    for k, ax in enumerate(axes.flat):
        ax.axis("off")
        if k < n:
            ax.imshow(frames[k])
            ax.set_title(f"step {min(k * SHEET_EVERY * 8, row['steps'])}" if k < n - 1 else "end", fontsize=7)
    fig.suptitle(f"task {row['task_id']} {row['init_state']}: {row['kind']}, {row['grasps']} grasp(s)\n"
                 f"{row['instruction']}", fontsize=10)  # fmt: skip
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=72, bbox_inches="tight")
    plt.close(fig)
    return path.name


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    per_task: dict[int, collections.Counter] = collections.defaultdict(collections.Counter)
    for r in rows:
        per_task[r["task_id"]][r["kind"]] += 1
    return {"episodes": len(rows), "per_task": {t: dict(c) for t, c in sorted(per_task.items())},
            "overall": dict(collections.Counter(r["kind"] for r in rows))}  # fmt: skip


def markdown(summary: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    kinds = ["success", "never grasped", "holding at the limit", "released off target"]
    lines = ["| task | " + " | ".join(kinds) + " |", "|---:|" + "---:|" * len(kinds)]
    for t, c in summary["per_task"].items():
        lines.append(f"| {t} | " + " | ".join(str(c.get(k, 0)) for k in kinds) + " |")
    lines += ["", "| task | start | kind | grasps | max lift (m) | final xy to target (m) | sheet |",
              "|---:|---|---|---:|---:|---:|---|"]  # fmt: skip
    for r in rows:
        if not r["success"]:
            sheet = f"[{r['sheet']}]({r['sheet']})" if r.get("sheet") else ""
            lines.append(f"| {r['task_id']} | {r['init_state']} | {r['kind']} | {r['grasps']} | {r['max_lift_m']} | "
                         f"{r['final_xy_to_target_m']} | {sheet} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    setup_logging("failure_probe")
    p = new_parser(prog="python -m tools.failure_probe", description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", default="4,7", help="libero_spatial task ids, e.g. 4,7 or 0-9")
    p.add_argument("--init-states", default="fresh:3100-3109", help="starts per task: fresh:A-B (or A-B)")
    p.add_argument("--weights-dir", default=None, help="policy weights (none: assets/embedded_vla)")
    p.add_argument("--codec-dir", default=None, help="codec (none: assets/codec)")
    p.add_argument("--workers", type=int, default=2, help="worker processes (one task at a time each)")
    p.add_argument("--max-sheets", type=int, default=6, help="contact sheets per task (failed episodes)")
    p.add_argument("--out-dir", type=Path, default=Path("runs/failures"), help="JSON, markdown and sheets")
    p.add_argument("--allow-benchmark-states", action="store_true", help="allow benchmark initial states")
    args = p.parse_args(argv)
    try:
        from producer.expert import (
            validate_episode_selection,
        )  # the expert's commands parse them the same way

        tasks, inits = validate_episode_selection(
            "libero_spatial", args.tasks, args.init_states, args.workers
        )
        kinds = {parse_init(i)[0] for i in inits}
    except ValueError as exc:
        p.error(str(exc))
    if BENCHMARK in kinds and not args.allow_benchmark_states:
        p.error(
            "benchmark initial states are the evaluation set; use fresh:A-B (or --allow-benchmark-states)"
        )
    jobs = [(t, inits, args.weights_dir, args.codec_dir, str(args.out_dir), args.max_sheets) for t in tasks]
    with mp.get_context("spawn").Pool(min(args.workers, len(jobs))) as pool:
        rows = [r for part in pool.map(_episodes, jobs) for r in part]
    summary = summarize(rows)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "failures.json").write_text(json.dumps({"summary": summary, "episodes": rows}, indent=1))
    (args.out_dir / "failures.md").write_text(markdown(summary, rows))
    print(json.dumps(summary["overall"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
