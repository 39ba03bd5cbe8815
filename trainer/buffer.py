"""Replay buffer with uniform sampling and a samples-per-insert rate limiter.

The buffer holds (hidden state, coarse targets) pairs in preallocated arrays, evicting the oldest when
full (FIFO ring). The :class:`RateLimiter` keeps the number of sampled items close to
``samples_per_insert`` times the number of inserted items: the learner waits when it would reuse data
too often (it does not overfit a slow stream) and the receiver waits when the learner lags too far
behind (a fast stream is slowed through the socket's high-water marks; nothing is dropped).

Axes: N capacity, D hidden size, K coarse layers, S = T*H tokens per layer.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np


class ReplayBuffer:
    """Fixed-capacity ring of (hidden [D] float32, targets [K, S] uint8); thread-safe."""

    def __init__(self, capacity: int, hidden_dim: int, num_coarse: int, tokens_per_layer: int, seed: int = 0):
        if capacity <= 0:
            raise ValueError(f"capacity must be > 0, got {capacity}")
        self.capacity = capacity
        self.hidden = np.zeros((capacity, hidden_dim), dtype=np.float32)  # [N, D]
        self.targets = np.zeros((capacity, num_coarse, tokens_per_layer), dtype=np.uint8)  # [N, K, S]
        self._next = 0
        self._size = 0
        self.inserted = 0
        self._lock = threading.Lock()
        self._rng = np.random.default_rng(seed)

    def __len__(self) -> int:
        return self._size

    def insert(self, hidden: np.ndarray, targets: np.ndarray) -> None:
        """hidden [D], targets [K, S]."""
        with self._lock:
            self.hidden[self._next] = hidden
            self.targets[self._next] = targets
            self._next = (self._next + 1) % self.capacity
            self._size = min(self._size + 1, self.capacity)
            self.inserted += 1

    def sample(self, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
        """Uniform with replacement: (hidden [B, D] float32, targets [B, K, S] uint8) copies."""
        with self._lock:
            if self._size == 0:
                raise ValueError("cannot sample from an empty buffer")
            idx = self._rng.integers(0, self._size, size=batch_size)
            return self.hidden[idx], self.targets[idx]

    def all(self) -> tuple[np.ndarray, np.ndarray]:
        """Every stored item (order unspecified): (hidden [n, D], targets [n, K, S]) copies."""
        with self._lock:
            return self.hidden[: self._size].copy(), self.targets[: self._size].copy()


@dataclass
class RateLimiterStats:
    inserts: int = 0
    samples: int = 0
    insert_waits: int = 0
    sample_waits: int = 0


class RateLimiter:
    """Samples-per-insert ratio with slack (in the spirit of Reverb's SampleToInsertRatio).

    Let ``diff = inserts * spi - samples``. Sampling ``n`` items needs ``size >= min_size`` and
    ``diff - n >= -error_buffer``; inserting needs ``diff <= error_buffer`` (once ``min_size`` items
    are in). ``spi`` is in *items* (a batch of 32 counts 32).
    """

    def __init__(self, samples_per_insert: float, min_size: int, error_buffer: float):
        if samples_per_insert <= 0:
            raise ValueError(f"samples_per_insert must be > 0, got {samples_per_insert}")
        if error_buffer < samples_per_insert:
            raise ValueError(
                f"error_buffer ({error_buffer}) must be >= samples_per_insert ({samples_per_insert})"
            )
        self.spi = samples_per_insert
        self.min_size = max(1, min_size)
        self.error_buffer = error_buffer
        self.stats = RateLimiterStats()
        self._cv = threading.Condition()
        self._closed = False

    def _diff(self) -> float:
        return self.stats.inserts * self.spi - self.stats.samples

    def can_insert(self) -> bool:
        return self.stats.inserts < self.min_size or self._diff() <= self.error_buffer

    def can_sample(self, n: int) -> bool:
        return self.stats.inserts >= self.min_size and self._diff() - n >= -self.error_buffer

    def await_insert(self, timeout: float) -> bool:
        """Wait until an insert is allowed (or closed/timeout). Returns whether it is allowed."""
        with self._cv:
            if not self.can_insert():
                self.stats.insert_waits += 1
                self._cv.wait_for(lambda: self._closed or self.can_insert(), timeout=timeout)
            return self._closed or self.can_insert()

    def inserted(self, n: int = 1) -> None:
        with self._cv:
            self.stats.inserts += n
            self._cv.notify_all()

    def await_sample(self, n: int, timeout: float) -> bool:
        """Wait until ``n`` items may be sampled; on success count them as sampled."""
        with self._cv:
            if not self.can_sample(n):
                self.stats.sample_waits += 1
                if not self._cv.wait_for(lambda: self._closed or self.can_sample(n), timeout=timeout):
                    return False
            if self._closed:
                return False
            self.stats.samples += n
            self._cv.notify_all()
            return True

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify_all()
