"""What lossless (strict) RSD can gain at 7B, measured: the acceptance it needs against the acceptance
its drafts achieve, with and without tree verification (DESIGN §6).

Strict acceptance keeps drafted layer l only if all T·H = 128 of its tokens equal the policy's own
prediction, because every position of block l+1 attends to all of layer l. With D decoded layers and
k = D - 1 drafted ones a chunk costs

    baseline = vision + prefix + D·block
    strict   = vision + prefix + draft + verify(1 + k blocks) + (D - 1 - j)·block

so a speedup s needs a mean accepted depth E[j] >= (D - 1) - (baseline/s - vision - prefix - draft - verify)/block.

**Tree verification.** The draft gives per-token distributions; the N most probable whole layers
under them (exact k-best of a product of independent factors, :func:`candidate_rank`) can all be
checked in one wider verify pass: a tree with N_0 candidate blocks for layer 0, N_1 children each for
layer 1, … (1 + N_0 + N_0·N_1 + … blocks, each attending to its ancestors only). Layer l is accepted
when the policy's exact layer is among its N_l candidates (and the layers before it were). The
verify pass gets wider, so the speed gain needs the hit rate to grow faster than its cost.

    python -m evaluator.lossless_bound --eval-json RUN/eval/eval.json --timings docs/bench/gpu_7b.json \
        --out docs/bench/lossless_bound.md
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

TREE_MAX_CANDIDATES = 64
HIT_WIDTHS = (1, 2, 4, 8, 16, 32, 64)


def candidate_rank(probs: torch.Tensor, truth: torch.Tensor, max_candidates: int) -> int:
    """1-based rank of ``truth`` among the ``max_candidates`` most probable whole-layer candidates.

    probs [n, G] independent per-token distributions, truth [n] long. Returns 0 when the true layer
    is not among them. Beam search over tokens keeping the best ``max_candidates`` prefixes is exact
    for a product of independent factors: a full candidate in the top N has its prefix in the top N
    of prefixes (else N better prefixes with its suffix would beat it).
    """
    logp = probs.double().clamp_min(1e-300).log()  # [n, G]
    n, G = logp.shape
    levels = torch.arange(G)
    scores = torch.zeros(1, dtype=torch.float64)
    hit = torch.ones(1, dtype=torch.bool)  # which beam entries equal the truth so far
    for t in range(n):
        cand = (scores[:, None] + logp[t][None, :]).flatten()  # [b*G]
        hits = (hit[:, None] & (levels == truth[t])[None, :]).flatten()
        scores, idx = cand.topk(min(max_candidates, cand.numel()))  # sorted, best first
        hit = hits[idx]
        if not bool(hit.any()):
            return 0
    return int(hit.nonzero()[0, 0]) + 1


def hit_rates(ranks: list[list[int]], max_candidates: int) -> dict[str, Any]:
    """Fraction of chunks whose exact layer l is among N candidates (per layer), and jointly for the
    first two layers with N_0 x N_1 candidates."""
    r = np.asarray(ranks, dtype=np.int64)  # [chunks, K]
    widths = [w for w in HIT_WIDTHS if w <= max_candidates]
    within = {w: (r >= 1) & (r <= w) for w in widths}
    out: dict[str, Any] = {"per_layer": {str(w): within[w].mean(0).tolist() for w in widths}}
    if r.shape[1] >= 2:
        out["first_two_layers"] = {
            f"{a}x{b}": float((within[a][:, 0] & within[b][:, 1]).mean()) for a in widths for b in widths
        }
    return out


# ------------------------------------------------------------------------------------------ timings
@dataclass
class Timings7B:
    """Pass latencies of the 7B twin (ms) that a projection needs."""

    vision_ms: float
    prefix_ms: float
    block_ms: float
    draft_ms: float
    verify_ms_by_blocks: dict[int, float]  # verify pass over n blocks (n = 1 + drafted layers, or a tree)
    source: str

    def verify_ms(self, blocks: int) -> float:
        """Linear interpolation in the number of blocks (linear extrapolation past the widest measured)."""
        xs = sorted(self.verify_ms_by_blocks)
        ys = [self.verify_ms_by_blocks[x] for x in xs]
        if blocks in self.verify_ms_by_blocks:
            return self.verify_ms_by_blocks[blocks]
        if blocks > xs[-1] and len(xs) >= 2:
            return ys[-1] + (blocks - xs[-1]) * (ys[-1] - ys[-2]) / (xs[-1] - xs[-2])
        return float(np.interp(blocks, xs, ys))


def load_timings(path: Path, prefix: str = "p600", vision_ms: float | None = None) -> Timings7B:
    """From evaluator.bench_7b's JSON (``projection_inputs``) or an older evaluator.bench_gpu JSON (its
    fastest mode at ``prefix``; the vision encoder then from ``vision_ms``)."""
    d = json.loads(Path(path).read_text())
    if "projection_inputs" in d:
        p = d["projection_inputs"]
        return Timings7B(
            vision_ms=p["vision_ms"] if vision_ms is None else vision_ms,
            prefix_ms=p["prefix_ms"],
            block_ms=p["block_ms"],
            draft_ms=p["draft_ms"],
            verify_ms_by_blocks={int(k): v for k, v in p["verify_ms_by_blocks"].items()},
            source=f"{path} ({p.get('mode', '?')}, {d.get('meta', {}).get('device', '?')})",
        )
    if vision_ms is None:
        raise ValueError(f"{path} has no vision-encoder timing: pass vision_ms")
    res = d["prefixes"][prefix]
    mode = min(res["modes"], key=lambda m: res[f"passes_{m}"]["block"]["median_ms"])
    ps = res[f"passes_{mode}"]
    verify = {1: ps["block0"]["median_ms"]}
    verify.update(
        {1 + int(k[len("verify_k") :]): v["median_ms"] for k, v in ps.items() if k.startswith("verify_k")}
    )
    draft = res["draft"].get("K3_graphs", res["draft"].get("K3_eager"))["median_ms"]
    return Timings7B(
        vision_ms, ps["prefix"]["median_ms"], ps["block"]["median_ms"], draft, verify, f"{path} ({mode})"
    )


# ------------------------------------------------------------------------------------------ bound
def tree_blocks(widths: tuple[int, ...]) -> int:
    """Blocks of a verify tree: the query block plus N_0 + N_0 N_1 + … candidate blocks."""
    return 1 + sum(int(np.prod(widths[: i + 1])) for i in range(len(widths)))


def strict_projection(
    t: Timings7B, decode_layers: int, ranks: np.ndarray, widths: tuple[int, ...], target: float = 1.3
) -> dict[str, Any]:
    """Expected strict speedup with a verify tree of ``widths`` (one entry per drafted layer)."""
    D = decode_layers
    k = len(widths)
    if not 1 <= k <= min(D - 1, ranks.shape[1]):
        raise ValueError(f"a tree over {k} layers needs 1 <= k <= min(D - 1, drafted layers)")
    ok = np.ones(len(ranks), dtype=bool)
    p_at_least = []
    for layer, w in enumerate(widths):
        ok &= (ranks[:, layer] >= 1) & (ranks[:, layer] <= w)
        p_at_least.append(float(ok.mean()))
    mean_j = float(sum(p_at_least))
    blocks = tree_blocks(widths)
    fixed = t.vision_ms + t.prefix_ms + t.draft_ms + t.verify_ms(blocks)
    base = t.vision_ms + t.prefix_ms + D * t.block_ms
    rsd = fixed + (D - 1 - mean_j) * t.block_ms
    best = fixed + (D - 1 - k) * t.block_ms  # every drafted layer accepted
    needed = (D - 1) - (base / target - fixed) / t.block_ms
    return {
        "widths": list(widths),
        "verify_blocks": blocks,
        "verify_ms": t.verify_ms(blocks),
        "p_j_at_least": p_at_least,
        "mean_j": mean_j,
        "speedup": base / rsd,
        "speedup_if_all_accepted": base / best,
        "mean_j_needed": needed,
        "possible": needed <= k,
    }


def bound_table(
    t: Timings7B, decode_layers: int, ranks: np.ndarray, target: float = 1.3
) -> list[dict[str, Any]]:
    k = min(decode_layers - 1, ranks.shape[1])
    rows = [strict_projection(t, decode_layers, ranks, (1,) * k, target)]
    for w in HIT_WIDTHS[1:]:
        rows.append(strict_projection(t, decode_layers, ranks, (w,) + (1,) * (k - 1), target))
    if k >= 2:
        for a, b in itertools.product((2, 4, 8), (2, 4, 8)):
            rows.append(strict_projection(t, decode_layers, ranks, (a, b) + (1,) * (k - 2), target))
    return rows


def render(
    eval_json: dict[str, Any], t: Timings7B, tables: dict[int, list[dict[str, Any]]], target: float
) -> str:
    tree = eval_json["tree_verification"]
    acc = eval_json.get("draft_accuracy", {})
    meta = eval_json["meta"]
    lines = [
        "# The lossless bound: strict RSD at 7B, needed against achieved acceptance",
        "",
        f"Acceptance measured on the embedded VLA `{meta['policy']}` (decode_layers "
        f"{meta.get('decode_layers', '?')}), {eval_json['chunks']} chunks, draft `{meta['draft']['path']}`; "
        f"pass latencies from {t.source}: vision {t.vision_ms:.2f} ms, prefix {t.prefix_ms:.2f} ms, block "
        f"{t.block_ms:.2f} ms, draft {t.draft_ms:.2f} ms, verify over n blocks "
        + ", ".join(f"{n}: {v:.2f}" for n, v in sorted(t.verify_ms_by_blocks.items()))
        + " ms.",
        "",
        "Draft token accuracy per layer "
        + ", ".join(f"L{i} {a:.3f}" for i, a in enumerate(acc.get("token_per_layer", [])))
        + "; whole layer exact "
        + ", ".join(f"L{i} {a:.3f}" for i, a in enumerate(acc.get("exact_per_layer", [])))
        + ".",
        "",
        "## How often the exact layer is among the draft's N most probable whole layers",
        "",
        "| N | " + " | ".join(f"L{i}" for i in range(len(tree["ranks"][0]))) + " |",
        "|---:|" + "---:|" * len(tree["ranks"][0]),
    ]
    for w, rates in tree["hit_at"]["per_layer"].items():
        lines.append(f"| {w} | " + " | ".join(f"{r:.3f}" for r in rates) + " |")
    for D, rows in tables.items():
        lines += [
            "",
            f"## D = {D} decoded layers: strict speedup by verify tree (target {target:g}×)",
            "",
            "| tree widths (per drafted layer) | verify blocks | verify ms | P(j ≥ 1), P(j ≥ 2), … | mean j achieved | "
            f"mean j needed for {target:g}× | speedup at measured acceptance | speedup if all accepted |",
            "|---|---:|---:|---|---:|---:|---:|---:|",
        ]
        for r in rows:
            need = f"{r['mean_j_needed']:.2f}" + ("" if r["possible"] else " (impossible)")
            lines.append(
                f"| {'×'.join(map(str, r['widths']))} | {r['verify_blocks']} | {r['verify_ms']:.2f} | "
                + ", ".join(f"{p:.3f}" for p in r["p_j_at_least"])
                + f" | {r['mean_j']:.3f} | {need} | {r['speedup']:.3f}× | {r['speedup_if_all_accepted']:.2f}× |"
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m evaluator.lossless_bound",
        description="Strict RSD at 7B: acceptance needed for a target speedup vs achieved, with verify trees.",
        allow_abbrev=False,
    )
    parser.add_argument(
        "--eval-json", type=Path, required=True, help="eval.json with tree_verification ranks"
    )
    parser.add_argument("--timings", type=Path, required=True, help="bench_7b (or bench_gpu) JSON")
    parser.add_argument(
        "--vision-ms", type=float, default=None, help="vision encoder ms (older bench_gpu JSON)"
    )
    parser.add_argument("--decode-layers", type=int, nargs="+", default=[3, 8], help="depths D to tabulate")
    parser.add_argument("--target", type=float, default=1.3, help="speedup target")
    parser.add_argument("--out", type=Path, required=True, help="Markdown file to write")
    parser.add_argument("--json", type=Path, default=None, help="also write the tables as JSON")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    for p in (args.eval_json, args.timings):
        if not p.is_file():
            parser.error(f"no such file: {p}")
    ev = json.loads(args.eval_json.read_text())
    if "tree_verification" not in ev:
        parser.error(f"{args.eval_json} has no tree_verification ranks (evaluate with a draft model)")
    try:
        t = load_timings(args.timings, vision_ms=args.vision_ms)
    except (KeyError, ValueError) as exc:
        parser.error(f"bad timings {args.timings}: {exc}")
    ranks = np.asarray(ev["tree_verification"]["ranks"], dtype=np.int64)
    tables = {D: bound_table(t, D, ranks, args.target) for D in args.decode_layers}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(render(ev, t, tables, args.target))
    if args.json is not None:
        args.json.write_text(json.dumps({"timings": asdict(t), "tables": tables}, indent=1))
    print(args.out)


if __name__ == "__main__":
    main()
