"""Reliable delivery from a producer to the trainer: DEALER socket, high-water marks, acks, resends.

Every data message (sample, episode_end) gets the next sequence number of this producer session and is
kept until the trainer acknowledges it as archived. Sends never drop: when the high-water mark is
reached, the sender waits (reading acks meanwhile), so a slow trainer slows the producer. An ack from a
trainer that does not know this session (``known=False``: it restarted) makes the sender say hello again
and resend everything not yet acknowledged; the trainer drops what it already has by sequence number.
An ack with ``error`` set means the trainer refuses this producer (e.g. another backbone): sending stops.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import zmq

from common import wire
from common.curve import client_curve

if TYPE_CHECKING:
    from producer.produce import ProducerConfig

log = logging.getLogger("producer.sender")


@dataclass
class SenderStats:
    samples_sent: int = 0
    episodes_sent: int = 0
    resent: int = 0
    acked_seq: int = -1
    trainer_sessions: int = 0
    blocked_s: float = 0.0
    hwm_waits: int = 0  # sends that found the high-water mark reached and had to wait


class TrainerRefused(RuntimeError):
    """The trainer refused this producer (its ack carried an error)."""


class ReliableSender:
    """DEALER socket + retransmission buffer of unacknowledged data messages."""

    def __init__(self, cfg: ProducerConfig, stop: threading.Event):
        self.cfg = cfg
        self.stop = stop
        self.session = uuid.uuid4().hex[:16]
        self.seq = 0
        self.unacked: OrderedDict[int, list[bytes]] = OrderedDict()
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
        """Send; while the high-water mark is reached, keep reading acks (backpressure, never drop)."""
        t0 = time.perf_counter()
        while True:
            try:
                self.sock.send_multipart(frames, flags=zmq.NOBLOCK, copy=False)
                self.stats.blocked_s += time.perf_counter() - t0
                return True
            except zmq.Again:
                if not block:
                    return False
                self.stats.hwm_waits += 1
                self.poll_acks(timeout_ms=100)
                self._maybe_heartbeat()

    def send_hello(self, hello: wire.Hello) -> None:
        self.hello = hello
        self._send_frames(wire.encode(hello))

    def send_data(self, msg: wire.Sample | wire.EpisodeEnd) -> None:
        if self.refused:
            raise TrainerRefused(self.refused)
        while len(self.unacked) >= self.cfg.max_unacked:  # trainer not archiving: wait, do not drop
            self.poll_acks(timeout_ms=200)
            self._maybe_heartbeat(force=True)
        msg.seq = self.seq
        self.seq += 1
        frames = [bytes(f) for f in wire.encode(msg)]  # owned copies: may be resent later
        self.unacked[msg.seq] = frames
        self._send_frames(frames)
        self.poll_acks()
        if isinstance(msg, wire.Sample):
            self.stats.samples_sent += 1
        else:
            self.stats.episodes_sent += 1
        self._maybe_heartbeat()

    def _maybe_heartbeat(self, force: bool = False) -> None:
        now = time.time()
        if force and now - self._last_beat < 0.5:
            return
        if force or now - self._last_beat >= self.cfg.heartbeat_s:
            self._last_beat = now
            beat = wire.Heartbeat(self.cfg.producer_id, self.session, self.seq)
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
        if ack.error:
            if not self.refused:
                log.error("%s", ack.error)
            self.refused = ack.error
            self.stop.set()
            return
        for seq in [s for s in self.unacked if s <= ack.archived_seq]:
            del self.unacked[seq]
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
            self._send_frames(wire.encode(self.hello))
        for frames in list(self.unacked.values()):
            self._send_frames(frames)
            self.stats.resent += 1

    def flush(self, timeout_s: float) -> bool:
        """Wait until every data message is acknowledged (or timeout). Returns whether all were."""
        deadline = time.time() + timeout_s
        while self.unacked and time.time() < deadline and not self.refused:
            self.poll_acks(timeout_ms=200)
            self._maybe_heartbeat(force=True)
        return not self.unacked

    def bye(self) -> None:
        msg = wire.Bye(
            self.cfg.producer_id, self.session, self.seq, self.stats.samples_sent, self.stats.episodes_sent
        )
        self._send_frames(wire.encode(msg), block=False)

    def close(self) -> None:
        self.sock.close(linger=1000)
        self.ctx.term()
