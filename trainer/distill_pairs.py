"""Distillation pairs for :mod:`trainer.fit_draft` (docs/DESIGN.md §5.6): the policy's own (hidden, codes).

* **Demonstration frames** (``--demos`` HDF5 or ``--packed`` npz): every frame runs through the policy's
  baseline decoding (prefix pass + L block passes, batched per instruction); ``--augment N`` adds N
  randomly shifted views of every training frame, each with its own hidden state and codes. Whole
  demonstrations are held out (``--val-fraction``), never augmented. ``--cache`` keeps the extraction.
* **Closed-loop frames** (``--observations``, npz of ``trainer.pack_onpolicy``), relabeled by this policy:
  training pairs, except the episodes of ``--val-inits``.
* **Streamed archives** (``--archives``): their training trajectories join the pairs and their held-out
  acting queries become the validation set (trajectories keyed across archives, :mod:`trainer.pairs`).

Axes: N pairs, D hidden size, K coarse layers, S = T*H tokens per layer, G grid size.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from tqdm import tqdm

from common.archive import archive_meta
from common.demos import read_demos
from common.draft import coarse_targets
from common.init_states import require_checked
from common.packed import unpack
from common.policy import LayerwisePolicy
from common.vla.embedded import normalize_images
from trainer.pairs import load_keyed
from trainer.vla_data import random_shift

if TYPE_CHECKING:  # the command's config, for annotations only (trainer.fit_draft imports this module)
    from trainer.fit_draft import FitDraftConfig

log = logging.getLogger("trainer.fit_draft")


def load_frames(cfg: FitDraftConfig, image_size: int) -> dict[str, Any]:
    """Demonstration frames of ``cfg.packed`` or ``cfg.demos`` as arrays: images [N, 2, S, S, 3] uint8
    (run-time downsampling), proprio [N, 8], episode [N], instruction_of_episode [E], episode_names [E]
    (trainer.train_vla layout), every ``cfg.frame_stride``-th frame."""
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


# ---------------------------------------------------------------------------------------- demonstrations
@dataclass
class Extracted:
    """The policy's pairs over demonstration frames (view 0: the frame itself, view a > 0: shifted)."""

    hidden: np.ndarray  # [N, D] float32
    codes: np.ndarray  # [N, T, H, L] uint8
    soft: np.ndarray | None  # [N, K, S, G] float16, the policy's probabilities (--soft-weight)
    episode: np.ndarray  # [N] demonstration index
    view: np.ndarray  # [N] int64
    names: list[str]  # [E] demonstration names


def _load_cache(cfg: FitDraftConfig, policy: LayerwisePolicy) -> Extracted:
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
    soft = None
    if cfg.soft_weight > 0:
        if "soft" not in z.files or z["soft"].shape[1] < cfg.num_coarse_layers:
            raise ValueError(f"cache {cfg.cache} holds no policy probabilities for {cfg.num_coarse_layers} "
                             "layers; extract again (new --cache) to use --soft-weight")  # fmt: skip
        soft = z["soft"][keep][:, : cfg.num_coarse_layers]
    return Extracted(hidden[keep], codes[keep], soft, ep[keep], view[keep], names)


def _augment(
    cfg: FitDraftConfig,
    policy: LayerwisePolicy,
    device: torch.device,
    data: dict[str, Any],
    ex: Extracted,
    val_eps: list[int],
    soft_layers: int,
) -> Extracted:
    """``cfg.augment`` randomly shifted views of every training frame (held-out demonstrations: none)."""
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    train_rows = np.flatnonzero(~np.isin(data["episode"], val_eps))
    parts_h, parts_c, parts_s = [ex.hidden], [ex.codes], [ex.soft]
    ep, view = ex.episode, ex.view
    for a in range(1, cfg.augment + 1):
        h_a, c_a, s_a = extract(policy, data, train_rows, cfg.shift, cfg.extract_batch, gen,
                                f"view {a}/{cfg.augment}", soft_layers)  # fmt: skip
        parts_h.append(h_a)
        parts_c.append(c_a)
        parts_s.append(s_a)
        ep = np.concatenate([ep, data["episode"][train_rows]])
        view = np.concatenate([view, np.full(len(train_rows), a, np.int64)])
    soft = np.concatenate(parts_s) if soft_layers else None
    return Extracted(np.concatenate(parts_h), np.concatenate(parts_c), soft, ep, view, ex.names)


def extract_demos(
    cfg: FitDraftConfig,
    policy: LayerwisePolicy,
    device: torch.device,
    rng: np.random.Generator,
    soft_layers: int,
) -> tuple[Extracted, list[int]]:
    """The policy's pairs over the demonstrations (from ``cfg.cache`` if it exists, else extracted and
    cached there), and the held-out demonstrations (``cfg.val_fraction`` of them, drawn with ``rng``)."""
    from_cache = cfg.cache is not None and cfg.cache.is_file()
    if from_cache:
        ex = _load_cache(cfg, policy)
    else:
        data = load_frames(cfg, policy.model.config.image_size)
        rows = np.arange(len(data["episode"]))
        hidden, codes, soft = extract(policy, data, rows, batch=cfg.extract_batch, soft_layers=soft_layers)
        names = [str(n) for n in data["episode_names"]]
        ex = Extracted(hidden, codes, soft, data["episode"].copy(), np.zeros(len(rows), np.int64), names)
    n_ep = len(ex.names)
    n_val = max(1, int(round(cfg.val_fraction * n_ep)))
    val_eps = sorted(rng.permutation(n_ep)[:n_val].tolist())
    if not from_cache and cfg.augment:
        ex = _augment(cfg, policy, device, data, ex, val_eps, soft_layers)
    if cfg.cache is not None and not from_cache:
        cfg.cache.parent.mkdir(parents=True, exist_ok=True)
        extra = {"soft": ex.soft} if ex.soft is not None else {}
        np.savez(cfg.cache, hidden=ex.hidden, codes=ex.codes, episode=ex.episode, view=ex.view,
                 names=np.asarray(ex.names), backbone=policy.backbone_id, **extra)  # fmt: skip
    return ex, val_eps


