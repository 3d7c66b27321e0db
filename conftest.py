"""Root pytest configuration: optional libraries that are missing skip, never fail.

``pytest --doctest-modules`` imports every module of the package; modules that import
an optional framework at module level (the PyTorch and JAX frontends and their helpers)
are left out of collection when it is not installed (found from each module's
module-level imports) (the test suite's own fixtures skip those backends). A doctest
anywhere else whose examples import an optional library that is not installed (torch,
jax, scikit-learn, matplotlib) is skipped with a reason that names the library, so that
``pip install -e ".[test]" && pytest`` passes on a machine with nothing else installed.
"""

import ast
import importlib.util
import re
from pathlib import Path

import pytest

OPTIONAL_LIBRARIES = ("torch", "jax", "sklearn", "matplotlib", "cupy", "flax", "equinox")

_IMPORT = re.compile(r"^\s*(?:import|from)\s+(\w+)", re.MULTILINE)


def missing_optional_imports(source: str) -> list[str]:
    """The optional libraries that ``source`` imports and that are not installed."""
    return sorted(
        {
            name
            for name in _IMPORT.findall(source)
            if name in OPTIONAL_LIBRARIES and importlib.util.find_spec(name) is None
        }
    )


def _module_level_imports(path: Path) -> set[str]:
    """Top-level packages a module imports when it is imported: its module-level
    imports, including those in a module-level ``try`` (not those inside functions)."""
    statements = []
    for node in ast.parse(path.read_text()).body:
        statements += node.body if isinstance(node, ast.Try) else [node]
    names = set()
    for node in statements:
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module.split(".")[0])
    return names


# a module that imports a missing optional library when imported cannot be collected
_ROOT = Path(__file__).resolve().parent
collect_ignore = [
    str(path.relative_to(_ROOT))
    for path in sorted((_ROOT / "curvlinops").rglob("*.py"))
    if any(
        name in OPTIONAL_LIBRARIES and importlib.util.find_spec(name) is None
        for name in _module_level_imports(path)
    )
]


def pytest_collection_modifyitems(config, items):
    for item in items:
        if not isinstance(item, pytest.DoctestItem):
            continue
        source = "\n".join(example.source for example in item.dtest.examples)
        missing = missing_optional_imports(source)
        if missing:
            reason = f"doctest needs {', '.join(missing)}, which is not installed"
            item.add_marker(pytest.mark.skip(reason=reason))
