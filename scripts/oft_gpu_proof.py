"""GPU proof of the OpenVLA-OFT producer path with the real 7B architecture and RANDOM weights.

    python scripts/oft_gpu_proof.py --write-stubs /tmp/oft_stubs          # once, see below
    PYTHONPATH=... python scripts/oft_gpu_proof.py --replay obs224.npz --tokenizer tokenizer.model \
        --run-dir /tmp/oft_run --samples 448 --out $OUT

What runs: ``common.vla.oft_random.build_random_oft("7b")`` (openvla-oft's OpenVLAForActionPrediction
with the released checkpoints' configuration, L1RegressionActionHead and ProprioProjector, random bf16
weights, FABRICATED norm_stats), wrapped in the backend's own :class:`OpenVLAOFTPolicy` (its ``act``, hence
``predict_action``, exactly as the producer calls it), driven by the producer's own :class:`Producer`
over recorded LIBERO observations (``--replay-obs``), streaming over ZeroMQ on loopback to a
``trainer.online`` process that trains the seed draft (input 4096, hidden 512), archives and checkpoints.

``--write-stubs DIR`` writes import stubs for tensorflow, tensorflow_datasets, tensorflow_graphics, dlimp
and wandb: openvla-oft imports them at package import time for training and data loading only, and no
TensorFlow matching OFT's pin installs on a Python 3.12 machine without network. Any call of a stub
raises, except the one call openvla-oft makes at import (``tf.config.set_visible_devices([], "GPU")``); the replayed images were prepared with OFT's real TensorFlow preprocessing on the machine that
recorded them (``python -m producer.replay prepare``). A random-weight model is no trained policy: the
figures here are speed and memory, not success.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

STUBBED = ("tensorflow", "tensorflow_datasets", "tensorflow_graphics", "dlimp", "wandb")
STUB_SOURCE = '''"""Import stub written by scripts/oft_gpu_proof.py: attribute access works, any call raises."""
import sys, types

ALLOWED = {"tensorflow.config.set_visible_devices"}  # prismatic/vla/datasets/rlds/dataset.py, at import


class _Stub:
    def __init__(self, name):
        self._name = name

    def __getattr__(self, attr):
        if attr.startswith("__"):
            raise AttributeError(attr)
        return _Stub(self._name + "." + attr)

    def __call__(self, *args, **kwargs):
        if self._name in ALLOWED:  # module-level calls made while openvla-oft is imported
            return None
        raise RuntimeError(self._name + " is an import stub: this code path needs the real package")

    def __mro_entries__(self, bases):
        return (object,)


class _StubModule(types.ModuleType):
    __path__ = []

    def __getattr__(self, attr):
        if attr.startswith("__"):
            raise AttributeError(attr)
        return _Stub(self.__name__ + "." + attr)


sys.modules[__name__].__class__ = _StubModule
'''


def write_stubs(root: Path) -> None:
    for name in STUBBED:
        pkg = root / name
        pkg.mkdir(parents=True, exist_ok=True)
        (pkg / "__init__.py").write_text(STUB_SOURCE)
    sub = root / "tensorflow_graphics" / "geometry" / "transformation"
    sub.mkdir(parents=True, exist_ok=True)
    (root / "tensorflow_graphics" / "geometry" / "__init__.py").write_text(STUB_SOURCE)
    (sub / "__init__.py").write_text(STUB_SOURCE)


def start_trainer(args: argparse.Namespace, endpoint: str) -> subprocess.Popen:
    """trainer.online in the machine's own Python environment (not the OFT one), as a separate process."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *args.trainer_path])
    cmd = [
        args.trainer_python, "-m", "trainer.online", "--endpoint", endpoint, "--run-dir", str(args.run_dir),
        "--input-dim", str(args.input_dim), "--draft-hidden-dim", "512", "--device", args.trainer_device,
        "--exit-after-byes", "1",
        "--min-size", "32", "--warmup-steps", "50", "--val-interval", "100", "--samples-per-insert", "8",
        "--error-buffer", "200", "--valid-every", "8",
    ]  # fmt: skip
    log = open(args.run_dir.parent / "trainer.log", "w")  # noqa: SIM115 - open for the process' lifetime
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)


def position_check(policy, obs) -> dict:
    """The streamed vector is the final-norm output at the last prompt token of the full sequence."""
    seen = []
    vla = policy.vla
    hook = vla.language_model.model.norm.register_forward_hook(lambda m, i, o: seen.append(o.detach()))
    try:
        out = policy.act([obs])[0]
    finally:
        hook.remove()
    ids = policy.processor.tokenizer(
        f"In: What action should the robot take to {obs.instruction.lower()}?\nOut:"
    )
    P = len(ids["input_ids"]) + (ids["input_ids"][-1] != 29871)
    patches = 2 * vla.vision_backbone.get_num_patches() + 1
    seq = seen[0][0].float().cpu().numpy()
    idx = patches + P - 1
    return {
        "sequence_length": int(seq.shape[0]),
        "expected_length": int(P + patches + 57),
        "prompt_tokens_P": int(P),
        "last_prompt_index": int(idx),
        "hidden_equals_norm_output_there": bool(np.array_equal(out.hidden, seq[idx])),
        "hidden_differs_from_neighbours": bool(
            not np.allclose(out.hidden, seq[idx - 1]) and not np.allclose(out.hidden, seq[idx + 1])
        ),
        "hidden_shape": list(out.hidden.shape),
        "codes_shape": list(out.codes.shape),
        "actions_shape": list(out.actions.shape),
    }


