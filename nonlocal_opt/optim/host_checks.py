"""The seam between the core and the hosts that drive it (Accelerate, Lightning, ...): checks a host
integration registers, run before every step of a rule that evaluates the loss several times."""

from __future__ import annotations

from collections.abc import Callable

HostCheck = Callable[[str], None]

HOST_CHECKS: list[HostCheck] = []
"""The registered checks, run in order by :func:`run_host_checks`."""


class HostGradientError(RuntimeError):
    """Gradient accumulation by the host, which a multi-pass step cannot take part in: the closure added to
    gradients the host left in ``p.grad``, or a host check (e.g. Accelerate's) found accumulation on."""


def register_host_check(check: HostCheck) -> HostCheck:
    """Run ``check`` before every multi-pass step (once, however often it is registered).

    Args:
        check: called with the rule's name; raises (e.g. :class:`HostGradientError`) when the host is set
            up in a way the step cannot work with.

    Returns:
        ``check``, so that it can decorate a function.
    """
    if check not in HOST_CHECKS:
        HOST_CHECKS.append(check)
    return check


def run_host_checks(rule: str) -> None:
    """Run every registered check for a step of ``rule``.

    Args:
        rule: the name of the rule about to step, for the checks' messages.
    """
    for check in HOST_CHECKS:
        check(rule)
