"""common.libero_tasks: the instruction table consumers use instead of LIBERO equals what LIBERO reports."""

from __future__ import annotations

import importlib.util

import pytest

from common.libero_tasks import INSTRUCTIONS, instruction


def test_unknown_suite_or_task_is_a_clear_error():
    assert "black bowl" in instruction("libero_spatial", 0)
    with pytest.raises(ValueError, match="unknown suite"):
        instruction("libero_nowhere", 0)
    with pytest.raises(ValueError, match="valid: 0..9"):
        instruction("libero_goal", 10)
    with pytest.raises(ValueError, match="valid: 0..9"):
        instruction("libero_goal", -1)


@pytest.mark.skipif(importlib.util.find_spec("libero") is None, reason="LIBERO is not installed")
def test_the_table_is_what_libero_reports():
    from producer.env import SUITES, list_tasks  # LIBERO itself: only where it is installed

    assert list(INSTRUCTIONS) == list(SUITES)
    for suite in SUITES:
        assert INSTRUCTIONS[suite] == tuple(t.instruction for t in list_tasks(suite)), suite
