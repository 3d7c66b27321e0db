"""Sphinx extension: numpydoc compiles its docstring template once per build, not per docstring.

numpydoc 1.x builds a new Jinja environment and compiles ``numpydoc_docstring.rst``
every time it renders a docstring; with autosummary's tables that is about 8000
compilations here, a third of the build's non-gallery time. The template depends only
on the builder (its template path), so this extension renders every docstring with
one compiled template per builder. The docstrings come out byte for byte the same.

List it after ``numpydoc`` in ``extensions``: numpydoc's own ``setup`` rebinds the name
this extension replaces.

May import: the standard library, sphinx, numpydoc.
"""

from __future__ import annotations


def _template(builder, cache):
    """The compiled numpydoc template for ``builder``, built the way numpydoc does."""
    import os

    from jinja2 import FileSystemLoader
    from jinja2.sandbox import SandboxedEnvironment
    from numpydoc import docscrape_sphinx
    from sphinx.jinja2glue import BuiltinTemplateLoader

    key = id(builder)
    if key not in cache:
        dirs = [os.path.join(os.path.dirname(docscrape_sphinx.__file__), "templates")]
        if builder is not None:
            loader = BuiltinTemplateLoader()
            loader.init(builder, dirs=dirs)
        else:
            loader = FileSystemLoader(dirs)
        cache[key] = SandboxedEnvironment(loader=loader).get_template("numpydoc_docstring.rst")
    return cache[key]


def _with_cached_template():
    from numpydoc import docscrape, docscrape_sphinx

    cache = {}

    def get_doc_object(obj, what=None, doc=None, config=None, builder=None):
        config = {} if config is None else config
        config["template"] = _template(builder, cache)
        return docscrape.get_doc_object(
            obj,
            what=what,
            doc=doc,
            config=config,
            class_doc=docscrape_sphinx.SphinxClassDoc,
            func_doc=docscrape_sphinx.SphinxFunctionDoc,
            obj_doc=docscrape_sphinx.SphinxObjDoc,
        )

    return get_doc_object


def setup(app):
    import numpydoc.numpydoc

    numpydoc.numpydoc.get_doc_object = _with_cached_template()
    return {"version": "1", "parallel_read_safe": True, "parallel_write_safe": True}
