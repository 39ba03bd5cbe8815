"""Reliable delivery from a producer to the trainer: DEALER socket, high-water marks, acks, resends.

Every data message (sample, episode_end) gets the next sequence number of this producer session and is
kept until the trainer acknowledges it as archived. Sends never drop: when the high-water mark is
reached, the sender waits (reading acks meanwhile), so a slow trainer slows the producer. An ack from a
trainer that does not know this session (``known=False``: it restarted) makes the sender say hello again
and resend everything not yet acknowledged; the trainer drops what it already has by sequence number.
An ack with ``error`` set means the trainer refuses this producer (e.g. another backbone): sending stops.

Once ``stop`` is set (Ctrl-C, SIGTERM) no send waits for the trainer any more: a message that finds the
queue full is kept as *unsent* and goes out, in order, during :meth:`ReliableSender.flush`, which waits
at most its timeout, or until ``abort`` is set (a second Ctrl-C). When no trainer answers (none running,
CURVE keys that do not match, a trainer that died) the sender warns after ``no_trainer_warn_s``.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import Any

import zmq

from common import wire
from common.curve import client_curve
from producer.config import ProducerConfig

log = logging.getLogger("producer.sender")


@dataclass
class SenderStats:
    samples_sent: int = 0  # handed to the sender (on the wire, or kept as unsent)
    episodes_sent: int = 0
    samples_acked: int = 0  # acknowledged by the trainer as archived
    episodes_acked: int = 0
    resent: int = 0
    acked_seq: int = -1
    trainer_sessions: int = 0
    blocked_s: float = 0.0
    hwm_waits: int = 0  # sends that found the high-water mark reached and had to wait


class TrainerRefused(RuntimeError):
    """The trainer refused this producer (its ack carried an error)."""


class ReliableSender:
    """DEALER socket + retransmission buffer of unacknowledged data messages."""

    def __init__(self, cfg: ProducerConfig, stop: threading.Event, abort: threading.Event | None = None):
        self.cfg = cfg
        self.stop = stop  # set: sends no longer wait for the trainer
        self.abort = abort or threading.Event()  # set: flush() no longer waits for acks either
        self.session = uuid.uuid4().hex[:16]
        self.seq = 0
        self.unacked: OrderedDict[int, list[bytes]] = OrderedDict()
        self.unacked_samples: set[int] = set()  # the sequence numbers in ``unacked`` that are samples
        self.unsent: deque[int] = deque()  # unacked messages that did not go out yet (stop was set)
        self._hello_unsent = False
        self._asked_at: float | None = None  # first request since the trainer last answered
        self._warned_at = 0.0
        self.stats = SenderStats()
        self.trainer_session: str | None = None
        self.hello: wire.Hello | None = None
        self._rehello_for: str | None = None
        self.refused = ""  # error text of a trainer that refuses this producer
        self._last_beat = 0.0
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.SNDHWM, cfg.sndhwm)
        self.sock.setsockopt(zmq.LINGER, 2000)
        self.sock.setsockopt(zmq.RECONNECT_IVL, 200)
        self.sock.setsockopt(zmq.RECONNECT_IVL_MAX, 2000)
        if cfg.curve_dir is not None:
            client_curve(self.sock, cfg.curve_dir)
        self.sock.connect(cfg.endpoint)

    # ---------------------------------------------------------------- sending
    def _send_frames(self, frames: list[Any], block: bool = True) -> bool:
        """Send; while the high-water mark is reached, keep reading acks (backpressure, never drop).

        Returns False, without sending, if the queue is full and ``block`` is off or ``stop`` is set."""
        t0 = time.perf_counter()
        while True:
            try:
                self.sock.send_multipart(frames, flags=zmq.NOBLOCK, copy=False)
                self.stats.blocked_s += time.perf_counter() - t0
                return True
            except zmq.Again:
                if not block or self.stop.is_set():
                    return False
                self.stats.hwm_waits += 1
                self.poll_acks(timeout_ms=100)
                self._maybe_heartbeat()
                self.check_trainer()

    def _send_in_order(self, seq: int, block: bool = True) -> None:
        """Send the data message ``seq`` unless earlier ones still wait; what cannot go now waits in order."""
        if seq not in self.unacked:  # acknowledged meanwhile (acks are read while a send waits)
            return
        if self.unsent or not self._send_frames(self.unacked[seq], block=block):
            self.unsent.append(seq)

    def send_hello(self, hello: wire.Hello) -> None:
        self.hello = hello
        self._asked_at = self._asked_at or time.time()
        self._hello_unsent = not self._send_frames(wire.encode(hello))

    def send_data(self, msg: wire.Sample | wire.EpisodeEnd) -> None:
        if self.refused:
            raise TrainerRefused(self.refused)
        # trainer not archiving: wait, do not drop (after a stop request, keep the message and go on)
        while len(self.unacked) >= self.cfg.max_unacked and not self.stop.is_set():
            self.poll_acks(timeout_ms=200)
            self._maybe_heartbeat(force=True)
            self.check_trainer()
        msg.seq = self.seq
        self.seq += 1
        frames = [bytes(f) for f in wire.encode(msg)]  # owned copies: may be resent later
        self.unacked[msg.seq] = frames
        if isinstance(msg, wire.Sample):
            self.unacked_samples.add(msg.seq)
            self.stats.samples_sent += 1
        else:
            self.stats.episodes_sent += 1
        self._send_in_order(msg.seq)
        self.poll_acks()
        self._maybe_heartbeat()
        self.check_trainer()

    def _send_unsent(self) -> None:
        """Send what a stop request left unsent, in order, without waiting for room in the queue."""
        if self._hello_unsent and self.hello is not None:
            self._hello_unsent = not self._send_frames(wire.encode(self.hello), block=False)
            if self._hello_unsent:
                return
        while self.unsent:
            seq = self.unsent[0]
            if seq in self.unacked and not self._send_frames(self.unacked[seq], block=False):
                return
            self.unsent.popleft()

    def check_trainer(self) -> None:
        """Warn when the trainer does not answer although it was asked (hello, heartbeats)."""
        now = time.time()
        if self._asked_at is None or now - self._warned_at < 6 * self.cfg.no_trainer_warn_s:
            return  # (repeated every 6 x no_trainer_warn_s while it lasts)
        silent = now - self._asked_at
        if self.trainer_session is None and silent >= self.cfg.no_trainer_warn_s:
            self._warned_at = now
            log.warning(
                "no trainer has answered at %s for %.0f s; %d message(s) wait unacknowledged (%d samples). "
                "Is `make train` running at this endpoint?%s Nothing is lost while this producer runs "
                "(up to --max-unacked %d messages), but what is unacknowledged at exit is not delivered",
                self.cfg.endpoint,
                silent,
                len(self.unacked),
                len(self.unacked_samples),
                " Do the CURVE keys in --curve-dir match the trainer's?" if self.cfg.curve_dir else "",
                self.cfg.max_unacked,
            )
        elif self.trainer_session is not None and silent >= 6 * self.cfg.no_trainer_warn_s:
            self._warned_at = now
            log.warning(
                "trainer session %s has not answered for %.0f s; %d message(s) unacknowledged. A busy trainer "
                "holds the stream back; a restarted one is found again on its own",
                self.trainer_session,
                silent,
                len(self.unacked),
            )

    def _maybe_heartbeat(self, force: bool = False) -> None:
        now = time.time()
        if force and now - self._last_beat < 0.5:
            return
        if force or now - self._last_beat >= self.cfg.heartbeat_s:
            self._last_beat = now
            beat = wire.Heartbeat(self.cfg.producer_id, self.session, self.seq)
            self._asked_at = self._asked_at or now
            self._send_frames(wire.encode(beat), block=False)  # a full queue already says we are alive

    # ---------------------------------------------------------------- acks
    def poll_acks(self, timeout_ms: int = 0) -> None:
        if not self.sock.poll(timeout_ms, zmq.POLLIN):
            return
        while True:
            try:
                frames = self.sock.recv_multipart(flags=zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                ack = wire.decode(frames)
            except wire.WireError as exc:
                log.warning("ignoring malformed message from the trainer: %s", exc)
                continue
            if isinstance(ack, wire.Ack) and ack.producer_session == self.session:
                self._on_ack(ack)

    def _on_ack(self, ack: wire.Ack) -> None:
        self._asked_at = None
        if ack.error:
            if not self.refused:
                log.error("%s", ack.error)
            self.refused = ack.error
            self.stop.set()
            return
        for seq in [s for s in self.unacked if s <= ack.archived_seq]:
            del self.unacked[seq]
            if seq in self.unacked_samples:
                self.unacked_samples.discard(seq)
                self.stats.samples_acked += 1
            else:
                self.stats.episodes_acked += 1
        self.stats.acked_seq = max(self.stats.acked_seq, ack.archived_seq)
        if ack.trainer_session != self.trainer_session:
            self.trainer_session = ack.trainer_session
            self.stats.trainer_sessions += 1
            log.info("connected to trainer session %s", ack.trainer_session)
        if ack.known or self._rehello_for == ack.trainer_session:
            return
        # this trainer has not seen our hello (it restarted): hello again, then resend what is not on disk
        self._rehello_for = ack.trainer_session
        log.warning(
            "trainer %s does not know this producer: resending hello and %d unacknowledged message(s) after seq %d",
            ack.trainer_session,
            len(self.unacked),
            ack.archived_seq,
        )
        if self.hello is not None:
            self.hello.seq = self.seq
            self._hello_unsent = not self._send_frames(wire.encode(self.hello))
        self.unsent.clear()  # everything unacknowledged goes again, in order
        for seq in list(self.unacked):
            self._send_in_order(seq)
            self.stats.resent += 1

    def flush(self, timeout_s: float) -> bool:
        """Send what is unsent and wait until every data message is acknowledged, at most ``timeout_s``
        (less if ``abort`` is set). Returns whether all were."""
        deadline = time.time() + timeout_s
        if self.unacked and not self.refused and not self.abort.is_set():
            log.info(
                "waiting up to %.0f s for the trainer to acknowledge %d message(s) (Ctrl-C again: stop waiting)",
                timeout_s,
                len(self.unacked),
            )
        while self.unacked and time.time() < deadline and not self.refused and not self.abort.is_set():
            self._send_unsent()
            self.poll_acks(timeout_ms=200)
            self._maybe_heartbeat(force=True)
            self.check_trainer()
        return not self.unacked

    def bye(self) -> None:
        msg = wire.Bye(
            self.cfg.producer_id, self.session, self.seq, self.stats.samples_sent, self.stats.episodes_sent
        )
        self._send_frames(wire.encode(msg), block=False)

    def close(self) -> None:
        self.sock.close(linger=1000)
        self.ctx.term()
