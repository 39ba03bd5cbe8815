"""Draft model: exact contract, loss and accuracy, checkpoint format."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from common.archive import ArchiveWriter, EpisodeRecord
from common.draft import (
    CHECKPOINT_KEYS,
    KPositionDraftModel,
    RFSQDraftModelWithProjection,
    build_draft,
    coarse_targets,
    draft_loss,
    load_checkpoint,
    save_checkpoint,
)
from common.shapes import DEFAULT_SHAPE
from trainer.learner import Learner, OptimConfig
from trainer.retrain import RetrainConfig, retrain


# ------------------------------------------------------------------ the plan's class, written from the plan
class PlanDecoder(nn.Module):
    """DraftTransformerDecoder as the plan writes it (DESIGN §4), independent of common/draft.py."""

    def __init__(self, hidden_dim: int):
        super().__init__()
        self.decoder_layer = nn.TransformerDecoderLayer(
            d_model=hidden_dim, nhead=8, dim_feedforward=2048, dropout=0.1, activation="gelu",
            batch_first=True, norm_first=True,
        )  # fmt: skip
        self.position_encoding = nn.Parameter(torch.zeros(1, 256, hidden_dim))
        self.output_norm = nn.LayerNorm(hidden_dim)

    def forward(self, x):
        x = x + self.position_encoding[:, : x.size(1)]
        x = self.decoder_layer(x, x)
        return self.output_norm(x)


class PlanDraft(nn.Module):
    """RFSQDraftModelWithProjection as the plan writes it."""

    def __init__(self, input_dim=4096, hidden_dim=512, num_coarse_layers=3, chunk_len=8, action_hidden_dim=16,
                 grid_size=7):  # fmt: skip
        super().__init__()
        self.shape = (num_coarse_layers, chunk_len * action_hidden_dim, grid_size)
        self.input_projection = nn.Linear(input_dim, hidden_dim)
        self.decoder = PlanDecoder(hidden_dim)
        self.classification_heads = nn.ModuleList(
            nn.Sequential(
                nn.Linear(hidden_dim, hidden_dim // 2),
                nn.GELU(),
                nn.LayerNorm(hidden_dim // 2),
                nn.Linear(hidden_dim // 2, chunk_len * action_hidden_dim * grid_size),
            )
            for _ in range(num_coarse_layers)
        )

    def forward(self, hidden):
        x = self.input_projection(hidden)
        x = x.unsqueeze(1)  # [B, 1, C]
        x = self.decoder(x)
        x = x.squeeze(1)  # [B, C]
        logits = [head(x) for head in self.classification_heads]  # every head reads the same vector
        return torch.stack(logits, dim=1).view(hidden.size(0), *self.shape)


def _scrambled(model: nn.Module, seed: int) -> nn.Module:
    """Every parameter random (norms and positions included), so that no term of the forward is trivial."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model.eval()


