"""The trainer's ROUTER socket (docs/DESIGN.md §7.1, §7.6): bind, receive in bursts, send, close.

Producers connect DEALER sockets: one-way data with high-water-mark backpressure (``rcvhwm`` messages
per producer), acks back on the same connection. With a CURVE key folder only authorized producers
get through (:mod:`common.curve`).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import zmq

from common.curve import server_curve

BURST = 64  # messages drained per poll before the caller looks at its clocks again


class BindError(RuntimeError):
    """The trainer cannot listen on its endpoint (e.g. the port is in use)."""


class Server:
    """One bound ROUTER socket, its context and (optionally) its CURVE authenticator."""

    def __init__(self, endpoint: str, curve_dir: Path | None, rcvhwm: int, max_message_bytes: int):
        self.ctx = zmq.Context()
        self.auth = None
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.RCVHWM, rcvhwm)
        self.sock.setsockopt(zmq.SNDHWM, 1000)
        self.sock.setsockopt(zmq.MAXMSGSIZE, max_message_bytes)
        self.sock.setsockopt(zmq.LINGER, 0)
        if curve_dir is not None:
            self.auth = server_curve(self.ctx, self.sock, curve_dir)
        try:
            self.sock.bind(endpoint)
        except zmq.ZMQError as exc:
            self.close()
            raise BindError(
                f"cannot listen on {endpoint}: {exc.strerror}. Another trainer may be running there: "
                "stop it, or use another port (make train ENDPOINT=tcp://127.0.0.1:5556, and the same "
                "ENDPOINT for make produce)"
            ) from None
        self.endpoint = self.sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self.poller = zmq.Poller()
        self.poller.register(self.sock, zmq.POLLIN)

    def receive(self, timeout_ms: int) -> Iterator[tuple[bytes, list[Any]]]:
        """Up to :data:`BURST` waiting messages as (producer identity, frames); none after ``timeout_ms``."""
        if not dict(self.poller.poll(timeout_ms)).get(self.sock):
            return
        for _ in range(BURST):
            try:
                parts = self.sock.recv_multipart(flags=zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            yield parts[0].bytes, parts[1:]

    def close(self) -> None:
        self.sock.close(linger=0)
        if self.auth is not None:
            self.auth.stop()
        self.ctx.term()
