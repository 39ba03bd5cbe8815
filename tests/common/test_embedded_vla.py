"""Embedded VLA: KV-cache decoding equals uncached decoding; verify equals sequential decoding."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from common.codec import RFSQCodec
from common.policy import Observation
from common.vla import load_policy
from common.vla.embedded import (
    EmbeddedVLA,
    EmbeddedVLAConfig,
    EmbeddedVLAPolicy,
    block_attention_mask,
    downsample_images,
    load_embedded_vla,
    save_embedded_vla,
)
from common.vla.tokenizer import InstructionTokenizer
from tests.init_helpers import record_fresh_start

INSTRUCTIONS = [
    "pick up the black bowl between the plate and the ramekin and place it on the plate",
    "pick up the black bowl on the wooden cabinet and place it on the plate",
]


def small_config(**kw) -> EmbeddedVLAConfig:
    words = sorted({w for t in INSTRUCTIONS for w in t.split()} - {"ramekin"})  # one word falls back to bytes
    base = dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, words=words
    )
    base.update(kw)
    return EmbeddedVLAConfig(**base)


def make_policy(seed: int = 0, **kw) -> EmbeddedVLAPolicy:
    torch.manual_seed(seed)
    model = EmbeddedVLA(small_config(**kw))
    # BatchNorm running stats of a fresh model are trivial; give them non-trivial values
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    return EmbeddedVLAPolicy(model.double(), RFSQCodec().double())


def make_obs(n: int, seed: int = 0) -> list[Observation]:
    rng = np.random.default_rng(seed)
    return [
        Observation(
            agentview=rng.integers(0, 256, (128, 128, 3), dtype=np.uint8),
            wrist=rng.integers(0, 256, (128, 128, 3), dtype=np.uint8),
            proprio=rng.normal(size=8).astype(np.float32),
            instruction=INSTRUCTIONS[i % len(INSTRUCTIONS)],
        )
        for i in range(n)
    ]


def _inputs(policy: EmbeddedVLAPolicy, obs: list[Observation]) -> dict[str, torch.Tensor]:
    x = policy.encode_observations(obs)
    x["images"] = x["images"].double()
    x["proprio"] = x["proprio"].double()
    return x


def test_tokenizer_round_trip_and_fallback() -> None:
    tok = InstructionTokenizer.build(INSTRUCTIONS[:1])
    ids = tok.encode("pick up the bowl next to the cookie box")
    assert tok.decode(ids) == "pick up the bowl next to the cookie box"
    assert len(tok.encode(INSTRUCTIONS[0])) == 1 + len(INSTRUCTIONS[0].split())
    ids, mask = tok.batch_encode(["the plate", INSTRUCTIONS[0]], max_len=8)
    assert len(ids[0]) == len(ids[1]) == 8 and mask[0][:5] == [False] * 5 and all(mask[1])


def test_block_mask_structure() -> None:
    valid = torch.tensor([[False, True, True]])
    m = block_attention_mask(valid, num_blocks=2, block_width=2, num_query=7, dtype=torch.float32)[0, 0] == 0
    assert not m[:, 0].any()  # the pad key is never seen
    assert m[:3, 1:3].all() and not m[:3, 3:].any()  # prefix: bidirectional, blind to blocks
    assert m[3:5, 1:5].all() and not m[3:5, 5:].any()  # block 0: prefix + itself
    assert m[5:7, 1:7].all()  # block 1: prefix + block 0 + itself


def test_kv_cache_decoding_equals_uncached_forward() -> None:
    policy = make_policy()
    obs = make_obs(2)
    x = _inputs(policy, obs)
    with torch.no_grad():
        state = policy.model.prefix_pass(**x)
        codes = policy.decode_sequential(state)  # [B, T, H, L] with the KV cache
        full = policy.model.forward_train(**x, codes=codes)  # one uncached pass, teacher-forced
    ref = full["logits"].argmax(-1).permute(0, 2, 3, 1)  # [B, T, H, L]
    assert torch.equal(ref, codes)
    # logits block by block, with cache, match the uncached pass
    state = policy.prefix(obs)
    torch.testing.assert_close(state.hidden, full["hidden"])
    prev = None
    for layer in range(policy.shape.num_layers):
        logits = policy.decode_block(state, prev)
        torch.testing.assert_close(logits, full["logits"][:, layer])
        prev = codes[..., layer]


def test_verify_of_own_outputs_equals_sequential() -> None:
    policy = make_policy(seed=1)
    obs = make_obs(2, seed=1)
    seq_state = policy.prefix(obs)
    seq_codes = policy.decode_sequential(seq_state)  # [B, T, H, L]
    for k in range(0, 4):
        state = policy.prefix(obs)
        drafted = seq_codes[..., :k].permute(0, 3, 1, 2)  # [B, k, T, H]
        logits = policy.verify(state, drafted)  # [B, k+1, T, H, G]
        assert logits.shape[:2] == (2, k + 1) and state.num_blocks == k + 1
        assert torch.equal(logits.argmax(-1), seq_codes[..., : k + 1].permute(0, 3, 1, 2))
        # accept all but the last block, continue sequentially: same codes as the baseline
        policy.truncate(state, k)
        prev = seq_codes[..., k - 1] if k else None
        rest = []
        for _ in range(k, policy.shape.num_layers):
            prev = policy.decode_block(state, prev).argmax(-1)
            rest.append(prev)
        assert torch.equal(torch.stack(rest, -1), seq_codes[..., k:])


def test_verify_of_wrong_draft_changes_later_layers_only() -> None:
    policy = make_policy(seed=2)
    obs = make_obs(1, seed=2)
    seq_codes = policy.decode_sequential(policy.prefix(obs))
    drafted = seq_codes[..., :3].permute(0, 3, 1, 2).clone()  # [1, 3, T, H]
    drafted[:, 1] = (drafted[:, 1] + 1) % policy.shape.grid_size
    logits = policy.verify(policy.prefix(obs), drafted)
    # M_0 and M_1 depend only on the prefix and D_0 (correct)
    assert torch.equal(logits[:, :2].argmax(-1), seq_codes[..., :2].permute(0, 3, 1, 2))


def test_batched_equals_single() -> None:
    """Left padding does not change a prompt's outputs (relative positions are kept)."""
    policy = make_policy(seed=3)
    obs = make_obs(2, seed=3)  # two instructions of different token lengths
    batch = policy.act(obs)
    for i in range(2):
        single = policy.act([obs[i]])[0]
        np.testing.assert_allclose(single.hidden, batch[i].hidden, rtol=1e-6, atol=1e-8)
        assert np.array_equal(single.codes, batch[i].codes)


