"""The Hugging Face ``Trainer`` for composed optimizers: :class:`NonlocalTrainer`.

The stock ``Trainer`` back-propagates each micro-batch itself and then calls ``optimizer.step()`` without a
closure, which a multi-pass rule cannot use. ``NonlocalTrainer`` keeps the step's micro-batches and, on the
last one, makes the step ``opt.step(closure)`` with a
:class:`~nonlocal_opt.integrations.accumulation.MicroBatchClosure` over all of them, so every pass sees the
whole batch ``B`` (``gradient_accumulation_steps × per_device_train_batch_size`` samples per process).
Importing this module imports transformers.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch

try:
    import transformers
except ImportError as error:  # transformers is an optional extra of nonlocal-opt
    raise ImportError("nonlocal_opt.integrations.transformers needs transformers: pip install nonlocal-opt[transformers]") from error

from nonlocal_opt.integrations.accelerate import use_closure_scaler
from nonlocal_opt.integrations.accumulation import MicroBatchClosure, sample_count
from nonlocal_opt.integrations.wrappers import stats, unwrap
from nonlocal_opt.optim.composed import ComposedOptimizer


class StepTaken:
    """The optimizer as the Trainer's loop sees it: ``NonlocalTrainer.training_step`` already made the step,
    so the loop's ``step()`` only checks that one was made; everything else goes to ``optimizer``.

    Args:
        optimizer: The prepared optimizer (Accelerate's wrapper of the composed optimizer).
    """

    def __init__(self, optimizer: Any):
        self.optimizer, self.pending = optimizer, False

    def step(self, closure: Any = None) -> None:
        """Confirm the step ``training_step`` made.

        Args:
            closure: Not used: the Trainer's loop passes none.
        """
        if not self.pending:
            raise RuntimeError("NonlocalTrainer: the Trainer asked for an optimizer step that no training_step made; "
                               "override training_step only by calling NonlocalTrainer.training_step")
        self.pending = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self.optimizer, name)


def refusal(args: transformers.TrainingArguments, optimizer: Any) -> str | None:
    """Why ``NonlocalTrainer`` cannot run with ``args`` and ``optimizer``, with the fix; ``None`` when it can.

    Args:
        args: The Trainer's arguments.
        optimizer: The optimizer passed as ``optimizers[0]``.
    """
    if not isinstance(optimizer, ComposedOptimizer):
        return (f"NonlocalTrainer runs a nonlocal-opt optimizer, got {type(optimizer).__name__}: pass "
                "optimizers=(nonlocal_opt.SAM(model.parameters(), ...), None) (None: the Trainer's LR schedule); "
                "for a torch optimizer use transformers.Trainer")
    if args.deepspeed:
        return "NonlocalTrainer: DeepSpeed steps its own optimizer and cannot run a composed optimizer; drop deepspeed=..."
    if args.fsdp:
        return ("NonlocalTrainer: the Trainer's FSDP is not supported; shard with torch's fully_shard in your own loop "
                "(docs/integrations.md, FSDP2) or use DDP (torchrun)")
    if args.n_gpu > 1:
        return "NonlocalTrainer: torch.nn.DataParallel (several GPUs in one process) is not supported; launch with torchrun (DDP)"
    return None


def clip_with_the_rule(optimizer: ComposedOptimizer, max_grad_norm: float | None) -> None:
    """Map the Trainer's ``max_grad_norm`` onto the optimizer's clipping hyperparameter ``max_grad_norm``
    (the norm ``c`` of the gradient handed to the base optimizer, clipped in every step).

    Args:
        optimizer: The composed optimizer.
        max_grad_norm: ``TrainingArguments.max_grad_norm`` (``None`` or 0: no clipping by the Trainer).

    Raises:
        ValueError: the optimizer already clips to another norm.
    """
    if not max_grad_norm:
        return
    given = {group["max_grad_norm"] for group in optimizer.param_groups} - {None}
    if given - {max_grad_norm}:
        raise ValueError(f"NonlocalTrainer: TrainingArguments(max_grad_norm={max_grad_norm}) and the optimizer's "
                         f"max_grad_norm={sorted(given)} differ; set one of them (max_grad_norm=0 leaves clipping to the optimizer)")
    for group in optimizer.param_groups:
        group["max_grad_norm"] = max_grad_norm


class NonlocalTrainer(transformers.Trainer):
    """``transformers.Trainer`` running a composed optimizer passed as ``optimizers=(opt, scheduler)``.

    Each optimizer step is one ``opt.step(closure)``; the closure re-runs all the step's micro-batches
    (``gradient_accumulation_steps`` of them) and returns ``L = Σ_{i∈B} ℓ_i / |B|``, each micro-batch's
    ``compute_loss`` (the model's mean) weighted by its samples. ``max_grad_norm`` becomes the optimizer's
    clipping (:func:`clip_with_the_rule`), the logged ``loss`` is the loss at ``θ_t`` (the first pass), the
    LR schedule steps once per optimizer step, and checkpoints hold the optimizer's state (the rule's
    included). Under ``fp16`` on a GPU the Trainer's scaler becomes a ``nonlocal_opt.GradScaler``
    (:func:`~nonlocal_opt.integrations.accelerate.use_closure_scaler`): every pass is unscaled, and a step
    that overflowed is skipped without advancing the LR schedule. What cannot work is refused at
    construction (:func:`refusal`).

    Args:
        *args: Passed on to ``transformers.Trainer``.
        **kwargs: Passed on to ``transformers.Trainer``; ``optimizers=(opt, scheduler)`` is required.

    Raises:
        TypeError: no composed optimizer was passed.
        ValueError: a setting that cannot work with a closure (DeepSpeed, FSDP, DataParallel).
    """

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        optimizer = self.optimizer
        with contextlib.suppress(TypeError):  # not ours: refusal() names it
            optimizer = unwrap(optimizer)
        problem = refusal(self.args, optimizer)
        if problem is not None:
            raise (TypeError if not isinstance(optimizer, ComposedOptimizer) else ValueError)(problem)
        try:
            use_closure_scaler(self.accelerator)  # fp16 on a GPU: a scaler whose step takes the closure
        except NotImplementedError as error:
            raise ValueError(f"NonlocalTrainer: {error}") from None
        clip_with_the_rule(optimizer, self.args.max_grad_norm)
        self.micro_batches: list[Any] = []

    def train(self, *args: Any, **kwargs: Any) -> Any:
        """``transformers.Trainer.train``, stepping in :meth:`training_step`.

        Args:
            *args: Passed on.
            **kwargs: Passed on.
        """
        self.micro_batches = []
        try:
            return super().train(*args, **kwargs)
        finally:
            if isinstance(self.optimizer, StepTaken):
                self.optimizer = self.optimizer.optimizer

    def training_step(self, model: torch.nn.Module, inputs: dict[str, Any], num_items_in_batch: Any = None) -> torch.Tensor:
        """Keep ``inputs``; on the step's last micro-batch make the optimizer step over all of them and return
        the loss at ``θ_t`` (0 for the others, so the Trainer's logged sum is one loss per step).

        Args:
            model: The (prepared) model.
            inputs: One micro-batch.
            num_items_in_batch: Not used: each micro-batch is weighted by its samples.
        """
        self.micro_batches.append(inputs)
        if not self.accelerator.sync_gradients:
            return torch.zeros((), device=self.args.device)
        micro_batches, self.micro_batches = [self._prepare_inputs(batch) for batch in self.micro_batches], []
        if not isinstance(self.optimizer, StepTaken):
            self.optimizer = StepTaken(self.optimizer)
        model.train()
        closure = MicroBatchClosure(model, micro_batches, lambda batch: self.micro_batch_sum(model, batch),
                                    backward=self.accelerator.backward)
        self.optimizer.optimizer.step(closure)
        self.optimizer.pending = True
        step = stats(self.optimizer.optimizer)
        if self.accelerator.scaler is not None and step["nonfinite"]:
            # an fp16 overflow skipped the step inside it, where Accelerate cannot see it: tell the Trainer, which
            # then leaves the LR schedule where it is, as for torch's scaler
            self.optimizer.optimizer._is_overflow = True
        return torch.as_tensor(step["loss"], dtype=torch.float32, device=self.args.device)

    def micro_batch_sum(self, model: torch.nn.Module, inputs: dict[str, Any]) -> torch.Tensor:
        """``Σ_{i∈B_j} ℓ_i``: ``compute_loss`` (a mean) times the samples of the micro-batch ``inputs``.

        Args:
            model: The (prepared) model.
            inputs: One micro-batch, prepared.
        """
        with self.compute_loss_context_manager():
            return self.compute_loss(model, dict(inputs)) * sample_count(inputs)  # a copy: compute_loss may pop the labels
