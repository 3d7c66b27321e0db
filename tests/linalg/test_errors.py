"""Bad input: every mistake raises a clear exception naming what was expected and found.

Wrong shapes raise ValueError, wrong libraries and dtypes TypeError, failed
factorizations FactorizationError with a hint to add damping; no NaN comes back.
"""

from __future__ import annotations

import numpy as np
import pytest

from curvlinops import (
    BlockDiagonalLinearOperator,
    DenseLinearOperator,
    DiagonalLinearOperator,
    EighLinearOperator,
    FactorizationError,
    IdentityLinearOperator,
    KroneckerEighLinearOperator,
    KroneckerLinearOperator,
    aslinearoperator,
)


def _other_library_array(backend, a):
    """The same data in another array library than ``backend``'s."""
    if backend.name != "numpy":
        return np.asarray(a)
    import array_api_strict  # installed with the test extra, unlike torch

    return array_api_strict.asarray(np.asarray(a))


def test_wrong_shape(backend):
    op = DenseLinearOperator(backend.asarray(np.ones((3, 4))))
    with pytest.raises(ValueError, match=r"\(4,\).*got shape \(3,\)"):
        op @ backend.asarray(np.ones(3))
    with pytest.raises(ValueError, match=r"\(4, k\).*got shape \(3, 2\)"):
        op @ backend.asarray(np.ones((3, 2)))
    with pytest.raises(ValueError, match=r"\(3,\).*got shape \(4,\)"):
        op.rmatvec(backend.asarray(np.ones(4)))
    with pytest.raises(ValueError, match="3 dimensions"):
        op @ backend.asarray(np.ones((4, 2, 1)))


def test_wrong_namespace(backend):
    op = KroneckerLinearOperator(backend.asarray(np.eye(2)), backend.asarray(np.eye(2)))
    x = _other_library_array(backend, np.ones(4))
    other = "array_api_strict" if backend.name == "numpy" else "numpy"
    with pytest.raises(TypeError) as info:
        op.matvec(x)
    assert backend.name in str(info.value) and other in str(info.value)


def test_higher_precision_input_rejected(backend):
    op = DiagonalLinearOperator(backend.asarray(np.ones(3), "float32"))
    with pytest.raises(TypeError, match="float32.*float64"):
        op @ backend.asarray(np.ones(3), "float64")
    # lower precision is promoted losslessly
    result = DiagonalLinearOperator(backend.asarray(np.ones(3))) @ backend.asarray(
        np.ones(3), "float32"
    )
    assert result.dtype == backend.dtype("float64")


def test_mixed_dtypes_of_parts(backend):
    a32 = backend.asarray(np.eye(2), "float32")
    a64 = backend.asarray(np.eye(2), "float64")
    for build in (
        lambda: KroneckerLinearOperator(a32, a64),
        lambda: BlockDiagonalLinearOperator([a32, DiagonalLinearOperator(a64[0, ...])]),
        lambda: EighLinearOperator(backend.asarray(np.ones(2), "float32"), a64),
        lambda: KroneckerEighLinearOperator(backend.asarray(np.ones(4), "float64"), [a32, a32]),
    ):
        with pytest.raises(TypeError) as info:
            build()
        assert "float32" in str(info.value) and "float64" in str(info.value)


def test_mixed_namespaces_of_parts(backend):
    mine = backend.asarray(np.eye(2))
    other = _other_library_array(backend, np.eye(2))
    other_name = "array_api_strict" if backend.name == "numpy" else "numpy"
    for build in (
        lambda: KroneckerLinearOperator(mine, other),
        lambda: BlockDiagonalLinearOperator([mine, other]),
        lambda: EighLinearOperator(backend.asarray(np.ones(2)), other),
    ):
        with pytest.raises(TypeError) as info:
            build()
        assert other_name in str(info.value)


