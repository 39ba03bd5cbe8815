"""tools.run_pack: a run comes back from a node in small parts, whole and checked, or says what it lacks."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tools.run_pack import main, pack, unpack


def make_run(root: Path, codec: bool = True) -> Path:
    run = root / "runs" / "policy"
    for d in ("vla_a0", "vla_b0", "codec", "demos"):
        (run / d).mkdir(parents=True)
    rng = os.urandom
    (run / "vla_a0" / "model.safetensors").write_bytes(rng(2 << 20))  # a candidate not picked
    (run / "vla_b0" / "model.safetensors").write_bytes(rng(2 << 20))
    (run / "vla_b0" / "config.json").write_text('{"decode_layers": 3}')
    (run / "final").symlink_to("vla_b0")
    if codec:
        (run / "codec" / "codec.safetensors").write_bytes(rng(13_000))
    (run / "codec" / "codec.json").write_text("{}")
    (run / "draft.pt").write_bytes(rng(3 << 20))
    (run / "pipeline.log").write_text("01:22:44 pipeline: draft of vla_b0\n")
    (run / "demos" / "spatial-000.hdf5").write_bytes(rng(1000))
    (run / "dagger_b1.hdf5").write_bytes(rng(1000))
    (run / "eval_final.jsonl").write_text('{"type": "header"}\n')
    return run


def test_pack_and_unpack_round_trip(tmp_path: Path) -> None:
    run = make_run(tmp_path)
    m = pack(run, tmp_path / "out", part_mb=1)
    assert len(m["parts"]) >= 5 and all(p["size"] <= 1 << 20 for p in m["parts"])
    assert m["missing_required"] == [] and m["final"] == "vla_b0"
    assert {"demos/spatial-000.hdf5", "dagger_b1.hdf5", "vla_a0/model.safetensors"} <= set(m["left_out"])
    # the parts come back in two folders, as from two calls
    second = tmp_path / "second"
    second.mkdir()
    for p in m["parts"][::2]:
        (tmp_path / "out" / p["name"]).rename(second / p["name"])
    back = tmp_path / "back"
    unpack([tmp_path / "out", second], back)
    for rel in ("vla_b0/model.safetensors", "codec/codec.safetensors", "draft.pt", "eval_final.jsonl"):
        assert (back / rel).read_bytes() == (run / rel).read_bytes(), rel
    assert (back / "final").is_symlink() and (back / "final" / "model.safetensors").is_file()
    assert not (back / "vla_a0" / "model.safetensors").exists() and not (back / "demos").exists()


def test_a_run_without_its_codec_is_reported(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = make_run(tmp_path, codec=False)
    assert main(["pack", "--run", str(run), "--out", str(tmp_path / "out")]) == 1
    assert "codec/codec.safetensors" in capsys.readouterr().err
    assert (tmp_path / "out" / "MANIFEST.json").is_file()  # what exists is packed all the same


def test_corrupt_or_missing_parts_are_errors(tmp_path: Path) -> None:
    run = make_run(tmp_path)
    m = pack(run, tmp_path / "out", part_mb=1)
    part = tmp_path / "out" / m["parts"][1]["name"]
    data = bytearray(part.read_bytes())
    data[100] ^= 0xFF
    part.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="corrupt"):
        unpack([tmp_path / "out"], tmp_path / "back")
    part.unlink()
    with pytest.raises(FileNotFoundError, match="missing"):
        unpack([tmp_path / "out"], tmp_path / "back")
    with pytest.raises(SystemExit) as exc:  # a usage error, not a traceback
        main(["unpack", "--parts", str(tmp_path / "nowhere"), "--to", str(tmp_path / "back")])
    assert exc.value.code == 2


def test_a_run_stopped_with_both_candidates_packs_both_and_their_drafts(tmp_path: Path) -> None:
    run = make_run(tmp_path)
    (run / "final").unlink()
    (run / "draft.pt").rename(run / "draft_a.pt")
    (run / "vla_a0" / "config.json").write_text('{"decode_layers": 3}')
    log = "pipeline: draft of vla_a0\npipeline: candidates ready: vla_a0 and vla_b0\npipeline: done\n"
    (run / "pipeline.log").write_text(log)
    m = pack(run, tmp_path / "out", part_mb=1)
    assert m["final"] is None and m["missing_required"] == ["draft_b.pt"]
    assert {"vla_a0/model.safetensors", "vla_b0/model.safetensors", "draft_a.pt"} <= set(m["members"])
    (run / "draft_b.pt").write_bytes(os.urandom(3 << 20))
    (tmp_path / "out2").mkdir()
    assert pack(run, tmp_path / "out2", part_mb=1)["missing_required"] == []
    back = tmp_path / "back"
    unpack([tmp_path / "out2"], back)
    for rel in ("vla_a0/model.safetensors", "vla_b0/model.safetensors", "draft_a.pt", "draft_b.pt"):
        assert (back / rel).read_bytes() == (run / rel).read_bytes(), rel
