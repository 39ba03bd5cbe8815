"""tools.failure_probe: failures sorted by kind from per-step grasp flags; benchmark states refused."""

from __future__ import annotations

import pytest

from tools.failure_probe import classify, grasp_count, main, markdown, summarize


def test_kinds_of_failure() -> None:
    assert classify(True, [False, True, False]) == "success"
    assert classify(False, [False] * 5) == "never grasped"
    assert classify(False, [False, True, True]) == "holding at the limit"
    assert classify(False, [False, True, False, True, False]) == "released off target"
    assert grasp_count([False, True, False, True, True, False]) == 2 and grasp_count([True]) == 1


def test_summary_and_table() -> None:
    rows = [
        {"task_id": 7, "init_state": "fresh:1", "success": True, "kind": "success"},
        {"task_id": 7, "init_state": "fresh:2", "success": False, "kind": "never grasped", "grasps": 0,
         "max_lift_m": 0.0, "final_xy_to_target_m": 0.45, "sheet": "task7_fresh2.png"},
    ]  # fmt: skip
    s = summarize(rows)
    assert s["per_task"][7] == {"success": 1, "never grasped": 1} and s["episodes"] == 2
    md = markdown(s, rows)
    assert "| 7 | 1 | 1 | 0 | 0 |" in md and "[task7_fresh2.png](task7_fresh2.png)" in md


def test_benchmark_states_are_refused() -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--tasks", "7", "--init-states", "0-4"])
    assert exc.value.code == 2
    with pytest.raises(SystemExit):
        main(["--tasks", "7", "--init-states", "fresh:x-y"])
