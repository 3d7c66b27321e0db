"""Sphinx configuration of the curvlinops documentation.

Build from the repository root (the build needs no network: intersphinx is off; the
browser loads MathJax for the formulas from its CDN)::

    pip install -e ".[docs]"
    sphinx-build -W --keep-going -b html docs docs/_build/html

The API pages import every public module, the PyTorch and JAX frontends included, and
the gallery (``examples/plot_*.py``) runs its scripts, so the ``docs`` extra brings
torch, jax, the furo theme, sphinx-gallery, matplotlib and scikit-learn. Without them
the build stops here with the list of what is missing.
"""

import importlib.util
import os
import sys
from pathlib import Path

from sphinx.errors import ConfigError

DOCS = Path(__file__).resolve().parent
sys.path.insert(0, str(DOCS / "_ext"))
sys.path.insert(0, str(DOCS.parent))

# What the build imports, as (module, what needs it). Checked before anything else so
# that a missing one is named here, not deep inside an autodoc or gallery error.
_REQUIRED = [
    ("numpydoc", "the docstring format"),
    ("furo", "the HTML theme"),
    ("sphinx_gallery", "the gallery of examples"),
    ("sphinx-mathjax-offline", "the formulas, rendered without a network connection"),
    ("matplotlib", "the figures of the gallery"),
    ("sklearn", "the data sets of the gallery"),
    ("torch", "the API pages of curvlinops.frontends.torch and the gallery"),
    ("jax", "the API pages of curvlinops.frontends.jax and the gallery"),
]
_missing = [f"{name} ({why})" for name, why in _REQUIRED if importlib.util.find_spec(name) is None]
if _missing:
    raise ConfigError(
        "The curvlinops documentation needs packages that are not installed: "
        + ", ".join(_missing)
        + '. Install them with  pip install -e ".[docs]"  from the repository root.'
    )

import matplotlib  # noqa: E402

matplotlib.use("Agg")  # the gallery draws without a display

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
    # MathJax shipped with the docs, so formulas render without a network connection.
    "sphinx-mathjax-offline",
    "numpydoc",
    # after numpydoc: one compiled docstring template per build, not one per docstring
    "numpydoc_template_cache",
    "sphinx_gallery.gen_gallery",
    "api_coverage",
    "summary_literals",
    "titles_only_navigation",
]

templates_path = ["_templates"]
exclude_patterns = ["_build", "_generated"]
root_doc = "index"

# -- API reference -------------------------------------------------------------------
# Each class page (docs/_templates/autosummary/class.rst) shows the class docstring,
# tables of the class's public methods, properties and attributes (inherited ones
# included), then each of them in full. The api_coverage extension chooses them
# (class_members: no leading underscore, nothing inherited from object, int, Exception
# or tuple) and hands the lists to the template as ``class_members``; it also fails
# the build for a public name on no API page or a method without a docstring.

autosummary_generate = True
autosummary_imported_members = False
autodoc_member_order = "groupwise"
autodoc_typehints = "none"
autodoc_inherit_docstrings = True
# No default for "members" here: a default (even False) overrides the ``:members:``
# option of the template's ``autoclass`` directive, which hid every method.
autodoc_default_options = {}

numpydoc_show_class_members = False  # the template makes the member tables
numpydoc_class_members_toctree = False
numpydoc_xref_param_type = False

# -- gallery -------------------------------------------------------------------------
# examples/plot_*.py become docs/auto_examples/ (git-ignored, like the timing pages
# sg_execution_times.rst). Only files named plot_*.py run; other .py files are shown
# without output, and files starting with an underscore (helpers) are skipped. Every
# example runs even if one fails; the build then fails with the list of failing
# examples and their tracebacks. The build log and the "computation times" page give
# each example's run time.

