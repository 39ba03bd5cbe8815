"""Where a LIBERO episode starts: a benchmark initial state or a fresh one, and the leak check.

Every libero_spatial task has 50 fixed *benchmark* initial states: the states the standard protocol
evaluates on, so no training data may start from them. A *fresh* initial state is a new random
object placement that LIBERO samples in the task's regions on reset, drawn reproducibly from a
fresh seed. Both kinds are named by a label:

    parse_init(7)            -> ("benchmark", 7)      # index 0..49 of the task's benchmark states
    parse_init("fresh:12")   -> ("fresh", 12)         # fresh seed 12 (any seed >= 0)
    parse_inits("fresh:0-499") -> ["fresh:0", ..., "fresh:499"];  parse_inits("5-24") -> [5, ..., 24]

Data files record each episode's initial MuJoCo state (flattened, after placement, before settling)
and its label. :func:`assert_no_benchmark_states` compares the object placements (the xyz of every
movable object's free joint) of states with the task's 50 benchmark states; :func:`check_demo_files`
applies it to demonstration HDF5 files and refuses data that starts from a benchmark state or does
not record its initial states (legacy files), unless explicitly allowed.
"""

from __future__ import annotations

import json
import logging
import os
from functools import lru_cache
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import numpy as np
import torch

from common.schedule import INIT_STATES, parse_range

log = logging.getLogger(__name__)

BENCHMARK = "benchmark"
FRESH = "fresh"
#: Highest fresh seed accepted (exclusive); any large range works, this only bounds typos.
MAX_FRESH_SEED = 10**9
#: Two initial states are the same scene when every movable object's position agrees to within this
#: (metres, per coordinate). Fresh placements are uniform in ~3 cm squares per object, so a fresh
#: state of five objects lands this close to one of 50 benchmark states with probability ~1e-7.
LEAK_TOL = 0.002
#: What a reader of training data must be told to pass to accept legacy data anyway.
OVERRIDE_FLAG = "--allow-benchmark-states"


class BenchmarkStateLeak(ValueError):
    """Training data that starts from a benchmark initial state, or does not say where it starts."""


def parse_init(spec: int | str) -> tuple[str, int]:
    """``7`` / ``"7"`` / ``"benchmark:7"`` -> ("benchmark", 7); ``"fresh:12"`` -> ("fresh", 12)."""
    if isinstance(spec, (int, np.integer)):
        kind, text = BENCHMARK, str(int(spec))
    else:
        kind, _, text = str(spec).rpartition(":")
        kind = kind or BENCHMARK
    if kind not in (BENCHMARK, FRESH):
        raise ValueError(f"initial state {spec!r}: use an index 0..{INIT_STATES - 1} or fresh:<seed>")
    try:
        index = int(text)
    except ValueError:
        raise ValueError(
            f"initial state {spec!r}: use an index 0..{INIT_STATES - 1} or fresh:<seed>"
        ) from None
    upper = INIT_STATES if kind == BENCHMARK else MAX_FRESH_SEED
    if not 0 <= index < upper:
        raise ValueError(f"initial state {spec!r} out of range; valid: 0..{upper - 1} ({kind})")
    return kind, index


def init_label(spec: int | str) -> str:
    """The canonical label of an initial state: ``benchmark:7`` or ``fresh:12``."""
    kind, index = parse_init(spec)
    return f"{kind}:{index}"


def parse_inits(text: str) -> list[int | str]:
    """``"5-24"`` -> benchmark indices [5, ..., 24]; ``"fresh:0-499"`` -> ["fresh:0", ..., "fresh:499"]."""
    text = str(text).strip()
    if text.startswith(FRESH + ":"):
        return [f"{FRESH}:{i}" for i in parse_range(text[len(FRESH) + 1 :], MAX_FRESH_SEED, "fresh seed")]
    if text.startswith(BENCHMARK + ":"):
        text = text[len(BENCHMARK) + 1 :]
    return list(parse_range(text, INIT_STATES, "init state"))


# ------------------------------------------------------------------------------ benchmark states
def init_files_dirs() -> list[Path]:
    """Where LIBERO's ``init_files`` may be: the installed package's own folder (found without importing
    LIBERO, which may prompt for a config), then the ``init_states`` key of
    ``$LIBERO_CONFIG_PATH/config.yaml`` (a shared file that other checkouts rewrite with their paths)."""
    dirs = []
    spec = find_spec("libero")
    if spec is not None and spec.submodule_search_locations:
        dirs.append(Path(next(iter(spec.submodule_search_locations))) / "libero" / "init_files")
    config = Path(os.environ.get("LIBERO_CONFIG_PATH", Path.home() / ".libero")) / "config.yaml"
    if config.is_file():
        for line in config.read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "init_states" and value.strip():
                dirs.append(Path(value.strip()))
    return dirs


