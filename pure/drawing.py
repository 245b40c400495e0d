"""Drawing with kornia colour maps and PIL (no plotting library inside ComfyUI): heat maps of
[0, 1] maps over images, labelled strips of frames, line plots and text tables as images."""

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


def overlay_heat(
    images: torch.Tensor, heat: torch.Tensor, opacity: float = 0.55, colormap: str = "turbo"
) -> torch.Tensor:
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
    for index, (frame, label) in enumerate(zip(pixels, labels, strict=True)):
        left = index * (width + gap)
        canvas.paste(Image.fromarray(frame), (left, caption))
        draw.text((left + 3, 1), label, fill=(235, 235, 235))
    return torch.from_numpy(np.asarray(canvas, dtype=np.float32) / 255.0).permute(2, 0, 1)


COLORS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (255, 127, 14), (148, 103, 189), (140, 86, 75)]


def _panel(
    draw: ImageDraw.ImageDraw, box: tuple[int, int, int, int], title: str, series: dict[str, list[float]]
) -> None:
    left, top, right, bottom = box
    draw.rectangle(box, outline=(180, 180, 180))
    draw.text((left + 4, top + 2), title, fill=(20, 20, 20))
    values = [v for line in series.values() for v in line if np.isfinite(v)]
    if not values:
        draw.text((left + 4, top + 16), "no data", fill=(120, 120, 120))
        return
    low, high = min(values), max(values)
    if high - low < 1e-12:
        low, high = low - 0.5, high + 0.5
    draw.text((right - 70, top + 2), f"{high:.4g}", fill=(90, 90, 90))
    draw.text((right - 70, bottom - 12), f"{low:.4g}", fill=(90, 90, 90))
    inner_top, inner_bottom = top + 16, bottom - 4
    for index, (name, line) in enumerate(series.items()):
        color = COLORS[index % len(COLORS)]
        draw.text((left + 4 + 110 * index, bottom + 2), name, fill=color)
        points = [
            (
                left + 4 + (right - left - 8) * i / max(len(line) - 1, 1),
                inner_bottom - (inner_bottom - inner_top) * (v - low) / (high - low),
            )
            for i, v in enumerate(line)
            if np.isfinite(v)
        ]
        if len(points) == 1:
            draw.ellipse([points[0][0] - 2, points[0][1] - 2, points[0][0] + 2, points[0][1] + 2], fill=color)
        elif points:
            draw.line(points, fill=color, width=2)


def line_panels(
    panels: list[tuple[str, dict[str, list[float]]]], width: int = 720, panel_height: int = 150
) -> torch.Tensor:
    """Stack titled line-plot panels vertically.

    Args:
        panels: ``(title, {series name: values})`` per panel.

    Returns:
        ``[H, W, 3]`` RGB in 0..1.
    """
    gap = 18
    height = len(panels) * (panel_height + gap) + 6
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    for index, (title, series) in enumerate(panels):
        top = 4 + index * (panel_height + gap)
        _panel(draw, (6, top, width - 6, top + panel_height), title, series)
    return torch.from_numpy(np.asarray(canvas, dtype=np.float32) / 255.0)


def training_plot(history: dict[str, list[float]]) -> torch.Tensor:
    """The DPO trainer's plot: loss; implicit accuracy and reward margin; the four raw errors."""
    return line_panels(
        [
            ("DPO loss", {"loss": history.get("loss", [])}),
            ("implicit accuracy", {"accuracy": history.get("accuracy", [])}),
            ("reward margin (preference logit)", {"margin": history.get("margin", [])}),
            (
                "raw errors (model / reference, winner / loser)",
                {
                    name: history.get(name, [])
                    for name in ("model_winner", "model_loser", "reference_winner", "reference_loser")
                },
            ),
        ]
    )


def render_text_image(text: str, padding: int = 10, scale: int = 2) -> torch.Tensor:
    """Render monospaced text (e.g. ``format_table``'s output) as a light image.

    Returns:
        ``[H, W, 3]`` RGB in 0..1.
    """
    lines = text.splitlines() or [""]
    char_w, char_h = 6, 11  # PIL's built-in bitmap font
    width = padding * 2 + char_w * max(len(line) for line in lines)
    height = padding * 2 + char_h * len(lines)
    canvas = Image.new("RGB", (width, height), (250, 250, 248))
    draw = ImageDraw.Draw(canvas)
    for row, line in enumerate(lines):
        draw.text((padding, padding + row * char_h), line, fill=(20, 20, 20))
    canvas = canvas.resize((width * scale, height * scale), Image.NEAREST)
    return torch.from_numpy(np.asarray(canvas, dtype=np.float32) / 255.0)