def test_shape_errors(backend):
    eye = backend.asarray(np.eye(3))
    with pytest.raises(ValueError, match=r"\(n,\).*\(3, 3\)"):
        DiagonalLinearOperator(eye)
    with pytest.raises(ValueError, match=r"k <= n.*\(2, 3\)"):
        EighLinearOperator(backend.asarray(np.ones(3)), backend.asarray(np.ones((2, 3))))
    with pytest.raises(ValueError, match=r"\(3,\).*\(2,\)"):
        EighLinearOperator(backend.asarray(np.ones(2)), eye)
    with pytest.raises(ValueError, match=r"\(6,\).*\(5,\)"):
        KroneckerEighLinearOperator(backend.asarray(np.ones(5)), [backend.asarray(np.eye(2)), eye])
    with pytest.raises(ValueError, match="square"):
        KroneckerEighLinearOperator(backend.asarray(np.ones(6)), [backend.asarray(np.ones((2, 3)))])
    with pytest.raises(ValueError, match=r"2-D.*\(3,\)"):
        KroneckerLinearOperator(eye, backend.asarray(np.ones(3)))
    with pytest.raises(ValueError, match=r"2-D.*\(3,\)"):
        BlockDiagonalLinearOperator([backend.asarray(np.ones(3))])
    with pytest.raises(ValueError, match="at least one"):
        KroneckerLinearOperator()
    with pytest.raises(ValueError, match="at least one"):
        BlockDiagonalLinearOperator([])
    with pytest.raises(ValueError, match="square"):
        DenseLinearOperator(backend.asarray(np.ones((2, 3)))).inverse()
    with pytest.raises(TypeError, match="LinearOperator or a 2-D array"):
        KroneckerLinearOperator([[1.0]], eye)


def test_singular_kronecker_factor(backend):
    singular = backend.asarray(np.array([[1.0, 2.0], [2.0, 4.0]]))
    K = KroneckerLinearOperator(backend.asarray(np.eye(3)), singular)
    with pytest.raises(FactorizationError, match="factor 1.*damping"):
        K.inverse()
    # with damping the exact inverse exists and matches NumPy
    ref = np.kron(np.eye(3), [[1.0, 2.0], [2.0, 4.0]]) + 0.1 * np.eye(6)
    np.testing.assert_allclose(
        backend.to_numpy(K.inverse(damping=0.1).to_dense()), np.linalg.inv(ref), rtol=1e-10
    )
    with pytest.raises(FactorizationError, match="factor 1.*damping"):
        K.logdet()


def test_singular_diagonal(backend):
    D = DiagonalLinearOperator(backend.asarray(np.array([1.0, 0.0, 2.0])))
    with pytest.raises(FactorizationError, match="damping"):
        D.inverse()
    with pytest.raises(FactorizationError, match="damping"):
        D.logdet()
    np.testing.assert_allclose(
        backend.to_numpy(D.inverse(damping=1.0).diagonal()), [0.5, 1.0, 1 / 3], rtol=1e-12
    )


def test_singular_dense(backend):
    # JAX returns inf/NaN instead of raising; the operator must raise anyway.
    A = DenseLinearOperator(backend.asarray(np.array([[1.0, 2.0], [0.0, 0.0]])))
    with pytest.raises(FactorizationError, match="damping"):
        A.inverse()
    with pytest.raises(FactorizationError, match="damping"):
        A.logdet()


def test_negative_determinant_logdet(backend):
    A = DenseLinearOperator(backend.asarray(np.array([[0.0, 1.0], [1.0, 0.0]])))
    with pytest.raises(ValueError, match="positive determinant"):
        A.logdet()
    D = DiagonalLinearOperator(backend.asarray(np.array([-1.0, 2.0])))
    with pytest.raises(ValueError, match="positive determinant"):
        D.logdet()


