"""``make train``'s configuration (docs/DESIGN.md §2.3, §5, §7): every flag of ``python -m trainer.online``."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from common.curve import check_bind_endpoint
from common.draft import DEFAULT_FORWARD, FORWARD_HELP, FORWARDS
from trainer.learner import OptimConfig


@dataclass
class TrainerConfig:
    """Receive samples over ZeroMQ, archive them to HDF5 and train the draft online."""

    endpoint: str = field(default="tcp://127.0.0.1:5555", metadata={"help": "ZeroMQ endpoint to bind"})
    run_dir: Path = field(
        default=Path("runs/default/train"),
        metadata={"help": "checkpoints, archive, logs (make train's folder)"},
    )
    curve_dir: Path | None = field(
        default=None,
        metadata={
            "help": "CURVE key folder from `python -m trainer.keys` (required to bind beyond 127.0.0.1)"
        },
    )
    rcvhwm: int = field(default=256, metadata={"help": "receive high-water mark (messages) per producer"})
    capacity: int = field(default=50000, metadata={"help": "replay buffer capacity (samples)"})
    val_capacity: int = field(default=10000, metadata={"help": "held-out validation samples kept"})
    valid_every: int = field(default=10, metadata={"help": "hold out every N-th episode for validation"})
    batch_size: int = field(default=32, metadata={"help": "training batch size"})
    lr: float = field(default=1e-4, metadata={"help": "AdamW learning rate"})
    weight_decay: float = field(default=1e-5, metadata={"help": "AdamW weight decay"})
    grad_clip: float = field(default=1.0, metadata={"help": "gradient-norm clip"})
    warmup_steps: int = field(default=1000, metadata={"help": "linear warmup updates"})
    total_steps: int = field(default=20000, metadata={"help": "cosine schedule length in updates"})
    draft_hidden_dim: int = field(default=512, metadata={"help": "draft model width"})
    draft_forward: str = field(default=DEFAULT_FORWARD, metadata={"help": FORWARD_HELP, "choices": FORWARDS})
    input_dim: int | None = field(
        default=None,
        metadata={
            "help": "hidden size the draft reads (e.g. 4096 for OpenVLA-OFT): producers sending another are "
            "refused at hello (default: the first producer's)"
        },
    )
    samples_per_insert: float = field(
        default=32.0, metadata={"help": "target number of times each inserted sample is drawn for training"}
    )
    min_size: int = field(default=32, metadata={"help": "samples in the buffer before training starts"})
    error_buffer: float = field(
        default=2000.0, metadata={"help": "slack of the rate limiter, in sampled items"}
    )
    val_interval: int = field(default=100, metadata={"help": "validate every N updates"})
    log_interval: int = field(default=20, metadata={"help": "log training metrics every N updates"})
    producer_timeout_s: float = field(
        default=30.0,
        metadata={"help": "a producer silent this long has its open episode closed as incomplete"},
    )
    max_updates: int | None = field(default=None, metadata={"help": "stop after this many updates"})
    max_runtime_s: float | None = field(default=None, metadata={"help": "stop after this many seconds"})
    exit_after_byes: int | None = field(
        default=None, metadata={"help": "stop once this many producers said bye (tests, scripted runs)"}
    )
    resume: bool = field(default=True, metadata={"help": "resume from run-dir/draft_last.pt and the archive"})
    threads: int = field(default=1, metadata={"help": "torch CPU threads for training"})
    device: str = field(default="auto", metadata={"help": "cpu, cuda or auto"})
    seed: int = field(default=0, metadata={"help": "random seed"})

    def __post_init__(self) -> None:
        self.run_dir = Path(self.run_dir)
        for name in (
            "rcvhwm",
            "capacity",
            "val_capacity",
            "valid_every",
            "batch_size",
            "threads",
            "val_interval",
        ):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device must be auto, cpu or cuda, got {self.device!r}")
        if self.error_buffer < self.samples_per_insert + self.batch_size:
            raise ValueError(
                f"error_buffer ({self.error_buffer}) must be >= samples_per_insert + batch_size "
                f"({self.samples_per_insert + self.batch_size})"
            )
        check_bind_endpoint(self.endpoint, self.curve_dir)

    def optim(self) -> OptimConfig:
        return OptimConfig(
            lr=self.lr,
            weight_decay=self.weight_decay,
            grad_clip=self.grad_clip,
            warmup_steps=self.warmup_steps,
            total_steps=self.total_steps,
            batch_size=self.batch_size,
            draft_hidden_dim=self.draft_hidden_dim,
            draft_forward=self.draft_forward,
        )
