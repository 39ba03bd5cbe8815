"""How many RFSQ layers carry action information: the informative depth D (DESIGN §6).

A decoded layer costs one sequential pass of the policy's language model. It is worth that pass only
if it carries information about the action, which needs two things:

- the codec uses it: decoding k layers instead of k - 1 lowers the codec's reconstruction error
  (held-out normalized MSE from the codec's own metrics, ``assets/codec/codec.json``);
- the policy can predict it: its free-running accuracy on the layer is above chance (held-out
  figures of the VLA, ``assets/embedded_vla/config.json``: ``held_out.free_layer_acc``).

    D_codec  = smallest k whose error is within ``codec_rel_tol`` of the error with all L layers
    D_policy = 1 + the last layer the policy predicts at least ``chance_margin`` above chance (1/G)
    D        = min(D_codec, D_policy)

Layers D..L-1 are then set to the centre level (the zero of each grid) without a pass; codes keep
their [T, H, L] shape. ``python -m common.layer_info`` prints the evidence and, with ``--write``,
records D (and the evidence) in the VLA's config.json, which the policy reads at load time.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

CODEC_FILE = "codec.json"
VLA_CONFIG_FILE = "config.json"


@dataclass(frozen=True)
class DepthRule:
    #: a layer is needed by the codec while the error without it exceeds (1 + tol) x the error with all L
    codec_rel_tol: float = 0.10
    #: a layer the policy predicts with accuracy < 1/G + this margin carries no information it can use
    chance_margin: float = 0.05

    def __post_init__(self) -> None:
        if not (0 <= self.codec_rel_tol and 0 <= self.chance_margin < 1):
            raise ValueError(f"tolerances must be >= 0 (margin < 1), got {self}")


def layer_information(codec_meta: dict[str, Any], vla_meta: dict[str, Any]) -> dict[str, Any]:
    """Per-layer evidence from the codec's and the VLA's recorded held-out metrics."""
    try:
        val = codec_meta["metrics"]["validation"]
        mse = [float(x) for x in val["mse_norm"]]
        grid = int(codec_meta["shape"]["grid_size"])
        acc = [float(x) for x in vla_meta["held_out"]["free_layer_acc"]]
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(
            f"layer information needs codec metrics.validation.mse_norm, shape.grid_size and the VLA's "
            f"held_out.free_layer_acc; missing {exc}"
        ) from None
    if len(mse) != len(acc) or not mse:
        raise ValueError(f"codec reports {len(mse)} layers, the VLA {len(acc)}")
    return {
        "num_layers": len(mse),
        "grid_size": grid,
        "chance_accuracy": 1.0 / grid,
        "codec_mse_norm_by_k": mse,  # error decoding the first k = 1..L layers
        "codec_mae_arm_by_k": [float(x) for x in val.get("mae_arm_env", [])],
        "codec_layer_entropy_bits": [float(x) for x in val.get("layer_entropy_bits", [])],
        "codec_max_entropy_bits": val.get("max_entropy_bits"),
        "policy_free_layer_acc": acc,  # per layer l = 0..L-1
        "sources": {
            "codec": "codec.json metrics.validation (held-out demonstration chunks)",
            "policy": "config.json held_out.free_layer_acc (held-out frames, free-running decoding)",
        },
    }


def informative_depth(info: dict[str, Any], rule: DepthRule = DepthRule()) -> tuple[int, dict[str, Any]]:
    """D = min(D_codec, D_policy) and the figures that decided it."""
    mse, acc, chance = info["codec_mse_norm_by_k"], info["policy_free_layer_acc"], info["chance_accuracy"]
    L = len(mse)
    d_codec = next(k for k in range(1, L + 1) if mse[k - 1] <= (1 + rule.codec_rel_tol) * mse[-1])
    informative = [a >= chance + rule.chance_margin for a in acc]
    d_policy = 1 + max((i for i, ok in enumerate(informative) if ok), default=0)
    depth = min(d_codec, d_policy)
    evidence = {
        "rule": asdict(rule),
        "d_codec": d_codec,
        "d_policy": d_policy,
        "decode_layers": depth,
        "why": (
            f"codec error with {d_codec} layers is {mse[d_codec - 1]:.3g} vs {mse[-1]:.3g} with all {L} "
            f"(within {100 * rule.codec_rel_tol:.0f}%); the policy predicts layers "
            f"{', '.join(str(i) for i, ok in enumerate(informative) if ok) or 'none'} above chance "
            f"({chance:.3f} + {rule.chance_margin}); free-running accuracy per layer "
            + ", ".join(f"{a:.3f}" for a in acc)
        ),
    }
    return depth, evidence


def depth_from_dirs(
    weights_dir: Path, codec_dir: Path, rule: DepthRule = DepthRule()
) -> tuple[int, dict[str, Any], dict[str, Any]]:
    """(D, evidence, layer information) from a VLA folder and its codec folder."""
    codec_meta = json.loads((Path(codec_dir) / CODEC_FILE).read_text())
    vla_meta = json.loads((Path(weights_dir) / VLA_CONFIG_FILE).read_text())
    info = layer_information(codec_meta, vla_meta)
    depth, evidence = informative_depth(info, rule)
    return depth, evidence, info


def write_depth(weights_dir: Path, depth: int, evidence: dict[str, Any]) -> Path:
    """Record D in the VLA's config.json (``model.decode_layers``) with the evidence beside it."""
    path = Path(weights_dir) / VLA_CONFIG_FILE
    meta = json.loads(path.read_text())
    meta["model"]["decode_layers"] = depth
    meta["decode_layers_evidence"] = evidence
    path.write_text(json.dumps(meta, indent=2, sort_keys=True))
    return path


def main(argv: list[str] | None = None) -> None:
    root = Path(__file__).resolve().parents[1] / "assets"
    parser = argparse.ArgumentParser(
        prog="python -m common.layer_info",
        description="Decide from the recorded layer information how many RFSQ layers the VLA decodes.",
        allow_abbrev=False,
    )
    parser.add_argument("--weights-dir", type=Path, default=root / "embedded_vla", help="VLA folder")
    parser.add_argument("--codec-dir", type=Path, default=root / "codec", help="codec folder")
    parser.add_argument("--codec-rel-tol", type=float, default=DepthRule.codec_rel_tol)
    parser.add_argument("--chance-margin", type=float, default=DepthRule.chance_margin)
    parser.add_argument("--write", action="store_true", help="record the depth in the VLA's config.json")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        rule = DepthRule(args.codec_rel_tol, args.chance_margin)
        depth, evidence, _ = depth_from_dirs(args.weights_dir, args.codec_dir, rule)
    except (OSError, ValueError) as exc:
        parser.error(str(exc))
    print(json.dumps(evidence, indent=2))
    if args.write:
        print(f"wrote decode_layers = {depth} to {write_depth(args.weights_dir, depth, evidence)}")


if __name__ == "__main__":
    main()
