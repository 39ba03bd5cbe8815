"""The honest 7B projection: OpenVLA-OFT-sized chunk latency on a GPU, vision encoder included.

One process, one GPU (DESIGN §6):

- the vision encoder (SigLIP + DINOv2 + projector, common/vla/twin_vision.py) on two 224 px images,
  in a CUDA graph (eager and compiled blocks);
- the 7B twin (common/vla/twin.py, from the backend registry) with OFT's 600-token prefix: prefix pass with the masked kernel and
  with causal flash attention (against its compute floor: FLOPs ÷ the measured bf16 matrix rate), block
  and verify passes (against their memory floor), and tree-verify passes of 1..129 blocks;
- end-to-end chunks, observation pixels in, actions out (vision -> prefix -> layers -> codec), in rotating
  order: truncations k = 1..8 (k = 3 is the shipped baseline, k = 8 the full decoding) and strict RSD with
  exactly j accepted layers, at D = 3 (k = 2 drafted) and D = 8 (k = 3 and 7);
- with ``--eval-json``: each arm of a CPU eval of the embedded VLA projected to 7B by its measured j
  distribution (the acceptance is the embedded VLA's, not OpenVLA's), and the frontier verdict at 7B.

    python -m evaluator.bench_7b --out docs/bench/gpu_7b.json --markdown docs/bench/gpu_7b.md
    python -m evaluator.bench_7b --timings docs/bench/gpu_7b.json --eval-json RUN/eval/eval.json \
        --out docs/bench/gpu_7b.json --markdown docs/bench/gpu_7b.md       # later, no GPU
"""

from __future__ import annotations

import json
import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from common.cli import parse_config
from common.draft import RFSQDraftModelWithProjection
from common.logs import setup_logging
from common.vla.twin import TwinPolicy, layer_step, llama7b_config, memory_floor_s, tiny_config
from common.vla.twin_vision import FusedVisionTwin, GraphedVision, tiny_vision
from evaluator.bench_7b_report import projection, projection_inputs, render_markdown
from evaluator.bench_twin import (
    GraphedProposer,
    check_skinny,
    copy_bandwidth,
    forced_engine,
    gemm_tflops,
    graphed,
    load_skinny_preset,
    make_twin,
    run_meta,
    self_consistent_drafts,
    summarize,
    time_block_passes,
    time_events,
    time_rotating,
    write_json,
)
from evaluator.rsd import DraftProposer, RSDConfig, RSDEngine

log = logging.getLogger("bench_7b")
MODES = ("compiled_graphs_sliced", "compiled_graphs_sliced_skinny")


@dataclass
class Bench7BConfig:
    """OFT-sized 7B chunk latency with the vision encoder; project CPU-measured acceptance to it."""

    out: Path = field(default=Path("bench_7b.json"), metadata={"help": "JSON file with every number"})
    markdown: Path | None = field(default=None, metadata={"help": "also write a Markdown report here"})
    modes: list[str] = field(default_factory=lambda: list(MODES), metadata={"help": f"twin modes ({MODES})"})
    skinny_preset: Path | None = field(
        default=None,
        metadata={"help": "bench_gpu JSON whose skinny_configs are used instead of tuning (saves ~90 s)"},
    )
    pass_reps: int = field(default=40, metadata={"help": "timed repetitions per pass"})
    chunk_reps: int = field(default=20, metadata={"help": "timed repetitions per chunk variant"})
    tree_blocks: list[int] = field(
        default_factory=lambda: [1, 2, 3, 5, 9, 17, 33, 65, 129],
        metadata={"help": "verify-pass widths (blocks of 8 positions) of the tree sweep"},
    )
    prefix_study: bool = field(
        default=False,
        metadata={
            "help": "also time the prefix's matrix products alone and a max-autotune prefix (fastest mode)"
        },
    )
    eval_json: Path | None = field(default=None, metadata={"help": "eval.json of a CPU eval to project"})
    timings: Path | None = field(default=None, metadata={"help": "reuse this JSON's timings (no GPU)"})
    tiny: bool = field(default=False, metadata={"help": "tiny twin and encoder (CPU smoke test)"})
    device: str = field(default="cuda", metadata={"help": "torch device"})
    seed: int = field(default=0, metadata={"help": "weights and inputs seed"})

    def __post_init__(self) -> None:
        bad = sorted(set(self.modes) - set(MODES))
        if bad or not self.modes:
            raise ValueError(f"modes must be among {list(MODES)}, got {self.modes}")
        if min(self.pass_reps, self.chunk_reps) < 1:
            raise ValueError("repetition counts must be >= 1")
        if not self.tree_blocks or min(self.tree_blocks) < 1:
            raise ValueError(f"tree_blocks must be positive, got {self.tree_blocks}")
        for p in (self.skinny_preset, self.eval_json, self.timings):
            if p is not None and not Path(p).is_file():
                raise ValueError(f"no such file: {p}")


