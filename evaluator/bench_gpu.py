"""GPU benchmark of RSD at real scale: the 7B timing twin in bf16 (docs/DESIGN.md §6.5, §9.6, §10.6).

Measures, in one process on one GPU:
- the device-to-device copy bandwidth (the memory-floor denominator);
- each pass of the twin (prefix, block 0, block l > 0, verify over k drafted layers) eager and with
  CUDA graphs, against its memory floor (decoder weights + KV cache ÷ measured bandwidth);
- the draft model's latency at input_dim 4096 (K = 3 and K = 8);
- end-to-end chunk latency (observation embeddings in, actions out) of the baseline (prefix + L
  block passes) and of RSD with exactly j accepted layers, j = 0..k, through the same engine that
  runs the embedded VLA (evaluator/rsd.py), the draft model's compute included;
- the expected speedup under an acceptance distribution measured on the embedded VLA
  (``--eval-json``: its eval.json; or ``--acceptance p0 p1 ...``).

Forcing j: random weights give random predictions, so the drafted codes are built to be
self-consistent with the verify pass (D_l = M_l for all l, found by k fixed-point passes) and
layer j is then corrupted; strict acceptance then accepts exactly j layers and the engine does
exactly the work it does on a real chunk with that j.

    python -m evaluator.bench_gpu --out docs/bench/gpu_twin.json --markdown docs/bench/gpu.md
    # later, with a measured acceptance distribution and no GPU:
    python -m evaluator.bench_gpu --timings docs/bench/gpu_twin.json --eval-json runs/x/eval/eval.json \
        --out docs/bench/gpu_twin.json --markdown docs/bench/gpu.md
"""

from __future__ import annotations

import datetime as dt
import gc
import json
import logging
import platform
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from common.cli import config_to_dict, parse_config
from common.draft import RFSQDraftModelWithProjection
from common.logs import setup_logging
from common.vla.twin import TwinConfig, TwinPolicy, llama7b_config, memory_floor_s, tiny_config
from evaluator.rsd import AcceptanceConfig, DraftProposer, Proposal, RSDConfig, RSDEngine

log = logging.getLogger("bench_gpu")


MODES = (  # every mode bench_prefix can measure (fastest last; see there)
    "eager", "graphs", "compiled_graphs", "compiled_graphs_math_attn", "compiled_graphs_sliced",
    "compiled_graphs_math_attn_sliced", "compiled_graphs_sliced_skinny",
)  # fmt: skip


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
    compile: bool = field(
        default=True, metadata={"help": "also measure torch.compile'd layers + CUDA graphs"}
    )
    probe: bool = field(
        default=False, metadata={"help": "only compare compile variants of the block pass and profile it"}
    )
    sliced: bool = field(
        default=True, metadata={"help": "also measure single-block passes with mask-free sliced attention"}
    )
    skinny: bool = field(
        default=True,
        metadata={"help": "also measure the Triton skinny-product kernels (evaluator/twin_triton.py)"},
    )
    skinny_wide: bool = field(
        default=True,
        metadata={"help": "tune the skinny products over the wide block-shape space (else a small one)"},
    )
    modes: list[str] | None = field(
        default=None, metadata={"help": "measure only these modes (default: every mode enabled)"}
    )
    tiny: bool = field(default=False, metadata={"help": "tiny twin (CPU smoke test of this script)"})
    device: str = field(default="cuda", metadata={"help": "torch device"})
    seed: int = field(default=0, metadata={"help": "weights and inputs seed"})

    def __post_init__(self) -> None:
        unknown = sorted(set(self.modes or []) - set(MODES))
        if unknown:
            raise ValueError(f"unknown modes {unknown}; known: {list(MODES)}")
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


# ------------------------------------------------------------------------------------------ timing
def summarize(ms: list[float]) -> dict[str, float]:
    s = sorted(ms)
    return {
        "median_ms": statistics.median(s),
        "p90_ms": s[min(len(s) - 1, int(round(0.9 * (len(s) - 1))))],
        "min_ms": s[0],
        "n": len(s),
    }


