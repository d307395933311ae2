"""The layers import one way only, interformer <- pipeline <- connectors <- jobs, and nothing edits sys.path.

Every import is read from the source with `ast`, including imports inside functions and
`importlib.import_module("...")` calls with a literal name, so a lazy import cannot hide an edge.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYERS = {"interformer": 0, "pipeline": 1, "connectors": 2, "jobs": 3}

# Edges another open change removes (issue 13: the backend engineer moves image access into pipeline/, the
# encode engineer rewrites jobs/encode.py). Each must still exist: delete the entry when its change lands.
PENDING_IMPORTS: set[tuple[str, str]] = set()
PENDING_SYS_PATH: set[str] = set()


def modules() -> list[Path]:
    return sorted(p for layer in LAYERS for p in (ROOT / layer).rglob("*.py"))


def imported_names(path: Path, root: Path = ROOT) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in the file under `root`, at any depth."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = path.relative_to(root).with_suffix("").parts[:-1]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = list(package[: len(package) - node.level + 1])
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            found.append((node.lineno, name))
        elif (isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", None)) == "import_module"
              and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            found.append((node.lineno, node.args[0].value))
    return found


def upward_imports() -> list[tuple[str, int, str]]:
    edges = []
    for path in modules():
        rel = path.relative_to(ROOT).as_posix()
        own = LAYERS[rel.split("/")[0]]
        for line, name in imported_names(path):
            top = name.split(".")[0]
            if top in LAYERS and LAYERS[top] > own:
                edges.append((rel, line, name))
    return edges


def test_the_parser_sees_lazy_and_relative_imports(tmp_path):
    pkg = tmp_path / "pipeline" / "sub"
    pkg.mkdir(parents=True)
    src = pkg / "mod.py"
    src.write_text("from ..x import y\n\ndef f():\n    import connectors.server\n    from jobs import encode\n"
                   "    importlib.import_module('connectors.cli')\n")
    assert [n for _, n in imported_names(src, tmp_path)] == ["pipeline.x", "connectors.server", "jobs", "connectors.cli"]


def test_no_layer_imports_a_higher_one():
    edges = upward_imports()
    unexpected = [e for e in edges if not any(e[0] == f and e[2].startswith(m) for f, m in PENDING_IMPORTS)]
    assert not unexpected, "imports against the layering:\n" + "\n".join(f"  {f}:{n} imports {m}"
                                                                          for f, n, m in unexpected)
    for file, module in PENDING_IMPORTS:
        assert any(e[0] == file and e[2].startswith(module) for e in edges), \
            f"{file} no longer imports {module}: remove it from PENDING_IMPORTS"


@pytest.mark.parametrize("layer", sorted(LAYERS))
def test_nothing_edits_sys_path(layer):
    hits = [f"{p.relative_to(ROOT).as_posix()}:{n}" for p in (ROOT / layer).rglob("*.py")
            for n, line in enumerate(p.read_text().splitlines(), 1)
            if "sys.path" in line and p.relative_to(ROOT).as_posix() not in PENDING_SYS_PATH]
    assert not hits, "sys.path manipulation (install the project, or run with PYTHONPATH): " + ", ".join(hits)
    for file in PENDING_SYS_PATH:
        if file.startswith(layer + "/"):
            assert "sys.path" in (ROOT / file).read_text(), f"{file} is clean now: remove it from PENDING_SYS_PATH"
