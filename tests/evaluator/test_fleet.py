"""The evaluation fleet: paired arms, resumable results file, crashes recorded as errored, Ctrl-C keeps results."""

from __future__ import annotations

import functools
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from evaluator.fleet import dispatch, run_protocol
from evaluator.protocol import ArmSpec, Protocol, ProtocolMismatch, ResultsLog, make_header, outcomes
from evaluator.protocol_report import load_results
from tests.fleet_fakes import BUILDER, FakeEnv, expected_success, make_fake_env, make_trap_env

REPO = Path(__file__).resolve().parents[2]


def arms(slow_gain: float = 0.5) -> list[ArmSpec]:
    return [
        ArmSpec("base", builder=BUILDER, params={"gain": 1.0}),
        ArmSpec("slow", builder=BUILDER, params={"gain": slow_gain}),
    ]


def lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_protocol_defaults_and_usage_errors() -> None:
    p = Protocol()
    assert p.standard and p.episodes_per_arm == 500 and "standard LIBERO protocol" in p.describe()
    small = Protocol(tasks=(1, 0), init_states=(4, 2, 2))
    assert small.tasks == (0, 1) and small.init_states == (2, 4) and not small.standard
    assert "NOT the standard" in small.describe()
    with pytest.raises(ValueError, match=r"unknown task ids \[10\].*valid: 0..9"):
        Protocol(tasks=(3, 10))
    with pytest.raises(ValueError, match=r"unknown initial states \[50\]"):
        Protocol(init_states=(0, 50))
    with pytest.raises(ValueError, match="unknown suite"):
        Protocol(suite="libero_nope")
    with pytest.raises(ValueError, match="arm name"):
        ArmSpec("bad name")
    with pytest.raises(ValueError, match="unique"):
        run_protocol([ArmSpec("a", builder=BUILDER)] * 2, results_path="/nonexistent/x.jsonl")


def test_local_fleet_pairs_arms_records_crashes_and_resumes(tmp_path: Path) -> None:
    """2 worker processes, 2 arms x 2 tasks x 3 inits: a simulator exception and a worker kill mid-episode."""
    out = tmp_path / "episodes.jsonl"
    env = functools.partial(make_trap_env, raise_on=[0, 1], exit_on=[1, 2], marker_dir=str(tmp_path))
    kw = dict(tasks=[0, 1], init_states=[0, 1, 2], workers=2, max_steps=4, env_factory=env, progress=False)
    res = run_protocol(arms(), results_path=out, **kw)
    recs = lines(out)
    assert recs[0]["type"] == "header" and [a["name"] for a in recs[0]["arms"]] == ["base", "slow"]
    final, errored, dups = outcomes(recs[1:])
    # (task 0, init 1) raises in both arms, twice each (one retry): errored, not failed, no outcome
    assert errored[("base", 0, 1)] == errored[("slow", 0, 1)] == 2
    assert ("base", 0, 1) not in final and ("slow", 0, 1) not in final
    # the worker killed in (1, 2) is recorded once as errored, then the retry gives the one outcome
    killed = [k for k in errored if k[1:] == (1, 2)]
    assert (
        len(killed) == 1
        and errored[killed[0]] == 1
        and "worker died"
        in next(
            r["error"]
            for r in recs[1:]
            if r["status"] == "errored" and (r["task_id"], r["init_state"]) == (1, 2)
        )
    )
    assert len(final) == 10 and dups == 0 and res.complete is False
    for (arm, t, i), r in final.items():
        assert (r["status"] == "success") == expected_success(1.0 if arm == "base" else 0.5, t, i)
        # paired seeds: the same per-episode random draws in both arms, different across episodes
        assert r["extra"]["first_draw"] == final[("base", t, i)]["extra"]["first_draw"]
    assert len({r["extra"]["first_draw"] for k, r in final.items() if k[0] == "base"}) == 5
    assert {r["worker"] for r in final.values()} == {0, 1}
    s = res.summary()
    assert s["arms"]["base"]["errored"] == 1 and s["arms"]["base"]["episodes"] == 5
    assert s["comparisons"]["slow"]["pairs"] == 5 and not s["protocol"]["standard"]
    assert "Not the standard protocol" in res.markdown()

    # resume: nothing with an outcome runs again; only the errored (0, 1) pair is retried
    res2 = run_protocol(arms(), results_path=out, **kw)
    new = lines(out)[len(recs) :]
    assert {(r["arm"], r["task_id"], r["init_state"]) for r in new} == {("base", 0, 1), ("slow", 0, 1)}
    assert res2.episodes_run == len(new) == 4
    # a results file of another protocol or other arms is refused, naming the difference
    with pytest.raises(ProtocolMismatch, match="protocol seed: file 0 vs now 1"):
        run_protocol(arms(), results_path=out, **{**kw, "seed": 1})
    with pytest.raises(ProtocolMismatch, match="arm slow params"):
        run_protocol(arms(slow_gain=0.7), results_path=out, **kw)


