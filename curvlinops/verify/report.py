"""The result of a verification check: :class:`VerificationReport` and :class:`VerificationError`.

May import: nothing of curvlinops.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["VerificationReport", "VerificationError"]


class VerificationError(AssertionError):
    """A verification check failed; the message names the product and the errors."""


@dataclass(frozen=True)
class VerificationReport:
    """Outcome of one check of a model's or an operator's products.

    Attributes
    ----------
    name : str
        The product that was checked (``"jvp"``, ``"vjp"``, ``"second_order_vjp"``,
        ``"layer_taps"``, ``"symmetry"``, ``"psd"``, ``"adjoint"``).
    passed : bool
        Whether the measured error is within the tolerance.
    error : float
        The measured (relative) error; NaN counts as failed.
    tolerance : float
        The largest error allowed.
    details : str
        How the error was measured (method, probes, step, values found).

    Examples
    --------
    >>> r = VerificationReport("vjp", False, 2e-3, 1e-8, "dot-product test")
    >>> print(r)
    [FAIL] vjp: error 2.000e-03 > tolerance 1.000e-08 (dot-product test)
    >>> r.raise_if_failed()
    Traceback (most recent call last):
    ...
    curvlinops.verify.report.VerificationError: vjp is wrong: measured error 2.000e-03 \
exceeds the allowed 1.000e-08 (dot-product test)
    """

    name: str
    passed: bool
    error: float
    tolerance: float
    details: str = ""

    @classmethod
    def from_error(cls, name, error, tolerance, details=""):
        """A report that passes when ``error <= tolerance`` (NaN fails)."""
        error = float(error)
        passed = math.isfinite(error) and error <= tolerance
        return cls(name, passed, error, float(tolerance), details)

    def raise_if_failed(self) -> VerificationReport:
        """Raise :class:`VerificationError` if the check failed; return the report otherwise."""
        if not self.passed:
            raise VerificationError(
                f"{self.name} is wrong: measured error {self.error:.3e} exceeds the allowed "
                f"{self.tolerance:.3e} ({self.details})"
            )
        return self

    def __str__(self) -> str:
        status, relation = ("PASS", "<=") if self.passed else ("FAIL", ">")
        text = (
            f"[{status}] {self.name}: error {self.error:.3e} {relation} tolerance "
            f"{self.tolerance:.3e}"
        )
        return f"{text} ({self.details})" if self.details else text
