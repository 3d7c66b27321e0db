"""The documentation stays complete and its examples run.

- Every public name (``__all__`` of ``curvlinops`` and of its public modules) is listed on
  some page under ``docs/api/``; the same check runs inside the Sphinx build
  (``docs/_ext/api_coverage.py``), this test gives the answer without building the docs.
- Every name the API pages list exists (a stale entry would break the docs build).
- Every public method and property of a documented class has a docstring, and the class
  pages show exactly the public members: inherited ones included, nothing private and
  nothing inherited from ``object``, ``int`` or ``Exception``.
- The ``>>>`` examples of the narrative pages (``docs/*.rst``) run as doctests.
"""

from __future__ import annotations

import doctest
import importlib.util
import re
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parents[1] / "docs"


def _load_api_coverage():
    spec = importlib.util.spec_from_file_location("api_coverage", DOCS / "_ext" / "api_coverage.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


api_coverage = _load_api_coverage()


def test_every_public_name_is_on_an_api_page():
    missing = api_coverage.missing_names(DOCS / "api")
    assert not missing, (
        "These public names are on no page of docs/api/; add each to the autosummary list "
        f"of the page of its layer (see docs/api/index.rst): {missing}"
    )


# Frontend modules that import an optional library at module level: their documented
# names can only be resolved where that library is installed.
_OPTIONAL_MODULES = {
    "curvlinops.frontends.torch": "torch",
    "curvlinops.frontends.jax": "jax",
    "curvlinops.optim.torch": "torch",
    "curvlinops.optim.optax": "jax",
}


def _needs_missing_library(name: str) -> bool:
    return any(
        (name == module or name.startswith(module + "."))
        and importlib.util.find_spec(library) is None
        for module, library in _OPTIONAL_MODULES.items()
    )


def test_every_documented_name_exists():
    documented = api_coverage.documented_names(DOCS / "api")
    assert documented, "the checker found no documented names at all"
    checkable = [name for name in documented if not _needs_missing_library(name)]
    assert len(checkable) > len(documented) // 2, "most documented names need no extra library"
    stale = sorted(name for name in checkable if api_coverage.resolve(name) is None)
    assert not stale, f"docs/api/ lists names that do not exist: {stale}"


def test_checker_sees_a_missing_name(tmp_path):
    # Guards the test above against passing vacuously: an empty API folder documents nothing.
    (tmp_path / "empty.rst").write_text("Nothing\n=======\n", encoding="utf-8")
    missing = api_coverage.missing_names(tmp_path)
    assert "curvlinops.LinearOperator" in missing


def test_checker_parses_autosummary_and_currentmodule():
    text = """
.. currentmodule:: curvlinops.linalg

.. autosummary::
   :toctree: generated
   :nosignatures:

   LinearOperator
   ~curvlinops.aslinearoperator

Some text.

.. autofunction:: curvlinops.to_numpy
"""
    assert api_coverage._names_on_page(text) == {
        "curvlinops.linalg.LinearOperator",
        "curvlinops.aslinearoperator",
        "curvlinops.to_numpy",
    }


def test_every_public_member_has_a_docstring():
    missing = api_coverage.undocumented_members(DOCS / "api")
    assert not missing, (
        "These public methods or properties of documented classes have no docstring "
        f"(the class pages show every public member): {missing}"
    )


def test_known_undocumented_members_are_still_undocumented():
    # Once a listed member gets its docstring, its entry must leave the list.
    for qualified in sorted(api_coverage.KNOWN_UNDOCUMENTED):
        module_name, class_name, member = qualified.rsplit(".", 2)
        cls = getattr(importlib.import_module(module_name), class_name)
        assert not api_coverage._member_doc(cls, member), (
            f"{qualified} has a docstring now: remove it from KNOWN_UNDOCUMENTED in "
            "docs/_ext/api_coverage.py"
        )


def test_class_members_include_inherited_and_leave_out_private_and_builtin():
    from curvlinops import CurvatureLinearOperator, Tier
    from curvlinops.curvature.kfac import KFACLinearOperator
    from curvlinops.frontends import CallableModel

    kfac = api_coverage.class_members(KFACLinearOperator)
    # Inherited from LinearOperator and CurvatureLinearOperator, through a private base.
    for name in ("inverse", "damped", "logdet", "trace", "to_dense", "matvec"):
        assert name in kfac["methods"], name
    assert "gradient_and_loss" in api_coverage.class_members(CurvatureLinearOperator)["methods"]
    assert {"shape", "dtype", "T"} <= set(kfac["properties"])
    shown = [name for names in kfac.values() for name in names]
    assert not [name for name in shown if name.startswith("_")]
    assert "linearize" in api_coverage.class_members(CallableModel)["methods"]
    # Nothing from int (Tier is an IntEnum) or from Exception.
    tier = api_coverage.class_members(Tier)
    assert tier["methods"] == [] and "from_bytes" not in tier["methods"]
    assert tier["attributes"] == ["FIRST_ORDER", "LAYER_TAPS", "SECOND_ORDER"]
    from curvlinops import ConvergenceError

    assert api_coverage.class_members(ConvergenceError) == {
        "methods": [],
        "properties": [],
        "attributes": [],
    }


def test_class_members_leave_out_fields_the_docstring_describes():
    from curvlinops import LanczosResult

    members = api_coverage.class_members(LanczosResult)
    assert members["methods"] == ["tridiagonal"]  # not tuple's count and index
    assert not {"alphas", "betas", "residual", "basis"} & set(
        members["properties"] + members["attributes"]
    )


def test_class_pages_name_no_private_base():
    from curvlinops import CurvatureLinearOperator, EFDiagonalLinearOperator, LinearOperator
    from curvlinops.curvature.kfac import KFACLinearOperator
    from curvlinops.linalg import DiagonalLinearOperator

    # KFACLinearOperator derives from the private _KroneckerCurvature.
    assert api_coverage.public_bases(list(KFACLinearOperator.__bases__)) == [
        CurvatureLinearOperator
    ]
    # Two private levels (_TapDiagonal..., _DataDiagonal...) above a public class.
    assert api_coverage.public_bases(list(EFDiagonalLinearOperator.__bases__)) == [
        DiagonalLinearOperator
    ]
    assert api_coverage.public_bases([LinearOperator]) == [LinearOperator]


def test_member_listing_has_the_frontends_members():
    pytest.importorskip("torch")
    pytest.importorskip("jax")
    listing = api_coverage.member_listing(DOCS / "api")
    torch_model = next(v for k, v in listing.items() if k.endswith(".TorchModel"))
    assert "params" in torch_model["properties"]
    jax_model = next(v for k, v in listing.items() if k.endswith(".JaxModel"))
    assert {"flatten", "unflatten", "linearize"} <= set(jax_model["methods"])


NARRATIVE_PAGES = sorted(DOCS.glob("*.rst"))


_DOCTEST_IMPORT = re.compile(r"^\s*>>> (?:import|from) (\w+)", re.MULTILINE)


@pytest.mark.parametrize("page", NARRATIVE_PAGES, ids=[p.name for p in NARRATIVE_PAGES])
def test_narrative_page_examples_run(page):
    for module in _DOCTEST_IMPORT.findall(page.read_text(encoding="utf-8")):
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"{page.name} shows {module}, which is not installed")
    result = doctest.testfile(
        str(page),
        module_relative=False,
        optionflags=doctest.NORMALIZE_WHITESPACE | doctest.ELLIPSIS,
        raise_on_error=False,
        verbose=False,
    )
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples in {page} failed"
