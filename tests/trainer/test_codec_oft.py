"""`make train-codec FROM_ARCHIVE=… NORM_STATS=…`: a codec fit on a streamed archive's own chunks."""

from __future__ import annotations

import json

import numpy as np
import pytest

from common.archive import ArchiveWriter, EpisodeRecord
from common.codec import load_codec
from common.shapes import DEFAULT_SHAPE as SH
from trainer.train_codec import CodecTrainConfig, train


def write_archive(path, episodes: int = 4, n: int = 6) -> None:
    rng = np.random.default_rng(0)
    w = ArchiveWriter(path, SH)
    for e in range(episodes):
        ep = EpisodeRecord("p", "s", "libero_spatial", 0, e, "train", status="failed")
        for i in range(n):
            a = rng.uniform(-0.5, 0.5, SH.chunk_shape).astype(np.float32)
            a[:, -1] = np.sign(rng.uniform(-1, 1, SH.chunk_len))  # binarized gripper
            a[0, 0] = 0.9 if i == 0 else a[0, 0]  # one value per episode beyond q99 of dim 0
            ep.hidden.append(np.zeros(8, np.float32))
            ep.codes.append(np.zeros(SH.codes_shape, np.uint8))
            ep.actions.append(a)
            ep.steps.append(8 * i)
            ep.seqs.append(e * n + i)
            ep.sent_at.append(0.0)
            ep.received_at.append(0.0)
        w.write_episode(ep)


def test_codec_from_archive_takes_the_checkpoint_statistics(tmp_path):
    archive = tmp_path / "archive.hdf5"
    write_archive(archive)
    q01, q99 = [-0.5] * 6 + [0.0], [0.5] * 6 + [1.0]
    stats = {"libero_spatial_no_noops": {"action": {"q01": q01, "q99": q99, "mask": [True] * 6 + [False]}}}
    (tmp_path / "dataset_statistics.json").write_text(json.dumps(stats))
    cfg = CodecTrainConfig(
        archives=[archive], norm_stats=tmp_path / "dataset_statistics.json", out_dir=tmp_path / "codec",
        steps=20, batch_size=16, val_every=2, threads=1,
    )  # fmt: skip
    train(cfg)
    codec = load_codec(tmp_path / "codec")
    assert codec.action_low.tolist() == pytest.approx([-0.5] * 6 + [-1.0])
    assert codec.action_high.tolist() == pytest.approx([0.5] * 6 + [1.0])
    meta = json.loads((tmp_path / "codec" / "codec.json").read_text())["trained_on"]
    assert meta["normalization"].endswith("dataset_statistics.json")
    frac = meta["clamped_fraction_per_dim"]  # 2 train episodes x 1 of 48 values of dim 0
    assert frac[0] == pytest.approx(1 / 48) and frac[1:] == [0.0] * 6


def test_archive_and_demos_are_exclusive_and_the_key_must_exist(tmp_path):
    archive = tmp_path / "a.hdf5"
    write_archive(archive, episodes=2)
    with pytest.raises(ValueError, match="either --demos or --archives"):
        CodecTrainConfig(archives=[archive], demos=[archive])
    (tmp_path / "s.json").write_text(json.dumps({"libero_10_no_noops": {"action": {}}}))
    cfg = CodecTrainConfig(
        archives=[archive], norm_stats=tmp_path / "s.json", steps=1, out_dir=tmp_path / "c"
    )
    with pytest.raises(ValueError, match="no action statistics for 'libero_spatial_no_noops'.*libero_10"):
        train(cfg)
