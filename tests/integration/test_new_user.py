"""Defects a new user hits when following the README (issue 14, part 3): restarts, a producer without a
trainer, clear messages instead of tracebacks, dataset-info on archives, paths, command lines, noise."""

from __future__ import annotations

import io
import json
import logging
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import zmq

from common import wire
from common.archive import ArchiveWriter, archive_meta
from common.draft import coarse_targets
from common.shapes import DEFAULT_SHAPE as SH
from producer.produce import ProducerConfig
from producer.sender import ReliableSender
from tests.common.test_archive import episode
from tests.integration.test_cli_help import COMMANDS
from tests.stream_helpers import REPO, env, finish, kill_all, producer_args, producer_summary, spawn, wait_for
from trainer.online import BindError, Trainer, TrainerConfig

D = 16


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_archive(path: Path, episodes: list, producers: dict[str, dict] | None = None) -> Path:
    w = ArchiveWriter(path, SH)
    for pid, env_args in (producers or {"p0": {}}).items():
        err = w.set_provenance(
            backbone_id="synthetic", hidden_dim=D, codec_sha256="", producer_id=pid,
            producer_config=json.dumps({"producer": {}, "env_args": env_args}),
        )  # fmt: skip
        assert err is None
    for ep in episodes:
        w.write_episode(ep)
    return path


def trainer_cfg(run_dir: Path, endpoint: str = "tcp://127.0.0.1:*") -> TrainerConfig:
    return TrainerConfig(endpoint=endpoint, run_dir=run_dir, draft_hidden_dim=32, threads=1, device="cpu")


# ---------------------------------------------------------------------------------------- restart
def test_trainer_restarts_on_an_archive_holding_an_episode_without_samples(tmp_path):
    """A producer stopped right after an episode began: the archive holds a 0-sample incomplete episode."""
    run = tmp_path / "run"
    run.mkdir()
    empty = episode(1, 0, status="incomplete")
    make_archive(run / "archive.hdf5", [episode(0, 3, "valid"), empty, episode(2, 4)])
    trainer = Trainer(trainer_cfg(run))  # resumes: refills the buffers from the archive
    assert trainer.learning.ready.is_set()
    assert len(trainer.learning.buffer) == 4 and len(trainer.learning.valset) == 3
    assert coarse_targets(np.zeros((0, *SH.codes_shape), np.uint8), 3).shape == (0, 3, 128)


# ---------------------------------------------------------------------------------------- producer, no trainer
def _sample(sender: ReliableSender, i: int) -> wire.Sample:
    rng = np.random.default_rng(i)
    return wire.Sample(
        "p", sender.session, 0, "libero_spatial", 0, 0, 8 * i, rng.standard_normal(D).astype(np.float32),
        rng.integers(0, SH.grid_size, SH.codes_shape, dtype=np.uint8),
        rng.uniform(-1, 1, SH.chunk_shape).astype(np.float32),
    )  # fmt: skip


@pytest.mark.parametrize("full", ["send queue", "unacknowledged limit"])
def test_sender_without_trainer_warns_and_honours_stop(full, caplog):
    """No trainer at the endpoint: the sender warns early; once its queue (or its unacked limit) is full,
    a stop request (Ctrl-C) still ends it, and nothing it kept counts as delivered."""
    hwm, max_unacked = (2, 10_000) if full == "send queue" else (10_000, 5)
    cfg = ProducerConfig(
        endpoint=f"tcp://127.0.0.1:{free_port()}", producer_id="p", sndhwm=hwm, max_unacked=max_unacked,
        no_trainer_warn_s=0.5, heartbeat_s=0.2,
    )  # fmt: skip
    stop = threading.Event()
    sender = ReliableSender(cfg, stop)
    sent = []

    def produce() -> None:
        sender.send_hello(wire.Hello("p", sender.session, 0, "synthetic", D, SH.to_dict()))
        i = 0
        while not stop.is_set():
            sender.send_data(_sample(sender, i))
            sent.append(i)
            i += 1

    caplog.set_level(logging.WARNING, logger="producer.sender")
    thread = threading.Thread(target=produce, daemon=True)
    thread.start()
    deadline = time.time() + 10
    while "no trainer has answered" not in caplog.text and time.time() < deadline:
        time.sleep(0.1)
    assert "no trainer has answered" in caplog.text
    assert thread.is_alive() and len(sent) < 50  # blocked: the queue is full, nothing is dropped
    stop.set()
    thread.join(5)
    assert not thread.is_alive(), "the sender ignores the stop request"
    t0 = time.time()
    assert not sender.flush(1.0)
    assert time.time() - t0 < 3
    s = sender.stats
    assert s.samples_acked == 0 and len(sender.unacked_samples) == s.samples_sent >= len(sent)
    sender.close()


