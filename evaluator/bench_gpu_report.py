"""The speedups and the Markdown report of evaluator/bench_gpu.py (no GPU needed: they read its JSON).

The expected speedup of an acceptance distribution over j = 0..k (measured on the embedded VLA by a CPU
eval, ``--eval-json``, or given, ``--acceptance``) weights the end-to-end chunk latencies timed with
exactly j accepted layers; JSON files of earlier runs, with modes that are no longer measured, are
read the same way.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def acceptance_distributions(
    eval_json: Path | None = None, acceptance: list[float] | None = None
) -> dict[str, list[float]]:
    """name -> probabilities of j = 0..k (from --eval-json and/or --acceptance)."""
    dists: dict[str, list[float]] = {}
    if eval_json is not None:
        ev = json.loads(Path(eval_json).read_text())
        depth = ev.get("meta", {}).get("decode_layers")
        if depth is not None and depth != ev["meta"].get("num_layers", depth):
            raise ValueError(
                f"{eval_json} decodes {depth} layers; these timings assume all 8: project it with "
                "`python -m evaluator.bench_7b --timings docs/bench/honest/gpu_7b.json --eval-json …`"
            )
        for arm, block in ev.get("arms", {}).items():  # every RSD arm of the CPU eval, sweeps included
            hist = block.get("j_histogram")
            if arm != "baseline" and hist and sum(hist) > 0:
                dists[f"embedded_vla_{arm}"] = [h / sum(hist) for h in hist]
    if acceptance is not None:
        dists["given"] = [p / sum(acceptance) for p in acceptance]
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
        lines += _prefix_lines(res)
    return "\n".join(lines + _expected_lines(results))


def _prefix_lines(res: dict[str, Any]) -> list[str]:
    """Passes against the floor, the products alone, the draft and the chunks of one prefix length."""
    lines = [
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
    return lines


def _expected_lines(results: dict[str, Any]) -> list[str]:
    """The expected speedups of the fastest mode per prefix length."""
    exp = results.get("expected_speedup") or {}
    if not exp:
        return ["No acceptance distribution given: speedups above are per accepted j only.", ""]
    best = {
        pkey: min(res["modes"], key=lambda m, r=res: r[f"chunks_{m}"]["baseline"]["median_ms"])
        for pkey, res in results["prefixes"].items()
    }
    lines = [
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
    return lines + [""]
