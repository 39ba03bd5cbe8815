"""The report of a protocol run: per-arm success with Wilson intervals, per-task successes, and every arm
paired against the baseline (exact McNemar, paired difference with its 95 % interval, non-inferiority
verdict at a stated margin). JSON (:meth:`ProtocolResult.summary`) and markdown (:meth:`ProtocolResult.markdown`).

    from evaluator.protocol_report import load_results
    result = load_results("runs/eval_vla/episodes.jsonl")     # re-report a results file without running
    print(result.markdown(margin=0.03))

Only episodes with an outcome count; ``errored`` episodes (crashes, not policy failures) are listed
apart, and a pair counts only when both arms have an outcome on it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from evaluator.protocol import Key, Protocol, outcomes, read_lines
from evaluator.stats import DEFAULT_MARGIN, non_inferiority, paired_difference, wilson


@dataclass
class ProtocolResult:
    """Everything a protocol run knows: the protocol, the arms, every record in the results file."""

    protocol: Protocol
    arms: list[dict[str, Any]]  # ArmSpec dicts (with fingerprints), in order; the first is the baseline
    records: list[dict[str, Any]]  # every line of the results file (all attempts)
    results_path: str = ""
    complete: bool = False  # every (arm, task, init) has an outcome
    interrupted: bool = False  # Ctrl-C ended the run
    wall_s: float = 0.0  # this session
    episodes_run: int = 0  # attempts finished in this session (errored included)
    skipped_lines: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def arm_names(self) -> list[str]:
        return [a["name"] for a in self.arms]

    def outcome_map(self) -> tuple[dict[Key, dict[str, Any]], dict[Key, int], int]:
        return outcomes(self.records)

    def successes(self, arm: str) -> dict[tuple[int, int], bool]:
        """(task, init) -> success, for the episodes of ``arm`` that have an outcome."""
        final, _, _ = self.outcome_map()
        return {(t, i): r["status"] == "success" for (a, t, i), r in final.items() if a == arm}

    def summary(self, margin: float = DEFAULT_MARGIN, baseline: str | None = None) -> dict[str, Any]:
        """The JSON report."""
        p = self.protocol
        final, errored, duplicates = self.outcome_map()
        names = self.arm_names
        baseline = baseline or (names[0] if names else None)
        arms: dict[str, Any] = {}
        for name in names:
            got = self.successes(name)
            k, n = sum(got.values()), len(got)
            err = [key for key in errored if key[0] == name and key not in final]
            backbones = sorted({r.get("backbone", "") for key, r in final.items() if key[0] == name})
            arms[name] = {
                "successes": k,
                "episodes": n,
                "success_rate": k / n if n else None,
                "wilson95": list(wilson(k, n)),
                "errored": len(err),
                "missing": p.episodes_per_arm - n - len(err),
                "backbone": backbones,
                "per_task": {
                    str(t): [
                        sum(v for (tt, _), v in got.items() if tt == t),
                        sum(1 for tt, _ in got if tt == t),
                    ]
                    for t in p.tasks
                },
                "mean_steps": _mean([r["steps"] for key, r in final.items() if key[0] == name]),
                "mean_wall_s": _mean([r["wall_s"] for key, r in final.items() if key[0] == name]),
            }
        comparisons = {}
        if baseline is not None:
            base = self.successes(baseline)
            for name in names:
                if name == baseline:
                    continue
                other = self.successes(name)
                common = sorted(set(base) & set(other))
                cmp = paired_difference([base[e] for e in common], [other[e] for e in common])
                comparisons[name] = {
                    "baseline": baseline,
                    **cmp.to_dict(),
                    "margin": margin,
                    "verdict": non_inferiority(cmp.ci95, margin) if common else "not shown",
                }
        return {
            "protocol": {**p.to_dict(), "standard": p.standard, "description": p.describe()},
            "results_path": self.results_path,
            "complete": self.complete,
            "interrupted": self.interrupted,
            "planned_episodes": p.episodes_per_arm * len(names),
            "finished_episodes": len(final),
            "errored_attempts": sum(errored.values()),
            "duplicates_ignored": duplicates,
            "malformed_lines_skipped": self.skipped_lines,
            "wall_s": self.wall_s,
            "episodes_run": self.episodes_run,
            "episodes_per_minute": 60.0 * self.episodes_run / self.wall_s if self.wall_s > 0 else None,
            "arms": arms,
            "comparisons": comparisons,
            **self.extra,
        }

    def markdown(self, margin: float = DEFAULT_MARGIN, baseline: str | None = None) -> str:
        return summary_markdown(self.summary(margin, baseline))


def summary_markdown(s: dict[str, Any], heading: str = "#") -> str:
    """The markdown report of a summary (:meth:`ProtocolResult.summary`, also as stored in eval.json)."""
    margin = next((c["margin"] for c in s["comparisons"].values()), DEFAULT_MARGIN)
    p = s["protocol"]
    lines = [f"{heading} Closed-loop protocol: {p['description']}", ""]
    if not p["standard"]:
        lines += ["**Not the standard protocol** (10 tasks × initial states 0–49): figures below are", ""]
        lines[-2] += " not comparable with standard-protocol figures."
    status = "complete" if s["complete"] else ("interrupted" if s["interrupted"] else "incomplete")
    lines += [
        f"Results: `{s['results_path']}` ({status}: {s['finished_episodes']}/{s['planned_episodes']} "
        f"episodes with an outcome, {s['errored_attempts']} errored attempts, seed {p['seed']}).",
        "",
        "| arm | success | rate | Wilson 95 % | errored | missing | policy |",
        "|---|---:|---:|---|---:|---:|---|",
    ]
    for name, a in s["arms"].items():
        rate = "–" if a["success_rate"] is None else f"{100 * a['success_rate']:.1f} %"
        lo, hi = a["wilson95"]
        lines.append(
            f"| {name} | {a['successes']}/{a['episodes']} | {rate} | {100 * lo:.1f}–{100 * hi:.1f} % "
            f"| {a['errored']} | {a['missing']} | {', '.join(a['backbone'])} |"
        )
    if s["comparisons"]:
        lines += [
            "",
            f"Paired against the baseline (same task, initial state and seeds); difference = arm − baseline "
            f"with Newcombe's 95 % interval; non-inferiority margin {100 * margin:g} points:",
            "",
            "| arm | pairs | both | baseline only | arm only | difference | 95 % interval | McNemar p | verdict |",
            "|---|---:|---:|---:|---:|---:|---|---:|---|",
        ]
        for name, c in s["comparisons"].items():
            lo, hi = c["ci95"]
            diff = "–" if c["pairs"] == 0 else f"{100 * c['difference']:+.1f}"
            lines.append(
                f"| {name} | {c['pairs']} | {c['both']} | {c['baseline_only']} | {c['arm_only']} | {diff} "
                f"| {100 * lo:+.1f} to {100 * hi:+.1f} | {c['mcnemar_p']:.3g} | {c['verdict']} |"
            )
    lines += ["", "Per task (successes / episodes):", ""]
    lines.append("| task | " + " | ".join(s["arms"]) + " |")
    lines.append("|---:|" + "---:|" * len(s["arms"]))
    for t in p["tasks"]:
        cells = [f"{a['per_task'][str(t)][0]}/{a['per_task'][str(t)][1]}" for a in s["arms"].values()]
        lines.append(f"| {t} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def load_results(path: str | Path) -> ProtocolResult:
    """A :class:`ProtocolResult` from a results file (no run)."""
    path = Path(path)
    header, records, skipped = read_lines(path.read_text(errors="replace"), path)
    protocol = Protocol(**{**header["protocol"], "tasks": tuple(header["protocol"]["tasks"]),
                           "init_states": tuple(header["protocol"]["init_states"])})  # fmt: skip
    result = ProtocolResult(protocol, header["arms"], records, str(path), skipped_lines=skipped)
    final, _, _ = result.outcome_map()
    result.complete = len(final) == protocol.episodes_per_arm * len(header["arms"])
    return result