def test_act_output_contract() -> None:
    policy = make_policy(seed=4)
    out = policy.act(make_obs(1, seed=4))[0]
    s = policy.shape
    assert out.hidden.shape == (policy.hidden_dim,) and out.hidden.dtype == np.float32
    assert out.codes.shape == s.codes_shape and out.codes.dtype == np.uint8 and out.codes.max() < s.grid_size
    assert out.actions.shape == s.chunk_shape and out.actions.dtype == np.float32
    assert np.abs(out.actions).max() <= 1.0 and set(np.unique(out.actions[:, -1])) <= {-1.0, 1.0}


def test_save_load_round_trip(tmp_path) -> None:
    policy = make_policy(seed=5)
    model = policy.model.float()
    save_embedded_vla(model, tmp_path)
    loaded, meta = load_embedded_vla(tmp_path)
    for (k, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert torch.equal(a, b), k
    assert len(meta["weights_sha256"]) == 64


def test_load_policy_refuses_silent_random(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="allow_random"):
        load_policy("embedded", weights_dir=tmp_path / "none")
    with pytest.raises(ValueError, match="unknown policy backend"):
        load_policy("nonexistent")
    p = load_policy("embedded", weights_dir=tmp_path / "none", codec_dir=tmp_path / "none", allow_random=True)
    assert "random" in p.backbone_id


def test_downsample_is_area_average() -> None:
    img = np.zeros((1, 4, 4, 3), np.uint8)
    img[0, :2, :2] = 200
    out = downsample_images(img, 2)
    assert out.shape == (1, 2, 2, 3) and out[0, 0, 0, 0] == 200 and out[0, 1, 1, 0] == 0


def _write_demos(path, episodes: int = 4, steps: int = 12, side: int = 32) -> None:
    import h5py

    rng = np.random.default_rng(0)
    with h5py.File(path, "w") as f:
        data = f.create_group("data")
        for e in range(episodes):
            g = data.create_group(f"demo_{e}")
            g.attrs["instruction"] = INSTRUCTIONS[e % 2]
            g.attrs["task_id"] = e % 2
            g.create_dataset("actions", data=rng.uniform(-1, 1, (steps, 7)).astype(np.float32))
            obs = g.create_group("obs")
            for cam in ("agentview_rgb", "eye_in_hand_rgb"):
                obs.create_dataset(cam, data=rng.integers(0, 256, (steps, side, side, 3), dtype=np.uint8))
            obs.create_dataset("ee_states", data=rng.normal(size=(steps, 6)))
            obs.create_dataset("gripper_states", data=rng.normal(size=(steps, 2)))
            record_fresh_start(g, e)


def test_train_vla_smoke(tmp_path) -> None:
    """A few BC steps on a tiny HDF5 file: weights, metrics and plot are written and load back."""
    from common.codec import save_codec
    from trainer.train_vla import main

    demos = tmp_path / "demos.hdf5"
    _write_demos(demos)
    save_codec(RFSQCodec(), tmp_path / "codec")
    packed = tmp_path / "packed.npz"
    common = ["--image-size", "16", "--codec-dir", str(tmp_path / "codec")]
    main(
        [
            "--demos",
            str(demos),
            "--pack-to",
            str(packed),
            "--jpeg-quality",
            "90",
            "--frame-stride",
            "2",
            *common,
        ]
    )
    out = tmp_path / "vla"
    main(
        [
            "--packed",
            str(packed),
            "--out-dir",
            str(out),
            "--steps",
            "3",
            "--eval-interval",
            "3",
            "--batch-size",
            "4",
            "--val-every",
            "2",
            "--hidden-size",
            "32",
            "--intermediate-size",
            "64",
            "--num-hidden-layers",
            "1",
            "--vision-hidden-sizes",
            "8",
            "16",
            "--shift",
            "2",
            "--free-running-samples",
            "4",
            "--consistency-weight",
            "0.5",
            *common,
        ]
    )
    assert (out / "training.png").is_file() and (out / "metrics.json").is_file()
    held_out = json.loads((out / "config.json").read_text())["held_out"]
    assert len(held_out["free_aux_agreement"]) == 3 and held_out["cons"] > 0
    policy = load_policy("embedded", weights_dir=out, codec_dir=tmp_path / "codec")
    assert policy.act(make_obs(1))[0].codes.shape == policy.shape.codes_shape


def test_pack_round_trip(tmp_path) -> None:
    """Agentview frames come back bit-exact (delta + LZMA); wrist JPEG frames come back close."""
    from common.demos import read_demos
    from common.packed import pack, unpack
    from trainer.vla_data import frame_chunks

    demos = tmp_path / "demos.hdf5"
    _write_demos(demos, episodes=3, steps=9)
    data = read_demos([demos], 16, frame_stride=2)
    assert list(data["step"][data["episode"] == 1]) == [1, 3, 5, 7]
    ramp = np.linspace(0, 255, 16).astype(np.uint8)
    data["images"][:, 1] = ramp[None, :, None, None]  # a smooth wrist image (JPEG is for photos, not noise)
    pack(data, tmp_path / "p.npz", jpeg_quality=95)
    back = unpack(tmp_path / "p.npz")
    assert np.array_equal(back["images"][:, 0], data["images"][:, 0])
    assert np.abs(back["images"][:, 1].astype(int) - data["images"][:, 1]).mean() < 3
    chunks = frame_chunks(back, 8)  # [N, T, A]
    ep_actions = data["actions"][data["action_episode"] == 1]
    row = np.flatnonzero(back["episode"] == 1)[-1]  # step 7 of 9: the chunk runs past the end
    assert np.array_equal(chunks[row], ep_actions[[7, 8, 8, 8, 8, 8, 8, 8]])


def test_consistency_term_is_cross_entropy_from_aux_to_decoder() -> None:
    from trainer.vla_loss import losses

    torch.manual_seed(0)
    model = EmbeddedVLA(small_config())
    b, size = 3, model.config.image_size
    batch = {
        "images": torch.rand(b, 2, 3, size, size) * 2 - 1,
        "proprio": torch.randn(b, 8),
        "text_ids": torch.ones(b, 4, dtype=torch.long),
        "text_valid": torch.ones(b, 4, dtype=torch.bool),
        "codes": torch.randint(0, 7, (b, 8, 16, 8)),
    }
    r0, r1 = losses(model, batch, 1.0, 0.5, 0.0), losses(model, batch, 1.0, 0.5, 2.0)
    assert torch.allclose(r1["loss"] - r0["loss"], 2.0 * r1["cons"], atol=1e-5)
    out = model.forward_train(**batch)
    k = out["aux_logits"].shape[1]
    p = out["aux_logits"].softmax(-1)
    expected = -(p * out["logits"][:, :k].log_softmax(-1)).sum(-1).mean()
    assert torch.allclose(r1["cons"], expected, atol=1e-5)


def test_max_minutes_fits_the_cosine_schedule_to_the_time(tmp_path):
    from common.cli import parse_config
    from trainer.train_vla import fitted_total, lr_at
    from trainer.vla_config import VLATrainConfig

    packed = str(tmp_path / "x.npz")
    (tmp_path / "x.npz").touch()
    cfg = parse_config(
        VLATrainConfig,
        ["--packed", packed, "--steps", "8000", "--warmup", "200", "--lr", "1e-3", "--max-minutes", "2"],
    )
    assert fitted_total(cfg, 10, 1.0) == 8000  # too early to tell
    assert fitted_total(cfg, 1000, 60.0) == 2000  # 1000 steps a minute, 2 minutes
    assert fitted_total(cfg, 1000, 1.0) == 8000  # never past --steps
    assert fitted_total(cfg, 1000, 1000.0) == 1001  # over time: ends now
    assert lr_at(cfg, 1999, 2000) == pytest.approx(0.05e-3, rel=1e-3)  # decayed by the fitted end
    assert lr_at(cfg, 1999) > 0.5e-3  # the unfitted schedule would still be high there
    free = parse_config(VLATrainConfig, ["--packed", packed, "--steps", "8000"])
    assert fitted_total(free, 1000, 60.0) == 8000


def test_too_few_episodes_to_hold_one_out_is_a_clear_error(tmp_path) -> None:
    """Fewer demonstration episodes than --val-every: no held-out episode, refused before training."""
    from common.codec import save_codec
    from trainer.train_vla import main

    demos = tmp_path / "demos.hdf5"
    _write_demos(demos, episodes=3, steps=9)
    save_codec(RFSQCodec(), tmp_path / "codec")
    with pytest.raises(ValueError, match="none is held out with --val-every 10"):
        main(["--demos", str(demos), "--codec-dir", str(tmp_path / "codec"), "--image-size", "16",
              "--out-dir", str(tmp_path / "vla"), "--steps", "1"])  # fmt: skip
