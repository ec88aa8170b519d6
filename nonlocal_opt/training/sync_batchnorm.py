"""BatchNorm whose batch statistics span every process, so that a multi-process run normalises like one
process on the whole global batch.

torch's ``SyncBatchNorm`` runs on CUDA only (it raises on CPU tensors); :class:`CPUSyncBatchNorm` does the
same with any ``torch.distributed`` backend (gloo on CPU): the batch mean and variance are all-reduced with an
autograd-aware all-reduce, so forward and backward equal BatchNorm on the processes' samples put together.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.nn.modules.batchnorm import _BatchNorm


class _AllReduceSum(torch.autograd.Function):
    """``all_reduce(SUM)`` whose gradient is the ``all_reduce(SUM)`` of the outputs' gradients (what
    ``torch.distributed.nn.functional.all_reduce`` does; torch deprecates that module)."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        tensor = tensor.clone()
        dist.all_reduce(tensor)
        return tensor

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


class CPUSyncBatchNorm(_BatchNorm):
    """BatchNorm over inputs ``(N, C, *)`` with the batch statistics of all processes in training mode.

    The running statistics are updated as BatchNorm does, with the global mean and unbiased variance, and
    only while ``track_running_stats`` is on (the optimizer turns it off in its extra passes). Evaluation,
    and training in one process, are BatchNorm's own.
    """

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected an input of shape (N, C, *), got {input.dim()}D input")

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(input)
        self._check_input_dim(input)
        x = input.to(torch.promote_types(input.dtype, torch.float32))  # statistics of half-precision inputs in float32
        dims, shape = [0, *range(2, x.dim())], [1, -1] + [1] * (x.dim() - 2)
        totals = _AllReduceSum.apply(torch.cat([x.sum(dims), x.new_tensor([x.numel() // x.size(1)])]))
        count = totals[-1]
        if count < 2:  # as BatchNorm: no variance from one value (the unbiased running variance would be inf)
            raise ValueError(f"expected more than 1 value per channel over all processes when training, got input size {list(input.shape)}")
        mean = totals[:-1] / count
        centred = x - mean.view(shape)
        var = _AllReduceSum.apply((centred * centred).sum(dims)) / count
        out = centred * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        if self.track_running_stats and self.running_mean is not None:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
                self.running_mean.lerp_(mean.to(self.running_mean.dtype), factor)
                self.running_var.lerp_((var * count / (count - 1)).to(self.running_var.dtype), factor)
        return out.to(input.dtype)


def sync_batchnorm(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """``model`` with every BatchNorm layer synchronised over the processes: torch's ``SyncBatchNorm`` on CUDA,
    :class:`CPUSyncBatchNorm` elsewhere. The layers keep their parameters and buffers (the same tensors)."""
    if device.type == "cuda":
        return torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if isinstance(model, _BatchNorm) and not isinstance(model, CPUSyncBatchNorm):
        synced = CPUSyncBatchNorm(model.num_features, model.eps, model.momentum, model.affine, model.track_running_stats)
        for name in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
            setattr(synced, name, getattr(model, name))
        return synced.train(model.training)
    for name, child in model.named_children():
        model.add_module(name, sync_batchnorm(child, device))
    return model
