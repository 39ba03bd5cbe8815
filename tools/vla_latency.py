"""CPU query latency of embedded-VLA architectures (for the model card and the choice of size).

Builds each architecture with random weights (latency does not depend on the weights; nothing here is a
trained policy), and times ``act`` on one observation: the prefix pass and the sequentially decoded
layers, as ``make demo`` and the evaluator run it. Reports the median per thread count, the parameter
count and the fp16 weight size against the 25 MB bound.

    python -m tools.vla_latency --out runs/vla_latency.json
    python -m tools.vla_latency --size "--hidden-size 320 --intermediate-size 960 --num-hidden-layers 6 \\
        --num-attention-heads 5 --vision-hidden-sizes 48 96 192"
"""

from __future__ import annotations

import json
import shlex
import time
from pathlib import Path

import numpy as np

from common.cli import new_parser

# scripts/policy_pipeline.sh: A is the shipped architecture, B the wider and deeper candidate
SIZES = {
    "A": "",
    "B": "--hidden-size 320 --intermediate-size 960 --num-hidden-layers 6 --num-attention-heads 5 "
    "--vision-hidden-sizes 48 96 192",
}
INSTRUCTION = "pick up the black bowl between the plate and the ramekin and place it on the plate"


def config_from_args(size_args: str, decode_layers: int):
    """An EmbeddedVLAConfig from train_vla-style size flags (--hidden-size 320 ...)."""
    from common.vla.embedded_model import EmbeddedVLAConfig

    cfg = EmbeddedVLAConfig(words=INSTRUCTION.split(), decode_layers=decode_layers)
    tokens = shlex.split(size_args)
    i = 0
    while i < len(tokens):
        key = tokens[i].removeprefix("--").replace("-", "_")
        if not hasattr(cfg, key):
            raise ValueError(f"unknown size flag {tokens[i]}")
        values = []
        i += 1
        while i < len(tokens) and not tokens[i].startswith("--"):
            values.append(int(tokens[i]))
            i += 1
        setattr(cfg, key, values if isinstance(getattr(cfg, key), list) else values[0])
    return cfg


def measure(size_args: str, threads: list[int], repeats: int, decode_layers: int) -> dict:
    import torch

    from common.codec import RFSQCodec
    from common.policy import Observation
    from common.vla.embedded import EmbeddedVLAPolicy
    from common.vla.embedded_model import EmbeddedVLA

    torch.manual_seed(0)
    cfg = config_from_args(size_args, decode_layers)
    model = EmbeddedVLA(cfg)
    params = sum(p.numel() for p in model.parameters())
    policy = EmbeddedVLAPolicy(model, RFSQCodec(), device="cpu", backbone_id="latency@random")
    rng = np.random.default_rng(0)
    obs = Observation(
        agentview=rng.integers(0, 256, (128, 128, 3), dtype=np.uint8),
        wrist=rng.integers(0, 256, (128, 128, 3), dtype=np.uint8),
        proprio=rng.normal(size=8).astype(np.float32),
        instruction=INSTRUCTION,
    )
    out = {"size_args": size_args, "parameters": params, "fp16_mb": params * 2 / 1e6, "ms": {}}
    before = torch.get_num_threads()
    try:
        for n in threads:
            torch.set_num_threads(n)
            policy.act([obs])  # warm-up
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                policy.act([obs])
                times.append(time.perf_counter() - t0)
            out["ms"][str(n)] = 1000 * float(np.median(times))
    finally:
        torch.set_num_threads(before)
    return out


def main(argv: list[str] | None = None) -> int:
    p = new_parser(description=__doc__, prog="python -m tools.vla_latency")
    p.add_argument(
        "--size", action="append", default=None, help="train_vla size flags (repeatable; default: A and B)"
    )
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="torch CPU thread counts")
    p.add_argument("--repeats", type=int, default=20, help="timed queries per setting")
    p.add_argument(
        "--decode-layers", type=int, default=3, help="sequentially decoded layers (the shipped policy's)"
    )
    p.add_argument("--out", type=Path, default=None, help="write the report here (JSON)")
    args = p.parse_args(argv)
    sizes = {f"size {i}": s for i, s in enumerate(args.size)} if args.size else SIZES
    rows = {name: measure(s, args.threads, args.repeats, args.decode_layers) for name, s in sizes.items()}
    for name, r in rows.items():
        ms = ", ".join(f"{t} thread(s) {v:.1f} ms" for t, v in r["ms"].items())
        bound = "within" if r["fp16_mb"] <= 25 else "OVER"
        print(
            f"{name}: {r['parameters'] / 1e6:.2f} M parameters, {r['fp16_mb']:.1f} MB fp16 ({bound} 25 MB); {ms}"
        )
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"decode_layers": args.decode_layers, "sizes": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
