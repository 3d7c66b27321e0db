"""Sphinx extension: every public name of curvlinops must appear on an API page.

A name is public when it is in the ``__all__`` of ``curvlinops`` or of one of its
public modules (no path component starts with an underscore). It is documented when
an ``autosummary`` list or an ``auto*`` directive under ``docs/api/`` names it, either
under the module that exports it or under any module that re-exports the same object
(the API pages document everything as ``curvlinops.X``).

The build reports each missing name as a warning (an error under ``sphinx-build -W``).
``tests/test_docs_api.py`` runs the same check without building the docs.

May import: the standard library, curvlinops, sphinx (only in :func:`setup`).
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import re
from pathlib import Path

PACKAGE = "curvlinops"

_DIRECTIVE = re.compile(r"^(\s*)\.\.\s+([\w:-]+)::\s*(.*?)\s*$")
_AUTO_DIRECTIVES = {
    "autoclass",
    "autofunction",
    "autodata",
    "autoexception",
    "automethod",
    "autoattribute",
    "py:class",
    "py:function",
    "py:data",
    "py:exception",
}


def documented_names(api_dir: Path) -> set[str]:
    """Fully qualified names that the ``.rst`` pages under ``api_dir`` document."""
    names: set[str] = set()
    for page in sorted(Path(api_dir).glob("*.rst")):
        names |= _names_on_page(page.read_text(encoding="utf-8"))
    return names


def _names_on_page(text: str) -> set[str]:
    names: set[str] = set()
    current_module = PACKAGE
    in_autosummary = False
    block_indent = 0
    for line in text.splitlines():
        match = _DIRECTIVE.match(line)
        if match:
            indent, directive, argument = match.groups()
            in_autosummary = directive == "autosummary"
            block_indent = len(indent)
            if directive in ("currentmodule", "module", "py:currentmodule", "py:module"):
                current_module = argument
            elif directive in _AUTO_DIRECTIVES and argument:
                names.add(_qualify(argument, current_module))
            continue
        if not in_autosummary or not line.strip():
            continue
        if len(line) - len(line.lstrip()) <= block_indent:
            in_autosummary = False
            continue
        entry = line.strip()
        if not entry.startswith(":"):
            names.add(_qualify(entry.split()[0], current_module))
    return names


def _qualify(name: str, module: str) -> str:
    name = name.lstrip("~")
    if name == PACKAGE or name.startswith(PACKAGE + "."):
        return name
    return f"{module}.{name}"


def public_modules(package: str = PACKAGE, errors: list | None = None) -> list:
    """``package`` and its public submodules, imported.

    A module that fails to import only because an optional third-party library is
    missing (e.g. ``cupy`` on a machine without a GPU) is skipped. Any other import
    error is raised, or, if ``errors`` is a list, appended to it as
    ``(module name, exception)`` and the module skipped.
    """
    root = importlib.import_module(package)
    modules = [root]
    for info in pkgutil.walk_packages(root.__path__, prefix=package + ".", onerror=_ignore):
        if any(part.startswith("_") for part in info.name.split(".")):
            continue
        try:
            modules.append(importlib.import_module(info.name))
        except ModuleNotFoundError as error:
            if error.name is not None and error.name.split(".")[0] != package:
                continue  # an optional third-party dependency is not installed
            if errors is None:
                raise
            errors.append((info.name, error))
        except Exception as error:
            if errors is None:
                raise
            errors.append((info.name, error))
    return modules


def _ignore(_name):
    return None


def resolve(qualified_name: str):
    """The object a dotted name refers to, or ``None`` if it does not exist."""
    parts = qualified_name.split(".")
    for split in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:split]))
        except ImportError:
            continue
        try:
            for attribute in parts[split:]:
                obj = getattr(obj, attribute)
        except AttributeError:
            return None
        return obj
    return None


def missing_names(api_dir: Path, package: str = PACKAGE, errors: list | None = None) -> list[str]:
    """Public names (``module.name``) that no page under ``api_dir`` documents.

    An object exported under several paths is reported once, under the shortest
    (``curvlinops.X`` rather than ``curvlinops.linalg.structured.X``). Import errors
    are raised, or collected in ``errors`` (see :func:`public_modules`).
    """
    documented = documented_names(api_dir)
    documented_objects = [resolve(name) for name in documented]
    missing = []
    reported = []  # objects already reported under a shorter path (re-exports)
    for module in public_modules(package, errors):
        for name in getattr(module, "__all__", ()):
            qualified = f"{module.__name__}.{name}"
            if qualified in documented:
                continue
            obj = getattr(module, name, None)
            if inspect.ismodule(obj):
                continue  # a subpackage: its own names are checked on their own
            if obj is None:
                missing.append(qualified)
            elif not any(obj is other for other in documented_objects + reported):
                missing.append(qualified)
                reported.append(obj)
    return sorted(set(missing))


def _check_api_coverage(app):
    from sphinx.util import logging

    logger = logging.getLogger(__name__)
    api_dir = Path(app.srcdir) / "api"
    errors = []
    missing = missing_names(api_dir, errors=errors)
    for module_name, error in errors:
        logger.warning(
            "cannot check the API coverage of %s: importing it failed with %r",
            module_name,
            error,
            location="api/index",
        )
    for name in missing:
        logger.warning(
            "public name %s is on no API page: add it to the autosummary list of the "
            "matching page in docs/api/ (see docs/api/index.rst)",
            name,
            location="api/index",
        )


def setup(app):
    app.connect("builder-inited", _check_api_coverage)
    return {"version": "1", "parallel_read_safe": True, "parallel_write_safe": True}
