"""Skinny matrix products for the twin's block passes, as a Triton kernel (CUDA machines only).

Imported only where it is used (triton is an optional dependency):
:meth:`common.vla.twin_model.TwinModel.use_skinny` and the GPU benchmarks.

A block pass multiplies 8 rows (one action chunk) by every weight matrix of the 7B decoder: its cost
is reading the weights once. ``skinny_linear`` computes ``x @ w.T`` for up to 8 rows with the weight
tile as the left operand of the dot in its stored layout (the few rows of ``x`` padded to 16 on the
right), optionally split over the reduction (fp32 partial sums and one small reduction kernel), and
fuses the layer's small neighbours into it:

- ``residual``: ``residual + x @ w.T`` (the residual add after the attention and MLP products);
- ``swiglu``: ``x`` holds ``[gate | up]`` and the product is ``silu(gate) * up @ w.T`` (the SwiGLU
  between the MLP's two products), computed on the fly while loading ``x``.

It is registered as the custom op ``torch.ops.rsd_twin.skinny_linear`` so that ``torch.compile``
treats it as one opaque kernel and keeps fusing the elementwise work around it. More than 8 rows
(verify and prefix passes) fall back to ``F.linear``. On CUDA the block shape and split are tuned per
shape at the first call (every candidate timed with CUDA events; do that call before graph capture);
``TRITON_INTERPRET=1`` runs the kernels on CPU tensors with a fixed block shape (tests).
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from common.vla.twin_config import SKINNY_MAX_ROWS as MAX_ROWS  # block passes: 8 rows; wider: cuBLAS


@triton.jit
def _skinny_kernel(
    x_ptr,
    w_ptr,
    out_ptr,
    res_ptr,
    M,
    N,
    K,
    K_PER_SPLIT,
    stride_xm,
    stride_wn,
    stride_om,
    stride_os,
    stride_rm,
    HAS_RES: tl.constexpr,
    SWIGLU: tl.constexpr,
    SPLIT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    EVEN_K: tl.constexpr,
):
    """acc[n, m] = sum_k w[n, k] x[m, k] over this program's strip of columns and slice of K.

    The weight tile is the dot's left operand in its stored (row-major) layout; the few rows of x are
    the right operand. SPLIT > 1: fp32 partial sums to a workspace [SPLIT, M, N] (_reduce_kernel adds
    them, the residual and casts)."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = tl.arange(0, BLOCK_M)
    rk0 = tl.arange(0, BLOCK_K)
    n_ok = rn[:, None] < N  # [BN, 1]
    m_ok = rm[None, :] < M  # [1, BM]
    k_lo = pid_k * K_PER_SPLIT
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for k0 in range(k_lo, k_lo + K_PER_SPLIT, BLOCK_K):
        rk = k0 + rk0
        xt_off = rm[None, :] * stride_xm + rk[:, None]  # [BK, BM]
        xt_mask = m_ok if EVEN_K else m_ok & (rk[:, None] < K)
        if SWIGLU:  # x = [gate | up], each K wide: a = silu(gate) * up
            g = tl.load(x_ptr + xt_off, mask=xt_mask, other=0.0).to(tl.float32)
            u = tl.load(x_ptr + xt_off + K, mask=xt_mask, other=0.0).to(tl.float32)
            xt = (g * tl.sigmoid(g) * u).to(w_ptr.dtype.element_ty)
        else:
            xt = tl.load(x_ptr + xt_off, mask=xt_mask, other=0.0)
        w_off = rn[:, None] * stride_wn + rk[None, :]  # [BN, BK]
        if EVEN_K:
            w = tl.load(w_ptr + w_off, mask=n_ok, other=0.0)
        else:
            w = tl.load(w_ptr + w_off, mask=n_ok & (rk[None, :] < K), other=0.0)
        acc += tl.dot(w, xt)
    o_off = rm[None, :] * stride_om + rn[:, None]  # [BN, BM] -> out[m, n]
    o_mask = n_ok & m_ok
    if SPLIT == 1:
        if HAS_RES:
            acc += tl.load(res_ptr + rm[None, :] * stride_rm + rn[:, None], mask=o_mask, other=0.0).to(
                tl.float32
            )
        tl.store(out_ptr + o_off, acc.to(out_ptr.dtype.element_ty), mask=o_mask)
    else:
        tl.store(out_ptr + pid_k * stride_os + o_off, acc, mask=o_mask)


