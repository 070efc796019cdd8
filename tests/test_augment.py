"""Batch augmentation on the device: identity, label integrity, rot90, determinism, padding."""

import dataclasses

import pytest
import torch

from training.config import TrainConfig
from utils.augment import AugmentParams, augment_batch

NEUTRAL = AugmentParams(rot90_p=0.0, flip_p=0.0, rotate_deg=0.0, scale_range=(1.0, 1.0),
                        num_brightness_variations=1, brightness=0.0, contrast=0.0, noise_std=0.0)


def make_batch(batch=4, channels=3, size=24, seed=0):
    generator = torch.Generator().manual_seed(seed)
    image = torch.rand(batch, channels, size, size, generator=generator)
    label = torch.zeros(batch, size, size, dtype=torch.long)
    label[:, 4:12, 6:18] = 3
    label[:, 14:20, 2:9] = 7
    distance = torch.rand(batch, size, size, generator=generator) * 20
    return image, label, distance


def test_neutral_params_are_identity():
    image, label, distance = make_batch()
    out = augment_batch(image, label, distance, NEUTRAL, torch.Generator().manual_seed(0))
    assert torch.allclose(out[0], image, atol=1e-6)
    assert torch.equal(out[1], label)
    assert torch.allclose(out[2], distance, atol=1e-6)
    # an identity affine through grid_sample (drawn, not skipped) changes nothing either
    drawn = dataclasses.replace(NEUTRAL, rotate_deg=1e-9)
    out = augment_batch(image, label, distance, drawn, torch.Generator().manual_seed(0))
    assert torch.allclose(out[0], image, atol=1e-5) and torch.equal(out[1], label)


def test_labels_stay_label_values_and_dtypes_hold():
    image, label, distance = make_batch()
    params = AugmentParams(rot90_p=0.5, flip_p=0.5, rotate_deg=30, scale_range=(0.7, 1.4))
    out_image, out_label, out_distance = augment_batch(image, label, distance, params,
                                                       torch.Generator().manual_seed(1))
    assert set(out_label.unique().tolist()) <= set(label.unique().tolist())
    assert out_label.dtype == torch.long and out_image.dtype == torch.float32
    assert out_distance.dtype == torch.float32 and out_image.shape == image.shape
    assert 0 <= out_image.min() and out_image.max() <= 1
    assert 0 <= out_distance.min() and out_distance.max() <= 255


def test_rot90_matches_torch_rot90():
    image, label, distance = make_batch(batch=8)
    params = dataclasses.replace(NEUTRAL, rot90_p=1.0)
    out_image, out_label, out_distance = augment_batch(image, label, distance, params,
                                                       torch.Generator().manual_seed(2))
    seen = set()
    for i in range(len(image)):
        matches = [k for k in (1, 2, 3) if torch.equal(out_label[i], torch.rot90(label[i], k, dims=(0, 1)))]
        assert len(matches) == 1
        k = matches[0]
        seen.add(k)
        assert torch.allclose(out_image[i], torch.rot90(image[i], k, dims=(1, 2)), atol=1e-5)
        assert torch.allclose(out_distance[i], torch.rot90(distance[i], k, dims=(0, 1)), atol=1e-4)
    assert len(seen) >= 2  # k is drawn per item


def test_flip_mirrors_rows():
    image, label, distance = make_batch()
    params = dataclasses.replace(NEUTRAL, flip_p=1.0)
    out_image, out_label, _ = augment_batch(image, label, distance, params, torch.Generator().manual_seed(0))
    assert torch.equal(out_label, label.flip(1))
    assert torch.allclose(out_image, image.flip(2), atol=1e-5)


def test_same_seed_same_output():
    image, label, distance = make_batch()
    params = AugmentParams(rot90_p=0.5, flip_p=0.5)
    first = augment_batch(image, label, distance, params, torch.Generator().manual_seed(5))
    second = augment_batch(image, label, distance, params, torch.Generator().manual_seed(5))
    other = augment_batch(image, label, distance, params, torch.Generator().manual_seed(6))
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    assert not torch.equal(first[0], other[0])


def test_padding_air_background_and_far_distance():
    image, label, distance = make_batch(size=32)
    label[:] = 3  # the whole slice is an organ: padding must still be background
    params = dataclasses.replace(NEUTRAL, scale_range=(0.5, 0.5))  # shrink: the border is padding
    out_image, out_label, out_distance = augment_batch(image, label, distance, params,
                                                       torch.Generator().manual_seed(0))
    assert (out_image[:, :, :4] == 0).all() and (out_label[:, :4] == 0).all()
    assert (out_distance[:, :4] == 255).all()
    assert (out_label[:, 12:20, 12:20] == 3).all()
    # inside, distances halve with the zoom (they stay in output pixels)
    distance[:] = 10.0
    out_distance = augment_batch(image, label, distance, params, torch.Generator().manual_seed(0))[2]
    assert torch.allclose(out_distance[:, 10:22, 10:22], torch.tensor(5.0))


def test_intensity_levels_are_discrete():
    image = torch.full((64, 1, 8, 8), 0.5)
    label = torch.zeros(64, 8, 8, dtype=torch.long)
    params = dataclasses.replace(NEUTRAL, num_brightness_variations=4, brightness=0.1, contrast=0.2)
    out = augment_batch(image, label, label.float(), params, torch.Generator().manual_seed(0))[0]
    offsets = torch.linspace(-0.1, 0.1, 4)
    levels = out[:, 0, 0, 0]  # a flat image: contrast is invisible, brightness shows
    assert torch.isclose(levels[:, None], 0.5 + offsets[None], atol=1e-6).any(1).all()
    assert len(levels.unique()) > 1


def test_from_config_picks_the_same_named_fields():
    cfg = TrainConfig().replace(**{"augment.rot90_p": 0.25, "augment.scale_range": [0.8, 1.2], "noise_std": 0.0})
    params = AugmentParams.from_config(cfg)
    assert params.rot90_p == 0.25 and params.scale_range == (0.8, 1.2) and params.noise_std == 0.0
    assert params == cfg.augment and params.num_brightness_variations == 4
    with pytest.raises(ValueError, match="scale_range"):
        AugmentParams(scale_range=(1.2, 0.8))
