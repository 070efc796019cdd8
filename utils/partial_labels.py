"""Set-valued and partial labels in torch: label-set tensors and the exclusion terms.

The losses (``utils/losses.py``) and the slice metrics (``utils/metrics.py``) call these.
``label_sets`` is a bool tensor ``(B, L, C)``: ``label_sets[b, l]`` is the set of classes a
pixel of item ``b`` stored as ``l`` may be (``utils/labels.py`` explains the representation and
builds it per source with ``LabelSource.label_sets``). An organ is *uncertain* in an item when
a row of the item that holds it holds other classes too; a class is *scoreable* when every row
holding it is that class alone.

Exclusion terms (Shi et al. 2021, "Marginal loss and exclusion loss for partially supervised
multi-organ segmentation", Medical Image Analysis 70, 101979):

- :func:`exclusion_term` (``exclusion="merged"``, this project's first form): on pixels whose
  class is a certain organ, ``-log(1 - q)`` with ``q`` the summed probability of the item's
  uncertain organs.
- :func:`exclusion_cross_entropy` and :func:`exclusion_dice` (``exclusion="published"``): per
  uncertain organ ``k`` the pixels known not to be ``k`` form the exclusion mask ``e_k``
  (:func:`exclusion_masks`); the cross-entropy side penalises ``-log(1 - p_k)`` on ``e_k`` and
  the Dice side adds the soft Dice between ``p_k`` and ``e_k``. The masks follow the authors'
  code (github.com/MIRACLE-Center/Partially-supervised-multi-organ-segmentation,
  ``nnunet/training/loss_functions/dice_loss.py``: ``expand_gt`` gives an unlabelled organ the
  mask ``1 - g_background``, the pixels labelled with an organ; ``Exclusion_loss`` adds
  ``+Dice(p_n, e_n)``). Differences, on purpose: their code also gives labelled classes a mask
  (``1 - g_n``, which repeats the ordinary loss) and we keep uncertain organs only; with set-valued
  labels ``e_k`` is "``k`` not in the pixel's set", which for an organ left out is the same set of
  pixels; the cross-entropy form ``-log(1 - p_k)`` is ours (their exclusion CE is commented out),
  chosen because it is 0 at ``p_k = 0``, finite for finite logits and steep as ``p_k -> 1``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def at_least_float32(values: torch.Tensor) -> torch.Tensor:
    """Half-precision values (autocast) go up to float32; float64 stays float64."""
    return values if values.dtype == torch.float64 else values.float()


def annotated_mask(annotated: torch.Tensor | None, batch: int, num_classes: int,
                   device: torch.device) -> torch.Tensor | None:
    """Validated ``(B, C)`` bool mask with background forced to True, or None."""
    if annotated is None:
        return None
    if annotated.shape != (batch, num_classes):
        raise ValueError(f"annotated must be (B, C) = ({batch}, {num_classes}), "
                         f"got {tuple(annotated.shape)}")
    annotated = annotated.to(device=device, dtype=torch.bool).clone()
    annotated[:, 0] = True
    return annotated


def label_sets_tensor(label_sets: torch.Tensor | None, batch: int, num_classes: int,
                      device: torch.device) -> torch.Tensor | None:
    """Validated ``(B, L, C)`` bool label sets, or None.

    Args:
        label_sets: ``(B, L, C)`` bool with ``L >= C`` (row ``l`` = the classes a pixel stored
            as ``l`` may be; a row of a value the item never holds may be empty), or the older
            ``(B, C)`` annotated mask: row 0 becomes background plus the unannotated classes,
            the other rows the identity. None passes through.
    """
    if label_sets is None:
        return None
    if label_sets.ndim == 2:
        annotated = annotated_mask(label_sets, batch, num_classes, device)
        sets = torch.eye(num_classes, dtype=torch.bool, device=device).repeat(batch, 1, 1)
        sets[:, 0] |= ~annotated  # (B, C, C)
        return sets
    if (label_sets.ndim != 3 or label_sets.shape[0] != batch or label_sets.shape[2] != num_classes
            or label_sets.shape[1] < num_classes):
        raise ValueError(f"label_sets must be (B, L, C) = ({batch}, L >= {num_classes}, {num_classes}) "
                         f"or an annotated mask (B, C), got {tuple(label_sets.shape)}")
    return label_sets.to(device=device, dtype=torch.bool)


def uncertain_organs(label_sets: torch.Tensor) -> torch.Tensor:
    """``(B, L, C)`` -> ``(B, C)`` bool: organs (never background) that some row of the item
    holding more than one class holds, i.e. organs a pixel's label may hide or only bound."""
    several = label_sets.sum(dim=-1) > 1  # (B, L)
    uncertain = (label_sets & several[..., None]).any(dim=1)  # (B, C)
    uncertain[:, 0] = False
    return uncertain


