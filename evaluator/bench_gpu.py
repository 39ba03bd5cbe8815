"""GPU benchmark of RSD at real scale: the 7B timing twin in bf16 (docs/DESIGN.md §6.5, §9.6, §10.6).

Measures, in one process on one GPU:
- the device-to-device copy bandwidth (the memory-floor denominator);
- each pass of the twin (prefix, block 0, block l > 0, verify over k drafted layers) in each mode,
  against its memory floor (decoder weights + KV cache ÷ measured bandwidth);
- the draft model's latency at input_dim 4096 (K = 3 and K = 8);
- end-to-end chunk latency (observation embeddings in, actions out) of the baseline (prefix + L
  block passes) and of RSD with exactly j accepted layers, j = 0..k, through the same engine that
  runs the embedded VLA (evaluator/rsd.py), the draft model's compute included (j is forced as
  evaluator/bench_twin.py describes);
- the expected speedup under an acceptance distribution measured on the embedded VLA
  (``--eval-json``: its eval.json; or ``--acceptance p0 p1 ...``; evaluator/bench_gpu_report.py).

Modes: ``eager`` (the CPU's only mode), ``compiled_graphs_sliced`` (the layer function compiled, one
CUDA graph per pass shape, mask-free single-block attention) and ``compiled_graphs_sliced_skinny``
(the same with the block passes' weight products as Triton kernels: the fastest, docs/bench/gpu.md).
The modes that lost and the compile-variant probe were measured and removed (docs/bench/gpu.md).

    python -m evaluator.bench_gpu --out docs/bench/gpu_twin.json --markdown docs/bench/gpu.md
    # later, with a measured acceptance distribution and no GPU:
    python -m evaluator.bench_gpu --timings docs/bench/gpu_twin.json --eval-json runs/x/eval/eval.json \
        --out docs/bench/gpu_twin.json --markdown docs/bench/gpu.md
"""

from __future__ import annotations

import gc
import json
import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from common.cli import parse_config
from common.draft import RFSQDraftModelWithProjection
from common.logs import setup_logging
from common.vla.twin import TwinConfig, TwinPolicy, llama7b_config, memory_floor_s, tiny_config
from evaluator.bench_gpu_report import acceptance_distributions, expected_speedups, render_markdown
from evaluator.bench_twin import (
    GraphedProposer,
    check_skinny,
    copy_bandwidth,
    forced_engine,
    gemm_only_ms,
    make_twin,
    run_meta,
    self_consistent_drafts,
    summarize,
    time_block_passes,
    time_events,
    time_rotating,
    triton_products,
    write_json,
)
from evaluator.rsd import DraftProposer, RSDConfig, RSDEngine

log = logging.getLogger("bench_gpu")

MODES = ("eager", "compiled_graphs_sliced", "compiled_graphs_sliced_skinny")  # fastest last