sphinx_gallery_conf = {
    "examples_dirs": "../examples",
    "gallery_dirs": "auto_examples",
    "filename_pattern": r"/plot_",
    "ignore_pattern": r"__init__\.py|/_",
    "only_warn_on_example_error": False,
    "abort_on_example_error": False,
    "expected_failing_examples": [],
    "image_scrapers": ("matplotlib",),
    "matplotlib_animations": False,
    # CURVLINOPS_DOCS_NO_GALLERY=1 builds the gallery pages without running the
    # examples (a quick check of the other pages; the examples show no output then)
    "plot_gallery": "False" if os.environ.get("CURVLINOPS_DOCS_NO_GALLERY") else "True",
    "min_reported_time": 0,
    "show_memory": False,
    "write_computation_times": True,
    "remove_config_comments": True,
    "download_all_examples": False,
    "reset_modules": ("matplotlib",),
}


def _remove_stale_gallery_pages(app, config):
    """Delete generated pages of examples that no longer exist (renamed or removed).

    sphinx-gallery regenerates only what changed and never deletes, so a stale
    ``auto_examples/<name>.rst`` would be a page in no toctree (an error under -W).
    """
    examples = (DOCS / config.sphinx_gallery_conf["examples_dirs"]).resolve()
    gallery = DOCS / config.sphinx_gallery_conf["gallery_dirs"]
    for page in gallery.glob("*.rst"):
        if page.stem not in ("index", "sg_execution_times"):
            if not (examples / f"{page.stem}.py").exists():
                for stale in gallery.glob(f"{page.stem}.*"):
                    stale.unlink()


def _data_doc_comment(app, what, name, obj, options, lines):
    """Give re-exported data (``curvlinops.testing.QUERIES``) its ``#:`` doc comment.

    autodoc looks for the comment in the module the name is documented under; for a
    name re-exported by a package's ``__init__`` it finds none, and numpydoc then fills
    in the docstring of the value's type ("Built-in immutable sequence."). Look the
    comment up in the submodule that defines the same object instead.
    """
    from sphinx.pycode import ModuleAnalyzer
    from sphinx.util.docstrings import prepare_docstring

    type_doc = type(obj).__doc__
    # (a NamedTuple field's descriptor type has a descriptor, not a string, as __doc__)
    type_doc = prepare_docstring(type_doc if isinstance(type_doc, str) else "")
    text = [line for line in lines if line.strip()]
    if what != "data" or (text and text != [line for line in type_doc if line.strip()]):
        return

    module_name, _, attribute = name.rpartition(".")
    for sub_name, module in list(sys.modules.items()):
        if (
            not sub_name.startswith(module_name + ".")
            or getattr(module, attribute, None) is not obj
        ):
            continue
        try:
            comments = ModuleAnalyzer.for_module(sub_name).find_attr_docs()
        except Exception:  # no source to analyze
            continue
        if ("", attribute) in comments:
            lines[:] = list(comments[("", attribute)])
            return


def _measure_reliability(app, config):
    """Run docs/scripts/reliability.py: the float32 accuracy table of reliability.rst.

    Measured at every build (a few seconds), so the page never shows typed numbers.
    """
    spec = importlib.util.spec_from_file_location(
        "reliability", DOCS / "scripts" / "reliability.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main([])


def setup(app):
    app.connect("config-inited", _remove_stale_gallery_pages, priority=100)
    app.connect("config-inited", _measure_reliability, priority=200)
    # before numpydoc (priority 500), which would fill in the type's docstring
    app.connect("autodoc-process-docstring", _data_doc_comment, priority=100)


# -- HTML ----------------------------------------------------------------------------

default_role = "py:obj"
pygments_style = "sphinx"
pygments_dark_style = "monokai"

html_theme = "furo"
html_title = f"curvlinops {release}"
html_static_path = ["_static"]
html_css_files = ["custom.css"]
html_theme_options = {
    "navigation_with_keys": True,
    "top_of_page_buttons": [],
}
html_show_sourcelink = False
