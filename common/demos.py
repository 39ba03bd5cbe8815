"""The demonstration HDF5 file (docs/DESIGN.md §8.2): its writer and its readers.

Layout (N steps of one episode; images exactly as the policy sees them, upright uint8):

    data/                       attrs: env_args (JSON), total, num_demos, num_failures, config (JSON),
                                init_check, …
    data/demo_K/                attrs: num_samples, instruction, task_id, task_name, success,
                                init_source ("fresh:<seed>" or "benchmark:<index>"), init_state (the
                                benchmark index, -1 for a fresh start), init_object_qpos (qpos indices
                                of the objects' xyz), fresh_attempts
        actions            [N, 7]  float32   the env's action space ([-1, 1]; gripper -1 open, +1 close)
        obs/agentview_rgb  [N, h, w, 3] uint8
        obs/eye_in_hand_rgb [N, h, w, 3] uint8
        obs/ee_states      [N, 6]  float64   eef position (3), axis-angle (3)
        obs/gripper_states [N, 2]  float64   finger joint positions
        obs/joint_states   [N, 7]  float64   arm joint positions
        states             [N, S]  float64   flattened MuJoCo state (for replay)
        init_sim_state     [S]     float64   the initial state: after placement, before settling
        rewards            [N]     float32
        dones              [N]     uint8
        expert_chunks      [N, T, 7] float32 (DAgger files only) the expert's chunk from the visited state
    mask/train, mask/valid      demo names (valid: the last initial state of every task)

``obs[i]`` is the observation on which ``actions[i]`` was taken; ``rewards[i]``/``dones[i]`` follow it.

Writer: :class:`DemoWriter`, one for every recorder (``producer.demos``, ``producer.dagger``); only the
parent process writes, a file is written as ``<file>.partial`` and renamed when finalized
(``producer.demo_file.finish_file``). Every fresh start is compared to the benchmark initial states before
it is written. Readers: :func:`read_demos` (frames for behaviour cloning and distillation),
:func:`read_episode_actions` (actions for the codec); both refuse files whose episodes start from a
benchmark initial state (``common.init_states.check_demo_files``) unless explicitly allowed.

h5py is imported where a file is opened: packed data (``common.packed``) trains without it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from tqdm import tqdm

from common.init_states import (
    BENCHMARK,
    BenchmarkStateLeak,
    assert_no_benchmark_states,
    check_demo_files,
    parse_init,
)
from common.vla.embedded import downsample_images

log = logging.getLogger(__name__)

SCHEMA_VERSION = 2  # 2: initial states recorded (init_sim_state, init_source, init_object_qpos)
OBS_KEYS = ("agentview_rgb", "eye_in_hand_rgb", "ee_states", "gripper_states", "joint_states")


class EpisodeOutcome(Protocol):
    """What the writer needs of a recorder's episode result (``producer.expert.EpisodeResult``)."""

    task_id: int
    success: bool


