"""The training record of a policy made by ``scripts/policy_pipeline.sh``: one JSON file to ship beside
the weights (``assets/embedded_vla/training_record.json``).

It gathers what the run wrote: where every training episode started (the pipeline's leak check of all its
data files, ``training_data.json``), which files trained the final weights, each round's closed-loop success
on fresh starts (the DAgger rollouts and the validation that picked the round), the final pick, and the
standard-protocol results given with ``--protocol``. Nothing is measured here; a missing file is an error.

    python -m tools.policy_record --run runs/policy2 --protocol runs/policy2/eval_final.json \\
        --out assets/embedded_vla/training_record.json
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from common.cli import new_parser
from common.init_states import FRESH, parse_init


def _load(path: Path) -> Any:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found (is --run a finished policy_pipeline.sh run?)")
    return json.loads(path.read_text())


def _success(report: dict[str, Any]) -> dict[str, Any]:
    ps = report["policy_success"]
    return {"policy": report.get("policy"), "init_states": report["config"]["init_states"],
            "overall": ps["overall"], "per_task": ps["per_task"]}  # fmt: skip


def _protocol(spec: str) -> dict[str, Any]:
    """``FILE`` or ``FILE=NOTE``: an evaluator.rollout report, or an evaluator.eval one (its closed loop)."""
    path, _, note = spec.partition("=")
    ev = _load(Path(path))
    if "closed_loop" in ev:  # evaluator.eval: the fleet's result sits under closed_loop.protocol
        fleet = (ev["closed_loop"] or {}).get("protocol") or {}
        meta = ev.get("meta", {})
        head = {k: meta[k] for k in ("date", "machine", "decode_layers") if k in meta}
    else:  # evaluator.rollout
        fleet, head = ev, {k: ev[k] for k in ("date", "machine", "command") if k in ev}
    if "arms" not in fleet:
        raise ValueError(
            f"{path}: neither an evaluator.rollout report nor an evaluator.eval one with a closed loop"
        )
    keep = ("protocol", "complete", "finished_episodes", "errored_attempts", "wall_s", "comparisons")
    out = head | {k: fleet[k] for k in keep if k in fleet}
    out.update(file=Path(path).name, note=note, arms=fleet["arms"])
    return out


def build_record(run: Path, protocols: list[str]) -> dict[str, Any]:
    """The record of the run in ``run`` (see the module docstring)."""
    data = _load(run / "training_data.json")
    final = _load(run / "final_pick.json")["final"] if (run / "final_pick.json").is_file() else None
    final = final or Path(run / "final").resolve().name
    cfg = _load(run / final / "config.json")
    trained_on = sorted(Path(p).name for p in cfg["train"]["demos"] or [])
    starts = {k: v for k, v in data["sources"].items() if k.split(":")[0] in trained_on}
    kinds = {parse_init(v)[0] for v in starts.values()}
    rounds: dict[str, Any] = {}
    for f in sorted([*run.glob("pick_*.json"), *run.glob("dagger_*.json")]):
        rounds[f.stem] = _success(_load(f))
    for f in sorted(run.glob("val_r*.json")):
        rounds[f.stem] = _success(_load(f))
    return {
        "final_weights": final,
        "trained_on_files": trained_on,
        "codec_trained_on_files": sorted(
            Path(p).name for p in _load(run / "codec" / "codec.json")["trained_on"]["files"]
        ),
        "trained_on_episodes": len(starts),
        "trained_on_start_kinds": sorted(kinds),
        "trained_on_starts": starts,
        "leak_check_all_run_data": {k: data[k] for k in ("counts", "min_distance_m", "check", "files")},
        "size_pick": _load(run / "pick.json"),
        "round_pick": _load(run / "final_pick.json") if (run / "final_pick.json").is_file() else None,
        "rounds": rounds,
        "protocol": [_protocol(p) for p in protocols],
        "train_config": cfg["train"],
        "held_out": cfg.get("held_out"),
        "fresh_only": kinds == {FRESH},
    }


def main(argv: list[str] | None = None) -> None:
    parser = new_parser(prog="python -m tools.policy_record", description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, required=True, help="the pipeline's RUN folder")
    parser.add_argument(
        "--protocol",
        nargs="*",
        default=[],
        metavar="FILE[=NOTE]",
        help="standard-protocol reports to add (evaluator.rollout or evaluator.eval JSON)",
    )
    parser.add_argument("--out", type=Path, required=True, help="the record (JSON)")
    args = parser.parse_args(argv)
    try:
        record = build_record(args.run, args.protocol)
    except (OSError, KeyError, ValueError) as exc:
        parser.error(str(exc))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=1, sort_keys=True, default=str) + "\n")
    print(f"{args.out}: {record['final_weights']}, {record['trained_on_episodes']} training episodes "
          f"({', '.join(record['trained_on_start_kinds'])} starts only), leak check "
          f"{record['leak_check_all_run_data']['check']}")  # fmt: skip


if __name__ == "__main__":
    main()
