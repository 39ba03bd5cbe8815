"""Replay buffer (ring, uniform sampling) and the samples-per-insert rate limiter."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from trainer.buffer import RateLimiter, ReplayBuffer


def test_ring_keeps_the_newest_items():
    buf = ReplayBuffer(capacity=5, hidden_dim=3, num_coarse=2, tokens_per_layer=4)
    for i in range(8):
        buf.insert(np.full(3, i, np.float32), np.full((2, 4), i, np.uint8))
    assert len(buf) == 5 and buf.inserted == 8
    hidden, targets = buf.all()
    assert sorted(hidden[:, 0].tolist()) == [3, 4, 5, 6, 7]
    assert (targets[:, 0, 0] == hidden[:, 0]).all()  # pairs stay together


def test_uniform_sampling():
    buf = ReplayBuffer(capacity=10, hidden_dim=1, num_coarse=1, tokens_per_layer=1, seed=1)
    for i in range(10):
        buf.insert(np.array([i], np.float32), np.array([[i]], np.uint8))
    hidden, _ = buf.sample(20000)
    counts = np.bincount(hidden[:, 0].astype(int), minlength=10)
    assert counts.min() > 1700 and counts.max() < 2300  # ~2000 each


def test_empty_buffer_refuses_to_sample():
    buf = ReplayBuffer(capacity=2, hidden_dim=1, num_coarse=1, tokens_per_layer=1)
    with pytest.raises(ValueError, match="empty"):
        buf.sample(1)


def test_rate_limiter_holds_the_learner_to_the_ratio():
    lim = RateLimiter(samples_per_insert=4, min_size=2, error_buffer=8)
    assert not lim.can_sample(1)  # below min_size
    lim.inserted(2)  # diff = 8
    assert lim.await_sample(8, timeout=0.01)  # diff 0
    assert lim.await_sample(8, timeout=0.01)  # diff -8 (= -error_buffer)
    assert not lim.await_sample(1, timeout=0.05)  # would overfit a slow stream
    lim.inserted(1)
    assert lim.await_sample(4, timeout=0.01)


def test_rate_limiter_holds_a_fast_stream():
    lim = RateLimiter(samples_per_insert=4, min_size=1, error_buffer=8)
    lim.inserted(3)  # diff 12 > 8: the learner is behind
    assert not lim.await_insert(timeout=0.05)

    def learner():
        time.sleep(0.05)
        lim.await_sample(8, timeout=1)

    t = threading.Thread(target=learner)
    t.start()
    assert lim.await_insert(timeout=2)  # unblocked by the learner catching up
    t.join()
    assert lim.stats.insert_waits >= 1


def test_close_releases_waiters():
    lim = RateLimiter(samples_per_insert=1, min_size=10, error_buffer=1)
    threading.Timer(0.05, lim.close).start()
    assert not lim.await_sample(1, timeout=5)
