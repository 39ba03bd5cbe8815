"""RFSQ codec: shapes, round trip, every layer informative, error falling with k, save/load."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from common.codec import RFSQCodec, action_chunks, code_entropy, load_codec, reconstruction_report, save_codec
from common.shapes import RFSQShape


def smooth_chunks(n: int, seed: int = 0) -> torch.Tensor:
    """Smooth synthetic chunks [n, 8, 7]: sinusoids per dim, binary gripper."""
    g = torch.Generator().manual_seed(seed)
    t = torch.linspace(0, 1, 8)[None, :, None]  # [1, T, 1]
    freq = torch.rand(n, 1, 6, generator=g) * 3
    phase = torch.rand(n, 1, 6, generator=g) * 2 * math.pi
    arm = 0.8 * torch.sin(2 * t * freq + phase)  # [n, T, 6]
    grip = torch.where(torch.rand(n, 1, 1, generator=g) < 0.5, -1.0, 1.0).expand(n, 8, 1)
    return torch.cat([arm, grip], dim=-1)


@pytest.fixture(scope="module")
def trained_codec() -> tuple[RFSQCodec, torch.Tensor]:
    torch.manual_seed(0)
    data = smooth_chunks(1024)
    codec = RFSQCodec()
    codec.set_normalization(data[:, 0])
    opt = torch.optim.AdamW(codec.parameters(), lr=3e-3)
    codec.train()
    for _ in range(400):
        loss = codec.loss(data[torch.randint(0, len(data), (256,))])
        opt.zero_grad()
        loss.backward()
        opt.step()
    codec.eval()
    return codec, smooth_chunks(256, seed=1)


def test_scales_follow_design() -> None:
    codec = RFSQCodec()
    assert torch.allclose(codec.scales, torch.tensor([6.0**-l for l in range(8)]))


def test_shapes_and_code_range() -> None:
    codec = RFSQCodec()
    codes = codec.encode(smooth_chunks(5))
    assert codes.shape == (5, 8, 16, 8) and codes.dtype == torch.long
    assert int(codes.min()) >= 0 and int(codes.max()) <= 6
    assert codec.decode(codes).shape == (5, 8, 7)
    assert codec.decode(codes[..., :3]).shape == (5, 8, 7)


def test_quantization_round_trip_is_exact_on_grid_latents() -> None:
    """A latent that is a sum of grid levels is encoded to exactly those codes and decoded back."""
    codec = RFSQCodec()
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 7, (4, 8, 16, 8), generator=g)
    # Levels 1..5 only: then the tail of later layers stays under half a grid step of every layer
    # (sum_{m>l} s_m * 2/3 < 0.8 s_{l+1}), so the decomposition is unique (no rounding ties).
    codes = codes.clamp(1, 5)
    z = codec.codes_to_latent(codes)
    _, recovered = codec.quantize(z)
    assert torch.equal(recovered, codes)


def test_round_trip_with_trained_codec(trained_codec) -> None:
    codec, data = trained_codec
    rec = codec.decode(codec.encode(data))
    assert (rec[..., :6] - data[..., :6]).abs().mean() < 0.05
    assert (torch.sign(rec[..., 6]) == torch.sign(data[..., 6])).float().mean() > 0.99


def test_every_layer_varies_and_error_falls_with_k(trained_codec) -> None:
    codec, data = trained_codec
    codes = codec.encode(data)
    for layer in range(8):
        assert codes[..., layer].unique().numel() > 1, f"layer {layer} is constant"
    entropy = code_entropy(codes, 7)
    assert min(entropy) > 0.5, entropy
    report = reconstruction_report(codec, data)
    mse = report["mse_norm"]
    assert mse[0] > mse[1] > mse[2], mse
    assert mse[-1] <= mse[2] + 1e-9
    assert mse[-1] < 0.1 * mse[0]


def test_one_fixed_grid_would_collapse_later_layers() -> None:
    """The reason for per-layer scales: with s_l = 1 for all l, layers after the first are constant."""
    codec = RFSQCodec()
    codec.scales.fill_(1.0)
    codes = codec.encode(smooth_chunks(64))
    assert all(codes[..., l].unique().numel() == 1 for l in range(1, 8))


def test_straight_through_gradients_reach_encoder() -> None:
    codec = RFSQCodec()
    codec.train()
    codec.loss(smooth_chunks(16)).backward()
    assert codec.encoder[0].weight.grad is not None
    assert codec.encoder[0].weight.grad.abs().sum() > 0


def test_save_load_identical(tmp_path, trained_codec) -> None:
    codec, data = trained_codec
    save_codec(codec, tmp_path / "codec", extra={"note": "test"})
    loaded = load_codec(tmp_path / "codec")
    assert loaded.sha256 == codec.sha256
    assert torch.equal(loaded.encode(data), codec.encode(data))
    assert torch.allclose(loaded.action_low, codec.action_low)


def test_bad_inputs_raise(tmp_path) -> None:
    codec = RFSQCodec()
    with pytest.raises(ValueError, match="shape"):
        codec.encode(torch.zeros(2, 7, 7))
    with pytest.raises(ValueError, match="NaN"):
        codec.encode(torch.full((1, 8, 7), float("nan")))
    with pytest.raises(ValueError, match="code ids"):
        codec.decode(torch.full((1, 8, 16, 8), 7))
    with pytest.raises(FileNotFoundError, match="no codec"):
        load_codec(tmp_path / "missing")
    with pytest.raises(ValueError):
        RFSQShape(grid_size=6)


def test_action_chunks_pad_with_last_action() -> None:
    a = np.arange(10 * 7, dtype=np.float32).reshape(10, 7)
    chunks = action_chunks(a, 8)
    assert chunks.shape == (10, 8, 7)
    assert np.array_equal(chunks[0], a[:8])
    assert np.array_equal(chunks[-1], np.repeat(a[-1:], 8, axis=0))