def time_events(fn, reps: int, warmup: int = 3) -> dict[str, float]:
    """Median of CUDA-event timings of ``fn`` (or host timings on the CPU)."""
    for _ in range(warmup):
        fn()
    out = []
    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    for _ in range(reps):
        if cuda:
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            out.append(a.elapsed_time(b))
        else:
            t = time.perf_counter()
            fn()
            out.append((time.perf_counter() - t) * 1e3)
    return summarize(out)


def copy_bandwidth(device: torch.device, gib: float = 2.0, reps: int = 20) -> float:
    """Device-to-device copy bandwidth in bytes/s (bytes read + bytes written)."""
    n = int(gib * 2**30) // 2
    src = torch.randn(n, device=device, dtype=torch.float32).to(torch.bfloat16)
    dst = torch.empty_like(src)
    t = time_events(lambda: dst.copy_(src), reps)
    return 2 * n * 2 / (t["median_ms"] / 1e3)


class GraphedProposer:
    """The draft model captured in a CUDA graph (static hidden input)."""

    def __init__(self, proposer: DraftProposer, batch: int, input_dim: int):
        self.inner = proposer
        self.num_layers = proposer.num_layers
        self.hidden = torch.zeros(batch, input_dim, device=proposer.device, dtype=proposer.dtype)
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(2):
                proposer.propose(self.hidden)
        torch.cuda.current_stream().wait_stream(s)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.out = proposer.propose(self.hidden)

    def propose(self, hidden: torch.Tensor) -> Proposal:
        self.hidden.copy_(hidden)
        self.graph.replay()
        return Proposal(codes=self.out.codes.clone(), confidence=self.out.confidence.clone())


class FixedProposer:
    """Runs the real draft (for its latency) and proposes fixed codes (to force the accepted j)."""

    def __init__(self, inner, codes: torch.Tensor):
        self.inner, self.codes = inner, codes  # codes [B, k, T, H]
        self.num_layers = codes.shape[1]

    def propose(self, hidden: torch.Tensor) -> Proposal:
        p = self.inner.propose(hidden)
        return Proposal(codes=self.codes, confidence=torch.ones_like(p.confidence[:, : self.num_layers]))


@torch.no_grad()
def self_consistent_drafts(policy: TwinPolicy, embeds: torch.Tensor, k: int) -> torch.Tensor:
    """Drafts D [B, k, T, H] with verify(D).argmax == D on layers 0..k-1 (k fixed-point passes)."""
    s = policy.shape
    drafted = torch.zeros(
        embeds.shape[0], k, s.chunk_len, s.action_hidden_dim, dtype=torch.long, device=policy.device
    )
    for layer in range(k):
        state = policy.prefix_from_embeds(embeds)
        main = policy.verify(state, drafted).argmax(-1)  # [B, k+1, T, H]; M_l depends on D_<l only
        drafted[:, layer] = main[:, layer]
    state = policy.prefix_from_embeds(embeds)
    assert torch.equal(policy.verify(state, drafted).argmax(-1)[:, :k], drafted), "fixed point not reached"
    return drafted


def corrupt_from(drafted: torch.Tensor, j: int, grid: int) -> torch.Tensor:
    """Copy of drafted [B, k, T, H] whose layer j (if any) disagrees everywhere: strict accepts exactly j."""
    out = drafted.clone()
    if j < out.shape[1]:
        out[:, j] = (out[:, j] + 1) % grid
    return out


