"""The learning half of ``make train`` (docs/DESIGN.md §5, §7.6): buffers, draft learner, learner thread.

Accepted samples go into the replay buffer (train episodes) or the held-out set (every
``valid_every``-th episode, held out whole). The learner thread samples batches under a
samples-per-insert rate limit (:class:`trainer.buffer.RateLimiter`: the learner waits when it would
reuse data too often, the receiver waits, and so the producers, when the learner falls behind),
trains the draft, logs every ``log_interval`` updates and validates every ``val_interval`` updates,
writing the checkpoints (:mod:`trainer.checkpoints`).

The model is built once the hidden size is known (``--input-dim``, the archive, or the first
producer's hello); a restart in the same run dir resumes from ``draft_last.pt`` and refills the buffers
from the archive.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from common.archive import iter_episodes
from common.cli import config_to_dict
from common.draft import coarse_targets
from common.shapes import RFSQShape
from trainer import checkpoints
from trainer.buffer import RateLimiter, ReplayBuffer
from trainer.config import TrainerConfig
from trainer.learner import Learner
from trainer.report import Scalars

log = logging.getLogger(__name__)

WAIT_S = 0.2  # how long a blocked thread waits before it looks at the stop flag again


class OnlineLearning:
    """Replay buffer, held-out set, draft learner and the loop of the learner thread."""

    def __init__(
        self,
        cfg: TrainerConfig,
        shape: RFSQShape,
        device: torch.device,
        stop: threading.Event,
        scalars: Scalars,
        provenance: Callable[[], dict[str, Any]],
        t_start: float,
    ):
        self.cfg, self.shape, self.device, self.stop = cfg, shape, device, stop
        self.scalars = scalars
        self.provenance = provenance  # the archive's attributes (backbone id, codec) at checkpoint time
        self.t_start = t_start
        self.limiter = RateLimiter(cfg.samples_per_insert, cfg.min_size, cfg.error_buffer)
        self.buffer: ReplayBuffer | None = None
        self.valset: ReplayBuffer | None = None
        self.learner: Learner | None = None
        self.ready = threading.Event()  # set once the model and buffers exist
        self.history: list[dict[str, Any]] = []
        self.last_val: dict[str, Any] | None = None
        self.error: BaseException | None = None  # the learner thread's failure, raised by the receiver
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ setup
    def setup(self, hidden_dim: int, refill_from: Path | None) -> None:
        """Build buffers and learner for ``hidden_dim``, resume from the run dir's last checkpoint and
        refill the buffers from the archive ``refill_from`` (None: start empty)."""
        cfg, s = self.cfg, self.shape
        S = s.tokens_per_layer
        self.buffer = ReplayBuffer(cfg.capacity, hidden_dim, s.num_coarse_layers, S, seed=cfg.seed)
        self.valset = ReplayBuffer(cfg.val_capacity, hidden_dim, s.num_coarse_layers, S, seed=cfg.seed + 1)
        torch.manual_seed(cfg.seed)
        self.learner = Learner(hidden_dim, s, cfg.optim(), device=self.device)
        if cfg.resume:
            checkpoints.resume(self.learner, cfg.run_dir)
        if refill_from is not None:
            self._refill(refill_from)
        self.ready.set()

    def _refill(self, archive: Path) -> None:
        assert self.buffer is not None and self.valset is not None
        n_train = n_val = 0
        for ep in iter_episodes(archive):
            targets = coarse_targets(ep.codes, self.shape.num_coarse_layers)  # [n, K, S]
            held_out = ep.attrs["split"] == "valid"
            store = self.valset if held_out else self.buffer
            for h, t in zip(ep.hidden, targets, strict=True):
                store.insert(h, t)
            if held_out:
                n_val += len(targets)
            else:
                n_train += len(targets)
        # refilled samples count as inserted and already consumed: no burst of re-training on them
        self.limiter.inserted(n_train)
        self.limiter.stats.samples = int(n_train * self.cfg.samples_per_insert)
        log.info("refilled replay buffer from archive: %d train, %d validation samples", n_train, n_val)

    # ------------------------------------------------------------------ receiver side
    def insert(self, hidden: np.ndarray, targets: np.ndarray, held_out: bool) -> None:
        """One sample into the held-out set, or into the replay buffer once the rate limiter allows."""
        assert self.buffer is not None and self.valset is not None
        if held_out:
            self.valset.insert(hidden, targets)
            return
        while not self.limiter.await_insert(timeout=WAIT_S):  # learner behind: hold the stream
            if self.stop.is_set() or self.error is not None:
                break
        self.buffer.insert(hidden, targets)
        self.limiter.inserted()

    # ------------------------------------------------------------------ learner thread
    def run(self) -> None:
        """The learner thread: train until ``stop`` (or ``max_updates``); a failure is kept in ``error``."""
        try:
            torch.set_num_threads(self.cfg.threads)
            while not self.stop.is_set() and not self.ready.wait(WAIT_S):
                pass
            if self.learner is not None and self.buffer is not None:
                self._train(self.learner, self.buffer)
        except BaseException as exc:  # surfaced by the receiver loop, which then shuts down
            log.exception("learner thread failed")
            self.error = exc
            self.limiter.close()

    def _train(self, learner: Learner, buffer: ReplayBuffer) -> None:
        cfg = self.cfg
        t_last, u_last = time.time(), learner.updates
        while not self.stop.is_set():
            if cfg.max_updates is not None and learner.updates >= cfg.max_updates:
                self.stop.set()
                break
            if not self.limiter.await_sample(cfg.batch_size, timeout=WAIT_S):
                continue
            hidden, targets = buffer.sample(cfg.batch_size)  # [B, D], [B, K, S]
            with self._lock:
                m = learner.train_step(hidden, targets)
            if learner.updates % cfg.log_interval == 0:
                ups = (learner.updates - u_last) / max(time.time() - t_last, 1e-9)
                t_last, u_last = time.time(), learner.updates
                self._log_train(learner.updates, m, ups)
            if learner.updates % cfg.val_interval == 0:
                self.validate_and_save()

    def _log_train(self, updates: int, m: dict[str, Any], ups: float) -> None:
        self.history.append(
            {
                "updates": updates,
                "loss": m["loss"],
                "acc": m["accuracy"],
                "lr": m["lr"],
                "updates_per_s": ups,
                "t": time.time() - self.t_start,
            }
        )
        self.scalars.add("train", m | {"updates_per_s": ups}, updates)

    # ------------------------------------------------------------------ validation
    def validate_and_save(self) -> None:
        """Validate on the held-out set and write the checkpoints (nothing while it is empty)."""
        learner, valset = self.learner, self.valset
        if learner is None or valset is None:
            return
        hidden, targets = valset.all()
        with self._lock:
            if len(hidden) == 0:
                log.info("update %d: no held-out samples yet; skipping validation", learner.updates)
                return
            r = learner.validate(hidden, targets)
            config = checkpoints.run_config(config_to_dict(self.cfg), self.provenance(), r.num_samples)
            is_best = checkpoints.save_validated(learner, self.cfg.run_dir, r.accuracy, config)
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
        self.scalars.add(
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

    def finish(self) -> None:
        """A last validation and checkpoint, unless the last one was at this very update."""
        if self.learner is not None and self.valset is not None and len(self.valset):
            if self.last_val is None or self.last_val["updates"] != self.learner.updates:
                self.validate_and_save()
