"""The runner of the table-driven message tests (``tests/*/test_*_messages.py``).

A case is ``(id, trigger, kind, expected)``: calling ``trigger()`` raises an exception
of exactly type ``kind``, or warns exactly one warning of category ``kind``, whose
message is ``expected``: a string spelled out in full, or a compiled pattern that must
match all of it (for run-time numbers; every word still spelled out).

May import: the standard library and pytest.
"""

from __future__ import annotations

import re
import warnings

import pytest


def message_of(trigger, kind) -> str:
    """The message of the exception or single warning of type ``kind`` from ``trigger``."""
    if issubclass(kind, Warning):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trigger()
        messages = [str(w.message) for w in caught if w.category is kind]
        assert len(messages) == 1, [str(w.message) for w in caught]
        return messages[0]
    with pytest.raises(kind) as excinfo:
        trigger()
    assert type(excinfo.value) is kind
    return str(excinfo.value)


def assert_message(trigger, kind, expected) -> None:
    message = message_of(trigger, kind)
    if isinstance(expected, re.Pattern):
        assert expected.fullmatch(message), message
    else:
        assert message == expected


def message_cases(cases):
    """``pytest.mark.parametrize`` over the cases' ``(trigger, kind, expected)``."""
    return pytest.mark.parametrize(
        ("trigger", "kind", "expected"), [case[1:] for case in cases], ids=[c[0] for c in cases]
    )
