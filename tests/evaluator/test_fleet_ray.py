"""The evaluation fleet on a local Ray instance (2 CPUs): actor killed mid-episode -> errored, retried once,
counted once; the results file resumes across backends."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")

from common.ray_cluster import connect  # noqa: E402
from evaluator.fleet import run_protocol  # noqa: E402
from evaluator.protocol import outcomes  # noqa: E402
from tests.evaluator.test_fleet import arms  # noqa: E402
from tests.fleet_fakes import expected_success, make_fake_env, make_trap_env  # noqa: E402


@pytest.fixture(scope="module")
def local_ray():
    started = connect("local", num_cpus=2)
    yield
    if started:
        ray.shutdown()


def test_ray_actor_death_is_retried_without_double_counting(tmp_path: Path, local_ray) -> None:
    out = tmp_path / "episodes.jsonl"
    env = functools.partial(make_trap_env, exit_on=[0, 1], marker_dir=str(tmp_path))
    kw = dict(tasks=[0, 1], init_states=[0, 1], workers=2, max_steps=4, progress=False)
    res = run_protocol(arms(), results_path=out, ray_address="auto", env_factory=env, **kw)
    recs = [json.loads(x) for x in out.read_text().splitlines()[1:]]
    final, errored, dups = outcomes(recs)
    assert res.complete and len(final) == 8 and dups == 0
    assert sum(errored.values()) == 1 and next(iter(errored))[1:] == (0, 1)
    assert "Ray actor died" in next(r["error"] for r in recs if r["status"] == "errored")
    assert len(recs) == 9  # 8 outcomes + the one errored attempt; no episode recorded twice
    for (arm, t, i), r in final.items():
        assert (r["status"] == "success") == expected_success(1.0 if arm == "base" else 0.5, t, i)
    assert len({r["extra"]["pid"] for r in final.values()}) >= 2  # ran in actor processes
    # resuming (here on local processes) runs nothing again
    again = run_protocol(arms(), results_path=out, env_factory=make_fake_env, **kw)
    assert again.complete and again.episodes_run == 0