@dataclass
class BenchGPUConfig:
    """Time the 7B twin's passes and RSD chunks on a GPU; report speedups and memory floors."""

    out: Path = field(default=Path("bench_gpu.json"), metadata={"help": "JSON file with every number"})
    markdown: Path | None = field(default=None, metadata={"help": "also write a Markdown report here"})
    prefix_tokens: list[int] = field(
        default_factory=lambda: [280, 600], metadata={"help": "prefix lengths to measure (280 and/or 600)"}
    )
    pass_reps: int = field(default=50, metadata={"help": "timed repetitions per pass (graphs)"})
    chunk_reps: int = field(default=30, metadata={"help": "timed repetitions per chunk variant (graphs)"})
    eager_reps: int = field(default=10, metadata={"help": "timed repetitions of eager passes and chunks"})
    max_drafted: int = field(default=7, metadata={"help": "largest proposal length k measured (<= L-1)"})
    eval_json: Path | None = field(
        default=None, metadata={"help": "eval.json of the CPU eval: acceptance distributions of j"}
    )
    acceptance: list[float] | None = field(
        default=None, metadata={"help": "probabilities of j = 0, 1, ..., K (alternative to --eval-json)"}
    )
    timings: Path | None = field(
        default=None, metadata={"help": "reuse timings from this JSON (no GPU): only recompute speedups"}
    )
    skinny: bool = field(
        default=True,
        metadata={"help": "also measure the Triton skinny-product kernels (common/vla/twin_triton.py)"},
    )
    skinny_wide: bool = field(
        default=True,
        metadata={"help": "tune the skinny products over the wide block-shape space (else a small one)"},
    )
    modes: list[str] | None = field(
        default=None, metadata={"help": f"measure only these modes of {list(MODES)} (default: every one)"}
    )
    tiny: bool = field(default=False, metadata={"help": "tiny twin (CPU smoke test of this script)"})
    device: str = field(default="cuda", metadata={"help": "torch device"})
    seed: int = field(default=0, metadata={"help": "weights and inputs seed"})

    def __post_init__(self) -> None:
        unknown = sorted(set(self.modes or []) - set(MODES))
        if unknown:
            raise ValueError(
                f"unknown modes {unknown}; known: {list(MODES)} (the modes that lost were removed: "
                "docs/bench/gpu.md)"
            )
        for p in self.prefix_tokens:
            if p not in (280, 600):
                raise ValueError(f"prefix_tokens must be 280 and/or 600, got {p}")
        if min(self.pass_reps, self.chunk_reps, self.eager_reps) < 1:
            raise ValueError("repetition counts must be >= 1")
        if not 1 <= self.max_drafted <= 7:
            raise ValueError(f"max_drafted must be in 1..7 (L-1), got {self.max_drafted}")
        if self.acceptance is not None:
            if any(p < 0 for p in self.acceptance) or sum(self.acceptance) <= 0:
                raise ValueError(
                    f"acceptance must be non-negative with a positive sum, got {self.acceptance}"
                )


# ------------------------------------------------------------------------------------------ one prefix length
def select_modes(cfg: BenchGPUConfig, graphs_ok: bool) -> list[str]:
    """The modes this run measures: eager, and on CUDA the compiled graph modes (skinny unless disabled)."""
    modes = ["eager"]
    if graphs_ok:
        modes += ["compiled_graphs_sliced"] + (["compiled_graphs_sliced_skinny"] if cfg.skinny else [])
    if cfg.modes:
        unknown = sorted(set(cfg.modes) - set(modes))
        if unknown:
            raise ValueError(f"unknown or disabled modes {unknown}; available: {modes}")
        modes = [m for m in modes if m in cfg.modes]
    return modes


def draft_proposers(
    cfg: BenchGPUConfig, hidden_size: int, policy: TwinPolicy, graphs_ok: bool
) -> tuple[dict[int, Any], dict[str, Any]]:
    """Draft models at this hidden size (K = 3 and K = 8): proposers (in CUDA graphs on CUDA) and latencies."""
    proposers: dict[int, Any] = {}
    draft_ms: dict[str, Any] = {}
    for K in (3, 8):
        torch.manual_seed(cfg.seed)
        model = RFSQDraftModelWithProjection(input_dim=hidden_size, num_coarse_layers=K)
        eager = DraftProposer(model, device=policy.device, dtype=policy.dtype)
        h = torch.randn(1, hidden_size, device=policy.device)
        draft_ms[f"K{K}_eager"] = time_events(lambda eager=eager, h=h: eager.propose(h), cfg.eager_reps * 3)
        if graphs_ok:
            graphed = GraphedProposer(eager, 1, hidden_size)
            draft_ms[f"K{K}_graphs"] = time_events(lambda g=graphed, h=h: g.propose(h), cfg.pass_reps)
            proposers[K] = graphed
        else:
            proposers[K] = eager
    return proposers, draft_ms


