"""One validation for every solver: same mistake, same exception; the structure rule.

- The same bad input to each algorithm raises the same exception type, with a message
  that names the algorithm, what it expected and what it found.
- The structure rule (``curvlinops/solvers/_validation.py``): silent when the operator
  declares what the algorithm assumes; a symmetry probe (error when it fails, warning
  when it passes) when symmetry is not declared; a warning when PSD is assumed but only
  symmetry declared; a warning or a named error when a declaration is contradicted.
- :class:`StopReason` members with their remedies, and :meth:`LinearOperator.check_input`.
"""

from __future__ import annotations

import re
import warnings

import array_api_strict
import numpy as np
import pytest

from curvlinops import (
    AssumptionWarning,
    CGInverseLinearOperator,
    CheckedInput,
    ConvergenceError,
    FactorizationError,
    MINRESInverseLinearOperator,
    NeumannInverseLinearOperator,
    StopReason,
    aslinearoperator,
    cg,
    eigsh,
    hutchinson_diagonal,
    hutchinson_squared_frobenius,
    hutchinson_trace,
    hutchpp_trace,
    lanczos,
    log_spectral_density,
    minres,
    nystrom,
    power_iteration,
    spectral_density,
    xdiag,
    xtrace,
)

N = 8


def spd(n=N, seed=0):
    G = np.random.default_rng(seed).standard_normal((n, n))
    return G @ G.T / n + np.eye(n)


B = np.ones(N)

# Each algorithm as a call on an operator, with its integer count argument named.
SOLVERS = {
    "cg": (lambda A, **kw: cg(A, B, **kw), "maxiter"),
    "minres": (lambda A, **kw: minres(A, B, **kw), "maxiter"),
    "CGInverseLinearOperator": (lambda A, **kw: CGInverseLinearOperator(A, **kw), "maxiter"),
    "MINRESInverseLinearOperator": (
        lambda A, **kw: MINRESInverseLinearOperator(A, **kw),
        "maxiter",
    ),
    "NeumannInverseLinearOperator": (
        lambda A, num_terms=3, **kw: NeumannInverseLinearOperator(A, num_terms, 0.1, **kw),
        "num_terms",
    ),
    "lanczos": (lambda A, num_steps=3, **kw: lanczos(A, num_steps, **kw), "num_steps"),
    "eigsh": (lambda A, k=2, **kw: eigsh(A, k, **kw), "k"),
    "power_iteration": (lambda A, **kw: power_iteration(A, **kw), "maxiter"),
    "nystrom": (lambda A, rank=2, **kw: nystrom(A, rank, **kw), "rank"),
    "hutchinson_trace": (lambda A, m=4, **kw: hutchinson_trace(A, m, **kw), None),
    "hutchinson_diagonal": (lambda A, m=4, **kw: hutchinson_diagonal(A, m, **kw), None),
    "hutchinson_squared_frobenius": (
        lambda A, m=4, **kw: hutchinson_squared_frobenius(A, m, **kw),
        None,
    ),
    "hutchpp_trace": (lambda A, m=6, **kw: hutchpp_trace(A, m, **kw), None),
    "xtrace": (lambda A, m=6, **kw: xtrace(A, m, **kw), None),
    "xdiag": (lambda A, m=6, **kw: xdiag(A, m, **kw), None),
    "spectral_density": (
        lambda A, **kw: spectral_density(A, lanczos_steps=3, num_points=8, **kw),
        "num_probes",
    ),
    "log_spectral_density": (
        lambda A, **kw: log_spectral_density(A, lanczos_steps=3, num_points=8, **kw),
        "num_probes",
    ),
}
NAMES = sorted(SOLVERS)
COUNTED = sorted(name for name, (_, count) in SOLVERS.items() if count is not None)
# What each algorithm assumes of the operator (the rule's table).
ASSUMES = {
    "cg": "psd",
    "CGInverseLinearOperator": "psd",
    "nystrom": "psd",
    "minres": "symmetric",
    "MINRESInverseLinearOperator": "symmetric",
    "lanczos": "symmetric",
    "eigsh": "symmetric",
    "power_iteration": "symmetric",
    "spectral_density": "symmetric",
    "log_spectral_density": "symmetric",
}


