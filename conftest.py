"""Root pytest configuration: skip collecting modules whose optional library is missing.

``pytest --doctest-modules`` imports every module of the package; the PyTorch and JAX
frontends import their framework at module level, so they are left out of collection
when it is not installed (the test suite's own fixtures skip those backends).
"""

import importlib.util

collect_ignore = []
for module, library in [
    ("curvlinops/frontends/torch.py", "torch"),
    ("curvlinops/frontends/_torch_params.py", "torch"),
    ("curvlinops/frontends/jax.py", "jax"),
]:
    if importlib.util.find_spec(library) is None:
        collect_ignore.append(module)
