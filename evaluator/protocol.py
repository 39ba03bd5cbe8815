"""What a closed-loop evaluation runs, and its results file.

* :class:`ArmSpec` — one arm: a picklable recipe for a worker to build its policy (backend, weights,
  draft, decoding mode and parameters, and the dotted path of the builder that turns the spec into
  an ``obs -> [T, A]`` act callable).
* :class:`Protocol` — suite, task ids, initial states, seed, step limit, image size. The default is
  the LIBERO standard: every task of the suite × initial states 0–49 (10 × 50 = 500 episodes per arm
  on libero_spatial). Unknown tasks or initial states raise ValueError (a usage error in the CLIs).
* :class:`ResultsLog` — the append-only JSON-lines results file. Line 1 is a header recording the
  protocol and the arms (with a fingerprint of every weights / codec / draft file they load) and an
  identity hash of both; every further line is one finished episode attempt::

      {"type": "header", "format": "rsd-protocol-results/1", "identity": "…", "protocol": {…}, "arms": [{…}]}
      {"type": "episode", "arm": "baseline", "task_id": 3, "init_state": 17, "attempt": 1,
       "status": "success" | "failed" | "errored", "steps": 143, "queries": 18, "act_s": 0.61,
       "wall_s": 8.2, "worker": 1, "backbone": "embedded-vla@52827284690d", "error": "", "extra": {}}

  An episode is keyed by (arm, task, initial state). Its outcome is its first ``success`` / ``failed``
  line; ``errored`` lines (a crash of the simulator, the policy or the worker process) are kept as
  history and never count as failures; later duplicates of a finished key are ignored, so a retried
  episode is never counted twice. Opening an existing file checks its header: a file written for
  another protocol or other arms (other weights, other decoding) is refused with a message that names
  what differs. A torn last line (a kill during a write) is cut off; other malformed lines are
  skipped and counted.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import re
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from common.schedule import INIT_STATES
from common.vla.paths import DEFAULT_CODEC_DIR, DEFAULT_EMBEDDED_DIR
from producer.env import SUITES

log = logging.getLogger("evaluator.protocol")

FORMAT = "rsd-protocol-results/1"
STANDARD_INIT_STATES: tuple[int, ...] = tuple(range(INIT_STATES))
STATUSES = ("success", "failed", "errored")
_NAME_RE = re.compile(r"^[A-Za-z0-9_.=-]{1,64}$")
_FULL_HASH_BYTES = 256 << 20  # files up to this size are hashed whole; larger ones by size, head and tail


@dataclass(frozen=True)
class ArmSpec:
    """One arm of a paired evaluation; picklable, built into an act callable inside each worker.

    ``builder`` is ``"module:function"``; the function takes the spec and returns a callable
    ``Observation -> [T, A] actions`` (optionally with ``backbone_id`` and an ``episode_extra()``
    method whose dict is stored with each episode). The default builder (:mod:`evaluator.fleet_arms`)
    understands the fields below.
    """

    name: str
    backend: str = "embedded"  # common/vla/registry.py: embedded | twin-tiny | openvla-oft | twin
    weights: str | None = None  # weights folder or hub id (None: the backend's shipped weights)
    codec: str | None = None  # RFSQ codec folder (None: assets/codec)
    draft: str | None = None  # draft checkpoint (needed by the baseline/strict/relaxed decodings)
    decoding: str = "policy"  # policy | baseline | truncation | strict | relaxed | substitution (fleet_arms)
    params: dict[str, Any] = field(default_factory=dict)  # decoding parameters (RSDConfig fields)
    random_weights: bool = False  # the architecture with fresh random weights (a baseline)
    allow_random: bool = False  # random weights when none exist (plumbing only)
    seed: int = 0  # seed of random weights
    device: str = "cpu"
    builder: str = "evaluator.fleet_arms:build_act"

    def __post_init__(self) -> None:
        if not _NAME_RE.match(self.name):
            raise ValueError(f"arm name {self.name!r} must match {_NAME_RE.pattern}")
        if ":" not in self.builder:
            raise ValueError(f"builder {self.builder!r} must look like 'module:function'")
        json.dumps(self.params)  # JSON-safe (it goes into the results header)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def local_paths(self) -> dict[str, Path]:
        """The weights / codec / draft paths this arm loads from local disk (defaults resolved)."""
        out: dict[str, Path] = {}
        if self.backend == "embedded":
            out["weights"] = Path(self.weights) if self.weights else DEFAULT_EMBEDDED_DIR
            out["codec"] = Path(self.codec) if self.codec else DEFAULT_CODEC_DIR
        elif self.weights and Path(self.weights).exists():
            out["weights"] = Path(self.weights)
        if self.draft:
            out["draft"] = Path(self.draft)
        return out


@dataclass(frozen=True)
class Protocol:
    """Which episodes every arm runs: tasks × initial states of one suite, same seeds for every arm."""

    suite: str = "libero_spatial"
    tasks: tuple[int, ...] = tuple(range(10))
    init_states: tuple[int, ...] = STANDARD_INIT_STATES
    seed: int = 0
    max_steps: int | None = None  # None: the suite's limit (the standard)
    image_size: int = 128

    def __post_init__(self) -> None:
        if self.suite not in SUITES:
            raise ValueError(f"unknown suite {self.suite!r}; valid suites: {list(SUITES)}")
        n = SUITES[self.suite]
        tasks, inits = tuple(sorted(set(self.tasks))), tuple(sorted(set(self.init_states)))
        bad_t = [t for t in tasks if not (isinstance(t, int) and 0 <= t < n)]
        if not tasks or bad_t:
            raise ValueError(
                f"unknown task ids {bad_t or '(none given)'} for {self.suite}; valid: 0..{n - 1}"
            )
        bad_i = [i for i in inits if not (isinstance(i, int) and 0 <= i < INIT_STATES)]
        if not inits or bad_i:
            raise ValueError(f"unknown initial states {bad_i or '(none given)'}; valid: 0..{INIT_STATES - 1}")
        if self.max_steps is not None and self.max_steps <= 0:
            raise ValueError(f"max_steps must be > 0, got {self.max_steps}")
        object.__setattr__(self, "tasks", tasks)
        object.__setattr__(self, "init_states", inits)

    @property
    def standard(self) -> bool:
        """Every task of the suite × initial states 0–49 at the suite's step limit."""
        return (
            self.tasks == tuple(range(SUITES[self.suite]))
            and self.init_states == STANDARD_INIT_STATES
            and self.max_steps is None
        )

    @property
    def episodes_per_arm(self) -> int:
        return len(self.tasks) * len(self.init_states)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["tasks"], d["init_states"] = list(self.tasks), list(self.init_states)
        return d

    def env_base(self) -> dict[str, Any]:
        """The EnvConfig fields shared by every episode."""
        return {
            "suite": self.suite,
            "image_size": self.image_size,
            "max_steps": self.max_steps,
            "seed": self.seed,
        }

    def describe(self) -> str:
        head = f"{self.suite}: {len(self.tasks)} tasks x {len(self.init_states)} initial states"
        if self.standard:
            return f"{head} (the standard LIBERO protocol)"
        return f"{head} (NOT the standard protocol of every task x initial states 0-49 at the suite's step limit)"


