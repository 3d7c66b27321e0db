"""Sphinx extension: autosummary summaries do not end inside an inline literal.

Autosummary shows the first sentence of each docstring and cuts at the first period
followed by a space. Sphinx 9 means to skip cuts that break inline markup but checks
the uncut text, so a summary such as ``A_1 x A_2 x ... x A_F`` is cut after the first
``.`` of the ellipsis, leaving an unterminated literal (a docutils warning, an error
under ``-W``). This extension hides the periods inside ``double-backtick`` literals
and ``:math:`` roles while autosummary looks for the end of the sentence, and puts them
back afterwards.

May import: the standard library, sphinx.
"""

from __future__ import annotations

import re

_PROTECTED = re.compile(r"``.+?``|:math:`[^`]+`")
_HIDDEN_PERIOD = "\u2024"  # ONE DOT LEADER: not a sentence end for autosummary


def _hide_periods(line: str) -> str:
    return _PROTECTED.sub(lambda m: m.group(0).replace(".", _HIDDEN_PERIOD), line)


def _wrap(extract_summary):
    def extract_summary_keeping_literals(doc, settings):
        summary = extract_summary([_hide_periods(line) for line in doc], settings)
        return summary.replace(_HIDDEN_PERIOD, ".")

    extract_summary_keeping_literals.__wrapped__ = extract_summary
    return extract_summary_keeping_literals


def setup(app):
    import sphinx.ext.autosummary as autosummary

    if not hasattr(autosummary.extract_summary, "__wrapped__"):
        autosummary.extract_summary = _wrap(autosummary.extract_summary)
    return {"version": "1", "parallel_read_safe": True, "parallel_write_safe": True}
