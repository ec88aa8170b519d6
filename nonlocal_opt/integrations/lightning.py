"""Lightning: log the loss at ``θ_t`` once per optimizer step.

Under automatic optimization Lightning's closure runs ``training_step`` once per pass of a multi-pass rule
(SAM: 2, RBO with the footpoint projector's 20 iterations: 21 times per step), so ``self.log`` in it records the last
pass and every side effect in it is repeated. Log with :class:`StepLossLogger`, and guard other side effects
with ``if nonlocal_opt.first_pass(self.optimizers()):``. Lightning's ``accumulate_grad_batches`` cannot re-run
the earlier micro-batches in later passes and is refused by the step; accumulate under manual optimization
with :class:`~nonlocal_opt.integrations.accumulation.MicroBatchClosure` (docs/integrations.md). Importing this
module imports Lightning.
"""

from __future__ import annotations

from typing import Any

try:
    import lightning.pytorch as pl
except ImportError as error:  # lightning is not a dependency of nonlocal-opt
    raise ImportError("nonlocal_opt.integrations.lightning needs Lightning: pip install lightning") from error

from nonlocal_opt.integrations.wrappers import stats


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
