"""VLA policy backends (docs/DESIGN.md §6): ``load_policy(name, device)`` returns a ready policy.

    from common.vla import load_policy
    policy = load_policy("embedded", device="cpu")   # shipped weights in assets/embedded_vla
    out = policy.act([obs])[0]                        # hidden [D], codes [T, H, L] uint8, actions [T, A]

The one registry of backends (``embedded``, ``openvla-oft``, ``twin``, ``twin-tiny``) and its options:
:mod:`common.vla.registry`. ``embedded`` is the default, CPU-friendly backend
(:mod:`common.vla.embedded`); it never falls back to random weights unless the caller passes
``allow_random=True`` (plumbing tests only; the policy's ``backbone_id`` then says ``random``).
"""

from __future__ import annotations

from common.vla.paths import DEFAULT_CODEC_DIR, DEFAULT_EMBEDDED_DIR, REPO_ROOT
from common.vla.registry import (
    BACKENDS,
    Backend,
    backend,
    layerwise_backends,
    load_layerwise_policy,
    load_policy,
)

__all__ = [
    "BACKENDS",
    "DEFAULT_CODEC_DIR",
    "DEFAULT_EMBEDDED_DIR",
    "REPO_ROOT",
    "Backend",
    "backend",
    "layerwise_backends",
    "load_layerwise_policy",
    "load_policy",
]
