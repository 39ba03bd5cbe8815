"""The producer's loop: hello, episodes (one ``sample`` per policy query, then ``episode_end``), summary.

:class:`Producer` runs the episodes of its schedule (``common.schedule.episode_schedule``) in LIBERO or
on replayed observations and hands every message to :class:`producer.sender.ReliableSender`. A sim or
policy exception ends the episode as ``errored`` and the loop goes on; a stop request ends the current
episode as ``incomplete``. The command line is ``producer/produce.py``; fleets are ``producer/fleet.py``.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from common import wire
from common.cli import config_to_dict
from common.logs import progress_bar
from common.policy import ChunkPolicy, Observation
from common.schedule import episode_schedule
from common.vla import load_policy
from producer.config import ProducerConfig
from producer.env import EnvConfig, LiberoEnv
from producer.replay import ReplayEnv, load_replay
from producer.sender import ReliableSender, TrainerRefused

log = logging.getLogger("producer")


# ------------------------------------------------------------------------------ policy
def build_policy(cfg: ProducerConfig, prepared_images: bool = False) -> ChunkPolicy:
    """The producer's policy, from the backend registry (common/vla/registry.py)."""
    if cfg.vla == "openvla-oft":
        options = {"weights_dir": cfg.model_id, "suite": cfg.suite, "prepared_images": prepared_images}
    else:
        options = {"weights_dir": cfg.weights_dir, "allow_random": cfg.allow_random_policy}
    policy = load_policy(cfg.vla, device=cfg.device, codec_dir=cfg.codec_dir, **options)
    if "random" in policy.backbone_id:
        log.warning("policy %s has RANDOM weights: data for plumbing tests only", policy.backbone_id)
    return policy


def _codec_sha(policy: ChunkPolicy) -> str:
    codec = getattr(policy, "codec", None)
    return str(getattr(codec, "sha256", "") or "")


def _codec_bounds(policy: ChunkPolicy) -> dict[str, list[float]] | None:
    """The codec's normalization bounds (the trainer counts the action values clamped outside them)."""
    codec = getattr(policy, "codec", None)
    if codec is None or not hasattr(codec, "action_low"):
        return None
    return {"low": codec.action_low.cpu().tolist(), "high": codec.action_high.cpu().tolist()}


# ------------------------------------------------------------------------------ episodes
@dataclass
class EpisodeResult:
    status: str
    num_samples: int
    num_steps: int
    error: str = ""


