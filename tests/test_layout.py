"""The house rules of the layout, read from the source with `ast` (nothing is imported):

- `reference/` imports torch, the standard library and itself only: the spec stands alone;
- `optimized/` never imports `reference/`, `conformance/` or `tools/`: two independent implementations, or the
  conformance suite proves nothing;
- no import cycle between modules: the graph of module-level imports over reference/, optimized/, conformance/ and
  tools/ has no cycle (an import inside a function runs when called, after every module has loaded: it is lazy and
  does not count; neither does an `if TYPE_CHECKING:` block, which never runs);
- no file over MAX_LINES lines, except the Triton kernels (a kernel file is one that defines a `@triton.jit`
  function: a kernel reads best whole).
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("reference", "optimized", "conformance", "tools")
MAX_LINES = 450


def _sources(*packages: str) -> dict[str, Path]:
    """{dotted module name: path} of every .py file under `packages` (a package is its __init__)."""
    out = {}
    for package in packages:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _imported(node: ast.Import | ast.ImportFrom, module: str, is_package: bool, modules: set[str]) -> list[str]:
    """The dotted names `node` imports: `from a.b import c` gives a.b.c when that is one of `modules`, else a.b."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    base = node.module or ""
    if node.level:  # relative: from the module's package, one level up per extra dot
        package = module.split(".") if is_package else module.split(".")[:-1]
        package = package[:len(package) - node.level + 1]
        base = ".".join(package + ([base] if base else []))
    return [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]


def _imports(path: Path, module: str, *, lazy: bool, modules: set[str] = frozenset()) -> set[str]:
    """Dotted names imported by the file: at module level only (lazy=False), or anywhere (lazy=True)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    is_package = path.name == "__init__.py"
    if lazy:
        nodes = [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))]
    else:
        nodes, todo = [], list(tree.body)
        while todo:  # module level: the body, and the bodies of its if / try / with statements
            node = todo.pop()
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                nodes.append(node)
            elif isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                continue
            elif isinstance(node, (ast.If, ast.Try, ast.With)):
                todo += [*node.body, *getattr(node, "orelse", []), *getattr(node, "finalbody", []),
                         *(s for h in getattr(node, "handlers", []) for s in h.body)]
    return {name for node in nodes for name in _imported(node, module, is_package, modules) if name}


def _top(names: set[str]) -> set[str]:
    return {n.split(".")[0] for n in names}


def test_reference_imports_torch_the_standard_library_and_itself_only():
    allowed = {"torch", "reference", "__future__", *sys.stdlib_module_names}
    bad = {m: sorted(_top(_imports(p, m, lazy=True)) - allowed) for m, p in _sources("reference").items()}
    assert {m: b for m, b in bad.items() if b} == {}


def test_optimized_never_imports_reference_conformance_or_tools():
    banned = {"reference", "conformance", "tools"}
    bad = {m: sorted(_top(_imports(p, m, lazy=True)) & banned) for m, p in _sources("optimized").items()}
    assert {m: b for m, b in bad.items() if b} == {}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module, or of one that imports itself (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1 or v in graph[v]:
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def import_graph() -> dict[str, set[str]]:
    """{module: the project modules it imports at module level}."""
    sources = _sources(*PACKAGES)
    return {module: _imports(path, module, lazy=False, modules=set(sources)) & set(sources) - {module}
            for module, path in sources.items()}


def test_no_import_cycles_between_modules():
    graph = import_graph()
    assert len(graph) > 50 and sum(map(len, graph.values())) > 100  # the walk found the modules and imports
    assert _cycles(graph) == []


def test_no_file_over_450_lines_but_kernels():
    long = {}
    for path in _sources(*PACKAGES).values():
        name = path.relative_to(ROOT).as_posix()
        text = path.read_text()
        lines = text.count("\n")
        if lines > MAX_LINES and not _defines_a_kernel(text):
            long[name] = lines
    assert long == {}, f"over {MAX_LINES} lines: split by job (see DESIGN.md)"


def _defines_a_kernel(text: str) -> bool:
    return any(ast.unparse(d) in ("triton.jit", "jit") for n in ast.walk(ast.parse(text))
               if isinstance(n, ast.FunctionDef) for d in n.decorator_list)
