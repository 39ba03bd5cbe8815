"""The one registry of VLA backends (common/vla/registry.py): every backend, every command, clear errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from common.policy import LayerwisePolicy, Observation
from common.vla import BACKENDS, Backend, layerwise_backends, load_layerwise_policy, load_policy
from common.vla.embedded import EmbeddedVLAPolicy
from common.vla.openvla_oft import OpenVLAOFTUnavailable
from common.vla.twin import TwinPolicy, tiny_config
from evaluator import eval as ev
from evaluator import fleet_arms


def obs() -> Observation:
    img = np.zeros((32, 32, 3), np.uint8)
    return Observation(img, img, np.zeros(8, np.float32), "put the bowl on the plate")


def test_every_backend_is_registered_with_its_kind() -> None:
    assert set(BACKENDS) == {"embedded", "openvla-oft", "twin", "twin-tiny"}
    assert layerwise_backends() == ("embedded", "twin", "twin-tiny")
    assert [n for n, b in BACKENDS.items() if b.trained] == ["embedded", "openvla-oft"]


def test_the_twins_load_through_the_registry() -> None:
    tiny = load_policy("twin-tiny", decode_layers=4)
    assert isinstance(tiny, TwinPolicy) and tiny.cfg == tiny_config() and tiny.decode_layers == 4
    assert tiny.act([obs()])[0].actions.shape == (8, 7)
    seeded = load_policy("twin-tiny", seed=3)
    assert "seed3" in seeded.backbone_id and not torch.equal(seeded.model.head.weight, tiny.model.head.weight)
    small = load_policy("twin", config=tiny_config(text_len=15))  # the 7B entry with a given config
    assert small.cfg.prefix_len == tiny.cfg.prefix_len + 8
    with pytest.raises(ValueError, match="prefix_tokens must be 280 or 600"):
        load_policy("twin", prefix_tokens=100)


def test_embedded_backend_and_its_random_baselines() -> None:
    policy = load_layerwise_policy("embedded")
    assert isinstance(policy, EmbeddedVLAPolicy) and policy.backbone_id.startswith("embedded-vla@")
    assert "random" not in policy.backbone_id
    rand = load_policy("embedded", random_weights=True, seed=1)
    assert rand.backbone_id == "embedded-vla@random-seed1"
    plumbing = load_policy(
        "embedded", weights_dir="/nonexistent", codec_dir="/nonexistent", allow_random=True
    )
    assert plumbing.backbone_id == "embedded-vla@random-codec-random"
    with pytest.raises(FileNotFoundError, match="no trained embedded VLA"):  # never random unless asked
        load_policy("embedded", weights_dir="/nonexistent")


def test_bad_requests_are_clear_errors() -> None:
    with pytest.raises(ValueError, match="unknown policy backend 'nope'; available: embedded, openvla-oft"):
        load_policy("nope")
    with pytest.raises(ValueError, match=r"'twin-tiny' takes no option \['weights_dir'\]; it takes"):
        load_policy("twin-tiny", weights_dir="somewhere")
    with pytest.raises(ValueError, match=r"'embedded' takes no option \['prefix_tokens'\]"):
        load_policy("embedded", prefix_tokens=600)
    with pytest.raises(ValueError, match="does not decode layer by layer"):  # refused before any loading
        load_layerwise_policy("openvla-oft")
    with pytest.raises(ValueError, match="does not decode layer by layer"):
        load_policy("openvla-oft", decode_layers=3)
    with pytest.raises(OpenVLAOFTUnavailable):  # the OFT stack is needed only here, and says how to get it
        load_policy("openvla-oft", device="cpu")


def test_commands_load_their_policies_from_the_registry(monkeypatch) -> None:
    """A backend added to the registry is usable by make eval and by the fleet's arms, nothing else to edit."""
    built: list[dict] = []

    def load_fake(device="cpu", seed=0, tiny=True):
        built.append({"device": device, "seed": seed})
        return TwinPolicy(tiny_config(), device=device, seed=seed)

    monkeypatch.setitem(BACKENDS, "fake", Backend("fake", load_fake, True, False, "a test backend"))
    assert isinstance(ev.load_eval_policy("fake", decode_layers=3), LayerwisePolicy)
    assert fleet_arms._policy("fake", None, None, False, False, 2, "cpu", True, 5).decode_layers == 5
    assert built == [{"device": "cpu", "seed": 0}, {"device": "cpu", "seed": 2}]
