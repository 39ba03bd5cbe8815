"""``make train``: receive samples from producers, archive them, train the draft online (docs/DESIGN.md §2.3, §5, §7.5).

One process, two threads:

* the **receiver** (main thread) owns the ROUTER socket: it decodes and validates every message
  (:mod:`common.wire`), rejects, counts and logs what is malformed, drops duplicates and replays by
  sequence number, inserts samples into the replay buffer (train episodes) or the validation set
  (every ``valid_every``-th episode, held out whole), writes each finished episode to the HDF5 archive
  and acknowledges it to its producer;
* the **learner** thread samples batches under a samples-per-insert rate limit and trains the draft,
  validates every ``val_interval`` updates, saves ``draft_best.pt`` / ``draft_last.pt``, logs to
  TensorBoard and plots the curves.

Producers connect DEALER sockets (one-way data with high-water-mark backpressure, like PUSH/PULL) and
receive acks on the same connection; an ack names the highest sequence number on disk, and a new
trainer session id in an ack makes the producer resend whatever is not yet acknowledged. Restarting the
trainer in the same run dir resumes from ``draft_last.pt`` and refills the buffer from the archive.

Ctrl-C / SIGTERM: stop receiving, archive open episodes as ``incomplete``, validate, write the
checkpoints and print the accounting per producer.
"""

from __future__ import annotations

import json
import logging
import signal
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import torch
import zmq

from common import wire
from common.cli import config_to_dict, parse_config
from common.curve import check_bind_endpoint, server_curve
from common.draft import DEFAULT_FORWARD, FORWARD_HELP, FORWARDS
from common.logs import setup_logging
from common.shapes import DEFAULT_SHAPE, RFSQShape
from trainer.archive import (
    ArchiveError,
    ArchiveWriter,
    EpisodeRecord,
    archived_seqs,
    episode_attrs,
    iter_episodes,
)
from trainer.buffer import RateLimiter, ReplayBuffer
from trainer.clamp import ATTR as clamp_attr
from trainer.clamp import ClampStats
from trainer.learner import Learner, OptimConfig
from trainer.plots import plot_curves
from trainer.report import ProducerStats, Progress, print_summary

log = logging.getLogger("trainer.online")


class BindError(RuntimeError):
    """The trainer cannot listen on its endpoint (e.g. the port is in use)."""


