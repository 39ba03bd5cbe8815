"""tools.vla_latency: size flags become the architecture, and every size is timed."""

from __future__ import annotations

import json

import pytest

from tools.vla_latency import SIZES, config_from_args, main


def test_size_flags_build_the_architecture():
    cfg = config_from_args(SIZES["B"], decode_layers=3)
    assert (cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers) == (320, 960, 6)
    assert cfg.vision_hidden_sizes == [48, 96, 192] and cfg.decode_layers == 3
    with pytest.raises(ValueError, match="unknown size flag"):
        config_from_args("--width 3", 3)


def test_reports_parameters_size_and_latency(tmp_path):
    out = tmp_path / "lat.json"
    small = "--hidden-size 32 --intermediate-size 64 --num-hidden-layers 1 --num-attention-heads 2 --vision-hidden-sizes 8 16"
    assert main(["--size", small, "--threads", "1", "--repeats", "1", "--out", str(out)]) == 0
    row = json.loads(out.read_text())["sizes"]["size 0"]
    assert row["parameters"] > 0 and row["fp16_mb"] == row["parameters"] * 2 / 1e6 and row["ms"]["1"] > 0