@pytest.mark.parametrize("name", NAMES)
def test_not_an_operator_is_a_type_error(name):
    call, _ = SOLVERS[name]
    with pytest.raises(TypeError, match=r"LinearOperator or a 2-D array.*got a list"):
        call([[1.0, 0.0], [0.0, 1.0]])


class _PartArray:
    """An object with only some of an array's attributes (``ndim``, ``shape``, ``dtype``)."""

    def __init__(self, **attributes):
        self.__dict__.update(attributes)


@pytest.mark.parametrize(
    "attributes",
    [{"ndim": 2}, {"ndim": 2, "shape": (N, N)}, {"dtype": np.float64}, {"shape": (N, N)}],
    ids=["ndim", "ndim+shape", "dtype", "shape"],
)
def test_an_object_with_part_of_an_arrays_attributes_is_no_array(attributes):
    """Only an object with ``ndim``, ``shape`` and ``dtype`` together is taken as an array."""
    call, _ = SOLVERS["cg"]
    with pytest.raises(TypeError, match=r"LinearOperator or a 2-D array.*got a _PartArray"):
        call(_PartArray(**attributes))


@pytest.mark.parametrize("name", NAMES)
def test_non_square_operator_is_a_value_error(name):
    call, _ = SOLVERS[name]
    with pytest.raises(ValueError, match=re.escape(f"{name} needs a square operator")) as info:
        call(aslinearoperator(np.ones((N, N + 1))))
    assert f"got shape ({N}, {N + 1})" in str(info.value)


@pytest.mark.parametrize(
    "name",
    ["lanczos", "eigsh", "power_iteration", "nystrom", "spectral_density", "log_spectral_density"],
)
def test_an_empty_operator_has_no_spectrum_to_look_for(name):
    call, _ = SOLVERS[name]
    empty = aslinearoperator(np.zeros((0, 0)), psd=True)
    with pytest.raises(ValueError) as info:
        call(empty)
    assert str(info.value) == f"{name} needs a non-empty operator; got shape (0, 0)."


@pytest.mark.parametrize("name", NAMES)
def test_non_integer_count_is_a_type_error_and_negative_a_value_error(name):
    call, count = SOLVERS[name]
    count = count or "m"
    shown = count if count != "m" else "num_matvecs"
    A = aslinearoperator(spd(), psd=True)
    with pytest.raises(TypeError, match=rf"{name}: {shown} must be an integer .*got 2\.5"):
        call(A, **{count: 2.5})
    with pytest.raises(ValueError, match=rf"{name}: {shown} must be an integer (>=|in) .*got -1"):
        call(A, **{count: -1})


@pytest.mark.parametrize("name", ["cg", "minres", "lanczos", "eigsh", "power_iteration"])
def test_vector_of_another_library_or_shape(name):
    A = aslinearoperator(spd(), psd=True)
    if name in ("cg", "minres"):
        solver = cg if name == "cg" else minres

        def call(v):
            return solver(A, v)
    else:

        def call(v):
            return SOLVERS[name][0](A, v0=v)

    with pytest.raises(TypeError, match=rf"{name}: .*array_api_strict array.*numpy arrays"):
        call(array_api_strict.asarray(np.ones(N)))
    with pytest.raises(ValueError, match=rf"{name}: .*expected .*\({N},\).*got shape \(3,\)"):
        call(np.ones(3))


