"""The step context is the whole plugin API: it hands out no optimizer, the core runs the hosts' checks
through a public seam, and the contract kits fail a plugin that reads a private member of the context."""

from __future__ import annotations

import ast
import pathlib

import pytest
import torch

import nonlocal_opt
from nonlocal_opt import DescentRule, ProjectionResult, Projector
from nonlocal_opt.optim.host_checks import HOST_CHECKS, HostGradientError, register_host_check
from nonlocal_opt.testing import check_projector, check_rule
from nonlocal_opt.testing.public_contract import PrivateMemberError

from conftest import make_closure

OPTIM = pathlib.Path(nonlocal_opt.__file__).parent / "optim"


def reachable(root: object, depth: int = 6) -> list[object]:
    """Every object reachable from ``root`` through instance attributes and the items of lists, tuples and dicts."""
    found = {id(root): root}
    frontier = [root]
    for _ in range(depth):
        children = []
        for obj in frontier:
            if isinstance(obj, dict):
                values = [*obj.keys(), *obj.values()]
            elif isinstance(obj, (list, tuple, set)):
                values = list(obj)
            else:
                values = list(vars(obj).values()) if hasattr(obj, "__dict__") else []
            for value in values:
                if id(value) not in found:
                    found[id(value)] = value
                    children.append(value)
        frontier = children
    return list(found.values())


def test_no_attribute_of_the_step_context_hands_out_the_optimizer():
    landscape = torch.nn.Linear(3, 1)
    opt = nonlocal_opt.compose(landscape.parameters(), "sam", lr=0.1)
    ctx = opt.step_context(make_closure(opt, lambda: landscape(torch.ones(2, 3)).sum()))
    public = [getattr(ctx, name) for name in dir(ctx) if not name.startswith("_") and not callable(getattr(ctx, name))]
    found = [obj for value in [ctx, *public] for obj in reachable(value)]
    assert any(obj is opt.base for obj in found)  # the walk reaches the base optimizer the guarded step drives
    assert not [obj for obj in found if isinstance(obj, nonlocal_opt.ComposedOptimizer)]


def test_step_context_module_reads_no_private_member_of_anything_outside_itself():
    """Every ``x._name`` in optim/step_context.py is a member of the context itself (``self._...``)."""
    tree = ast.parse((OPTIM / "step_context.py").read_text())
    foreign = [
        f"{ast.unparse(node.value)}.{node.attr} (line {node.lineno})"
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__")
        and not (isinstance(node.value, ast.Name) and node.value.id == "self")
    ]
    assert foreign == []


def test_the_core_does_not_import_the_host_integrations():
    imports = [
        f"{path.name}: {ast.unparse(node)}"
        for path in OPTIM.glob("*.py")
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, (ast.Import, ast.ImportFrom)) and "integrations" in ast.unparse(node)
    ]
    assert imports == []


def test_registered_host_checks_run_before_multi_pass_steps_only():
    seen = []

    def refuse(rule):
        seen.append(rule)
        raise HostGradientError(f"the host refuses {rule}")

    model = torch.nn.Linear(3, 1)
    loss = lambda: model(torch.ones(2, 3)).sum()  # noqa: E731
    register_host_check(refuse)
    register_host_check(refuse)  # once only
    try:
        sam = nonlocal_opt.compose(model.parameters(), "sam", lr=0.1)
        with pytest.raises(HostGradientError, match="the host refuses sam"):
            sam.step(make_closure(sam, loss))
        local = nonlocal_opt.compose(model.parameters(), "local", lr=0.1)
        local.step(make_closure(local, loss))
    finally:
        HOST_CHECKS.remove(refuse)
    assert seen == ["sam"]


class ReadsTheClosure(DescentRule):
    """Calls the closure through the context's private ``_closure``."""

    name = "reads-the-closure"

    def step(self, ctx):
        loss = ctx._closure()
        ctx.apply()
        return loss


class ReadsTheResources(DescentRule):
    """Reaches the optimizer's scratch storage through the context's ``__dict__``."""

    name = "reads-the-resources"

    def step(self, ctx):
        point = ctx.evaluate(extra=False)
        vars(ctx)["_resources"].buffers("mine", ctx.params)
        ctx.apply(point.grad, theta=point.theta)
        return point.loss


class ReadsTheFlatPieces(Projector):
    """Stays at the contact point, after splitting it with a private helper of ``ctx.flat``."""

    name = "reads-the-flat-pieces"
    manifolds = ("offset",)

    def project(self, target, start, ctx):
        ctx.flat._pieces(start.theta)
        return ProjectionResult(point=start, centre=None, iterations=0, residual=torch.zeros(()))


@pytest.mark.parametrize(
    ("rule", "member"),
    [(ReadsTheClosure(), "StepContext._closure"), (ReadsTheResources(), "StepContext.__dict__")],
    ids=lambda value: type(value).__name__ if isinstance(value, DescentRule) else "",
)
def test_the_rule_kit_fails_a_rule_that_reads_a_private_member(rule, member):
    with pytest.raises(PrivateMemberError, match=rf"{type(rule).__name__}\.step reads {member}, a private member"):
        check_rule(rule, raise_on_failure=False)


def test_the_projector_kit_fails_a_projector_that_reads_a_private_member():
    with pytest.raises(PrivateMemberError, match=r"ReadsTheFlatPieces\.project reads FlatParams\._pieces, a private member"):
        check_projector(ReadsTheFlatPieces(), raise_on_failure=False)

