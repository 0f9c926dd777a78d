"""The import rules of docs/architecture.md, enforced: each room imports only from the rooms below it.

Every `import fastllm...` / `from fastllm... import` in the package counts, at any depth (a function-level import
is still a dependency; only `if TYPE_CHECKING:` blocks, which never run, are exempt).
"""

import ast
from pathlib import Path

import fastllm

PACKAGE = Path(fastllm.__file__).parent

# Room -> the rooms it may import from (itself always allowed). "_cache" (paths on disk) and "_version" are leaves
# every room may use.
LEAVES = {"_cache", "_version", "_log", "_numbers"}
ALLOWED = {
    "_cache": set(),
    "_version": set(),
    "_log": set(),
    "_numbers": set(),
    "models": {"_cache"},
    "quant": set(),
    "kernels": {"quant", "_cache"},
    "passes": {"kernels", "models", "quant"},
    "capture": {"passes", "kernels", "models", "quant", "_cache"},
    "runtime": {"kernels", "_cache"},
    "config": {"passes", "quant"},
    "entrypoints": {"config", "runtime", "capture", "passes", "kernels", "models", "quant", "_cache"},
    # The HTTP server speaks to an LLM/AsyncLLM and to SamplingParams/outputs, never to capture or the kernels.
    "serve": {"entrypoints", "runtime"},
    # The public face: the package itself, the verb, the report, the command line (and what `fastllm bench` times).
    "face": {"serve", "entrypoints", "config", "runtime", "capture", "passes", "kernels", "models", "quant", "_cache",
             "face"},
}
FACE = {"__init__", "__main__", "optimize", "explain", "cli", "bench"}


def _room(module: str) -> str:
    """The room of a dotted module name inside fastllm (`fastllm.kernels.rms_norm` -> kernels)."""
    parts = module.split(".")
    if len(parts) == 1:
        return "face"  # `from fastllm import x`: resolved by the caller to fastllm.x
    head = parts[1]
    return "face" if head in FACE else head


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, imported fastllm module) of every import in `path` outside `if TYPE_CHECKING:` blocks."""
    tree = ast.parse(path.read_text(), filename=str(path))
    skipped = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            skipped |= {id(n) for n in ast.walk(node)}
    found = []
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "fastllm"]
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "fastllm":
            if node.module == "fastllm":  # `from fastllm import kernels` names a submodule
                found += [(node.lineno, f"fastllm.{a.name}") for a in node.names]
            else:
                found.append((node.lineno, node.module))
    return found


def _module_room(path: Path) -> str:
    relative = path.relative_to(PACKAGE).with_suffix("")
    return _room(".".join(("fastllm", *relative.parts)))


def test_every_room_imports_only_from_below():
    violations = []
    for path in sorted(PACKAGE.rglob("*.py")):
        room = _module_room(path)
        assert room in ALLOWED, f"{path} is in no room of docs/architecture.md: add it there and here"
        for line, module in _imports(path):
            target = _room(module)
            if target != room and target not in ALLOWED[room] | LEAVES:
                violations.append(f"{path.relative_to(PACKAGE.parent)}:{line}: {room} imports {module} ({target})")
    assert not violations, "imports against docs/architecture.md:\n" + "\n".join(violations)


def test_the_rule_catches_an_upward_import(tmp_path):
    """The checker itself: an import from a room above is reported."""
    source = tmp_path / "bad.py"
    source.write_text("from fastllm.optimize import optimize\nimport fastllm.runtime.engine_core\n")
    imports = _imports(source)
    assert [(_room(m)) for _, m in imports] == ["face", "runtime"]
    assert "face" not in ALLOWED["runtime"] and "runtime" not in ALLOWED["passes"]


def test_the_architecture_document_names_every_room():
    text = (PACKAGE.parent / "docs" / "architecture.md").read_text()
    for room in ALLOWED:
        if room not in ("face", "config", *LEAVES):
            assert f"`{room}/`" in text, room
