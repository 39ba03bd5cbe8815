"""One closed-loop episode: a chunk policy acting in an environment (shared by every rollout runner).

* :func:`run_episode` runs one episode on an env given a callable ``obs -> [T, A] actions``; the whole
  chunk runs open-loop and cameras are rendered only at query steps (``step(observe=False)`` inside a
  chunk).
* :func:`make_libero_env` is the default env factory of the workers: a ``LiberoEnv`` from an
  ``EnvConfig`` dict.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from common.policy import Observation
from producer.env import EnvConfig, LiberoEnv

ActFn = Callable[[Observation], np.ndarray]  # observation -> [T, A] action chunk


class EpisodeEnv(Protocol):
    """What :func:`run_episode` needs of an environment (``producer.env.LiberoEnv`` provides it)."""

    def reset(self, init_state: int | None = None) -> Observation: ...

    def step(
        self, action: np.ndarray, observe: bool = True
    ) -> tuple[Observation | None, float, bool, dict]: ...


@dataclass
class EpisodeResult:
    """Per-episode statistics."""

    suite: str
    task_id: int
    init_state: int
    success: bool
    steps: int  # policy steps taken (after settling)
    queries: int  # policy calls (chunks)
    act_s: float  # total wall time inside the policy
    wall_s: float  # episode wall time (reset included)
    extra: dict[str, Any] = field(default_factory=dict)


def run_episode(
    env: EpisodeEnv, act: ActFn, init_state: int, suite: str = "", task_id: int = -1
) -> EpisodeResult:
    """One episode: query ``act`` on the observation, run its whole chunk open-loop, repeat until done.

    ``act`` returns [T, A] actions (or an object with an ``actions`` attribute, e.g. PolicyOutput).
    Only the last action of a chunk renders an observation. Exceptions propagate (a crash is an error).
    """
    t0 = time.perf_counter()
    obs = env.reset(init_state)
    steps = queries = 0
    act_s = 0.0
    success = False
    done = False
    while not done:
        ta = time.perf_counter()
        chunk = act(obs)
        act_s += time.perf_counter() - ta
        actions = np.asarray(getattr(chunk, "actions", chunk), dtype=np.float32)
        if actions.ndim != 2 or actions.shape[0] == 0 or not np.isfinite(actions).all():
            raise ValueError(f"act() must return a finite [T, A] chunk, got shape {actions.shape}")
        queries += 1
        for i, action in enumerate(actions):
            obs, _, done, info = env.step(action, observe=i == len(actions) - 1)
            steps += 1
            success = bool(info.get("success", False))
            if done:
                break
    return EpisodeResult(
        suite=suite,
        task_id=task_id,
        init_state=init_state,
        success=success,
        steps=steps,
        queries=queries,
        act_s=act_s,
        wall_s=time.perf_counter() - t0,
    )


def make_libero_env(env_cfg: dict[str, Any]) -> EpisodeEnv:
    """Default env factory of the workers: a ``LiberoEnv`` from an ``EnvConfig`` dict."""
    return LiberoEnv(EnvConfig(**env_cfg))