@torch.no_grad()
def time_chunks(
    policy: TwinPolicy, embeds: torch.Tensor, proposers: dict[int, Any], drafts: dict[int, torch.Tensor],
    reps: int, ks: list[int],
) -> dict[str, Any]:  # fmt: skip
    """End-to-end chunk latency of the baseline and of RSD with exactly j accepted, k in ``ks``, interleaved."""
    engines = {"baseline": RSDEngine(policy, None, RSDConfig(stage_timing=False))}
    forced: dict[str, int] = {}
    for k in ks:
        d = drafts[3 if k <= 3 else max(drafts)][:, :k]
        for j in range(k + 1):
            engines[f"rsd_k{k}_j{j}"] = forced_engine(policy, proposers[3 if k <= 3 else 8], d, j)
            forced[f"rsd_k{k}_j{j}"] = j

    def run(name: str) -> int:
        eng = engines[name]
        state = policy.prefix_from_embeds(embeds)
        if name == "baseline":
            codes, j = eng.decode_baseline(state), 0
        else:
            codes, _, j, _, _ = eng.decode_rsd(state, eng.proposer.propose(state.hidden))
        policy.codes_to_actions(codes)
        return j

    accepted: dict[str, int] = {}
    for name in engines:  # warm-up; check the forced acceptance
        accepted[name] = run(name)
        if name in forced and accepted[name] != forced[name]:
            log.warning("%s: expected j = %d, the engine accepted %d", name, forced[name], accepted[name])
    out = {n: summarize(v) for n, v in time_rotating(run, list(engines), reps, policy.device).items()}
    base = out["baseline"]["median_ms"]
    for n in forced:
        out[n]["speedup"] = base / out[n]["median_ms"]
        out[n]["accepted_j"] = accepted[n]
    return out


@torch.no_grad()
def bench_mode(
    cfg: BenchGPUConfig, policy: TwinPolicy, mode: str, embeds: torch.Tensor, proposers: dict[int, Any],
    floor_ms: float,
) -> dict[str, Any]:  # fmt: skip
    """Passes and chunks of one mode (layer function, attention, CUDA graphs as the mode says)."""
    if mode.startswith("compiled"):
        policy.model.compile_layers(skinny=mode.endswith("_skinny"))
    else:
        policy.model.use_skinny(False)
    policy.sliced_attention = "_sliced" in mode
    policy.reset_graphs()
    policy.cuda_graphs = mode != "eager"
    t0 = time.perf_counter()
    policy.capture_all(cfg.max_drafted)
    setup_s = time.perf_counter() - t0
    # drafts that this mode's own verify pass reproduces (kernels differ between modes)
    drafts = {k: self_consistent_drafts(policy, embeds, k) for k in sorted({3, cfg.max_drafted})}
    eager = mode == "eager"
    reps = cfg.eager_reps if eager else cfg.pass_reps
    s = policy.shape
    codes1 = torch.randint(0, s.grid_size, (1, s.chunk_len, s.action_hidden_dim), device=policy.device)
    state = policy.prefix_from_embeds(embeds)
    passes = {"prefix": time_events(lambda: policy.prefix_from_embeds(embeds), reps)}
    passes.update(time_block_passes(policy, state, drafts[cfg.max_drafted], reps, codes1))
    for v in passes.values():
        v["x_floor"] = v["median_ms"] / floor_ms
    ks = [3] if eager else sorted({3, cfg.max_drafted})
    chunks = time_chunks(policy, embeds, proposers, drafts, cfg.eager_reps if eager else cfg.chunk_reps, ks)
    log.info("%s: block pass %.2f ms (%.2fx floor), prefix %.2f ms", mode, passes["block"]["median_ms"],
             passes["block"]["x_floor"], passes["prefix"]["median_ms"])  # fmt: skip
    return {f"setup_s_{mode}": setup_s, f"passes_{mode}": passes, f"chunks_{mode}": chunks}


def product_timings(cfg: BenchGPUConfig, policy: TwinPolicy, res: dict[str, Any]) -> dict[str, Any]:
    """The block pass's 128 weight products alone (cuBLAS; the Triton kernels if they were checked)."""
    out: dict[str, Any] = {"gemm_only_block_ms": gemm_only_ms(policy, cfg.pass_reps)}
    if "skinny_check" in res:
        out["skinny_only_block_ms"] = gemm_only_ms(policy, cfg.pass_reps, skinny=True)
        out["skinny_configs"] = triton_products().best_configs()
    for key in ("gemm_only_block_ms", "skinny_only_block_ms"):
        if key in out:
            out[key]["x_floor_weights"] = out[key]["median_ms"] / res["floor_weights_only_ms"]
            log.info("%s: %.3f ms (%.2fx the weights' floor)", key, out[key]["median_ms"],
                     out[key]["x_floor_weights"])  # fmt: skip
    return out


