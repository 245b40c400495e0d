"""PatchDPO's self-supervised estimator step: true correspondences by hand, then real tuning
of the built-in backbone on real photos (held-out accuracy must rise)."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from prefpersonalize.pure.backbone import EfficientNetLitePatchBackbone, apply_tuned_head, read_tuned_head
from prefpersonalize.trainers.estimator import (
    EstimatorSettings,
    dense_info_nce,
    make_view_pairs,
    patch_correspondences,
    random_affine,
    train_patch_estimator,
)


def test_identity_views_match_every_patch_to_itself():
    source, target = patch_correspondences(torch.eye(3), torch.eye(3), size=64, patch=16)
    assert torch.equal(source, torch.arange(16)) and torch.equal(target, torch.arange(16))


def test_shift_by_one_patch_moves_matches_and_drops_the_edge():
    shift = torch.eye(3)
    shift[0, 2] = 16.0  # view B = canvas moved 16 px right
    source, target = patch_correspondences(torch.eye(3), shift, size=64, patch=16)
    # Columns 0..2 of A land in columns 1..3 of B; column 3 falls off the view.
    assert len(source) == 12
    assert torch.equal(target, source + 1)
    assert (source % 4 != 3).all()


def test_horizontal_flip_mirrors_columns():
    flip = torch.tensor([[-1.0, 0.0, 64.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    source, target = patch_correspondences(torch.eye(3), flip, size=64, patch=16)
    assert torch.equal(target % 4, 3 - source % 4) and torch.equal(target // 4, source // 4)


def test_random_affine_is_seeded_and_invertible():
    first = random_affine(224, torch.Generator().manual_seed(3))
    again = random_affine(224, torch.Generator().manual_seed(3))
    torch.testing.assert_close(first, again)
    torch.testing.assert_close(torch.linalg.inv(first) @ first, torch.eye(3), atol=1e-4, rtol=0)


def test_dense_info_nce_hand_computed():
    # Two patches in each view; A's first matches B's second.
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0]]).T.reshape(2, 1, 2)
    b = torch.tensor([[0.0, 1.0], [1.0, 0.0]]).T.reshape(2, 1, 2)
    loss = dense_info_nce(a, b, torch.tensor([0]), torch.tensor([1]), temperature=0.5)
    # logits = [0, 1] / 0.5 = [0, 2]; CE = log(1 + e^2) - 2.
    assert loss.item() == pytest.approx(math.log(1 + math.e**2) - 2, abs=1e-6)


def photos():
    from skimage import data

    images = [data.chelsea(), data.coffee(), data.astronaut()]
    tensors = [torch.from_numpy(np.asarray(image)).float().div(255).permute(2, 0, 1).unsqueeze(0) for image in images]
    return torch.cat([F.interpolate(t, size=(240, 320), mode="area") for t in tensors])


@pytest.fixture(scope="module")
def backbone():
    return EfficientNetLitePatchBackbone.from_package()


def test_view_pairs_have_matches(backbone):
    pairs = make_view_pairs(photos(), 4, 224, 16, torch.Generator().manual_seed(0))
    assert all(pair.view_a.shape == (3, 224, 224) and len(pair.source) > 50 for pair in pairs)


def test_tuning_raises_held_out_correspondence_accuracy(backbone, tmp_path):
    result = train_patch_estimator(
        backbone, "built-in", photos(), EstimatorSettings(steps=30, learning_rate=4e-3, resolution=160, seed=0)
    )
    assert result.accuracy_after > result.accuracy_before + 0.08, (result.accuracy_before, result.accuracy_after)
    assert result.losses[-1] < result.losses[0]

    path = str(tmp_path / "tuned.safetensors")
    result.backbone.save(path)
    base_id, state = read_tuned_head(path)
    reloaded = apply_tuned_head(backbone, base_id, state)
    images = torch.rand(1, 3, 64, 64)
    torch.testing.assert_close(reloaded(images), result.backbone(images))
    assert base_id == "built-in" and not (tmp_path / "tuned.safetensors.partial").exists()


def test_zero_steps_is_the_base_and_input_is_never_modified(backbone):
    images = photos()[:1]
    untouched = train_patch_estimator(backbone, "built-in", images, EstimatorSettings(steps=0, held_out_pairs=2))
    assert untouched.accuracy_after == untouched.accuracy_before and untouched.losses == []
    probe = torch.rand(1, 3, 64, 64)
    torch.testing.assert_close(untouched.backbone(probe), backbone(probe).float())

    first = train_patch_estimator(backbone, "built-in", images, EstimatorSettings(steps=3, held_out_pairs=2))
    head_before = {k: v.clone() for k, v in first.backbone.head.state_dict().items()}
    train_patch_estimator(first.backbone, "built-in", images, EstimatorSettings(steps=3, held_out_pairs=2))
    for key, value in first.backbone.head.state_dict().items():
        torch.testing.assert_close(value, head_before[key])


def test_no_photos_is_an_error(backbone):
    with pytest.raises(ValueError, match="no reference photos"):
        train_patch_estimator(backbone, "built-in", torch.rand(0, 3, 64, 64))
