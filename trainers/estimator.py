"""PatchDPO's self-supervised step: tune a backbone so its patch features match the same
point of the subject across views, using only the artist's reference photos.

PatchDPO does not publish this objective; our design: random affine views whose known maps give
the true patch matches, a dense InfoNCE objective, only a residual 1x1 head trained on the frozen
backbone (``TunedPatchBackbone``), and held-out top-1 correspondence accuracy as the evidence.

Formulas, choices and constants: docs/algorithms.md, section 'Patch-quality estimator'.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import kornia
import torch
import torch.nn.functional as F
from einops import rearrange

from ..pure.backbone import PatchBackbone, TunedPatchBackbone
from ..pure.errors import InputError

# Photometric jitter of each view: brightness and saturation factors drawn uniformly from these
# ranges, so matching cannot rely on exact colour.
BRIGHTNESS_JITTER = (0.8, 1.2)
SATURATION_JITTER = (0.7, 1.3)


def _uniform(bounds: tuple[float, float], generator: torch.Generator) -> float:
    low, high = bounds
    return low + (high - low) * torch.rand((), generator=generator).item()


@dataclass
class ViewPair:
    """Two warped views of one photo and their true patch correspondences.

    Attributes:
        view_a, view_b: ``[3, S, S]`` RGB in 0..1.
        source: ``[K]`` flat patch indices in A that have a match.
        target: ``[K]`` flat patch indices of their matches in B.
    """

    view_a: torch.Tensor
    view_b: torch.Tensor
    source: torch.Tensor
    target: torch.Tensor


def random_affine(
    size: int,
    generator: torch.Generator,
    max_rotation: float = 20.0,
    scale_range: tuple[float, float] = (0.8, 1.25),
    max_shift: float = 0.1,
    flip: bool = True,
) -> torch.Tensor:
    """A random ``[3, 3]`` map from canvas pixels to view pixels, about the canvas centre."""

    angle = math.radians(_uniform((-max_rotation, max_rotation), generator))
    scale = _uniform(scale_range, generator)
    mirror = -1.0 if flip and torch.rand((), generator=generator).item() < 0.5 else 1.0
    shift_x = _uniform((-max_shift, max_shift), generator) * size
    shift_y = _uniform((-max_shift, max_shift), generator) * size
    centre = size / 2
    cos, sin = math.cos(angle) * scale, math.sin(angle) * scale
    linear = torch.tensor([[cos * mirror, -sin], [sin * mirror, cos]])
    offset = torch.tensor([centre + shift_x, centre + shift_y]) - linear @ torch.tensor([centre, centre])
    matrix = torch.eye(3)
    matrix[:2, :2], matrix[:2, 2] = linear, offset
    return matrix


def patch_correspondences(
    map_a: torch.Tensor, map_b: torch.Tensor, size: int, patch: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """True matches between the patch grids of two views of one canvas.

    Args:
        map_a, map_b: ``[3, 3]`` canvas-to-view pixel maps.
        size: canvas and view side in pixels; ``patch``: patch side.

    Returns:
        ``(source, target)``: flat patch indices in A and their matches in B.
    """
    grid = size // patch
    coords = (torch.arange(grid, dtype=torch.float32) + 0.5) * patch
    ys, xs = torch.meshgrid(coords, coords, indexing="ij")
    points_a = torch.stack([xs.flatten(), ys.flatten(), torch.ones(grid * grid)])
    canvas = torch.linalg.inv(map_a) @ points_a
    points_b = map_b @ canvas
    inside_canvas = ((canvas[:2] >= 0) & (canvas[:2] < size)).all(dim=0)
    inside_b = ((points_b[:2] >= 0) & (points_b[:2] < size)).all(dim=0)
    keep = inside_canvas & inside_b
    cells = (points_b[:2, keep] / patch).floor().long()
    return torch.nonzero(keep).flatten(), cells[1] * grid + cells[0]


def square_canvases(photos: torch.Tensor, size: int) -> torch.Tensor:
    """``[R, 3, H, W]`` -> ``[R, 3, size, size]`` (antialiased bilinear; as is when already that size)."""
    if tuple(photos.shape[-2:]) == (size, size):
        return photos
    return F.interpolate(photos, size=(size, size), mode="bilinear", antialias=True, align_corners=False)


def make_view_pairs(
    photos: torch.Tensor, count: int, size: int, patch: int, generator: torch.Generator
) -> list[ViewPair]:
    """``count`` view pairs of randomly chosen photos.

    Args:
        photos: ``[R, 3, H, W]`` RGB in 0..1 (resized to ``size`` x ``size`` unless they are already).
        size: square view side (a multiple of ``patch``).
    """
    canvases = square_canvases(photos, size)
    pairs = []
    for _ in range(count):
        canvas = canvases[torch.randint(len(canvases), (), generator=generator)].unsqueeze(0)
        maps = [random_affine(size, generator) for _ in range(2)]
        views = []
        for matrix in maps:
            view = kornia.geometry.transform.warp_affine(
                canvas, matrix[:2].unsqueeze(0), (size, size), padding_mode="zeros", align_corners=False
            )
            brightness = _uniform(BRIGHTNESS_JITTER, generator)
            saturation = _uniform(SATURATION_JITTER, generator)
            view = kornia.enhance.adjust_saturation(view * brightness, saturation).clamp(0, 1)
            views.append(view[0])
        source, target = patch_correspondences(maps[0], maps[1], size, patch)
        pairs.append(ViewPair(views[0], views[1], source, target))
    return pairs


def _flat(features: torch.Tensor) -> torch.Tensor:
    """``[C, h, w]`` -> ``[h * w, C]``, L2-normalised."""
    return F.normalize(rearrange(features, "c h w -> (h w) c"), dim=1)


def dense_info_nce(
    features_a: torch.Tensor,
    features_b: torch.Tensor,
    source: torch.Tensor,
    target: torch.Tensor,
    temperature: float = 0.1,
) -> torch.Tensor:
    """Mean cross-entropy of each source patch of A picking its true match among B's patches.

    Args:
        features_a, features_b: ``[C, h, w]`` features of the two views.
        source, target: ``[K]`` matched flat indices.
    """
    logits = _flat(features_a)[source] @ _flat(features_b).T / temperature
    return F.cross_entropy(logits, target)


@torch.no_grad()
def correspondence_accuracy(
    project: Callable[[torch.Tensor], torch.Tensor], base: Callable[[torch.Tensor], torch.Tensor], pairs: list[ViewPair]
) -> float:
    """Top-1 accuracy of nearest-neighbour patch matching over view pairs.

    Args:
        project: base features ``[B, C, h, w]`` -> features to match with.
        base: images ``[B, 3, S, S]`` -> base features.
    """
    correct = total = 0
    for pair in pairs:
        features = project(base(torch.stack([pair.view_a, pair.view_b])))
        similarity = _flat(features[0])[pair.source] @ _flat(features[1]).T
        correct += int((similarity.argmax(dim=1) == pair.target).sum())
        total += len(pair.source)
    return correct / max(total, 1)


@dataclass
class EstimatorTrainingResult:
    backbone: TunedPatchBackbone
    accuracy_before: float
    accuracy_after: float
    losses: list[float] = field(default_factory=list)


@dataclass(frozen=True)
class EstimatorSettings:
    """How the patch head is tuned.

    Attributes:
        steps: optimisation steps (0 = measure only, return the backbone untuned).
        learning_rate: AdamW's learning rate for the head.
        resolution: square view side (rounded to the patch grid).
        pairs_per_step: view pairs per step.
        temperature: the dense InfoNCE temperature.
        seed: seeds the views (training and held-out ones).
        held_out_pairs: view pairs accuracy is measured on, never trained on.
    """

    steps: int = 200
    learning_rate: float = 1e-3
    resolution: int = 224
    pairs_per_step: int = 2
    temperature: float = 0.1
    seed: int = 0
    held_out_pairs: int = 16


def train_patch_estimator(
    backbone: PatchBackbone,
    base_id: str,
    photos: torch.Tensor,
    settings: EstimatorSettings = EstimatorSettings(),
    on_step: Callable[[int, float], None] | None = None,
) -> EstimatorTrainingResult:
    """Tune a residual patch head on augmented views of ``photos``.

    Args:
        backbone: the base backbone (frozen); for a ``TunedPatchBackbone``, a copy of its head
            is trained further (the input is never modified).
        base_id: how the loader will find the base again (stored in the saved file).
        photos: ``[R, 3, H, W]`` RGB in 0..1, on the device to train on.
        settings: steps, learning rate, view size and seeds.
        on_step: called after every step with ``(step, loss)``; it may raise to interrupt.

    Returns:
        The tuned backbone and held-out top-1 correspondence accuracy before and after.
    """
    if photos.shape[0] == 0:
        raise InputError("no reference photos to train on")
    if backbone.fixed_input_size is not None:
        raise InputError("this backbone resizes inputs itself (CLIP vision); use DINOv2 or the built-in backbone")
    if isinstance(backbone, TunedPatchBackbone):  # continue from a copy; never mutate the input
        tuned = TunedPatchBackbone(backbone.base, backbone.base_id, backbone.head.out_channels).to(backbone.device)
        tuned.head.load_state_dict(backbone.head.state_dict())
    else:
        probe = 8 * backbone.patch_size  # large enough for every stage's kernels
        with torch.no_grad():
            channels = backbone(torch.zeros(1, 3, probe, probe, device=backbone.device)).shape[1]
        tuned = TunedPatchBackbone(backbone, base_id, channels).to(backbone.device)
    size = max(1, round(settings.resolution / tuned.patch_size)) * tuned.patch_size
    device = tuned.device
    photos = square_canvases(photos.to(device), size)  # once, not every step

    # Held-out views come from their own seed, so training never sees them.
    held_out = make_view_pairs(
        photos,
        settings.held_out_pairs,
        size,
        tuned.patch_size,
        torch.Generator().manual_seed(settings.seed + 1_000_003),
    )
    accuracy_before = correspondence_accuracy(tuned.project, tuned.base_features, held_out)

    generator = torch.Generator().manual_seed(settings.seed)  # every draw uses it: the process's RNG is left alone
    optimizer = torch.optim.AdamW(tuned.head.parameters(), lr=settings.learning_rate, weight_decay=1e-4)
    losses = []
    for step in range(settings.steps):
        pairs = make_view_pairs(photos, settings.pairs_per_step, size, tuned.patch_size, generator)
        base = tuned.base_features(torch.stack([view for pair in pairs for view in (pair.view_a, pair.view_b)]))
        features = tuned.project(base)
        loss = torch.stack(
            [
                dense_info_nce(features[2 * i], features[2 * i + 1], pair.source, pair.target, settings.temperature)
                for i, pair in enumerate(pairs)
                if len(pair.source)
            ]
        ).mean()
        if not torch.isfinite(loss):
            raise InputError(f"non-finite loss at step {step + 1}; lower the learning rate")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
        if on_step is not None:
            on_step(step + 1, losses[-1])

    accuracy_after = correspondence_accuracy(tuned.project, tuned.base_features, held_out)
    tuned.eval()
    return EstimatorTrainingResult(tuned, accuracy_before, accuracy_after, losses)
