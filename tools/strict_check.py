"""Is strict RSD exact on a policy? Decode recorded frames with the baseline and with strict RSD and count
the chunks whose codes differ (docs/DESIGN.md §10.4: strict must reproduce the baseline's output).

Strict runs with the given draft and, to reach every accepted depth j, with oracle drafts that copy the
baseline's first ``good`` layers and get the next one wrong (good = 0 .. K). Frames come from scripted-
expert demonstration files (``producer.demos``); the instruction is the one each episode recorded.

    python -m tools.strict_check --demos data/demos/x.hdf5 --draft runs/policy4/draft.pt --out runs/strict.json
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import h5py
import torch

from common.cli import new_parser
from common.demos import read_demos
from common.policy import Observation
from common.vla import load_policy
from evaluator.rsd import AcceptanceConfig, Proposal, RSDConfig, RSDEngine, load_draft


class OracleDraft:
    """Proposes the baseline's own first ``good`` layers, then a wrong one (each token moved by one level)."""

    def __init__(self, codes: torch.Tensor, good: int, k: int):
        d = codes.permute(0, 3, 1, 2)[:, :k].clone()  # [B, k, T, H]
        if good < k:
            d[:, good] = (d[:, good] + 1) % 7
        self.codes, self.num_layers = d, k

    def propose(self, hidden: torch.Tensor) -> Proposal:
        return Proposal(codes=self.codes, confidence=torch.ones(self.codes.shape[:2]))


def frames(paths: list[Path], stride: int) -> Any:
    """(episode, step, Observation) for every ``stride``-th frame of every episode, read by the project's
    demonstration reader (``common.demos.read_demos``, images at the recorded size)."""
    with h5py.File(paths[0], "r") as f:
        size = int(next(iter(f["data"].values()))["obs"]["agentview_rgb"].shape[1])
    d = read_demos(paths, size, frame_stride=stride, allow_benchmark_states=True, workers=1)
    for i in range(len(d["proprio"])):
        e = int(d["episode"][i])
        images = d["images"][i]  # [2, S, S, 3]: agentview, wrist
        ob = Observation(images[0], images[1], d["proprio"][i], str(d["instruction_of_episode"][e]))
        yield str(d["episode_names"][e]), int(d["step"][i]), ob


def check(demos: list[Path], draft: Path | None, stride: int = 1, policy: Any = None) -> dict[str, Any]:
    policy = policy or load_policy("embedded")
    proposer = load_draft(draft, policy)[0] if draft else None
    k = proposer.num_layers if proposer else 3
    base_engine = RSDEngine(policy, None)
    strict = RSDEngine(policy, proposer, RSDConfig(AcceptanceConfig("strict"))) if proposer else None
    counts = {"draft": [0, 0], "oracle": [0, 0]}  # [decodes, mismatches]
    mismatches = []
    for name, t, ob in frames(demos, stride):
        base = base_engine.baseline([ob])
        runs = [("draft", strict)] if strict else []
        runs += [("oracle", RSDEngine(policy, OracleDraft(base.codes, g, k))) for g in range(k + 1)]
        for kind, engine in runs:
            out = engine.rsd([ob])
            counts[kind][0] += 1
            if not torch.equal(out.codes, base.codes):
                counts[kind][1] += 1
                dev = float((out.actions - base.actions).abs().max())
                mismatches.append({"episode": name, "step": t, "kind": kind,
                                   "accepted": out.stats.accepted, "max_abs_action_change": dev})  # fmt: skip
    return {
        "policy": policy.backbone_id,
        "draft": str(draft) if draft else None,
        "decodes": {k: v[0] for k, v in counts.items()},
        "mismatches": {k: v[1] for k, v in counts.items()},
        "examples": mismatches[:50],
    }


def main(argv: list[str] | None = None) -> int:
    parser = new_parser(prog="python -m tools.strict_check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--demos", type=Path, nargs="+", required=True, help="demonstration HDF5 files")
    parser.add_argument(
        "--draft", type=Path, default=None, help="draft checkpoint (none: oracle drafts only)"
    )
    parser.add_argument(
        "--stride",
        type=int,
        default=1,
        help="every N-th frame of each episode (offset alternating per episode, as in training)",
    )
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--out", type=Path, default=None, help="write the report here (JSON)")
    args = parser.parse_args(argv)
    for p in [*args.demos, *([args.draft] if args.draft else [])]:
        if not p.is_file():
            parser.error(f"{p}: not found")
    if args.stride < 1:
        parser.error("--stride must be >= 1")
    torch.set_num_threads(args.threads)
    report = check(args.demos, args.draft, args.stride)
    print(json.dumps({k: report[k] for k in ("policy", "decodes", "mismatches")}))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1) + "\n")
    return 1 if any(report["mismatches"].values()) else 0


if __name__ == "__main__":
    raise SystemExit(main())
