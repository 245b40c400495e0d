"""Heat-map rendering of [0, 1] maps over images, and labelled strips of frames."""
from __future__ import annotations

import numpy as np
import torch
from kornia.color import ColorMap, ColorMapType, apply_colormap
from PIL import Image, ImageDraw


def heat_colors(heat: torch.Tensor, colormap: str = "turbo") -> torch.Tensor:
    """Colour a map so that high values are hot.

    With turbo, 0 is dark blue and 1 dark red. Patch quality is drawn as ``1 - quality`` so
    the worst patches are the reddest; focus maps are drawn as they are.

    Args:
        heat: ``[B, H, W]`` in [0, 1].
        colormap: a kornia ``ColorMapType`` name.

    Returns:
        ``[B, 3, H, W]`` RGB in 0..1.
    """
    levels = (heat.clamp(0, 1).unsqueeze(1) * 255).round().to(torch.uint8)
    palette = ColorMap(base=ColorMapType[colormap], num_colors=256, device=heat.device)
    return apply_colormap(levels, palette)


def overlay_heat(images: torch.Tensor, heat: torch.Tensor, opacity: float = 0.55,
                 colormap: str = "turbo") -> torch.Tensor:
    """Blend the colours of ``heat`` over ``images``.

    Args:
        images: ``[B, 3, H, W]`` RGB in 0..1.
        heat: ``[B, H, W]`` in [0, 1], same H and W as ``images``.
        opacity: weight of the colours (0 = image only, 1 = colours only).

    Returns:
        ``[B, 3, H, W]`` RGB in 0..1.
    """
    colors = heat_colors(heat, colormap).to(images.dtype)
    return (images * (1.0 - opacity) + colors * opacity).clamp(0, 1)


def labelled_strip(frames: torch.Tensor, labels: list[str], gap: int = 4) -> torch.Tensor:
    """Lay frames side by side with a caption bar above each.

    Args:
        frames: ``[F, 3, H, W]`` RGB in 0..1.
        labels: one caption per frame.
        gap: pixels between frames.

    Returns:
        ``[3, H + caption, F * W + (F - 1) * gap]`` RGB in 0..1.
    """
    count, _, height, width = frames.shape
    caption = max(14, height // 12)
    canvas = Image.new("RGB", (count * width + (count - 1) * gap, height + caption), (20, 20, 20))
    draw = ImageDraw.Draw(canvas)
    pixels = (frames.clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype(np.uint8)
    for index, (frame, label) in enumerate(zip(pixels, labels)):
        left = index * (width + gap)
        canvas.paste(Image.fromarray(frame), (left, caption))
        draw.text((left + 3, 1), label, fill=(235, 235, 235))
    return torch.from_numpy(np.asarray(canvas, dtype=np.float32) / 255.0).permute(2, 0, 1)