@pytest.mark.parametrize("dims", [{}, {"input_dim": 64, "hidden_dim": 64, "num_coarse_layers": 5}])
def test_default_forward_is_the_plans(dims) -> None:
    ours = _scrambled(RFSQDraftModelWithProjection(**dims), seed=1)
    plan = PlanDraft(**dims).eval()
    plan.load_state_dict(ours.state_dict(), strict=True)
    x = torch.randn(4, ours.input_dim, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(ours(x), plan(x))
    # and the other way round: the plan's weights in our class
    plan = _scrambled(PlanDraft(**dims), seed=3)
    ours.load_state_dict(plan.state_dict(), strict=True)
    with torch.no_grad():
        assert torch.equal(ours(x), plan(x))
    assert ours.model_config()["forward"] == "plan" and build_draft(**dims).forward_name == "plan"


def test_kpos_is_another_model_with_the_same_state_dict() -> None:
    plan = _scrambled(RFSQDraftModelWithProjection(input_dim=64, hidden_dim=64), seed=1)
    kpos = KPositionDraftModel(input_dim=64, hidden_dim=64).eval()
    kpos.load_state_dict(plan.state_dict(), strict=True)
    x = torch.randn(4, 64)
    with torch.no_grad():
        assert not torch.allclose(kpos(x), plan(x), atol=1e-3)
    assert kpos.model_config()["forward"] == "kpos"
    assert isinstance(build_draft("kpos", input_dim=64, hidden_dim=64), KPositionDraftModel)
    with pytest.raises(ValueError, match="forward must be one of"):
        build_draft("kpositions", input_dim=64)


def test_forward_shape_and_module_names() -> None:
    model = RFSQDraftModelWithProjection()
    logits = model(torch.randn(2, 4096))
    assert logits.shape == (2, 3, 128, 7)
    names = set(dict(model.named_parameters()))
    for expected in (
        "input_projection.weight",
        "decoder.position_encoding",
        "decoder.decoder_layer.self_attn.in_proj_weight",
        "decoder.decoder_layer.multihead_attn.in_proj_weight",
        "decoder.output_norm.weight",
        "classification_heads.2.3.weight",
    ):
        assert expected in names
    assert model.decoder.position_encoding.shape == (1, 256, 512)
    layer = model.decoder.decoder_layer
    assert layer.norm_first and layer.self_attn.batch_first and layer.linear1.out_features == 2048
    head = model.classification_heads[0]
    assert [type(m).__name__ for m in head] == ["Linear", "GELU", "LayerNorm", "Linear"]
    assert head[3].out_features == 8 * 16 * 7


def test_wrong_input_shape_raises() -> None:
    with pytest.raises(ValueError, match=r"\[B, 4096\]"):
        RFSQDraftModelWithProjection()(torch.randn(2, 4095))


def test_coarse_targets_flatten_in_t_h_order() -> None:
    codes = torch.arange(8 * 16 * 8).reshape(1, 8, 16, 8) % 7
    targets = coarse_targets(codes, 3)
    assert targets.shape == (1, 3, 128)
    assert targets[0, 1, 16 * 2 + 5] == codes[0, 2, 5, 1]


def test_loss_and_accuracy_per_layer() -> None:
    targets = torch.randint(0, 7, (4, 3, 128))
    perfect = torch.nn.functional.one_hot(targets, 7).float() * 20
    loss, metrics = draft_loss(perfect, targets)
    assert loss < 1e-6 and metrics["acc_per_layer"] == [1.0, 1.0, 1.0] and metrics["accuracy"] == 1.0
    wrong = perfect.clone()
    wrong[:, 2] = torch.nn.functional.one_hot((targets[:, 2] + 1) % 7, 7).float() * 20
    _, metrics = draft_loss(wrong, targets)
    assert metrics["acc_per_layer"] == [1.0, 1.0, 0.0]
    assert metrics["layer_exact"] == [1.0, 1.0, 0.0]


def test_learns_a_simple_mapping() -> None:
    torch.manual_seed(0)
    model = RFSQDraftModelWithProjection(input_dim=32, hidden_dim=64)
    x = torch.randn(64, 32)
    targets = (x[:, :1] > 0).long().expand(64, 3 * 128).reshape(64, 3, 128) * 3
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(60):
        loss, metrics = draft_loss(model(x), targets)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert metrics["accuracy"] > 0.95


def test_checkpoint_exact_keys_and_identical_reload(tmp_path) -> None:
    torch.manual_seed(0)
    model = RFSQDraftModelWithProjection(input_dim=256, hidden_dim=128).eval()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    loss, _ = draft_loss(model(torch.randn(3, 256)), torch.randint(0, 7, (3, 3, 128)))
    loss.backward()
    opt.step()
    path = save_checkpoint(
        tmp_path / "d.pt", model, opt, epoch=3, val_accuracy=0.5, config={"run": {"lr": 1e-4}}
    )
    raw = torch.load(path, weights_only=True)
    assert set(raw) == set(CHECKPOINT_KEYS)
    assert isinstance(raw["val_accuracy"], float) and raw["epoch"] == 3
    loaded, ckpt = load_checkpoint(path)
    x = torch.randn(5, 256)
    assert torch.equal(loaded(x), model(x))
    assert ckpt["config"]["model"]["input_dim"] == 256
    opt2 = torch.optim.AdamW(loaded.parameters(), lr=1e-4)
    opt2.load_state_dict(ckpt["optimizer_state_dict"])


def test_load_rejects_wrong_files(tmp_path) -> None:
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "none.pt")
    torch.save({"model_state_dict": {}}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="exactly"):
        load_checkpoint(tmp_path / "bad.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a loadable"):
        load_checkpoint(tmp_path / "junk.pt")


def test_draft_loss_with_soft_targets_is_cross_entropy_to_the_policy_distribution():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 128, 7)
    targets = torch.randint(0, 7, (2, 3, 128))
    soft = torch.softmax(torch.randn(2, 3, 128, 7), -1)
    hard, _ = draft_loss(logits, targets)
    assert torch.allclose(draft_loss(logits, targets, soft, 0.0)[0], hard)
    full, _ = draft_loss(logits, targets, soft, 1.0)
    expected = -(soft * torch.log_softmax(logits, -1)).sum(-1).mean()
    assert torch.allclose(full, expected)
    half, _ = draft_loss(logits, targets, soft, 0.5)
    assert torch.allclose(half, 0.5 * hard + 0.5 * expected)
    # one-hot soft targets equal the hard loss
    onehot = torch.nn.functional.one_hot(targets, 7).float()
    assert torch.allclose(draft_loss(logits, targets, onehot, 1.0)[0], hard, atol=1e-6)
    with pytest.raises(ValueError, match="soft targets"):
        draft_loss(logits, targets, soft[..., :5], 1.0)


