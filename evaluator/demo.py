"""The main job for a new user (`make demo`): stream, train the draft online, evaluate, summarize.

    python -m evaluator.demo --run-dir runs/default --train-minutes 6

1. starts the trainer (`trainer.online`) and a producer (`producer.produce`) as two processes that
   talk over a real ZeroMQ socket on 127.0.0.1, with the shipped embedded VLA on libero_spatial;
2. after the training budget, stops the producer (it says bye), lets the trainer write its final
   checkpoint and summary;
3. runs the evaluator (`evaluator.eval`) with the fresh draft: latency of RSD vs baseline on the same
   observations, acceptance, action deviation, closed-loop success of baseline vs RSD;
4. prints a short summary and where the report, plots, archive and checkpoint are.

Each run gets its own folder ``RUN_DIR/<timestamp>/``; ``RUN_DIR/latest`` points at the newest, and
that is where the Makefile's defaults look (``make eval``, ``make retrain``, ``make dataset-info``).

The children's output goes to log files in the run directory; this process shows one progress bar.
Ctrl-C stops everything cleanly (the trainer still closes its archive and writes a checkpoint).
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from common.cli import parse_config
from common.logs import progress_bar, setup_logging
from evaluator.arms import is_known_name

log = logging.getLogger("evaluator.demo")
REPO = Path(__file__).resolve().parents[1]


@dataclass
class DemoConfig:
    """Stream producer -> trainer with the shipped embedded VLA, train the draft online, evaluate it."""

    run_dir: Path = field(
        default=Path("runs/default"),
        metadata={"help": "output folder: the run goes to RUN_DIR/<timestamp>/, RUN_DIR/latest points at it"},
    )
    train_minutes: float = field(
        default=6.0, metadata={"help": "online training budget (producer + trainer running)"}
    )
    producers: int = field(default=1, metadata={"help": "producer processes feeding the trainer"})
    first_init_state: int = field(
        default=5, metadata={"help": "producers start at this init state (0-4 are kept for evaluation)"}
    )
    eval_tasks: list[int] = field(
        default_factory=lambda: list(range(10)), metadata={"help": "tasks evaluated"}
    )
    eval_init_states: list[int] = field(
        default_factory=lambda: [0],
        metadata={"help": "closed-loop init states per task (baseline and RSD arms)"},
    )
    eval_arms: list[str] = field(
        default_factory=lambda: ["baseline", "relaxed", "truncate-k2"],
        metadata={
            "help": "arms run closed loop (baseline, strict, relaxed, draft-substitution, truncate-kK); "
            "strict equals baseline by construction"
        },
    )
    eval_max_chunks: int = field(default=120, metadata={"help": "open-loop latency chunks measured"})
    warmup_steps: int = field(
        default=200,
        metadata={"help": "learning-rate warmup of the short online run (make train's default is 1000)"},
    )
    skip_eval: bool = field(default=False, metadata={"help": "stop after training"})
    torch_threads: int = field(default=1, metadata={"help": "torch threads of each child process"})

    def __post_init__(self) -> None:
        if self.train_minutes <= 0:
            raise ValueError(f"train_minutes must be positive, got {self.train_minutes}")
        if not 1 <= self.producers <= 8:
            raise ValueError(f"producers must be in 1..8, got {self.producers}")
        bad = sorted(a for a in self.eval_arms if not is_known_name(a))
        if bad:
            raise ValueError(
                f"unknown eval arms {bad}; valid: baseline, strict, relaxed, draft-substitution, truncate-kK"
            )
        if self.eval_max_chunks <= 0:
            raise ValueError(f"eval_max_chunks must be positive, got {self.eval_max_chunks}")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def check_assets() -> None:
    missing = [p for p in ("assets/embedded_vla", "assets/codec") if not (REPO / p).is_dir()]
    if missing:
        raise SystemExit(
            f"shipped weights missing: {missing}. They are part of the repository; "
            "re-clone, or train them with `make train-codec` and `make train-vla`."
        )


def _spawn(args: list[str], log_path: Path, env: dict[str, str]) -> subprocess.Popen:
    fh = open(log_path, "wb")  # noqa: SIM115 - closed when the process is reaped
    proc = subprocess.Popen(
        [sys.executable, "-m", *args], stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=REPO
    )
    proc._rsd_log = fh  # type: ignore[attr-defined]
    return proc


def _stop(proc: subprocess.Popen, timeout: float, name: str, grace: float = 0.0) -> int | None:
    """End a child: let it finish on its own for ``grace`` seconds, then SIGINT, SIGTERM, SIGKILL."""
    if grace > 0:
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pass
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            log.warning("%s did not stop within %.0f s after SIGINT; sending SIGTERM", name, timeout)
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    proc._rsd_log.close()  # type: ignore[attr-defined]
    return proc.returncode


def _shutdown(
    producers: list[subprocess.Popen], trainer: subprocess.Popen, trainer_log: Path, grace: float = 60.0
) -> int | None:
    """Stop the producers (each closes its episode, waits for its acks, says bye), then give the trainer
    ``grace`` seconds to finish on its own (it exits after every producer's bye) before signalling it:
    a signal that lands while it is already exiting would end it with code -2. Returns its exit code."""
    for i, p in enumerate(producers):
        _stop(p, timeout=90, name=f"producer-{i}")
    code = _stop(trainer, timeout=180, name="trainer", grace=grace)
    if code != 0:
        log.warning("the trainer exited with code %s; see %s", code, trainer_log)
    return code


def _tail(path: Path, n: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


def run(cfg: DemoConfig) -> dict:
    check_assets()
    run_dir = (cfg.run_dir / time.strftime("%Y%m%d-%H%M%S")).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    latest = cfg.run_dir / "latest"
    if latest.is_symlink() or not latest.exists():
        latest.unlink(missing_ok=True)
        latest.symlink_to(run_dir.name)
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    env = {
        **os.environ,
        "OMP_NUM_THREADS": str(cfg.torch_threads),
        "MUJOCO_GL": os.environ.get("MUJOCO_GL", "egl"),
    }
    log.info("run folder %s, endpoint %s", run_dir, endpoint)
    interrupted = _stream_and_train(cfg, run_dir, endpoint, env)

    summary = {"run_dir": str(run_dir), "endpoint": endpoint}
    trainer_summary = run_dir / "summary.json"
    if trainer_summary.is_file():
        summary["trainer"] = json.loads(trainer_summary.read_text())
    ckpt = run_dir / "draft_best.pt"
    if not ckpt.is_file():
        raise RuntimeError(
            f"the trainer wrote no checkpoint; see {run_dir / 'trainer.log'}:\n{_tail(run_dir / 'trainer.log')}"
        )
    summary["checkpoint"] = str(ckpt)
    if interrupted or cfg.skip_eval:
        return summary
    return {**summary, **_evaluate(cfg, ckpt, run_dir / "eval", env)}


def _stream_and_train(cfg: DemoConfig, run_dir: Path, endpoint: str, env: dict[str, str]) -> bool:
    """The trainer and the producers for the training budget, then a clean stop; True if interrupted."""
    budget_s = cfg.train_minutes * 60
    trainer = _spawn(
        ["trainer.online", "--endpoint", endpoint, "--run-dir", str(run_dir), "--exit-after-byes",
         str(cfg.producers), "--no-resume", "--threads", str(cfg.torch_threads), "--max-runtime-s",
         str(int(budget_s + 240)), "--warmup-steps", str(cfg.warmup_steps)],
        run_dir / "trainer.log",
        env,
    )  # fmt: skip
    time.sleep(2.0)
    producers = [
        _spawn(
            [
                "producer.produce",
                "--endpoint",
                endpoint,
                "--producer-id",
                f"demo-{i}",
                "--repeat",
                "--first-init-state",
                str(cfg.first_init_state + 20 * i),
                "--episodes-per-task",
                "20",
                "--threads",
                str(cfg.torch_threads),
            ],
            run_dir / f"producer-{i}.log",
            env,
        )  # fmt: skip
        for i in range(cfg.producers)
    ]
    t0 = time.time()
    try:
        with progress_bar(
            total=int(budget_s), desc="online draft training", unit="s", dynamic_ncols=True
        ) as bar:
            while (elapsed := time.time() - t0) < budget_s:
                if trainer.poll() is not None:
                    raise RuntimeError(
                        f"the trainer exited early (code {trainer.returncode}):\n{_tail(run_dir / 'trainer.log')}"
                    )
                dead = [p for p in producers if p.poll() is not None and p.returncode != 0]
                if dead:
                    raise RuntimeError(
                        f"a producer exited with code {dead[0].returncode}:\n{_tail(run_dir / 'producer-0.log')}"
                    )
                bar.n = int(elapsed)
                bar.set_postfix_str(_progress_hint(run_dir / "trainer.log"))
                bar.refresh()
                time.sleep(2.0)
            bar.n = int(budget_s)
    except KeyboardInterrupt:
        log.warning("interrupted: stopping producers and trainer cleanly")
        return True
    finally:
        _shutdown(producers, trainer, run_dir / "trainer.log")
    return False


def _evaluate(cfg: DemoConfig, ckpt: Path, eval_dir: Path, env: dict[str, str]) -> dict:
    """``python -m evaluator.eval`` with the fresh draft, as a child process; its eval.json."""
    args = [
        "evaluator.eval", "--draft", str(ckpt), "--out-dir", str(eval_dir), "--tasks", *map(str, cfg.eval_tasks),
        "--closed-loop-init-states", *map(str, cfg.eval_init_states), "--max-chunks", str(cfg.eval_max_chunks),
        "--torch-threads", str(cfg.torch_threads), "--closed-loop-arms", *cfg.eval_arms,
    ]  # fmt: skip
    log.info("evaluating: python -m %s", " ".join(args))
    proc = subprocess.Popen([sys.executable, "-m", *args], env=env, cwd=REPO)
    try:
        proc.wait()
    except KeyboardInterrupt:
        proc.send_signal(signal.SIGINT)
        proc.wait()
        raise
    if proc.returncode != 0:
        raise RuntimeError(f"the evaluator failed with code {proc.returncode}")
    out: dict = {"eval_dir": str(eval_dir)}
    eval_json = eval_dir / "eval.json"
    if eval_json.is_file():
        out["eval"] = json.loads(eval_json.read_text())
    return out


def _progress_hint(log_path: Path) -> str:
    """The trainer's latest validation accuracy and sample count, read from its log."""
    try:
        with open(log_path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(0, fh.tell() - 4000))
            lines = fh.read().decode(errors="replace").splitlines()
    except OSError:
        return ""
    for line in reversed(lines):
        found = dict(re.findall(r"(episodes|updates|val_acc)=([0-9.]+)", line))
        if found:
            return ", ".join(f"{k}={v}" for k, v in found.items())
    return ""


def print_summary(summary: dict) -> None:
    """A short human summary of the trainer's and the evaluator's JSON outputs."""
    out = ["", "=" * 72, "RSD demo summary", "=" * 72]
    tr = summary.get("trainer", {})
    if tr:
        prods = tr.get("producers", {})
        sent = sum(p.get("reported_sent", 0) for p in prods.values())
        archived = sum(p.get("archived", 0) for p in prods.values())
        rejected = sum(sum(p.get("rejected", {}).values()) for p in prods.values())
        out.append(
            f"stream      : {sent} samples sent, {archived} archived, {rejected} rejected, "
            f"{tr.get('archive', {}).get('episodes', '?')} episodes, {tr.get('updates', '?')} draft updates"
        )
        last = tr.get("last_validation", {})
        if last:
            acc = ", ".join(f"L{i} {a:.3f}" for i, a in enumerate(last.get("val_acc_per_layer", [])))
            out.append(f"draft (held-out episodes, online): mean {last.get('val_accuracy', 0):.3f} ({acc})")
    ev = summary.get("eval")
    if ev:
        out.extend(_format_eval(ev))
    out.append("")
    out.append(f"run folder : {summary['run_dir']}")
    latest = Path(summary["run_dir"]).parent / "latest"
    if latest.resolve() == Path(summary["run_dir"]).resolve():
        out.append(f"latest     : {latest} (the default of make eval, make retrain, make dataset-info)")
    out.append(f"checkpoint : {summary.get('checkpoint')}")
    out.append(f"archive    : {Path(summary['run_dir']) / 'archive.hdf5'}")
    if "eval_dir" in summary:
        out.append(f"report     : {Path(summary['eval_dir']) / 'report.md'} (plots and eval.json beside it)")
    print("\n".join(out))


SUMMARY_ARMS = ("baseline", "strict", "relaxed", "draft-substitution")
COLUMNS = """  columns: speedup = baseline median / arm median, measured in this process (> 1 faster, < 1 SLOWER);
           mean j = drafted layers accepted per chunk; mean/p99 |da| = change of every action component
           against the baseline's chunk; same codes = chunks whose codes equal the baseline's;
           kind: lossless = output identical to the baseline; verified = speculative decoding that can
           reject a drafted layer (lossy); UNVERIFIED = drafted layers used unchecked (not speculative
           decoding); truncation = first k layers only. verdict: an arm wins only if no truncation is
           both at least as fast and at least as faithful."""


def _kind(arm: dict) -> str:
    kind = arm.get("kind", "")
    if arm.get("lossless"):
        return "lossless"
    if kind == "substitution":
        return "UNVERIFIED"
    return {"relaxed": "verified", "truncation": "truncation"}.get(kind, kind)


def _format_eval(ev: dict) -> list[str]:
    lines = []
    acc = ev.get("draft_accuracy", {})
    if acc.get("token_per_layer"):
        tok = ", ".join(f"L{i} {a:.3f}" for i, a in enumerate(acc["token_per_layer"]))
        exact = ", ".join(f"{a:.2f}" for a in acc.get("exact_per_layer", []))
        lines.append(f"draft (eval episodes): token accuracy {tok}; whole layer exact {exact}")
    arms = ev.get("arms", {})
    D = ev.get("meta", {}).get("decode_layers")
    verdict = {r["arm"]: r for r in ev.get("frontier", [])}
    shown = [
        a for a in (*SUMMARY_ARMS, f"truncate-k{(D or 2) - 1}", f"truncate-k{(D or 2) - 2}") if a in arms
    ]
    if shown:
        lines.append(
            f"latency on {ev.get('chunks', '?')} chunks (same observations, one process; the baseline decodes "
            f"{D or '?'} layers):"
        )
        lines.append(
            f"  {'arm':<20}{'kind':<12}{'median ms':>10}{'speedup':>9}{'mean j':>8}{'mean |da|':>10}"
            f"{'p99 |da|':>9}{'same codes':>11}  verdict"
        )
        for name in shown:
            arm = arms[name]
            dev = arm.get("action_deviation", {})
            j = f"{arm['mean_j']:.2f}" if arm.get("rsd") else "-"
            v = verdict.get(name, {})
            lines.append(
                f"  {name:<20}{_kind(arm):<12}{arm['latency_ms']['median']:>10.1f}{arm['speedup_median']:>8.2f}x"
                f"{j:>8}{dev.get('mean_abs', float('nan')):>10.4f}{dev.get('p99_abs', float('nan')):>9.4f}"
                f"{100 * arm.get('identical_fraction', 1.0):>10.0f}%  "
                + ("WIN" if v.get("win") else ("-" if v.get("win") is None else "no win"))
            )
        lines.append(COLUMNS)
        for name in ("strict", "relaxed", "draft-substitution"):
            if name in arms and arms[name]["speedup_median"] < 1.0:
                lines.append(
                    f"  plainly: `{name}` was SLOWER than ordinary decoding here "
                    f"({arms[name]['speedup_median']:.2f}x, mean {arms[name]['mean_j']:.2f} layers accepted)."
                )
    cl = ev.get("closed_loop", {})
    rates = {k: v for k, v in cl.items() if isinstance(v, dict) and v.get("success_rate") is not None}
    if rates:
        lines.append(
            "closed-loop success: "
            + ", ".join(
                f"{k} {v['successes']}/{v['episodes']} ({100 * v['success_rate']:.0f}%)" + _verdict(v)
                for k, v in rates.items()
            )
            + f" (same {len(cl.get('episodes', []))} episodes per arm; small samples: differences of a few "
            "episodes are noise)"
        )
    return lines


def _verdict(arm: dict) -> str:
    """The paired comparison with the baseline (eval.json of the fleet's closed loop), if any."""
    c = arm.get("vs_baseline")
    return "" if not c else f" [vs baseline McNemar p {c['mcnemar_p']:.2g}, {c['verdict']}]"


def main(argv: list[str] | None = None) -> None:
    setup_logging("demo")
    cfg = parse_config(DemoConfig, argv)
    try:
        summary = run(cfg)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        raise SystemExit(130) from None
    except RuntimeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(1) from None
    print_summary(summary)


if __name__ == "__main__":
    main()
