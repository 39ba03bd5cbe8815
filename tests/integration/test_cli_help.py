"""Every command has --help, and bad configuration values are usage errors, not tracebacks."""

from __future__ import annotations

import importlib

import pytest

from tests.init_helpers import record_fresh_start

COMMANDS = [
    "producer.libero_setup",
    "tools.env_bench",
    "tools.expert_eval",
    "producer.demos",
    "producer.dagger",
    "tools.fresh_probe",
    "tools.libero_bundle",
    "tools.takeover_check",
    "tools.policy_record",
    "tools.vla_latency",
    "tools.run_pack",
    "tools.failure_probe",
    "tools.archive_killtest",
    "tools.strict_check",
    "tools.render_profile",
    "producer.dataset_info",
    "producer.produce",
    "trainer.train_codec",
    "trainer.train_vla",
    "trainer.pack_onpolicy",
    "trainer.online",
    "trainer.retrain",
    "trainer.keys",
    "evaluator.rollout",
    "evaluator.eval",
    "trainer.fit_draft",
    "evaluator.bench_gpu",
    "evaluator.report",
    "evaluator.demo",
    "evaluator.lossless_bound",
    "evaluator.bench_7b",
    "common.layer_info",
]


@pytest.mark.parametrize("module", COMMANDS)
def test_help(module: str, capsys) -> None:
    main = importlib.import_module(module).main
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "usage:" in out and "--" in out


def test_demo_rejects_bad_values(capsys) -> None:
    from evaluator.demo import main

    for argv in (["--train-minutes", "0"], ["--eval-arms", "nonsense"], ["--producers", "0"]):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 2
        assert "error:" in capsys.readouterr().err


def test_initial_state_splits_and_missing_archives_are_usage_errors(tmp_path, capsys) -> None:
    from trainer.fit_draft import main as fit_main
    from trainer.pack_onpolicy import main as pack_main

    demos = tmp_path / "d.hdf5"
    demos.write_bytes(b"")
    for main, argv, msg in (
        (
            fit_main,
            ["--demos", str(demos), "--out", str(tmp_path / "x.pt"), "--val-inits", "9-3"],
            "initial state",
        ),
        (
            fit_main,
            ["--demos", str(demos), "--out", str(tmp_path / "x.pt"), "--observations", "nope.npz"],
            "does not exist",
        ),
        (
            pack_main,
            ["--archives", str(tmp_path / "missing.hdf5"), "--out", str(tmp_path / "o.npz")],
            "does not exist",
        ),
    ):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 2
        assert msg in capsys.readouterr().err


def test_codec_training_rejects_missing_file(tmp_path, capsys) -> None:
    from trainer.train_codec import main

    with pytest.raises(SystemExit) as exc:
        main(["--demos", str(tmp_path / "missing.hdf5")])
    assert exc.value.code == 2
    assert "not found" in capsys.readouterr().err


def test_codec_training_end_to_end(tmp_path) -> None:
    """A real (tiny) run of the codec training command on an HDF5 file in the robomimic layout."""
    import h5py
    import numpy as np

    from common.codec import load_codec
    from trainer.train_codec import main

    rng = np.random.default_rng(0)
    demos = tmp_path / "demos.hdf5"
    with h5py.File(demos, "w") as f:
        for i in range(4):
            t = np.linspace(0, 3, 40)[:, None]
            arm = np.sin(t * rng.uniform(1, 3, (1, 6)) + rng.uniform(0, 6, (1, 6))) * 0.7
            grip = np.sign(np.sin(t + i))
            f.create_dataset(f"data/demo_{i}/actions", data=np.concatenate([arm, grip], 1).astype(np.float32))
            record_fresh_start(f[f"data/demo_{i}"], i)
    main(["--demos", str(demos), "--out-dir", str(tmp_path / "codec"), "--steps", "30", "--val-every", "2"])
    codec = load_codec(tmp_path / "codec")
    assert (tmp_path / "codec" / "codec_training.png").is_file()
    import json

    meta = json.loads((tmp_path / "codec" / "codec.json").read_text())
    assert len(meta["metrics"]["validation"]["mse_norm"]) == 8
    assert meta["sha256"] == codec.sha256


def test_every_console_script_names_a_main():
    """pyproject's [project.scripts]: each rsd-* command points at a module whose main exists."""
    import importlib
    from pathlib import Path

    import tomllib

    scripts = tomllib.loads((Path(__file__).resolve().parents[2] / "pyproject.toml").read_text())["project"][
        "scripts"
    ]
    assert len(scripts) >= 20
    for name, target in scripts.items():
        module, func = target.split(":")
        assert name.startswith("rsd-") and callable(getattr(importlib.import_module(module), func)), name
