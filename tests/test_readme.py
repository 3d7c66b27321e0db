"""The README's Python examples run as written (the quickstart is the first thing a new
user copies, so it must not rot)."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
_PYTHON_BLOCK = re.compile(r"^```python\n(.*?)^```", re.MULTILINE | re.DOTALL)
_IMPORT = re.compile(r"^\s*(?:import|from)\s+(\w+)", re.MULTILINE)


def python_blocks(text: str) -> list[str]:
    """The contents of the fenced ```python blocks of a Markdown text, in order."""
    return _PYTHON_BLOCK.findall(text)


def test_readme_has_a_quickstart():
    text = README.read_text(encoding="utf-8")
    assert "## Quickstart" in text
    assert python_blocks(text), "the README has no ```python block"


def test_python_blocks_are_found():
    text = "intro\n```python\nx = 1\n```\n```bash\nls\n```\n```python\ny = 2\n```\n"
    assert python_blocks(text) == ["x = 1\n", "y = 2\n"]


def missing_imports(block: str) -> list[str]:
    """Top-level modules a block imports that are not installed (optional backends)."""
    return [name for name in _IMPORT.findall(block) if importlib.util.find_spec(name) is None]


def test_missing_imports_are_detected():
    assert missing_imports("import numpy as np\nfrom not_a_module_xyz import a\n") == [
        "not_a_module_xyz"
    ]


def test_every_python_block_asserts_what_it_shows():
    # A block that only prints would pass whatever it printed (``False`` included).
    for number, block in enumerate(python_blocks(README.read_text(encoding="utf-8")), start=1):
        assert re.search(r"^\s*assert ", block, re.MULTILINE), f"README block {number}"


def test_readme_python_blocks_run(capsys):
    blocks = python_blocks(README.read_text(encoding="utf-8"))
    namespace: dict = {"__name__": "__readme__"}
    for number, block in enumerate(blocks, start=1):
        if number > 1 and missing_imports(block):
            continue  # an optional backend's example; the quickstart (block 1) always runs
        try:
            exec(compile(block, f"README.md python block {number}", "exec"), namespace)
        except Exception as error:
            pytest.fail(f"README python block {number} raised {error!r}:\n{block}")
    assert capsys.readouterr().out, "the quickstart should print its results"
