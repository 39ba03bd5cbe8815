"""Print a robomimic-style summary of an HDF5 demonstration file (or an archive in the same layout).

    python -m producer.dataset_info data/demos/libero_spatial_expert.hdf5
    make dataset-info FILE=data/demos/libero_spatial_expert.hdf5

Shows: number of demos and samples, episode length statistics, demos per task (with instructions),
filter keys (``mask/…``), the environment arguments, the structure (shape and dtype of every
dataset) of the first demo, and the action range per dimension.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, TextIO

import h5py
import numpy as np

from common.archive import attr_value
from common.cli import new_parser


def _sorted_demos(names: list[str]) -> list[str]:
    return sorted(names, key=lambda n: int(n.split("_")[-1]) if n.split("_")[-1].isdigit() else n)


def _print_first_demo(data: Any, demos: list[str], p: Any) -> None:
    """The structure of the first demo and per-dimension statistics of every demo's actions."""
    first = data[demos[0]]
    p(f"structure of {demos[0]} (attrs: { ({k: attr_value(v) for k, v in first.attrs.items()}) }):")

    def show(name: str, obj: Any) -> None:
        if isinstance(obj, h5py.Dataset):
            comp = f", {obj.compression}" if obj.compression else ""
            p(f"  {name}: shape {obj.shape}, dtype {obj.dtype}{comp}")

    first.visititems(show)
    # demos hold actions [n, A], archives [n, T, A] (one chunk per query): statistics per action dim A
    acts = [data[d]["actions"][()] for d in demos if "actions" in data[d]]
    acts = np.concatenate(acts, axis=0).reshape(-1, acts[0].shape[-1]) if acts else np.zeros((0, 0))
    if len(acts):
        p("")
        p(f"actions per dimension over {len(acts)} actions (min / mean / max):")
        for i in range(acts.shape[1]):
            col = acts[:, i]
            p(f"  dim {i}: {col.min():+.3f} / {col.mean():+.3f} / {col.max():+.3f}")


def summarize(path: Path, out: TextIO = sys.stdout, verbose: bool = False) -> dict[str, Any]:
    """Print the summary to ``out`` and return its main figures as a dict."""
    if not path.exists():
        raise FileNotFoundError(
            f"no such file: {path} (make dataset-info FILE=…: archives come from `make train` or `make demo`, "
            "demonstrations from `make demos`)"
        )
    with h5py.File(path, "r", swmr=False) as f:
        if "data" not in f:
            raise ValueError(f"{path} has no 'data' group; not a robomimic/LIBERO-style file")
        data = f["data"]
        demos = _sorted_demos([k for k in data.keys() if k.startswith("demo_")])
        lengths = np.array([int(data[d].attrs.get("num_samples", 0)) for d in demos], dtype=np.int64)
        per_task: dict[Any, dict[str, Any]] = {}
        for d in demos:
            a = data[d].attrs
            key = attr_value(a.get("task_id", "?"))
            entry = per_task.setdefault(
                key, {"demos": 0, "samples": 0, "instruction": attr_value(a.get("instruction", ""))}
            )
            entry["demos"] += 1
            entry["samples"] += int(a.get("num_samples", 0))

        p = lambda *s: print(*s, file=out)  # noqa: E731
        p(f"file: {path} ({path.stat().st_size / 2**20:.1f} MiB)")
        p(f"total demos: {len(demos)}")
        p(
            f"total samples: {int(lengths.sum())} (data attr total: {attr_value(data.attrs.get('total', 'n/a'))})"
        )
        if len(lengths):
            p(
                f"episode length: mean {lengths.mean():.1f}, std {lengths.std():.1f}, "
                f"min {lengths.min()}, max {lengths.max()}"
            )
        for key in ("source", "schema_version", "num_failures", "repository_version", "date"):
            if key in data.attrs:
                p(f"{key}: {attr_value(data.attrs[key])}")
        p("")
        p("demos per task:")
        for task, entry in sorted(per_task.items(), key=lambda kv: str(kv[0]).zfill(4)):
            p(
                f"  task {task}: {entry['demos']:4d} demos, {entry['samples']:6d} samples  {entry['instruction']}"
            )
        p("")
        masks = {}
        if "mask" in f:
            for k in f["mask"]:
                masks[k] = len(f["mask"][k])
        p(f"filter keys: {masks if masks else 'none'}")
        if "env_args" in data.attrs:
            env_args = json.loads(attr_value(data.attrs["env_args"]))
            p("env args:")
            p(json.dumps(env_args, indent=2, sort_keys=True))
        p("")
        if demos:
            _print_first_demo(data, demos, p)
        if verbose:
            p("")
            for d in demos:
                a = {k: attr_value(v) for k, v in data[d].attrs.items()}
                p(f"  {d}: {a}")
    return {
        "num_demos": len(demos),
        "total_samples": int(lengths.sum()),
        "per_task": {str(k): v for k, v in per_task.items()},
        "masks": masks,
    }


def main(argv: list[str] | None = None) -> int:
    parser = new_parser(
        prog="python -m producer.dataset_info",
        description="Print a robomimic-style summary of an HDF5 demonstration file or archive.",
    )
    parser.add_argument("file", type=Path, help="HDF5 file with a data/demo_N layout")
    parser.add_argument("--verbose", action="store_true", help="also list the attributes of every demo")
    args = parser.parse_args(argv)
    try:
        summarize(args.file, verbose=args.verbose)
    except (FileNotFoundError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
