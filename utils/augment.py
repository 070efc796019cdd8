"""Online augmentation of whole batches on the training device.

Replaces the original project's 16 stored copies of every slice (right-angle rotations x
brightness levels) with random draws per item and per step: one affine per item (right-angle
rotation, mirror, small rotation, zoom) applied with one ``affine_grid`` and two
``grid_sample`` calls, then brightness/contrast levels and noise. No Python loop over items,
no host synchronisation; randomness comes only from the ``generator`` passed in, so a seed
reproduces a batch exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F

MAX_DISTANCE = 255.0  # "far from any boundary", what the padding of the distance map holds

# Output -> input maps of torch.rot90(x, k, dims=(-2, -1)) in affine_grid's normalised (x, y).
_ROT90 = ((1.0, 0.0, 0.0, 1.0), (0.0, -1.0, 1.0, 0.0), (-1.0, 0.0, 0.0, -1.0), (0.0, 1.0, -1.0, 0.0))


@dataclass(frozen=True)
class AugmentParams:
    """Augmentation settings; ``TrainConfig.augment`` holds one (``--set augment.rotate_deg=5``)."""

    enabled: bool = True                # False: training sees the slices unchanged
    rot90_p: float = 0.0                # probability of a right-angle rotation (k uniform in 1..3)
    flip_p: float = 0.0                 # probability of mirroring the rows (the X axis: left <-> right)
    rotate_deg: float = 10.0            # small rotation, uniform in +-rotate_deg degrees
    scale_range: tuple[float, float] = (0.9, 1.1)  # zoom factor, uniform; > 1 enlarges
    num_brightness_variations: int = 4  # discrete brightness and contrast levels; 0 or 1 disables
    brightness: float = 0.1             # offsets linspace(-brightness, brightness, n)
    contrast: float = 0.15              # factors linspace(1 - contrast, 1 + contrast, n), about the mean
    noise_std: float = 0.02             # Gaussian noise on the [0, 1] image

    def __post_init__(self):
        low, high = (float(v) for v in self.scale_range)
        object.__setattr__(self, "scale_range", (low, high))
        if not 0 < low <= high:
            raise ValueError(f"scale_range must be 0 < low <= high, got {self.scale_range}")
        for name in ("rot90_p", "flip_p"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} must be a probability in [0, 1], got {getattr(self, name)}")

    @classmethod
    def from_config(cls, cfg) -> "AugmentParams":
        """A config's augmentation settings: its ``augment`` when that is an AugmentParams (the
        TrainConfig), else its same-named fields (missing ones keep defaults)."""
        if isinstance(getattr(cfg, "augment", None), cls):
            return cfg.augment
        return cls(**{f.name: getattr(cfg, f.name) for f in fields(cls) if hasattr(cfg, f.name)})

    @property
    def geometric(self) -> bool:
        """Whether any geometric transform can be drawn."""
        return bool(self.rot90_p or self.flip_p or self.rotate_deg or self.scale_range != (1.0, 1.0))


def random_affine(batch: int, height: int, width: int, params: AugmentParams,
                  generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """One random output->input affine per item, for ``F.affine_grid``.

    Returns:
        theta ``(B, 2, 3)`` float32 and zoom ``(B,)`` (how much the content is enlarged).
    """
    device = generator.device
    draws = torch.rand(batch, 4, generator=generator, device=device)  # (B, [rot90, flip, angle, zoom])
    k = torch.randint(1, 4, (batch,), generator=generator, device=device)
    k = torch.where(draws[:, 0] < params.rot90_p, k, torch.zeros_like(k))
    rot90 = torch.tensor(_ROT90, device=device)[k].view(batch, 2, 2)
    flip = torch.where(draws[:, 1] < params.flip_p, -1.0, 1.0)
    angle = (2 * draws[:, 2] - 1) * math.radians(params.rotate_deg)
    low, high = params.scale_range
    zoom = low + (high - low) * draws[:, 3]
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    # rotation and zoom in pixel units, then into normalised units: (x, y) scale by (W/2, H/2)
    aspect = height / width
    linear = torch.stack([torch.stack([cos, -sin * aspect * flip], -1),
                          torch.stack([sin / aspect, cos * flip], -1)], -2)  # (B, 2, 2); flip mirrors y
    theta = torch.cat([rot90 @ linear, torch.zeros(batch, 2, 1, device=device)], dim=2)  # (B, 2, 3)
    return theta, zoom


def augment_batch(image: torch.Tensor, label: torch.Tensor, distance: torch.Tensor, params: AugmentParams,
                  generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Augment a batch on its own device.

    Args:
        image: ``(B, C, H, W)`` float in [0, 1].
        label: ``(B, H, W)`` int64 class ids (resampled by nearest neighbour, padded with 0).
        distance: ``(B, H, W)`` float pixels to the nearest boundary (bilinear, padded with 255,
            multiplied by the zoom so it stays in output pixels, capped at 255).
        generator: a ``torch.Generator`` on the batch's device.

    Returns:
        ``(image, label, distance)``, same shapes and dtypes; the inputs unchanged when `params`
        are neutral or not ``enabled``.
    """
    batch, channels, height, width = image.shape
    if not params.enabled:
        return image, label, distance
    if params.geometric:
        theta, zoom = random_affine(batch, height, width, params, generator)
        grid = F.affine_grid(theta.to(image.dtype), [batch, 1, height, width], align_corners=False)
        # zoom first (sampling is linear), then distance - 255 pads with 255 under zero padding;
        # image and distance share one grid_sample call
        distance = distance * zoom.view(-1, 1, 1) - MAX_DISTANCE
        stacked = torch.cat([image, distance.unsqueeze(1).to(image.dtype)], dim=1)
        sampled = F.grid_sample(stacked, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        new_image = sampled[:, :channels]
        if image.is_contiguous(memory_format=torch.channels_last):
            new_image = new_image.contiguous(memory_format=torch.channels_last)
        image = new_image
        distance = (sampled[:, channels] + MAX_DISTANCE).clamp_(0, MAX_DISTANCE).to(torch.float32)
        label = F.grid_sample(label.unsqueeze(1).to(image.dtype), grid, mode="nearest", padding_mode="zeros",
                              align_corners=False)[:, 0].round_().long()
    levels = params.num_brightness_variations
    if levels >= 2 and (params.contrast or params.brightness):
        index = torch.randint(0, levels, (2, batch), generator=generator, device=image.device)
        factor = torch.linspace(1 - params.contrast, 1 + params.contrast, levels, device=image.device)[index[0]]
        offset = torch.linspace(-params.brightness, params.brightness, levels, device=image.device)[index[1]]
        mean = image.mean(dim=(1, 2, 3), keepdim=True)  # (B, 1, 1, 1)
        image = (image - mean) * factor.view(-1, 1, 1, 1) + mean + offset.view(-1, 1, 1, 1)
    if params.noise_std > 0:
        noise = torch.randn(image.shape, generator=generator, device=image.device, dtype=image.dtype)
        image = image + noise * params.noise_std
    return image.clamp(0, 1), label, distance
