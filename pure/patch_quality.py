"""PatchDPO patch quality: which patches of a generated image agree with the reference photos.

Our rule (PatchDPO's released code ships precomputed maps): a generated patch's quality is its
best cosine similarity to the reference patches inside the subject mask, after centring all
features on the mean reference-patch feature, clamped to [0, 1].

Formulas and choices: docs/algorithms.md, section 'Patch quality (PatchDPO)'.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from einops import rearrange

from .backbone import PatchBackbone, extract_patch_features
from .errors import InputError
from .images import maps_to_grid


@dataclass
class PatchQuality:
    """Per-patch quality of a batch of generated images.

    Attributes:
        quality: ``[B, h, w]`` in [0, 1], on the generated images' patch grid.
        image_size: ``(H, W)`` of the generated images the grid covers.
        backbone: name of the backbone that produced the features.
        metadata: free-form provenance (resolution, reference count, ...).
    """

    quality: torch.Tensor
    image_size: tuple[int, int]
    backbone: str
    metadata: dict = field(default_factory=dict)

    @property
    def scores(self) -> torch.Tensor:
        """``[B]``: mean patch quality per image."""
        return self.quality.mean(dim=(1, 2))

    def upsampled(self, size: tuple[int, int] | None = None) -> torch.Tensor:
        """``[B, H, W]`` quality bilinearly resized to ``size`` (default: the image size)."""
        size = tuple(size or self.image_size)
        return (
            F.interpolate(self.quality.unsqueeze(1), size=size, mode="bilinear", align_corners=False)
            .squeeze(1)
            .clamp(0, 1)
        )


def best_match_quality(
    generated: torch.Tensor,
    references: torch.Tensor,
    reference_weights: torch.Tensor | None = None,
    min_coverage: float = 0.5,
) -> torch.Tensor:
    """Best-match cosine quality of each generated patch against the reference patches.

    Args:
        generated: ``[B, C, h, w]`` generated-image patch features.
        references: ``[R, C, hr, wr]`` reference patch features.
        reference_weights: optional ``[R, hr, wr]`` subject-mask coverage per reference
            patch; patches covered less than ``min_coverage`` are not matched against.
        min_coverage: coverage threshold for a reference patch to count as subject.

    Returns:
        ``[B, h, w]`` quality in [0, 1].

    Raises:
        InputError: when no reference patch lies inside the mask.
    """
    reference_patches = rearrange(references, "r c h w -> (r h w) c")
    if reference_weights is not None:
        keep = rearrange(reference_weights, "r h w -> (r h w)") >= min_coverage
        reference_patches = reference_patches[keep]
    if reference_patches.shape[0] == 0:
        raise InputError("the subject mask covers no reference patch; paint a larger mask or leave it empty")
    centre = reference_patches.mean(dim=0)
    reference_patches = F.normalize(reference_patches - centre, dim=1)
    batch, _, height, width = generated.shape
    generated_patches = F.normalize(rearrange(generated, "b c h w -> b (h w) c") - centre, dim=2)
    best = torch.empty(batch, height * width, device=generated.device)
    for index in range(batch):  # one image at a time bounds the similarity matrix's memory
        best[index] = (generated_patches[index] @ reference_patches.T).amax(dim=1)
    return rearrange(best.clamp(0, 1), "b (h w) -> b h w", h=height, w=width)


def score_patches(
    backbone: PatchBackbone,
    generated: torch.Tensor,
    references: torch.Tensor,
    reference_masks: torch.Tensor | None = None,
    resolution: int = 448,
    on_images: Callable[[int], None] | None = None,
) -> PatchQuality:
    """Patch quality of generated images against reference photos.

    Args:
        backbone: patch-feature extractor.
        generated: ``[B, 3, H, W]`` RGB in 0..1.
        references: ``[R, 3, Hr, Wr]`` RGB in 0..1; size may differ from ``generated``.
        reference_masks: optional ``[1 or R, Hm, Wm]`` subject masks for the references (any
            size; resized to the references' patch grid).
        resolution: short side the images are resized to before feature extraction.
        on_images: progress callback, called with the number of images just processed
            (references, then generated); it may raise to interrupt.

    Returns:
        A ``PatchQuality`` on the generated images' patch grid.
    """
    if generated.shape[0] == 0:
        raise InputError("no generated images to score (empty batch)")
    if references.shape[0] == 0:
        raise InputError("no reference images (empty batch)")
    reference_features = extract_patch_features(backbone, references, resolution, on_chunk=on_images)
    reference_weights = None
    if reference_masks is not None:
        if reference_masks.shape[0] not in (1, references.shape[0]):
            raise InputError(
                f"got {reference_masks.shape[0]} subject masks for {references.shape[0]} reference "
                "images; give one mask for all references or one per reference"
            )
        reference_weights = maps_to_grid(reference_masks, reference_features.shape[-2:])
        reference_weights = reference_weights.expand(references.shape[0], -1, -1)
    generated_features = extract_patch_features(backbone, generated, resolution, on_chunk=on_images)
    quality = best_match_quality(generated_features, reference_features, reference_weights)
    return PatchQuality(
        quality=quality,
        image_size=(generated.shape[-2], generated.shape[-1]),
        backbone=backbone.name,
        metadata={
            "resolution": resolution,
            "references": int(references.shape[0]),
            "masked": reference_masks is not None,
        },
    )