# ------------------------------------------------------------------------------------------ bench
@torch.no_grad()
def gemm_only_ms(policy: TwinPolicy, reps: int, skinny: bool = False) -> dict[str, float]:
    """The 4 x 32 matrix products of one block pass (W rows) alone, from a CUDA graph: what cuBLAS
    (or, with ``skinny``, the Triton kernels with their fused residual/SwiGLU) allows."""
    cfg = policy.cfg
    W, D, I = cfg.block_width, cfg.hidden_size, cfg.intermediate_size
    xd = torch.randn(1, W, D, device=policy.device, dtype=policy.dtype)
    xi = torch.randn(1, W, I, device=policy.device, dtype=policy.dtype)
    if skinny:
        from common.vla.twin_triton import launch

        xd, x2i = xd[0], torch.randn(W, 2 * I, device=policy.device, dtype=policy.dtype)

    def run():
        for layer in policy.model.layers:
            if skinny:
                launch(xd, layer.wqkv)
                launch(xd, layer.wo, xd)
                launch(xd, layer.wgu)
                launch(x2i, layer.wdown, xd, True)
                continue
            F.linear(xd, layer.wqkv)
            F.linear(xd, layer.wo)
            F.linear(xd, layer.wgu)
            F.linear(xi, layer.wdown)

    run()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run()
    return time_events(graph.replay, reps)