@triton.jit
def _reduce_kernel(
    ws_ptr, out_ptr, res_ptr, MN, SPLIT: tl.constexpr, HAS_RES: tl.constexpr, BLOCK: tl.constexpr
):
    """out = sum over the SPLIT partial sums (+ residual), cast to out's dtype; all [M, N] contiguous."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < MN
    acc = tl.load(ws_ptr + offs, mask=ok, other=0.0)
    for s in tl.static_range(1, SPLIT):
        acc += tl.load(ws_ptr + s * MN + offs, mask=ok, other=0.0)
    if HAS_RES:
        acc += tl.load(res_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=ok)


def reference(x: torch.Tensor, w: torch.Tensor, residual: torch.Tensor | None, swiglu: bool) -> torch.Tensor:
    if swiglu:
        gate, up = x.chunk(2, dim=-1)
        x = F.silu(gate) * up
    y = F.linear(x, w)
    return y if residual is None else residual + y


def _run(x, w, residual, swiglu, cfg: tuple[int, int, int, int, int]) -> torch.Tensor:
    """One launch with block shape cfg = (BLOCK_N, BLOCK_K, SPLIT, num_warps, num_stages)."""
    bn, bk, split, warps, stages = cfg
    M = x.shape[0]
    N, K = w.shape
    out = torch.empty(M, N, device=x.device, dtype=x.dtype)
    res = residual if residual is not None else out
    k_per_split = triton.cdiv(triton.cdiv(K, bk), split) * bk
    even_k = K % (bk * split) == 0
    ws = torch.empty(split, M, N, device=x.device, dtype=torch.float32) if split > 1 else out
    _skinny_kernel[(triton.cdiv(N, bn), split)](
        x, w, ws, res, M, N, K, k_per_split, x.stride(0), w.stride(0), N, M * N, res.stride(0),
        HAS_RES=residual is not None and split == 1, SWIGLU=swiglu, SPLIT=split, BLOCK_M=16, BLOCK_N=bn,
        BLOCK_K=bk, EVEN_K=even_k, num_warps=warps, num_stages=stages,
    )  # fmt: skip
    if split > 1:
        block = 1024
        _reduce_kernel[(triton.cdiv(M * N, block),)](
            ws, out, res, M * N, SPLIT=split, HAS_RES=residual is not None, BLOCK=block
        )
    return out


def candidates(N: int, K: int, sms: int, wide: bool = False) -> list[tuple[int, int, int, int, int]]:
    """Block shapes worth timing: (BLOCK_N, BLOCK_K, SPLIT, num_warps, num_stages) with enough programs
    for every SM. ``wide``: a larger space (more shapes, splits up to 16; about 4x the tuning time)."""
    out = []
    bns, bks = ((16, 32, 64, 128), (64, 128, 256, 512)) if wide else ((16, 32, 64), (128, 256))
    splits = (1, 2, 4, 8, 16) if wide else (1, 2, 4, 8)
    schedules = ((4, 3), (4, 5))
    lo, hi = (sms, 64 * sms) if wide else (2 * sms, 32 * sms)
    for bn in bns:
        for bk in bks:
            if bn * bk > 32768:  # the weight tile alone would not fit the pipeline's shared memory
                continue
            for split in splits:
                programs = triton.cdiv(N, bn) * split
                if not lo <= programs <= hi or bk * split > K:
                    continue
                for warps, stages in schedules:
                    out.append((bn, bk, split, warps, stages))
    return out


WIDE_SEARCH = True  # tune over candidates(wide=True); bench_gpu --no-skinny-wide: the small space
_best: dict[tuple, tuple[int, int, int, int, int]] = {}
_timings: dict[str, dict[str, float]] = {}


def _graph_ms(fn, launches: int = 10, reps: int = 5) -> float:
    """Milliseconds per call of fn, replayed from a CUDA graph (no Python launch overhead in the timing)."""
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(launches):
            fn()
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / (reps * launches)


def _tune(x, w, residual, swiglu, key: tuple) -> tuple[int, int, int, int, int]:
    """Time every candidate block shape on these inputs (from CUDA graphs); keep the fastest."""
    if torch.cuda.is_current_stream_capturing():
        raise RuntimeError(f"skinny_linear {key}: not tuned before CUDA graph capture (run it once eagerly)")
    sms = torch.cuda.get_device_properties(x.device).multi_processor_count
    results = {}
    with torch.cuda.stream(torch.cuda.Stream(x.device)):  # graph capture needs a side stream
        for cfg in candidates(w.shape[0], w.shape[1], sms, WIDE_SEARCH):
            try:
                results[cfg] = _graph_ms(lambda cfg=cfg: _run(x, w, residual, swiglu, cfg))
            except Exception:  # a block shape this GPU cannot run (shared memory): skip it
                continue
        results["cublas"] = _graph_ms(lambda: reference(x, w, residual, swiglu))
    cublas = results.pop("cublas")
    if not results:
        raise RuntimeError(f"skinny_linear {key}: no block shape ran")
    best = min(results, key=results.get)
    fastest = sorted(results.items(), key=lambda kv: kv[1])[:5]
    plain = _graph_ms(lambda: F.linear(x[:, : w.shape[1]], w))  # the product alone, without SwiGLU/residual
    _timings[str(key)] = {
        "cublas": round(cublas * 1e3, 2),
        "cublas_product_only": round(plain * 1e3, 2),
        **{str(c): round(t * 1e3, 2) for c, t in fastest},
    }
    return best


def launch(
    x: torch.Tensor, w: torch.Tensor, residual: torch.Tensor | None = None, swiglu: bool = False
) -> torch.Tensor:
    """x [M, K'] (K' = K, or 2K with swiglu), w [N, K], residual [M, N] or None -> [M, N]."""
    M = x.shape[0]
    N, K = w.shape
    if x.shape[1] != (2 * K if swiglu else K):
        raise ValueError(f"x has {x.shape[1]} columns, w {K} (swiglu={swiglu})")
    if M > MAX_ROWS:
        return reference(x, w, residual, swiglu)
    x, w = x.contiguous(), w.contiguous()
    residual = residual.contiguous() if residual is not None else None
    if x.device.type != "cuda" or os.environ.get("TRITON_INTERPRET"):  # the interpreter: fixed shapes
        return _run(x, w, residual, swiglu, (32, 64, 2 if K >= 128 else 1, 4, 1))
    key = (M, N, K, swiglu, residual is not None, x.dtype)
    if key not in _best:
        _best[key] = _tune(x, w, residual, swiglu, key)
    return _run(x, w, residual, swiglu, _best[key])


@torch.library.custom_op("rsd_twin::skinny_linear", mutates_args=())
def skinny_linear(
    x: torch.Tensor, w: torch.Tensor, residual: torch.Tensor | None, swiglu: bool
) -> torch.Tensor:
    """[M, K'] x [N, K] (+ residual [M, N]) -> [M, N]; see the module docstring."""
    return launch(x, w, residual, swiglu)


@skinny_linear.register_fake
def _(x: torch.Tensor, w: torch.Tensor, residual: torch.Tensor | None, swiglu: bool) -> torch.Tensor:
    return x.new_empty(x.shape[0], w.shape[0])


def best_configs() -> dict[str, Any]:
    """The block shapes tuning picked (BLOCK_N, BLOCK_K, SPLIT, warps, stages) and the five fastest
    timings (µs) per shape, for the benchmark's JSON."""
    return {"picked": {str(k): str(v) for k, v in _best.items()}, "fastest_us": dict(_timings)}
