"""``make produce``: run LIBERO episodes with a VLA and stream one sample per policy query to the trainer.

    python -m producer.produce --endpoint tcp://127.0.0.1:5555                       # embedded VLA
    python -m producer.produce --vla openvla-oft --model-id moojink/openvla-7b-oft-finetuned-libero-spatial

Per episode: reset the task at a fixed initial state, query the policy, execute ``replan`` actions of the
chunk open-loop (cameras are rendered only for the observation of the next query), repeat until success
or the step limit. With ``--sample-every N`` the policy is also queried every N steps in between, on
the states the executed chunk passes through, for training data only (these queries' actions are not
executed; the acting queries stay those at multiples of ``replan``). Every query becomes one ``sample`` message (hidden state, codes, action chunk, ids,
optionally the observation); the episode ends with ``episode_end`` (success / failed / errored).
A simulator or policy exception ends the episode as ``errored`` and the producer goes on.

Delivery (:class:`ReliableSender`): a DEALER socket with a send high-water mark, so a slow trainer
blocks this loop instead of dropping data. Every data message is kept until the trainer acknowledges it
as archived; if the trainer restarts (a new trainer session in an ack), the producer says hello again
and resends everything not yet acknowledged. Ctrl-C / SIGTERM: the current episode is closed as
``incomplete``, the producer waits for the last acks (at most ``--flush-timeout-s``; a second Ctrl-C
stops waiting), says ``bye`` and prints its counts: sent, acknowledged and unacknowledged. When no
trainer answers it warns after ``--no-trainer-warn-s``; it exits with code 1 if anything it sent was
not acknowledged (not delivered).
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from common import wire
from common.cli import config_to_dict, parse_config
from common.logs import progress_bar, setup_logging
from common.policy import ChunkPolicy, Observation
from common.schedule import episode_schedule
from common.shutdown import stop_on_signals
from common.vla import load_policy
from common.vla.openvla_oft import OpenVLAOFTUnavailable
from producer.env import EnvConfig, LiberoEnv
from producer.replay import ReplayEnv, load_replay
from producer.sender import ReliableSender, TrainerRefused

log = logging.getLogger("producer")

VLA_CHOICES = ("embedded", "openvla-oft")


def _default_producer_id() -> str:
    host = re.sub(r"[^A-Za-z0-9_.-]", "-", socket.gethostname())[:40] or "host"
    return f"{host}-{os.getpid()}"


@dataclass
class ProducerConfig:
    """Run LIBERO episodes with a VLA and stream (hidden state, codes, action chunk) samples to the trainer."""

    endpoint: str = field(default="tcp://127.0.0.1:5555", metadata={"help": "trainer endpoint to connect to"})
    producer_id: str = field(
        default_factory=_default_producer_id, metadata={"help": "unique id of this producer"}
    )
    vla: str = field(default="embedded", metadata={"help": "policy backend", "choices": list(VLA_CHOICES)})
    model_id: str = field(
        default="moojink/openvla-7b-oft-finetuned-libero-spatial",
        metadata={"help": "hub id or local folder of the OpenVLA-OFT checkpoint (--vla openvla-oft)"},
    )
    weights_dir: Path | None = field(
        default=None, metadata={"help": "embedded VLA weights (default: assets)"}
    )
    codec_dir: Path | None = field(
        default=None, metadata={"help": "RFSQ codec folder (default: assets/codec)"}
    )
    allow_random_policy: bool = field(
        default=False,
        metadata={
            "help": "PLUMBING TESTS ONLY: use a random-weight embedded VLA if no trained weights exist"
        },
    )
    suite: str = field(default="libero_spatial", metadata={"help": "LIBERO suite"})
    tasks: list[int] = field(default_factory=lambda: list(range(10)), metadata={"help": "task ids to run"})
    episodes_per_task: int = field(default=1, metadata={"help": "episodes per task (init states 0, 1, ...)"})
    first_init_state: int = field(
        default=0, metadata={"help": "initial state of the first episode of a task"}
    )
    repeat: bool = field(default=False, metadata={"help": "loop over the tasks until stopped"})
    replan: int = field(default=8, metadata={"help": "actions executed per policy query (<= chunk length)"})
    max_steps: int | None = field(
        default=None,
        metadata={
            "help": "env steps (actions executed, after the settle steps) per episode, not policy queries "
            "(none: the suite's limit, 220 for libero_spatial; small for tests)"
        },
    )
    image_size: int | None = field(
        default=None,
        metadata={"help": "camera image size (none: 128 for the embedded VLA, 256 for OpenVLA-OFT)"},
    )
    sample_every: int = field(
        default=0,
        metadata={
            "help": "also stream a sample every N env steps between replans: a policy query on the current "
            "observation whose actions are not executed (0: only the acting queries). More on-policy "
            "training states per simulated step; the executed chunks still come from the acting queries"
        },
    )
    send_obs: bool = field(default=False, metadata={"help": "also stream the observation (images, proprio)"})
    replay_obs: Path | None = field(
        default=None,
        metadata={
            "help": "replay observations recorded by `python -m producer.replay` instead of running LIBERO "
            "(a producer machine without LIBERO; frames do not react to actions)"
        },
    )
    hidden_dtype: str = field(
        default="float32",
        metadata={"help": "dtype of the hidden state on the wire", "choices": ["float16", "float32"]},
    )
    sndhwm: int = field(default=64, metadata={"help": "send high-water mark (messages)"})
    max_unacked: int = field(default=2048, metadata={"help": "unacknowledged messages kept before blocking"})
    heartbeat_s: float = field(default=2.0, metadata={"help": "heartbeat interval"})
    flush_timeout_s: float = field(default=30.0, metadata={"help": "at the end, wait this long for acks"})
    no_trainer_warn_s: float = field(
        default=10.0, metadata={"help": "warn when the trainer has not answered for this many seconds"}
    )
    curve_dir: Path | None = field(
        default=None, metadata={"help": "CURVE keys (server.key, client.key_secret)"}
    )
    device: str = field(default="cpu", metadata={"help": "torch device of the policy"})
    seed: int = field(default=0, metadata={"help": "torch seed (random-weight plumbing policies only)"})
    threads: int = field(default=1, metadata={"help": "torch CPU threads"})
    test_raise_in_episode: int | None = field(
        default=None, metadata={"help": "TESTS ONLY: raise inside the policy call of this episode index"}
    )
    ray_address: str | None = field(
        default=None,
        metadata={
            "help": "run --num-producers producers as Ray actors: local, auto or HOST:PORT (producer/fleet.py)"
        },
    )
    num_producers: int = field(
        default=1, metadata={"help": "producers in the Ray fleet; the tasks are split among them round-robin"}
    )
    max_restarts: int = field(default=3, metadata={"help": "Ray fleet: restarts of a producer that dies"})

    def __post_init__(self) -> None:
        if not wire._ID_RE.match(self.producer_id):
            raise ValueError(f"producer_id {self.producer_id!r} must match {wire._ID_RE.pattern}")
        if not self.tasks:
            raise ValueError("tasks must name at least one task id")
        if self.episodes_per_task <= 0:
            raise ValueError(f"episodes_per_task must be > 0, got {self.episodes_per_task}")
        if self.replan <= 0:
            raise ValueError(f"replan must be > 0, got {self.replan}")
        if self.sample_every < 0:
            raise ValueError(f"sample_every must be >= 0, got {self.sample_every}")
        if self.max_steps is not None and self.max_steps <= 0:
            raise ValueError(f"max_steps must be > 0, got {self.max_steps}")
        if self.sndhwm <= 0 or self.max_unacked <= 0:
            raise ValueError("sndhwm and max_unacked must be > 0")
        if self.no_trainer_warn_s <= 0 or self.flush_timeout_s < 0:
            raise ValueError("no_trainer_warn_s must be > 0 and flush_timeout_s >= 0")
        if self.image_size is None:
            self.image_size = 256 if self.vla == "openvla-oft" else 128
        if self.vla == "openvla-oft" and self.device == "cpu":
            self.device = "cuda:0"
        if "://" not in self.endpoint:
            raise ValueError(f"endpoint {self.endpoint!r} must look like tcp://HOST:PORT")
        if self.num_producers < 1 or self.max_restarts < 0:
            raise ValueError("num_producers must be >= 1 and max_restarts >= 0")
        if self.num_producers > 1 and not self.ray_address:
            raise ValueError("--num-producers needs --ray-address (local for this machine, or a cluster)")
        if self.num_producers > len(self.tasks):
            raise ValueError(
                f"--num-producers {self.num_producers} exceeds the {len(self.tasks)} task(s) to split among them"
            )


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


class _InjectedError(RuntimeError):
    """Raised by --test-raise-in-episode to exercise the errored-episode path."""


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
                if self.cfg.test_raise_in_episode == episode:
                    raise _InjectedError(f"injected failure in episode {episode} (--test-raise-in-episode)")
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

        cfg = self.cfg
        import torch

        torch.set_num_threads(cfg.threads)
        torch.manual_seed(
            cfg.seed
        )  # only matters for a random-weight plumbing policy: same on every producer
        if self.policy is None:
            self.policy = build_policy(cfg, self.replay is not None and bool(self.replay["prepared"]))
        log.info("policy %s (D=%d) on %s", self.policy.backbone_id, self.policy.hidden_dim, cfg.device)
        self.sender = ReliableSender(cfg, self.stop, self.abort)
        per_pass = len(cfg.tasks) * cfg.episodes_per_task  # episodes of one pass over the tasks
        env: Any = None
        env_task = None
        hello_sent = False
        episode = self.first_episode
        total = None if cfg.repeat else per_pass
        bar = progress_bar(
            total=total, initial=episode, desc=f"produce {cfg.producer_id}", unit="ep", dynamic_ncols=True
        )
        try:
            while not self.stop.is_set():
                if episode >= per_pass and not cfg.repeat:
                    break
                task_id, init_state = episode_schedule(cfg, episode)
                if env is None or env_task != task_id:
                    if env is not None:
                        env.close()
                    env = self._make_env(task_id, init_state)
                    env_task = task_id
                if not hello_sent:
                    self.sender.send_hello(self._hello(env))
                    hello_sent = True
                t0 = time.time()
                res = self.run_episode(env, episode, task_id, init_state)
                if res.status == "errored":  # the env may be in any state: build a fresh one
                    env.close()
                    env = None
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
                episode += 1
                done = self.counts["success"] + self.counts["failed"]
                bar.update(1)
                bar.set_postfix(
                    steps_s=f"{res.num_steps / max(time.time() - t0, 1e-9):.1f}",
                    samples=self.sender.stats.samples_sent,
                    success=f"{self.counts['success']}/{done}",
                    errored=self.counts["errored"],
                )
            self.sender.poll_acks()
        except TrainerRefused as exc:
            log.error("stopping: %s", exc)
        finally:
            bar.close()
            if env is not None:
                env.close()
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


def main(argv: list[str] | None = None) -> int:
    cfg = parse_config(ProducerConfig, argv, prog="python -m producer.produce")
    setup_logging(f"producer-{cfg.producer_id}")
    os.environ.setdefault("MUJOCO_GL", "egl")
    if cfg.ray_address:
        from producer.fleet import run_fleet  # Ray: a heavy optional dependency, only for fleets

        return run_fleet(cfg)
    try:
        producer = Producer(cfg)
    except ValueError as exc:  # an unreadable --replay-obs file
        log.error("%s", exc)
        return 2
    with stop_on_signals(  # a second signal: do not wait for acks; all is flushed after the block
        producer.stop,
        log,
        "finishing the current step, then closing",
        again=producer.abort,
        again_message="not waiting for the trainer's acknowledgements",
    ):
        try:
            summary = producer.run()
        except OpenVLAOFTUnavailable as exc:
            log.error("OpenVLAOFTUnavailable: %s", exc)
            return 2
    if summary["refused"]:
        return 2
    return 0 if summary["unacked"] == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