@lru_cache(maxsize=64)
def benchmark_init_states(suite: str, task_name: str) -> np.ndarray:
    """The task's benchmark initial states as LIBERO evaluates them: [50, S] flattened MuJoCo states."""
    paths = [d / suite / f"{task_name}.pruned_init" for d in init_files_dirs()]
    for path in paths:
        if path.is_file():
            states = torch.load(path, weights_only=False)  # LIBERO's own file: a pickled numpy array
            return np.asarray(states, dtype=np.float64)
    raise ValueError(f"no benchmark initial states for {suite} task {task_name!r} (looked for {paths})")


def object_distances(states: np.ndarray, bench: np.ndarray, qpos_index: np.ndarray) -> np.ndarray:
    """[N, M] largest per-coordinate difference of the object positions of N states and M reference
    states (flattened MuJoCo states: time, qpos, qvel; ``qpos_index`` picks the objects' xyz)."""
    cols = 1 + np.asarray(qpos_index, dtype=np.int64)  # skip the time entry
    a = np.atleast_2d(np.asarray(states, dtype=np.float64))[:, cols]  # [N, K]
    b = np.atleast_2d(np.asarray(bench, dtype=np.float64))[:, cols]  # [M, K]
    return np.abs(a[:, None, :] - b[None, :, :]).max(-1)


def assert_no_benchmark_states(
    states: np.ndarray,
    suite: str,
    task_name: str,
    qpos_index: np.ndarray,
    tol: float = LEAK_TOL,
    what: str = "states",
) -> np.ndarray:
    """Raise :class:`BenchmarkStateLeak` if any of ``states`` [N, S] places the objects as one of the task's
    50 benchmark initial states does (within ``tol`` m per coordinate). Returns each state's distance to
    its nearest benchmark state [N] (metres)."""
    bench = benchmark_init_states(suite, task_name)
    states = np.atleast_2d(np.asarray(states, dtype=np.float64))
    if states.shape[1] != bench.shape[1]:
        raise ValueError(
            f"{what}: states have {states.shape[1]} entries, the benchmark states of {task_name} {bench.shape[1]}"
        )
    dist = object_distances(states, bench, qpos_index)  # [N, 50]
    nearest = dist.min(1)
    hits = np.flatnonzero(nearest < tol)
    if len(hits):
        first = int(hits[0])
        raise BenchmarkStateLeak(
            f"{what}: {len(hits)} of {len(states)} initial states are benchmark initial states of {suite} "
            f"{task_name} (e.g. row {first} = benchmark state {int(dist[first].argmin())}, objects within "
            f"{1000 * nearest[first]:.2f} mm); the 50 benchmark states are the evaluation set and stay out "
            "of training data"
        )
    return nearest


# ------------------------------------------------------------------------------ data files
def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _suite_of(data_group: Any, default: str) -> str:
    try:
        return json.loads(_text(data_group.attrs["env_args"]))["env_kwargs"]["suite"]
    except (KeyError, ValueError, TypeError):
        return default


_Fresh = dict[tuple[str, str, tuple[int, ...]], tuple[list[str], list[np.ndarray]]]


def _scan(paths: list[Path], suite: str) -> tuple[dict[str, str], list[str], list[str], _Fresh]:
    """Every demo's start: sources {key: label}, legacy keys, benchmark keys, and the fresh starts
    grouped by (suite, task, object qpos index) -> (keys, states)."""
    import h5py  # heavy optional dependency: packed data is read without it

    sources: dict[str, str] = {}
    legacy: list[str] = []
    benchmark: list[str] = []
    fresh: _Fresh = {}
    for path in paths:
        with h5py.File(path, "r") as f:
            if "data" not in f:
                raise ValueError(f"{path}: no 'data' group (expected the robomimic/LIBERO layout)")
            file_suite = _suite_of(f["data"], suite)
            for name, g in f["data"].items():
                key = f"{Path(path).name}:{name}"
                recorded = all(a in g.attrs for a in ("init_source", "task_name", "init_object_qpos"))
                if not recorded or "init_sim_state" not in g:
                    sources[key] = "unrecorded"
                    legacy.append(key)
                    continue
                label = sources[key] = init_label(_text(g.attrs["init_source"]))
                if label.startswith(BENCHMARK):
                    benchmark.append(f"{key} ({label})")
                    continue
                idx = tuple(int(i) for i in np.asarray(g.attrs["init_object_qpos"]).ravel())
                names, states = fresh.setdefault((file_suite, _text(g.attrs["task_name"]), idx), ([], []))
                names.append(key)
                states.append(np.asarray(g["init_sim_state"], dtype=np.float64))
    return sources, legacy, benchmark, fresh