# ------------------------------------------------------------------------------------------ floors
def prefix_flops(policy: TwinPolicy) -> float:
    """Matrix products of the prefix pass plus causal attention (half of P x P per head)."""
    cfg = policy.cfg
    P, D = cfg.prefix_len, cfg.hidden_size
    return 2 * cfg.layer_params() * P + cfg.num_layers * 2 * P * P * D


# ------------------------------------------------------------------------------------------ vision
@torch.no_grad()
def bench_vision(
    cfg: Bench7BConfig, device: torch.device, dtype: torch.dtype, graphs: bool
) -> dict[str, Any]:
    a, b, width = tiny_vision() if cfg.tiny else (None, None, 4096)
    with torch.device(device):
        model = (FusedVisionTwin(a, b, width) if cfg.tiny else FusedVisionTwin()).to(dtype).eval()
    s = model.siglip.cfg.image
    images = torch.rand(2, 3, s, s, device=device, dtype=dtype)
    out: dict[str, Any] = {"param_bytes": model.param_bytes(), "flops": model.flops(2)}
    runners = {"eager_graph": GraphedVision(model, images, graphs)}
    out["eager_graph"] = time_events(runners["eager_graph"], cfg.pass_reps)
    if device.type == "cuda":  # the graph captured above keeps its eager kernels
        t0 = time.perf_counter()
        try:
            model.compile_blocks()
            runners["compiled_graph"] = GraphedVision(model, images, graphs)
            out["compile_s"] = time.perf_counter() - t0
            out["compiled_graph"] = time_events(runners["compiled_graph"], cfg.pass_reps)
        except Exception as exc:  # noqa: BLE001 - the eager graph is still a valid measurement
            log.error("compiled vision encoder failed (%s); using the eager graph", exc)
            out["compile_error"] = str(exc)
    best = min(runners, key=lambda k: out[k]["median_ms"])
    out["best"], out["ms"] = best, out[best]["median_ms"]
    runner = runners[best]
    log.info(
        "vision encoder, 2 images: %s",
        {k: round(out[k]["median_ms"], 3) for k in ("eager_graph", "compiled_graph") if k in out},
    )
    return {"summary": out, "runner": runner}


