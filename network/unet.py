"""2D U-Net (Ronneberger et al. 2015) for segmenting abdominal CT slices.

Input ``(B, in_channels, H, W)``: one CT slice, or ``in_channels`` neighbouring slices (2.5D).
Output raw logits ``(B, out_channels, H, W)``, the same H and W as the input.

The network pools ``len(features)`` times, so internally H and W must be multiples of
``2 ** len(features)`` (16 for the default four levels). Any other size is padded with zeros
on the bottom and right up to the next multiple and the logits are cropped back, so callers
never see the padding.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Sequence
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval
from torch.utils.checkpoint import checkpoint


class DoubleConv(nn.Sequential):
    """Two (3x3 conv, BatchNorm, ReLU) layers; keeps H and W."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__(
            nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )


class Down(nn.Sequential):
    """2x2 max-pooling then DoubleConv; halves H and W."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__(nn.MaxPool2d(kernel_size=2), DoubleConv(in_channels, out_channels))


class UpConv2x2(nn.ConvTranspose2d):
    """``nn.ConvTranspose2d(in_channels, out_channels, kernel_size=2, stride=2)``, computed as a matmul.

    With kernel = stride = 2 every input pixel makes its own 2x2 block of output pixels, so the
    layer is one ``(B h w, C_in) @ (C_in, 2*2*C_out)`` matmul and a reshuffle. Same function and
    parameters as the transposed conv (checkpoints load either way). Used on CPU when gradients
    are needed, because oneDNN's transposed-conv backward ran at a fifth of the matmul rate
    (about 5% of a training step of the seed model). Without gradients the transposed-conv
    kernel runs, as its forward is the faster one (about 5% of CPU inference); on GPUs it always
    runs, as the matmul form was only measured on CPU.
    """

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__(in_channels, out_channels, kernel_size=2, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        needs_grad = torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad)
        if x.device.type != "cpu" or not needs_grad:
            return super().forward(x)
        b, _, h, w = x.shape
        c = self.out_channels
        weight = self.weight.permute(0, 2, 3, 1).reshape(self.in_channels, 4 * c)  # (C_in, 2*2*C_out)
        rows = x.permute(0, 2, 3, 1).reshape(b * h * w, self.in_channels)  # (B h w, C_in)
        y = torch.addmm(self.bias.repeat(4), rows, weight)  # (B h w, 2*2*C_out)
        y = y.view(b, h, w, 2, 2, c).transpose(2, 3).reshape(b, 2 * h, 2 * w, c)  # (B, h, 2, w, 2, C_out)
        return y.permute(0, 3, 1, 2)  # (B, C_out, 2h, 2w), channels_last in memory


class Up(nn.Module):
    """2x2 transposed conv (doubles H and W), concatenation with the skip, then DoubleConv."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.up = UpConv2x2(in_channels, out_channels)
        self.conv = DoubleConv(2 * out_channels, out_channels)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = self.up(x)  # (B, C_in, h, w) -> (B, C_out, 2h, 2w)
        return self.conv(torch.cat([skip, x], dim=1))  # (B, 2 C_out, H, W) -> (B, C_out, H, W)


@contextlib.contextmanager
def _keep_batchnorm_statistics(module: nn.Module):
    """Restore BatchNorm running statistics on exit.

    Checkpointing reruns a block's forward during backward; without this the rerun would update
    the running mean and variance a second time per step.
    """
    norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [[buffer.clone() for buffer in norm.buffers()] for norm in norms]
    try:
        yield
    finally:
        with torch.no_grad():
            for norm, buffers in zip(norms, saved):
                for buffer, value in zip(norm.buffers(), buffers):
                    buffer.copy_(value)


def _recompute_contexts(module: nn.Module):
    """Contexts for torch.utils.checkpoint: plain forward, statistics-preserving recompute."""
    return contextlib.nullcontext(), _keep_batchnorm_statistics(module)