# ---------------------------------------------------------------------------------------- all pairs
@dataclass
class Pairs:
    """Training pairs and validation sets (targets: :func:`common.draft.coarse_targets`, [N, K, S])."""

    h_tr: np.ndarray
    y_tr: np.ndarray
    s_tr: np.ndarray | None  # soft targets [N, K, S, G] (--soft-weight)
    h_va: np.ndarray  # the validation set
    y_va: np.ndarray
    h_demo_va: np.ndarray  # the held-out demonstrations (the validation set unless on-policy data)
    y_demo_va: np.ndarray
    demo_train_frames: int  # unshifted demonstration frames among the training pairs
    h_all_va: np.ndarray | None = None  # held-out streamed episodes, all queries (--sample-every)
    y_all_va: np.ndarray | None = None
    per_archive_va: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    n_streamed: int = 0
    n_observed: int = 0


def demo_split(ex: Extracted, val_eps: list[int], k: int) -> Pairs:
    is_val = np.isin(ex.episode, val_eps)
    if (ex.view[is_val] != 0).any():
        raise ValueError("augmented views of held-out demonstrations in the data: the split is inconsistent")
    y = coarse_targets(ex.codes, k)  # [N, K, T*H]
    s_tr = ex.soft[~is_val] if ex.soft is not None else None  # [N_tr, K, T*H, G]
    h_va, y_va = ex.hidden[is_val], y[is_val]
    demo_train = int((ex.view[~is_val] == 0).sum())
    return Pairs(ex.hidden[~is_val], y[~is_val], s_tr, h_va, y_va, h_va, y_va, demo_train)


def add_observations(
    cfg: FitDraftConfig,
    policy: LayerwisePolicy,
    pairs: Pairs,
    k: int,
    soft_layers: int,
    val_inits: set[int] | None,
) -> None:
    """Closed-loop frames relabeled by this policy: training pairs, except the episodes starting from
    ``val_inits`` (the validation set when no archives are given)."""
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
    y_o = coarse_targets(c_o, k)
    pairs.h_tr, pairs.y_tr = (
        np.concatenate([pairs.h_tr, h_o[~o_val]]),
        np.concatenate([pairs.y_tr, y_o[~o_val]]),
    )
    if pairs.s_tr is not None:
        pairs.s_tr = np.concatenate([pairs.s_tr, s_o[~o_val][:, :k]])
    pairs.n_observed = int((~o_val).sum())
    if not cfg.archives:
        if not o_val.any():
            raise ValueError(
                "--observations without --archives needs --val-inits naming some of its episodes"
            )
        pairs.h_va, pairs.y_va = h_o[o_val], y_o[o_val]
    same = float((c_o == obs["codes"]).mean()) if obs["codes"].shape == c_o.shape else float("nan")
    log.info("on-policy frames of %s (streamed by %s): %d train, %d held out (initial states %s); "
             "this policy's codes equal the streamed ones on %.1f %% of the tokens",
             cfg.observations, obs["backbone"], pairs.n_observed, int(o_val.sum()), cfg.val_inits or "none",
             100 * same)  # fmt: skip


def add_archives(
    cfg: FitDraftConfig, policy: LayerwisePolicy, pairs: Pairs, k: int, val_inits: set[int] | None
) -> None:
    """On-policy pairs streamed by the producer: train on them, validate on their held-out episodes."""
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
        pairs.h_all_va, pairs.y_all_va = sp.valid_all_hidden, coarse_targets(sp.valid_all_codes, k)
    pairs.n_streamed = len(sp.train_hidden)
    if pairs.n_streamed:
        ya_tr = coarse_targets(sp.train_codes, k)
        pairs.h_tr = np.concatenate([pairs.h_tr, sp.train_hidden])
        pairs.y_tr = np.concatenate([pairs.y_tr, ya_tr])
        if pairs.s_tr is not None:  # streamed pairs carry codes only: their soft targets are one-hot
            onehot = np.eye(policy.shape.grid_size, dtype=pairs.s_tr.dtype)[ya_tr]  # [n, K, T*H, G]
            pairs.s_tr = np.concatenate([pairs.s_tr, onehot])
    pairs.h_va, pairs.y_va = sp.valid_hidden, coarse_targets(sp.valid_codes, k)
    if len(cfg.archives) > 1:  # each archive's own held-out acting queries too (for comparisons)
        pairs.per_archive_va = {a: (h, coarse_targets(c, k)) for a, (h, c) in sp.per_archive_valid.items()}
    log.info("streamed pairs: %d train (%d trajectories), %d held-out acting queries (%d trajectories, "
             "the validation set), %d duplicate episodes merged",
             pairs.n_streamed, sp.train_episodes, len(pairs.h_va), sp.valid_episodes,
             sp.dropped_duplicates)  # fmt: skip
