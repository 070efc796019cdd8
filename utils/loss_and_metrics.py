"""The original project's module name, kept so its imports still work.

The losses live in ``utils/losses.py`` and the metrics in ``utils/metrics.py``.
"""

from utils.losses import DiceCELoss, SoftDiceLoss, WeightedCELoss, boundary_weight, build_loss  # noqa: F401
from utils.metrics import SliceMetrics, dice_iou_3d, hd95_mm, surface_dice  # noqa: F401
