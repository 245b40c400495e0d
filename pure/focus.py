"""FocusDPO focus regions: where a preference update should concentrate, and when.

FocusDPO (arXiv 2509.01181) publishes no code or formulas; following its figure, a correspondence
map (1 - best centred match against each subject's patches), a complexity map (local entropy) and
a smoothstep timestep gate are blended into focus weights. ``FocusMaps`` keeps both maps so a
trainer can ask for any sample's weights at any timestep without recomputing features.

Formulas and choices: docs/algorithms.md, section 'Focus regions (FocusDPO)'.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import kornia
import torch
import torch.nn.functional as F

from .backbone import PatchBackbone, extract_patch_features
from .drawing import labelled_strip, overlay_heat
from .errors import InputError
from .images import maps_to_grid
from .patch_quality import best_match_quality


def local_entropy(images: torch.Tensor, blur_sigma: float = 1.5, window: int = 9, bins: int = 16) -> torch.Tensor:
    """Local Shannon entropy of the blurred grey image, normalised to [0, 1].

    Each pixel's grey level falls in one of ``bins`` equal-width bins (hard assignment, so a
    flat region has exactly zero entropy whatever its grey level); a ``window`` x ``window``
    box filter turns the one-hot bins into local histograms ``p``; entropy is
    ``-sum p log p / log bins``.

    Args:
        images: ``[B, 3, H, W]`` RGB in 0..1.
        blur_sigma: Gaussian blur before the histogram (0 = none), suppressing pixel noise.
        window: side of the square neighbourhood, in pixels (odd).
        bins: histogram levels.

    Returns:
        ``[B, H, W]`` in [0, 1]: 0 on flat regions, 1 where all levels are equally present.
    """
    gray = kornia.color.rgb_to_grayscale(images)
    if blur_sigma > 0:
        kernel = 2 * int(round(3 * blur_sigma)) + 1
        gray = kornia.filters.gaussian_blur2d(gray, (kernel, kernel), (blur_sigma, blur_sigma))
    index = (gray.squeeze(1) * bins).long().clamp(0, bins - 1)
    assignment = F.one_hot(index, bins).permute(0, 3, 1, 2).to(gray.dtype)
    histogram = kornia.filters.box_blur(assignment, (window, window), border_type="reflect")
    entropy = -(histogram * torch.log(histogram.clamp(min=1e-8))).sum(dim=1)
    return (entropy / torch.log(torch.tensor(float(bins)))).clamp(0, 1)


def correspondence_priority(
    generated: torch.Tensor, references: torch.Tensor, subject_weights: list[torch.Tensor | None]
) -> torch.Tensor:
    """Priority = 1 - best match of each generated patch against any subject's patches.

    Args:
        generated: ``[B, C, h, w]`` generated patch features.
        references: ``[R, C, hr, wr]`` reference patch features.
        subject_weights: per subject, ``[R, hr, wr]`` mask coverage of the reference patches
            (or None for "all reference patches").

    Returns:
        ``[B, h, w]`` in [0, 1]: 1 = matches no subject, 0 = matches a subject exactly.
    """
    matches = [best_match_quality(generated, references, weights) for weights in subject_weights]
    return 1.0 - torch.stack(matches).amax(dim=0)


def complexity_gate(progress: torch.Tensor | float, gate_start: float = 0.3, gate_end: float = 0.7) -> torch.Tensor:
    """How much the complexity map counts at sampling progress ``p``: 0 before ``gate_start``,
    1 after ``gate_end``, a smoothstep between.

    Args:
        progress: scalar or ``[B]``; 0 = first (noisiest) step, 1 = last (clean) step.

    Returns:
        Same shape as ``progress``, in [0, 1].
    """
    progress = torch.as_tensor(progress, dtype=torch.float32)
    if gate_end <= gate_start:
        return (progress >= gate_start).float()
    x = ((progress - gate_start) / (gate_end - gate_start)).clamp(0, 1)
    return x * x * (3 - 2 * x)


def percent_for_sigma(sigma: float, percent_to_sigma: Callable[[float], float], iterations: int = 40) -> float:
    """Invert a model's ``percent_to_sigma`` (monotone decreasing) by bisection.

    ComfyUI's ``model_sampling.percent_to_sigma`` defines "percent" for eps, v and flow models
    alike; inverting it numerically keeps one definition for all of them.
    """
    low, high = 0.0, 1.0
    for _ in range(iterations):
        middle = (low + high) / 2
        if percent_to_sigma(middle) > sigma:
            low = middle
        else:
            high = middle
    return (low + high) / 2


def blend_focus(
    correspondence: torch.Tensor,
    complexity: torch.Tensor,
    progress: torch.Tensor | float,
    gate_start: float = 0.3,
    gate_end: float = 0.7,
    complexity_weight: float = 1.0,
) -> torch.Tensor:
    """Focus weights ``(corr + w g(p) cplx) / (1 + w g(p))``.

    Args:
        correspondence: ``[B, h, w]`` mismatch priority in [0, 1].
        complexity: ``[B, h, w]`` in [0, 1], same grid.
        progress: scalar or ``[B]`` sampling progress (see ``complexity_gate``).

    Returns:
        ``[B, h, w]`` in [0, 1].
    """
    gate = complexity_gate(progress, gate_start, gate_end).to(correspondence.device) * complexity_weight
    gate = gate.reshape(-1, 1, 1) if gate.ndim else gate
    return (correspondence + gate * complexity) / (1 + gate)


@dataclass
class FocusMaps:
    """The two ingredients of the focus map for a batch of generated images.

    Attributes:
        correspondence: ``[B, h, w]`` mismatch priority on the backbone's patch grid.
        complexity: ``[B, H, W]`` local entropy at image resolution.
    """

    correspondence: torch.Tensor
    complexity: torch.Tensor

    def on_grid(self, grid_size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Both maps resized to ``grid_size`` (area for downsampling, bilinear otherwise)."""
        return (
            maps_to_grid(self.correspondence, grid_size).clamp(0, 1),
            maps_to_grid(self.complexity, grid_size).clamp(0, 1),
        )

    def focus(
        self,
        progress: torch.Tensor | float,
        grid_size: tuple[int, int],
        gate_start: float = 0.3,
        gate_end: float = 0.7,
        complexity_weight: float = 1.0,
    ) -> torch.Tensor:
        """``[B, gh, gw]`` focus weights at ``progress`` (scalar or one per sample) on a grid,
        e.g. a latent grid for training."""
        correspondence, complexity = self.on_grid(grid_size)
        return blend_focus(correspondence, complexity, progress, gate_start, gate_end, complexity_weight)


