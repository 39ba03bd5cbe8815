"""The OpenVLA-OFT backend: clear refusals where it cannot run, and the real OFT classes where they exist.

The refusal tests run everywhere (CI: no GPU, no openvla-oft). The tests marked ``oft`` need the openvla-oft
package and its transformers fork (.venv-oft, or the GPU machine's bundle): they skip cleanly elsewhere.
docs/oft.md records where they ran.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from numpy.testing import assert_array_equal  # before openvla-oft patches json (json_numpy.patch)

from common.codec import load_codec
from common.policy import Observation
from common.vla import DEFAULT_CODEC_DIR
from common.vla.openvla_oft import (
    OpenVLAOFTUnavailable,
    check_checkpoint,
    check_requirements,
    fit_codec_to_stats,
    load_openvla_oft,
    prepared_image_prep,
    resolve_unnorm_key,
)
from tests.stream_helpers import REPO, env

INSTRUCTION = "pick up the black bowl between the plate and the ramekin and place it on the plate"


def test_cpu_device_is_refused_with_a_clear_message():
    with pytest.raises(OpenVLAOFTUnavailable, match="CUDA GPU.*--device cuda:0"):
        load_openvla_oft(device="cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_cpu_only_torch_or_missing_gpu_is_named():
    msg = "CPU-only build.*make venv-oft" if torch.version.cuda is None else "torch sees none"
    with pytest.raises(OpenVLAOFTUnavailable, match=msg):
        check_requirements("cuda:0")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_producer_exits_with_the_reason(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "producer.produce", "--vla", "openvla-oft", "--endpoint", "tcp://127.0.0.1:1"],
        cwd=REPO,
        env=env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    fix = "make venv-oft" if torch.version.cuda is None else "torch sees none"  # .venv / .venv-oft
    assert "OpenVLAOFTUnavailable" in proc.stderr and fix in proc.stderr
    assert "Traceback" not in proc.stderr  # a message, not a crash


def test_missing_and_partial_checkpoints_name_the_files_and_the_download(tmp_path):
    with pytest.raises(OpenVLAOFTUnavailable, match="does not exist.*huggingface-cli download"):
        check_checkpoint(str(tmp_path / "nowhere"))
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    for name in ("config.json", "preprocessor_config.json", "tokenizer_config.json"):
        (ckpt / name).write_text("{}")
    (ckpt / "model.safetensors.index.json").write_text(
        json.dumps(
            {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}
        )
    )
    (ckpt / "model-00001-of-00002.safetensors").write_bytes(b"")
    (ckpt / "action_head--150000_checkpoint.pt").write_bytes(b"")
    with pytest.raises(OpenVLAOFTUnavailable) as err:
        check_checkpoint(str(ckpt))
    text = str(err.value)
    assert "model-00002-of-00002.safetensors" in text and "proprio_projector--<step>_checkpoint.pt" in text
    assert "model-00001" not in text and "huggingface-cli download" in text
    (ckpt / "model-00002-of-00002.safetensors").write_bytes(b"")
    (ckpt / "proprio_projector--150000_checkpoint.pt").write_bytes(b"")
    check_checkpoint(str(ckpt))  # complete: no error


def test_wrong_unnorm_key_lists_what_the_checkpoint_has():
    stats = {"libero_object_no_noops": {}}
    with pytest.raises(
        OpenVLAOFTUnavailable, match=r"no statistics for libero_spatial_no_noops.*libero_object"
    ):
        resolve_unnorm_key(stats, "libero_spatial", "ckpt")
    with pytest.raises(OpenVLAOFTUnavailable, match="pass --suite one of"):
        resolve_unnorm_key(stats, "libero_90", "ckpt")
    assert resolve_unnorm_key(stats, "libero_object", "ckpt") == "libero_object_no_noops"


def test_codec_takes_the_checkpoints_q01_q99_and_keeps_the_gripper_range():
    codec = load_codec(DEFAULT_CODEC_DIR)
    sha = codec.sha256
    q01 = [-0.7, -0.6, -0.9, -0.1, -0.2, -0.3, 0.0]
    q99 = [0.9, 0.8, 0.9, 0.1, 0.2, 0.3, 1.0]
    bounds = fit_codec_to_stats(codec, {"q01": q01, "q99": q99, "mask": [True] * 6 + [False]})
    assert bounds["low"] == pytest.approx(q01[:6] + [-1.0]) and bounds["high"] == pytest.approx(
        q99[:6] + [1.0]
    )
    assert codec.action_low.tolist() == pytest.approx(bounds["low"]) and codec.sha256 != sha
    chunk = torch.zeros(1, 8, 7)
    chunk[0, 0, 0] = 2.0  # beyond q99 of dim 0
    assert codec.normalize(chunk)[0, 0, 0] == 1.0  # clamped
    with pytest.raises(OpenVLAOFTUnavailable, match="7 values"):
        fit_codec_to_stats(codec, {"q01": [0.0] * 6, "q99": [1.0] * 6})


# ------------------------------------------------------------------ the real OFT classes (tiny, random)
def _need_oft():
    pytest.importorskip(
        "prismatic.extern.hf.modeling_prismatic", reason="openvla-oft not installed (.venv-oft; docs/oft.md)"
    )


@pytest.fixture(scope="module")
def tiny_policy():
    _need_oft()
    from common.vla.oft_random import UNNORM_KEY, build_random_oft, make_processor
    from common.vla.openvla_oft import OpenVLAOFTPolicy

    vla, head, projector = build_random_oft("tiny", device="cpu")
    codec = load_codec(DEFAULT_CODEC_DIR)
    fit_codec_to_stats(codec, vla.norm_stats[UNNORM_KEY]["action"])
    return OpenVLAOFTPolicy(
        vla, make_processor(), head, projector, codec, "tiny-random", UNNORM_KEY, "cpu", prepared_image_prep
    )


def _obs(seed: int, size: int = 224) -> Observation:
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 256, (2, size, size, 3), dtype=np.uint8)
    return Observation(img[0], img[1], rng.uniform(-0.2, 0.2, 8).astype(np.float32), INSTRUCTION)


def test_fork_attention_is_bidirectional():
    _need_oft()
    from common.vla.openvla_oft import check_bidirectional_attention

    check_bidirectional_attention()  # raises on a stock transformers


def test_act_returns_the_last_prompt_tokens_hidden_state(tiny_policy):
    vla, tok = tiny_policy.vla, tiny_policy.processor.tokenizer
    seen = []
    hook = vla.language_model.model.norm.register_forward_hook(lambda m, i, o: seen.append(o.detach()))
    try:
        out = tiny_policy.act([_obs(0)])[0]
    finally:
        hook.remove()
    prompt = f"In: What action should the robot take to {INSTRUCTION}?\nOut:"
    ids = tok(prompt)["input_ids"]
    P = len(ids) + (ids[-1] != 29871)  # predict_action appends the empty token 29871
    patches = 2 * vla.vision_backbone.get_num_patches() + 1  # two images + the proprio token
    (seq,) = seen  # one forward pass: [1, L, D] after the final norm
    assert seq.shape == (1, P + patches + 57, vla.llm_dim)  # BOS, patches, prompt, 56 action slots, stop
    last_prompt = patches + P - 1
    assert_array_equal(out.hidden, seq[0, last_prompt].float().numpy())
    for other in (last_prompt - 1, last_prompt + 1):
        assert not np.allclose(out.hidden, seq[0, other].float().numpy())
    D, shape = vla.llm_dim, tiny_policy.shape
    assert out.hidden.shape == (D,) and out.hidden.dtype == np.float32 and tiny_policy.hidden_dim == D
    assert out.actions.shape == (8, 7) and set(np.unique(out.actions[:, -1])) <= {-1.0, 0.0, 1.0}
    assert out.codes.shape == (shape.chunk_len, shape.action_hidden_dim, shape.num_layers)
    assert out.codes.dtype == np.uint8 and out.codes.max() < shape.grid_size


def test_other_observations_give_other_hidden_states(tiny_policy):
    a, b = tiny_policy.act([_obs(1), _obs(2)])
    assert not np.allclose(a.hidden, b.hidden)


def test_policy_refuses_one_image_mode(tiny_policy):
    from common.vla.openvla_oft import OpenVLAOFTPolicy

    p = tiny_policy
    p.vla.vision_backbone.set_num_images_in_input(1)
    try:
        with pytest.raises(ValueError, match="set_num_images_in_input"):
            OpenVLAOFTPolicy(p.vla, p.processor, p.action_head, p.proprio_projector, p.codec, "x", "k", "cpu")
    finally:
        p.vla.vision_backbone.set_num_images_in_input(2)


def test_oft_image_prep_gives_two_224_px_crops():
    _need_oft()
    if importlib.util.find_spec("tensorflow") is None:
        pytest.skip("tensorflow not installed")
    import tensorflow as tf

    if not isinstance(getattr(tf, "__version__", None), str):
        pytest.skip("tensorflow here is an import stub (GPU bundle): OFT's image preprocessing cannot run")
    from common.vla.openvla_oft import oft_image_prep

    images = oft_image_prep(_obs(3, size=256))
    assert [im.size for im in images] == [(224, 224), (224, 224)]