def bench_prefix(
    cfg: BenchGPUConfig, twin_cfg: TwinConfig, device: torch.device, bandwidth: float
) -> dict[str, Any]:
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    graphs_ok = device.type == "cuda"
    policy = TwinPolicy(twin_cfg, device=device, dtype=dtype, cuda_graphs=graphs_ok, seed=cfg.seed)
    s, W = policy.shape, twin_cfg.block_width
    gen = torch.Generator(device=device).manual_seed(cfg.seed + 1)
    embeds = torch.randn(1, twin_cfg.prefix_len, twin_cfg.hidden_size, device=device, generator=gen).to(dtype)
    weight_bytes, kv_bytes = policy.weight_bytes(), policy.kv_bytes()
    res: dict[str, Any] = {
        "prefix_len": twin_cfg.prefix_len,
        "block_width": W,
        "weight_bytes": weight_bytes,
        "kv_cache_bytes": kv_bytes,
        "floor_ms": 1e3 * memory_floor_s(weight_bytes + kv_bytes, bandwidth),
        "floor_weights_only_ms": 1e3 * memory_floor_s(weight_bytes, bandwidth),
    }
    drafts: dict[int, torch.Tensor] = {}
    codes1 = torch.randint(0, s.grid_size, (1, s.chunk_len, s.action_hidden_dim), device=device)  # [B, T, H]

    def passes(reps: int) -> dict[str, Any]:
        state = policy.prefix_from_embeds(embeds)
        out = {"prefix": time_events(lambda: policy.prefix_from_embeds(embeds), reps)}

        def block0():
            policy.truncate(state, 0)
            policy.decode_block(state, None)

        def block1():
            policy.truncate(state, 1)
            policy.decode_block(state, codes1)

        out["block0"] = time_events(block0, reps)
        out["block"] = time_events(block1, reps)
        for k in range(1, cfg.max_drafted + 1):
            d = drafts[cfg.max_drafted][:, :k]

            def ver(d=d):
                policy.truncate(state, 0)
                policy.verify(state, d)

            out[f"verify_k{k}"] = time_events(ver, reps)
        return out

    # Draft models at this hidden size (K = 3: the seed contract; K = 8: part 4).
    proposers: dict[int, Any] = {}
    draft_ms: dict[str, Any] = {}
    for K in (3, 8):
        torch.manual_seed(cfg.seed)
        model = RFSQDraftModelWithProjection(input_dim=twin_cfg.hidden_size, num_coarse_layers=K)
        eager = DraftProposer(model, device=device, dtype=dtype)
        h = torch.randn(1, twin_cfg.hidden_size, device=device)
        draft_ms[f"K{K}_eager"] = time_events(lambda eager=eager, h=h: eager.propose(h), cfg.eager_reps * 3)
        if graphs_ok:
            graphed = GraphedProposer(eager, 1, twin_cfg.hidden_size)
            draft_ms[f"K{K}_graphs"] = time_events(lambda g=graphed, h=h: g.propose(h), cfg.pass_reps)
            proposers[K] = graphed
        else:
            proposers[K] = eager
    res["draft"] = draft_ms

    def chunks(reps: int, ks: list[int]) -> dict[str, Any]:
        """End-to-end chunk latency, variants interleaved in rotating order."""
        variants: dict[str, Any] = {"baseline": None}
        for k in ks:
            for j in range(k + 1):
                variants[f"rsd_k{k}_j{j}"] = (k, j)
        engines = {}
        for name, kj in variants.items():
            if kj is None:
                engines[name] = RSDEngine(policy, None, RSDConfig(stage_timing=False))
                continue
            k, j = kj
            inner = proposers[3 if k <= 3 else 8]
            d = corrupt_from(drafts[3 if k <= 3 else cfg.max_drafted][:, :k], j, s.grid_size)
            engines[name] = RSDEngine(
                policy, FixedProposer(inner, d), RSDConfig(acceptance=AcceptanceConfig(), stage_timing=False)
            )

        def run(name: str):
            eng = engines[name]
            state = policy.prefix_from_embeds(embeds)
            if name == "baseline":
                codes = eng.decode_baseline(state)
                j = 0
            else:
                codes, _, j, _, _ = eng.decode_rsd(state, eng.proposer.propose(state.hidden))
            policy.codes_to_actions(codes)
            return j

        names = list(variants)
        accepted: dict[str, int] = {}
        for name in names:  # warm-up; check the forced acceptance
            j = run(name)
            if variants[name] is not None and j != variants[name][1]:
                log.warning("%s: expected j = %d, the engine accepted %d", name, variants[name][1], j)
            accepted[name] = j
        times: dict[str, list[float]] = {n: [] for n in names}
        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        for rep in range(reps):
            order = names[rep % len(names) :] + names[: rep % len(names)]
            for name in order:
                sync()
                t = time.perf_counter()
                run(name)
                sync()
                times[name].append((time.perf_counter() - t) * 1e3)
        out = {n: summarize(v) for n, v in times.items()}
        base = out["baseline"]["median_ms"]
        for n in names[1:]:
            out[n]["speedup"] = base / out[n]["median_ms"]
            out[n]["accepted_j"] = accepted[n]
        return out

    # Modes, fastest last: eager kernels; the same kernels replayed from CUDA graphs; the layer
    # function compiled by torch.compile (fused elementwise work) and replayed from CUDA graphs.
    # "_sliced": single-block passes attend to the filled part of the cache without a mask (one graph
    # per block index) instead of masking the whole preallocated cache.
    # "_skinny": the weight products as Triton kernels that stream each weight once, with the residual
    # adds and SwiGLU fused in (evaluator/twin_triton.py).
    compiled = ["compiled_graphs", "compiled_graphs_math_attn"] if cfg.compile else []
    if cfg.compile and cfg.sliced:
        compiled += ["compiled_graphs_sliced", "compiled_graphs_math_attn_sliced"]
    if cfg.compile and cfg.sliced and cfg.skinny and graphs_ok:
        compiled += ["compiled_graphs_sliced_skinny"]
    modes = ["eager"] + (["graphs"] + compiled if graphs_ok else [])
    if cfg.modes:
        unknown = sorted(set(cfg.modes) - set(modes))
        if unknown:
            raise ValueError(f"unknown or disabled modes {unknown}; available: {modes}")
        modes = [m for m in modes if m in cfg.modes]
    if any(m.endswith("_skinny") for m in modes):
        import common.vla.twin_triton as twin_triton

        twin_triton.WIDE_SEARCH = cfg.skinny_wide
        res["skinny_check"] = check_skinny(policy)
    for mode in modes:
        if mode.startswith("compiled"):
            policy.model.compile_layers(math_attention="math_attn" in mode, skinny=mode.endswith("_skinny"))
        else:
            policy.model.use_skinny(False)
        policy.sliced_attention = "_sliced" in mode
        policy.reset_graphs()
        policy.cuda_graphs = mode != "eager"
        t0 = time.perf_counter()
        policy.capture_all(cfg.max_drafted)
        res[f"setup_s_{mode}"] = time.perf_counter() - t0
        # drafts that this mode's own verify pass reproduces (kernels differ between modes)
        drafts.clear()
        drafts.update({k: self_consistent_drafts(policy, embeds, k) for k in sorted({3, cfg.max_drafted})})
        eager = mode == "eager"
        res[f"passes_{mode}"] = passes(cfg.eager_reps if eager else cfg.pass_reps)
        for v in res[f"passes_{mode}"].values():
            v["x_floor"] = v["median_ms"] / res["floor_ms"]
        res[f"chunks_{mode}"] = chunks(
            cfg.eager_reps if eager else cfg.chunk_reps, [3] if eager else sorted({3, cfg.max_drafted})
        )
        log.info(
            "%s: block pass %.2f ms (%.2fx floor), prefix %.2f ms",
            mode,
            res[f"passes_{mode}"]["block"]["median_ms"],
            res[f"passes_{mode}"]["block"]["x_floor"],
            res[f"passes_{mode}"]["prefix"]["median_ms"],
        )
    res["modes"] = modes
    if graphs_ok:
        res["gemm_only_block_ms"] = gemm_only_ms(policy, cfg.pass_reps)
        if "skinny_check" in res:
            res["skinny_only_block_ms"] = gemm_only_ms(policy, cfg.pass_reps, skinny=True)
            from common.vla.twin_triton import best_configs

            res["skinny_configs"] = best_configs()
        for key in ("gemm_only_block_ms", "skinny_only_block_ms"):
            if key in res:
                res[key]["x_floor_weights"] = res[key]["median_ms"] / res["floor_weights_only_ms"]
                log.info("%s: %.3f ms (%.2fx the weights' floor)", key, res[key]["median_ms"],
                         res[key]["x_floor_weights"])  # fmt: skip
    return res