def scoreable(label_sets: torch.Tensor) -> torch.Tensor:
    """``(B, L, C)`` -> ``(B, C)`` bool: classes every pixel of the item is certainly in or out
    of (the torch twin of ``utils.labels.scoreable_classes``)."""
    several = label_sets.sum(dim=-1) > 1  # (B, L)
    return ~(label_sets & several[..., None]).any(dim=1)


def pixel_label_sets(label_sets: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``(B, L, C)`` sets and ``(B, H, W)`` stored values -> ``(B, C, H, W)`` bool: the classes
    each pixel may be."""
    batch, _, num_classes = label_sets.shape
    index = target.flatten(1)[:, :, None].expand(-1, -1, num_classes)  # (B, HW, C)
    sets = label_sets.gather(1, index)  # (B, HW, C)
    return sets.transpose(1, 2).reshape(batch, num_classes, *target.shape[1:])


def log_one_minus_softmax(logits: torch.Tensor) -> torch.Tensor:
    """``log(1 - softmax(logits))`` along dim 1, finite for any finite logits.

    ``1 - p_k = sum_{j != k} exp(x_j - m) / sum_j exp(x_j - m)`` with ``m`` the maximum. For every
    class but the largest the numerator holds the term ``exp(0) = 1``, so the subtraction
    ``s - exp(x_k - m)`` loses nothing that matters; for the largest class it is a logsumexp of
    the other classes, computed directly.

    Args:
        logits: ``(B, C, H, W)`` float, C >= 2.

    Returns:
        ``(B, C, H, W)``, values <= 0.
    """
    top = logits.argmax(dim=1, keepdim=True)  # (B, 1, H, W)
    is_top = torch.zeros_like(logits, dtype=torch.bool).scatter_(1, top, True)
    shifted = logits - logits.amax(dim=1, keepdim=True).detach()  # (B, C, H, W), <= 0
    exp = torch.exp(shifted)
    total = exp.sum(dim=1, keepdim=True)  # (B, 1, H, W), >= 1
    rest_of_top = torch.logsumexp(shifted.masked_fill(is_top, -torch.inf), dim=1, keepdim=True)
    rest = torch.where(is_top, torch.ones_like(exp), total - exp)  # no log(0) even unselected
    return torch.where(is_top, rest_of_top, torch.log(rest)) - torch.log(total)


def exclusion_term(logits: torch.Tensor, target: torch.Tensor,
                   label_sets: torch.Tensor) -> torch.Tensor:
    """The merged exclusion: mean ``-log(1 - q)`` on pixels whose class is a certain organ.

    ``q`` is the summed softmax probability of the item's uncertain organs
    (:func:`uncertain_organs`), and ``-log(1 - q) = logsumexp(all logits) - logsumexp(logits of
    the other classes)``, which stays finite for any logits. Items without uncertain organs and
    pixels whose set holds more than one class are left out.

    Args:
        logits: ``(B, C, H, W)`` float.
        target: ``(B, H, W)`` int stored values.
        label_sets: ``(B, L, C)`` bool, or a ``(B, C)`` annotated mask.

    Returns:
        float scalar, 0 (with a graph) when no pixel qualifies.
    """
    logits = at_least_float32(logits)
    sets = label_sets_tensor(label_sets, logits.shape[0], logits.shape[1], logits.device)
    uncertain = uncertain_organs(sets)  # (B, C)
    kept_logits = logits.masked_fill(uncertain[:, :, None, None], -torch.inf)  # (B, C, H, W)
    kept_logit = torch.logsumexp(kept_logits, dim=1)  # (B, H, W)
    penalty = torch.logsumexp(logits, dim=1) - kept_logit  # (B, H, W), -log(1 - q)
    certain_organ = ((sets.sum(dim=-1) == 1) & ~sets[:, :, 0]
                     & ~(sets & uncertain[:, None, :]).any(dim=-1))  # (B, L)
    labelled_organ = certain_organ.gather(1, target.flatten(1)).view_as(target)
    pixels = labelled_organ & uncertain.any(dim=1)[:, None, None]  # (B, H, W)
    return (penalty * pixels).sum() / pixels.sum().clamp(min=1)


def exclusion_masks(target: torch.Tensor, label_sets: torch.Tensor) -> torch.Tensor:
    """Shi et al.'s exclusion masks ``e_k``: ``(B, C, H, W)`` bool, True where organ ``k`` is
    uncertain in the item and the pixel's set does not hold ``k`` (the pixel is known not to be
    ``k``: for an organ a source leaves out, the pixels labelled with another organ)."""
    uncertain = uncertain_organs(label_sets)  # (B, C)
    return uncertain[:, :, None, None] & ~pixel_label_sets(label_sets, target)


def exclusion_cross_entropy(logits: torch.Tensor, target: torch.Tensor,
                            label_sets: torch.Tensor) -> torch.Tensor:
    """The published exclusion on the cross-entropy side: ``sum e_k(x) * -log(1 - p_k(x))``
    over organs ``k`` and pixels ``x``, divided by ``sum e_k(x)`` (0 when every mask is empty).

    ``-log(1 - p_k)`` is the binary cross-entropy of ``p_k`` against 0: it is 0 when the model
    puts no mass on ``k`` where ``k`` is excluded, and grows without bound as ``p_k -> 1``.

    Args:
        logits: ``(B, C, H, W)`` float.
        target: ``(B, H, W)`` int stored values.
        label_sets: ``(B, L, C)`` bool, or a ``(B, C)`` annotated mask.
    """
    logits = at_least_float32(logits)
    sets = label_sets_tensor(label_sets, logits.shape[0], logits.shape[1], logits.device)
    excluded = exclusion_masks(target.long(), sets)  # (B, C, H, W)
    penalty = -log_one_minus_softmax(logits)  # (B, C, H, W)
    return (penalty * excluded).sum() / excluded.sum().clamp(min=1)


def exclusion_dice(probs: torch.Tensor, target: torch.Tensor, label_sets: torch.Tensor,
                   smooth: float = 1e-5) -> torch.Tensor:
    """The published exclusion on the Dice side: mean over organs ``k`` with a non-empty mask of
    ``(2 sum p_k e_k + smooth) / (sum p_k + sum e_k + smooth)``, batch sums over the items where
    ``k`` is uncertain. It is 0 when the model puts no mass on ``k`` anywhere and 1 when ``p_k`` is
    exactly ``e_k``; it is added to the loss, so minimising it drives ``p_k`` off ``e_k``.

    Args:
        probs: ``(B, C, H, W)`` softmax probabilities.
        target: ``(B, H, W)`` int stored values.
        label_sets: ``(B, L, C)`` bool (validated).
    """
    uncertain = uncertain_organs(label_sets).to(probs.dtype)  # (B, C)
    excluded = exclusion_masks(target.long(), label_sets).to(probs.dtype)  # (B, C, H, W)
    intersection = (probs * excluded).sum(dim=(0, 2, 3))  # (C,)
    predicted = (probs.sum(dim=(2, 3)) * uncertain).sum(0)  # (C,)
    truth = excluded.sum(dim=(0, 2, 3))
    dice = (2 * intersection + smooth) / (predicted + truth + smooth)
    counted = truth > 0
    return (dice * counted).sum() / counted.sum().clamp(min=1)


def set_probabilities(probs: torch.Tensor, label_sets: torch.Tensor) -> torch.Tensor:
    """``(B, C, H, W)`` probabilities -> ``(B, L, H, W)``: the summed probability of each row's set.

    Row 0 is computed as ``p_0 + sum of the other classes in the row`` and the other rows as
    their own class plus one batched product for the rest, so a row that holds only its own
    class is exactly that class's probability.
    """
    num_classes, rows = probs.shape[1], label_sets.shape[1]
    others = label_sets.clone()
    others[:, :num_classes] &= ~torch.eye(num_classes, dtype=torch.bool, device=probs.device)
    others = others.to(probs.dtype)  # (B, L, C): each row without its own class
    background = probs[:, :1] + (probs * others[:, 0, :, None, None]).sum(dim=1, keepdim=True)
    rest = torch.einsum("blc,bchw->blhw", others[:, 1:], probs)  # (B, L - 1, H, W)
    own = F.pad(probs[:, 1:], (0, 0, 0, 0, 0, rows - num_classes))  # (B, L - 1, H, W)
    return torch.cat([background, own + rest], dim=1)


def scored_rows(label_sets: torch.Tensor) -> torch.Tensor:
    """``(B, L, C)`` -> ``(B, L)`` bool: rows the marginal Dice scores, those that are non-empty,
    not a strict subset of another row of the item (an organ left out keeps an identity row
    that row 0 contains; it is scored only through row 0) and, past row 0, without background.

    A row such as TotalSegmentator's femur = {femur head, background} is not a region: its summed
    probability is near 1 on every background pixel of the image, so its Dice would be about
    ``2 |femur| / |image|`` for a perfect prediction and its gradient would push probability off
    background everywhere. Such pixels are scored by the marginal cross-entropy alone."""
    sets = label_sets
    within = ~(sets[:, :, None, :] & ~sets[:, None, :, :]).any(dim=-1)  # (B, L, L): l subset of m
    strict = within & ~within.transpose(1, 2)
    with_background = sets[:, :, 0].clone()
    with_background[:, 0] = False
    return sets.any(dim=-1) & ~strict.any(dim=-1) & ~with_background
