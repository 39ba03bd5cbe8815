"""Fit a draft of any depth K offline on a policy's own (hidden state, codes) over demonstration frames.

    python -m evaluator.fit_draft --demos data/demos/libero_spatial_expert.hdf5 --num-coarse-layers 3 \
        --out runs/drafts/draft_k3.pt
    # on a GPU machine without h5py: pack once with `python -m trainer.train_vla --demos FILE
    # --pack-to packed.npz --jpeg-quality 0`, then
    python -m evaluator.fit_draft --packed packed.npz --augment 16 --device cuda --epochs 60 \
        --batch-size 256 --out runs/drafts/draft_k3.pt

The streaming pipeline (`make produce` + `make train`) trains the draft on the policy's own closed-loop
states; this command is the offline route (knowledge distillation from the policy into the draft) used
for deeper drafts (K up to L = 8) and when no streamed archive exists: every demonstration frame is
run through the policy's baseline decoding (prefix pass + L block passes, batched), and the draft learns
to map the prefix hidden state to the policy's own first K layers. ``--augment N`` adds N randomly
shifted views of every *training* frame (the shift augmentation the VLA was trained with), each run
through the policy for its own hidden state and codes: more distillation pairs from the same
demonstrations. Validation is on whole held-out demonstrations, never augmented. Same model, loss,
optimizer and checkpoint format as the trainer (trainer/learner.py, DESIGN §4).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from common.cli import config_to_dict, parse_config
from common.init_states import require_checked
from common.logs import setup_logging
from common.schedule import INIT_STATES, parse_range
from common.vla.embedded import normalize_images
from evaluator.eval import load_eval_policy

log = logging.getLogger("evaluator.fit_draft")


@dataclass
class FitDraftConfig:
    """Fit a draft (any K) on the policy's own hidden states and codes over demonstration frames."""

    out: Path = field(metadata={"help": "draft checkpoint to write"})
    demos: list[Path] = field(
        default_factory=list, metadata={"help": "demonstration HDF5 files (producer/demos.py layout)"}
    )
    packed: Path | None = field(
        default=None,
        metadata={"help": "packed demonstrations (.npz of `trainer.train_vla --pack-to`) instead of --demos"},
    )
    archives: list[Path] = field(
        default_factory=list,
        metadata={"help": "streamed archives (`make train`) of the same policy: their training episodes join "
                  "the pairs and their held-out episodes (on-policy states) become the validation set"},
    )  # fmt: skip
    observations: Path | None = field(
        default=None,
        metadata={"help": "closed-loop frames (.npz of `trainer.pack_onpolicy`), relabeled by this policy: "
                  "training pairs, except the episodes of --val-inits (the validation set when no "
                  "--archives are given)"},
    )  # fmt: skip
    val_inits: str = field(
        default="",
        metadata={"help": "hold out the on-policy episodes starting from these initial states (for example "
                  "40-49) instead of the trainer's split, in --archives and --observations alike"},
    )  # fmt: skip
    weights_dir: Path | None = field(default=None, metadata={"help": "embedded VLA weights (none: assets)"})
    codec_dir: Path | None = field(default=None, metadata={"help": "RFSQ codec (none: assets/codec)"})
    num_coarse_layers: int = field(default=3, metadata={"help": "K: layers the draft predicts (1..8)"})
    frame_stride: int = field(default=1, metadata={"help": "use every n-th frame of each demonstration"})
    allow_benchmark_states: bool = field(
        default=False,
        metadata={"help": "LEGACY DATA ONLY: also fit on demonstrations that start from benchmark initial "
                  "states (the evaluation set) or do not record their starts (logged loudly)"},
    )  # fmt: skip
    val_fraction: float = field(default=0.15, metadata={"help": "fraction of demonstrations held out"})
    augment: int = field(
        default=0, metadata={"help": "extra randomly shifted views of every training frame (0: none)"}
    )
    shift: int = field(default=4, metadata={"help": "largest shift of an augmented view, in pixels"})
    epochs: int = field(default=40, metadata={"help": "passes over the training pairs"})
    batch_size: int = field(default=64, metadata={"help": "batch size"})
    lr: float = field(default=3e-4, metadata={"help": "AdamW learning rate"})
    draft_hidden_dim: int = field(default=512, metadata={"help": "draft model width"})
    extract_batch: int = field(default=64, metadata={"help": "frames per batched policy pass"})
    device: str = field(default="auto", metadata={"help": "torch device: auto (cuda if present), cpu, cuda"})
    cache: Path | None = field(default=None, metadata={"help": "npz cache of extracted (hidden, codes)"})
    soft_weight: float = field(
        default=0.0,
        metadata={
            "help": "weight of the policy's own token probabilities in the loss (knowledge distillation)"
        },
    )
    bf16: bool = field(default=True, metadata={"help": "bfloat16 autocast on CUDA"})
    slim: bool = field(
        default=False,
        metadata={"help": "write the checkpoint without optimizer state (inference only, 3x smaller)"},
    )
    evaluate: Path | None = field(
        default=None,
        metadata={"help": "only score this draft checkpoint on its held-out demonstrations, decoded on this "
                  "machine; writes the figures to --out (JSON)"},
    )  # fmt: skip
    threads: int = field(default=2, metadata={"help": "torch CPU threads"})
    seed: int = field(default=0, metadata={"help": "random seed"})

    def __post_init__(self) -> None:
        if not 1 <= self.num_coarse_layers <= 8:
            raise ValueError(f"num_coarse_layers must be in 1..8, got {self.num_coarse_layers}")
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1), got {self.val_fraction}")
        if min(self.frame_stride, self.epochs, self.batch_size, self.extract_batch) < 1:
            raise ValueError("frame_stride, epochs, batch_size and extract_batch must be >= 1")
        if self.augment < 0 or self.shift < 0:
            raise ValueError("augment and shift must be >= 0")
        if not 0.0 <= self.soft_weight <= 1.0:
            raise ValueError(f"soft_weight must be in [0, 1], got {self.soft_weight}")
        if bool(self.demos) == (self.packed is not None):
            raise ValueError("give either --demos (HDF5) or --packed (npz), not both or neither")
        for what, files in (("demonstration", [*self.demos, *([self.packed] if self.packed else [])]),
                            ("archive", self.archives)):  # fmt: skip
            for d in files:
                if not Path(d).is_file():
                    raise ValueError(f"{what} file {d} does not exist")
        if self.observations is not None and not Path(self.observations).is_file():
            raise ValueError(f"observations file {self.observations} does not exist")
        if self.val_inits:
            parse_range(self.val_inits, INIT_STATES, "initial state")
        if self.evaluate is not None and not Path(self.evaluate).is_file():
            raise ValueError(f"draft checkpoint {self.evaluate} does not exist")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ValueError(f"device must be auto, cpu or cuda[:n], got {self.device!r}")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device cuda given but torch sees no CUDA device")
    return torch.device(name)


