"""The one registry of VLA backends (docs/DESIGN.md §6.2): every command loads its policy here.

    from common.vla import load_policy
    policy = load_policy("embedded", device="cpu")                  # the shipped weights (assets/)
    policy = load_policy("twin-tiny", layerwise=True, decode_layers=4)
    policy = load_policy("openvla-oft", device="cuda:0", suite="libero_spatial")

| name | module | kind | weights |
|---|---|---|---|
| ``embedded`` | :mod:`common.vla.embedded` | layer-wise (an RSD target) | trained (``assets/embedded_vla``) |
| ``openvla-oft`` | :mod:`common.vla.openvla_oft` | chunk policy (a data source) | trained (hub id or folder) |
| ``twin`` | :mod:`common.vla.twin` | layer-wise | random: Llama-2-7B shapes, for timing only |
| ``twin-tiny`` | :mod:`common.vla.twin` | layer-wise | random: a CPU-test size, plumbing only |

:func:`load_policy` takes the options every backend shares (``device``, ``weights_dir``,
``codec_dir``, ``allow_random``, ``random_weights``, ``seed``, ``decode_layers``) and the backend's own
keyword options (``openvla-oft``: ``suite``, ``prepared_images``; the twins: ``prefix_tokens``,
``config``, ``dtype``, ``cuda_graphs``, ``sliced_attention``, ``prefix_flash``). An option left at its
default is not passed on; one the backend does not take is a ``ValueError`` naming the ones it does.
A trained backend never falls back to random weights: without weights it raises, unless the caller
passes ``allow_random=True`` (plumbing tests; its ``backbone_id`` then says ``random``).

Heavy optional dependencies stay inside their backend module and load only when it builds a policy
(the OFT stack in :mod:`common.vla.openvla_oft`, triton in :mod:`common.vla.twin_triton`).
Adding a backend is one entry in :data:`BACKENDS`.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from common.policy import ChunkPolicy, LayerwisePolicy
from common.vla.embedded import load_embedded
from common.vla.openvla_oft import DEFAULT_MODEL_ID, load_openvla_oft, oft_image_prep, prepared_image_prep
from common.vla.twin import load_twin


def _load_openvla_oft(
    device: str | torch.device = "cuda:0",
    weights_dir: str | Path | None = None,
    codec_dir: str | Path | None = None,
    suite: str = "libero_spatial",
    prepared_images: bool = False,
) -> ChunkPolicy:
    """OpenVLA-OFT from a hub id or folder (``weights_dir``; default: the LIBERO-spatial checkpoint).

    prepared_images: the observations already hold OFT's 224 px model inputs (recorded replays)."""
    return load_openvla_oft(
        str(weights_dir or DEFAULT_MODEL_ID), device=str(device), codec_dir=codec_dir, suite=suite,
        image_prep=prepared_image_prep if prepared_images else oft_image_prep,
    )  # fmt: skip


@dataclass(frozen=True)
class Backend:
    """One entry of the registry."""

    name: str
    load: Callable[..., ChunkPolicy]
    layerwise: bool  # decodes RFSQ layers block by block (a LayerwisePolicy: RSD can target it)
    trained: bool  # its weights come from training (the twins' are random: timing and plumbing only)
    summary: str


BACKENDS: dict[str, Backend] = {
    b.name: b
    for b in (
        Backend("embedded", load_embedded, True, True, "the small VLA trained in this project (CPU)"),
        Backend("openvla-oft", _load_openvla_oft, False, True, "OpenVLA-OFT 7B, a data source (GPU, .venv-oft)"),
        Backend("twin", load_twin, True, False, "the 7B timing twin: Llama-2-7B shapes, random weights"),
        Backend("twin-tiny", functools.partial(load_twin, tiny=True), True, False, "a tiny twin for CPU tests"),
    )
}  # fmt: skip

#: options shared by every backend, with the value that means "not given"
SHARED_DEFAULTS: dict[str, Any] = {
    "weights_dir": None,
    "codec_dir": None,
    "allow_random": False,
    "random_weights": False,
    "seed": 0,
}


def backend(name: str) -> Backend:
    """The registry entry of ``name``; ValueError names the known backends."""
    if name not in BACKENDS:
        raise ValueError(f"unknown policy backend {name!r}; available: {', '.join(BACKENDS)}")
    return BACKENDS[name]


def layerwise_backends() -> tuple[str, ...]:
    """Names of the backends RSD can decode (LayerwisePolicy)."""
    return tuple(n for n, b in BACKENDS.items() if b.layerwise)


def load_policy(
    name: str = "embedded",
    device: str | torch.device = "cpu",
    weights_dir: str | Path | None = None,
    codec_dir: str | Path | None = None,
    allow_random: bool = False,
    random_weights: bool = False,
    seed: int = 0,
    decode_layers: int | None = None,
    *,
    layerwise: bool = False,
    **options: Any,
) -> ChunkPolicy:
    """A ready policy of backend ``name`` (see the module doc).

    weights_dir:    weights folder (``openvla-oft``: a hub id or folder); default: the shipped weights
    codec_dir:      the RFSQ codec the policy was trained with (default: assets/codec)
    allow_random:   build a random-initialized policy when no weights exist (never silently)
    random_weights: the trained policy's architecture and codec with fresh weights (``seed``): the
                    random-weight baseline of closed-loop evaluations
    decode_layers:  layers a layer-wise policy decodes sequentially (None: as its config says; the
                    shipped embedded weights decode their 3 informative layers, the rest at the centre)
    layerwise:      require a LayerwisePolicy (what RSD decodes)
    """
    entry = backend(name)
    if (layerwise or decode_layers is not None) and not entry.layerwise:
        raise ValueError(f"policy {name!r} does not decode layer by layer; RSD needs a LayerwisePolicy")
    shared = dict(weights_dir=weights_dir, codec_dir=codec_dir, allow_random=allow_random,
                  random_weights=random_weights, seed=seed)  # fmt: skip
    given = {k: v for k, v in shared.items() if v != SHARED_DEFAULTS[k]}
    kwargs = {"device": device, **given, **options}
    try:
        inspect.signature(entry.load).bind(**kwargs)
    except TypeError:
        takes = [p for p in inspect.signature(entry.load).parameters if p != "device"]
        bad = sorted(set(kwargs) - set(takes) - {"device"})
        raise ValueError(f"policy backend {name!r} takes no option {bad}; it takes {takes}") from None
    policy = entry.load(**kwargs)
    if decode_layers is not None:
        policy.decode_layers = decode_layers
    return policy


def load_layerwise_policy(name: str = "embedded", **kwargs: Any) -> LayerwisePolicy:
    """:func:`load_policy` of a backend RSD can decode (``layerwise=True``), typed as such."""
    policy = load_policy(name, layerwise=True, **kwargs)
    if not isinstance(policy, LayerwisePolicy):  # a registry entry that misstates its kind
        raise TypeError(f"backend {name!r} returned a {type(policy).__name__}, not a LayerwisePolicy")
    return policy