def test_low_rank_needs_damping(backend):
    Q = backend.asarray(np.eye(3)[:, :2])
    E = EighLinearOperator(backend.asarray(np.array([1.0, 2.0])), Q)
    with pytest.raises(FactorizationError, match="damping"):
        E.inverse()
    with pytest.raises(FactorizationError, match="damping"):
        E.logdet()
    with pytest.raises(FactorizationError, match="damping"):
        E.inverse(damping=-1.0)  # -1 + 1 = 0


def test_nonsymmetric_factor_damped_inverse(backend):
    K = KroneckerLinearOperator(
        backend.asarray(np.array([[2.0, 1.0], [0.0, 2.0]])), backend.asarray(np.eye(2))
    )
    with pytest.raises(NotImplementedError, match="factor 0 is not symmetric"):
        K.inverse(damping=0.1)


def test_identity_damping_minus_one(backend):
    eye = IdentityLinearOperator(3, xp=backend.xp, dtype=backend.dtype("float64"))
    with pytest.raises(FactorizationError):
        eye.inverse(damping=-1.0)


def test_scalar_addition(backend):
    op = DenseLinearOperator(backend.asarray(np.eye(2)))
    with pytest.raises(TypeError, match="damped"):
        op + 1.0
    with pytest.raises(TypeError):
        1.0 + op


def test_mismatched_algebra(backend):
    A = DenseLinearOperator(backend.asarray(np.eye(2)))
    B = DenseLinearOperator(backend.asarray(np.eye(3)))
    with pytest.raises(ValueError, match="shapes"):
        A + B
    with pytest.raises(ValueError, match="inner dimensions"):
        A @ B
    C = DenseLinearOperator(backend.asarray(np.eye(2), "float32"))
    with pytest.raises(TypeError, match="float64.*float32"):
        A + C


# -- whole messages (NumPy): a changed word or case is a changed message ------------------


def _raises_exactly(error, expected, call):
    """``call()`` raises ``error`` whose message is exactly ``expected``."""
    with pytest.raises(error) as info:
        call()
    assert str(info.value) == expected


def test_product_messages_in_full():
    A = DenseLinearOperator(np.ones((3, 4)))
    where = "DenseLinearOperator of shape (3, 4) expected a"
    cases = [
        (lambda: A.matvec(np.ones(3)), f"{where} vector of shape (4,), got shape (3,)."),
        (lambda: A.matmat(np.ones((3, 2))), f"{where} matrix of shape (4, k), got shape (3, 2)."),
        (lambda: A.rmatvec(np.ones(4)), f"{where} vector of shape (3,), got shape (4,)."),
        (lambda: A.rmatmat(np.ones((4, 2))), f"{where} matrix of shape (3, k), got shape (4, 2)."),
        (lambda: A.matmat(np.ones(4)), f"{where} matrix of shape (4, k), got shape (4,)."),
        (lambda: A.rmatvec(np.ones((3, 1))), f"{where} vector of shape (3,), got shape (3, 1)."),
    ]
    for call, expected in cases:
        _raises_exactly(ValueError, expected, call)
    _raises_exactly(
        ValueError,
        "A @ x needs x of shape (4,) or (4, k); got an array with 3 dimensions, shape (4, 2, 1).",
        lambda: A @ np.ones((4, 2, 1)),
    )
    for python_object, kind in (([1.0, 2.0, 3.0, 4.0], "list"), ((1.0, 2.0, 3.0, 4.0), "tuple")):
        _raises_exactly(
            TypeError,
            "A @ x needs x as an array of the operator's library (numpy), got a Python "
            f"{kind}. Convert it first, e.g. A @ xp.asarray(x, dtype=A.dtype).",
            lambda obj=python_object: A @ obj,
        )
    _raises_exactly(
        TypeError,
        "DenseLinearOperator expected the vector to be an array of its library (numpy), got "
        "a list.",
        lambda: A.matvec([1.0, 2.0, 3.0, 4.0]),
    )


