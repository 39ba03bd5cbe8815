"""Producer fleets on a local Ray instance: own ids, split tasks, a producer killed mid-run is restarted by Ray
and resumes with its first unfinished episode; CURVE off loopback; one real LIBERO fleet streaming to a trainer."""

from __future__ import annotations

import functools
import json
import os
import re
import threading
from pathlib import Path

import pytest

pytest.importorskip("ray")

from common.cli import parse_config  # noqa: E402
from producer.fleet import fleet_configs, run_fleet  # noqa: E402
from producer.produce import ProducerConfig  # noqa: E402
from tests.stream_helpers import FAST_TRAINER_ARGS, finish, kill_all, spawn, start_trainer  # noqa: E402


def fake_runner(cfg, first_episode: int, on_episode, stop: threading.Event, out_dir: str) -> dict:
    """Stands in for a LIBERO producer: 'runs' its episodes, and producer -0 dies once in episode 2."""
    per_pass = len(cfg.tasks) * cfg.episodes_per_task
    log = Path(out_dir) / f"{cfg.producer_id}.log"
    for ep in range(first_episode, per_pass):
        if stop.is_set():
            break
        marker = Path(out_dir) / f"{cfg.producer_id}.crashed"
        if cfg.producer_id.endswith("-0") and ep == 2 and not marker.exists():
            marker.write_text("1")
            os._exit(1)  # the process dies mid-episode
        with open(log, "a") as fh:
            fh.write(f"{ep} {cfg.tasks[ep // cfg.episodes_per_task]} {os.getpid()}\n")
        on_episode(ep, "success")
    return {"producer_id": cfg.producer_id, "tasks": list(cfg.tasks), "unacked": 0, "refused": ""}


def config(*argv: str) -> ProducerConfig:
    return parse_config(ProducerConfig, list(argv))


def test_fleet_configs_split_tasks_and_require_curve_off_loopback() -> None:
    cfg = config("--tasks", "0", "1", "2", "3", "4", "--producer-id", "p", "--ray-address", "local",
                 "--num-producers", "2")  # fmt: skip
    a, b = fleet_configs(cfg)
    assert (a.producer_id, a.tasks, b.producer_id, b.tasks) == ("p-0", [0, 2, 4], "p-1", [1, 3])
    assert a.ray_address is None and a.num_producers == 1
    remote = config("--endpoint", "tcp://10.0.0.5:5555", "--ray-address", "auto")
    with pytest.raises(ValueError, match="not loopback.*--curve-dir"):
        fleet_configs(remote)
    with pytest.raises(SystemExit):
        config("--num-producers", "2")  # needs --ray-address
    with pytest.raises(SystemExit):
        config("--tasks", "0", "--num-producers", "2", "--ray-address", "local")  # more producers than tasks


def test_dead_producer_is_restarted_and_resumes(tmp_path: Path, capsys) -> None:
    cfg = config("--tasks", "0", "1", "2", "3", "--episodes-per-task", "2", "--producer-id", "f",
                 "--ray-address", "local", "--num-producers", "2", "--max-restarts", "2")  # fmt: skip
    code = run_fleet(cfg, runner=functools.partial(fake_runner, out_dir=str(tmp_path)), num_cpus=2)
    assert code == 0
    fleet = json.loads(re.search(r"FLEET_SUMMARY_JSON (.*)", capsys.readouterr().out).group(1))
    runs = {
        pid: [line.split() for line in (tmp_path / f"{pid}.log").read_text().splitlines()]
        for pid in ("f-0", "f-1")
    }
    # every episode of each producer ran to its end exactly once, in order, on its own tasks
    assert [int(r[0]) for r in runs["f-0"]] == [0, 1, 2, 3] and {int(r[1]) for r in runs["f-0"]} == {0, 2}
    assert [int(r[0]) for r in runs["f-1"]] == [0, 1, 2, 3] and {int(r[1]) for r in runs["f-1"]} == {1, 3}
    assert len({r[2] for r in runs["f-0"]}) == 2  # episodes 0-1 and 2-3 in two processes: restarted
    assert fleet["producers"]["f-0"]["starts"] == 2 and fleet["producers"]["f-0"]["first_episode"] == 2
    assert fleet["producers"]["f-1"]["starts"] == 1
    assert fleet["ledger"]["next_episode"] == {"f-0": 4, "f-1": 4}


@pytest.mark.slow
@pytest.mark.sim
def test_real_producer_fleet_streams_to_the_trainer(tmp_path: Path) -> None:
    """`make produce ARGS="--ray-address local --num-producers 2"`: 2 LIBERO producers (random-weight VLA if no
    weights are installed, short episodes) stream to one trainer; both ids are archived, nothing is lost."""
    run = tmp_path / "run"
    trainer, endpoint = start_trainer(
        run, tmp_path / "trainer.log", ["--exit-after-byes", "2", *FAST_TRAINER_ARGS]
    )
    fleet = None
    try:
        fleet = spawn(
            "producer.produce",
            ["--endpoint", endpoint, "--producer-id", "rf", "--tasks", "0", "1", "--episodes-per-task", "1",
             "--max-steps", "16", "--allow-random-policy", "--image-size", "64", "--flush-timeout-s", "60",
             "--ray-address", "local", "--num-producers", "2"],
            tmp_path / "fleet.log",
        )  # fmt: skip
        out = finish(fleet, tmp_path / "fleet.log", 600)
        finish(trainer, tmp_path / "trainer.log", 120)
    finally:
        kill_all(fleet, trainer)
    assert fleet.returncode == 0, out[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    assert set(summary["producers"]) == {"rf-0", "rf-1"}
    for t in summary["producers"].values():
        assert t["episodes_archived"] == 1 and t["accepted"] == t["archived"] > 0 and t["gaps"] == 0
