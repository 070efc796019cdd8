"""BatchNorm statistics over the global batch under DistributedDataParallel (``sync_batchnorm``).

On CUDA this is torch's ``SyncBatchNorm``. torch has no CPU kernels for it, so on CPU (gloo)
:class:`CPUSyncBatchNorm` does the same with two all-reduces per layer: the multi-process CPU
tests can then check that N processes train like one, and CPU clusters can use the option.
Both keep BatchNorm2d's state-dict keys, so checkpoints load into the plain model.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


class _SumOverProcesses(torch.autograd.Function):
    """``all_reduce(SUM)`` with a gradient: every process's input feeds every output, so the
    gradient is the sum over processes of the output gradients."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        total = tensor.clone()
        dist.all_reduce(total)
        return total

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        total = grad.clone()
        dist.all_reduce(total)
        return total


class CPUSyncBatchNorm(nn.BatchNorm2d):
    """BatchNorm2d whose training-mode mean and variance span all processes (any device).

    Two-pass statistics in at least float32 (global mean, then the global sum of squared
    deviations from it), so the result matches BatchNorm2d on the concatenated batch to float
    rounding. Eval mode, or a single process, is plain BatchNorm2d.

    Shape:
        ``(B, C, H, W)`` in and out; ``B`` may differ between processes.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        self._check_input_dim(x)
        values = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x  # autocast input
        local_count = values.new_tensor([x.numel() / x.shape[1]])
        sums = _SumOverProcesses.apply(torch.cat([values.sum(dim=(0, 2, 3)), local_count]))  # (C + 1,)
        count = sums[-1].detach()
        mean = sums[:-1] / count  # (C,)
        centered = values - mean[None, :, None, None]
        var = _SumOverProcesses.apply((centered * centered).sum(dim=(0, 2, 3))) / count  # (C,) biased
        if self.track_running_stats:
            self._update_running_stats(mean.detach(), var.detach() * count / (count - 1).clamp(min=1))
        out = centered * torch.rsqrt(var + self.eps)[None, :, None, None]
        if self.affine:
            out = out * self.weight[None, :, None, None] + self.bias[None, :, None, None]
        return out.to(x.dtype)

    @torch.no_grad()
    def _update_running_stats(self, mean: torch.Tensor, unbiased_var: torch.Tensor) -> None:
        self.num_batches_tracked += 1
        factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        self.running_mean.lerp_(mean.to(self.running_mean.dtype), factor)
        self.running_var.lerp_(unbiased_var.to(self.running_var.dtype), factor)


def convert_sync_batchnorm(module: nn.Module, device: torch.device) -> nn.Module:
    """`module` with every BatchNorm2d synchronised over the default process group.

    CUDA gets ``torch.nn.SyncBatchNorm``; other devices get :class:`CPUSyncBatchNorm`. Weights
    and running statistics are kept.
    """
    if torch.device(device).type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    if isinstance(module, nn.BatchNorm2d) and not isinstance(module, CPUSyncBatchNorm):
        converted = CPUSyncBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                                     module.track_running_stats)
        converted.load_state_dict(module.state_dict())  # weights and statistics, on CPU
        converted.train(module.training)
        return converted
    for name, child in module.named_children():
        module.add_module(name, convert_sync_batchnorm(child, device))
    return module
