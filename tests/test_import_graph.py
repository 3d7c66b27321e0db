"""The import graph of ``curvlinops``: no circles, and the layer directions of DESIGN.md.

Every module's imports are read with ``ast`` (module-level and function-level ones alike,
without importing anything), resolved to modules of the package, and checked:

- the graph of modules is acyclic;
- each module imports only from its own layer or the layers before it in DESIGN.md's
  list, with the two pairs that sit side by side kept apart (``models`` / ``losses``;
  ``nn`` never imports a frontend, while a frontend may build on the native layers'
  rules);
- ``curvlinops.curvature`` sees models only through the protocols: it imports nothing
  from ``curvlinops.nn`` or the frontends.

The few lazy imports that cross a boundary on purpose are listed in ``LAZY_EXCEPTIONS``
with their reason; they must stay inside functions.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "curvlinops"

#: DESIGN.md's layers: a module may import from its own layer and the layers before it.
LAYERS = {
    "curvlinops._backend": 1,
    "curvlinops.linalg": 2,
    "curvlinops.solvers": 3,
    "curvlinops.models": 4,
    "curvlinops.losses": 4,
    "curvlinops.nn": 5,
    "curvlinops.frontends": 5,
    "curvlinops.curvature": 6,
    "curvlinops.optim": 7,
    "curvlinops.bayes": 7,
    "curvlinops.verify": 8,
    "curvlinops.testing": 8,
}

#: (importer's layer package, imported layer package) pairs that are forbidden although
#: the layer numbers would allow them.
FORBIDDEN = {
    ("curvlinops.models", "curvlinops.losses"): "models and losses sit side by side",
    ("curvlinops.losses", "curvlinops.models"): "models and losses sit side by side",
    ("curvlinops.nn", "curvlinops.frontends"): "the native layers know no frontend",
    ("curvlinops.curvature", "curvlinops.nn"): "curvature sees models only through protocols",
    ("curvlinops.curvature", "curvlinops.frontends"): (
        "curvature sees models only through protocols"
    ),
}

#: (importing module, imported layer package) -> why; allowed only as function-level
#: (lazy) imports. Not required to exist: removing one keeps this test green.
LAZY_EXCEPTIONS = {
    ("curvlinops.frontends.callables", "curvlinops.verify"): (
        "CallableModel(..., verify=True) runs the model checks on request"
    ),
}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def all_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def _is_package(path: Path) -> bool:
    return path.name == "__init__.py"


def imports_of(name: str, path: Path, modules) -> list[tuple[str, bool]]:
    """``(imported curvlinops module, lazy)`` for every import statement in the file."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = name if _is_package(path) else name.rpartition(".")[0]
    found = []

    def resolve(target):
        # the longest prefix of ``target`` that is a module of the package
        parts = target.split(".")
        while parts and ".".join(parts) not in modules:
            parts.pop()
        return ".".join(parts) if parts else None

    def visit(node, lazy):
        for child in ast.iter_child_nodes(node):
            inner = lazy or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                for alias in child.names:
                    if alias.name.split(".")[0] == "curvlinops":
                        found.append((resolve(alias.name), inner))
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = package.split(".")
                    base = base[: len(base) - (child.level - 1)]
                    source = ".".join(base + ([child.module] if child.module else []))
                else:
                    source = child.module or ""
                if source.split(".")[0] != "curvlinops":
                    continue
                for alias in child.names:
                    candidate = f"{source}.{alias.name}"
                    found.append((candidate if candidate in modules else resolve(source), inner))
            visit(child, inner)

    visit(tree, False)
    return [(target, lazy) for target, lazy in found if target is not None and target != name]


def layer_of(name: str):
    for package in sorted(LAYERS, key=len, reverse=True):
        if name == package or name.startswith(package + "."):
            return package
    return None  # the top-level package, demo, __main__: not part of a layer


@pytest.fixture(scope="module")
def graph():
    modules = all_modules()
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def test_the_parser_sees_module_and_function_level_imports(graph):
    # guards the checks below against passing vacuously
    assert ("curvlinops.models", False) in graph["curvlinops.nn.module"]
    assert ("curvlinops.verify", True) in graph["curvlinops.frontends.callables"]
    assert any(t.startswith("curvlinops.curvature.") for t, _ in graph["curvlinops.curvature"])


def test_no_import_circle(graph):
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for target, _ in graph.get(node, []):
            if state.get(target) == "open":
                circle = stack[stack.index(target) :] + [target]
                pytest.fail("import circle: " + " -> ".join(circle))
            if target not in state:
                visit(target)
        stack.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node)


def test_layer_directions_of_design_md(graph):
    violations = []
    for name, targets in graph.items():
        source = layer_of(name)
        if source is None:
            continue
        for target, lazy in targets:
            destination = layer_of(target)
            if destination is None:
                violations.append(f"{name} imports the top-level package ({target})")
                continue
            exception = LAZY_EXCEPTIONS.get((name, destination))
            if exception is not None:
                if not lazy:
                    violations.append(f"{name} imports {target} at module level ({exception})")
                continue
            reason = FORBIDDEN.get((source, destination))
            if reason is not None:
                violations.append(f"{name} imports {target}: {reason}")
            elif LAYERS[destination] > LAYERS[source]:
                violations.append(
                    f"{name} (layer {LAYERS[source]}) imports {target} (layer "
                    f"{LAYERS[destination]}), a later layer"
                )
    assert not violations, "\n".join(violations)


def test_curvature_imports_nothing_from_nn_as_text():
    """The rule for ``curvlinops.nn`` as a plain grep of the curvature package's imports."""
    offenders = []
    for path in sorted((ROOT / "curvature").glob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                text = "." * node.level + (node.module or "")
                if text == "..nn" or text.startswith(("..nn.", "curvlinops.nn")):
                    offenders.append(f"{path.name}: from {text} import ...")
    assert not offenders, offenders


def _declared_imports(name: str, path: Path):
    """The modules a file's docstring allows in its ``May import:`` line, or None.

    Double-backticked names and bare ``curvlinops.x`` names; ``.x`` is relative to the
    module's package. ``None`` for no line, or one that allows every layer.
    """
    import re

    doc = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8"))) or ""
    match = re.search(r"May import:(.*?)(?:\n\s*\n|$)", doc, re.S)
    if match is None:
        return None
    line = " ".join(match.group(1).split())
    if "every other layer" in line:
        return None
    package = name if _is_package(path) else name.rpartition(".")[0]
    names = set(re.findall(r"``([.\w]+)``", line)) | set(
        re.findall(r"\bcurvlinops(?:\.\w+)+", line)
    )
    return {package + n if n.startswith(".") else n for n in names}


def test_may_import_lines_cover_the_actual_imports(graph):
    """Each module's ``May import:`` line names (a package of) every curvlinops module it
    imports, so the line can be trusted when reading the module."""
    modules = all_modules()
    checked, missing = 0, []
    for name, path in modules.items():
        declared = _declared_imports(name, path)
        if declared is None:
            continue
        checked += 1
        own = name if _is_package(path) else None
        for target, _ in graph[name]:
            if own is not None and target.startswith(own + "."):
                continue  # a package's __init__ re-exports its own modules
            if not any(target == d or target.startswith(d + ".") for d in declared):
                missing.append(f"{name} imports {target}; its May import: {sorted(declared)}")
    assert checked > 30  # the docstrings were found
    assert not missing, "\n".join(sorted(set(missing)))
