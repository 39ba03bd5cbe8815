"""Checkpoints of ``make train`` (docs/DESIGN.md §5.5): resume from ``draft_last.pt``, keep the best.

After every validation the trainer writes ``draft_last.pt`` (model, optimizer, schedule: a restart in
the same run dir resumes from it) and, when the held-out accuracy is the best so far,
``draft_best.pt`` (what ``make eval`` reads). Both record the run's configuration and provenance
(backbone id, codec hash) beside the weights; the writing itself is atomic (:mod:`common.draft`).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from trainer.learner import Learner

log = logging.getLogger(__name__)

LAST = "draft_last.pt"
BEST = "draft_best.pt"


def resume(learner: Learner, run_dir: Path) -> bool:
    """Load ``run_dir/draft_last.pt`` into ``learner`` if there is one; returns whether it did."""
    last = run_dir / LAST
    if not last.is_file():
        return False
    ckpt = learner.load(last)
    log.info("resumed from %s: %d updates, val_accuracy %.4f", last, learner.updates, ckpt["val_accuracy"])
    return True


def run_config(run: dict[str, Any], archive_meta: dict[str, Any], val_samples: int) -> dict[str, Any]:
    """What an online checkpoint records about its run: the flags, the source and the data's provenance."""
    return {
        "run": run,
        "source": "online",
        "backbone_id": archive_meta.get("backbone_id", ""),
        "codec_sha256": archive_meta.get("codec_sha256", ""),
        "val_samples": val_samples,
    }


def save_validated(learner: Learner, run_dir: Path, accuracy: float, config: dict[str, Any]) -> bool:
    """Write ``draft_last.pt``, and ``draft_best.pt`` if ``accuracy`` beats the best so far (returned)."""
    is_best = accuracy > learner.best_val
    if is_best:
        learner.best_val = accuracy
        learner.save(run_dir / BEST, learner.updates, accuracy, config)
    learner.save(run_dir / LAST, learner.updates, accuracy, config)
    return is_best