class UNet(nn.Module):
    """U-Net returning per-pixel class logits.

    Args:
        in_channels: input channels; 1 for a single slice, 2k+1 for k neighbours on each side.
        out_channels: number of classes, background included (12 for 11 organs).
        features: channels of each encoder level (list or tuple, length >= 1); the bottleneck
            has ``2 * features[-1]`` channels (1024 for the default).
        checkpointing: recompute each block's activations during backward
            (torch.utils.checkpoint, non-reentrant) to save memory; active only in training mode
            with gradients enabled. Outputs, gradients and BatchNorm statistics are unchanged.

    Shape:
        input ``(B, in_channels, H, W)`` with any H, W >= 1; output logits
        ``(B, out_channels, H, W)``.
    """

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int = 12,
        features: Sequence[int] = (64, 128, 256, 512),
        checkpointing: bool = False,
    ):
        super().__init__()
        features = tuple(int(f) for f in features)
        if not features or min(features) < 1:
            raise ValueError(f"features must be a non-empty sequence of positive ints, "
                             f"got {features}")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.features = features
        self.checkpointing = checkpointing

        widths = features + (2 * features[-1],)  # encoder levels, then the bottleneck
        self.stem = DoubleConv(in_channels, features[0])
        self.downs = nn.ModuleList(Down(a, b) for a, b in zip(widths[:-1], widths[1:]))
        self.ups = nn.ModuleList(Up(b, a) for a, b in reversed(list(zip(widths[:-1], widths[1:]))))
        self.head = nn.Conv2d(features[0], out_channels, kernel_size=1)

    @property
    def size_multiple(self) -> int:
        """H and W are padded internally up to a multiple of this (2 ** number of poolings)."""
        return 2 ** len(self.features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, out_channels, H, W)`` for images ``(B, in_channels, H, W)``."""
        self._check_input(x)
        height, width = x.shape[-2:]
        m = self.size_multiple
        x = F.pad(x, (0, -width % m, 0, -height % m))  # zeros on the right and bottom
        skips = [self._run(self.stem, x)]
        for down in self.downs:
            skips.append(self._run(down, skips[-1]))
        x = skips.pop()  # bottleneck (B, 2 features[-1], H / m, W / m)
        for up in self.ups:
            x = self._run(up, x, skips.pop())
        return self.head(x)[..., :height, :width]

    def _run(self, block: nn.Module, *inputs: torch.Tensor) -> torch.Tensor:
        if self.checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(
                block, *inputs, use_reentrant=False, context_fn=partial(_recompute_contexts, block)
            )
        return block(*inputs)

    def _check_input(self, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor) or x.ndim != 4:
            shape = getattr(x, "shape", type(x))
            raise ValueError(f"expected a tensor (B, C, H, W), got shape {shape}")
        if x.shape[1] != self.in_channels:
            raise ValueError(f"expected {self.in_channels} input channels, got {x.shape[1]}")
        if x.shape[0] == 0 or x.shape[2] == 0 or x.shape[3] == 0:
            raise ValueError(f"empty input of shape {tuple(x.shape)}")


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """An inference copy of ``model`` with every BatchNorm folded into the conv before it.

    Each ``Conv2d`` directly followed by ``BatchNorm2d`` inside an ``nn.Sequential`` becomes one
    conv with bias (the BatchNorm is replaced by ``nn.Identity``). The copy is in eval mode and
    gives the same outputs as ``model.eval()`` up to float rounding; ``model`` is not changed.

    Args:
        model: any module, typically a trained ``UNet``.

    Returns:
        The folded copy, in eval mode.
    """
    folded = copy.deepcopy(model).eval()
    for module in list(folded.modules()):
        if not isinstance(module, nn.Sequential):
            continue
        for i in range(len(module) - 1):
            conv, norm = module[i], module[i + 1]
            if isinstance(conv, nn.Conv2d) and isinstance(norm, nn.BatchNorm2d):
                module[i] = fuse_conv_bn_eval(conv, norm)
                module[i + 1] = nn.Identity()
    return folded
