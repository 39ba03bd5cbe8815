"""Training pairs (hidden state, codes) from streamed archives (docs/DESIGN.md §5.6, §8.1, §8.5).

:func:`load_split` stacks one split of several archives as the trainer recorded it (``make retrain``);
:func:`load_keyed` identifies trajectories across archives by (suite, task, initial state), so that a
trajectory held out anywhere is trained on nowhere (``trainer.fit_draft --archives``).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from common.archive import ArchiveEpisode, archive_meta, iter_episodes


@dataclass
class StreamedPairs:
    """Training and held-out pairs of several archives of one policy, split by trajectory (see load_keyed)."""

    train_hidden: np.ndarray  # [N, D] float32: every query of the training trajectories
    train_codes: np.ndarray  # [N, T, H, L] uint8
    valid_hidden: np.ndarray  # [M, D]: the acting queries of the held-out trajectories
    valid_codes: np.ndarray
    valid_all_hidden: np.ndarray  # [M', D]: all queries (acting and observing) of the held-out trajectories
    valid_all_codes: np.ndarray
    train_episodes: int
    valid_episodes: int
    dropped_duplicates: int  # episodes left out because another copy of the trajectory was used
    # each archive's own held-out acting queries (its own split, or val_inits), for per-archive comparisons
    per_archive_valid: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)


def load_keyed(paths: Sequence[str | Path], val_inits: set[int] | None = None) -> StreamedPairs:
    """Train/valid pairs of several archives with trajectories identified across archives.

    Episodes are keyed by (suite, task, initial state) (:meth:`ArchiveEpisode.init_key`; episodes
    without a key stay distinct). A trajectory held out in any archive is held out everywhere: none of
    its copies is trained on. Of several copies of a trajectory the one with the most samples is used
    (a producer with ``--sample-every`` streams the same trajectory with more queries).
    With ``val_inits`` the split is by initial state instead of the trainer's: the trajectories starting
    from these initial states are held out, all others are trained on (episodes without a key: error).
    """
    best: dict[Any, tuple[ArchiveEpisode, np.ndarray]] = {}  # key -> (episode, acting mask)
    held_out: set[Any] = set()
    own_valid: dict[str, dict[Any, tuple[np.ndarray, np.ndarray, int]]] = {}  # archive -> key -> (h, c, n)
    dropped = 0
    for p in paths:
        producers = json.loads(archive_meta(p).get("producers", "{}"))
        own = own_valid.setdefault(str(p), {})
        for ep in iter_episodes(p):
            if ep.attrs["num_samples"] == 0:
                continue
            key = ep.init_key(producers)
            if key is None and val_inits is not None:
                raise ValueError(f"{p}: {ep.name} has no recorded initial state, cannot split by init state")
            key = key or (str(p), ep.name)
            if (ep.attrs.get("split") == "valid") if val_inits is None else (key[2] in val_inits):
                held_out.add(key)
                acting = ep.acting(producers)
                if key not in own or len(ep.hidden) > own[key][2]:  # densest copy within this archive
                    own[key] = (ep.hidden[acting], ep.codes[acting], len(ep.hidden))
            if key in best:
                dropped += 1
                if len(ep.hidden) <= len(best[key][0].hidden):
                    continue
            best[key] = (ep, ep.acting(producers))
    tr_h, tr_c, va_h, va_c, vx_h, vx_c = [], [], [], [], [], []
    for key, (ep, acting) in best.items():
        if key in held_out:
            va_h.append(ep.hidden[acting])
            va_c.append(ep.codes[acting])
            vx_h.append(ep.hidden)
            vx_c.append(ep.codes)
        else:
            tr_h.append(ep.hidden)
            tr_c.append(ep.codes)

    first = next(iter(best.values()))[0] if best else None
    none_h = first.hidden[:0] if first else np.zeros((0, 0), np.float32)
    none_c = first.codes[:0] if first else np.zeros((0, 0, 0, 0), np.uint8)

    def stack(parts: list[np.ndarray], none: np.ndarray) -> np.ndarray:
        return np.concatenate(parts) if parts else none

    per_archive = {
        p: (np.concatenate([v[0] for v in own.values()]), np.concatenate([v[1] for v in own.values()]))
        for p, own in own_valid.items()
        if own
    }
    return StreamedPairs(
        stack(tr_h, none_h), stack(tr_c, none_c), stack(va_h, none_h), stack(va_c, none_c),
        stack(vx_h, none_h), stack(vx_c, none_c), len(tr_h), len(va_h), dropped, per_archive,
    )  # fmt: skip


def load_split(paths: Sequence[str | Path], split: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Stack one split of several archives: hidden [N, D] float32, codes [N, T, H, L] uint8, episode keys."""
    hiddens, codes, keys = [], [], []
    dims = set()
    for p in paths:
        for ep in iter_episodes(p, split):
            if ep.attrs["num_samples"] == 0:
                continue
            hiddens.append(ep.hidden)
            codes.append(ep.codes)
            dims.add(ep.hidden.shape[1])
            keys.append(f"{Path(p).name}:{ep.name}")
    if len(dims) > 1:
        raise ValueError(f"archives mix hidden sizes {sorted(dims)}; retrain from one backbone at a time")
    if not hiddens:
        return np.zeros((0, 0), np.float32), np.zeros((0, 0, 0, 0), np.uint8), keys
    return np.concatenate(hiddens), np.concatenate(codes), keys
