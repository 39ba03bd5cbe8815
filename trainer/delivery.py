"""The receiver's half of the delivery protocol (docs/DESIGN.md §7.5): sessions, sequence numbers, acks.

Guarantee: every data message of a live producer is archived exactly once (at-least-once delivery by
the producer, deduplication here), and an ack means "on disk".

* One current session per producer id. A hello is admitted by the :class:`Sink` (provenance: backbone,
  hidden size, codec) or refused with an ack carrying ``error``; an admitted hello registers the
  session with ``expected_seq`` = its highest archived seq + 1. A new session of a known id closes the
  old session's open episodes as ``incomplete``.
* A data message from an unregistered session is rejected (``no_hello``); a heartbeat from one gets an
  ack with ``known = false`` (the producer says hello again and resends what is not acknowledged).
* Every check first, then the sequence accounting: ``seq < expected`` is a duplicate (dropped),
  ``seq > expected`` a gap of ``seq - expected`` (counted, the message accepted); then
  ``expected = seq + 1``. A rejected message changes no sequence state and no gap counter.
* Samples are assembled into episodes; ``episode_end`` hands the episode to the sink, which archives
  it, and the producer gets an ack naming the highest seq archived for its session. Acks also answer
  hello and heartbeat. A producer silent for ``timeout_s`` has its open episodes archived ``incomplete``.
* Every decode failure of any kind is a counted, logged rejection (per producer when its id can be
  read, else unattributed); nothing a producer sends can end the receive loop.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

import msgpack
import numpy as np
import zmq

from common import wire
from common.archive import EpisodeRecord
from trainer.report import ProducerStats

log = logging.getLogger(__name__)

LOG_FIRST_REJECTS = 20  # rejections logged one by one; after that every 100th


class Sink(Protocol):
    """Where delivered data goes (the online trainer: its buffers, draft learner and archive)."""

    def admit(self, hello: wire.Hello) -> str | None:
        """Check a hello's provenance; an error text refuses the producer (nothing is recorded then)."""

    def registered(self, hello: wire.Hello) -> None:
        """A producer's hello was admitted and its session registered."""

    def new_split(self) -> str:
        """The split ("train" or "valid") of an episode that starts now."""

    def insert(self, msg: wire.Sample, split: str) -> None:
        """One accepted sample of an episode of ``split`` (may wait: flow control, §7.6)."""

    def write(self, ep: EpisodeRecord) -> str:
        """Archive one finished episode durably; returns its name in the archive."""


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