@pytest.mark.sim
def test_producer_without_trainer_warns_stops_on_ctrl_c_and_exits_nonzero(tmp_path):
    """The real producer against a port where no trainer listens: a warning within seconds, Ctrl-C ends it
    (queue full or not), the summary says nothing was acknowledged, and the exit code says so too."""
    log = tmp_path / "producer.log"
    args = producer_args(f"tcp://127.0.0.1:{free_port()}", "lonely", 0, 1, 16, "--repeat", "--sndhwm", "2")
    args[args.index("--flush-timeout-s") + 1] = "2"
    proc = spawn("producer.produce", [*args, "--no-trainer-warn-s", "1"], log)
    try:
        wait_for(log, r"no trainer has answered", proc, timeout=180)
        wait_for(log, r"produce lonely", proc, timeout=60)  # an episode went by: the queue is full now
        proc.send_signal(signal.SIGINT)
        out = finish(proc, log, 60)
    finally:
        kill_all(proc)
    assert proc.returncode == 1, out[-2000:]
    s = producer_summary(out)
    assert s["samples_sent"] > 0 and s["samples_acked"] == 0 and s["samples_unacked"] == s["samples_sent"]
    assert "NOT DELIVERED" in out and "unacknowledged (not delivered)" in out


# ---------------------------------------------------------------------------------------- clear messages
def test_eval_without_checkpoint_is_a_usage_error(tmp_path, capsys):
    from evaluator.eval import main

    with pytest.raises(SystemExit) as exc:
        main(["--draft", str(tmp_path / "draft_best.pt"), "--out-dir", str(tmp_path / "eval")])
    assert exc.value.code == 2
    assert "no draft checkpoint at" in capsys.readouterr().err
    assert not (tmp_path / "eval").exists()