class FakeBackend:
    """In-process backend that can deliver a job's result twice (a retried attempt finishing late)."""

    def __init__(self, duplicate: set) -> None:
        self.queue: list = []
        self.duplicate = duplicate

    def start(self, workers: int) -> int:
        return workers

    def submit(self, wid: int, job) -> None:
        arm, t, i, attempt = job
        rec = {"type": "episode", "arm": arm, "task_id": t, "init_state": i, "attempt": attempt,
               "status": "success", "steps": 1, "queries": 1, "act_s": 0.0, "wall_s": 0.0, "worker": wid}  # fmt: skip
        self.queue.append(("result", wid, rec))
        if (arm, t, i) in self.duplicate:
            self.queue.append(("result", 99, dict(rec, worker=99)))

    def poll(self, timeout: float):
        out, self.queue = self.queue, []
        return out

    def restart(self, wid: int) -> None: ...

    def close(self) -> None: ...


def test_dispatch_never_counts_an_episode_twice(tmp_path: Path) -> None:
    p = Protocol(tasks=(0,), init_states=(0, 1, 2))
    a = [ArmSpec("x", builder=BUILDER)]
    log = ResultsLog(tmp_path / "r.jsonl", make_header(p, a))
    jobs = [("x", 0, i, 1) for i in range(3)]
    n = dispatch(FakeBackend({("x", 0, 1)}), jobs, log, ["x"], workers=1, progress=False)
    log.close()
    assert n == 3 and len(lines(tmp_path / "r.jsonl")) == 4
    # duplicates already in a file (e.g. written by an older run) are ignored when counting
    with open(tmp_path / "r.jsonl", "a") as fh:
        fh.write(json.dumps(dict(lines(tmp_path / "r.jsonl")[1], status="failed")) + "\n")
        fh.write('{"type": "episode", "arm": "x", "task_')  # torn last line
    r = load_results(tmp_path / "r.jsonl")
    s = r.summary()
    assert s["duplicates_ignored"] == 1 and s["arms"]["x"]["successes"] == 3 and r.complete
    log2 = ResultsLog(tmp_path / "r.jsonl", make_header(p, a))  # reopening cuts the torn line off
    log2.close()
    assert (tmp_path / "r.jsonl").read_text().endswith("}\n")


def test_policy_that_cannot_be_built_stops_the_run(tmp_path: Path) -> None:
    bad = [ArmSpec("bad", builder=BUILDER, params={"fail_build": True})]
    with pytest.raises(RuntimeError, match="errored episodes in a row; last error: build: RuntimeError"):
        run_protocol(bad, tasks=range(10), init_states=range(2), workers=1, max_steps=4,
                     results_path=tmp_path / "r.jsonl", env_factory=make_fake_env, progress=False)  # fmt: skip
    assert outcomes(lines(tmp_path / "r.jsonl")[1:])[0] == {}  # nothing counted as a failure


CTRL_C_SCRIPT = """
import sys
from evaluator.fleet import run_protocol
from tests.evaluator.test_fleet import arms, slow_env
res = run_protocol(arms(), tasks=range(10), init_states=range(3), workers=2, max_steps=4,
                   results_path=sys.argv[1], env_factory=slow_env, progress=False)
print("INTERRUPTED", res.interrupted, res.episodes_run, flush=True)
"""