def load_frames(cfg: FitDraftConfig, image_size: int) -> dict[str, Any]:
    """Demonstration frames as arrays: images [N, 2, S, S, 3] uint8 (run-time downsampling), proprio
    [N, 8], episode [N], instruction_of_episode [E], episode_names [E] (trainer.train_vla layout)."""
    from trainer.train_vla import read_demos, unpack

    if cfg.packed is not None:
        data = unpack(cfg.packed)
        require_checked(data.get("init_check"), cfg.allow_benchmark_states, f"demonstrations {cfg.packed}")
        if data["images"].shape[2] != image_size:
            raise ValueError(
                f"{cfg.packed} holds {data['images'].shape[2]}-pixel frames, the policy reads {image_size}"
            )
        if cfg.frame_stride > 1:
            keep = np.flatnonzero(data["step"] % cfg.frame_stride == 0)
            data = {**data, **{k: data[k][keep] for k in ("images", "proprio", "episode", "step")}}
        return data
    return read_demos(list(cfg.demos), image_size, cfg.frame_stride, cfg.allow_benchmark_states)


@torch.no_grad()
def extract(
    policy,
    data: dict[str, Any],
    rows: np.ndarray,
    shift: int = 0,
    batch: int = 64,
    generator: torch.Generator | None = None,
    desc: str = "policy frames",
    soft_layers: int = 0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Run the policy's baseline decoding on frames ``rows`` (optionally randomly shifted).

    Frames are batched per instruction, so no batch is padded and every frame sees exactly the inputs
    it sees at run time (batch of one). returns hidden [n, D] float32, codes [n, T, H, L] uint8 and,
    with ``soft_layers`` = k > 0, the policy's probabilities of layers 0..k-1, [n, k, T*H, G] float16
    (else None), in the order of ``rows``.
    """
    from trainer.train_vla import random_shift

    model, dev = policy.model, policy.device
    dtype = model.queries.dtype
    instr_of_row = data["instruction_of_episode"][data["episode"][rows]]  # [n]
    hidden = np.empty((len(rows), policy.hidden_dim), np.float32)
    shape = policy.shape
    codes = np.empty((len(rows), *shape.codes_shape), np.uint8)
    probs = (
        np.empty((len(rows), soft_layers, shape.tokens_per_layer, shape.grid_size), np.float16)
        if soft_layers
        else None
    )
    bar = tqdm(total=len(rows), desc=desc, unit="frame", dynamic_ncols=True)
    for instr in np.unique(instr_of_row):
        pos = np.flatnonzero(instr_of_row == instr)
        ids, valid = model.tokenize([str(instr)], dev)  # [1, Lt]
        for i in range(0, len(pos), batch):
            p = pos[i : i + batch]
            r = rows[p]
            img = normalize_images(torch.from_numpy(data["images"][r]).to(dev))  # [b, 2, 3, S, S]
            if shift:
                img = random_shift(img.flatten(0, 1), shift, generator).view_as(img)
            state = model.prefix_pass(
                images=img.to(dtype),
                proprio=torch.from_numpy(data["proprio"][r]).to(dev, dtype),
                text_ids=ids.expand(len(r), -1),
                text_valid=valid.expand(len(r), -1),
            )
            logits: list[torch.Tensor] = []
            c = policy.decode_sequential(state, logits if soft_layers else None)  # [b, T, H, L]
            for layer, lg in enumerate(logits[:soft_layers]):  # [b, T, H, G] each
                probs[p, layer] = lg.float().softmax(-1).flatten(1, 2).cpu().numpy()
            hidden[p] = state.hidden.float().cpu().numpy()
            codes[p] = c.to(torch.uint8).cpu().numpy()
            bar.update(len(r))
    bar.close()
    return hidden, codes, probs


def evaluate(cfg: FitDraftConfig, policy, device: torch.device) -> dict[str, Any]:
    """Token accuracy per layer of a draft on the held-out demonstrations named in its checkpoint, with
    the codes decoded by the policy on this machine (for example a draft fitted on a GPU, scored on
    the CPU the evaluator runs on)."""
    from common.draft import draft_loss, load_checkpoint
    from trainer.retrain import targets_from_codes

    model, ckpt = load_checkpoint(cfg.evaluate, map_location=device)
    names = ckpt["config"].get("valid_episodes")
    if not names:
        raise ValueError(
            f"{cfg.evaluate} names no held-out demonstrations (not written by evaluator.fit_draft)"
        )
    if ckpt["config"].get("backbone_id") != policy.backbone_id:
        raise ValueError(
            f"{cfg.evaluate} was fitted on {ckpt['config'].get('backbone_id')}, not {policy.backbone_id}"
        )
    data = load_frames(cfg, policy.model.config.image_size)
    known = [str(n) for n in data["episode_names"]]
    missing = sorted(set(names) - set(known))
    if missing:
        raise ValueError(f"held-out demonstrations {missing[:3]} are not in the given demonstration file")
    rows = np.flatnonzero(np.isin(data["episode"], [known.index(n) for n in names]))
    hidden, codes, _ = extract(policy, data, rows, batch=cfg.extract_batch, desc="held-out frames")
    K = model.num_coarse_layers
    y = torch.from_numpy(targets_from_codes(codes, K)).long()  # [N, K, S]
    with torch.no_grad():
        logits = torch.cat([model(torch.from_numpy(hidden[i : i + 256]).to(device)).cpu()
                            for i in range(0, len(hidden), 256)])  # fmt: skip
        _, m = draft_loss(logits, y)
    out = {
        "checkpoint": str(cfg.evaluate),
        "decoded_on": str(device),
        "valid_frames": int(len(rows)),
        "valid_episodes": len(names),
        "val_accuracy": m["accuracy"],
        "val_acc_per_layer": m["acc_per_layer"],
        "val_layer_exact": m["layer_exact"],
        "checkpoint_val_accuracy": float(ckpt["val_accuracy"]),
    }
    cfg.out.parent.mkdir(parents=True, exist_ok=True)
    cfg.out.write_text(json.dumps(out, indent=1))
    log.info("%s on %d held-out frames decoded on %s: token accuracy %.3f, per layer %s, whole layer %s",
             cfg.evaluate, len(rows), device, out["val_accuracy"],
             [round(a, 3) for a in out["val_acc_per_layer"]], [round(a, 3) for a in out["val_layer_exact"]])  # fmt: skip
    return out


def fit(cfg: FitDraftConfig) -> dict[str, Any]:
    from trainer.learner import Learner, OptimConfig
    from trainer.retrain import targets_from_codes

    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    device = resolve_device(cfg.device)
    if device.type == "cuda":  # full fp32 matmuls: the policy's codes must match its CPU decoding
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    policy = load_eval_policy(
        "embedded",
        str(cfg.weights_dir) if cfg.weights_dir else None,
        str(cfg.codec_dir) if cfg.codec_dir else None,
        device=str(device),
    )
    if cfg.evaluate is not None:
        return evaluate(cfg, policy, device)
    t0 = time.time()
    soft_layers = cfg.num_coarse_layers if cfg.soft_weight > 0 else 0
    from_cache = cfg.cache is not None and cfg.cache.is_file()
    if from_cache:
        z = np.load(cfg.cache)
        if str(z["backbone"]) != policy.backbone_id:
            raise ValueError(f"cache {cfg.cache} was made with {z['backbone']}, not {policy.backbone_id}")
        hidden, codes, ep, names = z["hidden"], z["codes"], z["episode"], [str(n) for n in z["names"]]
        view = z["view"] if "view" in z.files else np.zeros(len(ep), np.int64)  # caches before --augment
        if int(view.max()) < cfg.augment:
            raise ValueError(
                f"cache {cfg.cache} holds {int(view.max())} augmented views, --augment {cfg.augment}"
            )
        keep = view <= cfg.augment
        hidden, codes, ep, view = hidden[keep], codes[keep], ep[keep], view[keep]
        soft = None
        if cfg.soft_weight > 0:
            if "soft" not in z.files or z["soft"].shape[1] < cfg.num_coarse_layers:
                raise ValueError(f"cache {cfg.cache} holds no policy probabilities for {cfg.num_coarse_layers} "
                                 "layers; extract again (new --cache) to use --soft-weight")  # fmt: skip
            soft = z["soft"][keep][:, : cfg.num_coarse_layers]
    else:
        data = load_frames(cfg, policy.model.config.image_size)
        names = [str(n) for n in data["episode_names"]]
        rows = np.arange(len(data["episode"]))
        hidden, codes, soft = extract(policy, data, rows, batch=cfg.extract_batch, soft_layers=soft_layers)
        ep, view = data["episode"].copy(), np.zeros(len(rows), np.int64)
    n_ep = len(names)
    n_val = max(1, int(round(cfg.val_fraction * n_ep)))
    val_eps = sorted(rng.permutation(n_ep)[:n_val].tolist())
    if not from_cache and cfg.augment:
        gen = torch.Generator(device=device).manual_seed(cfg.seed)
        train_rows = np.flatnonzero(~np.isin(data["episode"], val_eps))  # augment training frames only
        parts_h, parts_c, parts_s = [hidden], [codes], [soft]
        for a in range(1, cfg.augment + 1):
            h_a, c_a, s_a = extract(
                policy,
                data,
                train_rows,
                cfg.shift,
                cfg.extract_batch,
                gen,
                f"view {a}/{cfg.augment}",
                soft_layers,
            )
            parts_h.append(h_a)
            parts_c.append(c_a)
            parts_s.append(s_a)
            ep = np.concatenate([ep, data["episode"][train_rows]])
            view = np.concatenate([view, np.full(len(train_rows), a, np.int64)])
        hidden, codes = np.concatenate(parts_h), np.concatenate(parts_c)
        soft = np.concatenate(parts_s) if soft_layers else None
    extract_s = time.time() - t0
    if cfg.cache is not None and not from_cache:
        cfg.cache.parent.mkdir(parents=True, exist_ok=True)
        extra = {"soft": soft} if soft is not None else {}
        np.savez(cfg.cache, hidden=hidden, codes=codes, episode=ep, view=view, names=np.asarray(names),
                 backbone=policy.backbone_id, **extra)  # fmt: skip
    is_val = np.isin(ep, val_eps)
    if (view[is_val] != 0).any():
        raise ValueError("augmented views of held-out demonstrations in the data: the split is inconsistent")
    K = cfg.num_coarse_layers
    shape = dataclasses.replace(policy.shape, num_coarse_layers=K)
    y = targets_from_codes(codes, K)  # [N, K, T*H]
    h_tr, y_tr, h_va, y_va = hidden[~is_val], y[~is_val], hidden[is_val], y[is_val]
    s_tr = soft[~is_val] if soft is not None else None  # [N_tr, K, T*H, G]
    h_demo_va, y_demo_va, n_streamed = h_va, y_va, 0
    h_all_va = y_all_va = None
    per_archive_va: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    val_inits = set(parse_range(cfg.val_inits, INIT_STATES, "initial state")) if cfg.val_inits else None
    n_observed = 0
    if cfg.observations is not None:  # closed-loop frames, relabeled by this policy
        from trainer.train_vla import unpack

        obs = unpack(cfg.observations)
        if obs["images"].shape[2] != policy.model.config.image_size:
            raise ValueError(f"{cfg.observations} holds {obs['images'].shape[2]}-pixel frames, the policy "
                             f"reads {policy.model.config.image_size}")  # fmt: skip
        o_val = (
            np.isin(obs["init_of_episode"][obs["episode"]], sorted(val_inits))
            if val_inits
            else np.zeros(len(obs["episode"]), bool)
        )
        h_o, c_o, s_o = extract(policy, obs, np.arange(len(o_val)), batch=cfg.extract_batch,
                                desc="on-policy frames", soft_layers=soft_layers)  # fmt: skip
        y_o = targets_from_codes(c_o, K)
        h_tr, y_tr = np.concatenate([h_tr, h_o[~o_val]]), np.concatenate([y_tr, y_o[~o_val]])
        if s_tr is not None:
            s_tr = np.concatenate([s_tr, s_o[~o_val][:, :K]])
        n_observed = int((~o_val).sum())
        if not cfg.archives:
            if not o_val.any():
                raise ValueError(
                    "--observations without --archives needs --val-inits naming some of its episodes"
                )
            h_va, y_va = h_o[o_val], y_o[o_val]
        same = float((c_o == obs["codes"]).mean()) if obs["codes"].shape == c_o.shape else float("nan")
        log.info("on-policy frames of %s (streamed by %s): %d train, %d held out (initial states %s); "
                 "this policy's codes equal the streamed ones on %.1f %% of the tokens",
                 cfg.observations, obs["backbone"], n_observed, int(o_val.sum()), cfg.val_inits or "none",
                 100 * same)  # fmt: skip
    if cfg.archives:  # on-policy pairs streamed by the producer: train on them, validate on their held-out
        from trainer.archive import archive_meta, load_keyed

        for a in cfg.archives:
            if archive_meta(a).get("backbone_id") != policy.backbone_id:
                raise ValueError(
                    f"archive {a} holds {archive_meta(a).get('backbone_id')}, not {policy.backbone_id}"
                )
        # Trajectories are keyed by (task, initial state) across archives: one held out anywhere is held
        # out everywhere. Validation: the held-out acting queries (what RSD sees at run time); their
        # observing queries (producer --sample-every) are tracked beside them.
        sp = load_keyed(cfg.archives, val_inits)
        if len(sp.valid_hidden) == 0:
            raise ValueError(f"archives {cfg.archives} hold no held-out episodes")
        if len(sp.valid_all_hidden) > len(sp.valid_hidden):
            h_all_va, y_all_va = sp.valid_all_hidden, targets_from_codes(sp.valid_all_codes, K)
        n_streamed = len(sp.train_hidden)
        if n_streamed:
            ya_tr = targets_from_codes(sp.train_codes, K)
            h_tr, y_tr = np.concatenate([h_tr, sp.train_hidden]), np.concatenate([y_tr, ya_tr])
            if s_tr is not None:  # streamed pairs carry codes only: their soft targets are one-hot
                onehot = np.eye(shape.grid_size, dtype=s_tr.dtype)[ya_tr]  # [n, K, T*H, G]
                s_tr = np.concatenate([s_tr, onehot])
        h_va, y_va = sp.valid_hidden, targets_from_codes(sp.valid_codes, K)
        if len(cfg.archives) > 1:  # each archive's own held-out acting queries too (for comparisons)
            per_archive_va = {a: (h, targets_from_codes(c, K)) for a, (h, c) in sp.per_archive_valid.items()}
        log.info("streamed pairs: %d train (%d trajectories), %d held-out acting queries (%d trajectories, "
                 "the validation set), %d duplicate episodes merged",
                 n_streamed, sp.train_episodes, len(h_va), sp.valid_episodes, sp.dropped_duplicates)  # fmt: skip
    log.info(
        "pairs: %d train (%d demonstration frames x %d views + %d streamed); validation: %d %s; "
        "extraction %.0f s on %s",
        len(h_tr), int((view[~is_val] == 0).sum()), cfg.augment + 1, n_streamed, len(h_va),
        "held-out streamed samples" if cfg.archives
        else "held-out on-policy frames" if cfg.observations else f"frames of {n_val} held-out demonstrations",
        extract_s, device,
    )  # fmt: skip
    steps = math.ceil(len(h_tr) / cfg.batch_size) * cfg.epochs
    optim = OptimConfig(
        lr=cfg.lr,
        warmup_steps=max(1, steps // 20),
        total_steps=steps,
        batch_size=cfg.batch_size,
        draft_hidden_dim=cfg.draft_hidden_dim,
    )
    learner = Learner(hidden.shape[1], shape, optim, device=device)
    learner.autocast = learner.autocast and cfg.bf16
    run_config = {
        "run": config_to_dict(cfg),
        "source": "evaluator.fit_draft (offline, the policy's own codes on demonstration frames)",
        "backbone_id": policy.backbone_id,
        "train_pairs": int(len(h_tr)),
        "valid_frames": int(len(h_va)),
        "valid_episodes": [names[i] for i in val_eps],
        "archives": [str(a) for a in cfg.archives],
        "streamed_train_pairs": n_streamed,
        "observations": str(cfg.observations) if cfg.observations else None,
        "observed_train_pairs": n_observed,
        "optim": vars(optim),
    }
    best, best_res, best_epoch, t1 = -1.0, None, 0, time.time()
    history = []
    bar = tqdm(range(cfg.epochs), desc=f"draft K={K}", unit="epoch", dynamic_ncols=True)
    for epoch in bar:
        order = rng.permutation(len(h_tr))
        losses = []
        for i in range(0, len(order), cfg.batch_size):
            b = order[i : i + cfg.batch_size]
            r = learner.train_step(h_tr[b], y_tr[b], s_tr[b] if s_tr is not None else None, cfg.soft_weight)
            losses.append(r["loss"])
        res = learner.validate(h_va, y_va)
        history.append({"epoch": epoch + 1, "train_loss": float(np.mean(losses)), "val_loss": res.loss,
                        "val_acc_per_layer": res.acc_per_layer})  # fmt: skip
        if (
            h_va is not h_demo_va
        ):  # the held-out demonstrations too, for comparison with demonstration-only fits
            history[-1]["demo_val_acc_per_layer"] = learner.validate(h_demo_va, y_demo_va).acc_per_layer
        if h_all_va is not None:
            history[-1]["val_all_queries_acc_per_layer"] = learner.validate(h_all_va, y_all_va).acc_per_layer
        if per_archive_va:
            history[-1]["val_per_archive_acc_per_layer"] = {
                a: learner.validate(h, yy).acc_per_layer for a, (h, yy) in per_archive_va.items()
            }
        if res.accuracy > best:
            best, best_res, best_epoch = res.accuracy, res, epoch + 1
            learner.best_val = best
            learner.save(cfg.out, epoch + 1, res.accuracy, run_config, optimizer_state=not cfg.slim)
        bar.set_postfix(loss=f"{np.mean(losses):.3f}", val_acc=f"{res.accuracy:.3f}")
    bar.close()
    summary = {
        "checkpoint": str(cfg.out),
        "device": str(device),
        "best_val_accuracy": best,
        "best_epoch": best_epoch,
        "val_acc_per_layer": best_res.acc_per_layer,
        "val_layer_exact": best_res.layer_exact,
        "train_pairs": int(len(h_tr)),
        "augment": cfg.augment,
        "valid_frames": int(len(h_va)),
        "validation": "held-out streamed episodes"
        if cfg.archives
        else "held-out on-policy frames"
        if cfg.observations
        else "held-out demonstrations",
        "val_inits": cfg.val_inits,
        "streamed_train_pairs": n_streamed,
        "observed_train_pairs": n_observed,
        "extract_s": extract_s,
        "train_s": time.time() - t1,
        "history": history,
    }
    cfg.out.with_suffix(".json").write_text(json.dumps(summary, indent=1))
    log.info("K=%d: best val token accuracy %.3f; per layer %s; whole layer %s", K, best,
             [round(a, 3) for a in best_res.acc_per_layer], [round(a, 3) for a in best_res.layer_exact])  # fmt: skip
    return summary


def main(argv: list[str] | None = None) -> None:
    setup_logging("fit_draft")
    cfg = parse_config(FitDraftConfig, argv, prog="python -m evaluator.fit_draft")
    fit(cfg)


if __name__ == "__main__":
    main()
