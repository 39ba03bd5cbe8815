"""DAgger-style data: roll out a policy from fresh initial states, label the states it visits with the
scripted expert's action chunk, and write them in the demonstration layout (``trainer.train_vla`` reads
them like demonstrations).

Every episode starts from a fresh initial state (``fresh:<seed>``; benchmark states are refused). The
policy acts as in the closed-loop evaluation: one query, ``--replan`` actions executed open-loop. At
every ``--label-every``-th visited state the rollout is paused: the simulator is snapshotted, a fresh
:class:`~producer.expert.ScriptedExpert` takes over from that state (``replan``: it reads the scene,
bowl already held or not) and acts for ``--label-len`` steps, and the snapshot is restored (exactly:
the rollout goes on as if it had not been paused). Recorded per labelled state:

    obs/*               the observation the policy saw there (images upright, proprio)
    actions        [N, 7]      the expert's first action from the state (its label)
    expert_chunks  [N, L, 7]   the expert's L actions from the state (train_vla's chunk targets)
    policy_actions [N, 7]      what the policy executed
    states, rewards, dones, init_sim_state, and the attrs of producer.demos (init_source, ...);
    demo attrs: round, policy, success (the policy's). data attrs: round, policy, policy_success (JSON).

Aggregating rounds is training on several files: ``train_vla --demos demos.hdf5 dagger_r1.hdf5 ...``.

    python -m producer.dagger --weights-dir runs/vla_r1 --round 1 --init-states fresh:1000-1019 \\
        --out data/dagger/round1.hdf5 --workers 2
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from common.cli import config_to_dict, parse_config
from common.demos import DemoWriter
from common.init_states import FRESH, parse_init
from common.logs import setup_logging
from common.vla import load_policy
from producer.demo_file import ShardStats, errored, finish_file, git_revision
from producer.demos import episode_meta, episode_stream, install_stop_handlers
from producer.env import EnvConfig, LiberoEnv
from producer.expert import (
    SUPPORTED_SUITES,
    EpisodeResult,
    ScriptedExpert,
    close_worker_env,
    env_config,
    validate_episode_selection,
    worker_env,
)

log = logging.getLogger(__name__)


@dataclass
class DaggerConfig:
    """Roll out a policy from fresh initial states; label every visited state with the expert's chunk."""

    out: Path = field(default=Path("data/dagger/round1.hdf5"), metadata={"help": "output HDF5 file"})
    round: int = field(default=1, metadata={"help": "DAgger round (recorded with the data)"})
    weights_dir: Path | None = field(
        default=None, metadata={"help": "embedded VLA weights to roll out (none: assets/embedded_vla)"}
    )
    codec_dir: Path | None = field(default=None, metadata={"help": "RFSQ codec (none: assets/codec)"})
    suite: str = field(default="libero_spatial", metadata={"help": f"suite, one of {SUPPORTED_SUITES}"})
    tasks: str = field(default="0-9", metadata={"help": "task ids, e.g. 0-9 or 0,4,7"})
    init_states: str = field(
        default="fresh:1000-1009",
        metadata={"help": "fresh seeds of the rollouts (fresh:A-B); keep them apart from the demos' seeds"},
    )
    workers: int = field(default=2, metadata={"help": "parallel worker processes"})
    image_size: int = field(default=128, metadata={"help": "square camera image size (the policy's input)"})
    seed: int = field(default=0, metadata={"help": "environment seed"})
    max_steps: int | None = field(default=None, metadata={"help": "step limit (none: the suite's)"})
    replan: int = field(default=8, metadata={"help": "policy actions executed per query"})
    label_every: int = field(default=1, metadata={"help": "label and record every N-th visited state"})
    label_len: int = field(
        default=8, metadata={"help": "expert actions per label (at least the codec's chunk length)"}
    )
    compression: str = field(
        default="gzip", metadata={"help": "image compression", "choices": ["gzip", "lzf", "none"]}
    )
    overwrite: bool = field(default=False, metadata={"help": "replace an existing output file"})
    max_minutes: float | None = field(
        default=None, metadata={"help": "stop after this many minutes and finalize the file"}
    )
    threads: int = field(default=1, metadata={"help": "torch CPU threads per worker"})

    def __post_init__(self) -> None:
        self.out = Path(self.out)
        self.task_ids, self.init_ids = validate_episode_selection(
            self.suite, self.tasks, self.init_states, self.workers
        )
        if any(parse_init(i)[0] != FRESH for i in self.init_ids):
            raise ValueError(
                f"--init-states {self.init_states}: DAgger rollouts start from fresh states only"
            )
        for name in ("replan", "label_every", "label_len", "threads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.round < 0:
            raise ValueError(f"round must be >= 0, got {self.round}")
        if self.max_minutes is not None and self.max_minutes <= 0:
            raise ValueError(f"max_minutes {self.max_minutes} must be > 0")
        if self.out.exists() and not self.overwrite:
            raise ValueError(f"{self.out} exists; pass --overwrite to replace it")


@dataclass(frozen=True)
class DaggerJob:
    """One rollout, picklable for the worker processes."""

    env: EnvConfig
    init: str
    weights_dir: str | None
    codec_dir: str | None
    replan: int
    label_every: int
    label_len: int
    threads: int
    round: int


def expert_label(env: LiberoEnv, length: int) -> np.ndarray:
    """The scripted expert's next ``length`` actions from the env's current state [length, 7] (padded
    with its last action if it reaches the goal first; the episode's step limit does not cut it); the
    env is back in that state afterwards."""
    snap, limit = env.snapshot(), env.cfg.max_steps
    env.cfg.max_steps = env.num_steps + length + 1  # the label looks past the episode's step limit
    try:
        expert = ScriptedExpert(env)
        expert.replan()
        actions = []
        while len(actions) < length:
            actions.append(expert.act())
            _, _, done, _ = env.step(actions[-1], observe=False)
            if done:  # the goal is reached
                break
    finally:
        env.cfg.max_steps = limit
        env.restore(snap)
    return np.stack(actions + [actions[-1]] * (length - len(actions))).astype(np.float32)


ActFn = Callable[[Any], np.ndarray]  # observation -> [T, A] action chunk


def dagger_episode(
    env: LiberoEnv, act: ActFn, init: str, replan: int, label_every: int, label_len: int
) -> tuple[EpisodeResult, dict[str, np.ndarray]]:
    """One policy rollout with expert labels at every ``label_every``-th visited state."""
    t0 = time.perf_counter()
    obs = env.reset(init)
    keys = ("agentview_rgb", "eye_in_hand_rgb", "ee_states", "gripper_states", "joint_states", "states",
            "actions", "expert_chunks", "policy_actions", "rewards", "dones")  # fmt: skip
    rec: dict[str, list] = {k: [] for k in keys}
    done, info, t = False, {"success": False}, 0
    while not done:
        chunk = np.asarray(act(obs), dtype=np.float32)  # [T, A]
        if chunk.ndim != 2 or not np.isfinite(chunk).all():
            raise ValueError(f"the policy returned a bad chunk of shape {chunk.shape}")
        for i, action in enumerate(chunk[:replan]):
            if t % label_every == 0:
                label = expert_label(env, label_len)  # [L, A]
                robot = env.robot_state()
                for key, value in (("agentview_rgb", obs.agentview), ("eye_in_hand_rgb", obs.wrist),
                                   ("ee_states", robot["ee_states"]), ("gripper_states", robot["gripper_states"]),
                                   ("joint_states", robot["joint_states"]), ("states", env.sim_state()),
                                   ("actions", label[0]), ("expert_chunks", label), ("policy_actions", action)):  # fmt: skip
                    rec[key].append(value)
            last = i == min(replan, len(chunk)) - 1
            obs, reward, done, info = env.step(action, observe=last or (t + 1) % label_every == 0)
            if t % label_every == 0:
                rec["rewards"].append(reward)
                rec["dones"].append(done)
            t += 1
            if done:
                break
    result = EpisodeResult(
        env.cfg.task_id, init, bool(info["success"]), env.num_steps, time.perf_counter() - t0
    )
    dtypes = {"agentview_rgb": np.uint8, "eye_in_hand_rgb": np.uint8, "rewards": np.float32, "dones": np.uint8,
              "actions": np.float32, "expert_chunks": np.float32, "policy_actions": np.float32}  # fmt: skip
    arrays = {k: np.asarray(v, dtype=dtypes.get(k, np.float64)) for k, v in rec.items()}
    arrays["init_sim_state"] = np.asarray(env.initial_state, dtype=np.float64)
    return result, arrays


_policies: dict[tuple[str | None, str | None], Any] = {}


def _policy(job: DaggerJob) -> Any:
    """The worker's policy (loaded once per weights)."""
    key = (job.weights_dir, job.codec_dir)
    if key not in _policies:
        torch.set_num_threads(job.threads)
        _policies[key] = load_policy("embedded", weights_dir=job.weights_dir, codec_dir=job.codec_dir)
    return _policies[key]


def _worker(job: DaggerJob) -> tuple[EpisodeResult, dict[str, np.ndarray], dict[str, Any]]:
    setup_logging()
    policy = _policy(job)
    try:
        env = worker_env(job.env)
        with torch.no_grad():
            result, arrays = dagger_episode(
                env,
                lambda o: policy.act([o])[0].actions,
                job.init,
                job.replan,
                job.label_every,
                job.label_len,
            )
    except Exception as exc:  # a simulator or policy error ends this episode only
        close_worker_env()
        return errored(job.env.task_id, job.init, exc)
    meta = episode_meta(env)
    meta["attrs"] = {"round": job.round, "policy": policy.backbone_id, "replan": job.replan,
                     "label_every": job.label_every}  # fmt: skip
    return result, arrays, meta


def success_table(results: list[EpisodeResult]) -> dict[str, Any]:
    """The round's policy success, overall and per task: {"overall": [k, n], "per_task": {t: [k, n]}}."""
    per_task: dict[int, list[int]] = {}
    for r in results:
        entry = per_task.setdefault(r.task_id, [0, 0])
        entry[0] += int(r.success)
        entry[1] += 1
    overall = [sum(v[0] for v in per_task.values()), sum(v[1] for v in per_task.values())]
    return {"overall": overall, "per_task": {str(t): v for t, v in sorted(per_task.items())}}


def main(argv: list[str] | None = None) -> int:
    cfg = parse_config(DaggerConfig, argv, prog="python -m producer.dagger")
    setup_logging("dagger")
    logging.getLogger("producer").setLevel(logging.WARNING)
    jobs = [DaggerJob(env_config(cfg.suite, t, 0, image_size=cfg.image_size, seed=cfg.seed, max_steps=cfg.max_steps),
                      str(i), None if cfg.weights_dir is None else str(cfg.weights_dir),
                      None if cfg.codec_dir is None else str(cfg.codec_dir), cfg.replan, cfg.label_every,
                      cfg.label_len, cfg.threads, cfg.round)
            for i in cfg.init_ids for t in cfg.task_ids]  # fmt: skip
    stop = install_stop_handlers()
    cfg.out.parent.mkdir(parents=True, exist_ok=True)
    writer = DemoWriter(cfg.out.with_name(cfg.out.name + ".partial"), cfg.compression)
    stats, results, policy_id = ShardStats(planned=len(jobs)), [], ""
    t0 = time.perf_counter()
    with episode_stream(jobs, cfg.workers, _worker) as episodes:
        bar = tqdm(episodes, total=len(jobs), desc=f"dagger round {cfg.round}", unit="ep")
        for result, arrays, meta in bar:
            stats.add(result, meta)
            if arrays is not None:
                results.append(result)
                policy_id = meta["attrs"]["policy"]
                writer.add(result, arrays, meta)
            bar.set_postfix(success=f"{sum(r.success for r in results)}/{len(results)}", frames=writer.total)
            if cfg.max_minutes is not None and time.perf_counter() - t0 > 60 * cfg.max_minutes:
                stop.set()
            if stop.is_set():
                break
    table = success_table(results)
    writer.data.attrs.update({"round": cfg.round, "policy": policy_id, "policy_success": json.dumps(table)})
    finish_file(
        writer, stats, cfg, git_revision(), f"DAgger round {cfg.round}: {policy_id} labelled by the expert"
    )
    wall = time.perf_counter() - t0
    summary = {"config": config_to_dict(cfg), "policy": policy_id, "policy_success": table, "wall_s": wall,
               "frames": writer.total, "episodes": [asdict(r) for r in results]}  # fmt: skip
    cfg.out.with_suffix(".json").write_text(json.dumps(summary, indent=1))
    k, n = table["overall"]
    print(f"{cfg.out}: round {cfg.round}, policy {policy_id}: success {k}/{n}; {writer.total} labelled states; "
          f"{wall:.0f} s wall ({wall / max(n, 1):.1f} s per episode on {cfg.workers} workers)")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
