"""Rendering and triton in one process: an env built before the policy must not crash the process."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap

import pytest

RENDER_THEN_TORCH = textwrap.dedent(
    """
    import sys
    if sys.argv[1] == "preload":
        import producer.render_context  # what every LiberoEnv process imports first
    import mujoco
    m = mujoco.MjModel.from_xml_string('<mujoco><worldbody><geom size="1"/></worldbody></mujoco>')
    r = mujoco.Renderer(m, 32, 32)
    d = mujoco.MjData(m)
    r.update_scene(d)
    r.render()
    print("rendered", flush=True)
    import torch._dynamo  # transformers' model classes import this; it loads triton when installed
    print("torch ok", flush=True)
    """
)


def _run(mode: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, MUJOCO_GL="egl", PYOPENGL_PLATFORM="egl")
    return subprocess.run(
        [sys.executable, "-c", RENDER_THEN_TORCH, mode], capture_output=True, text=True, env=env, timeout=300
    )


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_an_egl_render_before_torch_does_not_crash_a_libero_process():
    res = _run("preload")
    if "rendered" not in res.stdout:
        pytest.skip(f"no EGL rendering on this machine: {res.stderr[-300:]}")
    assert res.returncode == 0 and "torch ok" in res.stdout, res.stderr[-2000:]
