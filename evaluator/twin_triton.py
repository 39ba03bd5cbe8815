"""Skinny matrix products for the twin's block passes, as a Triton kernel (CUDA machines only).

A block pass multiplies 8 rows (one action chunk) by every weight matrix of the 7B decoder: its cost
is reading the weights once. ``skinny_linear`` computes ``x @ w.T`` for up to 64 rows in one kernel
that streams ``w`` exactly once (each program owns a strip of output columns and walks the whole
reduction; no split-K, so no second reduction kernel), and fuses the layer's small neighbours into it:

- ``residual``: ``residual + x @ w.T`` (the residual add after the attention and MLP products);
- ``swiglu``: ``x`` holds ``[gate | up]`` and the product is ``silu(gate) * up @ w.T`` (the SwiGLU
  between the MLP's two products), computed on the fly while loading ``x``.

It is registered as the custom op ``torch.ops.rsd_twin.skinny_linear`` so that ``torch.compile``
treats it as one opaque kernel and keeps fusing the elementwise work around it. Rows beyond 64 (the
prefix pass) fall back to ``F.linear``. ``TRITON_INTERPRET=1`` runs the kernel on CPU tensors (for
tests); on CUDA the block shape is autotuned per (rows, columns, reduction) shape at its first call.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

MAX_ROWS = 64

_CONFIGS = [
    triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
    for bn, bk, w, s in [
        (16, 256, 4, 4),
        (16, 512, 4, 3),
        (16, 512, 8, 4),
        (32, 128, 4, 5),
        (32, 256, 4, 4),
        (32, 256, 8, 4),
        (32, 512, 8, 3),
        (64, 128, 4, 4),
        (64, 128, 8, 5),
        (64, 256, 8, 3),
        (64, 256, 8, 4),
        (128, 128, 8, 4),
    ]
]


@triton.jit
def _skinny_kernel(
    x_ptr,
    w_ptr,
    out_ptr,
    res_ptr,
    M,
    N,
    K,
    stride_xm,
    stride_wn,
    stride_om,
    stride_rm,
    HAS_RES: tl.constexpr,
    SWIGLU: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    EVEN_K: tl.constexpr,
    EVEN_N: tl.constexpr,
):
    pid = tl.program_id(0)
    rm = tl.arange(0, BLOCK_M)
    rn = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    rk0 = tl.arange(0, BLOCK_K)
    m_ok = rm[:, None] < M
    n_ok = rn[:, None] < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + rk0
        x_mask = m_ok if EVEN_K else m_ok & (rk[None, :] < K)
        x_off = rm[:, None] * stride_xm + rk[None, :]
        if SWIGLU:  # x = [gate | up], each K wide: a = silu(gate) * up
            g = tl.load(x_ptr + x_off, mask=x_mask, other=0.0).to(tl.float32)
            u = tl.load(x_ptr + x_off + K, mask=x_mask, other=0.0).to(tl.float32)
            a = (g * tl.sigmoid(g) * u).to(w_ptr.dtype.element_ty)
        else:
            a = tl.load(x_ptr + x_off, mask=x_mask, other=0.0)
        w_off = rn[:, None] * stride_wn + rk[None, :]
        if EVEN_K and EVEN_N:
            w = tl.load(w_ptr + w_off)
        elif EVEN_K:
            w = tl.load(w_ptr + w_off, mask=n_ok, other=0.0)
        else:
            w = tl.load(w_ptr + w_off, mask=n_ok & (rk[None, :] < K), other=0.0)
        acc += tl.dot(a, tl.trans(w))
    o_mask = (rm[:, None] < M) & (rn[None, :] < N)
    if HAS_RES:
        acc += tl.load(res_ptr + rm[:, None] * stride_rm + rn[None, :], mask=o_mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + rm[:, None] * stride_om + rn[None, :], acc.to(out_ptr.dtype.element_ty), mask=o_mask)


def _evens(args: dict) -> dict:
    return {"EVEN_K": args["K"] % args["BLOCK_K"] == 0, "EVEN_N": args["N"] % args["BLOCK_N"] == 0}


_fixed = triton.heuristics(
    {"EVEN_K": lambda a: _evens(a)["EVEN_K"], "EVEN_N": lambda a: _evens(a)["EVEN_N"]}
)(_skinny_kernel)
_tuned = triton.autotune(configs=_CONFIGS, key=["M", "N", "K", "SWIGLU", "HAS_RES"])(_fixed)


def reference(x: torch.Tensor, w: torch.Tensor, residual: torch.Tensor | None, swiglu: bool) -> torch.Tensor:
    if swiglu:
        gate, up = x.chunk(2, dim=-1)
        x = F.silu(gate) * up
    y = F.linear(x, w)
    return y if residual is None else residual + y


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
    out = torch.empty(M, N, device=x.device, dtype=x.dtype)
    res = residual.contiguous() if residual is not None else out
    block_m = max(16, triton.next_power_of_2(M))
    args = (x, w, out, res, M, N, K, x.stride(0), w.stride(0), out.stride(0), res.stride(0))
    flags = {"HAS_RES": residual is not None, "SWIGLU": swiglu, "BLOCK_M": block_m}
    if x.device.type == "cuda" and not os.environ.get("TRITON_INTERPRET"):
        _tuned[lambda meta: (triton.cdiv(N, meta["BLOCK_N"]),)](*args, **flags)
    else:  # the interpreter (CPU tensors): one fixed block shape
        bn, bk = 32, 64
        _fixed[(triton.cdiv(N, bn),)](*args, BLOCK_N=bn, BLOCK_K=bk, **flags)
    return out


@torch.library.custom_op("rsd_twin::skinny_linear", mutates_args=())
def skinny_linear(
    x: torch.Tensor, w: torch.Tensor, residual: torch.Tensor | None, swiglu: bool
) -> torch.Tensor:
    """[M, K'] x [N, K] (+ residual [M, N]) -> [M, N]; see the module docstring."""
    return launch(x, w, residual, swiglu)


@skinny_linear.register_fake
def _(x: torch.Tensor, w: torch.Tensor, residual: torch.Tensor | None, swiglu: bool) -> torch.Tensor:
    return x.new_empty(x.shape[0], w.shape[0])


def best_configs() -> dict[str, str]:
    """The block shapes autotuning picked, per tuned key (for the benchmark's JSON)."""
    return {str(k): str(v) for k, v in getattr(_tuned, "cache", {}).items()}