# ------------------------------------------------------------------ the forward travels with the checkpoint
def _save(tmp_path, name: str, forward: str, drop_forward: bool = False):
    torch.manual_seed(0)
    model = _scrambled(build_draft(forward, input_dim=64, hidden_dim=64), seed=4)
    path = save_checkpoint(tmp_path / name, model, None, epoch=1, val_accuracy=0.5, config={})
    if drop_forward:  # a checkpoint from before the forward was recorded
        ckpt = torch.load(path, weights_only=True)
        del ckpt["config"]["model"]["forward"]
        torch.save(ckpt, path)
    return model, path


def test_checkpoint_records_its_forward_and_loads_only_as_that_forward(tmp_path) -> None:
    x = torch.randn(3, 64)
    for forward, other in (("plan", "kpos"), ("kpos", "plan")):
        model, path = _save(tmp_path, f"{forward}.pt", forward)
        assert torch.load(path, weights_only=True)["config"]["model"]["forward"] == forward
        loaded, _ = load_checkpoint(path, forward=forward)
        assert type(loaded) is type(model) and torch.equal(loaded(x), model(x))
        with pytest.raises(
            ValueError, match=f"the '{forward}' forward, not the '{other}'.*--draft-forward {forward}"
        ):
            load_checkpoint(path, forward=other)
    with pytest.raises(ValueError, match="'kpos' forward, not the 'plan'"):  # the default is the plan's
        load_checkpoint(tmp_path / "kpos.pt")
    with pytest.raises(ValueError, match="forward must be one of"):
        load_checkpoint(tmp_path / "plan.pt", forward="other")


def test_checkpoint_without_a_recorded_forward_is_kpos(tmp_path) -> None:
    model, path = _save(tmp_path, "old.pt", "kpos", drop_forward=True)
    with pytest.raises(ValueError, match="records no draft forward.*--draft-forward kpos"):
        load_checkpoint(path)
    loaded, _ = load_checkpoint(path, forward="kpos")
    x = torch.randn(3, 64)
    assert isinstance(loaded, KPositionDraftModel) and torch.equal(loaded(x), model(x))


def test_learner_builds_the_plan_by_default_and_refuses_to_resume_another_forward(tmp_path) -> None:
    shape = DEFAULT_SHAPE
    plan = Learner(64, shape, OptimConfig(draft_hidden_dim=64))
    assert type(plan.model) is RFSQDraftModelWithProjection
    kpos = Learner(64, shape, OptimConfig(draft_hidden_dim=64, draft_forward="kpos"))
    assert type(kpos.model) is KPositionDraftModel
    path = kpos.save(tmp_path / "k.pt", 0, 0.1, {})
    with pytest.raises(ValueError, match="'kpos' forward, not the 'plan'"):
        plan.load(path)
    Learner(64, shape, OptimConfig(draft_hidden_dim=64, draft_forward="kpos")).load(path)
    with pytest.raises(ValueError, match="forward must be one of"):
        OptimConfig(draft_forward="k")


def _tiny_archive(path) -> None:
    rng = np.random.default_rng(0)
    w = ArchiveWriter(path, DEFAULT_SHAPE)
    w.set_provenance(backbone_id="b", hidden_dim=16, codec_sha256="", producer_id="p", producer_config="{}")
    for i, split in enumerate(("train", "valid", "train")):
        ep = EpisodeRecord("p", "s", "libero_spatial", 0, i, split, status="success", num_steps=24)
        for j in range(3):
            ep.hidden.append(rng.standard_normal(16).astype(np.float32))
            ep.codes.append(rng.integers(0, 7, DEFAULT_SHAPE.codes_shape, dtype=np.uint8))
            ep.actions.append(rng.uniform(-1, 1, DEFAULT_SHAPE.chunk_shape).astype(np.float32))
            ep.steps.append(8 * j)
            ep.seqs.append(4 * i + j)
            ep.sent_at.append(0.0)
            ep.received_at.append(0.0)
        ep.end_seq = 4 * i + 3
        w.write_episode(ep)


