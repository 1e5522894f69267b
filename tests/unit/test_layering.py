"""Layering and self-containment of the repository, checked statically (``ast``, text).

* ``loramoe_ds/model/**`` (the math) imports neither ``deepspeed``, nor
  ``torch.distributed``, nor ``loramoe_ds.parallel``: module-level *and*
  function-level imports, relative ones resolved.
* No cycle among ``loramoe_ds`` modules. The graph has an edge ``a -> b`` for
  every ``import`` statement in ``a`` that names ``b``, wherever it stands (module
  level, function body, ``TYPE_CHECKING`` block): a function-level import only
  defers the cycle to the first call, and two modules that need each other are
  one concept split in two. The implicit import of a parent package's
  ``__init__`` is not an edge (every submodule has it; Python handles it).
* Nothing outside ``tests/`` (the package, ``launcher/``, ``bench/``,
  ``tools/``) imports test code or puts ``tests/`` on ``sys.path``; the package
  imports neither ``bench`` nor ``tools``.
* Docs and code cite only documents inside the repository, and every
  ``docs/design.md, "Section"`` citation names a heading of docs/design.md.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PKG = ROOT / "loramoe_ds"

# Import cycles that are known and accepted for now, as sorted module pairs.
# Remove an entry as soon as its cycle is gone (the test then keeps it gone).
KNOWN_CYCLES: set[tuple[str, str]] = set()

FORBIDDEN_IN_MODEL = ("deepspeed", "torch.distributed", "loramoe_ds.parallel")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PKG.rglob("*.py"))}


def _imports(path: Path, source: str | None = None) -> list[tuple[int, str]]:
    """``(line, dotted name)`` of every import in the file, anywhere in it.

    ``from a.b import c`` yields ``a.b.c`` (a submodule, or a name in ``a.b``:
    callers resolve which); relative imports are made absolute. ``source``
    replaces the file's text (the checker's own test).
    """
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    source = path.read_text() if source is None else source
    out = []
    for node in ast.walk(ast.parse(source, str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            out += [(node.lineno, f"{base}.{a.name}" if base else a.name) for a in node.names]
    return out


def _resolve(dotted: str, modules: dict[str, Path]) -> str | None:
    """The longest ``loramoe_ds`` module that ``dotted`` names or lies in."""
    while dotted:
        if dotted in modules:
            return dotted
        dotted = dotted.rpartition(".")[0]
    return None


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for mod, path in modules.items():
        for _, dotted in _imports(path):
            target = _resolve(dotted, modules)
            if target is not None and target != mod:
                graph[mod].add(target)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def _forbidden(dotted: str) -> bool:
    return any(dotted == f or dotted.startswith(f + ".") for f in FORBIDDEN_IN_MODEL)


def test_model_math_imports_no_distributed_code():
    files = sorted((PKG / "model").rglob("*.py"))
    assert files
    bad = [
        f"{p.relative_to(ROOT)}:{line}: {dotted}"
        for p in files
        for line, dotted in _imports(p)
        if _forbidden(dotted)
    ]
    assert not bad, "loramoe_ds/model must not import " + ", ".join(bad)


def test_import_checker_sees_every_form():
    """The checker itself: function-level, aliased and relative imports are all found."""
    src = (
        "import torch.distributed as dist\n"
        "from torch import nn\n"
        "def f():\n"
        "    import deepspeed\n"
        "    from ..parallel import engine\n"
        "    from . import losses\n"
    )
    found = {d for _, d in _imports(PKG / "model" / "probe.py", src)}
    assert {
        "torch.distributed",
        "torch.nn",
        "deepspeed",
        "loramoe_ds.parallel.engine",
        "loramoe_ds.model.losses",
    } <= found
    assert {d for d in found if _forbidden(d)} == {
        "torch.distributed",
        "deepspeed",
        "loramoe_ds.parallel.engine",
    }


def test_no_import_cycles_among_package_modules():
    graph = _graph()
    assert "loramoe_ds.model.inject" in graph["loramoe_ds"]
    assert sum(len(v) for v in graph.values()) > 30
    found = _cycles(graph)
    pairs = {tuple(sorted((a, b))) for comp in found for a in comp for b in graph[a] if b in comp}
    unknown = pairs - KNOWN_CYCLES
    assert not unknown, f"import cycles: {found} (edges {sorted(unknown)})"
    stale = KNOWN_CYCLES - pairs
    assert not stale, f"KNOWN_CYCLES lists {sorted(stale)}, which no longer form a cycle"


def test_cycle_finder_finds_a_lazy_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(graph) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


# -- tests, bench and tools ---------------------------------------------------------
OUTSIDE_TESTS = ("loramoe_ds", "launcher", "bench", "tools")


def _test_module_names() -> set[str]:
    """Names a ``tests/`` module is importable by (via pytest's ``pythonpath``)."""
    return {"tests"} | {p.stem for p in (ROOT / "tests").rglob("*.py")} - {"__init__", "conftest"}


def _imports_outside_tests() -> list[tuple[Path, int, str]]:
    out = []
    for entry in OUTSIDE_TESTS:
        for p in sorted((ROOT / entry).rglob("*.py")):
            out += [(p, line, dotted) for line, dotted in _imports(p)]
    return out


def test_bench_and_tools_are_scanned():
    files = {p.relative_to(ROOT).parts[0] for p, _, _ in _imports_outside_tests()}
    assert {"bench", "tools", "launcher", "loramoe_ds"} <= files


def test_nothing_outside_tests_imports_tests():
    names = _test_module_names()
    assert {"tests", "_common", "launching"} <= names
    bad = [
        f"{p.relative_to(ROOT)}:{line}: {dotted}"
        for p, line, dotted in _imports_outside_tests()
        if dotted.split(".")[0] in names
    ]
    for entry in OUTSIDE_TESTS:
        for p in sorted((ROOT / entry).rglob("*.py")):
            for n, text in enumerate(p.read_text().splitlines(), 1):
                if "sys.path" in text and '"tests"' in text:
                    bad.append(f"{p.relative_to(ROOT)}:{n}: {text.strip()}")
    assert not bad, "code outside tests/ must not depend on tests/: " + ", ".join(bad)


def test_package_imports_neither_bench_nor_tools():
    bad = [
        f"{p.relative_to(ROOT)}:{line}: {dotted}"
        for p in sorted(PKG.rglob("*.py"))
        for line, dotted in _imports(p)
        if dotted.split(".")[0] in ("bench", "tools")
    ]
    assert not bad, "loramoe_ds must not import bench/ or tools/: " + ", ".join(bad)


# -- references ----------------------------------------------------------------
TEXT_SUFFIXES = {".py", ".md", ".sh", ".yaml", ".yml", ".toml", ".txt", ".cfg", ".sbatch"}
SCANNED = ("loramoe_ds", "launcher", "bench", "tools", "docs", "slurm", "configs", "README.md")
# Documents that are not in this repository (design notes, style guides, platform
# notes of the environment the project was written in).
OUTSIDE_DOCS = re.compile(r"\.\./shared|(?<![\w.])(?:DESIGN|STYLE|PLATFORM)(?:\.md)?\b")
SECTION_CITATION = re.compile(r'design\.md[,:]?\s+(?:section\s+)?"([^"]+)"')


def _text_files():
    for entry in SCANNED:
        p = ROOT / entry
        files = [p] if p.is_file() else sorted(p.rglob("*"))
        for f in files:
            if f.is_file() and f.suffix in TEXT_SUFFIXES and "__pycache__" not in f.parts:
                yield f


def test_no_reference_to_documents_outside_the_repository():
    files = list(_text_files())
    assert len(files) > 20
    hits = [
        f"{f.relative_to(ROOT)}:{n}: {line.strip()}"
        for f in files
        for n, line in enumerate(f.read_text(errors="replace").splitlines(), 1)
        if OUTSIDE_DOCS.search(line)
    ]
    assert not hits, "\n".join(hits)


def test_outside_document_pattern():
    for s in ("see DESIGN section 2", "STYLE 7", "PLATFORM.md", "../shared/notes.md"):
        assert OUTSIDE_DOCS.search(s), s
    for s in ("_STYLE = {}", "docs/design.md", "design section"):
        assert not OUTSIDE_DOCS.search(s), s


def test_design_citations_name_existing_sections_and_paths_exist():
    headings = {
        m.group(1).strip()
        for m in re.finditer(r"^#+\s+(.+)$", (ROOT / "docs" / "design.md").read_text(), re.M)
    }
    bad = []
    tests = [f for f in sorted((ROOT / "tests").rglob("*.py")) if f != Path(__file__).resolve()]
    for f in list(_text_files()) + tests:
        text = f.read_text(errors="replace")
        # Citations may wrap across a docstring line: join lines first.
        flat = re.sub(r"\s*\n\s*", " ", text)
        bad += [
            f"{f.relative_to(ROOT)}: section {s!r}"
            for s in SECTION_CITATION.findall(flat)
            if s not in headings
        ]
        for path in re.findall(r"\bdocs/[\w./-]*\w", text):
            if not (ROOT / path).exists():
                bad.append(f"{f.relative_to(ROOT)}: {path} does not exist")
    assert not bad, "\n".join(bad)
