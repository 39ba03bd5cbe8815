"""Bring a pipeline run back from a leased node whose file transfers are small: pack, check, unpack.

``pack`` writes one gzipped tar of the run (without the demonstrations, the rollout HDF5 files and the
weights of the candidates that were not picked) split into parts of at most ``--part-mb``, and a
``MANIFEST.json`` with every member's size and sha256. It checks that what a policy needs to act is in
the pack: the final weights with their config, **and the codec they were trained against** (the weights
are useless without it), and the draft. ``unpack`` joins the parts, checks every part and member
against the manifest, and writes the run.

    python -m tools.run_pack pack --run runs/policy3 --out "$OUT"          # on the node
    python -m tools.run_pack unpack --parts /work/.device/7 --to runs/policy3   # here

A missing required file is reported and makes ``pack`` exit with 1; whatever exists is packed all the
same, so a run cut short still brings back what it has.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import sys
import tarfile
from pathlib import Path
from typing import Any

from common.cli import new_parser

FORMAT = "rsd-run-pack/1"
# What acting (and drafting) with the run's final policy needs, relative to the run folder.
REQUIRED = ("final/model.safetensors", "final/config.json", "codec/codec.safetensors", "codec/codec.json")
OPTIONAL_REQUIRED = ("draft.pt",)  # required when the run made one (the pipeline's DRAFT=1)
CANDIDATES = (
    "vla_a0/model.safetensors",
    "vla_a0/config.json",
    "vla_b0/model.safetensors",
    "vla_b0/config.json",
)
SKIP_DIRS = {"demos", "pack", "__pycache__"}
SKIP_SUFFIXES = (".hdf5", ".partial", ".npz", ".lock")
BIG = 1 << 20  # weights above this size are kept only for the final policy (unless --all-weights)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def select(run: Path, all_weights: bool = False) -> tuple[list[Path], list[Path]]:
    """The run's files to pack (relative paths; symbolic links kept as links) and those left out."""
    final = (run / "final").resolve() if (run / "final").exists() else None
    all_weights = all_weights or final is None  # candidates only (the pick runs elsewhere): all of them
    keep: list[Path] = []
    left: list[Path] = []
    for path in sorted(run.rglob("*")):
        rel = path.relative_to(run)
        if path.is_dir() and not path.is_symlink():
            continue
        if (
            rel.parts[0] in SKIP_DIRS
            or path.name.endswith(SKIP_SUFFIXES)
            or (
                len(rel.parts) > 1
                and rel.parts[0] == "final"  # reached through the link: packed via its target
            )
        ):
            left.append(rel)
            continue
        big_weights = (
            path.suffix in (".safetensors", ".pt") and not path.is_symlink() and path.stat().st_size > BIG
        )
        if (
            big_weights
            and not all_weights
            and not path.name.startswith("draft")
            and path.parent.resolve() != final
        ):
            left.append(rel)
            continue
        keep.append(rel)
    return keep, left


def missing_required(run: Path) -> list[str]:
    """Required files the run lacks (``draft.pt`` only when the run's pipeline log says it drafted; both
    candidates and their drafts when it stopped with the candidates, CANDIDATES_ONLY=1)."""
    log = (run / "pipeline.log").read_text(errors="replace") if (run / "pipeline.log").is_file() else ""
    if "candidates ready" in log:
        need = [*CANDIDATES, *REQUIRED[2:]]
        need += ["draft_a.pt", "draft_b.pt"] if "draft of" in log else []
    else:
        need = list(REQUIRED) + (list(OPTIONAL_REQUIRED) if "draft of" in log else [])
    return [r for r in need if not (run / r).is_file()]