def subject_weights_for(
    masks: torch.Tensor | None, reference_count: int, grid_size: tuple[int, int]
) -> list[torch.Tensor | None]:
    """Per-subject coverage of the reference patches from a MASK batch.

    - no masks: one subject, all reference patches;
    - one mask: one subject, the same mask on every reference;
    - as many masks as references: one subject per reference image, each its own mask;
    - several masks for a single reference image: several subjects in that image.

    Returns:
        A list with, per subject, ``[R, h, w]`` coverage (zeros on references without it).
    """
    if masks is None:
        return [None]
    coverage = maps_to_grid(masks, grid_size)
    if masks.shape[0] == 1:
        return [coverage.expand(reference_count, -1, -1)]
    if reference_count == 1:
        return [cover.unsqueeze(0) for cover in coverage]
    if masks.shape[0] == reference_count:
        subjects = []
        for index in range(reference_count):
            weights = torch.zeros_like(coverage)
            weights[index] = coverage[index]
            subjects.append(weights)
        return subjects
    raise InputError(
        f"got {masks.shape[0]} subject masks for {reference_count} reference images; give one mask, one "
        "per reference image, or several masks (one per subject) for a single reference image"
    )


def compute_focus_maps(
    backbone: PatchBackbone,
    generated: torch.Tensor,
    references: torch.Tensor,
    subject_masks: torch.Tensor | None = None,
    resolution: int = 448,
    blur_sigma: float = 1.5,
    window: int = 9,
) -> FocusMaps:
    """Correspondence and complexity maps of generated images against reference photos.

    Args:
        backbone: patch-feature extractor.
        generated: ``[B, 3, H, W]`` RGB in 0..1.
        references: ``[R, 3, Hr, Wr]`` RGB in 0..1.
        subject_masks: optional ``[S, Hm, Wm]`` masks (see ``subject_weights_for``).
        resolution: short side for feature extraction.
        blur_sigma, window: complexity-map parameters (see ``local_entropy``).
    """
    if generated.shape[0] == 0 or references.shape[0] == 0:
        raise InputError("need at least one generated and one reference image")
    reference_features = extract_patch_features(backbone, references, resolution)
    subjects = subject_weights_for(subject_masks, references.shape[0], reference_features.shape[-2:])
    generated_features = extract_patch_features(backbone, generated, resolution)
    return FocusMaps(
        correspondence=correspondence_priority(generated_features, reference_features, subjects),
        complexity=local_entropy(generated, blur_sigma, window),
    )


def focus_strips(
    images: torch.Tensor,
    correspondence: torch.Tensor,
    complexity: torch.Tensor,
    frames: list[tuple[float, str]],
    opacity: float,
    gate_start: float = 0.3,
    gate_end: float = 0.7,
    complexity_weight: float = 1.0,
) -> torch.Tensor:
    """One labelled strip per image: its focus overlay at each ``(progress, label)`` frame.

    The blend is per pixel, so callers pass thumbnails and maps at thumbnail size.

    Args:
        images: ``[B, 3, H, W]`` RGB in 0..1.
        correspondence, complexity: ``[B, H, W]`` in [0, 1].

    Returns:
        ``[B, 3, H + caption, F * W + gaps]``.
    """
    overlays = [
        overlay_heat(
            images, blend_focus(correspondence, complexity, progress, gate_start, gate_end, complexity_weight), opacity
        )
        for progress, _ in frames
    ]  # each [B, 3, H, W]
    labels = [label for _, label in frames]
    return torch.stack(
        [
            labelled_strip(torch.stack([overlay[index] for overlay in overlays]), labels)
            for index in range(images.shape[0])
        ]
    )
