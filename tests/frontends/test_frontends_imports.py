"""``import curvlinops`` and ``curvlinops.frontends`` work without PyTorch and JAX.

Runs a fresh interpreter in which importing torch or jax fails, as if they were not
installed.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent(
    """
    import sys

    class NotInstalled:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("torch", "jax", "jaxlib"):
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)
            return None

    sys.meta_path.insert(0, NotInstalled())
    import numpy as np
    import curvlinops
    from curvlinops.frontends import CallableModel, as_loss

    loss = curvlinops.MSELoss()
    assert as_loss(loss) is loss
    model = CallableModel(
        lambda p, x: x @ p[0], lambda p, x, V: x @ V[0], lambda p, x, U: [x.T @ U]
    )
    for name, library in (("torch", "PyTorch"), ("jax", "JAX")):
        try:
            __import__(f"curvlinops.frontends.{name}")
        except ModuleNotFoundError as error:
            assert error.name == name and library in str(error), error
        else:
            raise AssertionError(f"curvlinops.frontends.{name} imported without {name}")
    loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "jax"))
    assert not loaded, loaded
    print("ok")
    """
)


def test_frontends_import_without_torch_and_jax():
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


ADAPTER_SCRIPT = textwrap.dedent(
    """
    import sys

    class NotInstalled:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("torch", "jax", "jaxlib"):
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)
            return None

    sys.meta_path.insert(0, NotInstalled())
    import numpy as np
    import curvlinops as cl

    data = [(np.ones((2, 3)), np.zeros((2, 1)))]
    for bad_model, bad_loss, expected in (
        (object(), cl.MSELoss(), "torch.nn.Module"),
        (cl.nn.Sequential(cl.nn.Linear(3, 1)), object(), "PyTorch loss"),
    ):
        try:
            cl.GGNLinearOperator(bad_model, bad_loss, [np.ones((1, 3)), np.zeros(1)], data)
        except TypeError as error:
            assert expected in str(error), error
        else:
            raise AssertionError("no TypeError")
    loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "jax"))
    assert not loaded, loaded
    print("ok")
    """
)


def test_the_adapters_import_no_torch_to_refuse_a_foreign_object():
    # The registered PyTorch adapters look at sys.modules only: without PyTorch loaded,
    # a foreign model or loss is refused with a message naming what is accepted.
    result = subprocess.run(
        [sys.executable, "-c", ADAPTER_SCRIPT], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"