class TimedPolicy:
    """Forwards to the backend policy and records the wall time of each act call."""

    def __init__(self, policy):
        self.policy, self.times = policy, []

    def __getattr__(self, name):
        return getattr(self.policy, name)

    def act(self, observations):
        import torch

        t0 = time.perf_counter()
        out = self.policy.act(observations)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.times.append(time.perf_counter() - t0)
        return out


def run(args: argparse.Namespace) -> dict:
    import torch

    from common.codec import load_codec
    from common.vla.oft_random import UNNORM_KEY, build_random_oft, make_processor
    from common.vla.openvla_oft import (
        OpenVLAOFTPolicy,
        check_bidirectional_attention,
        check_constants,
        fit_codec_to_stats,
        prepared_image_prep,
    )
    from producer.produce import Producer, ProducerConfig
    from producer.replay import load_replay

    check_bidirectional_attention()
    check_constants()
    args.run_dir.mkdir(parents=True, exist_ok=True)
    trainer = start_trainer(args, args.endpoint)
    t0 = time.perf_counter()
    vla, head, projector = build_random_oft(args.size, device=args.device)
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    build_s = time.perf_counter() - t0
    codec = load_codec(args.codec_dir)
    bounds = fit_codec_to_stats(codec, vla.norm_stats[UNNORM_KEY]["action"])
    policy = OpenVLAOFTPolicy(
        vla, make_processor(args.tokenizer), head, projector, codec, f"random-{args.size}-fabricated-stats",
        UNNORM_KEY, args.device, prepared_image_prep,
    )  # fmt: skip
    params = sum(p.numel() for m in (vla, head, projector) for p in m.parameters())
    data = load_replay(args.replay)
    tasks = sorted(set(data["task_id"].tolist()))
    frames = len(data["proprio"]) / len(tasks)
    from producer.replay import ReplayEnv

    check = position_check(policy, ReplayEnv(data, tasks[0]).reset(0))
    timed = TimedPolicy(policy)
    cfg = ProducerConfig(
        endpoint=args.endpoint, producer_id="gpu-oft-proof", vla="openvla-oft", replay_obs=args.replay,
        tasks=tasks, episodes_per_task=math.ceil(args.samples / (frames * len(tasks))), device=args.device,
        flush_timeout_s=120.0,
    )  # fmt: skip
    cuda = args.device.startswith("cuda")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    summary = Producer(cfg, policy=timed).run()
    rc = trainer.wait(timeout=300)
    smi = (
        subprocess.run(
            ["nvidia-smi", "--query-gpu=name,memory.used,memory.total", "--format=csv,noheader"],
            capture_output=True, text=True,
        ).stdout.strip()
        if cuda else ""
    )  # fmt: skip
    times = np.asarray(timed.times[5:] or timed.times)
    return {
        "machine_gpu": torch.cuda.get_device_name(0) if cuda else "cpu",
        "torch": torch.__version__,
        "params_total": params,
        "build_s": round(build_s, 1),
        "position_check": check,
        "codec_bounds": bounds,
        "producer": {
            k: summary[k] for k in ("samples_sent", "episodes", "elapsed_s", "samples_per_s", "unacked")
        },
        "act_ms": {"p50": 1e3 * float(np.median(times)), "mean": 1e3 * float(times.mean()), "n": len(times)},
        "gpu_memory_GiB": {
            "producer_max_allocated": torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0,
            "producer_max_reserved": torch.cuda.max_memory_reserved() / 2**30 if cuda else 0.0,
            "nvidia_smi_at_end": smi,
        },
        "trainer_exit_code": rc,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="scripts/oft_gpu_proof.py", description=__doc__.split("\n\n")[0], allow_abbrev=False
    )
    parser.add_argument("--write-stubs", type=Path, help="write the import stubs into this folder and exit")
    parser.add_argument("--replay", type=Path, help="prepared recording (producer.replay prepare)")
    parser.add_argument("--tokenizer", type=Path, help="Llama-2 tokenizer.model")
    parser.add_argument("--codec-dir", type=Path, default=REPO / "assets" / "codec", help="RFSQ codec")
    parser.add_argument("--run-dir", type=Path, default=Path("/tmp/oft_proof/run"), help="trainer run dir")
    parser.add_argument("--samples", type=int, default=448, help="samples to stream (at least)")
    parser.add_argument("--endpoint", default="tcp://127.0.0.1:5599", help="loopback endpoint")
    parser.add_argument("--trainer-python", default=sys.executable, help="python of the trainer (.venv)")
    parser.add_argument("--trainer-path", nargs="*", default=[], help="PYTHONPATH entries of the trainer")
    parser.add_argument(
        "--size", choices=["7b", "tiny"], default="7b", help="tiny: a CPU dry run of the flow"
    )
    parser.add_argument("--device", default="cuda:0", help="device of the OFT model")
    parser.add_argument("--trainer-device", default="cuda", help="device of the trainer")
    parser.add_argument("--out", type=Path, default=Path("."), help="where results.json goes")
    args = parser.parse_args(argv)
    args.input_dim = 4096 if args.size == "7b" else 64  # the draft's input: the LLM width
    if args.write_stubs:
        write_stubs(args.write_stubs)
        return 0
    if args.replay is None or args.tokenizer is None:
        parser.error("--replay and --tokenizer are required")
    result = run(args)
    summary_file = args.run_dir / "summary.json"
    if summary_file.is_file():
        result["trainer_summary"] = json.loads(summary_file.read_text())
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(result, indent=2, default=str))
    print(json.dumps({k: v for k, v in result.items() if k != "trainer_summary"}, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