@dataclass
class TrainerConfig:
    """Receive samples over ZeroMQ, archive them to HDF5 and train the draft online."""

    endpoint: str = field(default="tcp://127.0.0.1:5555", metadata={"help": "ZeroMQ endpoint to bind"})
    run_dir: Path = field(
        default=Path("runs/default/train"),
        metadata={"help": "checkpoints, archive, logs (make train's folder)"},
    )
    curve_dir: Path | None = field(
        default=None,
        metadata={
            "help": "CURVE key folder from `python -m trainer.keys` (required to bind beyond 127.0.0.1)"
        },
    )
    rcvhwm: int = field(default=256, metadata={"help": "receive high-water mark (messages) per producer"})
    capacity: int = field(default=50000, metadata={"help": "replay buffer capacity (samples)"})
    val_capacity: int = field(default=10000, metadata={"help": "held-out validation samples kept"})
    valid_every: int = field(default=10, metadata={"help": "hold out every N-th episode for validation"})
    batch_size: int = field(default=32, metadata={"help": "training batch size"})
    lr: float = field(default=1e-4, metadata={"help": "AdamW learning rate"})
    weight_decay: float = field(default=1e-5, metadata={"help": "AdamW weight decay"})
    grad_clip: float = field(default=1.0, metadata={"help": "gradient-norm clip"})
    warmup_steps: int = field(default=1000, metadata={"help": "linear warmup updates"})
    total_steps: int = field(default=20000, metadata={"help": "cosine schedule length in updates"})
    draft_hidden_dim: int = field(default=512, metadata={"help": "draft model width"})
    draft_forward: str = field(default=DEFAULT_FORWARD, metadata={"help": FORWARD_HELP, "choices": FORWARDS})
    input_dim: int | None = field(
        default=None,
        metadata={
            "help": "hidden size the draft reads (e.g. 4096 for OpenVLA-OFT): producers sending another are "
            "refused at hello (default: the first producer's)"
        },
    )
    samples_per_insert: float = field(
        default=32.0, metadata={"help": "target number of times each inserted sample is drawn for training"}
    )
    min_size: int = field(default=32, metadata={"help": "samples in the buffer before training starts"})
    error_buffer: float = field(
        default=2000.0, metadata={"help": "slack of the rate limiter, in sampled items"}
    )
    val_interval: int = field(default=100, metadata={"help": "validate every N updates"})
    log_interval: int = field(default=20, metadata={"help": "log training metrics every N updates"})
    producer_timeout_s: float = field(
        default=30.0,
        metadata={"help": "a producer silent this long has its open episode closed as incomplete"},
    )
    max_updates: int | None = field(default=None, metadata={"help": "stop after this many updates"})
    max_runtime_s: float | None = field(default=None, metadata={"help": "stop after this many seconds"})
    exit_after_byes: int | None = field(
        default=None, metadata={"help": "stop once this many producers said bye (tests, scripted runs)"}
    )
    resume: bool = field(default=True, metadata={"help": "resume from run-dir/draft_last.pt and the archive"})
    threads: int = field(default=1, metadata={"help": "torch CPU threads for training"})
    device: str = field(default="auto", metadata={"help": "cpu, cuda or auto"})
    seed: int = field(default=0, metadata={"help": "random seed"})

    def __post_init__(self) -> None:
        self.run_dir = Path(self.run_dir)
        for name in (
            "rcvhwm",
            "capacity",
            "val_capacity",
            "valid_every",
            "batch_size",
            "threads",
            "val_interval",
        ):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device must be auto, cpu or cuda, got {self.device!r}")
        if self.error_buffer < self.samples_per_insert + self.batch_size:
            raise ValueError(
                f"error_buffer ({self.error_buffer}) must be >= samples_per_insert + batch_size "
                f"({self.samples_per_insert + self.batch_size})"
            )
        check_bind_endpoint(self.endpoint, self.curve_dir)

    def optim(self) -> OptimConfig:
        return OptimConfig(
            lr=self.lr,
            weight_decay=self.weight_decay,
            grad_clip=self.grad_clip,
            warmup_steps=self.warmup_steps,
            total_steps=self.total_steps,
            batch_size=self.batch_size,
            draft_hidden_dim=self.draft_hidden_dim,
            draft_forward=self.draft_forward,
        )


@dataclass
class ProducerState:
    """The current session of one producer."""

    producer_id: str
    session: str
    hello: wire.Hello
    identity: bytes
    expected_seq: int
    last_seen: float
    open: dict[int, EpisodeRecord] = field(default_factory=dict)
    said_bye: bool = False