@torch.no_grad()
def check_skinny(policy: TwinPolicy) -> dict[str, float]:
    """The Triton products against F.linear on the twin's real shapes (bf16): largest relative error."""
    from common.vla.twin_triton import launch, reference

    cfg, layer = policy.cfg, policy.model.layers[0]
    W, D, I = cfg.block_width, cfg.hidden_size, cfg.intermediate_size
    gen = torch.Generator(device=policy.device).manual_seed(0)

    def rnd(*shape):
        return torch.randn(*shape, device=policy.device, generator=gen).to(policy.dtype)

    out = {}
    for name, x, w, r, sw in [
        ("qkv", rnd(W, D), layer.wqkv, None, False),
        ("o_residual", rnd(W, D), layer.wo, rnd(W, D), False),
        ("gate_up", rnd(W, D), layer.wgu, None, False),
        ("down_swiglu_residual", rnd(W, 2 * I), layer.wdown, rnd(W, D), True),
    ]:
        ref = reference(x, w, r, sw).float()
        err = ((launch(x, w, r, sw).float() - ref).abs().max() / ref.abs().max()).item()
        out[name] = err
        if err > 2e-2:
            raise RuntimeError(f"skinny product {name}: relative error {err:.3g} against F.linear")
    log.info("skinny products match F.linear: %s", {k: f"{v:.1e}" for k, v in out.items()})
    return out


# ------------------------------------------------------------------------------------------ speedup
def acceptance_distributions(cfg: BenchGPUConfig) -> dict[str, list[float]]:
    """name -> probabilities of j = 0..k (from --eval-json and/or --acceptance)."""
    dists: dict[str, list[float]] = {}
    if cfg.eval_json is not None:
        ev = json.loads(Path(cfg.eval_json).read_text())
        depth = ev.get("meta", {}).get("decode_layers")
        if depth is not None and depth != ev["meta"].get("num_layers", depth):
            raise ValueError(
                f"{cfg.eval_json} decodes {depth} layers; these timings assume all 8: project it with "
                "`python -m evaluator.bench_7b --timings docs/bench/honest/gpu_7b.json --eval-json …`"
            )
        for arm, block in ev.get("arms", {}).items():  # every RSD arm of the CPU eval, sweeps included
            hist = block.get("j_histogram")
            if arm != "baseline" and hist and sum(hist) > 0:
                dists[f"embedded_vla_{arm}"] = [h / sum(hist) for h in hist]
    if cfg.acceptance is not None:
        dists["given"] = [p / sum(cfg.acceptance) for p in cfg.acceptance]
    return dists