Key = tuple[str, int, int]  # (arm, task, initial state)


def episode_key(record: dict[str, Any]) -> Key:
    return str(record["arm"]), int(record["task_id"]), int(record["init_state"])


def fingerprint(path: Path) -> str:
    """sha256 over a file or a folder's files (relative names + contents); 'missing' if absent."""
    path = Path(path)
    if not path.exists():
        return "missing"
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    h = hashlib.sha256()
    for f in files:
        h.update(str(f.relative_to(path) if path.is_dir() else f.name).encode() + b"\0")
        size = f.stat().st_size
        h.update(str(size).encode() + b"\0")
        with open(f, "rb") as fh:
            if size <= _FULL_HASH_BYTES:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    h.update(block)
            else:  # huge checkpoints: size + first and last 16 MiB
                h.update(fh.read(16 << 20))
                fh.seek(size - (16 << 20))
                h.update(fh.read())
    return h.hexdigest()[:16]


def make_header(protocol: Protocol, arms: Iterable[ArmSpec]) -> dict[str, Any]:
    arm_ids = [
        {**a.to_dict(), "fingerprints": {k: fingerprint(p) for k, p in a.local_paths().items()}} for a in arms
    ]
    ident = {"format": FORMAT, "protocol": protocol.to_dict(), "arms": arm_ids}
    digest = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]
    return {
        "type": "header",
        **ident,
        "identity": digest,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.node()} ({os.cpu_count()} CPUs)",
    }