@pytest.mark.parametrize("kind", ["not hdf5", "truncated", "foreign hdf5", "demonstrations"])
def test_retrain_on_a_file_that_is_no_archive(kind, tmp_path, capsys):
    from trainer.retrain import main

    path = tmp_path / "a.hdf5"
    if kind == "not hdf5":
        path.write_bytes(b"not an archive at all\n" * 50)
    elif kind == "foreign hdf5":
        with h5py.File(path, "w") as f:
            f["x"] = np.zeros(3)
    else:
        with h5py.File(path, "w") as f:
            f["data/demo_0/actions"] = np.zeros((5, 7), np.float32)
        if kind == "truncated":
            path.write_bytes(path.read_bytes()[:300])
    out = tmp_path / "out"
    t0 = time.time()
    with pytest.raises(SystemExit) as exc:
        main(["--archives", str(path), "--run-dir", str(out), "--epochs", "1"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert str(path) in err and "Traceback" not in err
    assert time.time() - t0 < 10 and not out.exists()


def test_retrain_prints_where_it_wrote(tmp_path, capsys):
    from trainer.retrain import main

    archive = make_archive(tmp_path / "a.hdf5", [episode(0, 3, "valid"), episode(1, 0), episode(2, 5)])
    out = tmp_path / "out"
    handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    try:
        code = main(["--archives", str(archive), "--run-dir", str(out), "--epochs", "1", "--threads", "1"])
    finally:  # main ignores both signals once its work is saved (common.shutdown): not for the tests after
        signal.signal(signal.SIGINT, handlers[0])
        signal.signal(signal.SIGTERM, handlers[1])
    assert code == 0
    text = capsys.readouterr().out
    assert f"wrote {out}/" in text and (out / "draft_best.pt").is_file()


def test_port_in_use_is_a_message_and_leaves_nothing_behind(tmp_path, caplog):
    from trainer.online import main

    ctx = zmq.Context()
    busy = ctx.socket(zmq.ROUTER)
    port = busy.bind_to_random_port("tcp://127.0.0.1")
    handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    try:
        run = tmp_path / "run"
        trainer = Trainer(trainer_cfg(run, f"tcp://127.0.0.1:{port}"))
        with pytest.raises(BindError, match="Address already in use"):
            trainer.run()
        assert not run.exists()  # no empty archive.hdf5, no empty run folder
        run.mkdir()  # an existing run folder with an archive stays as it is
        make_archive(run / "archive.hdf5", [episode(0, 2)])
        assert main(["--endpoint", f"tcp://127.0.0.1:{port}", "--run-dir", str(run)]) == 2
        assert "another port" in caplog.text
        assert archive_meta(run / "archive.hdf5")["num_episodes"] == 1
    finally:
        signal.signal(signal.SIGINT, handlers[0])
        signal.signal(signal.SIGTERM, handlers[1])
        busy.close(0)
        ctx.term()


# ---------------------------------------------------------------------------------------- dataset-info
def test_dataset_info_on_an_archive(tmp_path):
    from producer.dataset_info import summarize

    def bddl(*tasks: int) -> dict:
        return {
            "env_kwargs": {"suite": "libero_spatial", "bddl_files": {str(t): f"t{t}.bddl" for t in tasks}}
        }

    eps = [episode(0, 3), episode(1, 0, status="incomplete"), episode(2, 2)]
    for ep in eps:
        for a in ep.actions:
            a[:] = np.arange(SH.chunk_shape[1], dtype=np.float32)  # [T, A]: dim i holds i at every step
    path = make_archive(tmp_path / "a.hdf5", eps, {"p0": bddl(0, 1), "p1": bddl(2, 10)})
    out = io.StringIO()
    summarize(path, out=out)
    text = out.getvalue()
    dims = re.findall(r"dim (\d+): ([-+0-9.]+) / ([-+0-9.]+) / ([-+0-9.]+)", text)
    assert [int(d[0]) for d in dims] == list(range(7)), text
    assert all(float(lo) == float(mean) == float(hi) == i for i, (_, lo, mean, hi) in enumerate(dims))
    assert "over 40 actions" in text  # 5 queries x 8 steps
    with h5py.File(path, "r") as f:
        env_args = json.loads(f["data"].attrs["env_args"])
    assert env_args["env_kwargs"]["bddl_files"] == {str(t): f"t{t}.bddl" for t in (0, 1, 2, 10)}
    assert "t10.bddl" in text  # dataset-info prints them


# ---------------------------------------------------------------------------------------- paths
def _make_n(*targets: str, **variables: str) -> list[str]:
    cmd = ["make", "-n", "-o", "venv", "-o", ".venv/.rsd-installed", *targets]
    cmd += [f"{k}={v}" for k, v in variables.items()]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=True).stdout.splitlines()


def _flag(lines: list[str], module: str, flag: str) -> str:
    line = next(x for x in lines if f"-m {module} " in x)
    return line.split(flag + " ", 1)[1].split()[0]


def test_makefile_defaults_read_what_train_and_demo_write(tmp_path):
    run = "runs/default"
    train = _make_n("train")
    link = next(x for x in train if "ln -sfn" in x)
    train_dir = _flag(train, "trainer.online", "--run-dir")
    assert link.endswith(f" {run}/latest") and train_dir == f"{run}/train"
    demo_dir = _flag(_make_n("demo"), "evaluator.demo", "--run-dir")
    assert demo_dir == run  # the demo writes RUN/<timestamp>/ and points RUN/latest at it
    assert _flag(_make_n("eval"), "evaluator.eval", "--draft") == f"{run}/latest/draft_best.pt"
    assert _flag(_make_n("retrain"), "trainer.retrain", "--archives") == f"{run}/latest/archive.hdf5"
    # what the link command makes: RUN/latest -> train, so the defaults read train's files
    subprocess.run(link.replace(run, str(tmp_path)), shell=True, check=True, cwd=REPO)
    assert (tmp_path / "latest").resolve() == (tmp_path / "train").resolve()


def test_missing_demonstrations_are_named(tmp_path):
    for target in ("train-codec", "train-vla"):
        res = subprocess.run(
            ["make", "-o", "venv", "-o", ".venv/.rsd-installed", target, f"DEMOS={tmp_path}/none.hdf5"],
            cwd=REPO, capture_output=True, text=True,
        )  # fmt: skip
        assert res.returncode != 0 and "make demos" in res.stderr, res.stderr


def test_docs_name_files_and_variables_that_exist():
    text = (REPO / "pyproject.toml").read_text()
    for name in re.findall(r"requirements\.\w+", text):
        assert (REPO / name).is_file(), name
    makefile = (REPO / "Makefile").read_text()
    defined = set(re.findall(r"^([A-Z_]+) \??[:?]?=", makefile, re.M))
    for var in re.findall(r"make \w[\w-]* ([A-Z_]+)=", makefile):
        assert var in defined, f"the Makefile mentions {var}=, which it does not define"


# ---------------------------------------------------------------------------------------- command lines
@pytest.mark.parametrize("module", COMMANDS)
def test_no_abbreviated_flags_and_one_default_each(module, capsys):
    import importlib

    main = importlib.import_module(module).main
    with pytest.raises(SystemExit) as exc:
        main(["--hel"])  # an abbreviation of --help: an error, not help
    assert exc.value.code == 2
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: None)" not in text
    assert not re.search(r"\(default: [^()]*\) \(default:", text), text
    assert not re.search(r"\(none[^()]*\) \(default:", text), text