def measured_ks(chunks: dict[str, Any]) -> list[int]:
    return sorted({int(n.split("_")[1][1:]) for n in chunks if n.startswith("rsd_k")})


def expected_speedups(results: dict[str, Any], dists: dict[str, list[float]]) -> dict[str, Any]:
    """Speedup of the expected RSD chunk latency under each distribution, per prefix length and mode.

    A distribution over j = 0..k uses the end-to-end chunks measured with proposal length k, or the
    smallest measured k' > k (a wider verify pass: slightly slower, so the estimate is conservative).
    """
    out: dict[str, Any] = {}
    for name, probs in dists.items():
        k = len(probs) - 1
        for pkey, res in results["prefixes"].items():
            for mode in res.get("modes", ["graphs", "eager"]):
                ch = res.get(f"chunks_{mode}")
                usable = [kk for kk in measured_ks(ch or {}) if kk >= k]
                if not usable:
                    continue
                kk = usable[0]
                exp_ms = sum(p * ch[f"rsd_k{kk}_j{j}"]["median_ms"] for j, p in enumerate(probs))
                out[f"{name}/{pkey}/{mode}"] = {
                    "probabilities": probs,
                    "mean_j": sum(j * p for j, p in enumerate(probs)),
                    "timed_with_k": kk,
                    "baseline_ms": ch["baseline"]["median_ms"],
                    "expected_rsd_ms": exp_ms,
                    "speedup": ch["baseline"]["median_ms"] / exp_ms,
                }
    return out


# ------------------------------------------------------------------------------------------ report
def render_markdown(results: dict[str, Any]) -> str:
    meta = results["meta"]
    lines = [
        "# RSD at 7B scale: the timing twin on a GPU",
        "",
        f"Device: **{meta['device']}**; torch {meta['torch']}; date {meta['date']}. "
        f"Twin: Llama-2-7B shapes (hidden 4096, 32 layers, 32 heads, MLP 11008), random bf16 weights, "
        f"RFSQ heads, block width W = T = 8, static KV cache.",
        "",
        "Command: `" + meta["command"] + "`",
        "",
        f"Measured copy bandwidth: **{results['bandwidth_GBps']:.0f} GB/s** (device-to-device copy, "
        "bytes read + written). Memory floor of a pass = (decoder weights + KV cache) ÷ that bandwidth.",
        "",
    ]
    for res in results["prefixes"].values():
        lines += [
            f"## Prefix of {res['prefix_len']} tokens",
            "",
            f"Decoder weights {res['weight_bytes'] / 1e9:.2f} GB, KV cache {res['kv_cache_bytes'] / 1e6:.0f} MB; "
            f"floor {res['floor_ms']:.2f} ms per pass.",
            "",
            "| pass | " + " | ".join(f"{m} (ms) | × floor" for m in res["modes"]) + " |",
            "|---|" + "---:|---:|" * len(res["modes"]),
        ]
        for name in res[f"passes_{res['modes'][0]}"]:
            cells = [
                f"{res[f'passes_{m}'][name]['median_ms']:.2f} | {res[f'passes_{m}'][name]['x_floor']:.2f}"
                for m in res["modes"]
            ]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        if "gemm_only_block_ms" in res:
            g = res["gemm_only_block_ms"]["median_ms"]
            lines += [
                "",
                f"The 128 matrix products of one block pass alone (CUDA graph): {g:.2f} ms ({g / res['floor_ms']:.2f}× floor).",
            ]
        if "skinny_only_block_ms" in res:
            g = res["skinny_only_block_ms"]["median_ms"]
            lines += [
                f"The same products as Triton skinny kernels (with the SwiGLU and residual adds fused in): "
                f"{g:.2f} ms ({g / res['floor_ms']:.2f}× floor).",
            ]
        d = res["draft"]
        lines += [
            "",
            "Draft model at input_dim 4096: "
            + ", ".join(f"{k} {v['median_ms']:.3f} ms" for k, v in d.items())
            + ".",
            "",
        ]
        for mode in reversed(res["modes"]):
            ch = res.get(f"chunks_{mode}")
            if not ch:
                continue
            lines += [
                f"End-to-end chunk latency ({mode}; baseline = prefix + 8 block passes; "
                "RSD = prefix + draft + verify + (L − j − 1) block passes; variants interleaved):",
                "",
                "| variant | median (ms) | p90 (ms) | speedup |",
                "|---|---:|---:|---:|",
            ]
            for name, v in ch.items():
                sp = f"{v['speedup']:.2f}×" if "speedup" in v else "1.00×"
                lines.append(f"| {name} | {v['median_ms']:.2f} | {v['p90_ms']:.2f} | {sp} |")
            lines.append("")
    exp = results.get("expected_speedup") or {}
    if exp:
        best = {
            pkey: min(res["modes"], key=lambda m, r=res: r[f"chunks_{m}"]["baseline"]["median_ms"])
            for pkey, res in results["prefixes"].items()
        }
        lines += [
            "## Expected speedup under measured acceptance",
            "",
            "Fastest mode per prefix ("
            + ", ".join(f"{p}: {m}" for p, m in best.items())
            + "); all modes in the JSON.",
            "",
            "| distribution / prefix / mode | P(j) | mean j | baseline (ms) | E[RSD] (ms) | speedup |",
            "|---|---|---:|---:|---:|---:|",
        ]
        for name, v in exp.items():
            _, pkey, mode = name.split("/")
            if mode != best[pkey]:
                continue
            probs = ", ".join(f"{p:.2f}" for p in v["probabilities"])
            lines.append(
                f"| {name} | {probs} | {v['mean_j']:.2f} | {v['baseline_ms']:.2f} | "
                f"{v['expected_rsd_ms']:.2f} | **{v['speedup']:.2f}×** |"
            )
        lines.append("")
    else:
        lines += ["No acceptance distribution given: speedups above are per accepted j only.", ""]
    return "\n".join(lines)


