"""Configuration of VLA behaviour cloning (``python -m trainer.train_vla``): data, model size,
optimisation, on-policy frames, evaluation and checkpoint selection."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from common.schedule import INIT_STATES, parse_range


@dataclass
class VLATrainConfig:
    """Behaviour-clone the embedded VLA on demonstration HDF5 files."""

    demos: list[Path] = field(default_factory=list, metadata={"help": "demonstration HDF5 file(s)"})
    packed: Path | None = field(
        default=None, metadata={"help": "packed dataset (.npz from --pack-to) instead of --demos"}
    )
    pack_to: Path | None = field(default=None, metadata={"help": "write the packed dataset here and exit"})
    jpeg_quality: int = field(
        default=0, metadata={"help": "JPEG quality of packed wrist images (0: lossless)"}
    )
    frame_stride: int = field(default=1, metadata={"help": "use every N-th demo step as a training frame"})
    codec_dir: Path = field(
        default=Path("assets/codec"), metadata={"help": "RFSQ codec giving the target codes"}
    )
    out_dir: Path = field(
        default=Path("runs/vla"), metadata={"help": "where to write weights, metrics, plots"}
    )
    init_from: Path | None = field(
        default=None, metadata={"help": "start from these weights (a weights dir)"}
    )
    image_size: int = field(default=64, metadata={"help": "side of the downsampled camera images"})
    hidden_size: int = field(default=256, metadata={"help": "language-model hidden size D"})
    intermediate_size: int = field(default=768, metadata={"help": "language-model MLP size"})
    num_hidden_layers: int = field(default=4, metadata={"help": "language-model layers"})
    num_attention_heads: int = field(default=4, metadata={"help": "language-model attention heads"})
    vision_hidden_sizes: list[int] = field(
        default_factory=lambda: [32, 64, 128], metadata={"help": "ResNet stage widths"}
    )
    steps: int = field(default=3000, metadata={"help": "optimizer steps"})
    batch_size: int = field(default=64, metadata={"help": "samples per step"})
    lr: float = field(default=5e-4, metadata={"help": "AdamW peak learning rate (warmup, cosine decay)"})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay"})
    warmup: int = field(default=200, metadata={"help": "linear warmup steps"})
    fine_weight: float = field(default=0.5, metadata={"help": "loss weight of the fine layers K..L-1"})
    consistency_weight: float = field(
        default=0.0,
        metadata={
            "help": "pull the decoder's coarse layers toward the aux head's (hidden-state) distributions"
        },
    )
    aux_weight: float = field(
        default=1.0, metadata={"help": "weight of the coarse-code loss on the hidden state"}
    )
    shift: int = field(default=4, metadata={"help": "random-shift augmentation in pixels (0: off)"})
    onpolicy: Path | None = field(
        default=None,
        metadata={"help": "the policy's own closed-loop frames (.npz of `trainer.pack_onpolicy`): each step "
                  "adds a batch of them, trained with the same loss on the policy's own codes (no expert "
                  "labels: the consistency term carries over to the states the policy meets)"},
    )  # fmt: skip
    onpolicy_weight: float = field(default=1.0, metadata={"help": "weight of the on-policy batch's loss"})
    onpolicy_val_inits: str = field(
        default="40-49",
        metadata={"help": "initial states whose on-policy episodes are held out (evaluated, never trained)"},
    )
    val_every: int = field(
        default=10, metadata={"help": "every N-th episode is held out (the codec's split)"}
    )
    eval_interval: int = field(default=500, metadata={"help": "evaluate on held-out episodes every N steps"})
    free_running_samples: int = field(default=512, metadata={"help": "held-out samples decoded sequentially"})
    device: str = field(default="cpu", metadata={"help": "torch device (cpu, cuda)"})
    threads: int = field(default=2, metadata={"help": "torch CPU threads"})
    bf16: bool = field(default=True, metadata={"help": "bfloat16 autocast on CUDA"})
    seed: int = field(default=0, metadata={"help": "random seed"})
    select: str = field(
        default="action",
        metadata={
            "help": "checkpoint criterion: held-out free-running action error, or coarse-layer CE",
            "choices": ["action", "coarse"],
        },
    )
    max_minutes: float = field(
        default=0.0,
        metadata={
            "help": "wall-time budget (0: none): the cosine schedule is fitted to the steps that fit in "
            "it, then training stops"
        },
    )
    save_dtype: str = field(
        default="float16", metadata={"help": "dtype of the saved weights", "choices": ["float16", "float32"]}
    )
    allow_benchmark_states: bool = field(
        default=False,
        metadata={"help": "LEGACY DATA ONLY: also train on data that starts from benchmark initial states "
                  "(the evaluation set) or does not record its starts (logged loudly)"},
    )  # fmt: skip

    def __post_init__(self) -> None:
        if not self.demos and self.packed is None:
            raise ValueError("give --demos FILE... or --packed FILE")
        for p in [*self.demos, *([self.packed] if self.packed else [])]:
            if not Path(p).is_file():
                raise ValueError(f"data file not found: {p}")
        if self.pack_to is not None and not self.demos:
            raise ValueError("--pack-to needs --demos")
        if not 0 <= self.jpeg_quality <= 100:
            raise ValueError(f"jpeg_quality must be in 0..100, got {self.jpeg_quality}")
        for name in ("steps", "batch_size", "eval_interval", "image_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.val_every < 2:
            raise ValueError(f"val_every must be >= 2, got {self.val_every}")
        if self.frame_stride < 1:
            raise ValueError(f"frame_stride must be >= 1, got {self.frame_stride}")
        if self.shift < 0 or self.shift >= self.image_size // 2:
            raise ValueError(f"shift must be in 0..{self.image_size // 2 - 1}, got {self.shift}")
        if self.onpolicy is not None and not Path(self.onpolicy).is_file():
            raise ValueError(f"on-policy file not found: {self.onpolicy}")
        if self.onpolicy_weight < 0:
            raise ValueError(f"onpolicy_weight must be >= 0, got {self.onpolicy_weight}")
        parse_range(self.onpolicy_val_inits, INIT_STATES, "initial state")
