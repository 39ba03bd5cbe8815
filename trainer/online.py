"""``make train``: receive samples from producers, archive them, train the draft online (docs/DESIGN.md §2.3, §5, §7.5).

One process, two threads:

* the **receiver** (main thread, this module's loop) owns the ROUTER socket (:mod:`trainer.server`) and
  hands every message to the delivery protocol (:mod:`trainer.delivery`: decoding and validation,
  rejections, sessions, duplicates, gaps, acks). Accepted samples go into the replay buffer (train
  episodes) or the validation set (every ``valid_every``-th episode, held out whole); each finished
  episode is written to the HDF5 archive and acknowledged to its producer;
* the **learner** thread (:mod:`trainer.learning`) samples batches under a samples-per-insert rate
  limit and trains the draft, validates every ``val_interval`` updates, saves ``draft_best.pt`` /
  ``draft_last.pt`` (:mod:`trainer.checkpoints`); TensorBoard, the curve and the summary are in
  :mod:`trainer.report`.

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
import threading
import time
import uuid
from typing import Any

import numpy as np
import torch

from common import wire
from common.archive import ArchiveError, ArchiveWriter, EpisodeRecord, archived_seqs, episode_attrs
from common.cli import config_to_dict, parse_config
from common.draft import coarse_targets
from common.logs import setup_logging
from common.shapes import DEFAULT_SHAPE, RFSQShape
from common.shutdown import stop_on_signals
from trainer.clamp import ATTR as clamp_attr
from trainer.clamp import ClampStats
from trainer.config import TrainerConfig
from trainer.delivery import Delivery
from trainer.learning import OnlineLearning
from trainer.report import Progress, Scalars, build_summary, print_summary, save_history
from trainer.server import BindError, Server

log = logging.getLogger("trainer.online")

__all__ = ["BindError", "Trainer", "TrainerConfig", "main"]

POLL_MS = 100


class Trainer:
    """The trainer process: archive, delivery protocol, learning; :meth:`run` is the receive loop.

    It is the delivery protocol's sink (:class:`trainer.delivery.Sink`): it admits producers against
    the archive's provenance, assigns episodes to splits, feeds samples to the learner and writes
    finished episodes to the archive."""

    def __init__(self, cfg: TrainerConfig, shape: RFSQShape = DEFAULT_SHAPE):
        self.cfg = cfg
        self.shape = shape
        self.session = uuid.uuid4().hex[:16]
        self.stop = threading.Event()
        self.t_start = time.time()
        self.bound = threading.Event()
        self.bound_endpoint = ""
        self._made_run_dir = not cfg.run_dir.exists()
        cfg.run_dir.mkdir(parents=True, exist_ok=True)
        self.archive = ArchiveWriter(cfg.run_dir / "archive.hdf5", shape, trainer_config=config_to_dict(cfg))
        self.episode_counter = self.archive.num_episodes  # decides train/valid split of new episodes
        self.hidden_dim: int = int(self.archive.meta.get("hidden_dim", 0))
        if cfg.input_dim and self.hidden_dim and cfg.input_dim != self.hidden_dim:
            raise ValueError(f"--input-dim {cfg.input_dim} != the archive's hidden_dim {self.hidden_dim}")
        self.hidden_dim = self.hidden_dim or cfg.input_dim or 0
        self.clamp = ClampStats(self.archive.meta.get(clamp_attr))
        limits = wire.WireLimits(shape=shape)
        archived = archived_seqs(self.archive.path)  # (pid, session) -> highest seq on disk
        self.delivery = Delivery(self.session, limits, archived, self, cfg.producer_timeout_s)
        self.scalars = Scalars()
        if cfg.device == "auto":
            self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        else:
            self.device = torch.device(cfg.device)
        self.learning = OnlineLearning(
            cfg, shape, self.device, self.stop, self.scalars, lambda: self.archive.meta, self.t_start
        )
        if self.hidden_dim:
            self._setup_model(self.hidden_dim)

    def _setup_model(self, hidden_dim: int) -> None:
        self.hidden_dim = hidden_dim
        refill = self.cfg.resume and self.archive.total
        self.learning.setup(hidden_dim, self.archive.path if refill else None)

    # ================================================================== the delivery protocol's sink
    def admit(self, hello: wire.Hello) -> str | None:
        if self.hidden_dim and hello.hidden_dim != self.hidden_dim:  # before provenance: nothing recorded
            return f"hidden size {hello.hidden_dim} != this run's {self.hidden_dim}"
        return self.archive.set_provenance(
            backbone_id=hello.backbone_id,
            hidden_dim=hello.hidden_dim,
            codec_sha256=hello.codec_sha256,
            producer_id=hello.producer_id,
            producer_config=hello.config_json,
        )

    def registered(self, hello: wire.Hello) -> None:
        if not self.hidden_dim:
            self._setup_model(hello.hidden_dim)
        self.clamp.on_hello(hello.producer_id, hello.config_json)

    def new_split(self) -> str:
        split = "valid" if self.episode_counter % self.cfg.valid_every == 0 else "train"
        self.episode_counter += 1
        return split

    def insert(self, msg: wire.Sample, split: str) -> None:
        hidden = msg.hidden.astype(np.float32)
        targets = coarse_targets(msg.codes[None], self.shape.num_coarse_layers)[0]  # [K, S]
        self.learning.insert(hidden, targets, held_out=split == "valid")

    def write(self, ep: EpisodeRecord) -> str:
        name = self.archive.write_episode(ep)
        if ep.actions:
            self.clamp.add(ep.producer_id, np.stack(ep.actions))
            self.archive.set_attr(clamp_attr, self.clamp.to_json())
        return name

    # ================================================================== main loop
    def run(self) -> dict[str, Any]:
        """Receive until stopped (signal, ``max_updates``, ``max_runtime_s``, ``exit_after_byes``), then
        :meth:`finish`. Raises :class:`BindError` (leaving no empty run dir behind) if it cannot listen."""
        cfg = self.cfg
        try:
            server = Server(cfg.endpoint, cfg.curve_dir, cfg.rcvhwm, self.delivery.limits.max_message_bytes)
        except BindError:
            self._discard_unused()
            raise
        self.bound_endpoint = server.endpoint
        self.bound.set()
        self.scalars.open(cfg.run_dir / "tb")
        log.info(
            "trainer %s listening on %s (run dir %s, device %s)",
            self.session,
            self.bound_endpoint,
            cfg.run_dir,
            self.device,
        )
        learner_thread = threading.Thread(target=self.learning.run, name="learner", daemon=True)
        learner_thread.start()
        progress = Progress(self)
        try:
            self._receive(server, progress)
        finally:
            self.stop.set()
            self.learning.limiter.close()
            self.delivery.close_all("incomplete")
            learner_thread.join(timeout=60)
            server.close()
            progress.close()
        return self.finish()

    def _receive(self, server: Server, progress: Progress) -> None:
        cfg = self.cfg
        while not self.stop.is_set():
            if self.learning.error is not None:
                raise RuntimeError("learner thread failed") from self.learning.error
            if cfg.max_runtime_s is not None and time.time() - self.t_start > cfg.max_runtime_s:
                log.info("max runtime reached")
                return
            received = False
            for identity, frames in server.receive(POLL_MS):
                received = True
                self.delivery.handle(server.sock, identity, frames)
            if not received:
                self.delivery.check_timeouts(time.time())
            progress.update()
            byes = self.delivery.byes
            if cfg.exit_after_byes is not None and byes >= cfg.exit_after_byes:
                log.info("%d producer(s) said bye: finishing", byes)
                return

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
        """Last validation and checkpoints, history and curve, ``summary.json`` and the printed summary."""
        self.learning.finish()
        self.scalars.close()
        save_history(self.learning.history, self.cfg.run_dir, self.session)
        summary = self.summary()
        (self.cfg.run_dir / "summary.json").write_text(json.dumps(summary, indent=2, sort_keys=True))
        print_summary(summary)
        return summary

    def summary(self) -> dict[str, Any]:
        in_archive: dict[str, int] = {}
        for a in episode_attrs(self.archive.path):  # all sessions, also those before a restart
            in_archive[a["producer_id"]] = in_archive.get(a["producer_id"], 0) + int(a["num_samples"])
        return build_summary(self, in_archive)


def main(argv: list[str] | None = None) -> int:
    cfg = parse_config(TrainerConfig, argv, prog="python -m trainer.online")
    setup_logging("trainer")
    try:
        trainer = Trainer(cfg)
    except ArchiveError as exc:
        log.error("%s", exc)
        return 2
    with stop_on_signals(trainer.stop, log, "shutting down"):  # ignored once run() has saved everything
        try:
            trainer.run()
        except BindError as exc:
            log.error("%s", exc)
            return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
