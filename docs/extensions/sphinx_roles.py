"""A griffe extension for the API reference: Sphinx roles in docstrings made into links.

The docstrings name other objects the way torch's do, ``:class:`StepContext```, ``:meth:`~ComposedOptimizer.step```,
``:func:`nonlocal_opt.compose```. mkdocstrings (Markdown) would show the role as text. This rewrites each role
into a cross-reference, ``[`StepContext`][nonlocal_opt.optim.step_context.StepContext]``, when the name
resolves, from the docstring's own scope, to a documented object of a package loaded so far (``~`` keeps the
last part of the name as the link text, ``title <name>`` the title); to inline code otherwise
(``torch.optim.SGD``, private helpers, objects without a docstring).
mkdocs.yml loads it (mkdocstrings ``extensions``).
"""

from __future__ import annotations

import contextlib
import re
from typing import Any

import griffe

ROLE = re.compile(r":(?:class|func|meth|attr|mod|exc|data|obj):`(~?)([^`]+)`")
TITLED = re.compile(r"(.+?)\s*<([^>]+)>")


def documented(path: str, loader: griffe.GriffeLoader) -> str | None:
    """The canonical path of the object ``path`` names if the reference renders it (public, with a docstring)."""
    try:
        target = loader.modules_collection.get_member(path)
    except (KeyError, ValueError, AttributeError, griffe.AliasResolutionError, griffe.CyclicAliasError):
        return None
    if target is None:
        return None
    try:
        target = target.final_target if target.is_alias else target
    except (griffe.AliasResolutionError, griffe.CyclicAliasError):
        return None
    canonical = target.canonical_path
    if any(part.startswith("_") for part in canonical.split(".")) or not (target.docstring or target.is_module):
        return None
    return canonical


def resolve(name: str, scope: griffe.Object, loader: griffe.GriffeLoader) -> str | None:
    """The canonical path ``name`` refers to from the docstring of ``scope``: a member of the enclosing class,
    a name of the enclosing module (its own or imported), or a full dotted path."""
    head, _, rest = name.partition(".")
    owners = [o for o in (scope, scope.parent) if o is not None and o.is_class]
    candidates = [f"{owner.path}.{name}" for owner in owners]
    with contextlib.suppress(griffe.NameResolutionError):
        candidates.append(scope.resolve(head) + (f".{rest}" if rest else ""))
    candidates.append(name)
    for candidate in candidates:
        found = documented(candidate, loader)
        if found is not None:
            return found
    return None


def rewrite(text: str, scope: griffe.Object, loader: griffe.GriffeLoader) -> str:
    """``text`` with every Sphinx role replaced by a cross-reference or inline code."""

    def replace(match: re.Match) -> str:
        short, text = match.group(1) == "~", match.group(2).strip()
        titled = TITLED.fullmatch(text)  # "title <name>"
        name = titled.group(2) if titled else text
        label = titled.group(1) if titled else name.rsplit(".", 1)[-1] if short else name
        target = resolve(name, scope, loader)
        return f"`{label}`" if target is None else f"[`{label}`][{target}]"

    return ROLE.sub(replace, text)


def visit(obj: griffe.Object, loader: griffe.GriffeLoader) -> None:
    if obj.docstring is not None and ":" in obj.docstring.value:
        obj.docstring.value = rewrite(obj.docstring.value, obj, loader)
    for member in obj.members.values():
        if not member.is_alias:
            visit(member, loader)


class SphinxRoles(griffe.Extension):
    """Rewrites the Sphinx roles of every docstring of a package when it is loaded."""

    def on_package(self, *, pkg: griffe.Module, loader: griffe.GriffeLoader, **kwargs: Any) -> None:
        visit(pkg, loader)
