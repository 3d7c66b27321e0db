"""Sphinx configuration of the curvlinops documentation.

Build: ``sphinx-build -W --keep-going -b html docs docs/_build/html`` (no network
needed: intersphinx is off, the theme is the bundled alabaster).
"""

import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent
sys.path.insert(0, str(DOCS / "_ext"))
sys.path.insert(0, str(DOCS.parent))

import curvlinops  # noqa: E402

project = "curvlinops"
author = "curvlinops developers"
copyright = "curvlinops developers"
release = curvlinops.__version__
version = ".".join(release.split(".")[:2])

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.mathjax",
    "numpydoc",
    "api_coverage",
    "summary_literals",
]

templates_path = ["_templates"]
exclude_patterns = ["_build"]
root_doc = "index"

autosummary_generate = True
autosummary_imported_members = False
autodoc_member_order = "bysource"
autodoc_typehints = "none"
autodoc_default_options = {"members": False}

numpydoc_show_class_members = False
numpydoc_class_members_toctree = False
numpydoc_xref_param_type = False

default_role = "py:obj"
pygments_style = "sphinx"

html_theme = "alabaster"
html_title = f"curvlinops {release}"
html_theme_options = {
    "description": "Curvature as linear operators on any array-API backend",
    "fixed_sidebar": True,
}