# ------------------------------------------------------------------------------------------ twin
@torch.no_grad()
def tree_sweep(policy: TwinPolicy, blocks: list[int], reps: int, graphs: bool) -> dict[str, Any]:
    """A verify pass over n blocks (a tree's candidates) after the prefix, over a cache long enough
    for the widest; cost depends on positions, not on the tree's mask pattern."""
    cfg, m = policy.cfg, policy.model
    W, P = cfg.block_width, cfg.prefix_len
    S = -(-(P + max(blocks) * W) // 16) * 16
    shape = (cfg.num_layers, 1, cfg.num_heads, S, cfg.head_dim)
    k_cache = torch.zeros(shape, device=policy.device, dtype=policy.dtype)
    v_cache = torch.zeros_like(k_cache)
    start = torch.full((), P, dtype=torch.long, device=policy.device)
    m.ensure_positions(S)
    out = {}
    for n in blocks:
        x = torch.randn(1, n * W, cfg.hidden_size, device=policy.device).to(policy.dtype)

        def fn(x: torch.Tensor = x) -> torch.Tensor:
            return m(x, start, k_cache, v_cache)

        out[str(n)] = time_events(graphed(fn) if graphs else fn, reps)
    return out


@torch.no_grad()
def bench_mode(
    cfg: Bench7BConfig, policy: TwinPolicy, mode: str, vision, proposer, graphs: bool
) -> dict[str, Any]:
    s, P = policy.shape, policy.cfg.prefix_len
    if mode.startswith("compiled") and policy.device.type == "cuda":
        policy.model.compile_layers(skinny=mode.endswith("_skinny"))
    policy.sliced_attention = "sliced" in mode
    policy.cuda_graphs = graphs
    res: dict[str, Any] = {}
    embeds = torch.randn(1, P, policy.cfg.hidden_size, device=policy.device).to(policy.dtype)
    n_img = vision.out.shape[0] * vision.out.shape[1]

    def with_vision() -> torch.Tensor:
        embeds[:, :n_img].copy_(vision().reshape(1, n_img, -1))
        return embeds

    with_vision()
    passes: dict[str, Any] = {}
    for flash in (False, True):
        policy.prefix_flash = flash
        policy.reset_graphs()
        policy.capture_all(7)
        name = "prefix_flash" if flash else "prefix_masked"
        passes[name] = time_events(lambda: policy.prefix_from_embeds(embeds), cfg.pass_reps)
        hidden = policy.prefix_from_embeds(embeds).hidden.float()
        res[f"hidden_{name}"] = hidden
    diff = (res.pop("hidden_prefix_flash") - res.pop("hidden_prefix_masked")).abs().max().item()
    res["prefix_flash_vs_masked_max_abs"] = diff
    policy.prefix_flash = passes["prefix_flash"]["median_ms"] < passes["prefix_masked"]["median_ms"]
    policy.reset_graphs()
    policy.capture_all(7)
    state = policy.prefix_from_embeds(embeds)
    codes1 = torch.randint(0, s.grid_size, (1, s.chunk_len, s.action_hidden_dim), device=policy.device)
    drafts = {k: self_consistent_drafts(policy, embeds, k) for k in (2, 3, 7)}
    passes.update(time_block_passes(policy, state, drafts[7], cfg.pass_reps, codes1))
    res["passes"] = passes
    res["prefix_used"] = "flash" if policy.prefix_flash else "masked"
    res["tree_sweep"] = tree_sweep(policy, cfg.tree_blocks, cfg.pass_reps, graphs)
    res["chunks"] = bench_chunks(cfg, policy, proposer, drafts, with_vision)
    return res


def bench_chunks(cfg: Bench7BConfig, policy: TwinPolicy, proposer, drafts, with_vision) -> dict[str, Any]:
    """End-to-end chunk latency of every variant, rotating order; each includes the vision encoder."""
    L = policy.shape.num_layers
    variants: dict[str, tuple] = {f"truncate_k{k}": ("truncate", k) for k in range(1, L + 1)}
    for D, k in ((3, 2), (8, 3), (8, 7)):
        for j in range(k + 1) if k < 7 else (0, 7):
            variants[f"D{D}_rsd_k{k}_j{j}"] = ("rsd", D, k, j)
    engines = {
        name: RSDEngine(policy, None, RSDConfig(stage_timing=False))
        if v[0] == "truncate"
        else forced_engine(policy, proposer, drafts[v[2]], v[3])
        for name, v in variants.items()
    }

    def run(name: str) -> int:
        v, eng = variants[name], engines[name]
        state = policy.prefix_from_embeds(with_vision())
        if v[0] == "truncate":
            codes, j = eng.decode_baseline(state, v[1]), 0
        else:
            policy.decode_layers = v[1]
            codes, _, j, _, _ = eng.decode_rsd(state, eng.proposer.propose(state.hidden))
            policy.decode_layers = None
        policy.codes_to_actions(codes)
        return j

    accepted = {}
    for name, v in variants.items():
        accepted[name] = run(name)
        if v[0] == "rsd" and accepted[name] != v[3]:
            log.warning("%s: forced j = %d but the engine accepted %d", name, v[3], accepted[name])
    times = time_rotating(run, list(variants), cfg.chunk_reps, policy.device)
    return {n: {**summarize(v), "accepted_j": accepted[n]} for n, v in times.items()}


def setup_twin(cfg: Bench7BConfig, results: dict[str, Any], device: torch.device) -> tuple[TwinPolicy, Any]:
    """The OFT-sized twin (600-token prefix) and its draft (in a CUDA graph on CUDA); floors and draft latency."""
    cuda = device.type == "cuda"
    twin_cfg = tiny_config(num_images=2, text_len=15) if cfg.tiny else llama7b_config(600)
    policy = make_twin(twin_cfg, device, cfg.seed, cuda)
    # rotary tables for the widest tree pass now: replacing them later would free memory that
    # captured CUDA graphs still read
    policy.model.ensure_positions(twin_cfg.prefix_len + max(cfg.tree_blocks) * twin_cfg.block_width + 16)
    torch.manual_seed(cfg.seed)
    draft = DraftProposer(
        RFSQDraftModelWithProjection(input_dim=twin_cfg.hidden_size), device=device, dtype=policy.dtype
    )
    proposer = GraphedProposer(draft, 1, twin_cfg.hidden_size) if cuda else draft
    results["draft_ms"] = time_events(
        lambda: proposer.propose(torch.zeros(1, twin_cfg.hidden_size, device=device)), cfg.pass_reps
    )
    floor = memory_floor_s(policy.weight_bytes() + policy.kv_bytes(), results["bandwidth_GBps"] * 1e9)
    results["twin"] = {
        "prefix_len": twin_cfg.prefix_len,
        "floor_ms": 1e3 * floor,
        "prefix_flops": prefix_flops(policy),
        "prefix_compute_floor_ms": 1e3 * prefix_flops(policy) / (results["bf16_tflops"] * 1e12),
        "modes": {},
    }
    return policy, proposer


def skinny_ready(cfg: Bench7BConfig, policy: TwinPolicy, twin: dict[str, Any]) -> bool:
    """Load the tuned preset (if any) and check the Triton products; False (logged) where they cannot run."""
    try:
        if cfg.skinny_preset is not None:
            log.info("skinny preset: %d tuned configs", load_skinny_preset(cfg.skinny_preset))
        twin["skinny_check"] = check_skinny(policy)
    except Exception as exc:  # noqa: BLE001 - a failed optional kernel must not lose the other modes
        log.error("skinny products unavailable (%s); mode skipped", exc)
        twin["skinny_error"] = str(exc)
        return False
    return True


def measure(cfg: Bench7BConfig, argv: list[str]) -> dict[str, Any]:
    device = torch.device(cfg.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run this on a GPU machine (or pass --tiny --device cpu)")
    cuda = device.type == "cuda"
    torch.backends.cuda.matmul.allow_tf32 = True
    results: dict[str, Any] = {
        "meta": run_meta(cfg, "python -m evaluator.bench_7b " + " ".join(argv), device),
        "bandwidth_GBps": copy_bandwidth(device) / 1e9 if cuda else 20.0,
        "bf16_tflops": gemm_tflops(device) if cuda else 0.1,
    }
    log.info("copy bandwidth %.0f GB/s, bf16 products %.0f TFLOP/s", results["bandwidth_GBps"],
             results["bf16_tflops"])  # fmt: skip
    vis = bench_vision(cfg, device, torch.bfloat16 if cuda else torch.float32, cuda)
    results["vision"] = vis["summary"]
    policy, proposer = setup_twin(cfg, results, device)
    for mode in cfg.modes if cuda else ["eager"]:
        if mode.endswith("_skinny") and not skinny_ready(cfg, policy, results["twin"]):
            continue
        log.info("mode %s", mode)
        results["twin"]["modes"][mode] = bench_mode(cfg, policy, mode, vis["runner"], proposer, cuda)
        write_json(results, cfg.out)
    if cfg.prefix_study and cuda:
        results["twin"]["prefix_study"] = prefix_study(cfg, policy)
    return results


@torch.no_grad()
def prefix_study(cfg: Bench7BConfig, policy: TwinPolicy) -> dict[str, Any]:
    """Where the prefix pass's time goes: its 128 matrix products alone (cuBLAS, one CUDA graph), and
    the causal flash prefix with a max-autotune compiled layer (Triton GEMM templates for P rows)."""
    c = policy.cfg
    P, D, I = c.prefix_len, c.hidden_size, c.intermediate_size
    xd = torch.randn(P, D, device=policy.device, dtype=policy.dtype)
    xi = torch.randn(P, I, device=policy.device, dtype=policy.dtype)

    def products() -> None:
        for layer in policy.model.layers:
            F.linear(xd, layer.wqkv)
            F.linear(xd, layer.wo)
            F.linear(xd, layer.wgu)
            F.linear(xi, layer.wdown)

    out: dict[str, Any] = {"products_only": time_events(graphed(products), cfg.pass_reps)}
    embeds = torch.randn(1, P, D, device=policy.device).to(policy.dtype)
    policy.prefix_flash = True
    try:
        t0 = time.perf_counter()
        policy.model.prefix_fn = torch.compile(
            layer_step, dynamic=False, fullgraph=True, mode="max-autotune-no-cudagraphs"
        )
        policy.reset_graphs()
        policy.prefix_from_embeds(embeds)
        out["autotune_s"] = time.perf_counter() - t0
        out["prefix_flash_max_autotune"] = time_events(
            lambda: policy.prefix_from_embeds(embeds), cfg.pass_reps
        )
    except Exception as exc:  # noqa: BLE001 - optional variant
        log.error("max-autotune prefix failed: %s", exc)
        out["autotune_error"] = str(exc)
    finally:
        policy.model.prefix_fn = None
    log.info("prefix study: %s", {k: v["median_ms"] for k, v in out.items() if isinstance(v, dict)})
    return out


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    cfg = parse_config(Bench7BConfig, argv, prog="python -m evaluator.bench_7b")
    setup_logging("bench_7b")
    results = json.loads(Path(cfg.timings).read_text()) if cfg.timings else measure(cfg, argv)
    results["projection_inputs"] = projection_inputs(results)
    if cfg.eval_json is not None:
        results["projection"] = projection(
            results, json.loads(Path(cfg.eval_json).read_text()), str(cfg.eval_json)
        )
    write_json(results, cfg.out)
    if cfg.markdown is not None:
        cfg.markdown.parent.mkdir(parents=True, exist_ok=True)
        cfg.markdown.write_text(render_markdown(results))
    p = results["projection_inputs"]
    log.info(
        "%s: vision %.2f ms, prefix %.2f ms, block %.2f ms; chunk D=3 %.2f ms, D=8 %.2f ms; strict j=2 at D=3: %.2fx",
        p["mode"], p["vision_ms"], p["prefix_ms"], p["block_ms"], p["chunk_ms"]["truncate_k3"],
        p["chunk_ms"]["truncate_k8"], p["chunk_ms"]["truncate_k3"] / p["chunk_ms"]["D3_rsd_k2_j2"],
    )  # fmt: skip
    log.info("wrote %s", cfg.out)


if __name__ == "__main__":
    main()
