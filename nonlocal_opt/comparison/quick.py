"""The quick comparison (``nonlocal-opt compare --quick``): every registered rule's ``comparison_specs``
on a small budget and data subset, as a smoke test of the protocol and a first look, not a result."""

from __future__ import annotations

from typing import Any

from nonlocal_opt.comparison.specs import OptimizerSpec, SpecError, load_specs
from nonlocal_opt.plugins.registry import registrations

QUICK_SETTINGS: dict[str, Any] = {
    "budget": 300,
    "train_subset": 6000,
    "val_size": 1000,
    "test_subset": 2000,
    "evals": 5,
    "final_seeds": (1,),
}
"""The comparison settings ``--quick`` changes; every other setting keeps its default."""


def quick_specs() -> list[OptimizerSpec]:
    """The specs of the quick comparison: each registered rule's ``DescentRule.comparison_specs`` with
    ``rule`` set to its name, the rule a base's name stands for first, then by rule name.

    Raises:
        SpecError: a rule's spec is invalid (the message names the rule and its plugin), or two specs
            share a name.
    """
    rules = sorted(registrations("rule").values(), key=lambda r: (not r.cls.runs_bare_base, r.name))
    specs = []
    for registration in rules:
        where = f"comparison_specs of rule {registration.name!r} ({registration.provider})"
        for spec in registration.cls.comparison_specs:
            if "rule" in spec:
                raise SpecError(f"{where}: a spec must not set 'rule' (it is the rule's own name), got {dict(spec)!r}")
            try:
                specs += load_specs([{**spec, "rule": registration.name}])
            except SpecError as error:
                raise SpecError(f"{where}: {error}") from None
    names = [spec.name for spec in specs]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise SpecError(f"the rules' comparison_specs repeat the name(s) {', '.join(map(repr, repeated))}; each spec needs its own name")
    return specs
