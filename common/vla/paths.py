"""Where the shipped weights live (docs/DESIGN.md §8.4): the defaults of every backend that loads files."""

from __future__ import annotations

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_EMBEDDED_DIR = REPO_ROOT / "assets" / "embedded_vla"
DEFAULT_CODEC_DIR = REPO_ROOT / "assets" / "codec"
