"""Lightning: log the loss at ``θ_t`` once per optimizer step.

Under automatic optimization Lightning's closure runs ``training_step`` once per pass of a multi-pass rule
(SAM: 2, RBO with the footpoint projector's 20 iterations: 21 times per step), so ``self.log`` in it records the last
pass and every side effect in it is repeated. Log with :class:`StepLossLogger`, and guard other side effects
with ``if nonlocal_opt.first_pass(self.optimizers()):``. Lightning's ``accumulate_grad_batches`` cannot re-run
the earlier micro-batches in later passes and is refused by the step; accumulate under manual optimization
with :class:`~nonlocal_opt.integrations.accumulation.MicroBatchClosure` (docs/integrations.md). fp16 AMP: pass
``plugins=[ClosureMixedPrecision()]`` instead of ``precision="16-mixed"``, whose torch scaler steps without the
closure. Importing this module imports Lightning.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

try:
    import lightning.pytorch as pl
    from lightning.pytorch.plugins.precision import MixedPrecision
except ImportError as error:  # lightning is not a dependency of nonlocal-opt
    raise ImportError("nonlocal_opt.integrations.lightning needs Lightning: pip install lightning") from error

from nonlocal_opt.integrations.wrappers import stats
from nonlocal_opt.optim.amp import GradScaler
from nonlocal_opt.optim.composed import ComposedOptimizer


class StepLossLogger(pl.Callback):
    """After every optimizer step, ``pl_module.log(name, loss, **log_kwargs)`` with the loss at ``θ_t``
    (``nonlocal_opt.stats(optimizer)["loss"]``; under DDP already averaged over the processes).

    A batch that ends without a step (Lightning's ``accumulate_grad_batches``) logs nothing.

    Args:
        name: the name logged.
        optimizer: the index of the composed optimizer among those ``configure_optimizers`` returns.
        **log_kwargs: passed on to ``pl_module.log`` (``prog_bar``, ``sync_dist``, ...).
    """

    def __init__(self, name: str = "train_loss", optimizer: int = 0, **log_kwargs: Any) -> None:
        self.name, self.optimizer, self.log_kwargs = name, optimizer, log_kwargs
        self._logged_step = -1

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Start counting at the trainer's step (a resumed run logs its next step, not its last).

        Args:
            trainer: the Lightning trainer.
            pl_module: the module trained.
        """
        self._logged_step = trainer.global_step

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        """Log the loss at ``θ_t`` once the batch has taken a step.

        Args:
            trainer: the Lightning trainer.
            pl_module: the module trained; it logs.
            outputs: what ``training_step`` returned.
            batch: the batch.
            batch_idx: its index.
        """
        if trainer.global_step == self._logged_step:
            return
        self._logged_step = trainer.global_step
        loss = stats(trainer.optimizers[self.optimizer]).get("loss")
        if loss is not None:
            pl_module.log(self.name, loss, **self.log_kwargs)


class ClosureMixedPrecision(MixedPrecision):
    """Lightning's fp16 AMP (``"16-mixed"``: ``torch.autocast`` with float16 and loss scaling) for composed
    optimizers: ``Trainer(plugins=[ClosureMixedPrecision()])``. The step is ``scaler.step(opt, closure)`` of a
    :class:`~nonlocal_opt.optim.amp.GradScaler`: each pass's gradients are unscaled before the rule, Lightning's
    ``on_before_optimizer_step`` hooks and gradient clipping, and an overflow in any pass skips the step and
    backs the scale off. Other optimizers step as under ``precision="16-mixed"``.

    Args:
        device: the device of ``torch.autocast`` and of the scaler (``"cuda"``; ``"cpu"`` runs float16 on the CPU).
        scaler: the scaler (default: a new ``GradScaler(device)``).

    Raises:
        ValueError: ``"cuda"`` without a GPU.
        TypeError: ``scaler`` is not a ``nonlocal_opt.GradScaler``.
    """

    def __init__(self, device: str = "cuda", scaler: GradScaler | None = None) -> None:
        if device == "cuda" and not torch.cuda.is_available():
            raise ValueError("ClosureMixedPrecision('cuda') needs a GPU and none is available: on the CPU pass "
                             "ClosureMixedPrecision('cpu') (float16 autocast on the CPU) or use precision='bf16-mixed'")
        scaler = GradScaler(device) if scaler is None else scaler
        if not isinstance(scaler, GradScaler):
            raise TypeError(f"ClosureMixedPrecision needs a nonlocal_opt.GradScaler, got {type(scaler).__name__}: "
                            "torch's scaler cannot step with a closure")
        super().__init__("16-mixed", device, scaler)

    def optimizer_step(self, optimizer: Any, model: pl.LightningModule, closure: Callable[[], Any], **kwargs: Any) -> Any:
        """``scaler.step(optimizer, closure)`` and ``scaler.update()`` for a composed optimizer; each pass of the
        closure ends with ``scaler.unscale_`` and Lightning's hooks and clipping.

        Args:
            optimizer: the optimizer ``configure_optimizers`` returned.
            model: the LightningModule.
            closure: Lightning's closure (``training_step``, backward of the scaled loss).
            **kwargs: passed on to ``optimizer.step``.
        """
        if not isinstance(optimizer, ComposedOptimizer):
            return super().optimizer_step(optimizer, model=model, closure=closure, **kwargs)

        def one_pass() -> Any:
            result = closure()
            self.scaler.unscale_(optimizer)
            self._after_closure(model, optimizer)
            return result

        output = self.scaler.step(optimizer, one_pass, **kwargs)
        self.scaler.update()
        return output
