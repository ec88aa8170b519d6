"""A griffe extension for the API reference: the ``__init__`` that attrs generates, made visible to static analysis.

griffe reads the sources without importing them, so it sees no ``__init__`` on an ``@attrs.frozen`` or
``@attrs.define`` class, and an ``Args:`` section listing the fields would name parameters it cannot find. This
adds the ``__init__`` attrs writes: one parameter per annotated field, in order (the parents' first), with the
field's default, without ``init=False`` fields and with attrs' ``alias`` or leading-underscore stripping.
mkdocs.yml loads it (mkdocstrings ``extensions``).
"""

from __future__ import annotations

from typing import Any

import griffe

ATTRS_DECORATORS = {f"{module}.{name}" for module in ("attrs", "attr") for name in ("define", "frozen", "mutable", "s", "attrs")}
FIELD_CALLS = {"attrs.field", "attr.field", "attr.ib", "attr.attrib"}


def call_path(expr: Any) -> str | None:
    """The canonical path of a decorator or call expression: ``attrs.frozen`` for ``@attrs.frozen(slots=True)`` too."""
    target = expr.function if isinstance(expr, griffe.ExprCall) else expr
    return getattr(target, "canonical_path", None)


def keywords(expr: Any) -> dict[str, Any]:
    """The keyword arguments of a call expression, as griffe expressions or strings."""
    if not isinstance(expr, griffe.ExprCall):
        return {}
    return {argument.name: argument.value for argument in expr.arguments if isinstance(argument, griffe.ExprKeyword)}


def is_attrs_class(cls: griffe.Class) -> bool:
    return any(call_path(decorator.value) in ATTRS_DECORATORS for decorator in cls.decorators)


def fields(cls: griffe.Class) -> list[griffe.Parameter]:
    """The ``__init__`` parameters attrs makes from the annotated fields of ``cls`` itself."""
    kw_only_class = any(str(keywords(d.value).get("kw_only")) == "True" for d in cls.decorators)
    parameters = []
    for member in cls.members.values():
        if member.is_alias or not member.is_attribute or member.annotation is None:
            continue
        if "property" in member.labels or "ClassVar" in str(member.annotation):
            continue
        field = keywords(member.value) if call_path(member.value) in FIELD_CALLS else {}
        if str(field.get("init")) == "False":
            continue
        if "factory" in field:
            default = griffe.ExprCall(function=field["factory"], arguments=[])
        else:
            default = field.get("default") if call_path(member.value) in FIELD_CALLS else member.value
        name = str(field["alias"]).strip("'\"") if "alias" in field else member.name.lstrip("_")
        kw_only = kw_only_class or str(field.get("kw_only")) == "True"
        kind = griffe.ParameterKind.keyword_only if kw_only else griffe.ParameterKind.positional_or_keyword
        parameters.append(griffe.Parameter(name, annotation=member.annotation, kind=kind, default=default))
    return parameters


def add_init(cls: griffe.Class) -> None:
    if "__init__" in cls.members or not is_attrs_class(cls):
        return
    try:
        lineage = [parent for parent in reversed(cls.mro()) if is_attrs_class(parent)]
    except ValueError:
        lineage = []
    parameters = [p for parent in lineage for p in fields(parent)] + fields(cls)
    parameters.sort(key=lambda p: p.kind is griffe.ParameterKind.keyword_only)
    self_parameter = griffe.Parameter("self", kind=griffe.ParameterKind.positional_or_keyword)
    signature = griffe.Parameters(self_parameter, *parameters)
    init = griffe.Function("__init__", lineno=0, endlineno=0, parent=cls, parameters=signature, returns="None")
    cls.set_member("__init__", init)


def visit(obj: griffe.Module | griffe.Class) -> None:
    if isinstance(obj, griffe.Class):
        add_init(obj)
    for member in obj.members.values():
        if not member.is_alias and (member.is_module or member.is_class):
            visit(member)


class AttrsInit(griffe.Extension):
    """Adds the generated ``__init__`` to every attrs class of a loaded package."""

    def on_package(self, *, pkg: griffe.Module, **kwargs: Any) -> None:
        visit(pkg)
