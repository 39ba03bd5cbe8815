"""Kill an archive writer at random moments and check what reopening the archive leaves.

A writer process appends episodes to one archive (``common.archive.ArchiveWriter``, as ``make train``
does) and reports every episode it has finished. It is killed with SIGKILL at a random moment, the
archive is reopened for appending (which repairs it), and every episode reported before the kill must
be there and readable, with the data it was written with. Repeated ``--kills`` times on the same file;
the summary counts what each reopen found (nothing to repair, an unfinished write rolled back from its
journal, and the repairs of archives without one: a partial group, a superblock end, a salvage) and any
episode lost.

    python -m tools.archive_killtest --kills 200 --out runs/archive_killtest.json
"""

from __future__ import annotations

import collections
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

from tqdm import tqdm

from common.cli import new_parser

REPO = Path(__file__).resolve().parents[1]

WRITER = textwrap.dedent(
    """
    import sys, time
    import numpy as np
    sys.path.insert(0, {repo!r})
    from common.archive import ArchiveWriter, EpisodeRecord
    from common.shapes import DEFAULT_SHAPE as SH
    w = ArchiveWriter({path!r}, SH, journal={journal})
    i = w.num_episodes
    while True:
        rng = np.random.default_rng(i)  # an episode's data is a function of its index: checked later
        ep = EpisodeRecord("p0", "s0", "libero_spatial", i % 10, i, "valid" if i % 7 == 0 else "train",
                           status="success", num_steps=40)
        for j in range(5):
            ep.hidden.append(rng.standard_normal({dim}).astype(np.float16))
            ep.codes.append(rng.integers(0, 7, SH.codes_shape, dtype=np.uint8))
            ep.actions.append(rng.uniform(-1, 1, SH.chunk_shape).astype(np.float32))
            ep.steps.append(8 * j); ep.seqs.append(100 * i + j)
            ep.sent_at.append(time.time()); ep.received_at.append(time.time())
        ep.end_seq = 100 * i + 5
        w.write_episode(ep)
        print(i, flush=True)
        i += 1
    """
)


def _as_written(ep) -> bool:
    """The episode's hidden states are what the writer of that index generated."""
    import numpy as np

    i = int(ep.name.split("_")[1])
    rng = np.random.default_rng(i)
    want = [rng.standard_normal(ep.hidden.shape[1]).astype(np.float16)]
    return bool(np.array_equal(ep.hidden[0].astype(np.float16), want[0]))


def one_kill(
    path: Path, dim: int, rng: random.Random, min_episodes: int, reported: set[int], journal: bool = True
) -> dict:
    """Start a writer on ``path``, kill it at a random moment, reopen, check. Returns what happened;
    ``reported`` (every episode any writer reported finished) grows by this writer's."""
    from common.archive import episode_attrs, iter_episodes
    from common.archive_repair import repair_archive

    proc = subprocess.Popen(
        [sys.executable, "-c", WRITER.format(repo=str(REPO), path=str(path), dim=dim, journal=journal)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    finished = -1
    try:
        while finished < 0:  # the writer is up once it has reported an episode
            line = proc.stdout.readline()
            if not line:
                break
            finished = int(line)
            reported.add(finished)
        target = finished + rng.randint(min_episodes, 3 * min_episodes)
        while finished < target:
            line = proc.stdout.readline()
            if not line:
                break
            finished = int(line)
            reported.add(finished)
        time.sleep(rng.uniform(0.0, 0.02))  # somewhere inside the next episode's write (or between)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        for line in proc.stdout:  # reported after our last read, before the kill
            finished = max(finished, int(line))
            reported.add(int(line))
    row: dict = {"last_reported": finished}
    try:
        rep = repair_archive(path)
        row["repair"] = (
            "salvaged"
            if rep["salvaged"]
            else "superblock end fixed"
            if rep["extended_by"]
            else "partial removed"
            if rep["removed_partial"]
            else "rolled back"
            if rep["rolled_back"] is not None
            else "none"
        )
        row["detail"] = rep
        names = [a["name"] for a in episode_attrs(path)]  # one open, no arrays
        row["present"] = len(names)
        row["lost"] = sorted(reported - {int(n.split("_")[1]) for n in names})
        newest = list(iter_episodes(path, names=names[-8:]))
        row["wrong_data"] = [e.name for e in newest if not _as_written(e)]
    except Exception as exc:  # the archive could not be repaired: the finding this tool looks for
        row["repair"] = "failed"
        row["error"] = f"{type(exc).__name__}: {exc}"
    return row


def main(argv: list[str] | None = None) -> int:
    p = new_parser(description=__doc__, prog="python -m tools.archive_killtest")
    p.add_argument("--kills", type=int, default=100, help="how many times the writer is killed")
    p.add_argument("--dim", type=int, default=512, help="hidden size of the written samples")
    p.add_argument(
        "--min-episodes", type=int, default=3, help="episodes a writer finishes before its kill, at least"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--no-journal",
        action="store_true",
        help="write without the rollback journal (the baseline it is measured against)",
    )
    p.add_argument("--out", type=Path, default=None, help="write the rows and the tally here (JSON)")
    p.add_argument(
        "--dir", type=Path, default=None, help="where the archive lives (default: a temporary folder)"
    )
    args = p.parse_args(argv)
    rng = random.Random(args.seed)
    workdir = args.dir or Path(tempfile.mkdtemp(prefix="rsd_killtest_"))
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / "killtest.hdf5"
    path.unlink(missing_ok=True)
    rows = []
    reported: set[int] = set()
    for _ in tqdm(range(args.kills), desc="kill -9 the writer", unit="kill"):
        row = one_kill(path, args.dim, rng, args.min_episodes, reported, journal=not args.no_journal)
        rows.append(row)
        if row["repair"] == "failed":
            break  # nothing later can write to this file
    tally = collections.Counter(r["repair"] for r in rows)
    lost = len(rows[-1].get("lost", [])) if rows else 0  # cumulative: every reported episode, checked
    wrong = sum(len(r.get("wrong_data", [])) for r in rows)
    summary = {
        "journal": not args.no_journal,
        "kills": len(rows),
        "outcomes": dict(tally),
        "episodes_lost": lost,
        "episodes_with_wrong_data": wrong,
        "episodes_at_end": rows[-1].get("present"),
        "failed": next((r for r in rows if r["repair"] == "failed"), None),
    }
    print(json.dumps(summary, indent=1))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"summary": summary, "rows": rows}, indent=1, default=str))
    return 0 if tally["failed"] == 0 and lost == 0 and wrong == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