@pytest.mark.parametrize("name", ["cg", "minres"])
def test_non_numbers_and_non_finite_options(name):
    solver = cg if name == "cg" else minres
    A = aslinearoperator(spd(), psd=True)
    with pytest.raises(TypeError, match=f"{name}: rtol must be a real number"):
        solver(A, B, rtol="small")
    with pytest.raises(ValueError, match=f"{name}: damping must be finite, got nan"):
        solver(A, B, damping=float("nan"))
    with pytest.raises(ValueError, match=f"{name}: the right-hand side b contains NaN"):
        solver(A, np.full(N, np.inf))
    with pytest.raises(ValueError, match=f"{name}: the initial guess x0 contains NaN"):
        solver(A, np.ones(N), x0=np.full(N, np.nan))
    with pytest.raises(ValueError, match=rf"{name}: the initial guess x0 must have the shape of b"):
        solver(A, np.ones(N), x0=np.ones((N, 1)))


# -- the structure rule --------------------------------------------------------------------


def _operators():
    A = spd()
    return {
        "psd": aslinearoperator(A, psd=True),
        "symmetric": aslinearoperator(A, symmetric=True),
        "undeclared": aslinearoperator(A),
        "nonsymmetric": aslinearoperator(A + np.triu(np.ones((N, N)), 1)),
    }


def _run_silently(call, A):
    with warnings.catch_warnings():
        warnings.simplefilter("error", AssumptionWarning)
        return call(A)


@pytest.mark.parametrize("name", sorted(ASSUMES))
def test_declared_structure_runs_silently(name):
    call, _ = SOLVERS[name]
    ops = _operators()
    _run_silently(call, ops["psd"])
    if ASSUMES[name] == "symmetric":
        _run_silently(call, ops["symmetric"])


@pytest.mark.parametrize("name", sorted(ASSUMES))
def test_undeclared_symmetry_is_probed_and_warned(name):
    call, _ = SOLVERS[name]
    ops = _operators()
    with pytest.warns(AssumptionWarning, match=f"{name} assumes .*not declared symmetric"):
        call(ops["undeclared"])
    with pytest.raises(ValueError, match=f"{name} needs a symmetric operator.*is not"):
        call(ops["nonsymmetric"])


@pytest.mark.parametrize("name", sorted(n for n, a in ASSUMES.items() if a == "psd"))
def test_psd_assumed_but_only_symmetry_declared_warns(name):
    call, _ = SOLVERS[name]
    with pytest.warns(AssumptionWarning, match=f"{name} assumes a positive semi-definite"):
        call(_operators()["symmetric"])


def test_cg_with_damping_does_not_ask_for_psd():
    _run_silently(lambda A: cg(A, B, damping=0.1), _operators()["symmetric"])
    _run_silently(lambda A: CGInverseLinearOperator(A, damping=0.1), _operators()["symmetric"])


@pytest.mark.parametrize("name", sorted(set(SOLVERS) - set(ASSUMES)))
def test_estimators_and_neumann_take_any_square_operator_silently(name):
    call, _ = SOLVERS[name]
    _run_silently(call, _operators()["nonsymmetric"])


def _probed_relative_difference(A) -> float:
    with pytest.raises(ValueError, match="minres needs a symmetric operator") as info:
        minres(aslinearoperator(A), B)
    return float(re.search(r"relative difference ([-+.0-9e]+) >", str(info.value)).group(1))


def test_the_symmetry_probe_measures_asymmetry_relative_to_the_operators_scale():
    """The probe's relative difference |y^T A x - x^T A y| / (|y| |Ax| + |x| |Ay|).

    It lies in [0, 1] (Cauchy-Schwarz), is the same for A and c A whatever the scale c,
    and is this formula evaluated at the probe's two seeded random vectors.
    """
    from curvlinops._backend.random import as_generator

    rng = np.random.default_rng(5)
    A = rng.standard_normal((N, N))
    measured = [_probed_relative_difference(c * A) for c in (1e-3, 1.0, 1e3)]
    assert 0.0 < measured[1] < 1.0
    np.testing.assert_allclose(measured, measured[1], rtol=0.05)  # printed to 2 digits
    V = as_generator(0, np).normal((N, 2), np.float64)
    x, y = V[:, 0], V[:, 1]
    norm = np.linalg.norm
    expected = abs(y @ A @ x - x @ A @ y) / (norm(y) * norm(A @ x) + norm(x) * norm(A @ y))
    assert measured[1] == pytest.approx(expected, rel=0.03)  # printed to 2 digits


