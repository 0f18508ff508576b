"""Sphinx configuration for the trioserve documentation.

Build with ``sphinx-build -W -b html docs docs/_build/html``; the code samples
are checked with ``sphinx-build -W -b doctest docs docs/_build/doctest``. The
build needs nothing from the network: no intersphinx, no remote images.
"""

from __future__ import annotations

import re

import attrs
from sphinx.ext.napoleon import Config as NapoleonConfig
from sphinx.ext.napoleon import GoogleDocstring

import trioserve

project = "trioserve"
author = "the trioserve developers"
copyright = "the trioserve developers"
release = trioserve.__version__
version = ".".join(release.split(".")[:2])

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.doctest",
]

exclude_patterns = ["_build"]
templates_path: list[str] = []
html_static_path = ["_static"]
html_theme = "alabaster"
html_theme_options = {
    "description": "socketserver on Trio",
    "fixed_sidebar": True,
}

# Every name a role mentions should resolve, except the ones that live in
# other projects' documentation (we do not fetch their inventories).
default_role = "py:obj"
primary_domain = "py"
highlight_language = "python3"

# API reference: signatures show the defaults as written in the source
# (``DEFAULT``, not the enum's repr), and types go into the descriptions.
autodoc_member_order = "bysource"
autodoc_preserve_defaults = True
autodoc_typehints = "description"
autodoc_typehints_description_target = "documented"
autodoc_default_options = {
    "members": True,
    "undoc-members": True,
    "show-inheritance": True,
}
# An override without a docstring of its own (StreamRequestHandler.setup)
# would otherwise show its base's ("Does nothing by default"), which is wrong.
autodoc_inherit_docstrings = False

# The docstrings are Google style ("Args:", "Returns:"), with a few sections
# of our own that read as prose; _google_sections below converts them.
_NAPOLEON = NapoleonConfig(
    napoleon_custom_sections=[
        "Resource handling",
        "Cancellation",
        "Error handling",
        "Errors",
    ]
)

# Doctests: every block starts from these imports. Trio code runs with
# trio.run() against a real server on 127.0.0.1, port 0.
doctest_global_setup = """
import trio
import trioserve
"""
doctest_test_doctest_blocks = "default"


# An "Args:" entry that names several parameters may wrap its list of names:
#   max_concurrent_requests, max_connections_per_peer, request_timeout,
#   idle_timeout, shutdown_timeout: Override the class attributes...
# Napoleon reads "a, b, c: text" on one line as three parameters, so we join
# such a wrapped list first.
_WRAPPED_NAMES = re.compile(r"\s*[A-Za-z_]\w*(, [A-Za-z_]\w*)*,")


def _join_wrapped_names(lines):
    joined = []
    for line in lines:
        previous = joined[-1] if joined else ""
        if (
            _WRAPPED_NAMES.fullmatch(previous)
            and _indent(line) == _indent(previous)
            and ":" in line
        ):
            joined[-1] = f"{previous} {line.strip()}"
        else:
            joined.append(line)
    return joined


def _indent(line):
    return len(line) - len(line.lstrip())


def _google_sections(app, what, name, obj, options, lines):
    """Turn Google-style sections ("Args:", "Returns:") into reST fields.

    This is sphinx.ext.napoleon, applied to everything but attributes and
    properties: their docstrings are plain prose, and napoleon would read a
    first line such as "True here (socketserver: False)" as "TYPE: TEXT".
    """
    if what not in ("attribute", "property", "data"):
        docstring = GoogleDocstring(
            _join_wrapped_names(lines), _NAPOLEON, app, what, name, obj, options
        )
        lines[:] = docstring.lines()


def _attrs_signature(app, what, name, obj, options, signature, return_annotation):
    """Show an attrs class's fields with their defaults (``accepted=0``).

    attrs writes ``__init__`` itself, and with ``autodoc_preserve_defaults``
    its defaults would show as the source it generated
    (``attr_dict['accepted'].default``).
    """
    if what != "class" or not attrs.has(obj):
        return None
    parameters = []
    for field in attrs.fields(obj):
        if not field.init:
            continue
        if field.default is attrs.NOTHING:
            parameters.append(field.name)
        elif isinstance(field.default, attrs.Factory):
            parameters.append(f"{field.name}=...")
        else:
            parameters.append(f"{field.name}={field.default!r}")
    return f"({', '.join(parameters)})", return_annotation


def setup(app):
    app.connect("autodoc-process-docstring", _google_sections)
    app.connect("autodoc-process-signature", _attrs_signature)
