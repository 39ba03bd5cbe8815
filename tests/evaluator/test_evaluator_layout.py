"""The layout rules of docs/DESIGN.md §13 on evaluator/ and the backends in common/vla/: imports at module
level (a function-level import only for a heavy optional dependency), no import cycle, no file over ~450
lines, no function over ~80."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("evaluator", "common/vla")
MAX_FILE_LINES, MAX_FUNCTION_LINES = 460, 85  # "about" 450 and 80
#: heavy optional dependencies that may be imported inside a function (what imports them, and why)
OPTIONAL = {
    "common.vla.twin_triton": "triton, only for the skinny products",
    "evaluator.fleet_ray": "ray, only with --ray-address",
}
#: the OFT stack lives in its own environment (.venv-oft) and loads only when an OFT policy is built
OFT_FILES = ("common/vla/openvla_oft.py", "common/vla/oft_random.py")


def files() -> list[Path]:
    return sorted(p for d in PACKAGES for p in (REPO / d).glob("*.py"))


def module_of(path: Path) -> str:
    rel = path.relative_to(REPO).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def imported(node: ast.Import | ast.ImportFrom) -> list[str]:
    """Project modules an import statement names (``from pkg import sub`` names ``pkg.sub`` if it is a module)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    base = node.module or ""
    out = []
    for a in node.names:
        sub = f"{base}.{a.name}"
        is_module = (REPO / Path(*sub.split("."))).with_suffix(".py").is_file()
        out.append(sub if is_module else base)
    return out


def test_function_level_imports_only_for_heavy_optional_dependencies() -> None:
    bad = []
    for path in files():
        rel = str(path.relative_to(REPO))
        for fn in ast.walk(ast.parse(path.read_text())):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(fn):
                if isinstance(node, (ast.Import, ast.ImportFrom)) and rel not in OFT_FILES:
                    bad += [f"{rel}:{node.lineno} {m}" for m in imported(node) if m not in OPTIONAL]
    assert not bad, f"function-level imports of non-optional modules: {bad}"


def test_no_import_cycles() -> None:
    graph: dict[str, set[str]] = {}
    for path in sorted((REPO / "evaluator").glob("*.py")) + sorted((REPO / "common").rglob("*.py")):
        mods = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                mods |= {m for m in imported(node) if m.split(".")[0] in ("common", "evaluator")}
        graph[module_of(path)] = mods - {module_of(path)}

    def cycle_from(start: str, node: str, seen: list[str]) -> list[str] | None:
        for nxt in sorted(graph.get(node, ())):
            if nxt == start:
                return [*seen, nxt]
            if nxt not in seen:
                found = cycle_from(start, nxt, [*seen, nxt])
                if found:
                    return found
        return None

    cycles = [c for m in graph if (c := cycle_from(m, m, [m]))]
    assert not cycles, f"import cycles: {cycles[:3]}"


@pytest.mark.parametrize("path", files(), ids=lambda p: str(p.relative_to(REPO)))
def test_file_and_function_sizes(path: Path) -> None:
    text = path.read_text()
    assert len(text.splitlines()) <= MAX_FILE_LINES
    long = [
        f"{n.name} ({n.end_lineno - n.lineno + 1} lines)"
        for n in ast.walk(ast.parse(text))
        if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))
        and n.end_lineno - n.lineno + 1 > MAX_FUNCTION_LINES
    ]
    assert not long, long
