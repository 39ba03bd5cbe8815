"""Fixtures shared by the evaluator's tests."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from common.draft import RFSQDraftModelWithProjection, save_checkpoint


@pytest.fixture(scope="module")
def draft_ckpt(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model = RFSQDraftModelWithProjection(input_dim=64, hidden_dim=64, num_coarse_layers=3)
    path = tmp_path_factory.mktemp("draft") / "draft.pt"
    return save_checkpoint(
        path, model, None, epoch=0, val_accuracy=0.0, config={"note": "untrained test draft"}
    )
