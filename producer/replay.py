"""Recorded LIBERO observations, replayed in place of the simulator (``produce --replay-obs FILE.npz``).

For a producer machine without LIBERO (a GPU box that cannot install it): record observations where
LIBERO runs, carry the file, replay it. The replayed frames do not react to the policy's actions: the
stream measures the backbone and the wire, not closed-loop behaviour (episodes end as ``failed`` when
their frames run out).

    python -m producer.replay record --out obs.npz --tasks 0 1 2 --image-size 256      # .venv (LIBERO)
    python -m producer.replay prepare --inp obs.npz --out obs224.npz                  # .venv-oft (TF)

``record`` drives each episode with the scripted expert and keeps one frame per policy query (every
``replan`` steps). ``prepare`` runs OpenVLA-OFT's own image preprocessing (TensorFlow JPEG round trip,
lanczos3 to 224 px, 0.9-area center crop) once, so a machine without TensorFlow can replay the exact
224 px inputs (the file's ``prepared`` flag makes the OFT backend skip its preprocessing).

File layout (``np.savez_compressed``): agentview, wrist [N, h, w, 3] uint8, proprio [N, 8] float32,
task_id [N] int32, episode [N] int32 (episode index within the file), instruction [N] str, prepared
(bool scalar), suite (str scalar).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

import numpy as np

from common.logs import setup_logging
from common.policy import Observation
from common.vla.openvla_oft import oft_image_prep
from producer.env import EnvConfig, LiberoEnv
from producer.expert import ScriptedExpert

log = logging.getLogger("producer.replay")

KEYS = ("agentview", "wrist", "proprio", "task_id", "episode", "instruction")


def load_replay(path: str | Path) -> dict[str, Any]:
    """Read and check a recording; raise ValueError naming what is wrong."""
    try:
        with np.load(path, allow_pickle=False) as f:
            data = {k: f[k] for k in f.files}
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read replay file {path}: {exc}") from exc
    missing = [k for k in (*KEYS, "prepared", "suite") if k not in data]
    if missing:
        raise ValueError(
            f"replay file {path} lacks {missing} (record it with `python -m producer.replay record`)"
        )
    n = len(data["proprio"])
    if n == 0 or any(len(data[k]) != n for k in KEYS):
        raise ValueError(f"replay file {path}: arrays must be non-empty and of one length")
    return data


class ReplayEnv:
    """Duck-typed stand-in for :class:`producer.env.LiberoEnv` that replays one task's recorded frames."""

    def __init__(self, data: dict[str, Any], task_id: int, image_size: int | None = None):
        self.task_id = task_id
        sel = np.flatnonzero(data["task_id"] == task_id)
        if not len(sel):
            raise ValueError(
                f"the replay file has no frames of task {task_id}: {sorted(set(data['task_id']))}"
            )
        self.data = data
        self.episodes = [sel[data["episode"][sel] == e] for e in sorted(set(data["episode"][sel].tolist()))]
        self.frames: np.ndarray = self.episodes[0]
        self.pos = 0
        self.image_size = image_size

    def _obs(self) -> Observation:
        i = int(self.frames[self.pos])
        d = self.data
        return Observation(d["agentview"][i], d["wrist"][i], d["proprio"][i], str(d["instruction"][i]))

    def reset(self, init_state: int | None = None) -> Observation:
        self.frames = self.episodes[(init_state or 0) % len(self.episodes)]
        self.pos = 0
        return self._obs()

    def step(self, action: np.ndarray, observe: bool = True) -> tuple[Observation | None, float, bool, dict]:
        if not observe:
            return None, 0.0, False, {"success": False}
        self.pos += 1
        if self.pos >= len(self.frames):
            return None, 0.0, True, {"success": False, "truncated": True}
        return self._obs(), 0.0, False, {"success": False}

    def env_args(self, tasks: Any = None) -> dict[str, Any]:
        return {"replay": True, "suite": str(self.data["suite"]), "prepared": bool(self.data["prepared"])}

    def close(self) -> None:
        pass


