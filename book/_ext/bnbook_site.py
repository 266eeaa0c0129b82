"""Sphinx helpers for the bnbook website, all of which work with no network.

Four pieces:

``chapter-map`` directive
    The landing page lists every planned chapter. A chapter whose page is in
    the build gets a link; one that is not written yet is listed as plain text,
    so the landing page never carries a dead link and never needs editing when
    a chapter lands.

Offline cross-references to NumPy and PyTorch
    ``sphinx.ext.intersphinx`` downloads each project's ``objects.inv`` at build
    time. The book is built offline with warnings as errors, so a fetch would
    fail the build. Instead, a ``missing-reference`` handler turns references to
    ``numpy.*`` and ``torch.*`` (and the short spellings ``np.``, ``nn.``,
    ``F.``, ``ndarray``, ``Tensor``) into links built from the URL patterns of
    the two documentation sites. The links are plain hyperlinks: a reader's
    browser requests nothing until the link is followed.

    Type specifications in NumPy-style docstrings are prose as much as types
    (``ndarray, shape (N, C, *)``). Sphinx turns each word into a reference, so
    ``nitpick_ignore_regex`` in ``_config.yml`` lets such words go unresolved,
    while every dotted name (``bnbook.nn.BatchNorm2d``, ``torch.nn.Module``)
    must still resolve or ``-n`` reports it.

The ``(N, C, *)`` shape wildcard in docstrings
    The docstrings write shapes as ``(N, C, *)``, as PyTorch's do. In
    reStructuredText a lone ``*`` opens emphasis, so before napoleon reads a
    docstring, a ``*`` that stands alone between brackets, commas or spaces is
    escaped (outside literals and roles, which are left untouched).

No script twice
    With Sphinx 7.4, inline scripts that extensions register after the builder
    starts (sphinx-thebe's ``const THEBE_JS_URL = ...``, togglebutton's
    settings) reach every page twice, and the second ``const`` is a JavaScript
    ``SyntaxError``. Identical scripts are dropped from each page's context.
"""

from __future__ import annotations

import fnmatch
import re

from docutils import nodes
from docutils.parsers.rst import directives
from sphinx import addnodes
from sphinx.util.docutils import SphinxDirective

NUMPY_DOCS = "https://numpy.org/doc/stable/"
TORCH_DOCS = "https://pytorch.org/docs/stable/"

# Short spellings used in docstrings, and private module paths that autodoc
# reports for public objects, mapped to the public name the docs use.
_ALIASES = {
    "np": "numpy",
    "nn": "torch.nn",
    "F": "torch.nn.functional",
    "ndarray": "numpy.ndarray",
    "Tensor": "torch.Tensor",
    "torch._tensor.Tensor": "torch.Tensor",
    "numpy.random._generator.Generator": "numpy.random.Generator",
    "torch.optim.optimizer.Optimizer": "torch.optim.Optimizer",
}
_PRIVATE_PREFIXES = [
    (re.compile(r"^torch\.nn\.modules\.\w+\."), "torch.nn."),
    (re.compile(r"^torch\._C\."), "torch."),
]
# Objects documented on a page whose name is not "generated/<name>.html".
_NUMPY_PAGES = {
    "numpy.random.Generator": "reference/random/generator.html#numpy.random.Generator",
    "numpy.random.default_rng": "reference/random/generator.html#numpy.random.default_rng",
    "numpy.typing.ArrayLike": "reference/typing.html#numpy.typing.ArrayLike",
    "array_like": "glossary.html#term-array_like",
    "array-like": "glossary.html#term-array_like",
}
_TORCH_PAGES = {
    "torch.Tensor": "tensors.html#torch.Tensor",
    "torch.dtype": "tensor_attributes.html#torch.dtype",
    "torch.device": "tensor_attributes.html#torch.device",
}


def canonical_name(target: str) -> str:
    """Return the public, fully qualified spelling of a NumPy/PyTorch name."""
    target = target.lstrip("~.")
    if target in _ALIASES:
        return _ALIASES[target]
    head, _, rest = target.partition(".")
    if rest and head in ("np", "nn", "F"):
        target = f"{_ALIASES[head]}.{rest}"
    for pattern, public in _PRIVATE_PREFIXES:
        target = pattern.sub(public, target)
    return _ALIASES.get(target, target)


def external_url(target: str) -> str | None:
    """URL of ``target`` in the NumPy or PyTorch docs, or None if neither owns it.

    Pages follow each site's layout: one page per object under ``generated/``,
    with methods and attributes as anchors on their class's page.
    """
    name = canonical_name(target)
    if name in _NUMPY_PAGES:
        return NUMPY_DOCS + _NUMPY_PAGES[name]
    if name in _TORCH_PAGES:
        return TORCH_DOCS + _TORCH_PAGES[name]
    parts = name.split(".")
    if parts[0] not in ("numpy", "torch") or len(parts) < 2:
        return None
    # The page belongs to the first capitalised part (a class); anything after
    # it is a method or attribute, i.e. an anchor on that page.
    page_end = next((i for i, p in enumerate(parts) if p[:1].isupper()), len(parts) - 1)
    page = ".".join(parts[: page_end + 1])
    anchor = f"#{name}" if page_end < len(parts) - 1 else ""
    if parts[0] == "numpy":
        return f"{NUMPY_DOCS}reference/generated/{page}.html{anchor}"
    if page == "torch.Tensor":
        return f"{TORCH_DOCS}generated/{name}.html"
    return f"{TORCH_DOCS}generated/{page}.html{anchor}"


