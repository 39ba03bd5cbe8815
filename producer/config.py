"""The producer's configuration (``python -m producer.produce --help``): what to run, how to deliver it."""

from __future__ import annotations

import os
import re
import socket
from dataclasses import dataclass, field
from pathlib import Path

from common import wire

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
            "help": "a plumbing run: use a random-weight embedded VLA when no trained weights exist (its "
            "samples check the pipeline and train nothing useful; the hello's backbone_id says random)"
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
