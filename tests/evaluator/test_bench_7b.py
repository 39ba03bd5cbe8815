"""The 7B projection bench on a tiny twin (CPU): causal-flash prefix = masked prefix, the vision twin's
shapes, the whole command end to end with a projection of an eval.json."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from common.vla.twin import TwinPolicy, tiny_config
from common.vla.twin_vision import FusedVisionTwin, GraphedVision, tiny_vision
from evaluator import bench_7b, bench_gpu
from evaluator.bench_7b_report import _rsd_ms, projection
from evaluator.rsd import RSDConfig, RSDEngine


def test_causal_flash_prefix_equals_the_masked_prefix():
    torch.set_num_threads(1)
    cfg = tiny_config(num_images=2, text_len=15)
    masked = TwinPolicy(cfg, seed=3)
    flash = TwinPolicy(cfg, seed=3, prefix_flash=True, sliced_attention=True)
    embeds = torch.randn(1, cfg.prefix_len, cfg.hidden_size)
    a, b = masked.prefix_from_embeds(embeds), flash.prefix_from_embeds(embeds)
    torch.testing.assert_close(a.hidden, b.hidden, rtol=1e-5, atol=1e-5)
    ca = RSDEngine(masked, None, RSDConfig(stage_timing=False)).decode_baseline(a)
    cb = RSDEngine(flash, None, RSDConfig(stage_timing=False)).decode_baseline(b)
    assert torch.equal(ca, cb)  # the same cache: every layer decodes the same codes


def test_vision_twin_shapes_and_flops():
    a, b, width = tiny_vision()
    model = FusedVisionTwin(a, b, width).eval()
    images = torch.rand(2, 3, a.image, a.image)
    out = GraphedVision(model, images, graphs=False)()
    assert out.shape == (2, a.patches, width) and torch.isfinite(out).all()
    assert model.flops(2) == 2 * model.flops(1) > 0
    with pytest.raises(ValueError, match="same patches"):
        FusedVisionTwin(a, b.__class__(**{**b.__dict__, "patch": 4}), width)


def test_rsd_latency_interpolates_untimed_depths():
    chunk = {"D8_rsd_k7_j0": 50.0, "D8_rsd_k7_j7": 15.0, "D8_rsd_k3_j1": 40.0, "D3_rsd_k2_j2": 20.0}
    assert _rsd_ms(chunk, 8, 7, 2) == pytest.approx(50 - 2 * 5)
    assert _rsd_ms(chunk, 8, 2, 1) == 40.0  # a shorter proposal uses the next timed k
    with pytest.raises(ValueError, match="no RSD chunk"):
        _rsd_ms(chunk, 3, 3, 0)


def test_bench_7b_end_to_end_on_a_tiny_twin(tmp_path):
    torch.set_num_threads(1)
    out = tmp_path / "b.json"
    bench_7b.main(
        ["--tiny", "--device", "cpu", "--pass-reps", "1", "--chunk-reps", "1", "--tree-blocks", "1", "3",
         "--out", str(out), "--markdown", str(tmp_path / "b.md")]
    )  # fmt: skip
    res = json.loads(out.read_text())
    p = res["projection_inputs"]
    assert set(p["chunk_ms"]) >= {f"truncate_k{k}" for k in range(1, 9)} | {"D3_rsd_k2_j2", "D8_rsd_k7_j7"}
    assert p["verify_ms_by_blocks"]["1"] > 0 and "3" in p["verify_ms_by_blocks"]
    assert res["twin"]["modes"]["eager"]["prefix_flash_vs_masked_max_abs"] < 1e-4
    # projection of an eval: a strict arm with j = 0/1/2 in 2/1/1 chunks, and the truncations
    ev = {
        "meta": {"policy": "p", "decode_layers": 3},
        "arms": {
            "baseline": {"speedup_median": 1.0, "mean_j": 0, "j_histogram": [1], "action_deviation": {}},
            "strict": {"kind": "strict", "speedup_median": 0.9, "mean_j": 0.75, "j_histogram": [2, 1, 1],
                       "action_deviation": {"mean_abs": 0.0, "p99_abs": 0.0}},
            "truncate-k2": {"kind": "truncation", "layers": 2, "speedup_median": 1.2, "mean_j": 0,
                            "j_histogram": [1], "action_deviation": {"mean_abs": 0.01, "p99_abs": 0.05}},
        },
    }  # fmt: skip
    proj = projection(res, ev, "ev.json")
    ch = p["chunk_ms"]
    expect = ch["truncate_k3"] / (
        0.5 * ch["D3_rsd_k2_j0"] + 0.25 * ch["D3_rsd_k2_j1"] + 0.25 * ch["D3_rsd_k2_j2"]
    )
    assert proj["arms"]["strict"]["speedup_7b"] == pytest.approx(expect)
    assert proj["arms"]["truncate-k2"]["speedup_7b"] == pytest.approx(ch["truncate_k3"] / ch["truncate_k2"])
    assert np.isclose(proj["arms"]["baseline"]["speedup_7b"], 1.0)
    assert "7B" in (tmp_path / "b.md").read_text()


def test_bench_gpu_end_to_end_on_a_tiny_twin(tmp_path):
    """evaluator.bench_gpu on the CPU: every pass and forced-j chunk of the eager mode, and the
    expected speedup of a given acceptance distribution, in its JSON and Markdown."""
    torch.set_num_threads(1)
    out = tmp_path / "g.json"
    bench_gpu.main(
        ["--tiny", "--device", "cpu", "--prefix-tokens", "280", "--eager-reps", "1", "--max-drafted", "3",
         "--acceptance", "0.5", "0", "0", "0.5", "--out", str(out), "--markdown", str(tmp_path / "g.md")]
    )  # fmt: skip
    res = json.loads(out.read_text())
    p = res["prefixes"]["p280"]
    assert p["modes"] == ["eager"]
    assert set(p["passes_eager"]) == {"prefix", "block0", "block"} | {f"verify_k{k}" for k in (1, 2, 3)}
    chunks = p["chunks_eager"]
    assert [chunks[f"rsd_k3_j{j}"]["accepted_j"] for j in range(4)] == [0, 1, 2, 3]  # j forced exactly
    exp = res["expected_speedup"]["given/p280/eager"]
    want = chunks["baseline"]["median_ms"] / (
        0.5 * chunks["rsd_k3_j0"]["median_ms"] + 0.5 * chunks["rsd_k3_j3"]["median_ms"]
    )
    assert exp["speedup"] == pytest.approx(want)
    assert "Expected speedup under measured acceptance" in (tmp_path / "g.md").read_text()
    with pytest.raises(SystemExit) as exc:  # the modes that lost were removed: a usage error naming them
        bench_gpu.main(["--modes", "graphs"])
    assert exc.value.code == 2


def test_bench_gpu_refuses_an_eval_of_another_depth(tmp_path):
    """The 8-layer twin timings of evaluator.bench_gpu cannot project an eval of a 3-layer baseline."""
    from evaluator.bench_gpu_report import acceptance_distributions

    ev = tmp_path / "eval.json"
    ev.write_text(json.dumps({"meta": {"decode_layers": 3, "num_layers": 8}, "arms": {}}))
    with pytest.raises(ValueError, match="bench_7b"):
        acceptance_distributions(ev)
    ev.write_text(
        json.dumps(
            {"meta": {"decode_layers": 8, "num_layers": 8}, "arms": {"strict": {"j_histogram": [3, 1]}}}
        )
    )
    assert acceptance_distributions(ev) == {"embedded_vla_strict": [0.75, 0.25]}