def test_epoch_is_not_epochs(tmp_path, capsys):
    from trainer.retrain import main

    archive = make_archive(tmp_path / "a.hdf5", [episode(0, 2)])
    with pytest.raises(SystemExit) as exc:
        main(["--archives", str(archive), "--epoch", "1"])
    assert exc.value.code == 2 and "--epoch" in capsys.readouterr().err


def test_max_steps_help_says_what_it_counts(capsys):
    from evaluator.eval import main

    with pytest.raises(SystemExit):
        main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert re.search(r"--max-steps MAX_STEPS env steps \(actions executed", text), text


# ---------------------------------------------------------------------------------------- noise
def test_libero_is_quiet_and_env_args_name_every_task():
    """LIBERO prints a line each time it builds a benchmark, robosuite three macro warnings at import."""
    code = (
        "import json, types; from producer.env import LiberoEnv, EnvConfig, list_tasks, task_init_states\n"
        "list_tasks('libero_spatial'); [task_init_states('libero_spatial', t) for t in range(10)]\n"
        "import robosuite\n"
        "fake = types.SimpleNamespace(cfg=EnvConfig(task_id=3), task=list_tasks('libero_spatial')[3])\n"
        "print('ENV_ARGS', json.dumps(LiberoEnv.env_args(fake, [0, 3, 9])))\n"
    )
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env(), capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    output = res.stdout + res.stderr
    assert "using task orders" not in output and "macro" not in output.lower(), output[-3000:]
    args = json.loads(res.stdout.split("ENV_ARGS ", 1)[1])
    assert list(args["env_kwargs"]["bddl_files"]) == ["0", "3", "9"] and args["env_name"] == "libero_spatial"


def test_progress_lines_in_a_log_file_do_not_run_into_log_lines():
    from common.logs import progress_bar

    buf = io.StringIO()  # not a terminal, like a log file of make demo
    bar = progress_bar(total=3, desc="train", unit="sample", file=buf)
    for i in range(3):
        bar.update(1)
        bar.set_postfix(updates=i)
        buf.write(f"12:00:0{i} trainer INFO a log line\n")
    bar.close()
    lines = buf.getvalue().split("\n")
    assert "\r" not in buf.getvalue() and lines[-1] == ""
    for line in lines[:-1]:
        assert line.startswith("train:") != ("INFO a log line" in line), line


def test_a_late_signal_does_not_turn_a_clean_trainer_exit_into_a_kill(tmp_path):
    """make demo stopped the trainer while it was already exiting: 'trainer exited with code -2'."""
    log = tmp_path / "trainer.log"
    proc = spawn("trainer.online", ["--endpoint", "tcp://127.0.0.1:*", "--run-dir", str(tmp_path / "r")], log)
    try:
        wait_for(log, r"listening on", proc, timeout=120)
        proc.send_signal(signal.SIGINT)
        wait_for(log, r"=== trainer summary", timeout=60)
        proc.send_signal(signal.SIGINT)  # while the interpreter shuts down
        finish(proc, log, 60)
    finally:
        kill_all(proc)
    assert proc.returncode == 0


def test_demo_lets_the_trainer_finish_before_signalling_it(tmp_path, caplog):
    from evaluator.demo import _shutdown

    # a "trainer" that exits on its own a moment later, like one that got every producer's bye; a
    # SIGINT before that kills it (Python's default handler: exit code -2)
    child = "import time; time.sleep(1.5)"
    trainer = subprocess.Popen([sys.executable, "-c", child])
    trainer._rsd_log = io.StringIO()  # type: ignore[attr-defined]
    caplog.set_level(logging.INFO, logger="evaluator.demo")
    assert _shutdown([], trainer, tmp_path / "trainer.log", grace=30) == 0
    assert "exited with code" not in caplog.text


def test_tiny_confidences_are_not_shown_as_zero():
    from evaluator.report import _draft

    result = {
        "draft_accuracy": {
            "token_per_layer": [0.9, 0.5, 0.2], "exact_per_layer": [0.1, 0.0, 0.0],
            "confidence_per_layer_mean": [0.61, 1.4e-14, 0.0],
        },
    }  # fmt: skip
    rows = [x for x in _draft(result) if x.startswith("| L")]
    assert rows[0].endswith("| 0.610 |") and rows[1].endswith("| 1.4e-14 |") and rows[2].endswith("| 0.000 |")
