"""FocusDPO focus maps on tensors: entropy by hand, the gate's end points, correspondence on
real photos with the built-in backbone, and the trainer-facing latent-grid call."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from prefpersonalize.pure.backbone import EfficientNetLitePatchBackbone
from prefpersonalize.pure.focus import (
    FocusMaps,
    blend_focus,
    complexity_gate,
    compute_focus_maps,
    local_entropy,
    percent_for_sigma,
    subject_weights_for,
)


def test_entropy_zero_on_flat_and_one_on_uniform_levels():
    flat = torch.full((1, 3, 32, 32), 0.4)
    assert local_entropy(flat, blur_sigma=0, window=5, bins=4).max() < 1e-6
    # A window holding the 4 bin levels equally often has entropy log 4 -> normalised 1.
    levels = torch.tensor([0.0, 1 / 3, 2 / 3, 1.0])
    tile = levels.view(2, 2).repeat(16, 16)  # 32 x 32 checker of the four levels
    image = tile.expand(1, 3, 32, 32)
    entropy = local_entropy(image, blur_sigma=0, window=4 * 2 + 1, bins=4)
    # Interior 9x9 windows hold 25/20/20/16 of the levels: entropy close to, below, 1.
    counts = torch.tensor([25.0, 20.0, 20.0, 16.0]) / 81
    expected = -(counts * counts.log()).sum() / math.log(4)
    assert entropy[0, 16, 16].item() == pytest.approx(expected.item(), abs=1e-4)


def test_complexity_higher_on_texture_than_flat():
    torch.manual_seed(0)
    image = torch.full((1, 3, 64, 64), 0.5)
    image[..., :, 32:] = torch.rand(1, 1, 64, 32)  # textured right half
    entropy = local_entropy(image)
    assert entropy[0, :, 40:].mean() > 0.3 > 0.01 > entropy[0, :, :24].mean()


def test_gate_end_points_and_monotone():
    progress = torch.linspace(0, 1, 11)
    gate = complexity_gate(progress, 0.3, 0.7)
    assert gate[:4].max() == 0.0 and gate[7:].min() == 1.0
    assert gate[5].item() == pytest.approx(0.5)
    assert (gate[1:] >= gate[:-1]).all()
    assert complexity_gate(0.5, 0.5, 0.5).item() == 1.0  # a hard switch when start == end


def test_percent_for_sigma_inverts_a_schedule():
    def percent_to_sigma(percent):  # a log-linear schedule from 14.6 down to 0.03
        return 0.0 if percent >= 1 else math.exp(math.log(14.6) + percent * (math.log(0.03) - math.log(14.6)))

    for percent in (0.0, 0.25, 0.5, 0.9):
        assert percent_for_sigma(percent_to_sigma(percent), percent_to_sigma) == pytest.approx(percent, abs=1e-6)


def test_blend_is_correspondence_early_and_average_late():
    correspondence = torch.tensor([[[1.0, 0.0]]])
    complexity = torch.tensor([[[0.0, 1.0]]])
    torch.testing.assert_close(blend_focus(correspondence, complexity, 0.0), correspondence)
    torch.testing.assert_close(blend_focus(correspondence, complexity, 1.0), torch.tensor([[[0.5, 0.5]]]))
    weighted = blend_focus(correspondence, complexity, 1.0, complexity_weight=3.0)
    torch.testing.assert_close(weighted, torch.tensor([[[0.25, 0.75]]]))


def test_focus_maps_on_latent_grid_per_sample_progress():
    maps = FocusMaps(correspondence=torch.rand(2, 14, 14), complexity=torch.rand(2, 112, 112))
    focus = maps.focus(torch.tensor([0.0, 1.0]), (8, 8))
    assert focus.shape == (2, 8, 8)
    correspondence, complexity = maps.on_grid((8, 8))
    torch.testing.assert_close(focus[0], correspondence[0])
    torch.testing.assert_close(focus[1], (correspondence[1] + complexity[1]) / 2)


def test_subject_weights_layouts():
    masks = torch.ones(2, 16, 16)
    one_ref_two_subjects = subject_weights_for(masks, 1, (4, 4))
    assert len(one_ref_two_subjects) == 2 and one_ref_two_subjects[0].shape == (1, 4, 4)
    per_reference = subject_weights_for(masks, 2, (4, 4))
    assert per_reference[0][1].sum() == 0 and per_reference[1][1].sum() == 16
    assert subject_weights_for(None, 3, (4, 4)) == [None]
    with pytest.raises(ValueError, match="3 subject masks for 2 reference"):
        subject_weights_for(torch.ones(3, 16, 16), 2, (4, 4))


def photo(name):
    from skimage import data

    return torch.from_numpy(np.asarray(getattr(data, name)())).float().div(255).permute(2, 0, 1).unsqueeze(0)


def test_correspondence_high_where_subject_region_was_replaced():
    backbone = EfficientNetLitePatchBackbone.from_package()
    cat, coffee = photo("chelsea"), photo("coffee")
    height, width = cat.shape[-2:]
    edited = cat.clone()
    edited[..., :, width // 2 :] = F.interpolate(coffee, size=(height, width - width // 2), mode="bilinear")
    maps = compute_focus_maps(backbone, edited, cat, resolution=320)
    priority = maps.correspondence[0]
    cols = priority.shape[1]
    assert priority[:, cols // 2 + 1 :].mean() > priority[:, : cols // 2 - 1].mean() + 0.3
    assert maps.complexity.shape == (1, height, width)


def test_two_subjects_in_one_reference():
    backbone = EfficientNetLitePatchBackbone.from_package()
    cat = photo("chelsea")
    left = torch.zeros(1, *cat.shape[-2:])
    left[..., : cat.shape[-1] // 2] = 1
    masks = torch.cat([left, 1 - left])
    maps = compute_focus_maps(backbone, cat, cat, masks, resolution=256)
    assert maps.correspondence.max() < 1e-3  # every patch is in one subject or the other
    with pytest.raises(ValueError, match="mask covers no reference patch"):
        compute_focus_maps(backbone, cat, cat, torch.cat([left, torch.zeros_like(left)]), resolution=256)