class DemoWriter:
    """Writes episodes into ``data/demo_K`` groups; the parent process is its only user.

    Every episode's initial state is checked against the task's benchmark initial states before it is
    written: a fresh start that matches one is dropped and counted (``leaks``), never written.
    """

    def __init__(self, path: Path, compression: str = "gzip") -> None:
        import h5py  # heavy optional dependency: packed data is read without it

        self.path = path
        self.compression = None if compression == "none" else compression
        self.file = h5py.File(path, "w", libver="latest")
        self.data = self.file.create_group("data")
        self.num_demos = 0
        self.total = 0
        self.names_by_task: dict[int, list[tuple[tuple[str, int], str]]] = {}
        self.leaks: list[str] = []
        self.unchecked: list[str] = []
        self.benchmark_starts = 0
        self.nearest_benchmark_m = float("inf")

    def _dataset(self, group: Any, name: str, array: np.ndarray, image: bool = False) -> None:
        kwargs: dict[str, Any] = {}
        if image:
            kwargs["chunks"] = (1, *array.shape[1:])  # one frame per chunk: cheap random access
            if self.compression == "gzip":
                kwargs.update(compression="gzip", compression_opts=4)
            elif self.compression == "lzf":
                kwargs.update(compression="lzf")
        group.create_dataset(name, data=array, **kwargs)

    def admissible(self, meta: dict[str, Any], init_sim_state: np.ndarray) -> bool:
        """False (logged, counted) for a fresh start that is a benchmark initial state."""
        kind, _ = parse_init(meta["init_source"])
        if kind == BENCHMARK:  # allowed by the caller's explicit override only
            self.benchmark_starts += 1
            return True
        try:
            near = assert_no_benchmark_states(
                init_sim_state, meta["suite"], meta["task_name"], meta["init_object_qpos"],
                what=f"{meta['task_name']} {meta['init_source']}",
            )  # fmt: skip
        except BenchmarkStateLeak as exc:
            log.error("dropped: %s", exc)
            self.leaks.append(meta["init_source"])
            return False
        except (OSError, ValueError) as exc:  # benchmark states unreadable now: keep it
            log.error("written unchecked (the trainers check it again): %s", exc)
            self.unchecked.append(meta["init_source"])
            return True
        self.nearest_benchmark_m = min(self.nearest_benchmark_m, float(near.min()))
        return True

    def add(self, result: EpisodeOutcome, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> str | None:
        """Write one episode (``arrays``: OBS_KEYS in ``obs/``, the rest at the top; ``meta["attrs"]``:
        extra attributes). Returns its name, or None if its start is a benchmark state (dropped)."""
        if not self.admissible(meta, arrays["init_sim_state"]):
            return None
        name = f"demo_{self.num_demos}"
        g = self.data.create_group(name)
        n = int(arrays["actions"].shape[0])
        obs = g.create_group("obs")
        for key in OBS_KEYS:
            self._dataset(obs, key, arrays[key], image=key.endswith("_rgb"))
        for key, array in arrays.items():
            if key not in OBS_KEYS:
                self._dataset(g, key, array)
        kind, index = parse_init(meta["init_source"])
        attrs = {
            "num_samples": n, "instruction": meta["instruction"], "task_name": meta["task_name"],
            "task_id": result.task_id, "success": bool(result.success), "init_source": f"{kind}:{index}",
            "init_state": index if kind == BENCHMARK else -1, "fresh_attempts": int(meta["fresh_attempts"]),
            "init_object_qpos": np.asarray(meta["init_object_qpos"], dtype=np.int64), **meta.get("attrs", {}),
        }  # fmt: skip
        g.attrs.update(attrs)
        self.num_demos += 1
        self.total += n
        self.names_by_task.setdefault(result.task_id, []).append(((kind, index), name))
        self.file.flush()
        return name

    def finish(self, attrs: dict[str, Any]) -> None:
        import h5py  # heavy optional dependency: packed data is read without it

        for k, v in attrs.items():
            self.data.attrs[k] = v
        self.data.attrs["total"] = self.total
        self.data.attrs["num_demos"] = self.num_demos
        self.data.attrs["init_check"] = json.dumps(
            {"benchmark_starts_written": self.benchmark_starts, "fresh_dropped_as_benchmark": self.leaks,
             "unchecked": self.unchecked,
             "nearest_benchmark_m": None if self.nearest_benchmark_m == float("inf") else self.nearest_benchmark_m}
        )  # fmt: skip
        # Validation split: the episodes of the highest initial state of every task.
        train: list[str] = []
        valid: list[str] = []
        for _, items in sorted(self.names_by_task.items()):
            items.sort()
            if len(items) > 1:
                valid.append(items[-1][1])
                train.extend(n for _, n in items[:-1])
            else:
                train.extend(n for _, n in items)
        mask = self.file.create_group("mask")
        dt = h5py.string_dtype()
        mask.create_dataset("train", data=np.array(train, dtype=object), dtype=dt)
        mask.create_dataset("valid", data=np.array(valid, dtype=object), dtype=dt)
        self.file.close()


def demo_names(group: Any) -> list[str]:
    """The ``demo_K`` names of a ``data`` group in numeric order."""
    return sorted(group.keys(), key=lambda n: int(n.split("_")[-1]) if n.split("_")[-1].isdigit() else n)


def _demo_count(path: Path) -> int:
    import h5py

    with h5py.File(path, "r") as f:
        if "data" not in f:
            raise ValueError(f"{path}: no 'data' group (expected the robomimic/LIBERO layout)")
        return len(demo_names(f["data"]))


# the per-demo columns of ``_read_file``
_COLUMNS = ("images", "proprio", "episode", "steps", "actions", "action_episode", "instructions", "tasks", "names",
            "labels")  # fmt: skip


def _read_file(job: tuple[Path, int, int, int]) -> dict[str, list]:
    """One file's frames (``read_demos``); ``first`` is the global index of its first demo."""
    import h5py

    path, image_size, frame_stride, first = job
    out: dict[str, list] = {k: [] for k in _COLUMNS}
    with h5py.File(path, "r") as f:
        for name in tqdm(demo_names(f["data"]), desc=f"read {path.name}", unit="demo", leave=False):
            g = f["data"][name]
            e = first + len(out["names"])
            a = np.asarray(g["actions"], dtype=np.float32)  # [n, A]
            n = a.shape[0]
            keep = np.arange(e % frame_stride, n, frame_stride)  # [n']
            obs = g["obs"]
            av = downsample_images(np.asarray(obs["agentview_rgb"])[keep], image_size)  # [n', S, S, 3]
            wr = downsample_images(np.asarray(obs["eye_in_hand_rgb"])[keep], image_size)  # [n', S, S, 3]
            pr = np.concatenate([np.asarray(obs["ee_states"]), np.asarray(obs["gripper_states"])], axis=1)
            if pr.shape != (n, 8):
                raise ValueError(f"{path}: data/{name} proprio has shape {pr.shape}, expected ({n}, 8)")
            out["images"].append(torch.stack([av, wr], dim=1).numpy())  # [n', 2, S, S, 3]
            out["proprio"].append(pr[keep].astype(np.float32))
            out["episode"].append(np.full(len(keep), e, dtype=np.int64))
            out["steps"].append(keep.astype(np.int64))
            out["actions"].append(a)
            out["action_episode"].append(np.full(n, e, dtype=np.int64))
            instr = g.attrs["instruction"]
            out["instructions"].append(instr.decode() if isinstance(instr, bytes) else str(instr))
            out["tasks"].append(int(g.attrs.get("task_id", -1)))
            out["names"].append(f"{path.name}:{name}")
            out["labels"].append(
                np.asarray(g["expert_chunks"], dtype=np.float32)[keep] if "expert_chunks" in g else None
            )
    return out


def read_demos(
    paths: list[Path],
    image_size: int,
    frame_stride: int = 1,
    allow_benchmark_states: bool = False,
    workers: int | None = None,
) -> dict[str, Any]:
    """Read HDF5 demos into frame arrays (images downsampled with the run-time function).

    Every ``frame_stride``-th step is kept as a training frame (offset alternating per episode);
    the actions of every step are kept, so chunk targets are exact. Files whose episodes start from a
    benchmark initial state or do not record their starts are refused (``common.init_states``) unless
    ``allow_benchmark_states``. Files are read by ``workers`` processes (default: one per file, at most
    half the CPUs; the result does not depend on it).

    returns images [N, 2, S, S, 3] uint8, proprio [N, 8] f32, episode [N] i64, step [N] i64 (frame
    index inside its episode), actions [M, A] f32 (all steps), action_episode [M] i64,
    instruction_of_episode [E] str, task_of_episode [E] i64, episode_names [E] str,
    init_source_of_episode [E] str, init_check (str: "passed" or the override's record), and, if any
    demo has per-step expert chunks (DAgger labels, ``expert_chunks`` [n, T, A]), label_chunks [N, T, A]
    f32 (NaN for frames of demos without them).
    """

    report = check_demo_files(list(paths), allow_benchmark_states)
    starts = np.cumsum([0] + [_demo_count(p) for p in paths])[:-1]  # global index of each file's 1st demo
    jobs = [(Path(p), image_size, frame_stride, int(s)) for p, s in zip(paths, starts)]
    if workers is None:
        workers = min(len(jobs), max(1, (os.cpu_count() or 1) // 2))
    if workers > 1:
        import multiprocessing as mp

        # spawn, not fork: a forked child of a process whose torch thread pool has started can hang
        with mp.get_context("spawn").Pool(workers, initializer=torch.set_num_threads, initargs=(1,)) as pool:
            parts = list(
                tqdm(pool.imap(_read_file, jobs), total=len(jobs), desc="read demo files", unit="file")
            )
    else:
        parts = [_read_file(job) for job in jobs]
    col = {k: [x for part in parts for x in part[k]] for k in _COLUMNS}  # the files' columns, in file order
    images, proprio, episode, steps = col["images"], col["proprio"], col["episode"], col["steps"]
    actions, action_episode, instructions = col["actions"], col["action_episode"], col["instructions"]
    tasks, names, labels = col["tasks"], col["names"], col["labels"]
    if not names:
        raise ValueError(f"no demonstrations in {paths}")
    extra: dict[str, Any] = {
        "init_source_of_episode": np.array([report["sources"][n] for n in names]),
        "init_check": np.array(report["check"]),
    }
    lengths = {lab.shape[1:] for lab in labels if lab is not None}
    if len(lengths) > 1:
        raise ValueError(f"expert_chunks of different shapes {sorted(lengths)} in {paths}")
    if lengths:
        (shape,) = lengths  # (T, A)
        blank = [np.full((len(p), *shape), np.nan, np.float32) for p in proprio]
        extra["label_chunks"] = np.concatenate([b if lab is None else lab for lab, b in zip(labels, blank)])
    return {
        **extra,
        "images": np.concatenate(images),
        "proprio": np.concatenate(proprio),
        "episode": np.concatenate(episode),
        "step": np.concatenate(steps),
        "actions": np.concatenate(actions),
        "action_episode": np.concatenate(action_episode),
        "instruction_of_episode": np.array(instructions),
        "task_of_episode": np.array(tasks, dtype=np.int64),
        "episode_names": np.array(names),
    }


def read_episode_actions(paths: list[Path]) -> tuple[list[np.ndarray], str]:
    """All episodes' actions [N, A] from the files, in file/demo order, plus a hash of the data."""
    import h5py  # heavy optional dependency: packed data is read without it

    episodes: list[np.ndarray] = []
    digest = hashlib.sha256()
    for path in paths:
        with h5py.File(path, "r") as f:
            if "data" not in f:
                raise ValueError(f"{path}: no 'data' group (expected the robomimic/LIBERO layout)")
            for name in demo_names(f["data"]):
                grp = f["data"][name]
                if "actions" not in grp:
                    raise ValueError(f"{path}: data/{name} has no 'actions' dataset")
                a = np.asarray(grp["actions"], dtype=np.float32)
                if a.ndim != 2 or not np.isfinite(a).all():
                    raise ValueError(
                        f"{path}: data/{name}/actions must be finite [N, A], got shape {a.shape}"
                    )
                episodes.append(a)
                digest.update(a.tobytes())
    if not episodes:
        raise ValueError(f"no episodes found in {[str(p) for p in paths]}")
    return episodes, digest.hexdigest()