def bench_prefix(
    cfg: BenchGPUConfig, twin_cfg: TwinConfig, device: torch.device, bandwidth: float
) -> dict[str, Any]:
    """Every mode of one prefix length: floors, draft latency, passes, chunks, the products alone."""
    graphs_ok = device.type == "cuda"
    policy = make_twin(twin_cfg, device, cfg.seed, graphs_ok)
    gen = torch.Generator(device=device).manual_seed(cfg.seed + 1)
    embeds = torch.randn(1, twin_cfg.prefix_len, twin_cfg.hidden_size, device=device, generator=gen)
    embeds = embeds.to(policy.dtype)
    weight_bytes, kv_bytes = policy.weight_bytes(), policy.kv_bytes()
    res: dict[str, Any] = {
        "prefix_len": twin_cfg.prefix_len,
        "block_width": twin_cfg.block_width,
        "weight_bytes": weight_bytes,
        "kv_cache_bytes": kv_bytes,
        "floor_ms": 1e3 * memory_floor_s(weight_bytes + kv_bytes, bandwidth),
        "floor_weights_only_ms": 1e3 * memory_floor_s(weight_bytes, bandwidth),
    }
    proposers, res["draft"] = draft_proposers(cfg, twin_cfg.hidden_size, policy, graphs_ok)
    modes = select_modes(cfg, graphs_ok)
    if any(m.endswith("_skinny") for m in modes):
        triton_products().WIDE_SEARCH = cfg.skinny_wide
        res["skinny_check"] = check_skinny(policy)
    for mode in modes:
        res.update(bench_mode(cfg, policy, mode, embeds, proposers, res["floor_ms"]))
    res["modes"] = modes
    if graphs_ok:
        res.update(product_timings(cfg, policy, res))
    return res


# ------------------------------------------------------------------------------------------ main
def measure(cfg: BenchGPUConfig, argv: list[str]) -> dict[str, Any]:
    device = torch.device(cfg.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run this on a GPU machine (or pass --tiny --device cpu)")
    torch.backends.cuda.matmul.allow_tf32 = True
    bandwidth = copy_bandwidth(device) if device.type == "cuda" else 20e9
    log.info("copy bandwidth %.0f GB/s", bandwidth / 1e9)
    command = "python -m evaluator.bench_gpu " + " ".join(argv)
    results = {"meta": run_meta(cfg, command, device), "bandwidth_GBps": bandwidth / 1e9, "prefixes": {}}
    for p in cfg.prefix_tokens:
        twin_cfg = tiny_config(text_len=7 if p == 280 else 15) if cfg.tiny else llama7b_config(p)
        log.info("prefix %d: measuring", twin_cfg.prefix_len)
        results["prefixes"][f"p{p}"] = bench_prefix(cfg, twin_cfg, device, bandwidth)
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        write_json(results, cfg.out)
    return results


def log_summary(results: dict[str, Any]) -> None:
    for pkey, res in results["prefixes"].items():
        for mode in res["modes"]:
            ch = res.get(f"chunks_{mode}")
            if ch:
                rsd = ", ".join(
                    f"{n} {v['median_ms']:.2f} ms ({v['speedup']:.2f}x)"
                    for n, v in ch.items()
                    if "speedup" in v
                )
                log.info("%s %s: baseline %.2f ms; %s", pkey, mode, ch["baseline"]["median_ms"], rsd)
    for name, v in results["expected_speedup"].items():
        log.info("expected speedup %s: %.2fx", name, v["speedup"])


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    cfg = parse_config(BenchGPUConfig, argv, prog="python -m evaluator.bench_gpu")
    setup_logging("bench_gpu")
    results = json.loads(Path(cfg.timings).read_text()) if cfg.timings is not None else measure(cfg, argv)
    dists = acceptance_distributions(cfg.eval_json, cfg.acceptance)
    results["expected_speedup"] = expected_speedups(results, dists)
    write_json(results, cfg.out)
    if cfg.markdown is not None:
        cfg.markdown.parent.mkdir(parents=True, exist_ok=True)
        cfg.markdown.write_text(render_markdown(results))
    log_summary(results)
    log.info("wrote %s", cfg.out)


if __name__ == "__main__":
    main()