def check_demo_files(
    paths: list[Path], allow_benchmark_states: bool = False, suite: str = "libero_spatial"
) -> dict[str, Any]:
    """Check that no demonstration in ``paths`` starts from a benchmark initial state.

    Every ``data/demo_K`` must record ``init_source`` (label), ``task_name``, ``init_object_qpos`` (attrs)
    and ``init_sim_state`` (dataset); a demo without them is *legacy* (recorded before initial states were
    kept, e.g. from benchmark states 5-24). Benchmark-labelled demos, fresh states that match a benchmark
    state and legacy demos raise :class:`BenchmarkStateLeak`, unless ``allow_benchmark_states``: then
    they are logged loudly and accepted.

    Returns {"sources": {"<file name>:<demo>": label or "unrecorded"}, "counts": {...},
    "min_distance_m": nearest fresh-to-benchmark distance, "check": "passed" | "OVERRIDDEN: ..."}.
    """
    sources, legacy, benchmark, fresh = _scan(paths, suite)
    leaks: list[str] = []
    nearest = np.inf
    for (file_suite, task_name, idx), (names, states) in fresh.items():
        dist = object_distances(np.stack(states), benchmark_init_states(file_suite, task_name), np.array(idx))
        near = dist.min(1)
        nearest = min(nearest, float(near.min()))
        leaks += [
            f"{n} (= benchmark state {int(dist[i].argmin())})"
            for i, n in enumerate(names)
            if near[i] < LEAK_TOL
        ]
    counts = {"episodes": len(sources), "fresh": sum(len(v[0]) for v in fresh.values()),
              "benchmark": len(benchmark), "unrecorded": len(legacy), "fresh_matching_benchmark": len(leaks)}  # fmt: skip
    problems = []
    if benchmark or leaks:
        bad = benchmark + leaks
        problems.append(f"{len(bad)} start from a benchmark initial state, e.g. {', '.join(bad[:3])}")
    if legacy:
        problems.append(
            f"{len(legacy)} do not record their initial state (legacy data), e.g. {', '.join(legacy[:3])}"
        )
    check = "passed"
    if problems:
        msg = (f"of {len(sources)} demonstrations in {[str(p) for p in paths]}: " + "; ".join(problems)
               + ". The 50 benchmark initial states of every task are the evaluation set; record training "
               "data from fresh initial states (python -m producer.demos --init-states fresh:0-99)")  # fmt: skip
        if not allow_benchmark_states:
            raise BenchmarkStateLeak(f"{msg}, or pass {OVERRIDE_FLAG} for legacy data only")
        check = f"OVERRIDDEN ({OVERRIDE_FLAG}): {msg}"
        for line in (
            "!" * 100,
            f"{OVERRIDE_FLAG}: TRAINING ON DATA THAT MAY CONTAIN EVALUATION STATES",
            msg,
            "!" * 100,
        ):
            log.warning(line)
    return {"sources": sources, "counts": counts, "min_distance_m": nearest, "check": check}


def require_checked(check: Any, allow_benchmark_states: bool, what: str) -> str:
    """Gate a packed dataset on the leak check recorded when it was packed (``init_check``).

    "passed" trains. A missing record (packed before initial states were recorded, or on-policy frames
    of producer episodes, which start from benchmark states) or an overridden check raises
    :class:`BenchmarkStateLeak` unless ``allow_benchmark_states`` (then logged loudly). Returns the
    outcome to record with the trained weights.
    """
    text = None if check is None else str(check)
    if text == "passed":
        return text
    reason = text or "records no initial-state check (legacy data, or frames of benchmark-state episodes)"
    if not allow_benchmark_states:
        raise BenchmarkStateLeak(
            f"{what}: {reason}; the 50 benchmark initial states are the evaluation set. "
            f"Pass {OVERRIDE_FLAG} for legacy data only"
        )
    for line in ("!" * 100, f"{OVERRIDE_FLAG}: TRAINING ON {what}", reason, "!" * 100):
        log.warning(line)
    return text if text and text.startswith("OVERRIDDEN") else f"OVERRIDDEN ({OVERRIDE_FLAG}): {reason}"
