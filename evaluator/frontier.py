"""The speed/fidelity frontier: every arm against truncated decoding measured in the same run.

An arm **wins** only if no truncation (the baseline is the truncation at k = D) is at least as fast
and at least as faithful: speedup >= the arm's, mean |Δa| <= the arm's, p99 |Δa| <= the arm's, and,
where both ran closed loop, success rate >= the arm's. Otherwise it is dominated, and the report names
the truncation that dominates it. Speeds are ratios to the baseline measured in one process; the 7B
projection (evaluator/bench_7b.py) applies the same rule to its projected speedups.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from matplotlib.figure import Figure
from matplotlib.lines import Line2D

REFERENCE_KINDS = ("baseline", "truncation")


def _success(closed_loop: dict[str, Any], name: str) -> float | None:
    v = closed_loop.get(name)
    rate = v.get("success_rate") if isinstance(v, dict) else None  # None: not run, or no episode finished
    return None if rate is None else float(rate)


def frontier(result: dict[str, Any], speeds: dict[str, float] | None = None) -> list[dict[str, Any]]:
    """One row per arm: speedup, mean and p99 |Δa|, closed-loop success (None if not run), verdict.

    speeds: arm name -> speedup to use instead of the measured CPU one (e.g. the 7B projection);
    arms missing from it are left out.
    """
    cl = result.get("closed_loop") or {}
    rows = []
    for name, a in result["arms"].items():
        if speeds is not None and name not in speeds:
            continue
        dev = a["action_deviation"]
        rows.append(
            {
                "arm": name,
                "kind": a.get("kind", "baseline" if name == "baseline" else "relaxed"),
                "label": a.get("label", name),
                "lossless": a.get("lossless", False),
                "verified": a.get("verified"),
                "speedup": float(speeds[name] if speeds is not None else a["speedup_median"]),
                "mean_abs": float(dev.get("mean_abs", dev.get("mean_abs_mean", 0.0))),
                "p99_abs": float(dev.get("p99_abs", dev.get("max_abs_p90", 0.0))),
                "success": _success(cl, name),
            }
        )
    refs = [r for r in rows if r["kind"] in REFERENCE_KINDS]
    for r in rows:
        if r["kind"] in REFERENCE_KINDS:
            r["win"], r["verdict"], r["dominated_by"] = None, "reference", []
            continue
        dom = [t["arm"] for t in refs if dominates(t, r)]
        r["dominated_by"] = dom
        r["win"] = not dom
        r["verdict"] = (
            "WIN: on the frontier" if not dom else f"no win: {_best(dom, refs)} is as fast and as faithful"
        )
    return rows


def dominates(t: dict[str, Any], r: dict[str, Any]) -> bool:
    """Truncation row ``t`` is at least as fast and at least as faithful as arm row ``r``."""
    if not (t["speedup"] >= r["speedup"] and t["mean_abs"] <= r["mean_abs"] and t["p99_abs"] <= r["p99_abs"]):
        return False
    if t["success"] is not None and r["success"] is not None:
        return t["success"] >= r["success"]
    return True


def _best(names: list[str], refs: list[dict[str, Any]]) -> str:
    """The fastest of the dominating truncations."""
    by = {r["arm"]: r for r in refs}
    return max(names, key=lambda n: by[n]["speedup"])


def verdict_lines(rows: list[dict[str, Any]]) -> list[str]:
    """Markdown table of the frontier with the verdict per arm."""
    succ = any(r["success"] is not None for r in rows)
    head = (
        "| arm | kind | speedup | mean \\|Δa\\| | p99 \\|Δa\\| |"
        + (" success |" if succ else "")
        + " verdict |"
    )
    lines = [head, "|---|---|---:|---:|---:|" + ("---:|" if succ else "") + "---|"]
    for r in sorted(rows, key=lambda r: (r["kind"] not in REFERENCE_KINDS, -r["speedup"])):
        kind = r["kind"] + ("" if r["verified"] is not False else " (UNVERIFIED)")
        cells = [
            f"`{r['arm']}`",
            kind,
            f"{r['speedup']:.2f}×",
            f"{r['mean_abs']:.4f}",
            f"{r['p99_abs']:.4f}",
        ]
        if succ:
            cells.append("–" if r["success"] is None else f"{100 * r['success']:.0f}%")
        cells.append(
            r["verdict"] if r["win"] is None else ("**" + r["verdict"] + "**" if r["win"] else r["verdict"])
        )
        lines.append("| " + " | ".join(cells) + " |")
    wins = [r["arm"] for r in rows if r["win"]]
    lines += [
        "",
        f"Arms on the frontier (no truncation at least as fast and as faithful): {', '.join(wins) or 'none'}.",
    ]
    return lines


def plot_frontier(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    """Speedup against mean |Δa|, p99 |Δa| and (if run) closed-loop success; truncations as a line."""
    succ = any(r["success"] is not None for r in rows)
    panels = [("mean_abs", "mean |Δa| vs baseline"), ("p99_abs", "p99 |Δa| vs baseline")]
    if succ:
        panels.append(("success", "closed-loop success rate"))
    fig = Figure(figsize=(5.2 * len(panels), 4.2))
    axes = fig.subplots(1, len(panels), squeeze=False)
    colours = {"strict": "tab:green", "relaxed": "tab:blue", "substitution": "tab:red"}
    refs = sorted((r for r in rows if r["kind"] in REFERENCE_KINDS), key=lambda r: r["speedup"])
    for ax, (key, xlabel) in zip(axes[0], panels):
        pts = [r for r in refs if r[key] is not None]
        ax.plot([r[key] for r in pts], [r["speedup"] for r in pts], "k.-", label="truncation / baseline")
        for r in pts:
            ax.annotate(r["arm"].replace("truncate-", ""), (r[key], r["speedup"]), fontsize=7)
        for r in rows:
            if r["kind"] in REFERENCE_KINDS or r[key] is None:
                continue
            marker = "*" if r["win"] else "o"
            ax.scatter(r[key], r["speedup"], c=colours.get(r["kind"], "grey"), marker=marker, s=50)
            ax.annotate(r["arm"], (r[key], r["speedup"]), fontsize=7)
        if key != "success":
            ax.set_xscale("symlog", linthresh=1e-3)
        ax.axhline(1.0, color="grey", linewidth=0.8)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("speedup vs baseline")
    axes[0][0].set_title(title, fontsize=9)
    handles = [Line2D([], [], color=c, marker="o", linestyle="", label=k) for k, c in colours.items()]
    axes[0][-1].legend(handles=handles, fontsize=7, title="★ = win", title_fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