class Delivery:
    """Session, sequence and ack state of every producer, and the per-producer accounting."""

    def __init__(
        self,
        session: str,
        limits: wire.WireLimits,
        archived: dict[tuple[str, str], int],
        sink: Sink,
        timeout_s: float,
    ):
        self.session = session  # this trainer's session id, sent in every ack
        self.limits = limits
        self.archived = archived  # (pid, producer session) -> highest seq on disk
        self.sink = sink
        self.timeout_s = timeout_s
        self.producers: dict[str, ProducerState] = {}
        self.stats: dict[str, ProducerStats] = {}
        self.unattributed: dict[str, int] = {}  # rejections whose producer id cannot be read
        self.accepted_total = 0
        self.first_sample_at: float | None = None
        self.lags: list[float] = []  # receive time - send time of every accepted sample

    # ------------------------------------------------------------------ accounting
    def _stats(self, pid: str) -> ProducerStats:
        if pid not in self.stats:
            self.stats[pid] = ProducerStats()
        return self.stats[pid]

    @property
    def byes(self) -> int:
        """Producers whose current session said bye."""
        return sum(1 for p in self.producers.values() if p.said_bye)

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
        if total <= LOG_FIRST_REJECTS or total % 100 == 0:
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

    # ------------------------------------------------------------------ one message
    def handle(self, sock: zmq.Socket, identity: bytes, frames: list[Any]) -> None:
        """Decode, check and deliver one message from the producer connected as ``identity``."""
        now = time.time()
        msg = self._decode(frames)
        if msg is None:
            return
        pid = msg.producer_id
        self._stats(pid).received += 1
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
        elif isinstance(msg, wire.Bye):
            self._on_bye(msg, state)
        elif self._in_sequence(msg, state):
            if isinstance(msg, wire.Sample):
                self._on_sample(msg, state, now)
            else:
                self._on_episode_end(sock, msg, state)

    def _decode(self, frames: list[Any]) -> wire.Message | None:
        try:
            return wire.decode(frames, self.limits)
        except Exception as exc:  # WireError; anything else (a decoder defect) is a rejection all the same
            pid = self._peek_pid(frames)
            if pid is not None:
                self._stats(pid).received += 1
            if isinstance(exc, wire.WireError):
                self._reject(exc.reason, str(exc), pid)
            else:
                log.debug("decoder failed on a message from %s", pid or "?", exc_info=exc)
                self._reject("malformed", f"undecodable message: {type(exc).__name__}: {exc}", pid)
            return None

    def _in_sequence(self, msg: wire.Sample | wire.EpisodeEnd, state: ProducerState) -> bool:
        """Every check of a data message first, then the sequence accounting; False: dropped."""
        pid = msg.producer_id
        if isinstance(msg, wire.Sample) and msg.hidden.shape[0] != state.hello.hidden_dim:
            self._reject(
                "shape", f"hidden [{msg.hidden.shape[0]}] != hello's D={state.hello.hidden_dim}", pid
            )
            return False
        if msg.seq < state.expected_seq:
            self._reject("duplicate", f"seq {msg.seq} < expected {state.expected_seq}", pid)
            return False
        if msg.seq > state.expected_seq:
            missing = msg.seq - state.expected_seq
            st = self._stats(pid)
            st.gaps += missing
            st.gap_events += 1
            log.warning(
                "producer %s: sequence gap, %d message(s) missing before seq %d", pid, missing, msg.seq
            )
        state.expected_seq = msg.seq + 1
        return True

    # ------------------------------------------------------------------ by kind
    def _on_hello(self, sock: zmq.Socket, identity: bytes, msg: wire.Hello, now: float) -> None:
        pid = msg.producer_id
        err = self.sink.admit(msg)
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
                self.close_open(old, "incomplete")
            self._stats(pid).sessions += 1
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
        self.sink.registered(msg)
        self._send_ack(sock, identity, pid, msg.session)

    def _on_sample(self, msg: wire.Sample, state: ProducerState, now: float) -> None:
        ep = state.open.get(msg.episode_id)
        if ep is None:
            split = self.sink.new_split()
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
        self.sink.insert(msg, ep.split)
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
        self.close_open(state, "incomplete")
        state.said_bye = True
        log.info(
            "bye from %s: %d samples, %d episodes sent", msg.producer_id, msg.samples_sent, msg.episodes_sent
        )

    # ------------------------------------------------------------------ episodes
    def _archive(self, ep: EpisodeRecord) -> None:
        name = self.sink.write(ep)
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

    def close_open(self, state: ProducerState, status: str) -> None:
        """Archive a producer's open episodes with ``status`` (it restarted, said bye or went silent)."""
        for ep in list(state.open.values()):
            ep.status = status
            self._archive(ep)
        state.open.clear()

    def close_all(self, status: str) -> None:
        for state in self.producers.values():
            self.close_open(state, status)

    def check_timeouts(self, now: float) -> None:
        for state in self.producers.values():
            if state.open and now - state.last_seen > self.timeout_s:
                log.warning(
                    "producer %s silent for %.0fs: closing its open episode as incomplete",
                    state.producer_id,
                    now - state.last_seen,
                )
                self.close_open(state, "incomplete")

    def lag_quantiles(self) -> dict[str, float]:
        lags = np.asarray(self.lags) if self.lags else np.zeros(1)
        return {
            "mean": float(lags.mean()),
            "p50": float(np.median(lags)),
            "p95": float(np.quantile(lags, 0.95)),
        }