class SlowEnv(FakeEnv):
    def reset(self, init_state=None):
        time.sleep(
            1.0
        )  # 60 episodes on 2 workers >= 30 s: the interrupt lands mid-run even on a loaded machine
        return super().reset(init_state)


def slow_env(cfg: dict) -> SlowEnv:
    return SlowEnv(cfg)


def test_ctrl_c_ends_cleanly_and_keeps_finished_episodes(tmp_path: Path) -> None:
    out = tmp_path / "r.jsonl"
    proc = subprocess.Popen(
        [sys.executable, "-c", CTRL_C_SCRIPT, str(out)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        # as from a terminal: SIGINT at its default even if this process ignores it (a background job does)
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.time() + 120
    while time.time() < deadline and (not out.exists() or len(out.read_text().splitlines()) < 4):
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    stdout, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, stdout[-2000:]
    kept = lines(out)[1:]
    assert "INTERRUPTED True" in stdout and 3 <= len(kept) < 60, stdout[-2000:]
    assert all(r["status"] in ("success", "failed") for r in kept)  # stopped episodes are not errored
    res = run_protocol(arms(), tasks=range(10), init_states=range(3), workers=2, max_steps=4,
                       results_path=out, env_factory=make_fake_env, progress=False)  # fmt: skip
    assert res.complete and res.episodes_run == 60 - len(kept)
    assert len(outcomes(lines(out)[1:])[0]) == 60


@pytest.mark.slow
@pytest.mark.sim
def test_real_libero_paired_arms_in_worker_processes(tmp_path: Path) -> None:
    """Two real arms (the shipped policy and its random-weight baseline) on the same LIBERO episodes."""
    pair = [ArmSpec("policy", allow_random=True), ArmSpec("random", random_weights=True, seed=3)]
    res = run_protocol(pair, tasks=[0], init_states=[0, 1], workers=2, max_steps=16,
                       results_path=tmp_path / "r.jsonl", progress=False)  # fmt: skip
    s = res.summary()
    assert res.complete and s["finished_episodes"] == 4 and s["errored_attempts"] == 0
    assert s["comparisons"]["random"]["pairs"] == 2
    assert (
        "random" in s["arms"]["random"]["backbone"][0] and "random" not in s["arms"]["policy"]["backbone"][0]
    )
    assert all(r["steps"] == 16 or r["status"] == "success" for r in res.records)


class _HungWorker:
    """A worker process that ignores the stop message and exits only when terminated."""

    def __init__(self) -> None:
        self.alive, self.join_timeouts, self.terminated, self.killed = True, [], False, False

    def is_alive(self) -> bool:
        return self.alive

    def join(self, timeout: float | None = None) -> None:
        self.join_timeouts.append(timeout)
        if self.alive and timeout:
            time.sleep(timeout)

    def terminate(self) -> None:
        self.terminated, self.alive = True, False

    def kill(self) -> None:
        self.killed, self.alive = True, False


class _Conn:
    def __init__(self) -> None:
        self.sent, self.closed = [], False

    def send(self, msg: object) -> None:
        self.sent.append(msg)

    def close(self) -> None:
        self.closed = True


def test_closing_a_fleet_stops_its_workers_together() -> None:
    """A fleet whose workers are slow to exit waits one grace period in all, not one per worker."""
    from evaluator.fleet_worker import LocalBackend

    backend = LocalBackend({}, {}, make_fake_env)
    n, grace = 20, 0.2
    for wid in range(n):
        backend.procs[wid], backend.conns[wid] = _HungWorker(), _Conn()
    backend._stop_all(list(range(n)), graceful=True, grace_s=grace)
    procs, conns = list(backend.procs.values()), list(backend.conns.values())
    assert all(c.sent == [None] and c.closed for c in conns)
    assert all(p.terminated and not p.killed and not p.alive for p in procs)
    waited = sum(p.join_timeouts[0] for p in procs)  # the graceful phase: one shared deadline
    assert waited <= grace + 0.1, f"the workers were waited for one after another: {waited:.2f} s"