def test_dtype_and_device_messages_in_full():
    A = DenseLinearOperator(np.ones((2, 2)))
    _raises_exactly(
        TypeError,
        "DenseLinearOperator is a real (float64) operator and takes real vectors; got a "
        "complex128 one. Apply it to the real and imaginary parts separately: "
        "A @ x.real + 1j * (A @ x.imag).",
        lambda: A.matvec(np.ones(2) * 1j),
    )
    A32 = DenseLinearOperator(np.ones((2, 2), dtype=np.float32))
    _raises_exactly(
        TypeError,
        "DenseLinearOperator has dtype float32 and cannot take a float64 matrix without "
        "losing precision. Convert the matrix to float32, or build the operator in float64.",
        lambda: A32.matmat(np.ones((2, 3))),
    )
    import array_api_strict as xs

    on_device1 = DenseLinearOperator(xs.asarray(np.ones((2, 2)), device=xs.Device("device1")))
    x = xs.asarray(np.ones(2))  # the default device
    _raises_exactly(
        ValueError,
        f"The vector is on device {x.device}, the operator on {xs.Device('device1')}. Move it "
        "first; curvlinops never copies between devices inside a product.",
        lambda: on_device1 @ x,
    )


def test_repr_names_the_class_shape_dtype_and_library():
    import array_api_strict as xs

    assert repr(DenseLinearOperator(np.ones((3, 4)))) == (
        "<3x4 DenseLinearOperator dtype=float64 namespace=numpy>"
    )
    D = DiagonalLinearOperator(xs.asarray(np.ones(2), dtype=xs.float32))
    assert repr(D) == "<2x2 DiagonalLinearOperator dtype=float32 namespace=array_api_strict>"
    assert repr(D + D) == "<2x2 SumLinearOperator dtype=float32 namespace=array_api_strict>"


def test_block_diagonal_queries_need_square_blocks():
    B = BlockDiagonalLinearOperator([np.ones((2, 3)), np.ones((3, 2))])  # 5 x 5, blocks not
    queries = {
        "inverse": B.inverse,
        "trace": B.trace,
        "diagonal": B.diagonal,
        "logdet": B.logdet,
        "eigvalsh": B.eigvalsh,
    }
    for query, call in queries.items():
        _raises_exactly(
            NotImplementedError,
            f"{query} of a block-diagonal operator needs square blocks; block 0 has shape (2, 3).",
            call,
        )
    tall = BlockDiagonalLinearOperator([np.eye(2), np.ones((2, 1))])  # 4 x 3
    _raises_exactly(
        ValueError,
        "trace needs a square operator; BlockDiagonalLinearOperator has shape (4, 3).",
        tall.trace,
    )
    square_then_not = BlockDiagonalLinearOperator([np.eye(2), np.ones((1, 2)), np.ones((2, 1))])
    _raises_exactly(
        NotImplementedError,
        "diagonal of a block-diagonal operator needs square blocks; block 1 has shape (1, 2).",
        square_then_not.diagonal,
    )


def test_dense_spectra_need_a_symmetric_declaration():
    A = DenseLinearOperator(np.eye(2))  # symmetric in fact, not declared
    for query in ("eigh", "eigvalsh"):
        _raises_exactly(
            NotImplementedError,
            f"{query} needs a dense operator declared symmetric (symmetric=True).",
            getattr(A, query),
        )


def test_kronecker_names_must_match_the_factors():
    _raises_exactly(
        ValueError,
        "Expected 2 factor names, got 1.",
        lambda: KroneckerLinearOperator(np.eye(2), np.eye(2), names=["A"]),
    )