def test_a_dense_array_is_symmetric_when_it_is():
    A = spd()
    _run_silently(lambda A: minres(A, B), A)  # exactly symmetric: declared on wrapping
    with pytest.raises(ValueError, match="minres needs a symmetric operator"):
        minres(A + np.triu(np.ones((N, N)), 1), B)
    with pytest.warns(AssumptionWarning, match="positive semi-definite"):
        cg(A, B)  # PSD is never guessed
    x, _ = _run_silently(lambda A: minres(A, np.ones(1)), np.array([[-4.0]]))  # 1 x 1
    np.testing.assert_allclose(x, [-0.25], rtol=1e-14)


def test_contradicted_declarations():
    with pytest.raises(ValueError, match="psd=True with symmetric=False is a contradiction"):
        aslinearoperator(spd(), symmetric=False, psd=True)
    indefinite = np.diag(np.concatenate([np.ones(N - 1), [-1.0]]))
    wrong = aslinearoperator(indefinite, psd=True)
    with pytest.warns(AssumptionWarning, match="declared positive semi-definite, but CG met"):
        x, info = cg(wrong, np.ones(N))
    assert info.reason is StopReason.NEGATIVE_CURVATURE
    with pytest.raises(FactorizationError, match="declared PSD"):
        nystrom(aslinearoperator(-spd(), psd=True), 2)


def test_warning_points_at_the_callers_line():
    with pytest.warns(AssumptionWarning) as record:
        eigsh(_operators()["undeclared"], 2)
    assert record[0].filename == __file__


def test_curvature_operators_declare_their_tags():
    import array_api_compat.numpy as xp

    from curvlinops import (
        CrossEntropyLoss,
        EFLinearOperator,
        FisherLinearOperator,
        GaussianNLLLoss,
        GGNLinearOperator,
        HessianLinearOperator,
        JacobianLinearOperator,
        KFACLinearOperator,
        nn,
    )

    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    params = model.init(0, xp=xp, dtype=xp.float64)
    rng = np.random.default_rng(0)
    data = [(rng.standard_normal((6, 3)), rng.integers(0, 2, size=6))]
    tags = {
        cls.__name__: (op.is_symmetric, op.is_psd)
        for cls in (
            GGNLinearOperator,
            FisherLinearOperator,
            EFLinearOperator,
            KFACLinearOperator,
            HessianLinearOperator,
            JacobianLinearOperator,
        )
        for op in [cls(model, CrossEntropyLoss(), params, data)]
    }
    assert tags == {
        "GGNLinearOperator": (True, True),
        "FisherLinearOperator": (True, True),
        "EFLinearOperator": (True, True),
        "KFACLinearOperator": (True, True),
        "HessianLinearOperator": (True, False),
        "JacobianLinearOperator": (False, False),
    }
    # The GGN of a loss with an indefinite Hessian (not in natural parameters) is not PSD.
    gauss = [(rng.standard_normal((6, 3)), rng.standard_normal((6, 1)))]
    assert not GGNLinearOperator(model, GaussianNLLLoss(), params, gauss).is_psd


# -- stop reasons ----------------------------------------------------------------------------