def test_retrain_writes_the_plan_by_default_and_the_flag_selects_kpos(tmp_path) -> None:
    _tiny_archive(tmp_path / "a.hdf5")
    common = dict(archives=[tmp_path / "a.hdf5"], epochs=1, batch_size=4, draft_hidden_dim=32, threads=1)
    retrain(RetrainConfig(run_dir=tmp_path / "plan", **common))
    _, ckpt = load_checkpoint(tmp_path / "plan" / "draft_best.pt")
    assert ckpt["config"]["model"]["forward"] == "plan"
    retrain(RetrainConfig(run_dir=tmp_path / "kpos", draft_forward="kpos", **common))
    _, ckpt = load_checkpoint(tmp_path / "kpos" / "draft_best.pt", forward="kpos")
    assert ckpt["config"]["model"]["forward"] == "kpos"
    with pytest.raises(ValueError, match="'kpos' forward, not the 'plan'"):  # --init-checkpoint is checked
        retrain(
            RetrainConfig(
                run_dir=tmp_path / "x", init_checkpoint=tmp_path / "kpos" / "draft_best.pt", **common
            )
        )


def test_command_lines_default_to_the_plan_and_take_draft_forward(tmp_path) -> None:
    from common.cli import parse_config
    from evaluator.eval import EvalConfig
    from trainer.fit_draft import FitDraftConfig
    from trainer.online import TrainerConfig

    (tmp_path / "d.hdf5").touch()
    ArchiveWriter(tmp_path / "a.hdf5", DEFAULT_SHAPE)  # retrain checks its archives: a real (empty) one
    (tmp_path / "x.pt").touch()  # eval checks that its draft exists
    cases = [
        (TrainerConfig, ["--run-dir", str(tmp_path / "run")]),
        (RetrainConfig, ["--archives", str(tmp_path / "a.hdf5")]),
        (FitDraftConfig, ["--demos", str(tmp_path / "d.hdf5"), "--out", str(tmp_path / "x.pt")]),
        (EvalConfig, ["--draft", str(tmp_path / "x.pt"), "--out-dir", str(tmp_path / "eval")]),
    ]
    for cls, argv in cases:
        assert parse_config(cls, argv).draft_forward == "plan"
        assert parse_config(cls, [*argv, "--draft-forward", "kpos"]).draft_forward == "kpos"
        with pytest.raises(SystemExit):
            parse_config(cls, [*argv, "--draft-forward", "kpositions"])
    assert TrainerConfig(run_dir=tmp_path / "run").optim().draft_forward == "plan"


def test_fit_draft_fits_both_forwards_on_the_same_pairs_and_split(tmp_path) -> None:
    """The comparison command: one cache of the policy's pairs, the same seed, so the same held-out set."""
    import json

    from tests.evaluator.test_eval import _write_demos
    from trainer.fit_draft import main

    _write_demos(tmp_path / "d.hdf5", (4, 3, 5))
    args = ["--demos", str(tmp_path / "d.hdf5"), "--epochs", "1", "--val-fraction", "0.34", "--batch-size", "4",
            "--draft-hidden-dim", "32", "--cache", str(tmp_path / "pairs.npz")]  # fmt: skip
    summaries = {}
    for forward in ("plan", "kpos"):
        out = tmp_path / f"{forward}.pt"
        main([*args, "--out", str(out), "--draft-forward", forward])
        summaries[forward] = json.loads(out.with_suffix(".json").read_text())
        _, ckpt = load_checkpoint(out, forward=forward)
        assert ckpt["config"]["model"]["forward"] == forward
    assert summaries["plan"]["valid_frames"] == summaries["kpos"]["valid_frames"] > 0
    assert summaries["plan"]["train_pairs"] == summaries["kpos"]["train_pairs"]
    score = tmp_path / "score.json"
    with pytest.raises(ValueError, match="--draft-forward kpos"):
        main(
            [
                "--demos",
                str(tmp_path / "d.hdf5"),
                "--evaluate",
                str(tmp_path / "kpos.pt"),
                "--out",
                str(score),
            ]
        )
    main(["--demos", str(tmp_path / "d.hdf5"), "--evaluate", str(tmp_path / "kpos.pt"), "--out", str(score),
          "--draft-forward", "kpos"])  # fmt: skip
    assert json.loads(score.read_text())["val_accuracy"] == pytest.approx(
        summaries["kpos"]["best_val_accuracy"]
    )


def test_eval_loads_a_kpos_draft_only_when_told(tmp_path) -> None:
    from evaluator.eval import load_draft, load_eval_policy

    policy = load_eval_policy("twin-tiny")
    model = build_draft("kpos", input_dim=policy.hidden_dim, hidden_dim=64)
    path = save_checkpoint(tmp_path / "k.pt", model, None, epoch=0, val_accuracy=0.0, config={})
    with pytest.raises(ValueError, match="--draft-forward kpos"):
        load_draft(path, policy)
    proposer, info = load_draft(path, policy, "kpos")
    assert info["forward"] == "kpos"
