"""Hosts that call the optimizer for you, one module per host: :mod:`~nonlocal_opt.integrations.accelerate`
(its check is registered with the core when ``nonlocal_opt`` is imported), the wrapper helpers of
:mod:`~nonlocal_opt.integrations.wrappers`, exact gradient accumulation inside one closure call
(:mod:`~nonlocal_opt.integrations.accumulation`), and, imported only on request,
:mod:`~nonlocal_opt.integrations.lightning` (needs Lightning) and :mod:`~nonlocal_opt.integrations.transformers`
(``NonlocalTrainer``, needs transformers)."""
