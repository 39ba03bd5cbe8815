"""Rendering of LiberoEnv's cameras: the camera gate, and the render context kept across hard resets.

Camera gate (:func:`gate_camera_sensors`): robosuite's camera sensors are wrapped so they render only
while the env wants images. The observables keep their sampling clock, so an image is taken at exactly
the instant robosuite would take it; a gated-off sample returns a shared blank image and is never shown.
A hard reset makes new sensors (``_setup_observables``): that method is wrapped too, so the new ones are
gated before the reset's own observation renders them (images a reset discards: the episode's first
observation is that of the last settle step; about 1 s per episode saved).

Render context (:class:`RenderContextKeeper`):

robosuite builds a new MjSim on every hard reset and then a new offscreen render context for it, which
uploads every mesh and texture of the scene again (307k faces, 189 MB of textures in libero_spatial:
about 1.2 s with a CPU renderer). The uploaded assets depend only on the model's meshes, textures, height
fields and skins, which a task's hard resets rebuild unchanged (only placements differ), so the context
of the last sim is rebound to the next one (a new MjvScene for the new model) if those assets match, and
rebuilt otherwise. ``tests/producer/test_libero_env.py`` checks that the images equal those of a fresh
context (docs/bench/fleet.md, "The reset").

LLVM twice (:func:`load_triton_before_egl`): Mesa's EGL renders on the CPU through its own LLVM, and
triton's extension carries another; loading triton's after an EGL context exists crashes the process
(a MuJoCo EGL render followed by ``import triton`` segfaults). torch imports triton lazily when it is
installed (``torch._dynamo``, which transformers' model classes pull in), so a process that builds an
env before its policy crashed; this module loads triton first, on import.
"""

from __future__ import annotations

import importlib
import importlib.util
import zlib
from collections.abc import Callable
from typing import Any

import numpy as np


def load_triton_before_egl() -> bool:
    """Load triton's LLVM before any EGL context exists (see the module docstring); True if loaded."""
    if importlib.util.find_spec("triton") is None:
        return False
    try:
        importlib.import_module("triton")
    except Exception:  # a broken optional install: torch then does without it, and so do we
        return False
    return True


load_triton_before_egl()


def render_assets_key(model: Any) -> tuple:
    """What an offscreen render context uploads of a MuJoCo model: equal keys, interchangeable contexts."""
    parts: list[Any] = [model.vis.global_.offwidth, model.vis.global_.offheight, model.vis.quality.offsamples,
                        model.vis.quality.shadowsize]  # fmt: skip
    for name in ("mesh_vert", "mesh_face", "mesh_normal", "mesh_texcoord", "tex_data", "tex_height", "tex_width",
                 "hfield_data", "skin_vert"):  # fmt: skip
        arr = getattr(model, name, None)
        if arr is not None:
            data = np.ascontiguousarray(arr)
            parts.append((name, data.shape, zlib.crc32(data.tobytes())))
    return tuple(parts)


class RenderContextKeeper:
    """Hooks a robosuite env's sim destruction and creation so its render context outlives the sim."""

    def __init__(self, robo: Any) -> None:
        self.robo = robo
        self.key: tuple | None = render_assets_key(robo.sim.model._model) if robo.sim is not None else None
        self.kept: Any = None  # the last sim's render context, between its sim and the next
        self.reuses = 0
        self._destroy, self._initialize = robo._destroy_sim, robo._initialize_sim
        robo._destroy_sim = self._destroy_keeping_context
        robo._initialize_sim = self._initialize_keeping_context

    @staticmethod
    def supported(robo: Any) -> bool:
        """robosuite 1.4's hooks are there (another robosuite builds a context per reset, untouched)."""
        return hasattr(robo, "_destroy_sim") and hasattr(robo.sim, "add_render_context")

    def release(self) -> None:
        """Drop a kept context (the env is closed: it goes with its sim)."""
        self.kept = None

    def _destroy_keeping_context(self) -> None:
        if self.robo.sim is not None:
            self.kept = self.robo.sim._render_context_offscreen
        self._destroy()

    def _initialize_keeping_context(self, *args: Any, **kwargs: Any) -> None:
        robo = self.robo
        old, self.kept = self.kept, None
        self._initialize(*args, **kwargs)
        new_key = render_assets_key(robo.sim.model._model)
        if old is not None and self.key is not None and self.key == new_key:
            import mujoco

            old.gl_ctx.make_current()  # another env's context may be current (a new one made itself so)
            old.sim, old.model, old.data = robo.sim, robo.sim.model, robo.sim.data
            old.scn = mujoco.MjvScene(robo.sim.model._model, maxgeom=1000)
            robo.sim.add_render_context(old)
            self.reuses += 1
        self.key = new_key


def make_current(robo: Any) -> None:
    """Make the env's OpenGL context current: robosuite renders into whichever is, and another env in the
    same process may have made its own current since."""
    ctx = getattr(robo.sim, "_render_context_offscreen", None)
    if ctx is not None:
        ctx.gl_ctx.make_current()


def gate_camera_sensors(robo: Any, cameras: tuple[str, ...], size: int, want: Callable[[], bool]) -> None:
    """Gate the camera sensors of ``robo`` (and those its hard resets make) on ``want()``."""

    def gate(observable: Any) -> None:
        real = observable._sensor
        if getattr(real, "_rsd_gated", False):
            return
        blank = np.zeros((size, size, 3), dtype=np.uint8)

        def gated(obs_cache: dict, _real: Any = real) -> np.ndarray:
            if not want():
                return blank
            make_current(robo)
            return _real(obs_cache)

        gated.__modality__ = getattr(real, "__modality__", "image")  # type: ignore[attr-defined]
        gated._rsd_gated = True  # type: ignore[attr-defined]
        observable._sensor = gated

    for cam in cameras:
        gate(robo._observables[f"{cam}_image"])
    if not getattr(robo._setup_observables, "_rsd_gated", False):
        setup = robo._setup_observables

        def gated_setup() -> dict[str, Any]:
            observables = setup()
            for cam in cameras:
                gate(observables[f"{cam}_image"])
            return observables

        gated_setup._rsd_gated = True  # type: ignore[attr-defined]
        robo._setup_observables = gated_setup