class Trainer:
    def __init__(self, cfg: TrainerConfig, shape: RFSQShape = DEFAULT_SHAPE):
        self.cfg = cfg
        self.shape = shape
        self.limits = wire.WireLimits(shape=shape)
        self.session = uuid.uuid4().hex[:16]
        self.stop = threading.Event()
        self._made_run_dir = not cfg.run_dir.exists()
        cfg.run_dir.mkdir(parents=True, exist_ok=True)
        self.archive = ArchiveWriter(cfg.run_dir / "archive.hdf5", shape, trainer_config=config_to_dict(cfg))
        self.archived = archived_seqs(self.archive.path)  # (pid, session) -> highest seq on disk
        self.producers: dict[str, ProducerState] = {}
        self.stats: dict[str, ProducerStats] = {}
        self.unattributed: dict[str, int] = {}
        self.episode_counter = self.archive.num_episodes  # decides train/valid split of new episodes
        self.lags: list[float] = []
        self.accepted_total = 0
        self.t_start = time.time()
        self.first_sample_at: float | None = None
        self.hidden_dim: int = int(self.archive.meta.get("hidden_dim", 0))
        if cfg.input_dim and self.hidden_dim and cfg.input_dim != self.hidden_dim:
            raise ValueError(f"--input-dim {cfg.input_dim} != the archive's hidden_dim {self.hidden_dim}")
        self.hidden_dim = self.hidden_dim or cfg.input_dim or 0
        self.clamp = ClampStats(self.archive.meta.get(clamp_attr))
        self.buffer: ReplayBuffer | None = None
        self.valset: ReplayBuffer | None = None
        self.limiter = RateLimiter(cfg.samples_per_insert, cfg.min_size, cfg.error_buffer)
        self.learner: Learner | None = None
        self.model_ready = threading.Event()
        self.history: list[dict[str, Any]] = []
        self.last_val: dict[str, Any] | None = None
        self.learner_error: BaseException | None = None
        self._learner_lock = threading.Lock()
        self.tb: Any = None
        self.bound = threading.Event()
        self.bound_endpoint = ""
        if cfg.device == "auto":
            self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        else:
            self.device = torch.device(cfg.device)
        if self.hidden_dim:
            self._setup_model(self.hidden_dim)

    # ================================================================== model / buffer setup
    def _setup_model(self, hidden_dim: int) -> None:
        cfg, s = self.cfg, self.shape
        self.hidden_dim = hidden_dim
        S = s.tokens_per_layer
        self.buffer = ReplayBuffer(cfg.capacity, hidden_dim, s.num_coarse_layers, S, seed=cfg.seed)
        self.valset = ReplayBuffer(cfg.val_capacity, hidden_dim, s.num_coarse_layers, S, seed=cfg.seed + 1)
        torch.manual_seed(cfg.seed)
        self.learner = Learner(hidden_dim, s, cfg.optim(), device=self.device)
        last = cfg.run_dir / "draft_last.pt"
        if cfg.resume and last.is_file():
            ckpt = self.learner.load(last)
            log.info(
                "resumed from %s: %d updates, val_accuracy %.4f",
                last,
                self.learner.updates,
                ckpt["val_accuracy"],
            )
        n_train = n_val = 0
        if cfg.resume and self.archive.total:
            for ep in iter_episodes(self.archive.path):
                targets = self._targets(ep.codes)  # [n, K, S]
                store = self.valset if ep.attrs["split"] == "valid" else self.buffer
                for h, t in zip(ep.hidden, targets, strict=True):
                    store.insert(h, t)
                if ep.attrs["split"] == "valid":
                    n_val += len(targets)
                else:
                    n_train += len(targets)
            # refilled samples count as inserted and already consumed: no burst of re-training on them
            self.limiter.inserted(n_train)
            self.limiter.stats.samples = int(n_train * cfg.samples_per_insert)
            log.info("refilled replay buffer from archive: %d train, %d validation samples", n_train, n_val)
        self.model_ready.set()

    def _targets(self, codes: np.ndarray) -> np.ndarray:
        """codes [n, T, H, L] uint8 -> coarse targets [n, K, T*H] uint8 (flattened in (T, H) order).

        ``n`` may be 0: an episode archived without samples (its producer stopped right after it began)."""
        K = self.shape.num_coarse_layers
        n, T, H = codes.shape[:3]
        return np.ascontiguousarray(codes[..., :K].transpose(0, 3, 1, 2)).reshape(n, K, T * H)

    # ================================================================== receiving
    def _stats(self, pid: str) -> ProducerStats:
        if pid not in self.stats:
            self.stats[pid] = ProducerStats()
        return self.stats[pid]

    def _peek_pid(self, frames: list[Any]) -> str | None:
        """Best effort: the producer id of a rejected message, for per-producer counts."""
        try:
            h = msgpack.unpackb(bytes(frames[0]), raw=False, max_str_len=256, max_bin_len=64 * 1024)
            pid = h.get("pid") if isinstance(h, dict) else None
            return pid if isinstance(pid, str) and wire._ID_RE.match(pid) else None
        except Exception:
            return None

    def _reject(self, reason: str, detail: str, pid: str | None) -> None:
        if pid is not None:
            self._stats(pid).reject(reason)
        else:
            self.unattributed[reason] = self.unattributed.get(reason, 0) + 1
        total = sum(self.unattributed.values()) + sum(sum(s.rejected.values()) for s in self.stats.values())
        if total <= 20 or total % 100 == 0:
            log.warning(
                "rejected message from %s (%s): %s [%d rejected so far]", pid or "?", reason, detail, total
            )

    def _send_ack(self, sock: zmq.Socket, identity: bytes, pid: str, psession: str, error: str = "") -> None:
        state = self.producers.get(pid)
        known = state is not None and state.session == psession
        ack = wire.Ack(self.session, pid, psession, self.archived.get((pid, psession), -1), known, error)
        try:
            sock.send_multipart([identity, *wire.encode(ack)], flags=zmq.NOBLOCK)
        except zmq.Again:
            pass  # the producer asks again with its next heartbeat

    def handle(self, sock: zmq.Socket, identity: bytes, frames: list[Any]) -> None:
        now = time.time()
        try:
            msg = wire.decode(frames, self.limits)
        except Exception as exc:  # WireError; anything else (a decoder defect) is a rejection all the same
            pid = self._peek_pid(frames)
            if pid is not None:
                self._stats(pid).received += 1
            if isinstance(exc, wire.WireError):
                self._reject(exc.reason, str(exc), pid)
            else:
                log.debug("decoder failed on a message from %s", pid or "?", exc_info=exc)
                self._reject("malformed", f"undecodable message: {type(exc).__name__}: {exc}", pid)
            return
        pid = msg.producer_id
        st = self._stats(pid)
        st.received += 1
        if isinstance(msg, wire.Ack):
            self._reject("schema", "ack sent to the trainer", pid)
            return
        if isinstance(msg, wire.Hello):
            self._on_hello(sock, identity, msg, now)
            return
        state = self.producers.get(pid)
        if state is None or state.session != msg.session:
            if isinstance(msg, wire.Heartbeat):  # a producer from before a restart: tell it to re-hello
                self._send_ack(sock, identity, pid, msg.session)
                return
            self._reject("no_hello", f"{msg.kind} from session {msg.session} without a hello", pid)
            return
        state.last_seen = now
        state.identity = identity
        if isinstance(msg, wire.Heartbeat):
            self._send_ack(sock, identity, pid, msg.session)
            return
        if isinstance(msg, wire.Bye):
            self._on_bye(msg, state)
            return
        # data messages: every check first, then the sequence accounting (a rejected message leaves the
        # expected seq and the gap count alone, whatever seq it claims)
        if isinstance(msg, wire.Sample) and msg.hidden.shape[0] != state.hello.hidden_dim:
            self._reject(
                "shape", f"hidden [{msg.hidden.shape[0]}] != hello's D={state.hello.hidden_dim}", pid
            )
            return
        if msg.seq < state.expected_seq:
            self._reject("duplicate", f"seq {msg.seq} < expected {state.expected_seq}", pid)
            return
        if msg.seq > state.expected_seq:
            missing = msg.seq - state.expected_seq
            st.gaps += missing
            st.gap_events += 1
            log.warning(
                "producer %s: sequence gap, %d message(s) missing before seq %d", pid, missing, msg.seq
            )
        state.expected_seq = msg.seq + 1
        if isinstance(msg, wire.Sample):
            self._on_sample(msg, state, now)
        else:
            self._on_episode_end(sock, msg, state)

    def _on_hello(self, sock: zmq.Socket, identity: bytes, msg: wire.Hello, now: float) -> None:
        pid = msg.producer_id
        st = self._stats(pid)
        err = None
        if self.hidden_dim and msg.hidden_dim != self.hidden_dim:  # before provenance: nothing recorded
            err = f"hidden size {msg.hidden_dim} != this run's {self.hidden_dim}"
        if err is None:
            err = self.archive.set_provenance(
                backbone_id=msg.backbone_id,
                hidden_dim=msg.hidden_dim,
                codec_sha256=msg.codec_sha256,
                producer_id=pid,
                producer_config=msg.config_json,
            )
        if err is not None:
            self._reject("backbone_mismatch", err, pid)
            self._send_ack(sock, identity, pid, msg.session, error=f"trainer refuses this producer: {err}")
            return
        old = self.producers.get(pid)
        if old is not None and old.session == msg.session:
            old.identity, old.last_seen = identity, now  # repeated hello: keep the sequence state
        else:
            if old is not None:
                log.warning("producer %s restarted (session %s -> %s)", pid, old.session, msg.session)
                self._close_open(old, "incomplete")
            st.sessions += 1
            expected = self.archived.get((pid, msg.session), -1) + 1
            self.producers[pid] = ProducerState(pid, msg.session, msg, identity, expected, now)
            log.info(
                "hello from %s (session %s, %s, D=%d), expecting seq %d",
                pid,
                msg.session,
                msg.backbone_id,
                msg.hidden_dim,
                expected,
            )
        if not self.hidden_dim:
            self._setup_model(msg.hidden_dim)
        self.clamp.on_hello(pid, msg.config_json)
        self._send_ack(sock, identity, pid, msg.session)

    def _on_sample(self, msg: wire.Sample, state: ProducerState, now: float) -> None:
        ep = state.open.get(msg.episode_id)
        if ep is None:
            split = "valid" if self.episode_counter % self.cfg.valid_every == 0 else "train"
            self.episode_counter += 1
            ep = EpisodeRecord(msg.producer_id, msg.session, msg.suite, msg.task_id, msg.episode_id, split)
            state.open[msg.episode_id] = ep
            log.info(
                "episode %d of %s started (%s task %d, %s split)",
                msg.episode_id,
                msg.producer_id,
                msg.suite,
                msg.task_id,
                split,
            )
        hidden = msg.hidden.astype(np.float32)
        targets = self._targets(msg.codes[None])[0]  # [K, S]
        assert self.buffer is not None and self.valset is not None
        if ep.split == "valid":
            self.valset.insert(hidden, targets)
        else:
            while not self.limiter.await_insert(timeout=0.2):  # learner behind: hold the stream
                if self.stop.is_set() or self.learner_error is not None:
                    break
            self.buffer.insert(hidden, targets)
            self.limiter.inserted()
        ep.hidden.append(msg.hidden.copy())
        ep.codes.append(msg.codes.copy())
        ep.actions.append(msg.actions.copy())
        ep.steps.append(msg.step)
        ep.seqs.append(msg.seq)
        ep.sent_at.append(msg.sent_at)
        ep.received_at.append(now)
        if msg.obs is not None:
            ep.obs.append((msg.obs.agentview.copy(), msg.obs.wrist.copy(), msg.obs.proprio.copy()))
        st = self._stats(msg.producer_id)
        st.samples_received += 1
        st.accepted += 1
        self.accepted_total += 1
        self.first_sample_at = self.first_sample_at or now
        self.lags.append(now - msg.sent_at)

    def _archive(self, ep: EpisodeRecord) -> None:
        name = self.archive.write_episode(ep)
        if ep.actions:
            self.clamp.add(ep.producer_id, np.stack(ep.actions))
            self.archive.set_attr(clamp_attr, self.clamp.to_json())
        st = self._stats(ep.producer_id)
        st.archived += ep.num_samples
        st.episodes_archived += 1
        st.episodes_incomplete += ep.status == "incomplete"
        st.episodes_errored += ep.status == "errored"
        key = (ep.producer_id, ep.producer_session)
        self.archived[key] = max(self.archived.get(key, -1), ep.last_seq)
        log.info(
            "archived %s: %s task %d episode %d of %s, %d samples, %s (%s)",
            name,
            ep.suite,
            ep.task_id,
            ep.episode_id,
            ep.producer_id,
            ep.num_samples,
            ep.status,
            ep.split,
        )

    def _on_episode_end(self, sock: zmq.Socket, msg: wire.EpisodeEnd, state: ProducerState) -> None:
        ep = state.open.pop(msg.episode_id, None)
        if ep is None:  # an episode without samples (e.g. the policy failed on the first query)
            ep = EpisodeRecord(msg.producer_id, msg.session, msg.suite, msg.task_id, msg.episode_id, "train")
        ep.status, ep.num_steps, ep.end_seq = msg.status, msg.num_steps, msg.seq
        if msg.num_samples != ep.num_samples:
            log.warning(
                "%s episode %d: producer sent %d samples, %d arrived",
                msg.producer_id,
                msg.episode_id,
                msg.num_samples,
                ep.num_samples,
            )
        self._archive(ep)
        self._send_ack(sock, state.identity, state.producer_id, state.session)

    def _on_bye(self, msg: wire.Bye, state: ProducerState) -> None:
        st = self._stats(msg.producer_id)
        st.reported_sent = (st.reported_sent or 0) + msg.samples_sent
        st.reported_episodes = (st.reported_episodes or 0) + msg.episodes_sent
        if msg.seq > state.expected_seq:
            st.gaps += msg.seq - state.expected_seq
            st.gap_events += 1
        self._close_open(state, "incomplete")
        state.said_bye = True
        log.info(
            "bye from %s: %d samples, %d episodes sent", msg.producer_id, msg.samples_sent, msg.episodes_sent
        )

    def _close_open(self, state: ProducerState, status: str) -> None:
        for ep in list(state.open.values()):
            ep.status = status
            self._archive(ep)
        state.open.clear()

    def _check_timeouts(self, now: float) -> None:
        for state in self.producers.values():
            if state.open and now - state.last_seen > self.cfg.producer_timeout_s:
                log.warning(
                    "producer %s silent for %.0fs: closing its open episode as incomplete",
                    state.producer_id,
                    now - state.last_seen,
                )
                self._close_open(state, "incomplete")

    # ================================================================== learner thread
    def _learner_loop(self) -> None:
        try:
            torch.set_num_threads(self.cfg.threads)
            while not self.stop.is_set() and not self.model_ready.wait(0.2):
                pass
            learner, buffer = self.learner, self.buffer
            if learner is None or buffer is None:
                return
            bs = self.cfg.batch_size
            t_last, u_last = time.time(), learner.updates
            while not self.stop.is_set():
                if self.cfg.max_updates is not None and learner.updates >= self.cfg.max_updates:
                    self.stop.set()
                    break
                if not self.limiter.await_sample(bs, timeout=0.2):
                    continue
                hidden, targets = buffer.sample(bs)  # [B, D], [B, K, S]
                with self._learner_lock:
                    m = learner.train_step(hidden, targets)
                if learner.updates % self.cfg.log_interval == 0:
                    dt = time.time() - t_last
                    ups = (learner.updates - u_last) / max(dt, 1e-9)
                    t_last, u_last = time.time(), learner.updates
                    self.history.append(
                        {
                            "updates": learner.updates,
                            "loss": m["loss"],
                            "acc": m["accuracy"],
                            "lr": m["lr"],
                            "updates_per_s": ups,
                            "t": time.time() - self.t_start,
                        }
                    )
                    self._tb_scalars("train", m | {"updates_per_s": ups}, learner.updates)
                if learner.updates % self.cfg.val_interval == 0:
                    self._validate_and_save()
        except BaseException as exc:  # surfaced by the receiver loop, which then shuts down
            log.exception("learner thread failed")
            self.learner_error = exc
            self.limiter.close()

    def _tb_scalars(self, prefix: str, metrics: dict[str, Any], step: int) -> None:
        if self.tb is None:
            return
        for k, v in metrics.items():
            if isinstance(v, list):
                for i, x in enumerate(v):
                    self.tb.add_scalar(f"{prefix}/{k}/L{i}", x, step)
            elif isinstance(v, (int, float)):
                self.tb.add_scalar(f"{prefix}/{k}", v, step)

    def _validate_and_save(self) -> None:
        learner, valset = self.learner, self.valset
        if learner is None or valset is None:
            return
        hidden, targets = valset.all()
        with self._learner_lock:
            if len(hidden) == 0:
                log.info("update %d: no held-out samples yet; skipping validation", learner.updates)
                return
            r = learner.validate(hidden, targets)
            is_best = r.accuracy > learner.best_val
            if is_best:
                learner.best_val = r.accuracy
            config = {
                "run": config_to_dict(self.cfg),
                "source": "online",
                "backbone_id": self.archive.meta.get("backbone_id", ""),
                "codec_sha256": self.archive.meta.get("codec_sha256", ""),
                "val_samples": r.num_samples,
            }
            if is_best:
                learner.save(self.cfg.run_dir / "draft_best.pt", learner.updates, r.accuracy, config)
            learner.save(self.cfg.run_dir / "draft_last.pt", learner.updates, r.accuracy, config)
        self.last_val = {
            "updates": learner.updates,
            "val_loss": r.loss,
            "val_accuracy": r.accuracy,
            "val_acc_per_layer": r.acc_per_layer,
            "val_layer_exact": r.layer_exact,
            "val_samples": r.num_samples,
            "t": time.time() - self.t_start,
        }
        self.history.append(self.last_val)
        self._tb_scalars(
            "val", {"loss": r.loss, "accuracy": r.accuracy, "acc_per_layer": r.acc_per_layer}, learner.updates
        )
        log.info(
            "update %d: val acc %.4f (L0..L%d %s) on %d held-out samples%s",
            learner.updates,
            r.accuracy,
            len(r.acc_per_layer) - 1,
            " ".join(f"{a:.3f}" for a in r.acc_per_layer),
            r.num_samples,
            " [best]" if is_best else "",
        )

    # ================================================================== main loop
    def run(self) -> dict[str, Any]:
        cfg = self.cfg
        ctx = zmq.Context()
        auth = None
        sock = ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.RCVHWM, cfg.rcvhwm)
        sock.setsockopt(zmq.SNDHWM, 1000)
        sock.setsockopt(zmq.MAXMSGSIZE, self.limits.max_message_bytes)
        sock.setsockopt(zmq.LINGER, 0)
        if cfg.curve_dir is not None:
            auth = server_curve(ctx, sock, cfg.curve_dir)
        try:
            sock.bind(cfg.endpoint)
        except zmq.ZMQError as exc:
            sock.close(linger=0)
            if auth is not None:
                auth.stop()
            ctx.term()
            self._discard_unused()
            raise BindError(
                f"cannot listen on {cfg.endpoint}: {exc.strerror}. Another trainer may be running there: "
                "stop it, or use another port (make train ENDPOINT=tcp://127.0.0.1:5556, and the same "
                "ENDPOINT for make produce)"
            ) from None
        self.bound_endpoint = sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self.bound.set()
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(cfg.run_dir / "tb"))
        except Exception as exc:  # tensorboard missing: train anyway
            log.warning("TensorBoard logging off: %s", exc)
            self.tb = None
        log.info(
            "trainer %s listening on %s (run dir %s, device %s)",
            self.session,
            self.bound_endpoint,
            cfg.run_dir,
            self.device,
        )
        learner_thread = threading.Thread(target=self._learner_loop, name="learner", daemon=True)
        learner_thread.start()
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        progress = Progress(self)
        try:
            while not self.stop.is_set():
                if self.learner_error is not None:
                    raise RuntimeError("learner thread failed") from self.learner_error
                if cfg.max_runtime_s is not None and time.time() - self.t_start > cfg.max_runtime_s:
                    log.info("max runtime reached")
                    break
                if dict(poller.poll(100)).get(sock):
                    for _ in range(64):  # drain a burst, then look at the clocks again
                        try:
                            parts = sock.recv_multipart(flags=zmq.NOBLOCK, copy=False)
                        except zmq.Again:
                            break
                        self.handle(sock, parts[0].bytes, parts[1:])
                else:
                    self._check_timeouts(time.time())
                progress.update()
                byes = sum(1 for p in self.producers.values() if p.said_bye)
                if cfg.exit_after_byes is not None and byes >= cfg.exit_after_byes:
                    log.info("%d producer(s) said bye: finishing", byes)
                    break
        finally:
            self.stop.set()
            self.limiter.close()
            for state in self.producers.values():
                self._close_open(state, "incomplete")
            learner_thread.join(timeout=60)
            sock.close(linger=0)
            if auth is not None:
                auth.stop()
            ctx.term()
            progress.close()
        return self.finish()

    def _discard_unused(self) -> None:
        """The trainer never started: remove the empty archive and run dir that __init__ created."""
        if self.archive.created and self.archive.num_episodes == 0:
            self.archive.path.unlink(missing_ok=True)
        if self._made_run_dir:
            try:
                self.cfg.run_dir.rmdir()
            except OSError:  # not empty: keep it
                pass

    def finish(self) -> dict[str, Any]:
        if self.learner is not None and self.valset is not None and len(self.valset):
            if self.last_val is None or self.last_val["updates"] != self.learner.updates:
                self._validate_and_save()
        if self.tb is not None:
            self.tb.close()
        hist_file = self.cfg.run_dir / "history.jsonl"  # kept across restarts of the same run
        with open(hist_file, "a") as fh:
            for h in self.history:
                fh.write(json.dumps({**h, "trainer_session": self.session}) + "\n")
        history = [json.loads(line) for line in hist_file.read_text().splitlines() if line.strip()]
        if history:
            try:
                plot_curves(history, self.cfg.run_dir / "training_curve.png")
            except Exception as exc:
                log.warning("could not plot the training curve: %s", exc)
        summary = self.summary()
        (self.cfg.run_dir / "summary.json").write_text(json.dumps(summary, indent=2, sort_keys=True))
        print_summary(summary)
        return summary

    def summary(self) -> dict[str, Any]:
        elapsed = time.time() - self.t_start
        in_archive: dict[str, int] = {}
        for a in episode_attrs(self.archive.path):  # all sessions, also those before a restart
            in_archive[a["producer_id"]] = in_archive.get(a["producer_id"], 0) + int(a["num_samples"])
        stream_s = time.time() - (self.first_sample_at or time.time())
        lags = np.asarray(self.lags) if self.lags else np.zeros(1)
        return {
            "trainer_session": self.session,
            "elapsed_s": elapsed,
            "producers": {
                pid: {**vars(st), "in_archive": in_archive.get(pid, 0)}
                for pid, st in sorted(self.stats.items())
            },
            "rejected_unattributed": dict(self.unattributed),
            "accepted_total": self.accepted_total,
            "archive": {
                "path": str(self.archive.path),
                "episodes": self.archive.num_episodes,
                "samples": self.archive.total,
                "removed_partial_on_open": self.archive.removed_partial,
            },
            "updates": self.learner.updates if self.learner else 0,
            "samples_per_s": self.accepted_total / stream_s if stream_s > 0 else 0.0,
            "updates_per_s": (self.learner.updates / elapsed) if self.learner else 0.0,
            "lag_s": {
                "mean": float(lags.mean()),
                "p50": float(np.median(lags)),
                "p95": float(np.quantile(lags, 0.95)),
            },
            "rate_limiter": vars(self.limiter.stats),
            "last_validation": self.last_val,
            "best_val_accuracy": self.learner.best_val if self.learner else None,
            "action_clamping": self.clamp.to_dict(),
        }


def main(argv: list[str] | None = None) -> int:
    cfg = parse_config(TrainerConfig, argv, prog="python -m trainer.online")
    setup_logging("trainer")
    try:
        trainer = Trainer(cfg)
    except ArchiveError as exc:
        log.error("%s", exc)
        return 2

    def on_signal(signum: int, _frame: Any) -> None:
        log.info("%s: shutting down", signal.Signals(signum).name)
        trainer.stop.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    try:
        trainer.run()
    except BindError as exc:
        log.error("%s", exc)
        return 2
    finally:  # everything is saved: a late signal must not turn the clean exit into a kill (code -2)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
