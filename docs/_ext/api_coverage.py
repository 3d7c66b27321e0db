"""Sphinx extension: every public name of curvlinops must appear on an API page.

A name is public when it is in the ``__all__`` of ``curvlinops`` or of one of its
public modules (no path component starts with an underscore). It is documented when
an ``autosummary`` list or an ``auto*`` directive under ``docs/api/`` names it, either
under the module that exports it or under any module that re-exports the same object
(the API pages document everything as ``curvlinops.X``).

The public members of a documented class are the names without a leading underscore
that the class or one of its curvlinops base classes defines (not those of ``object``,
``int``, ``Exception``, ``tuple``, ...): its methods, properties and class attributes,
inherited ones included. :func:`class_members` lists them; the class page template
(``docs/_templates/autosummary/class.rst``) shows exactly these, each with its
docstring, and every method and property must have one (its own or the one it
overrides).

The build reports each missing name and each method or property without a docstring
as a warning (an error under ``sphinx-build -W``). ``tests/test_docs_api.py`` runs the
same checks without building the docs.

May import: the standard library, curvlinops, sphinx (only in :func:`setup`).
"""

from __future__ import annotations

import functools
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


MEMBER_KINDS = ("methods", "properties", "attributes")

# Methods and properties known to lack a docstring, as ``defining class.member``. The
# check skips them, and tests/test_docs_api.py fails once one has a docstring, so that
# the entry is removed.
KNOWN_UNDOCUMENTED: set[str] = set()

_SECTION_RULE = re.compile(r"^\s*-{3,}\s*$")
_ATTRIBUTE_ENTRY = re.compile(r"^(\w+)\s*(?::.*)?$")


def class_members(cls) -> dict[str, list[str]]:
    """The public members of ``cls`` that its API page shows, by kind.

    Returns ``{"methods": [...], "properties": [...], "attributes": [...]}``, each
    sorted. A member is public when its name has no leading underscore and the class
    that defines it (``cls`` or the first base in the MRO that has it) belongs to
    curvlinops, so members of ``object``, ``int``, ``Exception`` or ``tuple`` are left
    out. Properties and attributes that the class docstring already describes in its
    ``Attributes`` section (dataclass and named-tuple fields) are left out too: numpydoc
    shows them there.
    """
    described = _attributes_section(inspect.getdoc(cls) or "")
    members: dict[str, list[str]] = {kind: [] for kind in MEMBER_KINDS}
    for name in sorted(dir(cls)):
        if name.startswith("_"):
            continue
        owner = _defining_class(cls, name)
        if owner is None or not _is_ours(owner):
            continue
        kind = _member_kind(vars(owner)[name])
        if kind != "methods" and name in described:
            continue
        members[kind].append(name)
    return members


def _defining_class(cls, name):
    return next((klass for klass in cls.__mro__ if name in vars(klass)), None)


def _is_ours(klass) -> bool:
    module = getattr(klass, "__module__", "") or ""
    return module == PACKAGE or module.startswith(PACKAGE + ".")


def _member_kind(raw) -> str:
    if isinstance(raw, (staticmethod, classmethod)) or inspect.isroutine(raw):
        return "methods"
    if isinstance(raw, (property, functools.cached_property)) or inspect.isdatadescriptor(raw):
        return "properties"
    return "attributes"


def _attributes_section(doc: str) -> set[str]:
    """Names listed in the numpydoc ``Attributes`` section of ``doc``."""
    lines = doc.splitlines()
    names: set[str] = set()
    for i in range(len(lines) - 1):
        if lines[i].strip() == "Attributes" and _SECTION_RULE.match(lines[i + 1]):
            indent = len(lines[i]) - len(lines[i].lstrip())
            for line in lines[i + 2 :]:
                if _SECTION_RULE.match(line):
                    break  # the rule under the next section's title
                if line.strip() and len(line) - len(line.lstrip()) == indent:
                    match = _ATTRIBUTE_ENTRY.match(line.strip())
                    if match:
                        names.add(match.group(1))
    return names


def documented_classes(api_dir: Path) -> dict[str, type]:
    """The classes the pages under ``api_dir`` document, by the name they use."""
    classes = {}
    for name in sorted(documented_names(api_dir)):
        obj = resolve(name)
        if inspect.isclass(obj):
            classes[name] = obj
    return classes


def member_listing(api_dir: Path) -> dict[str, dict[str, list[str]]]:
    """:func:`class_members` of every documented class, keyed by its documented name.

    The class page template reads this (as ``class_members`` in the autosummary
    context) to choose what to show.
    """
    return {name: class_members(cls) for name, cls in documented_classes(api_dir).items()}


def undocumented_members(api_dir: Path) -> list[str]:
    """Public methods and properties of documented classes that have no docstring.

    A member that overrides a documented one inherits its docstring (as autodoc
    shows it), so each is named by the most basic class that defines it
    (``module.Class.member``): a docstring there documents every override.
    :data:`KNOWN_UNDOCUMENTED` is skipped.
    """
    missing = set()
    for cls in documented_classes(api_dir).values():
        members = class_members(cls)
        for name in members["methods"] + members["properties"]:
            if _member_doc(cls, name):
                continue
            base = [klass for klass in cls.__mro__ if name in vars(klass)][-1]
            qualified = f"{base.__module__}.{base.__qualname__}.{name}"
            if qualified not in KNOWN_UNDOCUMENTED:
                missing.add(qualified)
    return sorted(missing)


def _member_doc(cls, name) -> str:
    """The docstring autodoc shows for ``cls.name``: its own or an overridden one's."""
    for klass in cls.__mro__:
        if name in vars(klass):
            raw = vars(klass)[name]
            doc = inspect.getdoc(getattr(raw, "__func__", raw))
            if doc:
                return doc
    return ""


def _set_member_listing(app, config):
    context = dict(config.autosummary_context or {})
    context["class_members"] = member_listing(Path(app.srcdir) / "api")
    config.autosummary_context = context


def public_bases(bases) -> list:
    """``bases`` with each private class (a name part starting with ``_``) replaced by
    its nearest public ancestors, so a class page never names a private class."""
    result = []
    for base in bases:
        if _is_private_class(base):
            candidates = public_bases(base.__bases__)
        else:
            candidates = [base]
        for candidate in candidates:
            if candidate not in result:
                result.append(candidate)
    return result


def _is_private_class(cls) -> bool:
    parts = f"{getattr(cls, '__module__', '')}.{cls.__qualname__}".split(".")
    return _is_ours(cls) and any(part.startswith("_") for part in parts)


def _process_bases(_app, _name, _obj, _options, bases):
    bases[:] = public_bases(bases)


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
    for name in undocumented_members(api_dir):
        logger.warning(
            "public member %s of a documented class has no docstring: add one (the "
            "class pages under docs/api/generated/ show every public member)",
            name,
            location="api/index",
        )


def setup(app):
    app.connect("config-inited", _set_member_listing)
    app.connect("builder-inited", _check_api_coverage)
    app.connect("autodoc-process-bases", _process_bases)
    return {"version": "1", "parallel_read_safe": True, "parallel_write_safe": True}
