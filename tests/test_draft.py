"""Draft model: exact contract, loss and accuracy, checkpoint format."""

from __future__ import annotations

import pytest
import torch

from common.draft import (
    CHECKPOINT_KEYS,
    RFSQDraftModelWithProjection,
    coarse_targets,
    draft_loss,
    load_checkpoint,
    save_checkpoint,
)


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
