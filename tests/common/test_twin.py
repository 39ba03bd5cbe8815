"""The 7B timing twin: a real Llama decoder (checked against transformers), consistent layer-wise passes."""

from __future__ import annotations

import pytest
import torch

from common.vla.twin import TwinPolicy, llama7b_config, memory_floor_s, tiny_config


@pytest.fixture(scope="module")
def policy() -> TwinPolicy:
    torch.set_num_threads(1)
    return TwinPolicy(tiny_config(), seed=3)


def test_llama7b_shapes():
    cfg = llama7b_config(280)
    assert cfg.prefix_len == 280
    assert llama7b_config(600).prefix_len == 600
    # Llama-2-7B decoder layers: 32 x (4 D^2 + 3 D I) + norms ~ 6.48e9 parameters, ~13 GB in bf16
    assert cfg.layer_params() == 32 * (4 * 4096**2 + 3 * 4096 * 11008 + 2 * 4096)
    assert 12.9e9 < 2 * cfg.layer_params() < 13.0e9
    assert cfg.max_len % 16 == 0 and cfg.max_len >= 280 + 8 * 8
    with pytest.raises(ValueError, match="prefix_tokens"):
        llama7b_config(300)


def test_prefix_matches_transformers_llama(policy):
    transformers = pytest.importorskip("transformers")
    cfg = policy.cfg
    D, I = cfg.hidden_size, cfg.intermediate_size
    hf_cfg = transformers.LlamaConfig(
        hidden_size=D,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_heads,
        intermediate_size=I,
        rms_norm_eps=cfg.rms_eps,
        rope_theta=cfg.rope_theta,
        vocab_size=32,
        max_position_embeddings=cfg.max_len,
    )
    hf = transformers.LlamaModel(hf_cfg).eval()
    with torch.no_grad():
        for ours, theirs in zip(policy.model.layers, hf.layers):
            attn, mlp = theirs.self_attn, theirs.mlp
            attn.q_proj.weight.copy_(ours.wqkv[:D])
            attn.k_proj.weight.copy_(ours.wqkv[D : 2 * D])
            attn.v_proj.weight.copy_(ours.wqkv[2 * D :])
            attn.o_proj.weight.copy_(ours.wo)
            mlp.gate_proj.weight.copy_(ours.wgu[:I])
            mlp.up_proj.weight.copy_(ours.wgu[I:])
            mlp.down_proj.weight.copy_(ours.wdown)
        embeds = torch.randn(1, cfg.prefix_len, D)
        ref = hf(inputs_embeds=embeds).last_hidden_state[:, -1]  # [1, D]
    state = policy.prefix_from_embeds(embeds)
    assert torch.allclose(state.hidden, ref, atol=1e-5, rtol=1e-4)


def test_verify_pass_equals_sequential_blocks(policy):
    torch.manual_seed(0)
    embeds = torch.randn(1, policy.cfg.prefix_len, policy.hidden_dim)
    state = policy.prefix_from_embeds(embeds)
    seq_logits, prev = [], None
    for _ in range(4):
        seq_logits.append(policy.decode_block(state, prev))  # [1, T, H, G]
        prev = seq_logits[-1].argmax(-1)
    seq = torch.stack(seq_logits, dim=1)  # [1, 4, T, H, G]
    drafted = seq[:, :3].argmax(-1)  # [1, 3, T, H]
    state = policy.prefix_from_embeds(embeds)
    ver = policy.verify(state, drafted)  # [1, 4, T, H, G]
    assert state.num_blocks == 4
    assert torch.allclose(ver, seq, atol=1e-5)
    # after truncation the next block sees only the kept blocks (stale cache entries are masked)
    policy.truncate(state, 2)
    again = policy.decode_block(state, seq[:, 1].argmax(-1))
    assert torch.allclose(again, seq[:, 2], atol=1e-5)


def test_block_attention_mask(policy):
    P, W = policy.cfg.prefix_len, policy.cfg.block_width
    pos = torch.arange(P + W, P + 2 * W)  # block 1
    mask = policy.model.attention_mask(pos)
    assert mask[:, : P + 2 * W].all()  # prefix, block 0 and the whole of block 1
    assert not mask[:, P + 2 * W :].any()  # later (possibly stale) blocks
    prefix_mask = policy.model.attention_mask(torch.arange(P))
    assert torch.equal(prefix_mask[:, :P], torch.ones(P, P).tril().bool())


def test_bad_calls_raise(policy):
    state = policy.prefix_from_embeds(torch.zeros(1, policy.cfg.prefix_len, policy.hidden_dim))
    with pytest.raises(ValueError, match="block 0"):
        policy.decode_block(state, torch.zeros(1, 8, 16, dtype=torch.long))
    policy.decode_block(state, None)
    with pytest.raises(ValueError, match="fresh"):
        policy.verify(state, torch.zeros(1, 2, 8, 16, dtype=torch.long))
    with pytest.raises(ValueError, match="bandwidth"):
        memory_floor_s(10, 0.0)