class Producer:
    def __init__(self, cfg: ProducerConfig, policy: ChunkPolicy | None = None):
        self.cfg = cfg
        self.stop = threading.Event()
        self.abort = threading.Event()  # a second Ctrl-C: do not wait for acks at exit either
        self.policy: ChunkPolicy | None = policy  # None: built from cfg in run()
        self.replay = load_replay(cfg.replay_obs) if cfg.replay_obs is not None else None
        self.sender: ReliableSender | None = None
        self.counts = {"success": 0, "failed": 0, "errored": 0, "incomplete": 0}
        self.steps_total = 0
        self.t_start = time.time()
        self.first_episode = 0  # episode index to start from (a restarted fleet producer resumes)
        self.on_episode: Callable[[int, str], None] | None = None  # called after each episode_end is sent
        self._env: Any = None  # the current task's environment (LiberoEnv or ReplayEnv)
        self._env_task: int | None = None

    def _sample(self, episode: int, task_id: int, step: int, out: Any, obs: Observation) -> wire.Sample:
        cfg = self.cfg
        if out.codes is None:
            raise ValueError(f"policy {self.policy.backbone_id} returned no codes")
        raw = None
        if cfg.send_obs:
            raw = wire.RawObservation(
                agentview=np.ascontiguousarray(obs.agentview, np.uint8),
                wrist=np.ascontiguousarray(obs.wrist, np.uint8),
                proprio=np.asarray(obs.proprio, np.float32),
            )
        return wire.Sample(
            producer_id=cfg.producer_id,
            session=self.sender.session,
            seq=0,  # assigned by the sender
            suite=cfg.suite,
            task_id=task_id,
            episode_id=episode,
            step=step,
            hidden=np.asarray(out.hidden, dtype=cfg.hidden_dtype).reshape(-1),  # [D]
            codes=np.asarray(out.codes, dtype=np.uint8),  # [T, H, L]
            actions=np.asarray(out.actions, dtype=np.float32),  # [T, A]
            obs=raw,
        )

    def run_episode(self, env: Any, episode: int, task_id: int, init_state: int) -> EpisodeResult:
        """One episode; raises only for stop requests. Exceptions of sim or policy -> ``errored``."""
        n_samples = 0
        step = 0
        try:
            obs = env.reset(init_state)
            while not self.stop.is_set():
                out = self.policy.act([obs])[0]
                self.sender.send_data(self._sample(episode, task_id, step, out, obs))
                n_samples += 1
                chunk = np.asarray(out.actions, np.float32)  # [T, A]
                n_exec = min(self.cfg.replan, len(chunk))
                done, info = False, {"success": False}
                every = self.cfg.sample_every
                for i in range(n_exec):
                    last = i == n_exec - 1
                    extra = not last and every > 0 and (step + 1) % every == 0
                    obs_next, _, done, info = env.step(chunk[i], observe=last or extra)
                    step += 1
                    if done:
                        break
                    if last:
                        obs = obs_next
                    elif extra:  # an observing query: streamed for training, its actions not executed
                        seen = self.policy.act([obs_next])[0]
                        self.sender.send_data(self._sample(episode, task_id, step, seen, obs_next))
                        n_samples += 1
                if done:
                    return EpisodeResult("success" if info["success"] else "failed", n_samples, step)
            return EpisodeResult("incomplete", n_samples, step, "producer stopped")
        except TrainerRefused:
            raise
        except Exception as exc:  # sim or policy failure: this episode is errored, the producer goes on
            log.error("episode %d (task %d) errored: %s: %s", episode, task_id, type(exc).__name__, exc)
            return EpisodeResult("errored", n_samples, step, f"{type(exc).__name__}: {exc}"[:1000])

    def run(self) -> dict[str, Any]:
        """Hello, the episodes of the schedule (or until stopped), then flush, bye and the summary."""
        cfg = self.cfg
        torch.set_num_threads(cfg.threads)
        torch.manual_seed(
            cfg.seed
        )  # only matters for a random-weight plumbing policy: same on every producer
        if self.policy is None:
            self.policy = build_policy(cfg, self.replay is not None and bool(self.replay["prepared"]))
        log.info("policy %s (D=%d) on %s", self.policy.backbone_id, self.policy.hidden_dim, cfg.device)
        self.sender = ReliableSender(cfg, self.stop, self.abort)
        total = None if cfg.repeat else len(cfg.tasks) * cfg.episodes_per_task
        bar = progress_bar(
            total=total, initial=self.first_episode, desc=f"produce {cfg.producer_id}", unit="ep",
            dynamic_ncols=True,
        )  # fmt: skip
        try:
            self._episodes(bar)
            self.sender.poll_acks()
        except TrainerRefused as exc:
            log.error("stopping: %s", exc)
        finally:
            bar.close()
            if self._env is not None:
                self._env.close()
            summary = self._finish()
        return summary

    def _episodes(self, bar: Any) -> None:
        """Run the schedule's episodes from ``first_episode``: one pass over the tasks, or until stopped."""
        cfg = self.cfg
        per_pass = len(cfg.tasks) * cfg.episodes_per_task  # episodes of one pass over the tasks
        episode = self.first_episode
        while not self.stop.is_set() and (cfg.repeat or episode < per_pass):
            task_id, init_state = episode_schedule(cfg, episode)
            env = self._env_for(task_id, init_state)
            if self.sender.hello is None:
                self.sender.send_hello(self._hello(env))
            t0 = time.time()
            res = self.run_episode(env, episode, task_id, init_state)
            if res.status == "errored":  # the env may be in any state: build a fresh one
                env.close()
                self._env = None
            self._end_episode(episode, task_id, res)
            episode += 1
            done = self.counts["success"] + self.counts["failed"]
            bar.update(1)
            bar.set_postfix(
                steps_s=f"{res.num_steps / max(time.time() - t0, 1e-9):.1f}",
                samples=self.sender.stats.samples_sent,
                success=f"{self.counts['success']}/{done}",
                errored=self.counts["errored"],
            )

    def _env_for(self, task_id: int, init_state: int) -> Any:
        """The environment of ``task_id``: the current one, or a new one (the old one closed)."""
        if self._env is None or self._env_task != task_id:
            if self._env is not None:
                self._env.close()
            self._env = self._make_env(task_id, init_state)
            self._env_task = task_id
        return self._env

    def _end_episode(self, episode: int, task_id: int, res: EpisodeResult) -> None:
        """Send the episode's ``episode_end`` and count it."""
        cfg = self.cfg
        self.sender.send_data(
            wire.EpisodeEnd(
                cfg.producer_id,
                self.sender.session,
                0,
                cfg.suite,
                task_id,
                episode,
                res.status,
                res.num_samples,
                res.num_steps,
                res.error,
            )
        )
        self.counts[res.status] += 1
        self.steps_total += res.num_steps
        if self.on_episode is not None:
            self.on_episode(episode, res.status)

    def _finish(self) -> dict[str, Any]:
        """Wait for the last acks, say bye, close the socket, print and return the summary."""
        cfg = self.cfg
        acked = self.sender.flush(cfg.flush_timeout_s)
        self.sender.bye()  # after the flush: the trainer closes this producer's episodes at bye
        summary = self.summary()
        if not acked:
            log.error(
                "NOT DELIVERED: %d sample(s) and %d episode end(s) were not acknowledged by a trainer at %s%s",
                summary["samples_unacked"],
                summary["episodes_unacked"],
                cfg.endpoint,
                "" if self.sender.trainer_session else " (no trainer ever answered)",
            )
        self.sender.close()
        print_summary(summary)
        return summary

    def _make_env(self, task_id: int, init_state: int) -> Any:
        if self.replay is not None:
            return ReplayEnv(self.replay, task_id)
        cfg = self.cfg
        return LiberoEnv(
            EnvConfig(
                suite=cfg.suite,
                task_id=task_id,
                init_state=init_state,
                image_size=cfg.image_size,
                max_steps=cfg.max_steps,
            )
        )

    def _hello(self, env: Any) -> wire.Hello:
        info = {"producer": config_to_dict(self.cfg), "env_args": env.env_args(self.cfg.tasks)}
        bounds = _codec_bounds(self.policy)
        if bounds is not None:
            info["codec_bounds"] = bounds
        cfg_json = json.dumps(info, sort_keys=True)
        return wire.Hello(
            producer_id=self.cfg.producer_id,
            session=self.sender.session,
            seq=self.sender.seq,
            backbone_id=self.policy.backbone_id,
            hidden_dim=int(self.policy.hidden_dim),
            shape=self.policy.shape.to_dict(),
            codec_sha256=_codec_sha(self.policy),
            config_json=cfg_json,
        )

    def summary(self) -> dict[str, Any]:
        s = self.sender.stats
        elapsed = time.time() - self.t_start
        return {
            "producer_id": self.cfg.producer_id,
            "session": self.sender.session,
            "episodes": dict(self.counts),
            "samples_sent": s.samples_sent,
            "episodes_sent": s.episodes_sent,
            "samples_acked": s.samples_acked,
            "episodes_acked": s.episodes_acked,
            "samples_unacked": len(self.sender.unacked_samples),
            "episodes_unacked": len(self.sender.unacked) - len(self.sender.unacked_samples),
            "resent": s.resent,
            "unacked": len(self.sender.unacked),
            "refused": self.sender.refused,
            "acked_seq": s.acked_seq,
            "trainer_sessions": s.trainer_sessions,
            "steps": self.steps_total,
            "elapsed_s": elapsed,
            "steps_per_s": self.steps_total / elapsed if elapsed else 0.0,
            "samples_per_s": s.samples_sent / elapsed if elapsed else 0.0,
            "blocked_s": s.blocked_s,
        }


def print_summary(s: dict[str, Any]) -> None:
    e = s["episodes"]
    print(
        f"\n=== producer {s['producer_id']} summary ===\n"
        f"episodes: {e['success']} success, {e['failed']} failed, {e['errored']} errored, {e['incomplete']} incomplete\n"
        f"sent {s['samples_sent']} samples + {s['episodes_sent']} episode ends (resent {s['resent']}); "
        f"acknowledged by the trainer {s['samples_acked']} samples + {s['episodes_acked']} episode ends; "
        f"unacknowledged (not delivered) {s['samples_unacked']} samples + {s['episodes_unacked']} episode ends\n"
        f"{s['steps']} env steps in {s['elapsed_s']:.1f}s: {s['steps_per_s']:.2f} steps/s, "
        f"{s['samples_per_s']:.3f} samples/s, blocked on backpressure {s['blocked_s']:.1f}s\n"
        f"SUMMARY_JSON {json.dumps(s, sort_keys=True)}",
        flush=True,
    )
