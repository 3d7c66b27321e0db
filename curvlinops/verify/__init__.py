"""Checks a user runs on their own model or operator: finite differences, dot-product
tests, symmetry and PSD probes.

Every check returns a :class:`VerificationReport` (``print`` it, or call
``raise_if_failed()``). This subpackage is a namespace: use ``curvlinops.verify.check_vjp``.

May import: every other layer of curvlinops.
"""

from .model_checks import (
    check_jvp,
    check_layer_protocol,
    check_layer_taps,
    check_second_order,
    check_vjp,
    verify_model,
)
from .operator_checks import check_adjoint, check_psd, check_symmetric
from .report import VerificationError, VerificationReport

__all__ = [
    "VerificationError",
    "VerificationReport",
    "check_adjoint",
    "check_jvp",
    "check_layer_protocol",
    "check_layer_taps",
    "check_psd",
    "check_second_order",
    "check_symmetric",
    "check_vjp",
    "verify_model",
]