def test_arrays_of_another_library_are_named_with_the_argument_and_both_libraries():
    xps = pytest.importorskip("array_api_strict")
    A = DenseLinearOperator(np.eye(2))
    cases = [
        (lambda: A @ xps.ones(2), "vector", "an array_api_strict", "numpy"),
        (lambda: A @ xps.ones((2, 3)), "matrix", "an array_api_strict", "numpy"),
        (lambda: A.rmatvec(xps.ones(2)), "vector", "an array_api_strict", "numpy"),
        (lambda: DenseLinearOperator(xps.eye(2)) @ np.ones(2), "vector", "a numpy",
         "array_api_strict"),
    ]  # fmt: skip
    for call, what, found, expected in cases:
        with pytest.raises(TypeError) as err:
            call()
        assert str(err.value) == (
            f"The {what} is {found} array, but the operator works on {expected} arrays. "
            "Convert it first (same library and device)."
        )


def test_sums_and_products_of_mixed_operators_name_both_sides():
    xps = pytest.importorskip("array_api_strict")
    A, A32 = DenseLinearOperator(np.eye(2)), DenseLinearOperator(np.eye(2, dtype=np.float32))
    strict = DenseLinearOperator(xps.eye(2, dtype=xps.float64))
    for kind, combine in (("sum", lambda a, b: a + b), ("product", lambda a, b: a @ b)):
        with pytest.raises(TypeError) as err:
            combine(A, A32)
        assert str(err.value) == (
            f"Cannot form the {kind} of operators of dtypes float64 and float32; build both "
            "in one dtype."
        )
        with pytest.raises(TypeError) as err:
            combine(A, strict)
        assert str(err.value) == (
            f"Cannot form the {kind} of a numpy operator and an array_api_strict operator."
        )


def test_kronecker_queries_of_non_square_factors_name_the_query():
    K = KroneckerLinearOperator(np.ones((2, 3)), np.eye(2))
    for query, call in (("inverse", K.inverse), ("An eigendecomposition", K.factor_eigh)):
        with pytest.raises(ValueError) as err:
            call()
        assert str(err.value) == (
            f"{query} needs a square operator; KroneckerLinearOperator has shape (4, 6)."
        )


def test_a_scipy_operator_keeps_the_declared_symmetry():
    import scipy.sparse.linalg

    wrapped = scipy.sparse.linalg.aslinearoperator(np.eye(3))
    assert aslinearoperator(wrapped, symmetric=True).is_symmetric
    assert not aslinearoperator(wrapped).is_symmetric
    assert aslinearoperator(wrapped, psd=True).is_psd


@pytest.mark.parametrize("shape", [(-1, 2), (2, -3), (2.0, 2), (2,), (2, 2, 2)])
def test_operator_shapes_must_be_pairs_of_non_negative_integers(shape):
    import array_api_compat.numpy as npx

    from curvlinops import CallableLinearOperator

    with pytest.raises(ValueError) as err:
        CallableLinearOperator(shape, matmat=lambda X: X, dtype=npx.float64, xp=npx)
    assert str(err.value) == f"shape must be a pair of non-negative integers, got {shape}."


def test_bad_kronecker_factors_are_named_by_position():
    for factors, error, expected in (
        (("x", np.eye(2)), TypeError,
         "The Kronecker factor 0 must be a LinearOperator or a 2-D array, got a str."),
        ((np.eye(2), np.ones(3)), ValueError,
         "The Kronecker factor 1 must be a 2-D array of shape (m, n), got shape (3,)."),
    ):  # fmt: skip
        with pytest.raises(error) as err:
            KroneckerLinearOperator(*factors)
        assert str(err.value) == expected


@pytest.mark.parametrize("shape", [(3, 0), (0, 3), (0, 0)])
def test_operators_of_zero_size_apply_to_empty_vectors(shape):
    """Shapes with a zero dimension are valid: ``(m, 0) @ (0,)`` is ``m`` zeros."""
    A = np.zeros(shape)
    op = DenseLinearOperator(A)
    assert op.shape == shape
    np.testing.assert_array_equal(op @ np.ones(shape[1]), A @ np.ones(shape[1]))
    np.testing.assert_array_equal(op.T @ np.ones(shape[0]), A.T @ np.ones(shape[0]))