# ------------------------------------------------------------------------------ record / prepare
def record(out: Path, suite: str, tasks: list[int], image_size: int, replan: int, max_queries: int) -> int:
    """Scripted-expert episodes in LIBERO, one frame per policy query, written to ``out``."""
    cols: dict[str, list] = {k: [] for k in KEYS}
    for episode, task in enumerate(tasks):
        env = LiberoEnv(EnvConfig(suite=suite, task_id=task, init_state=0, image_size=image_size))
        obs = env.reset(0)
        expert = ScriptedExpert(env)
        for _ in range(max_queries):
            for k, v in zip(KEYS, (obs.agentview, obs.wrist, obs.proprio, task, episode, obs.instruction)):
                cols[k].append(v)
            done = False
            for i in range(replan):
                nxt, _, done, _ = env.step(expert.act(), observe=i == replan - 1)
                if done:
                    break
            if done:
                break
            obs = nxt
        log.info("task %d: %d frames", task, int((np.asarray(cols["episode"]) == episode).sum()))
        env.close()
    np.savez_compressed(
        out,
        agentview=np.stack(cols["agentview"]).astype(np.uint8),
        wrist=np.stack(cols["wrist"]).astype(np.uint8),
        proprio=np.stack(cols["proprio"]).astype(np.float32),
        task_id=np.asarray(cols["task_id"], np.int32),
        episode=np.asarray(cols["episode"], np.int32),
        instruction=np.asarray(cols["instruction"]),
        prepared=np.asarray(False),
        suite=np.asarray(suite),
    )
    return len(cols["proprio"])


def prepare(inp: Path, out: Path) -> int:
    """Apply OpenVLA-OFT's own image preprocessing (needs the OFT environment's TensorFlow)."""
    data = load_replay(inp)
    if bool(data["prepared"]):
        raise ValueError(f"{inp} is already prepared")
    prim, wrist = [], []
    for i in range(len(data["proprio"])):
        obs = Observation(
            data["agentview"][i], data["wrist"][i], data["proprio"][i], str(data["instruction"][i])
        )
        p, w = oft_image_prep(obs)
        prim.append(np.asarray(p, np.uint8))
        wrist.append(np.asarray(w, np.uint8))
    np.savez_compressed(
        out, **{**data, "agentview": np.stack(prim), "wrist": np.stack(wrist), "prepared": np.asarray(True)}
    )
    return len(prim)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m producer.replay", description=__doc__.split("\n\n")[0], allow_abbrev=False
    )
    sub = parser.add_subparsers(dest="cmd", required=True)
    rec = sub.add_parser("record", help="record scripted-expert observations in LIBERO", allow_abbrev=False)
    rec.add_argument("--out", type=Path, required=True, help="output .npz")
    rec.add_argument("--suite", default="libero_spatial", help="LIBERO suite")
    rec.add_argument(
        "--tasks", type=int, nargs="+", default=[0], help="task ids (one episode each, init state 0)"
    )
    rec.add_argument("--image-size", type=int, default=256, help="camera size (OpenVLA-OFT: 256)")
    rec.add_argument("--replan", type=int, default=8, help="env steps per recorded frame")
    rec.add_argument("--max-queries", type=int, default=12, help="frames per episode at most")
    prep = sub.add_parser("prepare", help="apply OpenVLA-OFT's image preprocessing once", allow_abbrev=False)
    prep.add_argument("--inp", type=Path, required=True, help="recording from `record`")
    prep.add_argument("--out", type=Path, required=True, help="output .npz with 224 px prepared images")
    args = parser.parse_args(argv)
    setup_logging("replay")
    if args.cmd == "record":
        n = record(args.out, args.suite, args.tasks, args.image_size, args.replan, args.max_queries)
    else:
        n = prepare(args.inp, args.out)
    print(f"{n} frames -> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
