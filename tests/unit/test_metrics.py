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


def test_identical_images_score_one_with_a_real_backbone():
    backbone = EfficientNetLitePatchBackbone.from_package()
    images = dreambench_crop(torch.rand(2, 3, 300, 400))
    assert images.shape == (2, 3, 224, 224)
    with torch.no_grad():
        embeddings, other = backbone.embed(images[:1]), backbone.embed(images[1:])
    assert mean_pairwise_cosine(embeddings, embeddings) == pytest.approx(1.0, abs=1e-5)
    assert mean_pairwise_cosine(embeddings, other) < 1.0


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
