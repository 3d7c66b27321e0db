"""Root pytest configuration: optional libraries that are missing skip, never fail.

``pytest --doctest-modules`` imports every module of the package; the PyTorch and JAX
frontends import their framework at module level, so they are left out of collection
when it is not installed (the test suite's own fixtures skip those backends). A doctest
anywhere else whose examples import an optional library that is not installed (torch,
jax, scikit-learn, matplotlib) is skipped with a reason that names the library, so that
``pip install -e ".[test]" && pytest`` passes on a machine with nothing else installed.
"""

import importlib.util
import re

import pytest

OPTIONAL_LIBRARIES = ("torch", "jax", "sklearn", "matplotlib", "cupy", "flax", "equinox")

collect_ignore = []
for module, library in [
    ("curvlinops/frontends/torch.py", "torch"),
    ("curvlinops/frontends/_torch_params.py", "torch"),
    ("curvlinops/frontends/jax.py", "jax"),
    ("curvlinops/optim/torch.py", "torch"),
]:
    if importlib.util.find_spec(library) is None:
        collect_ignore.append(module)

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


def pytest_collection_modifyitems(config, items):
    for item in items:
        if not isinstance(item, pytest.DoctestItem):
            continue
        source = "\n".join(example.source for example in item.dtest.examples)
        missing = missing_optional_imports(source)
        if missing:
            reason = f"doctest needs {', '.join(missing)}, which is not installed"
            item.add_marker(pytest.mark.skip(reason=reason))