def test_bench_forces_accepted_layers_and_expected_speedup(policy):
    from evaluator.bench_gpu_report import expected_speedups
    from evaluator.bench_twin import FixedProposer, corrupt_from, self_consistent_drafts
    from evaluator.rsd import Proposal, RSDEngine

    class NoDraft:
        num_layers = 3

        def propose(self, hidden):
            return Proposal(codes=torch.zeros(1, 3, 8, 16, dtype=torch.long), confidence=torch.ones(1, 3))

    torch.manual_seed(1)
    embeds = torch.randn(1, policy.cfg.prefix_len, policy.hidden_dim)
    drafts = self_consistent_drafts(policy, embeds, 3)
    for j in range(4):
        eng = RSDEngine(policy, FixedProposer(NoDraft(), corrupt_from(drafts, j, 7)))
        state = policy.prefix_from_embeds(embeds)
        _, k, accepted, _, _ = eng.decode_rsd(state, eng.proposer.propose(state.hidden))
        assert (k, accepted) == (3, j)
    chunks = {"baseline": {"median_ms": 10.0}} | {
        f"rsd_k3_j{j}": {"median_ms": 10.0 - 2 * j} for j in range(4)
    }
    results = {"prefixes": {"p280": {"modes": ["graphs"], "chunks_graphs": chunks}}}
    out = expected_speedups(results, {"d": [0.5, 0.0, 0.0, 0.5]})
    assert out["d/p280/graphs"]["expected_rsd_ms"] == pytest.approx(7.0)
    assert out["d/p280/graphs"]["speedup"] == pytest.approx(10 / 7)
    assert expected_speedups(results, {"d": [0.2] * 5}) == {}  # k = 4 was not measured


def test_sliced_attention_equals_masked_attention():
    """Single-block passes over the filled part of the cache (no mask) give the masked passes' logits,
    also after a truncation leaves stale blocks behind and for RSD chunks mixing verify and blocks."""
    torch.manual_seed(0)
    cfg = tiny_config()
    masked = TwinPolicy(cfg, seed=3)
    sliced = TwinPolicy(cfg, seed=3, sliced_attention=True)
    embeds = torch.randn(1, cfg.prefix_len, masked.hidden_dim)
    runs = []
    for p in (masked, sliced):
        state = p.prefix_from_embeds(embeds)
        out, prev = [], None
        for _ in range(p.shape.num_layers):
            out.append(p.decode_block(state, prev))
            prev = out[-1].argmax(-1)
        p.truncate(state, 0)  # an RSD chunk over the same prefix: verify 2 drafted layers, accept 1
        ver = p.verify(state, torch.stack([o.argmax(-1) for o in out[:2]], dim=1))
        p.truncate(state, 2)
        out.append(p.decode_block(state, ver[:, 1].argmax(-1)))
        runs.append((torch.stack(out, 1), ver))
    assert torch.allclose(runs[0][0], runs[1][0], atol=1e-5)
    assert torch.allclose(runs[0][1], runs[1][1], atol=1e-5)
    assert torch.allclose(runs[1][0][:, -1], runs[1][0][:, 2], atol=1e-5)  # same as the sequential layer 2
    with pytest.raises(ValueError, match="single-block"):
        sliced.model(torch.zeros(1, 2 * cfg.block_width, cfg.hidden_size), torch.tensor(0), sliced.k_cache,
                     sliced.v_cache, kv_len=cfg.prefix_len)  # fmt: skip


def test_skinny_triton_products_equal_linear():
    """The Triton skinny-product kernels (fused residual and SwiGLU) give F.linear's results, alone and
    inside full twin passes: Triton's interpreter on the CPU, in a fresh process (the interpreter is
    chosen when triton is first imported). Skipped where Triton is not installed."""
    import os
    import subprocess
    import sys

    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    code = "from tests.common.test_twin import skinny_checks; skinny_checks()"
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "skinny ok" in res.stdout


def skinny_checks() -> None:
    from common.vla.twin_triton import launch, reference

    torch.manual_seed(0)
    for rows, n, k, residual, swiglu in [(8, 96, 64, False, False), (8, 64, 200, True, False),
                                         (5, 64, 128, True, True), (16, 48, 64, False, False), (33, 48, 64, False, False),
                                         (70, 32, 64, True, True)]:  # fmt: skip
        x = torch.randn(rows, 2 * k if swiglu else k)
        w, r = torch.randn(n, k) / 8, torch.randn(rows, n) if residual else None
        assert torch.allclose(launch(x, w, r, swiglu), reference(x, w, r, swiglu), atol=1e-4)
    with pytest.raises(ValueError, match="columns"):
        launch(torch.zeros(8, 10), torch.zeros(4, 12))
    cfg = tiny_config()
    plain, skinny = TwinPolicy(cfg, seed=3), TwinPolicy(cfg, seed=3, sliced_attention=True)
    skinny.model.use_skinny()
    embeds = torch.randn(1, cfg.prefix_len, cfg.hidden_size)
    outs = []
    for p in (plain, skinny):
        state = p.prefix_from_embeds(embeds)
        first = p.decode_block(state, None)
        outs.append((state.hidden, first, p.decode_block(state, first.argmax(-1))))
    for a, b in zip(*outs):
        assert torch.allclose(a, b, atol=1e-4)
    from evaluator.bench_twin import check_skinny  # the GPU benchmarks' check, on the twin's own weights

    assert set(check_skinny(plain)) == {"qkv", "o_residual", "gate_up", "down_swiglu_residual"}
    print("skinny ok")
