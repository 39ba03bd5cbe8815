"""What the GPU benchmarks of the 7B timing twin share (evaluator/bench_gpu.py, evaluator/bench_7b.py).

- timing: CUDA-event medians (host clocks on the CPU), CUDA-graph replay, the device's copy bandwidth
  and bf16 matrix rate (the memory- and compute-floor denominators), variants timed in rotating order;
- the twin from the backend registry, and the pass timings both benchmarks report (block 0, block l > 0,
  verify of k drafted layers);
- forcing the accepted j: random weights give random predictions, so the drafted codes are built to
  be self-consistent with the verify pass (D_l = M_l for all l, found by k fixed-point passes) and
  layer j is then corrupted; strict acceptance then accepts exactly j layers and the engine does exactly
  the work it does on a real chunk with that j;
- the Triton skinny products (common/vla/twin_triton.py, imported only here and only when asked for:
  triton is an optional dependency): their check against ``F.linear`` and their tuned block shapes.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
import torch.nn.functional as F

from common.cli import config_to_dict
from common.vla import load_policy
from common.vla.twin import TwinConfig, TwinPolicy
from evaluator.rsd import DraftProposer, Proposal, RSDConfig, RSDEngine

log = logging.getLogger("bench_twin")


# ------------------------------------------------------------------------------------------ timing
def summarize(ms: list[float]) -> dict[str, float]:
    s = sorted(ms)
    return {
        "median_ms": statistics.median(s),
        "p90_ms": s[min(len(s) - 1, int(round(0.9 * (len(s) - 1))))],
        "min_ms": s[0],
        "n": len(s),
    }


def time_events(fn: Callable[[], Any], reps: int, warmup: int = 3) -> dict[str, float]:
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


def graphed(fn: Callable[[], Any]) -> Callable[[], None]:
    """``fn`` captured once in a CUDA graph (after one eager run); returns the graph's replay."""
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def time_rotating(run: Callable[[str], Any], names: Sequence[str], reps: int, device: torch.device) -> dict:
    """Host wall time (ms) of ``run(name)`` for every name, ``reps`` rounds, the order rotating each round."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    names = list(names)
    times: dict[str, list[float]] = {n: [] for n in names}
    for rep in range(reps):
        for name in names[rep % len(names) :] + names[: rep % len(names)]:
            sync()
            t = time.perf_counter()
            run(name)
            sync()
            times[name].append((time.perf_counter() - t) * 1e3)
    return times


def copy_bandwidth(device: torch.device, gib: float = 2.0, reps: int = 20) -> float:
    """Device-to-device copy bandwidth in bytes/s (bytes read + bytes written)."""
    n = int(gib * 2**30) // 2
    src = torch.randn(n, device=device, dtype=torch.float32).to(torch.bfloat16)
    dst = torch.empty_like(src)
    t = time_events(lambda: dst.copy_(src), reps)
    return 2 * n * 2 / (t["median_ms"] / 1e3)


def gemm_tflops(device: torch.device, n: int = 8192, reps: int = 10) -> float:
    """Dense bf16 matrix-product rate (TFLOP/s) of an n x n x n product: the compute-floor denominator."""
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    t = time_events(lambda: a @ b, reps)
    return 2 * n**3 / (t["median_ms"] / 1e3) / 1e12


def run_meta(cfg: Any, command: str, device: torch.device) -> dict[str, Any]:
    """The ``meta`` block of a benchmark's JSON: device, versions, date, the command and its config."""
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d"),
        "command": command,
        "config": config_to_dict(cfg),
    }


def write_json(results: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=1))


