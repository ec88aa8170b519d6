"""First-party plugin: the sharpness-aware family over any base optimizer.

Registers ``sam`` (Foret et al.; ASAM, Kwon et al., with ``adaptive=True``), ``gsam`` (Zhuang et al.),
``wsam`` (Yue et al.), ``friendly-sam`` (Li et al.) and ``msam`` (Momentum-SAM, Becker et al.), with the
constructors ``nonlocal_opt.SAM``, ``GSAM``, ``WSAM``, ``FriendlySAM``, ``MSAM``, and ``LookSAM`` and
``AESAM`` (``sam`` under the refresh policy, :mod:`nonlocal_opt_sam.constructors`). Every rule shares the
ascent (:mod:`nonlocal_opt_sam.ascent`) and the passes (:mod:`nonlocal_opt_sam.two_pass`), including
``perturb=False`` parameter groups.
Registered through the ``nonlocal_opt`` entry-point group.
"""

from __future__ import annotations

from nonlocal_opt import hookimpl
from nonlocal_opt_sam.friendly_sam import FriendlySAMRule
from nonlocal_opt_sam.gsam import GSAMRule
from nonlocal_opt_sam.msam import MomentumSAMRule
from nonlocal_opt_sam.sam import SAMRule
from nonlocal_opt_sam.wsam import WSAMRule

RULES = (SAMRule, GSAMRule, WSAMRule, FriendlySAMRule, MomentumSAMRule)


@hookimpl
def nonlocal_opt_register_descent_rules(register):
    """Register ``sam``, ``gsam``, ``wsam``, ``friendly-sam`` and ``msam``.

    Args:
        register: The registry's callback.
    """
    for rule in RULES:
        register(rule)
