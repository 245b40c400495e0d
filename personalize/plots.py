"""Small line plots drawn with PIL (no plotting library needed inside ComfyUI)."""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageDraw

COLORS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (255, 127, 14), (148, 103, 189), (140, 86, 75)]


def _panel(draw: ImageDraw.ImageDraw, box: tuple[int, int, int, int], title: str,
           series: dict[str, list[float]]) -> None:
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
        points = [(left + 4 + (right - left - 8) * i / max(len(line) - 1, 1),
                   inner_bottom - (inner_bottom - inner_top) * (v - low) / (high - low))
                  for i, v in enumerate(line) if np.isfinite(v)]
        if len(points) == 1:
            draw.ellipse([points[0][0] - 2, points[0][1] - 2, points[0][0] + 2, points[0][1] + 2], fill=color)
        elif points:
            draw.line(points, fill=color, width=2)


def line_panels(panels: list[tuple[str, dict[str, list[float]]]], width: int = 720, panel_height: int = 150) -> torch.Tensor:
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
    return line_panels([
        ("DPO loss", {"loss": history.get("loss", [])}),
        ("implicit accuracy", {"accuracy": history.get("accuracy", [])}),
        ("reward margin (preference logit)", {"margin": history.get("margin", [])}),
        ("raw errors (model / reference, winner / loser)",
         {name: history.get(name, []) for name in ("model_winner", "model_loser", "reference_winner", "reference_loser")}),
    ])