def test_stop_reason_members_are_strings_with_remedies():
    assert [m.value for m in StopReason] == [
        "converged",
        "maxiter",
        "negative_curvature",
        "nonfinite",
        "breakdown",
    ]
    for member in StopReason:
        assert member == member.value and str(member) == member.value
        assert f"{member}" == member.value and repr(member) == f"StopReason.{member.name}"
        assert isinstance(member.remedy, str) and len(member.remedy) > 20
    assert "maxiter" in StopReason.MAXITER.remedy and "preconditioner" in StopReason.MAXITER.remedy
    assert "damping" in StopReason.NEGATIVE_CURVATURE.remedy
    assert "minres" in StopReason.NEGATIVE_CURVATURE.remedy


def test_solve_info_holds_members_also_per_column():
    A = aslinearoperator(spd(), psd=True)
    _, info = cg(A, B)
    assert info.reason is StopReason.CONVERGED
    _, info = minres(A, np.stack([B, 0 * B], axis=1), maxiter=1)
    assert all(isinstance(r, StopReason) for r in info.reason)
    assert info.reason == ["maxiter", "converged"]


def test_strict_inverse_names_the_remedy():
    Ainv = CGInverseLinearOperator(aslinearoperator(spd(), psd=True), maxiter=1, strict=True)
    with pytest.raises(ConvergenceError, match=r"\(0, maxiter\).*Increase maxiter"):
        Ainv @ np.eye(N)[:, :2]


# -- the public input check ----------------------------------------------------------------


def test_check_input_reports_what_callers_need():
    A = aslinearoperator(np.ones((3, 4)))
    checked = A.check_input(np.ones(4, dtype=np.float32))
    assert isinstance(checked, CheckedInput)
    assert checked.is_vector and checked.num_columns == 1 and checked.array.dtype == np.float64
    assert checked.matrix.shape == (4, 1) and checked.restore(np.ones((3, 1))).shape == (3,)
    assert A.check_input(np.ones((3, 2)), adjoint=True).num_columns == 2
    with pytest.raises(ValueError, match=r"expected a vector of shape \(4,\), got shape \(4, 1\)"):
        A.check_input(np.ones((4, 1)), ndim=1, what="vector")
    with pytest.raises(TypeError, match="got a list"):
        A.check_input([1.0, 2.0, 3.0, 4.0])
    with pytest.raises(TypeError, match="array_api_strict"):
        A.check_input(array_api_strict.asarray(np.ones(4)))
    f32 = aslinearoperator(np.ones((2, 2), dtype=np.float32))
    with pytest.raises(TypeError, match="float32 and cannot take a float64"):
        f32.check_input(np.ones(2))


# -- whole messages: a changed word or letter case is a changed message ---------------------

_DECLARE_TEXT = (
    "Declare it to skip this check: aslinearoperator(A, {tag}=True), {tag}=True in the "
    "operator's constructor, or a class-level tag on your operator class."
)
_PSD_REMEDY_TEXT = {
    "cg": (
        "If it is indefinite, CG stops with StopReason.NEGATIVE_CURVATURE: add damping "
        "or use minres. "
    ),
    "nystrom": "If it is indefinite, the sketch fails: use eigsh instead. ",
}


def _assumption_messages(call, A):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        call(A)
    return [str(w.message) for w in caught if issubclass(w.category, AssumptionWarning)]