class ProtocolMismatch(ValueError):
    """A results file belongs to another protocol or other arms."""


def _differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    out = []
    if old.get("format") != new["format"]:
        out.append(f"format {old.get('format')!r} vs {new['format']!r}")
    for k, v in new["protocol"].items():
        if old.get("protocol", {}).get(k) != v:
            out.append(f"protocol {k}: file {old.get('protocol', {}).get(k)!r} vs now {v!r}")
    old_arms = {a.get("name"): a for a in old.get("arms", [])}
    new_arms = {a["name"]: a for a in new["arms"]}
    if list(old_arms) != list(new_arms):
        out.append(f"arms: file {list(old_arms)} vs now {list(new_arms)}")
    for name in set(old_arms) & set(new_arms):
        for k, v in new_arms[name].items():
            if old_arms[name].get(k) != v:
                out.append(f"arm {name} {k}: file {old_arms[name].get(k)!r} vs now {v!r}")
    return out


class ResultsLog:
    """The results file of one (protocol, arms): header check, resume, append one line per attempt."""

    def __init__(self, path: str | Path, header: dict[str, Any]) -> None:
        self.path = Path(path)
        self.header = header
        self.records: list[dict[str, Any]] = []
        self.skipped_lines = 0
        if self.path.exists() and self.path.stat().st_size > 0:
            self._load_existing()
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text(json.dumps(header, sort_keys=True) + "\n")
        self._fh = open(self.path, "a")  # noqa: SIM115 (closed by close())

    def _load_existing(self) -> None:
        raw = self.path.read_bytes()
        if not raw.endswith(b"\n"):  # a kill during a write: cut the torn line off
            cut = raw.rfind(b"\n") + 1
            log.warning("%s: dropping a torn last line (%d bytes)", self.path, len(raw) - cut)
            with open(self.path, "r+b") as fh:
                fh.truncate(cut)
            raw = raw[:cut]
        header, records, self.skipped_lines = read_lines(raw.decode(errors="replace"), self.path)
        diffs = _differences(header, self.header)
        if header.get("identity") != self.header["identity"] or diffs:
            raise ProtocolMismatch(
                f"results file {self.path} was written for another protocol or policy and cannot be resumed "
                f"with this one ({'; '.join(diffs) or 'identity differs'}). Pass another results path or "
                "remove the file to start over."
            )
        self.records = records

    def append(self, record: dict[str, Any]) -> None:
        self._fh.write(json.dumps(record, sort_keys=True) + "\n")
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self.records.append(record)

    def close(self) -> None:
        self._fh.close()


def read_lines(text: str, where: Any = "results") -> tuple[dict[str, Any], list[dict[str, Any]], int]:
    """(header, episode records, malformed lines skipped) of a results file's text."""
    lines = text.splitlines()
    try:
        header = json.loads(lines[0]) if lines else {}
    except json.JSONDecodeError:
        header = {}
    if header.get("type") != "header":
        raise ProtocolMismatch(
            f"{where} does not start with a results header; it is not a protocol results file"
        )
    records, skipped = [], 0
    for n, line in enumerate(lines[1:], start=2):
        try:
            rec = json.loads(line)
            episode_key(rec)
            if rec.get("type") != "episode" or rec.get("status") not in STATUSES:
                raise ValueError(f"type {rec.get('type')!r} status {rec.get('status')!r}")
        except (ValueError, KeyError, TypeError) as exc:
            skipped += 1
            log.warning("%s line %d skipped (malformed: %s)", where, n, str(exc)[:200])
            continue
        records.append(rec)
    return header, records, skipped


def outcomes(records: Iterable[dict[str, Any]]) -> tuple[dict[Key, dict[str, Any]], dict[Key, int], int]:
    """(first success/failed record per key, errored attempts per key, ignored duplicates)."""
    final: dict[Key, dict[str, Any]] = {}
    errored: dict[Key, int] = {}
    duplicates = 0
    for rec in records:
        key = episode_key(rec)
        if rec["status"] == "errored":
            errored[key] = errored.get(key, 0) + 1
        elif key in final:
            duplicates += 1
        else:
            final[key] = rec
    return final, errored, duplicates
