"""Hosts that call the optimizer for you, one module per host: :mod:`~nonlocal_opt.integrations.accelerate`
(its check is registered with the core when ``nonlocal_opt`` is imported), the wrapper helpers of
:mod:`~nonlocal_opt.integrations.wrappers`, and :mod:`~nonlocal_opt.integrations.lightning`, which needs
Lightning and is imported only on request."""
