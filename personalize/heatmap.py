"""Heat-map rendering of per-pixel quality (or any [0, 1] map) over images."""
from __future__ import annotations

import torch
from kornia.color import ColorMap, ColorMapType, apply_colormap


def badness_colors(quality: torch.Tensor, colormap: str = "turbo") -> torch.Tensor:
    """Colour a quality map so that bad (low-quality) regions are hot.

    Turbo maps quality 1 to dark blue and quality 0 to dark red, so the worst patches are
    the reddest spots at a glance.

    Args:
        quality: ``[B, H, W]`` in [0, 1].
        colormap: a kornia ``ColorMapType`` name.

    Returns:
        ``[B, 3, H, W]`` RGB in 0..1.
    """
    badness = (1.0 - quality.clamp(0, 1)).unsqueeze(1)
    levels = (badness * 255).round().to(torch.uint8)
    palette = ColorMap(base=ColorMapType[colormap], num_colors=256, device=quality.device)
    return apply_colormap(levels, palette)


def overlay_heatmap(images: torch.Tensor, quality: torch.Tensor, opacity: float = 0.55,
                    colormap: str = "turbo") -> torch.Tensor:
    """Blend the badness colours of ``quality`` over ``images``.

    Args:
        images: ``[B, 3, H, W]`` RGB in 0..1.
        quality: ``[B, H, W]`` in [0, 1], same H and W as ``images``.
        opacity: weight of the heat-map colours (0 = image only, 1 = colours only).

    Returns:
        ``[B, 3, H, W]`` RGB in 0..1.
    """
    colors = badness_colors(quality, colormap).to(images.dtype)
    return (images * (1.0 - opacity) + colors * opacity).clamp(0, 1)