def pack(run: Path, out: Path, part_mb: float = 15.0, all_weights: bool = False) -> dict[str, Any]:
    """Write ``out/run.tgz.part-NNN`` and ``out/MANIFEST.json``; return the manifest."""
    if not run.is_dir():
        raise FileNotFoundError(f"{run}: no such run folder")
    part_bytes = int(part_mb * (1 << 20))
    if part_bytes < 1:
        raise ValueError(f"--part-mb must be positive, got {part_mb}")
    keep, left = select(run, all_weights)
    members: dict[str, dict[str, Any]] = {}
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz", compresslevel=6) as tar:
        for rel in keep:
            path = run / rel
            tar.add(path, arcname=str(rel), recursive=False)
            if path.is_symlink():
                members[str(rel)] = {"link": str(path.readlink())}
            else:
                data = path.read_bytes()
                members[str(rel)] = {"size": len(data), "sha256": _sha256(data)}
    blob = buf.getvalue()
    out.mkdir(parents=True, exist_ok=True)
    parts = []
    for i in range(0, max(len(blob), 1), part_bytes):
        name = f"run.tgz.part-{i // part_bytes:03d}"
        chunk = blob[i : i + part_bytes]
        (out / name).write_bytes(chunk)
        parts.append({"name": name, "size": len(chunk), "sha256": _sha256(chunk)})
    manifest = {
        "format": FORMAT,
        "run": run.name,
        "final": (run / "final").resolve().name if (run / "final").exists() else None,
        "parts": parts,
        "members": members,
        "left_out": [str(p) for p in left],
        "missing_required": missing_required(run),
    }
    (out / "MANIFEST.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def unpack(parts_dirs: list[Path], to: Path) -> dict[str, Any]:
    """Join and check the parts found in ``parts_dirs`` (the manifest is in one of them); extract into
    ``to``. Raises ValueError on a missing or corrupt part or member."""
    found: dict[str, Path] = {}
    for d in parts_dirs:
        for p in d.glob("*"):
            found.setdefault(p.name, p)
    if "MANIFEST.json" not in found:
        raise FileNotFoundError(f"no MANIFEST.json in {', '.join(map(str, parts_dirs))}")
    manifest = json.loads(found["MANIFEST.json"].read_text())
    if manifest.get("format") != FORMAT:
        raise ValueError(f"not a run pack: format {manifest.get('format')!r}, expected {FORMAT!r}")
    chunks = []
    for part in manifest["parts"]:
        if part["name"] not in found:
            raise FileNotFoundError(
                f"part {part['name']} is missing (looked in {', '.join(map(str, parts_dirs))})"
            )
        chunk = found[part["name"]].read_bytes()
        if len(chunk) != part["size"] or _sha256(chunk) != part["sha256"]:
            raise ValueError(f"part {part['name']} is corrupt (size or sha256 differs from the manifest)")
        chunks.append(chunk)
    to.mkdir(parents=True, exist_ok=True)
    with tarfile.open(fileobj=io.BytesIO(b"".join(chunks)), mode="r:gz") as tar:
        tar.extractall(to, filter="data")
    for rel, meta in manifest["members"].items():
        path = to / rel
        if "link" in meta:
            continue
        if not path.is_file() or _sha256(path.read_bytes()) != meta["sha256"]:
            raise ValueError(f"{path}: differs from the manifest after unpacking")
    return manifest


def main(argv: list[str] | None = None) -> int:
    parser = new_parser(prog="python -m tools.run_pack", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser(
        "pack", help="pack a run folder into parts", formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument(
        "--run", type=Path, required=True, help="the run folder (scripts/policy_pipeline.sh's RUN)"
    )
    p.add_argument("--out", type=Path, required=True, help="folder for the parts and MANIFEST.json")
    p.add_argument("--part-mb", type=float, default=15.0, help="largest part, MiB")
    p.add_argument("--all-weights", action="store_true", help="also the weights of candidates not picked")
    u = sub.add_parser("unpack", help="check and unpack parts into a run folder",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)  # fmt: skip
    u.add_argument(
        "--parts", type=Path, nargs="+", required=True, help="folder(s) holding the parts and manifest"
    )
    u.add_argument("--to", type=Path, required=True, help="the run folder to write")
    args = parser.parse_args(argv)
    try:
        if args.cmd == "pack":
            m = pack(args.run, args.out, args.part_mb, args.all_weights)
            size = sum(p["size"] for p in m["parts"])
            print(f"{args.out}: {len(m['members'])} files of {args.run} in {len(m['parts'])} part(s), "
                  f"{size / 1e6:.1f} MB; final weights {m['final']}; left out {len(m['left_out'])} files")  # fmt: skip
            if m["missing_required"]:
                print(f"MISSING (the policy cannot act without them): {', '.join(m['missing_required'])}",
                      file=sys.stderr)  # fmt: skip
                return 1
        else:
            m = unpack(args.parts, args.to)
            print(
                f"{args.to}: {len(m['members'])} files checked against the manifest; final weights {m['final']}"
            )
            if m["missing_required"]:
                print(f"the pack lacks: {', '.join(m['missing_required'])}", file=sys.stderr)
                return 1
    except (OSError, ValueError, tarfile.TarError) as exc:
        parser.error(str(exc))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