@pytest.mark.parametrize("name", sorted(ASSUMES))
def test_structure_warnings_in_full(name):
    call, _ = SOLVERS[name]
    ops = _operators()
    psd = ASSUMES[name] == "psd"
    needs = "symmetric positive semi-definite" if psd else "symmetric"
    probed = (
        f"{name} assumes a {needs} operator, but the DenseLinearOperator is not declared "
        "symmetric; a random symmetry probe passed (one extra product), so it runs. "
        + _DECLARE_TEXT.format(tag="psd" if psd else "symmetric")
    )
    assert _assumption_messages(call, ops["undeclared"]) == [probed]
    if psd:
        only_symmetric = (
            f"{name} assumes a positive semi-definite operator, but the DenseLinearOperator "
            "is only declared symmetric. "
            + _PSD_REMEDY_TEXT.get(name, "")
            + _DECLARE_TEXT.format(tag="psd")
        )
        assert _assumption_messages(call, ops["symmetric"]) == [only_symmetric]
    with pytest.raises(ValueError) as info:
        call(ops["nonsymmetric"])
    number = r"-?[0-9.]+(e[-+][0-9]+)?"
    assert re.fullmatch(
        rf"{name} needs a symmetric operator, but the DenseLinearOperator is not: for random "
        rf"x, y, y\^T A x = {number} and x\^T A y = {number} \(relative difference {number} "
        rf"> {number}\)\. Symmetrize it \(0\.5 \* \(A \+ A\.T\)\), solve the normal equations "
        r"\(A\.T @ A\) for a linear system, or declare symmetric=True if it is symmetric in "
        r"exact arithmetic\.",
        str(info.value),
    )


PRECONDITIONED = {
    "cg": lambda A, M: cg(A, B, M=M),
    "minres": lambda A, M: minres(A, B, M=M),
    "CGInverseLinearOperator": lambda A, M: CGInverseLinearOperator(A, M=M),
    "MINRESInverseLinearOperator": lambda A, M: MINRESInverseLinearOperator(A, M=M),
    "NeumannInverseLinearOperator": lambda A, M: NeumannInverseLinearOperator(A, 3, 0.1, M=M),
}


@pytest.mark.parametrize("name", sorted(PRECONDITIONED))
def test_preconditioner_errors_in_full(name):
    call = PRECONDITIONED[name]
    A = aslinearoperator(spd(), psd=True)
    cases = [
        (
            TypeError,
            [[1.0]],
            f"{name} needs a LinearOperator or a 2-D array as preconditioner M, got a list.",
        ),
        (
            ValueError,
            np.eye(3),
            f"{name}: the preconditioner M must have the operator's shape ({N}, {N}); got "
            "shape (3, 3).",
        ),
        (
            TypeError,
            array_api_strict.asarray(np.eye(N)),
            f"{name}: the preconditioner works on array_api_strict arrays but the operator on "
            "numpy arrays; build both in one library.",
        ),
        (
            TypeError,
            np.eye(N, dtype=np.float32),
            f"{name}: the preconditioner has dtype float32 but the operator float64; build "
            "both in one dtype.",
        ),
    ]
    for error, M, expected in cases:
        with pytest.raises(error) as info:
            call(A, M)
        assert str(info.value) == expected


@pytest.mark.parametrize("call", [spectral_density, log_spectral_density])
def test_spectral_density_options_in_full(call):
    """Each option is named in its own message (the shared check of both densities)."""
    who = call.__name__
    A = aslinearoperator(spd(), psd=True)
    cases = [
        ({"num_probes": 0}, f"{who}: num_probes must be an integer >= 1, got 0."),
        ({"lanczos_steps": 0}, f"{who}: lanczos_steps must be an integer >= 1, got 0."),
        ({"num_points": 1}, f"{who}: num_points must be an integer >= 2, got 1."),
        ({"kappa": 1.0}, f"{who}: kappa must be finite and > 1.0, got 1.0."),
        ({"margin": -0.5}, f"{who}: margin must be finite and >= 0.0, got -0.5."),
        (
            {"distribution": "x"},
            f"{who}: unknown distribution='x'; use one of 'rademacher', 'normal'.",
        ),
    ]
    for options, expected in cases:
        with pytest.raises(ValueError) as info:
            call(A, **options)
        assert str(info.value) == expected