def resolve_external(app, env, node, contnode):
    """``missing-reference`` handler: link Python references to NumPy/PyTorch."""
    if node.get("refdomain") != "py":
        return None
    url = external_url(node["reftarget"])
    if url is None:
        return None
    ref = nodes.reference(
        "", "", internal=False, refuri=url, reftitle=canonical_name(node["reftarget"])
    )
    ref += contnode
    return ref


class ChapterMap(SphinxDirective):
    """A list of planned chapters, linked when their page is part of the build.

    Content: one chapter per line, ``pattern | title | summary``, where
    ``pattern`` is a glob over document names (``notebooks/03*``). The title
    links to the first matching document; a chapter split over several
    notebooks (``06a_...``, ``06b_...``) also lists each part by its title.
    """

    has_content = True
    option_spec = {"class": directives.class_option}

    def _doc_link(self, docname: str, title: str | None = None) -> addnodes.pending_xref:
        """A ``{doc}`` reference; without ``title`` it shows the page's own title."""
        return addnodes.pending_xref(
            "",
            nodes.inline(text=title or docname),
            refdomain="std",
            reftype="doc",
            reftarget="/" + docname,
            refexplicit=title is not None,
            refdoc=self.env.docname,
        )

    def run(self) -> list[nodes.Node]:
        self.env.metadata.setdefault(self.env.docname, {})["bnbook_chapter_map"] = True
        found = sorted(self.env.found_docs)
        items = nodes.enumerated_list(classes=["chapter-map", *self.options.get("class", [])])
        for line in self.content:
            if not line.strip():
                continue
            try:
                pattern, title, summary = (part.strip() for part in line.split("|", 2))
            except ValueError:
                raise self.error(
                    f"chapter-map: expected 'pattern | title | summary', got {line!r}"
                ) from None
            matches = [d for d in found if fnmatch.fnmatch(d, pattern)]
            para = nodes.paragraph()
            if matches:
                para += nodes.strong("", "", self._doc_link(matches[0], title))
            else:
                para += nodes.strong(text=title)
                para += nodes.Text(" ")
                para += nodes.emphasis(text="(in preparation)")
            para += nodes.Text(" — ")
            summary_nodes, messages = self.state.inline_text(summary, self.lineno)
            para.extend(summary_nodes)
            para.extend(messages)
            if len(matches) > 1:  # a chapter in several notebooks: list its parts
                para += nodes.Text(" Parts: ")
                for i, docname in enumerate(matches):
                    if i:
                        para += nodes.Text(", ")
                    para += self._doc_link(docname)
                para += nodes.Text(".")
            items += nodes.list_item("", para)
        return [items]


# Backtick spans (``literal``, :role:`text`, `interpreted`) are copied as they are.
_BACKTICK_SPANS = re.compile(r"(``.+?``|:[\w:.-]+:`[^`]*`|`[^`]*`_{0,2})")
_LONE_STAR = re.compile(r"(?<![\\*\w`])\*(?=[\s,)\]]|$)")


# A star that opens a word, as in ``(*, *normalized_shape)``: Python's unpacking.
_OPENING_STAR = re.compile(r"(?<![\\*\w`])\*(?=[A-Za-z_])")


def _escape_unclosed(text: str) -> str:
    """Escape an opening ``*`` that no later ``*`` closes (so it is not emphasis)."""
    out, start = [], 0
    for match in _OPENING_STAR.finditer(text):
        if "*" not in text[match.end() :]:
            out.append(text[start : match.start()] + "\\*")
            start = match.end()
    return "".join(out) + text[start:]


def escape_lone_stars(line: str) -> str:
    """Escape each ``*`` that is a shape wildcard, outside backtick spans.

    A wildcard is a ``*`` standing alone (``(N, C, *)``), or one that opens a
    name and is never closed (``*normalized_shape``); ``*emphasis*`` is kept.
    """
    parts = _BACKTICK_SPANS.split(line)
    for i in range(0, len(parts), 2):  # even indices lie outside the spans
        parts[i] = _escape_unclosed(_LONE_STAR.sub(r"\\*", parts[i]))
    return "".join(parts)


def escape_shape_wildcards(app, what, name, obj, options, lines):
    """``autodoc-process-docstring`` handler, run before napoleon's."""
    lines[:] = [escape_lone_stars(line) for line in lines]


def drop_duplicate_scripts(app, pagename, templatename, context, doctree):
    """``html-page-context`` handler: keep the first of identical script entries."""
    scripts = context.get("script_files")
    if not scripts:
        return
    seen, unique = set(), []
    for script in scripts:
        attributes = getattr(script, "attributes", {}) or {}
        # The two copies differ only in filename None versus "" for an inline body.
        key = (str(getattr(script, "filename", script) or ""), tuple(sorted(attributes.items())))
        if key not in seen:
            seen.add(key)
            unique.append(script)
    context["script_files"] = unique


def always_reread_chapter_maps(app, env, added, changed, removed):
    """A chapter map depends on which pages exist: re-read it on every build."""
    return [d for d, meta in env.metadata.items() if meta.get("bnbook_chapter_map")]


def setup(app):
    app.add_directive("chapter-map", ChapterMap)
    app.connect("missing-reference", resolve_external)
    app.connect("env-get-outdated", always_reread_chapter_maps)
    app.connect("html-page-context", drop_duplicate_scripts, priority=900)
    # napoleon converts docstrings at the default priority (500); run first.
    app.connect("autodoc-process-docstring", escape_shape_wildcards, priority=400)
    return {"version": "0.1", "parallel_read_safe": True, "parallel_write_safe": True}