@torch.no_grad()
def probe_block_pass(cfg: BenchGPUConfig, device: torch.device) -> dict[str, Any]:
    """Block pass (and verify k = 3) under several compile variants, plus a kernel profile."""
    import torch._inductor.config as inductor_config

    from common.vla.twin import layer_step

    twin_cfg = tiny_config() if cfg.tiny else llama7b_config(280)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    policy = TwinPolicy(
        twin_cfg, device=device, dtype=dtype, cuda_graphs=device.type == "cuda", seed=cfg.seed
    )
    embeds = torch.randn(1, twin_cfg.prefix_len, twin_cfg.hidden_size, device=device).to(dtype)
    s = policy.shape
    codes = torch.randint(0, s.grid_size, (1, 3, s.chunk_len, s.action_hidden_dim), device=device)
    out: dict[str, Any] = {}

    def measure(name: str, make_fn, math_attention: bool = False) -> None:
        torch._dynamo.reset()  # every variant compiles afresh (one dynamo cache per code object)
        fn = make_fn()
        policy.model.layer_fn, policy.model.math_attention = layer_step, False
        policy.reset_graphs()
        state = policy.prefix_from_embeds(embeds)  # the cache, from the plain layer function
        policy.decode_block(state, None)
        policy.model.layer_fn, policy.model.math_attention = fn, math_attention
        policy.reset_graphs()
        t0 = time.perf_counter()

        def block():
            policy.truncate(state, 1)
            policy.decode_block(state, codes[:, 0])

        def verify():
            policy.truncate(state, 0)
            policy.verify(state, codes)

        block()
        verify()
        setup = time.perf_counter() - t0
        b, v = time_events(block, cfg.pass_reps), time_events(verify, cfg.pass_reps)
        out[name] = {"block": b, "verify_k3": v, "setup_s": setup}
        log.info(
            "probe %s: block %.3f ms, verify_k3 %.3f ms (setup %.0f s)",
            name,
            b["median_ms"],
            v["median_ms"],
            setup,
        )

    def compiled(**kw):
        return lambda: torch.compile(layer_step, fullgraph=True, **kw)

    measure("compiled", compiled(dynamic=True))
    with inductor_config.patch(coordinate_descent_tuning=True):
        measure("compiled_coordinate_descent", compiled(dynamic=True))
    measure("compiled_static", compiled(dynamic=False))
    autotune = compiled(dynamic=False, mode="max-autotune-no-cudagraphs")
    measure("compiled_static_max_autotune", autotune)
    measure("compiled_static_max_autotune_math_attn", autotune, math_attention=True)
    if device.type == "cuda":
        from torch.profiler import ProfilerActivity, profile

        torch._dynamo.reset()
        policy.model.layer_fn = torch.compile(layer_step, dynamic=True, fullgraph=True)
        policy.cuda_graphs = False
        policy.reset_graphs()
        state = policy.prefix_from_embeds(embeds)
        policy.decode_block(state, None)
        for _ in range(3):
            policy.truncate(state, 1)
            policy.decode_block(state, codes[:, 0])
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                policy.truncate(state, 1)
                policy.decode_block(state, codes[:, 0])
            torch.cuda.synchronize()
        table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=25)
        out["profile_compiled_block_x5"] = table
        print(table)
    return out


