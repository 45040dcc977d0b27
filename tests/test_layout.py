"""The package's shape: no import cycles (function-level imports included), the engine never imports the shells
above it (serve/, nano/, bench/, the CLI), and files and functions stay small enough to read at once."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "kleinbild"
SHELLS = ("kleinbild.serve", "kleinbild.nano", "kleinbild.bench", "kleinbild.cli", "kleinbild.cli_train",
          "kleinbild.cli_memory", "kleinbild.__main__")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports_of(path: Path, known: set[str]) -> set[str]:
    """Every kleinbild module `path` imports, at any depth of the file (inside functions too)."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from kleinbild import lora` imports the module kleinbild.lora; `from kleinbild.x import y`, x.
            names = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in known else node.module
                     for a in node.names]
        else:
            continue
        out |= {n for n in names if n in known}
    return out


def import_graph() -> dict[str, set[str]]:
    mods = modules()
    known = set(mods)
    return {name: imports_of(path, known) - {name} for name, path in mods.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def is_shell(name: str) -> bool:
    return any(name == s or name.startswith(s + ".") for s in SHELLS)


def test_the_checks_catch_what_they_are_for():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
    graph = import_graph()
    assert "kleinbild.request" in graph["kleinbild.pipeline"], "the scan sees module-level imports"
    assert "kleinbild.pipeline" in graph["kleinbild.serve.app"], "and imports inside functions"


def test_no_import_cycles():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_engine_modules_never_import_the_shells():
    graph = import_graph()
    engine = [m for m in graph if m != "kleinbild" and not is_shell(m)]
    assert {"kleinbild.pipeline", "kleinbild.request", "kleinbild.transformer", "kleinbild.files"} <= set(engine)
    bad = {m: sorted(i for i in graph[m] if is_shell(i)) for m in engine}
    assert not {m: i for m, i in bad.items() if i}, "engine modules importing serve/, nano/, bench/ or the CLI"


def test_files_is_a_leaf():
    assert import_graph()["kleinbild.files"] == set()


def test_files_and_functions_stay_small():
    long_files, long_functions = [], []
    for name, path in modules().items():
        text = path.read_text()
        if text.count("\n") > 600:
            long_files.append(f"{name}: {text.count(chr(10))} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > 80:
                    long_functions.append(f"{name}.{node.name}: {n} lines")
    assert not long_files, long_files
    assert not long_functions, long_functions


def test_the_project_describes_the_software_not_how_its_work_was_organised():
    import re

    root = PACKAGE.parents[1]
    prose = re.compile(r"\bsessions?\b|\blent\b|\bissues? ?#?\d+|\(issue\b", re.IGNORECASE)
    code = re.compile(r"\bsession[- ]\d+|\blent\b|\bissue ?#?\d+", re.IGNORECASE)
    found = []
    for path in [root / "README.md", root / "BENCHMARKS.md", *sorted((root / "docs").glob("*.md"))]:
        found += [f"{path.name}:{i}" for i, line in enumerate(path.read_text().splitlines(), 1) if prose.search(line)]
    for folder in ("src", "tests", "tools"):
        for path in sorted((root / folder).rglob("*")):
            if path.suffix in (".py", ".sh", ".html") and path.resolve() != Path(__file__).resolve():
                text = path.read_text(errors="replace")
                found += [f"{path.name}:{i}" for i, line in enumerate(text.splitlines(), 1) if code.search(line)]
    assert not found, found
