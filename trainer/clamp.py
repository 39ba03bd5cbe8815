"""How often the producers' action values fall outside their codec's normalization bounds.

The codec clamps normalized actions to [-1, 1] (``common.codec.RFSQCodec.normalize``): a value outside
[low, high] of its dimension is encoded as the bound. Each producer's hello carries its codec's bounds
(``codec_bounds`` in its config JSON); the trainer counts, per action dimension, the archived values
outside them. The counts are cumulative over every session of a run: they are stored in the archive's
``data`` attribute ``action_clamping`` (JSON) after each episode and reloaded on restart, and they are
in the trainer's summary.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

ATTR = "action_clamping"


class ClampStats:
    """Per-dimension counts of action values outside the sending producer's codec bounds."""

    def __init__(self, prior: str | bytes | None = None):
        self.bounds: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self.values = 0  # values seen per dimension
        self.clamped: np.ndarray | None = None  # [A] counts
        if prior:
            d = json.loads(prior)
            self.values = int(d.get("values_per_dim", 0))
            self.clamped = np.asarray(d.get("clamped", []), np.int64) if d.get("clamped") else None

    def on_hello(self, producer_id: str, config_json: str) -> None:
        """Take the producer's codec bounds from its hello (none: its actions are not counted)."""
        try:
            b = json.loads(config_json).get("codec_bounds")
            low, high = np.asarray(b["low"], np.float32), np.asarray(b["high"], np.float32)
            if (
                low.ndim != 1
                or low.shape != high.shape
                or not np.isfinite(low).all()
                or not np.isfinite(high).all()
            ):
                raise ValueError("bounds must be two finite vectors of one length")
        except (AttributeError, KeyError, TypeError, ValueError, RecursionError) as exc:  # any JSON at all
            log.info(
                "producer %s sent no usable codec bounds (%s): its clamping is not counted", producer_id, exc
            )
            self.bounds.pop(producer_id, None)
            return
        self.bounds[producer_id] = (low, high)

    def add(self, producer_id: str, actions: np.ndarray) -> None:
        """Count the values of ``actions`` [..., A] outside the producer's bounds."""
        if producer_id not in self.bounds or not len(actions):
            return
        low, high = self.bounds[producer_id]
        a = np.asarray(actions, np.float32).reshape(-1, low.shape[0])
        out = ((a < low) | (a > high)).sum(axis=0)
        if self.clamped is None or self.clamped.shape != out.shape:
            self.clamped, self.values = np.zeros_like(out, dtype=np.int64), 0
        self.clamped += out
        self.values += a.shape[0]

    def to_dict(self) -> dict[str, Any]:
        if self.clamped is None:
            return {"values_per_dim": 0, "clamped": [], "fraction": []}
        frac = (self.clamped / max(self.values, 1)).tolist()
        return {"values_per_dim": self.values, "clamped": self.clamped.tolist(), "fraction": frac}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)