def main(argv: list[str] | None = None) -> None:
    cfg = parse_config(BenchGPUConfig, argv)
    setup_logging("bench_gpu")
    if cfg.probe:
        res = probe_block_pass(cfg, torch.device(cfg.device))
        cfg.out.parent.mkdir(parents=True, exist_ok=True)
        cfg.out.write_text(json.dumps(res, indent=1))
        return
    if cfg.timings is not None:
        results = json.loads(Path(cfg.timings).read_text())
    else:
        device = torch.device(cfg.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise SystemExit("no CUDA device: run this on a GPU machine (or pass --tiny --device cpu)")
        torch.backends.cuda.matmul.allow_tf32 = True
        bandwidth = copy_bandwidth(device) if device.type == "cuda" else 20e9
        log.info("copy bandwidth %.0f GB/s", bandwidth / 1e9)
        results = {
            "meta": {
                "device": torch.cuda.get_device_name(device)
                if device.type == "cuda"
                else platform.processor() or "cpu",
                "torch": torch.__version__,
                "cuda": torch.version.cuda,
                "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d"),
                "command": "python -m evaluator.bench_gpu " + " ".join(argv or __import__("sys").argv[1:]),
                "config": config_to_dict(cfg),
            },
            "bandwidth_GBps": bandwidth / 1e9,
            "prefixes": {},
        }
        for p in cfg.prefix_tokens:
            twin_cfg = tiny_config(text_len=7 if p == 280 else 15) if cfg.tiny else llama7b_config(p)
            log.info("prefix %d: measuring", twin_cfg.prefix_len)
            results["prefixes"][f"p{p}"] = bench_prefix(cfg, twin_cfg, device, bandwidth)
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
            cfg.out.parent.mkdir(parents=True, exist_ok=True)
            cfg.out.write_text(json.dumps(results, indent=1))
    results["expected_speedup"] = expected_speedups(results, acceptance_distributions(cfg))
    cfg.out.parent.mkdir(parents=True, exist_ok=True)
    cfg.out.write_text(json.dumps(results, indent=1))
    if cfg.markdown is not None:
        cfg.markdown.parent.mkdir(parents=True, exist_ok=True)
        cfg.markdown.write_text(render_markdown(results))
    for pkey, res in results["prefixes"].items():
        for mode in res["modes"]:
            ch = res.get(f"chunks_{mode}")
            if ch:
                log.info(
                    "%s %s: baseline %.2f ms; %s",
                    pkey,
                    mode,
                    ch["baseline"]["median_ms"],
                    ", ".join(
                        f"{n} {v['median_ms']:.2f} ms ({v['speedup']:.2f}x)"
                        for n, v in ch.items()
                        if "speedup" in v
                    ),
                )
    for name, v in results["expected_speedup"].items():
        log.info("expected speedup %s: %.2fx", name, v["speedup"])
    log.info("wrote %s", cfg.out)


if __name__ == "__main__":
    main()
