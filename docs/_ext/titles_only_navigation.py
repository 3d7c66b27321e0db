"""Sphinx extension: furo's titles-only navigation tree is built from titles-only tables.

furo draws its sidebar, on every page, from ``toctree(titles_only=True, maxdepth=-1)``.
Sphinx answers that by deep-copying each listed page's whole table of contents (every
method and attribute of every API page, since those are table entries) and only then
dropping all but the page titles and sub-toctrees. Done for each of the ~280 pages, that
is two fifths of the non-gallery build time. This extension does the same dropping once
per build, and hands Sphinx those reduced tables while a titles-only tree is built, so
the copies are small and the sidebar comes out byte for byte the same (checked on the
built HTML). The "On this page" tables and every other use of the tables are untouched.

It must run before furo's ``html-page-context`` handler, hence the priority.

May import: the standard library, sphinx.
"""

from __future__ import annotations

from sphinx import addnodes


def _titles_and_toctrees(toc):
    """``toc`` with the pruning Sphinx applies for ``titles_only``, on a copy."""
    toc = toc.deepcopy()
    for top_level in toc.children:
        if len(top_level) > 1:
            if subtrees := list(top_level.findall(addnodes.toctree)):
                top_level[1][:] = subtrees
            else:
                top_level.pop(1)
    return toc


def _with_titles_only_tables(toctree, env, tables):
    def toctree_from_titles(**kwargs):
        if not kwargs.get("titles_only"):
            return toctree(**kwargs)
        if not tables:
            tables.update({doc: _titles_and_toctrees(toc) for doc, toc in env.tocs.items()})
        full, env.tocs = env.tocs, tables
        try:
            return toctree(**kwargs)
        finally:
            env.tocs = full

    return toctree_from_titles


def setup(app):
    tables = {}  # filled at the first page written, when every table is final

    def reduce_navigation_tables(app, pagename, templatename, context, doctree):
        if "toctree" in context:
            context["toctree"] = _with_titles_only_tables(context["toctree"], app.env, tables)

    app.connect("builder-inited", lambda app: tables.clear())
    app.connect("html-page-context", reduce_navigation_tables, priority=400)
    return {"version": "1", "parallel_read_safe": True, "parallel_write_safe": True}
