"""Markdown report and plots of an eval.json (evaluator/eval.py).

    python -m evaluator.report runs/default/latest/eval/eval.json      # re-render report.md and the PNGs

Order of the report: the lossless result first, then every arm on the speed/fidelity frontier against
truncated decoding (``frontier.png``), the layer information that sets the decoded depth, the detail
tables, the draft's accuracy and tree-verification hit rates, the closed loop. Plots: ``frontier.png``,
``latency.png`` (chunk latency distributions), ``acceptance.png`` (accepted layers j),
``accuracy.png`` (draft accuracy per layer).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from common.cli import new_parser
from evaluator.frontier import frontier, plot_frontier, verdict_lines
from evaluator.protocol_report import summary_markdown

MAIN_ARMS = ("baseline", "strict", "relaxed", "draft-substitution")


def _fmt(x: float, nd: int = 2) -> str:
    return f"{x:.{nd}f}"


def _fmt_small(x: float, nd: int = 3) -> str:
    """``nd`` decimals, or scientific notation for a nonzero value that would show as 0.000 (1e-14)."""
    return f"{x:.1e}" if x != 0 and abs(x) < 0.5 * 10**-nd else f"{x:.{nd}f}"


def _rows(result: dict[str, Any]) -> list[dict[str, Any]]:
    return result.get("frontier") or frontier(result)


def plot_all(result: dict[str, Any], out_dir: Path) -> list[str]:
    """The PNG plots of an eval (the frontier, latency, acceptance, draft accuracy); returns their names."""
    title = f"Speed/fidelity, {result['meta']['machine'][:40]}"
    plot_frontier(_rows(result), out_dir / "frontier.png", title)
    files = ["frontier.png", _plot_latency(result, out_dir), _plot_acceptance(result, out_dir)]
    if result.get("draft_accuracy"):
        files.append(_plot_accuracy(result["draft_accuracy"], out_dir))
    return files


def _save(
    fig: Figure, ax: Any, xlabel: str, ylabel: str, title: str, path: Path, legend_size: int | None = 8
) -> str:
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=legend_size)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path.name


def _plot_latency(result: dict[str, Any], out_dir: Path) -> str:
    per_chunk = result["per_chunk"]
    truncation = f"truncate-k{max(1, result['meta'].get('decode_layers', 2) - 1)}"
    shown = [a for a in (*MAIN_ARMS, truncation) if a in per_chunk]
    fig = Figure(figsize=(6.5, 4))
    ax = fig.subplots()
    hi = max(np.percentile(per_chunk[a]["latency_ms"], 99) for a in shown)
    bins = np.linspace(0, hi * 1.05, 50)
    for arm in shown:
        ax.hist(per_chunk[arm]["latency_ms"], bins=bins, histtype="step", linewidth=1.5, label=arm)
    return _save(
        fig, ax, "chunk latency (ms)", "chunks", "Chunk latency, same observations", out_dir / "latency.png"
    )


def _plot_acceptance(result: dict[str, Any], out_dir: Path) -> str:
    drafted = [a for a in MAIN_ARMS if a in result["arms"] and result["arms"][a].get("rsd")]
    fig = Figure(figsize=(6.5, 4))
    ax = fig.subplots()
    width = 0.8 / max(1, len(drafted))
    for i, m in enumerate(drafted):
        hist = np.asarray(result["arms"][m]["j_histogram"], dtype=float)
        x = np.arange(len(hist))
        ax.bar(x + i * width - 0.4 + width / 2, hist / max(1.0, hist.sum()), width=width, label=m)
    return _save(
        fig, ax, "accepted drafted layers j", "fraction of chunks", "Acceptance", out_dir / "acceptance.png"
    )


def _plot_accuracy(acc: dict[str, Any], out_dir: Path) -> str:
    fig = Figure(figsize=(6.5, 4))
    ax = fig.subplots()
    x = np.arange(len(acc["token_per_layer"]))
    ax.bar(x - 0.2, acc["token_per_layer"], width=0.4, label="token accuracy")
    ax.bar(x + 0.2, acc["exact_per_layer"], width=0.4, label="whole layer right")
    ax.set_xticks(x, [f"L{i}" for i in x])
    ax.set_ylim(0, 1)
    path = out_dir / "accuracy.png"
    return _save(fig, ax, "", "vs the policy's own codes", "Draft accuracy per layer", path, legend_size=None)


def _headline(result: dict[str, Any]) -> list[str]:
    arms, meta = result["arms"], result["meta"]
    D, L = meta.get("decode_layers", "?"), meta.get("num_layers", "?")
    lines = []
    s = arms.get("strict")
    if s:
        lines.append(
            f"**Lossless (strict) RSD: {s['speedup_median']:.2f}× against the baseline** "
            f"(codes identical to the baseline in {100 * s['identical_fraction']:.1f}% of chunks; mean accepted "
            f"layers {s['mean_j']:.2f})"
            + (" — **slower than the baseline**." if s["speedup_median"] < 1 else ".")
        )
    lines.append(
        f"Baseline = the policy's own decoding of its {D} informative layers (of L = {L}; the rest at the "
        f"centre level), median {arms['baseline']['latency_ms']['median']:.1f} ms per chunk."
    )
    for name in ("relaxed", "draft-substitution"):
        a = arms.get(name)
        if a:
            dev = a["action_deviation"]
            lines.append(
                f"- `{name}` — {a.get('label', name)}: {a['speedup_median']:.2f}×, mean |Δa| "
                f"{dev.get('mean_abs', 0):.4f}, p99 |Δa| {dev.get('p99_abs', 0):.4f}"
            )
    return lines


def _layer_info(result: dict[str, Any]) -> list[str]:
    info, arms = result.get("layer_information"), result["arms"]
    L = result["meta"].get("num_layers", 8)
    if not info and not any(f"truncate-k{k}" in arms for k in range(1, L + 1)):
        return []
    lines = [
        "",
        "## Information per layer",
        "",
        "Codec error and entropy: the codec's held-out metrics; policy accuracy: the VLA's held-out "
        "free-running accuracy per layer (chance 1/G); truncation columns: measured in this run.",
        "",
        "| k (layers decoded) | codec MSE (norm.) | codec arm MAE | policy accuracy, layer k−1 | truncate-kk speedup | mean \\|Δa\\| vs baseline | mean \\|Δa\\| vs full decoding |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for k in range(1, L + 1):
        a = arms.get(f"truncate-k{k}")
        cells = [str(k)]
        if info:
            mse, mae, acc = (
                info["codec_mse_norm_by_k"],
                info["codec_mae_arm_by_k"],
                info["policy_free_layer_acc"],
            )
            cells += [f"{mse[k - 1]:.3g}", f"{mae[k - 1]:.4f}" if mae else "–", f"{acc[k - 1]:.3f}"]
        else:
            cells += ["–", "–", "–"]
        if a:
            full = a.get("vs_full_decoding", {}).get("mean_abs")
            cells += [
                f"{a['speedup_median']:.2f}×",
                f"{a['action_deviation'].get('mean_abs', 0):.4f}",
                "–" if full is None else f"{full:.4f}",
            ]
        else:
            cells += ["–", "–", "–"]
        lines.append("| " + " | ".join(cells) + " |")
    if info:
        lines += ["", f"Decoded depth D = {info['informative_depth']}: {info['evidence']['why']}."]
    return lines


def _detail(result: dict[str, Any]) -> list[str]:
    lines = [
        "",
        "## Every arm",
        "",
        "| arm | what it is | median (ms) | p90 (ms) | speedup | mean j | passes | codes = baseline | mean \\|Δa\\| | p99 \\|Δa\\| | max \\|Δa\\| |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, a in result["arms"].items():
        lat, dev = a["latency_ms"], a["action_deviation"]
        lines.append(
            f"| `{name}` | {a.get('label', '')} | {_fmt(lat['median'])} | {_fmt(lat['p90'])} | "
            f"{_fmt(a['speedup_median'])}× | {_fmt(a['mean_j'])} | {_fmt(a['mean_passes'])} | "
            f"{100 * a['identical_fraction']:.1f}% | {dev.get('mean_abs', 0):.4f} | {dev.get('p99_abs', 0):.4f} | "
            f"{dev['max_abs_max']:.4f} |"
        )
    lines += ["", "Accepted layers j (count of chunks, j = 0, 1, …):", ""]
    for name, a in result["arms"].items():
        if a.get("rsd"):
            lines.append(f"- `{name}`: {a['j_histogram']} (mean proposed k {a['mean_proposed']:.2f})")
    return lines


def _draft(result: dict[str, Any]) -> list[str]:
    acc, tree = result.get("draft_accuracy"), result.get("tree_verification")
    lines: list[str] = []
    if acc:
        lines += [
            "",
            f"## Draft (against the policy's own codes: {acc.get('reference', 'baseline')})",
            "",
            "| layer | token accuracy | whole layer right | mean confidence |",
            "|---|---:|---:|---:|",
        ]
        for i, (t, e, c) in enumerate(
            zip(acc["token_per_layer"], acc["exact_per_layer"], acc["confidence_per_layer_mean"])
        ):
            lines.append(f"| L{i} | {t:.3f} | {e:.3f} | {_fmt_small(c)} |")
    if tree:
        per = tree["hit_at"]["per_layer"]
        n = len(next(iter(per.values())))
        lines += [
            "",
            "Tree verification (offline): fraction of chunks whose exact layer is among the draft's N most "
            "probable whole layers (the candidates one verify pass could check):",
            "",
            "| N | " + " | ".join(f"L{i}" for i in range(n)) + " |",
            "|---:|" + "---:|" * n,
        ]
        lines += [f"| {w} | " + " | ".join(f"{r:.3f}" for r in rates) + " |" for w, rates in per.items()]
    return lines


def _closed_loop(result: dict[str, Any]) -> list[str]:
    cl = result.get("closed_loop")
    if not cl:
        return ["", "Closed loop: not run (`--no-closed-loop`)."]
    if "protocol" not in cl:  # an eval.json from before the closed loop ran in the fleet
        return _closed_loop_unpaired(cl)
    arms = {n: v for n, v in cl.items() if n in cl["protocol"]["arms"]}
    return [
        "",
        summary_markdown(cl["protocol"], heading="##").rstrip("\n"),
        "",
        "Decoding in the closed loop (per policy query):",
        "",
        "| arm | mean steps | mean act (ms) | accepted layers | proposed layers | passes |",
        "|---|---:|---:|---:|---:|---:|",
        *(
            f"| `{n}` | {_num(a['mean_steps'], 0)} | {a['mean_act_ms']:.1f} | {a['mean_accepted']:.2f} | "
            f"{a['mean_proposed']:.2f} | {a['mean_passes']:.2f} |"
            for n, a in arms.items()
        ),
    ]


def _num(x: float | None, nd: int) -> str:
    return "–" if x is None else f"{x:.{nd}f}"


def _closed_loop_unpaired(cl: dict[str, Any]) -> list[str]:
    n = len(cl["episodes"])
    lines = [
        "",
        f"## Closed loop ({n} episodes per arm, same tasks and initial states)",
        "",
        "| arm | success | mean steps | mean act (ms) | same outcome as baseline |",
        "|---|---:|---:|---:|---:|",
    ]
    base = cl.get("baseline", {}).get("success") if isinstance(cl.get("baseline"), dict) else None
    for name, s in cl.items():
        if not isinstance(s, dict):
            continue
        same = "–" if base is None else f"{sum(a == b for a, b in zip(base, s['success']))}/{n}"
        lines.append(
            f"| `{name}` | {100 * s['success_rate']:.1f}% ({s['successes']}/{s['episodes']}) | "
            f"{s['mean_steps']:.0f} | {s['mean_act_ms']:.1f} | {same} |"
        )
    return lines


def render_markdown(result: dict[str, Any], plots: list[str]) -> str:
    meta = result["meta"]
    d = meta["draft"]
    lines = [
        "# RSD evaluation",
        "",
        f"Date {meta['date']}; machine: {meta['machine']}; torch {meta['torch']}.",
        f"Policy: `{meta['policy']}`"
        + (
            " (**random weights: plumbing only, not a trained policy**)"
            if meta["policy_random_weights"]
            else ""
        )
        + ".",
        f"Draft: `{d['path']}` (K = {d['num_coarse_layers']}, val_accuracy {d['val_accuracy']:.3f}, epoch {d['epoch']}).",
        f"Open loop: {result['chunks']} chunks from {len(result['open_loop_episodes'])} LIBERO episodes driven by "
        "the baseline's actions; every chunk decoded by every arm in one process, arm order rotating.",
        "",
        *_headline(result),
        "",
        "## Speed/fidelity frontier (speedups measured in this run)",
        "",
        "An arm wins only if no truncation is both at least as fast and at least as faithful. "
        "`draft-substitution` is **unverified** (drafted layers are used without a check): it is not "
        "speculative decoding.",
        "",
        *verdict_lines(_rows(result)),
        *(["", "![frontier](frontier.png)"] if "frontier.png" in plots else []),
        *_layer_info(result),
        *_detail(result),
        *_draft(result),
    ]
    stages = {n: result["arms"][n]["stage_ms_median"] for n in MAIN_ARMS if n in result["arms"]}
    if stages:
        lines += ["", "Median stage times (ms):", ""]
        lines += [f"- `{n}`: " + ", ".join(f"{k} {v:.2f}" for k, v in st.items()) for n, st in stages.items()]
    lines += _closed_loop(result)
    if plots:
        lines += ["", "## Plots", ""] + [f"![{p}]({p})" for p in plots if p != "frontier.png"]
    lines += ["", "Configuration: `" + json.dumps(meta["config"], sort_keys=True) + "`", ""]
    return "\n".join(lines)


def write_report(result: dict[str, Any], out_dir: Path) -> Path:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    plots = plot_all(result, out_dir)
    path = out_dir / "report.md"
    path.write_text(render_markdown(result, plots))
    return path


def main(argv: list[str] | None = None) -> None:
    parser = new_parser(
        prog="python -m evaluator.report",
        description="Re-render report.md and the plots from an eval.json (written beside it).",
    )
    parser.add_argument("eval_json", type=Path, help="eval.json written by `python -m evaluator.eval`")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if not args.eval_json.is_file():
        parser.error(f"no such file: {args.eval_json}")
    result = json.loads(args.eval_json.read_text())
    print(write_report(result, args.eval_json.parent))


if __name__ == "__main__":
    main()
