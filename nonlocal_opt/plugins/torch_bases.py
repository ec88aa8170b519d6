"""The base optimizers ``torch.optim`` ships, registered under lower-case names (``sgd``, ``adamw``, ...).

The core registers this module with the plugin manager itself; plugins add bases through the same hook.
``LBFGS`` is left out: it runs its own closure loop and cannot take a gradient from a rule.
"""

from __future__ import annotations

import torch

from nonlocal_opt.plugins.hookspecs import hookimpl

TORCH_BASES = ("SGD", "Adam", "AdamW", "RMSprop", "Adagrad", "Adamax", "NAdam", "RAdam", "Adadelta", "ASGD", "Rprop")


@hookimpl
def nonlocal_opt_register_bases(register):
    """Register each of ``TORCH_BASES`` under its lower-case name.

    Args:
        register: the registry's ``register(cls, name=...)``.
    """
    for name in TORCH_BASES:
        register(getattr(torch.optim, name), name=name.lower())