# ------------------------------------------------------------------------------------------ the twin
def make_twin(config: TwinConfig, device: torch.device, seed: int, cuda_graphs: bool) -> TwinPolicy:
    """The twin of ``config`` from the backend registry: bf16 on CUDA, float32 on the CPU."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    policy = load_policy(
        "twin", device=device, seed=seed, config=config, dtype=dtype, cuda_graphs=cuda_graphs
    )
    assert isinstance(policy, TwinPolicy)
    return policy


def time_block_passes(
    policy: TwinPolicy, state: Any, drafted: torch.Tensor, reps: int, codes1: torch.Tensor
) -> dict[str, Any]:
    """Block 0, a block l > 0 (codes1 [B, T, H]) and verify passes of k = 1..K drafted layers (drafted [B, K, T, H])."""

    def block0() -> None:
        policy.truncate(state, 0)
        policy.decode_block(state, None)

    def block1() -> None:
        policy.truncate(state, 1)
        policy.decode_block(state, codes1)

    out = {"block0": time_events(block0, reps), "block": time_events(block1, reps)}
    for k in range(1, drafted.shape[1] + 1):
        d = drafted[:, :k]

        def ver(d: torch.Tensor = d) -> None:
            policy.truncate(state, 0)
            policy.verify(state, d)

        out[f"verify_k{k}"] = time_events(ver, reps)
    return out


# ------------------------------------------------------------------------------------------ forcing j
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

    def __init__(self, inner: Any, codes: torch.Tensor):
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


def forced_engine(policy: TwinPolicy, proposer: Any, drafted: torch.Tensor, j: int) -> RSDEngine:
    """A strict RSD engine whose proposals (drafted [B, k, T, H], self-consistent) are accepted exactly j deep."""
    fixed = FixedProposer(proposer, corrupt_from(drafted, j, policy.shape.grid_size))
    return RSDEngine(policy, fixed, RSDConfig(stage_timing=False))


# ------------------------------------------------------------------------------------------ skinny products
def triton_products() -> ModuleType:
    """common.vla.twin_triton (imports triton: a heavy optional dependency, only for the skinny modes)."""
    from common.vla import twin_triton

    return twin_triton


@torch.no_grad()
def check_skinny(policy: TwinPolicy) -> dict[str, float]:
    """The Triton products against F.linear on the twin's real shapes (bf16): largest relative error."""
    tt = triton_products()
    cfg, layer = policy.cfg, policy.model.layers[0]
    W, D, I = cfg.block_width, cfg.hidden_size, cfg.intermediate_size
    gen = torch.Generator(device=policy.device).manual_seed(0)

    def rnd(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, device=policy.device, generator=gen).to(policy.dtype)

    out = {}
    for name, x, w, r, sw in [
        ("qkv", rnd(W, D), layer.wqkv, None, False),
        ("o_residual", rnd(W, D), layer.wo, rnd(W, D), False),
        ("gate_up", rnd(W, D), layer.wgu, None, False),
        ("down_swiglu_residual", rnd(W, 2 * I), layer.wdown, rnd(W, D), True),
    ]:
        ref = tt.reference(x, w, r, sw).float()
        err = ((tt.launch(x, w, r, sw).float() - ref).abs().max() / ref.abs().max()).item()
        out[name] = err
        if err > 2e-2:
            raise RuntimeError(f"skinny product {name}: relative error {err:.3g} against F.linear")
    log.info("skinny products match F.linear: %s", {k: f"{v:.1e}" for k, v in out.items()})
    return out


@torch.no_grad()
def gemm_only_ms(policy: TwinPolicy, reps: int, skinny: bool = False) -> dict[str, float]:
    """The 4 x 32 matrix products of one block pass (W rows) alone, from a CUDA graph: what cuBLAS
    (or, with ``skinny``, the Triton kernels with their fused residual/SwiGLU) allows."""
    cfg = policy.cfg
    W, D, I = cfg.block_width, cfg.hidden_size, cfg.intermediate_size
    xd = torch.randn(1, W, D, device=policy.device, dtype=policy.dtype)
    xi = torch.randn(1, W, I, device=policy.device, dtype=policy.dtype)
    launch = triton_products().launch if skinny else None
    if skinny:
        xd, x2i = xd[0], torch.randn(W, 2 * I, device=policy.device, dtype=policy.dtype)

    def run() -> None:
        for layer in policy.model.layers:
            if launch is not None:
                launch(xd, layer.wqkv)
                launch(xd, layer.wo, xd)
                launch(xd, layer.wgu)
                launch(x2i, layer.wdown, xd, True)
                continue
            F.linear(xd, layer.wqkv)
            F.linear(xd, layer.wo)
            F.linear(xd, layer.wgu)
            F.linear(xi, layer.wdown)

    return time_events(graphed(run), reps)


def load_skinny_preset(path: Path) -> int:
    """Fill the skinny products' tuned-config table from an earlier run's JSON; returns entries loaded."""
    tt = triton_products()
    d = json.loads(Path(path).read_text())
    res = next(iter(d["prefixes"].values())) if "prefixes" in d else d
    picked = res["skinny_configs"]["picked"]
    n = 0
    for key, cfg in picked.items():
        k = key.strip("()").split(", ")
        tt._best[(int(k[0]), int(k[1]), int(k[2]), k[3] == "True", k[4] == "True", torch.bfloat16)] = tuple(
            int(x) for x in cfg.strip("()").split(", ")
        )
        n += 1
    return n