def _krylov_option_cases(who):
    """``(error, options, message)`` of the options that the Krylov solvers and inverses
    share (checked by one helper, named by each caller)."""
    return [
        (ValueError, {"rtol": -1.0}, f"{who}: rtol must be finite and >= 0.0, got -1.0."),
        (ValueError, {"atol": -2}, f"{who}: atol must be finite and >= 0.0, got -2.0."),
        (ValueError, {"rtol": float("inf")}, f"{who}: rtol must be finite and >= 0.0, got inf."),
        (TypeError, {"atol": "0"}, f"{who}: atol must be a real number, got '0'."),
        (TypeError, {"rtol": True}, f"{who}: rtol must be a real number, got True."),
        (ValueError, {"maxiter": -1}, f"{who}: maxiter must be an integer >= 0, got -1."),
        (TypeError, {"maxiter": 2.0}, f"{who}: maxiter must be an integer >= 0, got 2.0."),
        (ValueError, {"damping": float("nan")}, f"{who}: damping must be finite, got nan."),
        (TypeError, {"damping": None}, f"{who}: damping must be a real number, got None."),
    ]


@pytest.mark.parametrize("solve", [cg, minres])
def test_krylov_solver_options_in_full(solve):
    A = aslinearoperator(spd(), psd=True)
    for error, options, expected in _krylov_option_cases(solve.__name__):
        with pytest.raises(error) as info:
            solve(A, B, **options)
        assert str(info.value) == expected


@pytest.mark.parametrize("make", [CGInverseLinearOperator, MINRESInverseLinearOperator])
def test_krylov_inverse_options_in_full(make):
    A = aslinearoperator(spd(), psd=True)
    for error, options, expected in _krylov_option_cases(make.__name__):
        with pytest.raises(error) as info:
            make(A, **options)
        assert str(info.value) == expected
    if make is CGInverseLinearOperator:
        with pytest.raises(ValueError) as info:
            make(A, damping=-1.0)
        assert str(info.value) == (
            "CGInverseLinearOperator: damping must be >= 0, got -1.0. CG needs A + damping I "
            "positive definite, which a negative damping can break without notice (CG then "
            "stops at the first direction of negative curvature and returns a partial solve, "
            "e.g. zeros). For an indefinite shift use MINRESInverseLinearOperator, or the "
            "exact inverse(damping) of a structured operator."
        )
    else:
        assert make(A, damping=-1.0).options["damping"] == -1.0


@pytest.mark.parametrize("make", [CGInverseLinearOperator, MINRESInverseLinearOperator])
def test_krylov_inverse_lives_on_the_operators_device(make):
    device = array_api_strict.Device("device1")
    A = aslinearoperator(array_api_strict.asarray(spd(), device=device), psd=True)
    Ainv = make(A, rtol=1e-12)
    assert Ainv.device == device and A.device == device
    x = array_api_strict.asarray(np.ones(N))  # the default device
    with pytest.raises(ValueError) as info:
        Ainv @ x
    assert str(info.value) == (
        f"The vector is on device {x.device}, the operator on {device}. Move it first; "
        "curvlinops never copies between devices inside a product."
    )
    y = Ainv @ array_api_strict.asarray(np.ones(N), device=device)
    assert y.device == device
    y = np.asarray(y.to_device(array_api_strict.Device("CPU_DEVICE")))
    np.testing.assert_allclose(y, np.linalg.solve(spd(), np.ones(N)), rtol=1e-9)


def test_the_symmetry_probe_runs_on_the_operators_device(backend):
    """The probe's random vectors are drawn on the operator's device (array-api-strict's
    second device here; an array on another device would be refused by the product)."""
    A = np.array([[4.0, 1.0, 0.0], [1.0, 3.0, 1.0], [0.0, 1.0, 2.0]])
    b = np.array([1.0, -2.0, 0.5])
    op = aslinearoperator(backend.asarray(A))  # symmetry not declared: probed
    with pytest.warns(AssumptionWarning, match="a random symmetry probe passed"):
        x, info = cg(op, backend.asarray(b), rtol=1e-12)
    np.testing.assert_allclose(backend.to_numpy(x), np.linalg.solve(A, b), rtol=1e-10)
