"""Statistics of paired closed-loop success: Wilson intervals, exact McNemar, paired difference, non-inferiority.

Every arm of a protocol runs the same (task, initial state) episodes with the same seeds, so two arms
are compared pair by pair. With ``a`` pairs where both succeed, ``b`` where only the baseline does,
``c`` where only the arm does and ``d`` where neither does (n = a + b + c + d):

* :func:`wilson` — the Wilson score 95 % interval of one arm's success rate;
* :func:`mcnemar_exact` — the exact (binomial) two-sided McNemar test on the ``b + c`` discordant pairs;
* :func:`paired_difference` — the difference arm − baseline = (c − b) / n with Newcombe's hybrid score
  interval for paired proportions (Newcombe 1998, *Stat Med* 17:2635, method 10), which keeps its
  coverage near 95 % for small n and rates near 0 or 1, where the Wald interval does not;
* :func:`non_inferiority` — the verdict at a margin ``m`` (default 3 points): *non-inferior* when the
  interval's lower end is above −m (a one-sided test at 2.5 %), *inferior* when its upper end is below
  −m, and *not shown* otherwise: the interval is too wide to tell, which is what 50 episodes give.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

Z95 = 1.959963984540054  # two-sided 95 % normal quantile
DEFAULT_MARGIN = 0.03  # non-inferiority margin: 3 percentage points


def wilson(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of ``successes / n``; (0, 1) when n = 0 (nothing is known)."""
    if n < 0 or not 0 <= successes <= max(n, 0):
        raise ValueError(f"need 0 <= successes <= n, got {successes} of {n}")
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    z2 = z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z / (1 + z2 / n) * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    lo, hi = max(0.0, centre - half), min(1.0, centre + half)
    if successes == 0:  # exact ends (rounding would leave 1e-17)
        lo = 0.0
    if successes == n:
        hi = 1.0
    return lo, hi


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value for ``b`` and ``c`` discordant pairs (1.0 when there are none)."""
    if b < 0 or c < 0:
        raise ValueError(f"discordant counts must be >= 0, got {b}, {c}")
    n = b + c
    if n == 0:
        return 1.0
    k = min(b, c)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2.0**n  # P(X <= k), X ~ Bin(n, 1/2)
    return min(1.0, 2.0 * tail)


@dataclass(frozen=True)
class PairedComparison:
    """An arm against the baseline on the same episodes (rates in [0, 1])."""

    pairs: int
    both: int  # a: both succeed
    baseline_only: int  # b
    arm_only: int  # c
    neither: int  # d
    baseline_rate: float
    arm_rate: float
    difference: float  # arm - baseline
    ci95: tuple[float, float]
    mcnemar_p: float

    def to_dict(self) -> dict:
        d = asdict(self)
        d["ci95"] = list(self.ci95)
        return d


def _table(baseline: Sequence[bool], arm: Sequence[bool]) -> tuple[int, int, int, int]:
    if len(baseline) != len(arm):
        raise ValueError(f"paired outcomes need equal lengths, got {len(baseline)} and {len(arm)}")
    a = sum(1 for x, y in zip(baseline, arm) if x and y)
    b = sum(1 for x, y in zip(baseline, arm) if x and not y)
    c = sum(1 for x, y in zip(baseline, arm) if not x and y)
    return a, b, c, len(arm) - a - b - c


def newcombe_paired_ci(a: int, b: int, c: int, d: int, z: float = Z95) -> tuple[float, float]:
    """Newcombe's method-10 interval for p_arm − p_baseline from the paired table (a, b, c, d).

    a = both succeed, b = baseline only, c = arm only, d = neither. (-1, 1) when there are no pairs.
    """
    n = a + b + c + d
    if min(a, b, c, d) < 0:
        raise ValueError(f"table counts must be >= 0, got {(a, b, c, d)}")
    if n == 0:
        return -1.0, 1.0
    p1, p2 = (a + c) / n, (a + b) / n  # arm, baseline
    l1, u1 = wilson(a + c, n, z)
    l2, u2 = wilson(a + b, n, z)
    den = (a + b) * (c + d) * (a + c) * (b + d)
    phi = (a * d - b * c) / math.sqrt(den) if den > 0 else 0.0
    theta = p1 - p2
    delta = math.sqrt(max(0.0, (p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2))
    eps = math.sqrt(max(0.0, (u1 - p1) ** 2 - 2 * phi * (u1 - p1) * (p2 - l2) + (p2 - l2) ** 2))
    return max(-1.0, theta - delta), min(1.0, theta + eps)


def paired_difference(baseline: Sequence[bool], arm: Sequence[bool], z: float = Z95) -> PairedComparison:
    """Compare paired outcomes (index i of both lists is the same episode)."""
    a, b, c, d = _table(baseline, arm)
    n = a + b + c + d
    return PairedComparison(
        pairs=n,
        both=a,
        baseline_only=b,
        arm_only=c,
        neither=d,
        baseline_rate=(a + b) / n if n else float("nan"),
        arm_rate=(a + c) / n if n else float("nan"),
        difference=(c - b) / n if n else float("nan"),
        ci95=newcombe_paired_ci(a, b, c, d, z),
        mcnemar_p=mcnemar_exact(b, c),
    )


def non_inferiority(ci95: tuple[float, float], margin: float = DEFAULT_MARGIN) -> str:
    """'non-inferior', 'inferior' or 'not shown' for an interval of arm − baseline at ``margin``."""
    if not 0 < margin < 1:
        raise ValueError(f"margin must be in (0, 1), got {margin}")
    lo, hi = ci95
    if lo > -margin:
        return "non-inferior"
    if hi < -margin:
        return "inferior"
    return "not shown"
