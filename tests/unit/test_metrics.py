"""Personalization metrics on tensors: identical images give 1, a hand-computed cosine, the
DreamBench crop and the table."""

import math

import pytest
import torch

from prefpersonalize.pure.backbone import EfficientNetLitePatchBackbone
from prefpersonalize.pure.drawing import render_text_image
from prefpersonalize.pure.metrics import MetricRow, dreambench_crop, format_table, mean_pairwise_cosine


def test_mean_pairwise_cosine_hand_computed():
    a = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    b = torch.tensor([[1.0, 1.0]])
    # cos([1,0],[1,1]) = cos([0,2],[1,1]) = 1/sqrt2
    assert mean_pairwise_cosine(a, b) == pytest.approx(1 / math.sqrt(2))
    b2 = torch.tensor([[1.0, 0.0], [-1.0, 0.0]])
    # pairs: 1, -1, 0, 0 -> mean 0
    assert mean_pairwise_cosine(a, b2) == pytest.approx(0.0, abs=1e-7)
    with pytest.raises(ValueError, match="not a pair"):
        mean_pairwise_cosine(torch.ones(1, 3), torch.ones(1, 4))


def test_real_backbone_ranks_a_near_copy_above_another_subject():
    """DINO-style similarity with real ImageNet weights: the cat photo, shifted and mirrored,
    stays closer to itself than to the coffee photo, and embedding it alone or in a batch gives
    the same vector (an eval-mode backbone)."""
    from skimage import data

    def crop(array):
        return dreambench_crop(torch.from_numpy(array.copy()).float().div(255).permute(2, 0, 1).unsqueeze(0))

    cat, coffee = crop(data.chelsea()), crop(data.coffee())
    near_copy = crop(data.chelsea()[10:, 12:][:, ::-1])
    backbone = EfficientNetLitePatchBackbone.from_package()
    with torch.no_grad():
        alone = backbone.embed(cat)
        batch = backbone.embed(torch.cat([cat, near_copy, coffee]))
    assert mean_pairwise_cosine(alone, batch[:1]) == pytest.approx(1.0, abs=1e-5)
    assert mean_pairwise_cosine(alone, batch[1:2]) > mean_pairwise_cosine(alone, batch[2:]) + 0.1


def test_table_with_before_after_and_delta():
    text = format_table([MetricRow("DINO", 0.75, 0.5), MetricRow("CLIP-T", None, note="connect CLIP")])
    lines = text.splitlines()
    assert lines[0].split() == ["metric", "value", "before", "delta"]
    assert lines[1].split() == ["DINO", "0.7500", "0.5000", "+0.2500"]
    assert lines[2].split() == ["CLIP-T", "n/a", "n/a", "n/a"]
    assert lines[3] == "CLIP-T: connect CLIP"
    assert format_table([MetricRow("DINO", 0.5)]).splitlines()[0].split() == ["metric", "value"]
    image = render_text_image(text)
    assert image.ndim == 3 and image.shape[-1] == 3 and image.min() < 0.5
