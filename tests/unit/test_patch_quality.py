"""The patch-quality rule on tensors: hand-computed cases, then real photos with the
built-in offline backbone."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from prefpersonalize.pure.backbone import EfficientNetLitePatchBackbone, PatchBackbone
from prefpersonalize.pure.drawing import heat_colors, labelled_strip, overlay_heat
from prefpersonalize.pure.images import check_image_batch, maps_to_grid, resize_to_patch_grid, to_rgb_channels_first
from prefpersonalize.pure.patch_quality import best_match_quality, score_patches


def grid(*patches):
    """Features ``[1, C, 1, N]`` from a list of C-vectors (one row of N patches)."""
    return torch.tensor(patches, dtype=torch.float32).T.reshape(1, len(patches[0]), 1, len(patches))


# --- the rule, by hand ------------------------------------------------------------------------


def test_best_match_quality_hand_computed():
    # Reference patches [1, 0] and [0, 1]: centre [0.5, 0.5], centred (1, -1)/sqrt2 and (-1, 1)/sqrt2.
    references = grid([1.0, 0.0], [0.0, 1.0])
    # [1, 0] -> centred (0.5, -0.5): cosine 1 with the first reference.
    # [0, 0] -> centred (-0.5, -0.5): orthogonal to both references -> 0.
    # [2, 0] -> centred (1.5, -0.5): cosine (1.5 + 0.5) / (sqrt(2.5) * sqrt(2)) = 2 / sqrt(5).
    # [0, 0.5] -> centred (-0.5, 0): cosine with the second = 0.5 / (0.5 * sqrt 2) = 1/sqrt2.
    generated = grid([1.0, 0.0], [0.0, 0.0], [2.0, 0.0], [0.0, 0.5])
    quality = best_match_quality(generated, references)
    expected = torch.tensor([[[1.0, 0.0, 2 / math.sqrt(5), 1 / math.sqrt(2)]]])
    assert quality.shape == (1, 1, 4)
    torch.testing.assert_close(quality, expected, atol=1e-6, rtol=0)


def test_best_match_quality_clamps_rounding_above_one():
    # Centred references sum to zero, so some reference always has a non-negative cosine with a
    # generated patch: the clamp's lower end never acts. Its upper end does: float32 rounding
    # gives this patch a cosine of 1.0000001 with itself.
    patch = [41.28321838378906, 103.52395629882812, 6.582902908325195]
    references = grid(patch, [-34.984004974365234, -56.53984451293945, -24.82371711730957])
    quality = best_match_quality(grid(patch), references)
    assert quality.item() == 1.0


def test_reference_mask_restricts_matching():
    references = grid([1.0, 0.0], [0.0, 1.0], [1.0, 1.0])
    generated = grid([0.0, 1.0])
    unmasked = best_match_quality(generated, references)
    weights = torch.tensor([[[1.0, 0.0, 1.0]]])  # the second reference patch is background
    masked = best_match_quality(generated, references, weights)
    assert unmasked.item() == pytest.approx(1.0, abs=1e-6)
    assert masked.item() < 0.9


def test_empty_mask_is_an_error():
    with pytest.raises(ValueError, match="mask covers no reference patch"):
        best_match_quality(grid([1.0, 0.0]), grid([1.0, 0.0]), torch.zeros(1, 1, 1))


# --- image helpers ----------------------------------------------------------------------------


def test_to_rgb_handles_grayscale_and_rgba():
    gray = torch.rand(2, 5, 7, 1)
    rgb = to_rgb_channels_first(gray)
    assert rgb.shape == (2, 3, 5, 7)
    torch.testing.assert_close(rgb[:, 1], gray[..., 0])
    rgba = torch.rand(1, 5, 7, 4)
    out = to_rgb_channels_first(rgba)
    torch.testing.assert_close(out, (rgba[..., :3] * rgba[..., 3:]).movedim(-1, 1))
    with pytest.raises(ValueError, match="2"):
        to_rgb_channels_first(torch.rand(1, 5, 7, 2))


def test_check_image_batch_messages():
    check_image_batch(torch.rand(1, 4, 4, 3), "generated")
    with pytest.raises(ValueError, match="'references' is an empty batch"):
        check_image_batch(torch.rand(0, 4, 4, 3), "references")
    nan = torch.rand(1, 4, 4, 3)
    nan[0, 1, 1, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        check_image_batch(nan, "generated")
    with pytest.raises(ValueError, match="5 channels"):
        check_image_batch(torch.rand(1, 4, 4, 5), "generated")


def test_resize_to_patch_grid_keeps_aspect_on_the_grid():
    images = torch.rand(1, 3, 300, 451)
    out = resize_to_patch_grid(images, 448, 16)
    assert out.shape == (1, 3, 448, 672)  # 28 x 42 patches of 16 px
    assert resize_to_patch_grid(torch.rand(1, 3, 8, 8), 4, 16).shape == (1, 3, 16, 16)


def test_maps_to_grid_is_mask_coverage():
    mask = torch.zeros(1, 4, 4)
    mask[:, :2, :2] = 1
    mask[:, 2:, 2:3] = 1
    torch.testing.assert_close(maps_to_grid(mask, (2, 2)), torch.tensor([[[1.0, 0.0], [0.0, 0.5]]]))


def test_heat_colours_hot_red_and_cold_blue():
    colors = heat_colors(torch.tensor([[[1.0, 0.0]]]))
    assert colors.shape == (1, 3, 1, 2)
    hot, cold = colors[0, :, 0, 0], colors[0, :, 0, 1]
    assert hot[0] > hot[2] and cold[2] > cold[0]
    blended = overlay_heat(torch.zeros(1, 3, 1, 2), torch.tensor([[[1.0, 0.0]]]), opacity=0.5)
    torch.testing.assert_close(blended, colors * 0.5)


def test_labelled_strip_layout():
    frames = torch.ones(3, 3, 20, 30)
    strip = labelled_strip(frames, ["a", "b", "c"], gap=4)
    assert strip.shape == (3, 20 + 14, 3 * 30 + 2 * 4)
    assert strip[:, 14:, :30].min() == 1.0  # frame pixels are copied under the caption bar


# --- real photos, built-in backbone -------------------------------------------------------------


@pytest.fixture(scope="module")
def backbone():
    return EfficientNetLitePatchBackbone.from_package()


def photo(name):
    from skimage import data

    return torch.from_numpy(np.asarray(getattr(data, name)())).float().div(255).permute(2, 0, 1).unsqueeze(0)


def test_identical_image_scores_one_everywhere(backbone):
    cat = photo("chelsea")
    result = score_patches(backbone, cat, cat, resolution=256)
    assert result.quality.shape == (1, 16, 24)
    assert result.quality.min().item() > 0.999
    assert result.scores.item() == pytest.approx(1.0, abs=1e-4)


def test_replaced_quadrant_scores_lower_exactly_there(backbone):
    cat, coffee = photo("chelsea"), photo("coffee")
    height, width = cat.shape[-2:]
    edited = cat.clone()
    edited[..., : height // 2, : width // 2] = F.interpolate(coffee, size=(height // 2, width // 2), mode="bilinear")
    result = score_patches(backbone, edited, cat, resolution=448)
    quality = result.quality[0]
    rows, cols = quality.shape
    # Patches wholly inside the replaced quadrant (one patch of margin for receptive fields).
    inside = quality[: rows // 2 - 1, : cols // 2 - 1]
    outside = torch.cat([quality[rows // 2 + 1 :].flatten(), quality[:, cols // 2 + 1 :].flatten()])
    assert inside.mean() < 0.5, inside.mean()
    assert outside.mean() > 0.85, outside.mean()
    assert (inside.flatten().quantile(0.9) < outside.quantile(0.1)).item()


def test_second_view_of_subject_beats_unrelated_photo(backbone):
    from skimage import data

    left, right = (
        torch.from_numpy(view).float().div(255).permute(2, 0, 1).unsqueeze(0) for view in data.stereo_motorcycle()[:2]
    )
    same_subject = score_patches(backbone, right, left).scores.item()
    unrelated = score_patches(backbone, photo("coffee"), left).scores.item()
    assert same_subject > unrelated + 0.3, (same_subject, unrelated)


def test_references_of_other_sizes_and_counts(backbone):
    generated = torch.rand(3, 3, 64, 96)
    references = torch.cat([photo("chelsea"), F.interpolate(photo("coffee"), size=(300, 451))])
    result = score_patches(backbone, generated, references, resolution=128)
    assert result.quality.shape == (3, 8, 12)
    assert result.upsampled().shape == (3, 64, 96)
    assert result.metadata["references"] == 2
    assert ((0 <= result.quality) & (result.quality <= 1)).all()


class PixelBackbone(PatchBackbone):
    """A backbone without weights: the 8x8-pooled pixels are the features. Enough for the input
    checks, where a real network would only cost time."""

    name = "pooled pixels"
    patch_size = 8

    def forward(self, images):
        return F.avg_pool2d(images, self.patch_size)


def test_mask_count_must_match_references():
    references = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    generated = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with pytest.raises(ValueError, match="3 subject masks for 2 reference"):
        score_patches(PixelBackbone(), generated, references, torch.ones(3, 64, 64), resolution=64)
    # One mask for all references, at any size, is that mask on every reference.
    left_half = torch.zeros(1, 32, 32)
    left_half[..., :16] = 1
    one = score_patches(PixelBackbone(), generated, references, left_half, resolution=64).quality
    each = score_patches(PixelBackbone(), generated, references, left_half.expand(2, -1, -1), resolution=64).quality
    unmasked = score_patches(PixelBackbone(), generated, references, None, resolution=64).quality
    torch.testing.assert_close(one, each)
    assert not torch.allclose(one, unmasked)


def test_empty_batches_are_errors():
    with pytest.raises(ValueError, match="no generated images"):
        score_patches(PixelBackbone(), torch.rand(0, 3, 64, 64), torch.rand(1, 3, 64, 64))
    with pytest.raises(ValueError, match="no reference images"):
        score_patches(PixelBackbone(), torch.rand(1, 3, 64, 64), torch.rand(0, 3, 64, 64))
