"""Markdown report and plots of an eval.json (evaluator/eval.py).

    python -m evaluator.report runs/default/latest/eval/eval.json      # re-render report.md and the PNGs

Plots: ``latency.png`` (chunk latency distributions of the arms), ``acceptance.png`` (histogram of
accepted layers j), ``accuracy.png`` (draft accuracy per layer), ``tradeoff.png`` (speedup against
action deviation over all arms, including the sweeps).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from common.cli import new_parser

MAIN_ARMS = ("baseline", "rsd_strict", "rsd_relaxed")


def _fmt(x: float, nd: int = 2) -> str:
    return f"{x:.{nd}f}"


def _fmt_small(x: float, nd: int = 3) -> str:
    """``nd`` decimals, or scientific notation for a nonzero value that would show as 0.000 (1e-14)."""
    return f"{x:.1e}" if x != 0 and abs(x) < 0.5 * 10**-nd else f"{x:.{nd}f}"


def plot_all(result: dict[str, Any], out_dir: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    files = []
    per_chunk = result["per_chunk"]

    fig, ax = plt.subplots(figsize=(6.5, 4))
    hi = max(np.percentile(per_chunk[a]["latency_ms"], 99) for a in MAIN_ARMS if a in per_chunk)
    bins = np.linspace(0, hi * 1.05, 50)
    for arm in MAIN_ARMS:
        if arm in per_chunk:
            ax.hist(per_chunk[arm]["latency_ms"], bins=bins, histtype="step", linewidth=1.5, label=arm)
    ax.set_xlabel("chunk latency (ms)")
    ax.set_ylabel("chunks")
    ax.set_title("Chunk latency, same observations")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_dir / "latency.png", dpi=120)
    plt.close(fig)
    files.append("latency.png")

    fig, ax = plt.subplots(figsize=(6.5, 4))
    modes = [m for m in ("strict", "relaxed") if m in result["rsd"]]
    width = 0.8 / max(1, len(modes))
    for i, m in enumerate(modes):
        hist = np.asarray(result["rsd"][m]["j_histogram"], dtype=float)
        x = np.arange(len(hist))
        ax.bar(x + i * width - 0.4 + width / 2, hist / hist.sum(), width=width, label=f"RSD {m}")
    ax.set_xlabel("accepted drafted layers j")
    ax.set_ylabel("fraction of chunks")
    ax.set_title("Acceptance")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_dir / "acceptance.png", dpi=120)
    plt.close(fig)
    files.append("acceptance.png")

    acc = result.get("draft_accuracy")
    if acc:
        fig, ax = plt.subplots(figsize=(6.5, 4))
        x = np.arange(len(acc["token_per_layer"]))
        ax.bar(x - 0.2, acc["token_per_layer"], width=0.4, label="token accuracy")
        ax.bar(x + 0.2, acc["exact_per_layer"], width=0.4, label="whole layer right")
        ax.set_xticks(x, [f"L{i}" for i in x])
        ax.set_ylim(0, 1)
        ax.set_ylabel("vs the policy's own codes")
        ax.set_title("Draft accuracy per layer")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out_dir / "accuracy.png", dpi=120)
        plt.close(fig)
        files.append("accuracy.png")

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for name, a in result["arms"].items():
        if name == "baseline":
            continue
        ax.scatter(a["action_deviation"]["max_abs_mean"], a["speedup_median"])
        ax.annotate(name, (a["action_deviation"]["max_abs_mean"], a["speedup_median"]), fontsize=7)
    ax.axhline(1.0, color="grey", linewidth=0.8)
    ax.set_xlabel("mean over chunks of max |action - baseline action|")
    ax.set_ylabel("speedup (median latency)")
    ax.set_title("Speedup / fidelity trade-off (CPU)")
    fig.tight_layout()
    fig.savefig(out_dir / "tradeoff.png", dpi=120)
    plt.close(fig)
    files.append("tradeoff.png")
    return files


def render_markdown(result: dict[str, Any], plots: list[str]) -> str:
    meta, arms = result["meta"], result["arms"]
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
        "| arm | median (ms) | p90 (ms) | speedup (median) | speedup (p90) | mean j | mean passes | codes = baseline | max\\|Δa\\| mean | max\\|Δa\\| p90 |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, a in arms.items():
        lat, dev = a["latency_ms"], a["action_deviation"]
        lines.append(
            f"| {name} | {_fmt(lat['median'])} | {_fmt(lat['p90'])} | {_fmt(a['speedup_median'])}× | "
            f"{_fmt(a['speedup_p90'])}× | {_fmt(a['mean_j'])} | {_fmt(a['mean_passes'])} | "
            f"{100 * a['identical_fraction']:.1f}% | {_fmt(dev['max_abs_mean'], 4)} | {_fmt(dev['max_abs_p90'], 4)} |"
        )
    lines += ["", "Accepted layers j (count of chunks, j = 0, 1, …):", ""]
    for name, a in arms.items():
        if name != "baseline":
            lines.append(f"- {name}: {a['j_histogram']} (mean proposed k {a['mean_proposed']:.2f})")
    acc = result.get("draft_accuracy")
    if acc:
        lines += [
            "",
            "Draft accuracy per layer against the policy's own codes (same chunks):",
            "",
            "| layer | token accuracy | whole layer right | mean confidence |",
            "|---|---:|---:|---:|",
        ]
        for i, (t, e, c) in enumerate(
            zip(acc["token_per_layer"], acc["exact_per_layer"], acc["confidence_per_layer_mean"])
        ):
            lines.append(f"| L{i} | {t:.3f} | {e:.3f} | {_fmt_small(c)} |")
    stages = {n: arms[n]["stage_ms_median"] for n in MAIN_ARMS if n in arms}
    if stages:
        lines += ["", "Median stage times (ms):", ""]
        for n, st in stages.items():
            lines.append(f"- {n}: " + ", ".join(f"{k} {v:.2f}" for k, v in st.items()))
    cl = result.get("closed_loop")
    if cl:
        n = len(cl["episodes"])
        lines += [
            "",
            f"## Closed loop ({n} episodes per arm, same tasks and initial states)",
            "",
            "| arm | success | episodes | mean steps | mean act (ms) |",
            "|---|---:|---:|---:|---:|",
        ]
        for name in MAIN_ARMS:
            if name in cl:
                s = cl[name]
                if not isinstance(s, dict):
                    continue
                lines.append(
                    f"| {name} | {100 * s['success_rate']:.1f}% ({s['successes']}/{s['episodes']}) | {s['episodes']} | "
                    f"{s['mean_steps']:.0f} | {s['mean_act_ms']:.1f} |"
                )
        base = cl["baseline"]["success"] if "baseline" in cl else None
        for name in ("rsd_strict", "rsd_relaxed"):
            if name in cl and base is not None:
                same = sum(a == b for a, b in zip(base, cl[name]["success"]))
                lines.append(f"\n{name}: same outcome as the baseline in {same}/{n} episodes.")
    else:
        lines += ["", "Closed loop: not run (`--no-closed-loop`)."]
    if plots:
        lines += ["", "## Plots", ""] + [f"![{p}]({p})" for p in plots]
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
